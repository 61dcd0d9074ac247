"""``melbo compose``: does a combination of orthogonal vectors keep their shared effect?

For each k: the mean of the first k found vectors (rows 1…k of an ortho run; row 0 is θ0), that mean × √k
(the post's "meaned-scaled" runs: k orthogonal vectors of similar norm have a mean of norm ≈ norm/√k), and
the mean rescaled to ‖θ0‖. Separately, each vector rescaled to ‖θ0‖ (the post reports that this loses the
effect: the orthogonal vectors work at their own, larger norms).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from melbo.analysis.config import ComposeConfig
from melbo.errors import MelboError
from melbo.files.io import read_json, write_json
from melbo.files.runs import COMPOSE_FILE, Run
from melbo.labels import label
from melbo.model.forward import prepare, steered_generation
from melbo.model.frozen import runs_frozen
from melbo.model.loading import LoadedModel
from melbo.model.prompts import PromptFormat
from melbo.objectives import kl_divergence
from melbo.output.live import status_unless_given

COMBINATIONS = ("mean", "mean×√k", "mean→‖θ0‖")  # the kinds of combination of the first k copies; "single": one copy at ‖θ0‖


@dataclass
class Combination:
    """One steering vector ``compose`` tries: a combination of the first ``k`` copies, or copy ``index`` alone."""

    kind: str  # one of COMBINATIONS, or "single" (copy ``index`` rescaled to ‖θ0‖)
    k: int | None = None
    index: int | None = None

    @property
    def name(self) -> str:
        return f"#{self.index}→‖θ0‖" if self.kind == "single" else f"k={self.k} {self.kind}"


def check_composable(run: Run) -> None:
    """A one-line error where ``run`` has no θ0 in row 0 with vectors beside it: a discovery's vector 0 is one behaviour
    among many, and a mean of the others measured against it means nothing (it ran, before)."""
    if run.meta.kind == "discover":
        raise MelboError(f"compose needs a MELBO-ortho run (row 0 = θ0); {run.path} is a discovery, whose vectors share no "
                         f"base: make copies of one first (melbo ortho {run.path} --index I)")
    if run.vectors.shape[0] < 2:
        raise MelboError(f"{run.path} holds no vector besides the base; compose needs an ortho run")


def composed_vectors(run: Run, ks: list[int]) -> tuple[list[Combination], Tensor]:
    """Every combination to try and its vector (rows 1… are the found vectors, row 0 the base). A k beyond the found
    vectors counts as all of them (melbo's k 1, 2, 3, 5, 10, 20 … on 32 copies end at 20, then 32: the mean of every
    copy, the controls' "mean"), each k once."""
    check_composable(run)
    found = run.vectors[1:]
    base_norm = float(run.vectors[0].norm())
    combos: list[Combination] = []
    rows: list[Tensor] = []
    for k in dict.fromkeys(min(k, found.shape[0]) for k in ks):
        if k < 1:
            continue
        mean = found[:k].mean(dim=0)
        for kind, vector in zip(COMBINATIONS, (mean, mean * math.sqrt(k), mean * base_norm / float(mean.norm().clamp_min(1e-12)))):
            combos.append(Combination(kind, k=k))
            rows.append(vector)
    for index in range(1, run.vectors.shape[0]):
        vector = run.vectors[index]
        combos.append(Combination("single", index=index))
        rows.append(vector * base_norm / float(vector.norm().clamp_min(1e-12)))
    return combos, torch.stack(rows)


@dataclass
class ComposeRow:
    """One row of ``compose.json``: a combination, its greedy completion and label, its norm and KL to θ0."""

    combination: Combination
    label: str
    text: str
    norm: float | None = None  # None: not known (the post's composition files hold only text)
    kl: float | None = None  # KL(P_combination ‖ P_θ0) at the last prompt token
    same_label_as_base: bool = False

    @property
    def name(self) -> str:
        return self.combination.name

    def to_json(self) -> dict[str, Any]:
        c = self.combination
        return {"name": c.name, "kind": c.kind, "k": c.k, "index": c.index, "norm": self.norm, "kl": self.kl,
                "label": self.label, "same_label_as_base": self.same_label_as_base, "text": self.text}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ComposeRow:
        if "kind" in data:
            combination = Combination(data["kind"], data.get("k"), data.get("index"))
        else:  # written before rows were typed: the name is all there is ("k=5 mean×√k", "#3→‖θ0‖")
            name = str(data["name"])
            if name.startswith("#"):
                combination = Combination("single", index=int(name[1:].split("→")[0]))
            else:
                k, _, kind = name.partition(" ")
                combination = Combination(kind, k=int(k.removeprefix("k=")))
        return cls(combination, data["label"], data["text"], data.get("norm"), data.get("kl"), bool(data.get("same_label_as_base")))


@dataclass
class ComposeResults:
    """What ``compose.json`` holds: the prompt, θ0's label there, and one row per combination."""

    prompt: str
    base_label: str
    rows: list[ComposeRow] = field(default_factory=list)
    source_file: str | None = None  # a composition file of the post's, when imported from one

    @property
    def combinations(self) -> list[ComposeRow]:
        """The means of the first k vectors (the rows that are not single vectors rescaled to ‖θ0‖)."""
        return [r for r in self.rows if r.combination.kind != "single"]

    @property
    def singles(self) -> list[ComposeRow]:
        """Each vector alone, rescaled to ‖θ0‖."""
        return [r for r in self.rows if r.combination.kind == "single"]

    @property
    def single_median_kl(self) -> float | None:
        """Median KL to θ0 of the single vectors rescaled to ‖θ0‖."""
        kls = [r.kl for r in self.singles if r.kl is not None]
        return statistics.median(kls) if kls else None

    def __repr__(self) -> str:
        from melbo.output.display import compose_repr

        return compose_repr(self)

    def _repr_html_(self) -> str:
        """In Jupyter: what ``melbo compose`` prints."""
        from melbo.output.display import as_html
        from melbo.output.tables import composed

        return as_html(composed(self, self.prompt))

    def to_json(self) -> dict[str, Any]:
        out = {"prompt": self.prompt, "base_label": self.base_label, "kl_direction": "KL(P_combination || P_base)",
               "rows": [r.to_json() for r in self.rows]}
        return {**out, "source_file": self.source_file} if self.source_file else out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ComposeResults:
        return cls(data.get("prompt", ""), data.get("base_label", ""), [ComposeRow.from_json(r) for r in data.get("rows", [])],
                   data.get("source_file"))

    @classmethod
    def read(cls, run_folder: Path) -> ComposeResults | None:
        data = read_json(run_folder / COMPOSE_FILE)
        return cls.from_json(data) if data else None


@runs_frozen
def compose(
    lm: LoadedModel, run: Run, ks: list[int] | None = None, prompt: str | None = None, fmt: PromptFormat | None = None,
    max_new_tokens: int = 48, batch: int = 64, on_batch: Callable[[int, int], None] | None = None, progress: bool = True,
) -> ComposeResults:
    """Greedy completion, label and KL(P ‖ P_θ0) at the last prompt token for every combination (saved in compose.json);
    ``on_batch(done, total)`` after each generate call (a whole basis's copies make several); without it, unless
    ``progress`` is False, a spinner in a terminal or notebook, a line per generate call in a log. Defaults, as
    ``melbo compose RUN`` takes them: melbo's k, the run's prompt and the prompt format the run was made with."""
    check_composable(run)
    ks = ks if ks is not None else ComposeConfig().ks
    prompt = prompt if prompt is not None else run.meta.first_prompt
    fmt = fmt if fmt is not None else run.meta.prompt_format
    def composing(done: int, total: int, /) -> tuple[str, bool]:
        return f"composing: {done}/{total} completions", True

    with status_unless_given(on_batch, progress, "composing…", composing) as shown:
        return _compose(lm, run, ks, prompt, fmt, max_new_tokens, batch, shown)


def _compose(lm: LoadedModel, run: Run, ks: list[int], prompt: str, fmt: PromptFormat, max_new_tokens: int, batch: int,
             on_batch: Callable[[int, int], None] | None) -> ComposeResults:
    combos, vectors = composed_vectors(run, ks)
    source = run.source_layer
    state = prepare(lm, [prompt], fmt, source)[0]
    vectors = vectors.to(lm.device)
    # θ0 rides in the first generate call: its completion's label, and the first-token logits every KL compares with
    steering = torch.cat([run.vectors[:1].to(vectors), vectors])
    made, done = [], 0
    for chunk in steering.split(batch):
        made.append(steered_generation(lm.model, lm.tokenizer, state.ids, chunk, source, max_new_tokens))
        done += chunk.shape[0]
        if on_batch:
            on_batch(done, steering.shape[0])
    logits = torch.cat([m.first_logits for m in made])
    kl = kl_divergence(logits[1:], logits[:1].expand_as(logits[1:]))
    base_text, *texts = [t for m in made for t in m.texts]
    base_label = label(base_text)[0]
    rows = [
        ComposeRow(c, label(t)[0], t, float(v.norm()), float(k), label(t)[0] == base_label)
        for c, v, k, t in zip(combos, vectors.cpu(), kl, texts)
    ]
    results = ComposeResults(prompt, base_label, rows)
    path = run.sidecar(COMPOSE_FILE)
    if path is not None:
        write_json(path, results.to_json())
    return results
