"""The runs a server serves: read once at start, all made with one model, each vector with its norm and label."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from melbo.analysis.evaluate import EvalResults
from melbo.errors import MelboError
from melbo.files.runs import REPORT_FILE, Run, read_run, runs_in
from melbo.labels import label


class NotFound(MelboError):
    """A run or vector the server does not have: answered 404."""


class BadSteering(MelboError):
    """A steering request that cannot be honoured as asked: answered 400."""


@dataclass
class ServedRun:
    """One run folder, as the server shows it."""

    name: str
    run: Run
    labels: list[str | None] = field(default_factory=list)  # per vector: eval.json's greedy label, else the record's

    @property
    def layer(self) -> int:
        return self.run.source_layer

    @property
    def report(self) -> Path | None:
        page = self.run.path / REPORT_FILE
        return page if page.is_file() else None

    def describe(self) -> dict[str, Any]:
        meta = self.run.meta
        return {
            "name": self.name, "kind": meta.kind, "model": meta.model_name, "layer": self.layer, "target": meta.target,
            "prompts": meta.prompts, "count": int(self.run.vectors.shape[0]), "report": self.report is not None,
            # how the run's prompts were formatted: the explorer asks the same way (raw prompts: /v1/completions)
            "chat_template": meta.prompt_format.chat_template, "system": meta.prompt_format.system,
            "vectors": [
                {"index": i, "norm": round(float(v.norm()), 3), "label": self.labels[i], "base": record.base}
                for i, (v, record) in enumerate(zip(self.run.vectors, self.run.records))
            ],
        }


class Catalog:
    """Every served run by name (its folder's name)."""

    def __init__(self, folders: list[Path]) -> None:
        if not folders:
            raise MelboError("give at least one run folder to serve")
        self.runs: dict[str, ServedRun] = {}
        for folder, name in _named(folders):
            run = read_run(folder)
            if name in self.runs:
                raise MelboError(f"two runs are called {name!r}: serve folders with different names")
            run.source_layer  # a run with no layer cannot steer: say so now  # noqa: B018
            self.runs[name] = ServedRun(name, run, _labels(run))
        models = {self._identity(r.run) for r in self.runs.values()}
        if len(models) > 1:
            listed = "; ".join(f"{n}: {r.run.meta.model_name}" for n, r in self.runs.items())
            raise MelboError(f"these runs were made with different models ({listed}): serve one model's runs at a time")

    @staticmethod
    def _identity(run: Run) -> str:
        identity = run.meta.model_identity or {}
        key = identity.get("sha256") or identity.get("id") or identity.get("path") or run.meta.model_name or "?"
        return f"{key}/{identity.get('d_model', run.vectors.shape[1])}"

    @property
    def model_name(self) -> str | None:
        return next(iter(self.runs.values())).run.meta.model_name

    def vector(self, name: str, index: int, scale: float) -> tuple[Tensor, int]:
        """``(vector × scale, layer)`` of a served run, or NotFound / BadSteering saying what is wrong."""
        if name not in self.runs:
            raise NotFound(f"run {name!r} is not served here; served runs: {', '.join(sorted(self.runs))}")
        served = self.runs[name]
        count = served.run.vectors.shape[0]
        if not 0 <= index < count:
            raise NotFound(f"run {name!r} has vectors 0 to {count - 1}, not {index}")
        if not math.isfinite(scale):
            raise BadSteering("melbo.scale must be a finite number")
        return served.run.vectors[index] * scale, served.layer


def _named(folders: list[Path]) -> list[tuple[Path, str]]:
    """Each run folder and the name it is served under: its folder's name; a folder that holds runs (a demo's, a
    study's, melbo-runs/) gives each of them, named by its path inside that folder (``ortho``, ``R=20/ortho``)."""
    out = []
    for folder in folders:
        inside = runs_in(folder)
        out += [(run, run.relative_to(folder).as_posix()) for run in inside] or [(folder, Path(folder).resolve().name)]
    return out


def _labels(run: Run) -> list[str | None]:
    results = EvalResults.load(run)
    prompt = run.meta.prompts[0] if run.meta.prompts else None
    greedy = results.completions(prompt, "greedy") if prompt else {}
    out: list[str | None] = []
    for i, record in enumerate(run.records):
        if greedy.get(i):
            out.append(greedy[i][0].label)
        elif record.completion is not None:
            out.append(label(record.completion)[0])
        else:
            out.append(None)
    return out
