"""``melbo demo``: discovery, then MELBO-ortho on the clearest vector, on the embedded model in minutes.

How the base vector is chosen (printed by the command):

1. every discovered vector's greedy completion is scored for fluency by the *unsteered* model
   (mean NLL per token; gibberish scores ≥ 4.5 nats on SmolLM2, coherent text 1–3), and only fluent ones
   (≤ ``max_nll``) are candidates;
2. candidates labelled ``code`` are preferred, then ``refusal``, then the rest (the post's clearest
   behaviours were code and refusals/jailbreaks);
3. among those, the vector with the strongest effect on the answer's first token, KL(P_θ ‖ P_unsteered) at
   the last prompt token, wins: a base that barely moves the next-token distribution cannot show whether
   other vectors reproduce it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from melbo.compose import compose
from melbo.discover import DiscoverConfig, StepCallback, discover
from melbo.evaluate import EvalConfig, evaluate
from melbo.generation import generate_steered
from melbo.labels import label
from melbo.measures import completion_nll, effect_on_first_token
from melbo.ortho import OrthoConfig, ortho
from melbo.prompts import DEFAULT_PROMPT, PromptFormat
from melbo.report import write_report
from melbo.runs import Run
from melbo.steered import last_token_logits, prepare

LABEL_PREFERENCE = ("code", "refusal", "other")


@dataclass
class DemoConfig:
    """What ``melbo demo`` runs; the defaults finish in about 6 minutes on 2 CPU cores with SmolLM2."""

    prompt: str = DEFAULT_PROMPT
    source: int = 8
    target: int = 20
    radius: float = 30.0  # R ≈ 30 gives diverse, fluent behaviours on SmolLM2 at 8 → 20 with 100 steps
    discover_count: int = 16
    discover_steps: int = 100
    ortho_count: int = 32
    ortho_block: int = 16
    ortho_steps: int | None = None  # None: fast mode's default (per-row L-BFGS, at most 60 evaluations)
    completion_tokens: int = 32
    max_nll: float = 3.0
    seed: int = 0
    eval_tokens: int = 48  # greedy completion length of the final evaluation (eval.json, compose.json, report)
    compose_ks: tuple[int, ...] = (1, 2, 3, 5, 10, 20, 50, 100)


def quick_config() -> DemoConfig:
    """A seconds-long demo (few vectors, few steps) that exercises every stage: for smoke tests."""
    return DemoConfig(
        discover_count=6, discover_steps=10, ortho_count=4, ortho_block=4, ortho_steps=10, completion_tokens=12, eval_tokens=12,
    )


@dataclass
class BaseChoice:
    index: int
    label: str
    rule: str
    effect: float  # KL(P_base ‖ P_unsteered) at the last prompt token
    nll: float
    completion: str
    candidates: list[dict[str, Any]]

    def reason(self) -> str:
        why = f"labelled {self.label}" + (f" ({self.rule})" if self.rule else "")
        return (
            f"vector {self.index} — {why}, fluent (NLL {self.nll:.2f} nats/token under the unsteered model), and the "
            f"strongest effect on the answer's first token among such vectors (KL to unsteered {self.effect:.2f})"
        )


@dataclass
class DemoResult:
    discovery: Run
    ortho: Run
    base: BaseChoice
    unsteered_completion: str
    unsteered_kl: float  # KL(P_unsteered ‖ P_base): where "no steering at all" stands
    same_top_token: int  # ortho vectors whose most likely first token is the base's
    reports: list[Path]  # ortho/report.html, discover/report.html


def choose_base(lm: Any, run: Run, fmt: PromptFormat, cfg: DemoConfig) -> BaseChoice:
    """Pick the base vector for MELBO-ortho among a discovery run's vectors (see the module docstring)."""
    state = prepare(lm, [cfg.prompt], fmt, cfg.source)[0]
    completions = [r.get("completion", "") for r in run.records]
    nll = completion_nll(lm, state.ids, completions)
    effect = effect_on_first_token(lm, state, cfg.source, run.vectors.to(lm.device))
    candidates = []
    for i, text in enumerate(completions):
        name, rule = label(text)
        candidates.append({"index": i, "label": name, "rule": rule, "nll": nll[i], "effect": float(effect[i]), "completion": text})
    fluent = [c for c in candidates if c["nll"] <= cfg.max_nll] or candidates

    def rank(c: dict[str, Any]) -> tuple[int, float]:
        return (-LABEL_PREFERENCE.index(c["label"]), c["effect"])

    best = max(fluent, key=rank)
    return BaseChoice(best["index"], best["label"], best["rule"], best["effect"], best["nll"], best["completion"], candidates)


def run_demo(
    lm: Any,
    out: str | Path,
    cfg: DemoConfig = DemoConfig(),
    on_discover_step: StepCallback | None = None,
    on_ortho_step: StepCallback | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> DemoResult:
    """Discovery, the choice of a base vector, MELBO-ortho, then evaluation, composition and HTML reports."""
    out = Path(out)
    stage = on_stage or (lambda _: None)
    fmt = PromptFormat()
    discovery = discover(
        lm,
        [cfg.prompt],
        DiscoverConfig(
            source=cfg.source, target=cfg.target, radius=cfg.radius, count=cfg.discover_count,
            steps=cfg.discover_steps, block=cfg.discover_count, seed=cfg.seed, completion_tokens=cfg.completion_tokens,
        ),
        fmt,
        out=out / "discover",
        on_step=on_discover_step,
    )
    base = choose_base(lm, discovery, fmt, cfg)
    base_vector = discovery.vectors[base.index].to(lm.device)
    found = ortho(
        lm,
        base_vector,
        [cfg.prompt],
        OrthoConfig(
            source=cfg.source, target=cfg.target, count=cfg.ortho_count, block=cfg.ortho_block, steps=cfg.ortho_steps,
            seed=cfg.seed, completion_tokens=cfg.completion_tokens,
        ),
        fmt,
        out=out / "ortho",
        on_step=on_ortho_step,
        base_info={"from": str(out / "discover"), "index": base.index, "why": base.reason()},
    )
    state = prepare(lm, [cfg.prompt], fmt, cfg.source)[0]
    with torch.no_grad():
        logits = last_token_logits(lm.model, state, cfg.source, found.vectors.to(lm.device))
        plain = last_token_logits(lm.model, state, cfg.source, torch.zeros(1, lm.d_model, device=lm.device))
    from melbo.objectives import kl_divergence

    top = logits.argmax(dim=-1)
    unsteered = generate_steered(lm.model, lm.tokenizer, state.ids, None, cfg.source, max_new_tokens=cfg.completion_tokens)[0]
    stage("evaluating every vector (greedy completions, first-token top-10, KL, labels)")
    evaluate(lm, found, [cfg.prompt], list(range(found.vectors.shape[0])), EvalConfig(max_new_tokens=cfg.eval_tokens), fmt)
    stage("composing (mean of the first k vectors)")
    ks = [k for k in cfg.compose_ks if k < found.vectors.shape[0]]
    if ks:
        compose(lm, found, ks, cfg.prompt, fmt, cfg.eval_tokens)
    stage("writing the reports")
    reports = [write_report(out / "ortho"), write_report(out / "discover")]
    return DemoResult(
        discovery=discovery,
        ortho=found,
        base=base,
        unsteered_completion=unsteered,
        unsteered_kl=float(kl_divergence(plain[0], logits[0])),
        same_top_token=int((top[1:] == top[0]).sum()),
        reports=reports,
    )
