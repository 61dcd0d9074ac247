"""Vector files: safetensors (a tensor ``vectors``, or one tensor) and the original post's ``.pt`` layout (one
``(N, d_model)`` tensor, row 0 the base vector), read and checked. Pickled code in a ``.pt`` is refused, never run."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from melbo.errors import MelboError
from melbo.files.io import need_file


def load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MelboError(f"{path} is not a safetensors file ({exc}); melbo reads .safetensors and .pt vector files") from exc


def load_vector_file(path: str | Path, d_model: int | None = None) -> Tensor:
    """Vectors ``(N, d_model)`` from a safetensors file (tensor ``vectors``, or a single tensor) or from
    the original post's ``.pt`` layout (one ``(N, d_model)`` tensor, row 0 the base vector).

    ``.pt`` files are read with ``weights_only=True``: a file holding pickled code is refused, never run.
    """
    path = Path(path)
    need_file(path, "vector file")
    if path.suffix in (".pt", ".pth", ".bin"):
        vectors = _load_pt(path)
    else:
        tensors = load_safetensors(path)
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
