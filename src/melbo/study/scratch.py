"""Ray workers' scratch folders on their nodes, and the removal of those a killed worker left behind.

A worker runs each unit in a folder of its node's temp dir and removes it when the unit ends. A worker that is
killed (Ctrl-C or SIGTERM on the driver, which kills its workers; a node lost mid-study) never gets to: its folder
stays. So each folder's name says who made it, ``melbo-unit-<study>-<pid>-<random>`` (the driving study's token,
the worker's process id), and a folder whose worker process is gone is left over: the driver removes its own study's
on its node as it leaves Ray, and every worker removes any on its node when it starts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

PREFIX = "melbo-unit-"


def new_token() -> str:
    """A token naming one driven study's scratch folders."""
    return uuid.uuid4().hex[:12]


def make_scratch(token: str) -> Path:
    """A new scratch folder for one unit, named for ``token`` and this process."""
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{token}-{os.getpid()}-"))


def _owner(folder: Path) -> tuple[str, int] | None:
    """The (token, worker pid) in a scratch folder's name; None for other names."""
    parts = folder.name[len(PREFIX):].split("-")
    if not folder.name.startswith(PREFIX) or len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs: a zombie (killed, not yet reaped, as a killed Ray worker may stay) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # it ended just now, or there is no /proc (macOS: a zombie cannot be told apart there)
        return not Path("/proc").is_dir()
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"  # the state follows the parenthesised command name


def sweep(temp: Path | None = None, token: str | None = None) -> list[Path]:
    """Remove the scratch folders in ``temp`` (this process's temp dir) whose worker process is gone, only
    ``token``'s if given; the folders still in use (their worker alive) are returned."""
    in_use = []
    for folder in Path(temp or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        owner = _owner(folder)
        if owner is None or (token is not None and owner[0] != token):
            continue
        if _alive(owner[1]):
            in_use.append(folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return in_use


def sweep_after_kill(token: str, seconds: float = 10.0) -> None:
    """After killing a study's workers: remove its scratch folders on this node as their processes end (a killed
    process takes a moment to go), waiting at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while sweep(token=token) and time.monotonic() < deadline:
        time.sleep(0.2)


__all__ = ["PREFIX", "make_scratch", "new_token", "sweep", "sweep_after_kill"]
