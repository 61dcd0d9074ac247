"""Choosing base vectors for MELBO-ortho among a discovery run's vectors.

Every vector's greedy completion (stored by discovery) is scored for fluency by the *unsteered* model (mean NLL
per token; gibberish scores ≥ 4.5 nats on SmolLM2, coherent text 1–3), labelled, and its effect on the answer's
first token is measured: KL(P_θ ‖ P_unsteered) at the last prompt token. A base that barely moves the
next-token distribution cannot show whether other vectors reproduce it. The rules (``by``):

* ``clearest`` (the demo's): fluent vectors only (NLL ≤ ``max_nll``), labelled ``code`` first, then
  ``refusal``, then the rest (the post's clearest behaviours), the strongest first-token effect among those;
* ``label``: fluent vectors carrying ``label``, strongest effect first;
* ``effect``: fluent vectors, strongest effect first;
* ``index``: the vectors named in ``indices``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from melbo.analysis.config import LABEL_PREFERENCE, ChooseConfig
from melbo.analysis.labels import label
from melbo.errors import MelboError
from melbo.files.runs import Run
from melbo.model.forward import completion_nll, effect_on_first_token, prepare
from melbo.model.loading import LoadedModel
from melbo.model.prompts import PromptFormat



@dataclass
class Candidate:
    """One discovered vector as the chooser saw it."""

    index: int
    label: str
    rule: str
    nll: float  # mean NLL per token of its completion under the unsteered model
    effect: float  # KL(P_θ ‖ P_unsteered) at the last prompt token
    completion: str


@dataclass
class BaseChoice:
    """A chosen base vector, the rule that chose it, and every candidate it was chosen among."""

    index: int
    label: str
    rule: str
    effect: float
    nll: float
    completion: str
    by: str = "clearest"
    candidates: list[Candidate] = field(default_factory=list)

    def reason(self) -> str:
        why = f"labelled {self.label}" + (f" ({self.rule})" if self.rule else "")
        if self.by == "index":
            return f"vector {self.index} — chosen by index; {why}, NLL {self.nll:.2f}, KL to unsteered {self.effect:.2f}"
        return (
            f"vector {self.index} — {why}, fluent (NLL {self.nll:.2f} nats/token under the unsteered model), and the "
            f"strongest effect on the answer's first token among such vectors (KL to unsteered {self.effect:.2f})"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BaseChoice:
        candidates = [Candidate(**c) for c in data.get("candidates", [])]
        return cls(**{**data, "candidates": candidates})


def score_candidates(lm: LoadedModel, run: Run, prompt: str, fmt: PromptFormat) -> list[Candidate]:
    """Fluency, label and first-token effect of every vector of a discovery run, on ``prompt``."""
    state = prepare(lm, [prompt], fmt, run.source_layer)[0]
    completions = [r.completion or "" for r in run.records]
    nll = completion_nll(lm, state.ids, completions)
    effect = effect_on_first_token(lm, state, run.source_layer, run.vectors.to(lm.device))
    out = []
    for i, text in enumerate(completions):
        name, rule = label(text)
        out.append(Candidate(i, name, rule, nll[i], float(effect[i]), text))
    return out


def choose_bases(candidates: list[Candidate], cfg: ChooseConfig) -> list[BaseChoice]:
    """The bases ``cfg`` picks among scored candidates, best first."""
    cfg.check()
    if cfg.by == "index":
        bad = [i for i in cfg.indices if not 0 <= i < len(candidates)]
        if bad:
            raise MelboError(f"choose indices {bad}: the run has vectors 0 to {len(candidates) - 1}")
        chosen = [candidates[i] for i in cfg.indices]
    else:
        fluent = [c for c in candidates if c.nll <= cfg.max_nll] or candidates
        if cfg.by == "label":
            fluent = [c for c in fluent if c.label == cfg.label]
            if not fluent:
                raise MelboError(f"no discovered vector is labelled {cfg.label!r}: choose by clearest or effect instead")
        if cfg.by == "clearest":
            key = lambda c: (-_preference(c.label), c.effect)  # noqa: E731
        else:
            key = lambda c: (0, c.effect)  # noqa: E731
        chosen = sorted(fluent, key=key, reverse=True)[: cfg.count]
    return [BaseChoice(c.index, c.label, c.rule, c.effect, c.nll, c.completion, cfg.by, candidates) for c in chosen]


def _preference(name: str) -> int:
    return LABEL_PREFERENCE.index(name) if name in LABEL_PREFERENCE else len(LABEL_PREFERENCE) - 1
