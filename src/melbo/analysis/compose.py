"""``melbo compose``: does a combination of orthogonal vectors keep their shared effect?

For each k: the mean of the first k found vectors (rows 1…k of an ortho run; row 0 is θ0), that mean × √k
(the post's "meaned-scaled" runs: k orthogonal vectors of similar norm have a mean of norm ≈ norm/√k), and
the mean rescaled to ‖θ0‖. Separately, each vector rescaled to ‖θ0‖ (the post reports that this loses the
effect: the orthogonal vectors work at their own, larger norms).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from melbo.analysis.labels import label
from melbo.errors import MelboError
from melbo.files.runs import COMPOSE_FILE, Run, write_json
from melbo.model.forward import generate_steered, last_token_logits, prepare
from melbo.model.loading import LoadedModel
from melbo.model.prompts import PromptFormat
from melbo.objectives import kl_divergence


def composed_vectors(run: Run, ks: list[int]) -> tuple[list[str], Tensor]:
    """Names and vectors of every combination to try (rows 1… are the found vectors, row 0 the base)."""
    found = run.vectors[1:]
    if found.shape[0] == 0:
        raise MelboError(f"{run.path} holds no vector besides the base; compose needs an ortho run")
    base_norm = float(run.vectors[0].norm())
    names: list[str] = []
    rows: list[Tensor] = []
    for k in ks:
        if not 1 <= k <= found.shape[0]:
            continue
        mean = found[:k].mean(dim=0)
        for kind, vector in (
            ("mean", mean),
            ("mean×√k", mean * math.sqrt(k)),
            ("mean→‖θ0‖", mean * base_norm / float(mean.norm().clamp_min(1e-12))),
        ):
            names.append(f"k={k} {kind}")
            rows.append(vector)
    for index in range(1, run.vectors.shape[0]):
        vector = run.vectors[index]
        names.append(f"#{index}→‖θ0‖")
        rows.append(vector * base_norm / float(vector.norm().clamp_min(1e-12)))
    if not rows:
        raise MelboError(f"none of k = {ks} fits the {found.shape[0]} vectors of {run.path}")
    return names, torch.stack(rows)


@dataclass
class ComposeResults:
    """What ``compose.json`` holds: one row per combination (``name``, ``norm``, ``kl``, ``label``, ``text``)."""

    prompt: str
    base_label: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def combinations(self) -> list[dict[str, Any]]:
        """The means of the first k vectors (the rows that are not single vectors rescaled to ‖θ0‖)."""
        return [r for r in self.rows if not r["name"].startswith("#")]

    @property
    def single_median_kl(self) -> float | None:
        """Median KL to θ0 of the single vectors rescaled to ‖θ0‖."""
        kls = [r["kl"] for r in self.rows if r["name"].startswith("#")]
        return statistics.median(kls) if kls else None

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "base_label": self.base_label, "kl_direction": "KL(P_combination || P_base)", "rows": self.rows}


def compose(
    lm: LoadedModel, run: Run, ks: list[int], prompt: str, fmt: PromptFormat, max_new_tokens: int = 48, batch: int = 64
) -> ComposeResults:
    """Greedy completion, label and KL(P ‖ P_θ0) at the last prompt token for every combination (saved in compose.json)."""
    names, vectors = composed_vectors(run, ks)
    source = run.source_layer
    state = prepare(lm, [prompt], fmt, source)[0]
    vectors = vectors.to(lm.device)
    base_logits = last_token_logits(lm.model, state, source, run.vectors[:1].to(lm.device))
    logits = last_token_logits(lm.model, state, source, vectors)
    kl = kl_divergence(logits, base_logits.expand_as(logits))
    texts: list[str] = []
    for chunk in vectors.split(batch):
        texts += generate_steered(lm.model, lm.tokenizer, state.ids, chunk, source, max_new_tokens=max_new_tokens)
    base_label = label(generate_steered(lm.model, lm.tokenizer, state.ids, run.vectors[:1].to(lm.device), source, max_new_tokens=max_new_tokens)[0])[0]
    rows = [
        {"name": n, "norm": float(v.norm()), "kl": float(k), "label": label(t)[0], "same_label_as_base": label(t)[0] == base_label, "text": t}
        for n, v, k, t in zip(names, vectors.cpu(), kl, texts)
    ]
    results = ComposeResults(prompt, base_label, rows)
    write_json(run.sidecar(COMPOSE_FILE), results.to_json())
    return results
