"""The folder a command is about to write, checked before any work: not another run (unless forced or resumed), not a
file, writable. A mistake here costs a second, not a model load."""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from pathlib import Path

from melbo.errors import MelboError


def new_run_folder(out: Path | None, kind: str, force: bool = False, resume: bool = False) -> Path:
    """``out``, or ``melbo-runs/KIND-DATE``; a one-line :class:`MelboError` where it cannot take a new run."""
    if resume and out is None:
        raise MelboError("--resume needs --out: the folder to continue")
    folder = out or Path("melbo-runs") / f"{kind}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    held = next((kind for kind in ("run", "study") if (folder / f"{kind}.json").exists()), None)
    if held and not (force or resume):
        raise MelboError(f"{folder} already holds a {held}; continue it with --resume, or pass --force to start it again")
    if folder.exists() and not folder.is_dir():
        raise MelboError(f"--out {folder} is a file, not a folder")
    parent = folder.absolute()
    while not parent.exists():
        parent = parent.parent
    try:  # a probe that leaves nothing behind
        shutil.rmtree(tempfile.mkdtemp(prefix=".melbo-probe-", dir=parent))
    except OSError as exc:
        raise MelboError(f"cannot write the run folder {folder}: {exc.strerror or exc}; choose another --out") from exc
    return folder
