"""Choosing base vectors for MELBO-ortho among a discovery run's vectors.

Every vector's greedy completion (stored by discovery) is scored for fluency by the *unsteered* model (mean NLL
per token; gibberish scores ≥ 4.5 nats on SmolLM2, coherent text 1–3), labelled, and its effect on the answer's
first token is measured: KL(P_θ ‖ P_unsteered) at the last prompt token. A base that barely moves the
next-token distribution cannot show whether other vectors reproduce it. The rules (``by``):

* ``clearest``: fluent vectors only (NLL ≤ ``max_nll``, no loop nor gibberish: :func:`melbo.labels.degenerates`); first those with a behaviour the
  unsteered model's own answer does not show (a label other than ``other`` and than the unsteered one), then
  ``other`` when the unsteered model shows a behaviour, then the rest; within each, ``code`` before ``refusal``
  before ``compliance`` (the post's clearest behaviours), then the strongest first-token effect;
* ``faithful`` (the demo's): the ``trials`` clearest candidates each get a few MELBO-ortho copies, and the one whose
  copies most often keep its label wins, a behaviour kept by half of them before any ``other`` (:func:`trial_bases`);
* ``label``: fluent vectors carrying ``label``, strongest effect first;
* ``effect``: fluent vectors, strongest effect first;
* ``index``: the vectors named in ``indices``.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from melbo.analysis.config import LABEL_PREFERENCE, ChooseConfig
from melbo.engines.config import OrthoConfig
from melbo.engines.ortho import ortho
from melbo.errors import MelboError
from melbo.files.runs import Run
from melbo.labels import NO_BEHAVIOUR, degenerates, label
from melbo.model.forward import completion_nll, effect_on_first_token, generate_steered, prepare
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
    unsteered: str = ""  # the unsteered model's own answer
    unsteered_label: str = ""
    trial_share: float | None = None  # by = "faithful": share of its trial copies that kept its label
    trials: list[dict[str, Any]] = field(default_factory=list)  # by = "faithful": every candidate tried

    @property
    def name(self) -> str:
        """"#14 (code)": how tables, logs and the study page name a base."""
        return f"#{self.index} ({self.label})"

    def reason(self) -> str:
        why = f"labelled {self.label}" + (f" ({self.rule})" if self.rule else "")
        if self.by == "index":
            return f"vector {self.index} — chosen by index; {why}, NLL {self.nll:.2f}, KL to unsteered {self.effect:.2f}"
        if self.by == "faithful" and self.trial_share is not None:
            tried = ", ".join(f"#{t['index']} {t.get('label', '?')} {t['share']:.0%}" for t in self.trials)
            most = self.trial_share >= max(t["share"] for t in self.trials)
            how = ("its trial copies kept its label most often" if most else
                   "the one whose trial copies kept a behaviour most often (an 'other' base keeps its label in any copy that shows none)")
            return f"vector {self.index} — {why}, fluent (NLL {self.nll:.2f}); of the clearest candidates, {how} ({tried}); first-token KL to unsteered {self.effect:.2f}"
        other = f"; the unsteered model answers {self.unsteered_label}" if self.unsteered_label else ""
        return (
            f"vector {self.index} — {why}{other}, fluent (NLL {self.nll:.2f} nats/token under the unsteered model), and the "
            f"strongest effect on the answer's first token among such vectors (KL to unsteered {self.effect:.2f})"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BaseChoice:
        candidates = [Candidate(**c) for c in data.get("candidates", [])]
        return cls(**{**data, "candidates": candidates})


@dataclass
class Scored:
    """Every discovered vector as the chooser saw it, and the unsteered model's own answer."""

    candidates: list[Candidate]
    unsteered: str
    unsteered_label: str


def score_candidates(lm: LoadedModel, run: Run, prompt: str, fmt: PromptFormat) -> Scored:
    """Fluency, label and first-token effect of every vector of a discovery run, on ``prompt``."""
    state = prepare(lm, [prompt], fmt, run.source_layer)[0]
    completions = [r.completion or "" for r in run.records]
    tokens = max((len(lm.tokenizer(c, add_special_tokens=False).input_ids) for c in completions), default=32)
    unsteered = generate_steered(lm.model, lm.tokenizer, state.ids, None, run.source_layer, max_new_tokens=max(tokens, 1))[0]
    nll = completion_nll(lm, state.ids, completions)
    effect = effect_on_first_token(lm, state, run.source_layer, run.vectors.to(lm.device))
    out = []
    for i, text in enumerate(completions):
        name, rule = label(text)
        out.append(Candidate(i, name, rule, nll[i], float(effect[i]), text))
    return Scored(out, unsteered, label(unsteered)[0])


def choose_bases(scored: Scored, cfg: ChooseConfig) -> list[BaseChoice]:
    """The bases ``cfg`` picks among scored candidates, best first (``faithful``: the candidates to try, in order)."""
    cfg.check()
    candidates = scored.candidates
    if cfg.by == "index":
        bad = [i for i in cfg.indices if not 0 <= i < len(candidates)]
        if bad:
            raise MelboError(f"choose indices {bad}: the run has vectors 0 to {len(candidates) - 1}")
        chosen = [candidates[i] for i in cfg.indices]
    else:
        fluent = [c for c in candidates if c.nll <= cfg.max_nll and c.label != "degenerate" and not degenerates(c.completion)] or candidates
        if cfg.by == "label":
            fluent = [c for c in fluent if c.label == cfg.label]
            if not fluent:
                raise MelboError(f"no discovered vector is labelled {cfg.label!r}: choose by clearest or effect instead")
        def key(c: Candidate) -> tuple[bool, bool, int, float]:
            if cfg.by not in ("clearest", "faithful"):
                return False, False, 0, c.effect  # by effect alone
            return c.label not in ("other", scored.unsteered_label), c.label != scored.unsteered_label, -_preference(c.label), c.effect

        chosen = sorted(fluent, key=key, reverse=True)[: cfg.trials if cfg.by == "faithful" else cfg.count]
    return [
        BaseChoice(c.index, c.label, c.rule, c.effect, c.nll, c.completion, cfg.by, candidates, scored.unsteered, scored.unsteered_label)
        for c in chosen
    ]


def _preference(name: str) -> int:
    return LABEL_PREFERENCE.index(name) if name in LABEL_PREFERENCE else len(LABEL_PREFERENCE) - 1


def trial_bases(
    lm: LoadedModel, found: Run, candidates: list[BaseChoice], cfg: ChooseConfig, ortho_cfg: OrthoConfig,
    prompts: list[str], fmt: PromptFormat, on_trial: Callable[[BaseChoice], None] | None = None,
) -> list[BaseChoice]:
    """The ``cfg.count`` best candidates by their trial copies (:func:`ranked_trials`). The trial copies train on the run's
    prompts alone (no extra prompts, unless the study's ortho sets them): they screen whether a base's label survives
    in its copies on those prompts, and cost a fifth of what the default's shipped prompts would. ``on_trial`` is given
    each candidate once its trial share is known."""
    trial = dataclasses.replace(
        ortho_cfg, count=cfg.trial_copies, block=cfg.trial_copies, steps=cfg.trial_steps, completion_tokens=0,
        extra_prompts=ortho_cfg.extra_prompts or 0,
    )
    state = prepare(lm, prompts[:1], fmt, found.source_layer)[0]
    for choice in candidates:
        copies = ortho(lm, found.vectors[choice.index], prompts, trial, fmt, progress=False).vectors[1:]
        texts = generate_steered(lm.model, lm.tokenizer, state.ids, copies.to(lm.device), found.source_layer, cfg.trial_tokens)
        choice.trial_share = statistics.mean(label(t)[0] == choice.label for t in texts) if texts else 0.0
        if on_trial:
            on_trial(choice)
    tried = [{"index": c.index, "label": c.label, "share": c.trial_share} for c in candidates]
    best = ranked_trials(candidates)[: cfg.count]
    for choice in best:
        choice.trials = tried
    return best


def ranked_trials(candidates: list[BaseChoice]) -> list[BaseChoice]:
    """Tried candidates, best first: a behaviour (not ``other``, ``degenerate`` or the unsteered model's own label) that
    at least half of its trial copies keep, before the rest; then the larger trial share; ties keep the clearer first.
    (An ``other`` base keeps its label in any copy that shows no behaviour, so its share alone would win it the trial.)"""

    def kept_behaviour(choice: BaseChoice) -> bool:
        return choice.label not in (*NO_BEHAVIOUR, choice.unsteered_label) and (choice.trial_share or 0.0) >= 0.5

    return sorted(candidates, key=lambda c: (not kept_behaviour(c), -(c.trial_share or 0.0)))
