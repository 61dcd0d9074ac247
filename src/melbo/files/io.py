"""Files melbo writes and reads, whatever they hold: atomic writes (temporary file + rename) and JSON sidecars."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from melbo.errors import MelboError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def need_file(path: Path, what: str) -> None:
    """A one-line error unless ``path`` is a file: ``what`` names it ("prompt file"), and a folder is called one."""
    if path.is_dir():
        raise MelboError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise MelboError(f"{what} {path} does not exist")


def starts_as_gguf(path: Path) -> bool:
    """Whether ``path`` begins with GGUF's magic bytes (a model or a control vector; anything else is not GGUF at all)."""
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


def write_bytes(data: bytes, path: Path) -> None:
    """``path.write_bytes(data)``, arguments in the order ``atomic_write(target, partial(write_bytes, data))`` needs."""
    path.write_bytes(data)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through ``write(tmp_path)`` then rename over ``path``; nothing half-written is ever left."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # named for the file asked for, not its folder or the temporary file beside it
        raise OSError(exc.errno, f"cannot write here ({exc.strerror})", str(path)) from exc
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give what open() would have given
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any, ascii_only: bool = False) -> None:
    """``value`` as indented JSON (non-ASCII kept unless ``ascii_only``), written atomically."""
    text = json.dumps(value, indent=1, ensure_ascii=ascii_only)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))


def read_json(path: Path) -> Any:
    """A JSON sidecar, or ``None`` when there is none; a corrupt one is a MelboError saying so."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MelboError(f"{path} is corrupt ({exc}); compute it again or delete it") from exc
