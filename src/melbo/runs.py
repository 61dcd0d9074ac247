"""Run folders: the one place that knows their format.

A run is a folder holding

* ``vectors.safetensors``: one float32 tensor ``vectors`` of shape ``(N, d_model)``; row ``i`` is vector
  ``i``. In a MELBO-ortho run row 0 is the base vector θ0, as in the original post's ``.pt`` files.
* ``run.json``: what produced the vectors (model and its revision or file hash, layers, R, prompts,
  system prompt, seed, every hyper-parameter, package versions) and one record per vector (norm, loss,
  KL to the base, a completion...).

Both files are written atomically (temporary file + rename), vectors first and ``run.json`` last:
``run.json`` is the commit point, so a crash between the two leaves the previous run readable, and rows of
``vectors.safetensors`` beyond the records of ``run.json`` are ignored.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import pickle
import platform
import tempfile
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from melbo.errors import MelboError

VECTORS_FILE = "vectors.safetensors"
META_FILE = "run.json"
FORMAT_VERSION = 1
# What a resumed run must share with the run folder it continues.
RESUME_KEYS = ("kind", "model_identity", "layers", "prompts", "prompt_format", "config")


@dataclass
class Run:
    """A run folder in memory: its vectors ``(N, d_model)`` and its metadata."""

    path: Path
    vectors: Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Tensor] = field(default_factory=dict)  # engine state kept for --resume

    @property
    def records(self) -> list[dict[str, Any]]:
        """One dict per vector (``index``, ``norm`` and whatever the engine stored)."""
        return self.meta.setdefault("vectors", [])

    @property
    def source_layer(self) -> int:
        return int(self.meta["layers"]["source"])

    @property
    def target_layer(self) -> int:
        return int(self.meta["layers"]["target"])

    def vector(self, index: int) -> Tensor:
        if not 0 <= index < self.vectors.shape[0]:
            raise MelboError(f"run {self.path} has vectors 0 to {self.vectors.shape[0] - 1}, not {index}")
        return self.vectors[index]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("melbo", "torch", "transformers", "safetensors", "gguf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Any) -> None:
    """Write through ``write(tmp_path)`` then rename over ``path``; nothing half-written is ever left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def write_run(path: str | Path, vectors: Tensor, meta: dict[str, Any], extra: dict[str, Tensor] | None = None) -> Run:
    """Write (or overwrite) a run folder atomically. ``meta["vectors"]`` holds one record per row;
    ``extra`` tensors (engine state for resuming) are stored beside ``vectors``."""
    path = Path(path)
    vectors = vectors.detach().to("cpu", torch.float32).contiguous()
    if vectors.dim() != 2:
        raise ValueError(f"vectors must be (N, d_model), got {tuple(vectors.shape)}")
    meta = dict(meta)
    meta.setdefault("format", FORMAT_VERSION)
    meta.setdefault("created", now_iso())
    meta["updated"] = now_iso()
    meta.setdefault("versions", package_versions())
    meta["count"] = int(vectors.shape[0])
    meta["d_model"] = int(vectors.shape[1])
    records = meta.setdefault("vectors", [])
    if len(records) != vectors.shape[0]:
        raise ValueError(f"{len(records)} records for {vectors.shape[0]} vectors")
    try:
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob(".*.tmp"):  # left by a process killed in the middle of a write
            stale.unlink(missing_ok=True)
        tensors = {"vectors": vectors, **{k: v.detach().to("cpu", torch.float32).contiguous() for k, v in (extra or {}).items()}}
        atomic_write(path / VECTORS_FILE, lambda tmp: save_file(tensors, str(tmp)))
        text = json.dumps(meta, indent=1, default=_json_default, allow_nan=True)
        atomic_write(path / META_FILE, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
    except PermissionError as exc:
        raise MelboError(f"cannot write to {path}: permission denied; choose another --out folder") from exc
    except OSError as exc:
        raise MelboError(f"cannot write run folder {path}: {exc.strerror or exc}; the previous files are intact") from exc
    return Run(path=path, vectors=vectors, meta=meta, extra=dict(extra or {}))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, Tensor) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in run.json")


def read_meta(path: str | Path) -> dict[str, Any]:
    """The validated ``run.json`` of a run folder (what a report needs even where there are no vectors)."""
    path = Path(path)
    if not path.is_dir():
        raise MelboError(f"run folder {path} does not exist")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise MelboError(f"{path} is not a melbo run folder: it has no {META_FILE}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MelboError(f"{meta_path} is corrupt (not valid JSON: {exc}); restore it or start a new run") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("vectors"), list):
        raise MelboError(f"{meta_path} is not a melbo run record (no list of vectors)")
    return meta


def read_run(path: str | Path, d_model: int | None = None) -> Run:
    """Read and validate a run folder.

    Args:
        d_model: when given, the vectors must have this width (the model's hidden size).

    Raises:
        MelboError: saying which file is missing or wrong, and how.
    """
    path = Path(path)
    meta = read_meta(path)
    vectors_path = path / VECTORS_FILE
    if meta.get("kind") == "post-dump":
        raise MelboError(f"{path} holds the original post's published outputs, not vectors: only `melbo report` reads it")
    if not vectors_path.is_file():
        raise MelboError(f"run folder {path} has {META_FILE} but no {VECTORS_FILE}")
    tensors = _load_safetensors(vectors_path)
    if "vectors" not in tensors:
        raise MelboError(f"{vectors_path} has no tensor named 'vectors'")
    vectors = validate_vectors(tensors.pop("vectors"), str(vectors_path), d_model)
    count = len(meta["vectors"])
    if vectors.shape[0] < count:
        raise MelboError(f"{vectors_path} holds {vectors.shape[0]} vectors but {META_FILE} describes {count}")
    return Run(path=path, vectors=vectors[:count], meta=meta, extra=tensors)


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MelboError(f"{path} is not a safetensors file ({exc}); melbo reads .safetensors and .pt vector files") from exc


def check_same_settings(previous: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Refuse to resume a run with other settings; the message names every setting that differs."""
    differ = []
    for key in keys:
        old, new = previous.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differ += [f"{key}.{k} ({old.get(k)!r} in the run, {new.get(k)!r} now)" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            differ.append(f"{key} ({old!r} in the run, {new!r} now)")
    if differ:
        raise MelboError("cannot resume with different settings: " + "; ".join(differ) + "; use the run's settings or a new --out")


def load_vector_file(path: str | Path, d_model: int | None = None) -> Tensor:
    """Vectors ``(N, d_model)`` from a safetensors file (tensor ``vectors``, or a single tensor) or from
    the original post's ``.pt`` layout (one ``(N, d_model)`` tensor, row 0 the base vector).

    ``.pt`` files are read with ``weights_only=True``: a file holding pickled code is refused, never run.
    """
    path = Path(path)
    if not path.is_file():
        raise MelboError(f"vector file {path} does not exist")
    if path.suffix in (".pt", ".pth", ".bin"):
        vectors = _load_pt(path)
    else:
        tensors = _load_safetensors(path)
        if "vectors" in tensors:
            vectors = tensors["vectors"]
        elif len(tensors) == 1:
            vectors = next(iter(tensors.values()))
        else:
            raise MelboError(f"{path} holds tensors {sorted(tensors)}; expected one named 'vectors'")
    return validate_vectors(vectors, str(path), d_model)


def _load_pt(path: Path) -> Tensor:
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing; the refusal says it all
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise MelboError(
            f"{path} holds pickled Python objects, not just tensors; refused (loading it could run code)"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise MelboError(f"{path} is not a readable PyTorch tensor file ({str(exc).splitlines()[0]})") from exc
    if isinstance(obj, dict) and len(obj) == 1:
        obj = next(iter(obj.values()))
    if not isinstance(obj, Tensor):
        raise MelboError(f"{path} holds a {type(obj).__name__}, expected one (N, d_model) tensor")
    return obj


def validate_vectors(vectors: Tensor, where: str, d_model: int | None = None) -> Tensor:
    """Check shape, dtype and values of a stack of vectors; return it as float32 ``(N, d_model)``."""
    if vectors.dim() == 1:
        vectors = vectors[None, :]
    if vectors.dim() != 2 or vectors.shape[0] == 0:
        raise MelboError(f"{where}: expected vectors of shape (N, d_model), found {tuple(vectors.shape)}")
    if not vectors.is_floating_point():
        raise MelboError(f"{where}: vectors must be floating point, found {vectors.dtype}")
    if d_model is not None and vectors.shape[1] != d_model:
        raise MelboError(f"{where}: vectors have d_model {vectors.shape[1]} but the model has {d_model}; was it made for another model?")
    vectors = vectors.to(torch.float32)
    bad = ~torch.isfinite(vectors).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise MelboError(f"{where}: vector(s) {rows[:5]}{'...' if len(rows) > 5 else ''} contain NaN or inf")
    return vectors


def import_vectors(source: str | Path, out: str | Path, meta: dict[str, Any] | None = None) -> Run:
    """Make a run folder from a vector file (for instance the original post's ``.pt``: row 0 = base)."""
    vectors = load_vector_file(source)
    records = [{"index": i, "norm": float(v.norm())} for i, v in enumerate(vectors)]
    info = {"kind": "import", "imported_from": str(source), **(meta or {}), "vectors": records}
    return write_run(out, vectors, info)
