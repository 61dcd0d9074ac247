"""Where steering vectors come from: a run folder, with what it records (layers, model, prompts, prompt format), or a
vector file (.safetensors, the post's .pt, a llama.cpp control vector…), which records little or nothing.

>>> source = open_vectors("runs/discover")            # doctest: +SKIP
>>> theta0, layer = source.row(4), source.source  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from melbo.errors import MelboError
from melbo.files.interop import read_any_vector_file
from melbo.files.runs import Run, read_run
from melbo.files.vectors import validate_vectors
from melbo.model.loading import LoadedModel, load_model, locate_model
from melbo.model.prompts import PromptFormat


@dataclass
class VectorSource:
    """Vectors and what their file records: ``None`` (or empty) where a bare vector file cannot say."""

    path: Path
    vectors: Tensor
    source: int | None = None  # the layer the vectors are added after
    target: int | None = None
    recorded_model: dict[str, Any] | None = None  # run.json's "model"
    prompt_format: PromptFormat | None = None
    prompts: list[str] = field(default_factory=list)
    completions: list[str | None] = field(default_factory=list)  # per row, on the run's first prompt

    @property
    def is_run(self) -> bool:
        return self.path.is_dir()

    def row(self, index: int) -> Tensor:
        """Vector ``index``, or a one-line error naming the rows there are."""
        if not 0 <= index < self.vectors.shape[0]:
            raise MelboError(f"--index {index}: {self.path} has vectors 0 to {self.vectors.shape[0] - 1}")
        return self.vectors[index]

    def at(self, index: int, layer: int | None = None) -> tuple[Tensor, int]:
        """Row ``index`` and the layer to add it after (``layer``, else the one the run records): one-line errors,
        before any model loads."""
        layer = self.source if layer is None else layer
        if layer is None:
            raise MelboError(f"--layer is needed: {self.path} does not record the layer its vectors are added after")
        return self.row(index), layer

    def layers(self, source: int | None, target: int | None) -> tuple[int, int]:
        """(source, target): as given, else as the run records; a one-line error where neither says."""
        source, target = (self.source if source is None else source), (self.target if target is None else target)
        if source is None or target is None:
            raise MelboError(f"--source and --target are needed: {self.path} does not record the layers its vectors were made for")
        return source, target

    def format(self, system: str | None = None, chat_template: bool | None = None) -> PromptFormat:
        """The run's prompt format (a bare file: the model's chat template), with what the user overrides."""
        return (self.prompt_format or PromptFormat()).overridden(system, chat_template)

    def model(self, given: str | None) -> str | None:
        """The model to load: ``given`` (--model), else the run's, found also after the run or its GGUF file moved."""
        return model_of(self.recorded_model, given, self.path)

    def load(self, given: str | None = None, device: str = "auto", dtype: str | None = None) -> LoadedModel:
        """The model these vectors were made with (or ``given``), loaded and checked against their width."""
        lm = load_model(self.model(given), device=device, dtype=dtype)
        validate_vectors(self.vectors, str(self.path), lm.d_model)
        return lm

    def completion(self, index: int) -> str | None:
        return self.completions[index] if index < len(self.completions) else None


def model_of(recorded: dict[str, Any] | None, given: str | None, where: Path) -> str | None:
    """What to load for vectors: ``given`` (--model), else the model their run records (run.json's ``model``), found
    also after the run folder or its GGUF file moved; ``None``: the embedded default."""
    if given is not None or recorded is None:
        return given
    return locate_model(recorded, f"run {where}")


def load_for_run(run: Run, given: str | None = None, device: str = "auto", dtype: str | None = None) -> LoadedModel:
    """The model a run was made with (or ``given``), loaded and checked against the run's vectors."""
    return of_run(run).load(given, device, dtype)


def of_run(run: Run) -> VectorSource:
    """A run's vectors with what it records."""
    return VectorSource(
        run.path, run.vectors, run.meta.source, run.meta.target, run.meta.model, run.meta.prompt_format,
        list(run.meta.prompts), [r.completion for r in run.records],
    )


def open_vectors(path: str | Path, layer: int | None = None) -> VectorSource:
    """A run folder (its vectors and records) or a vector file in any format ``melbo import`` reads: its vectors, and
    the layer where the file records one (a llama.cpp control vector's ``direction.N``; ``layer`` chooses among
    several)."""
    path = Path(path)
    if path.is_dir():
        return of_run(read_run(path))
    vectors, recorded, _hint = read_any_vector_file(path, layer)
    return VectorSource(path, vectors, source=recorded)
