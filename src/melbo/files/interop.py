"""Vectors in the formats other tools read, and back.

Layer numbering is the same everywhere, so no index is shifted:

* **llama.cpp control vectors** (``llama-cli --control-vector FILE``), GGUF with architecture
  ``controlvector``, key ``controlvector.model_hint``, key ``controlvector.layer_count`` and one float32
  tensor ``direction.N`` per layer. llama.cpp stores ``direction.N`` at offset ``(N-1)·d`` and reads block
  ``il``'s vector from offset ``(il-1)·d``, adding it to the output of block ``il`` (0-based), so
  ``direction.N`` is melbo's layer N. Layer 0 cannot be expressed (llama.cpp rejects ``direction.0``).
* **repeng** reads and writes that same GGUF (``ControlVector.import_gguf``); its layer ids index
  ``model.model.layers`` and it adds to their output: melbo's layer N again. ``--format repeng`` writes
  the GGUF file.
* **steering-vectors** (``SteeringVector(layer_activations={N: vector}, layer_type="decoder_block")``)
  adds ``layer_activations[N]`` to the output of decoder block N: a ``.pt`` holding exactly those two
  arguments, loaded with ``SteeringVector(**torch.load(path))``.
* ``.pt`` (the original post's layout: one ``(N, d)`` tensor) and ``.npy`` (same array).
"""

from __future__ import annotations

import functools
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from melbo.errors import MelboError
from melbo.files.io import atomic_write, need_file, starts_as_gguf
from melbo.files.runs import Run, write_imported
from melbo.files.vectors import load_vector_file, validate_vectors

FORMATS = ("gguf", "repeng", "steering-vectors", "pt", "npy")
SUFFIX = {"gguf": ".gguf", "repeng": ".gguf", "steering-vectors": ".pt", "pt": ".pt", "npy": ".npy"}


def parse_indices(spec: str, count: int) -> list[int]:
    """``"3"``, ``"0-9"``, ``"1,4,7"``, ``"0-4,9"`` or ``"all"`` → row indices, checked against ``count``."""
    if spec == "all":
        return list(range(count))
    indices: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise MelboError(f"--index {spec!r}: use a number, a range like 0-9, a list like 1,4,7, or all")
        low, high = int(match[1]), int(match[2] or match[1])
        if high < low:
            raise MelboError(f"--index {spec!r}: a range goes from low to high, e.g. {high}-{low}")
        indices.extend(range(low, high + 1))
    bad = [i for i in indices if not 0 <= i < count]
    if bad or not indices:
        raise MelboError(f"--index {spec!r}: the run has vectors 0 to {count - 1}")
    return indices


def export_vectors(run: Run, out: str | Path | None, fmt: str, indices: list[int], scale: float = 1.0, layer: int | None = None) -> list[Path]:
    """Write the chosen vectors (times ``scale``) in ``fmt``; returns the files written.

    ``pt`` and ``npy`` hold all chosen vectors in one ``(N, d)`` array, in the file ``out`` (its suffix added). The
    control-vector formats hold one vector each: one index writes the file ``out``; several write
    ``out/vector-{i:04d}.{ext}``. One file into a folder (one that exists, or a path ending in "/") or into the
    current folder (``out`` None) is named for the run and the indices (``RUN-3.gguf``, ``RUN-0-99.pt``); several
    control vectors with no ``out`` go in the folder ``RUN-all/`` (``RUN-0-9/``…).
    """
    if fmt not in FORMATS:
        raise MelboError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if not math.isfinite(scale):
        raise MelboError("--scale must be a finite number")
    layer = run.source_layer if layer is None else layer
    vectors = run.vectors[indices] * scale
    named = f"{run.path.resolve().name}-{indices_name(indices, run.vectors.shape[0])}"
    one_file = fmt in ("pt", "npy") or len(indices) == 1
    if out is None:
        out = named + SUFFIX[fmt] if one_file else named
    elif one_file and (str(out).endswith(("/", os.sep)) or Path(out).is_dir()):
        out = Path(out) / (named + SUFFIX[fmt])
    out = Path(out)
    if fmt in ("pt", "npy"):
        target = out if out.suffix == SUFFIX[fmt] else out.with_suffix(SUFFIX[fmt])
        if fmt == "pt":
            atomic_write(target, lambda tmp: torch.save(vectors.clone(), tmp))
        else:
            atomic_write(target, lambda tmp: _save_npy(tmp, vectors.numpy()))
        return [target]
    hint = str(run.meta.model.get("model_type") or run.meta.model_name or "unknown")
    single = len(indices) == 1
    written = []
    for row, index in zip(vectors, indices):
        target = out if single else out / f"vector-{index:04d}{SUFFIX[fmt]}"
        if fmt == "steering-vectors":
            payload = {"layer_activations": {layer: row.clone()}, "layer_type": "decoder_block"}
            atomic_write(target, functools.partial(_save_torch, payload))
        else:
            write_control_vector(target, {layer: row}, hint)
        written.append(target)
    return written


def indices_name(indices: list[int], count: int) -> str:
    """Indices in a file name: ``3``, ``0-99`` (a run of them), ``all`` (every vector of ``count``), ``1_4_7``, or
    ``12-vectors`` where a list would make the name long."""
    if indices == list(range(count)) and count > 1:
        return "all"
    if len(indices) > 1 and indices == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}-{indices[-1]}"
    return "_".join(map(str, indices)) if len(indices) <= 6 else f"{len(indices)}-vectors"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # np.save(name) would append ".npy" to the temporary name
        np.save(handle, array)


def write_control_vector(path: Path, directions: dict[int, Tensor], model_hint: str) -> None:
    """A llama.cpp / repeng control-vector GGUF: ``direction.N`` added after block N."""
    import gguf

    if 0 in directions:
        raise MelboError("llama.cpp control vectors cannot hold layer 0 (direction.0 is rejected); choose a layer ≥ 1")

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), "controlvector")
        writer.add_string("controlvector.model_hint", model_hint)
        writer.add_uint32("controlvector.layer_count", len(directions))
        for layer, vector in sorted(directions.items()):
            writer.add_tensor(f"direction.{layer}", vector.detach().cpu().float().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(path, write)


def read_control_vector(path: Path) -> tuple[dict[int, Tensor], str | None]:
    """``({layer: vector}, model hint)`` from a control-vector GGUF."""
    import gguf

    if not starts_as_gguf(path):
        raise MelboError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises several types on a truncated file
        raise MelboError(f"{path} is not a readable GGUF file ({exc})") from exc
    arch = reader.get_field("general.architecture")
    if arch is None or bytes(arch.parts[-1]).decode() != "controlvector":
        raise MelboError(f"{path} is a GGUF file but not a control vector (architecture is not 'controlvector')")
    hint = reader.get_field("controlvector.model_hint")
    directions: dict[int, Tensor] = {}
    for tensor in reader.tensors:
        match = re.fullmatch(r"direction\.(\d+)", tensor.name)
        if match:
            directions[int(match[1])] = torch.from_numpy(np.array(tensor.data, dtype=np.float32)).reshape(-1)
    if not directions:
        raise MelboError(f"{path} holds no direction.N tensor")
    return directions, (bytes(hint.parts[-1]).decode() if hint is not None else None)


def read_any_vector_file(source: str | Path, layer: int | None = None) -> tuple[Tensor, int | None, str | None]:
    """``(vectors, layer, model hint)`` from a vector file in any format :func:`export_vectors` writes (a llama.cpp or
    repeng control vector, a steering-vectors ``.pt``, ``.npy``), or the original post's ``.pt`` (row 0 = base; read
    with ``weights_only=True``), or melbo's safetensors. ``layer``: the one ``layer`` asked, else the one the file
    records (a control vector's ``direction.N`` is added after block N), else ``None``; a file that holds several
    layers needs ``layer`` to choose one."""
    source = Path(source)
    need_file(source, "vector file")
    if source.suffix == ".gguf":
        directions, hint = read_control_vector(source)
        chosen = _choose_layer(directions, layer, source)
        return validate_vectors(directions[chosen][None], str(source)), chosen, hint
    if source.suffix == ".npy":
        try:
            array = np.load(source, allow_pickle=False)
        except ValueError as exc:
            raise MelboError(f"{source} is not a plain .npy array ({exc})") from exc
        return validate_vectors(torch.from_numpy(np.asarray(array, dtype=np.float32)), str(source)), layer, None
    if source.suffix in (".pt", ".pth") and _is_steering_vectors(source):
        payload = torch.load(source, map_location="cpu", weights_only=True)
        chosen = _choose_layer(payload["layer_activations"], layer, source)
        return validate_vectors(payload["layer_activations"][chosen][None], str(source)), chosen, None
    return load_vector_file(source), layer, None


def import_file(source: str | Path, out: str | Path, layer: int | None = None, model_name: str | None = None) -> Run:
    """Make a run folder from a vector file (:func:`read_any_vector_file`). ``model_name``: the model the vectors are
    for (a study's); else a GGUF control vector's model hint, if any."""
    vectors, chosen, hint = read_any_vector_file(source, layer)
    return write_imported(out, vectors, source, chosen, model_name or hint)


def _choose_layer(directions: dict[int, Tensor], layer: int | None, source: Path) -> int:
    if layer is not None:
        if layer not in directions:
            raise MelboError(f"{source} has layers {sorted(directions)}, not {layer}")
        return layer
    if len(directions) > 1:
        raise MelboError(f"{source} holds layers {sorted(directions)}: choose one with --layer")
    return next(iter(directions))


def _is_steering_vectors(path: Path) -> bool:
    try:
        with warnings.catch_warnings():  # a pickle that is not only tensors: load_vector_file refuses it in one line
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(payload, dict) and "layer_activations" in payload


def _save_torch(payload: object, path: Path) -> None:
    torch.save(payload, path)
