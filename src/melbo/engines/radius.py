"""Choosing R for MELBO discovery: the largest-effect R at which most vectors still speak.

Why measure text: the change at the target layer grows smoothly with R and then sharply, and the sharp rise is
where vectors start to take over the model's computation. DCT calibrates its R on that response alone (the change
against its linear extrapolation); but at the rise most trained vectors already babble (README: "No hand-tuning").
So melbo trains a few vectors per candidate R, lets each write a short completion, and measures what a user cares
about:

* fluency: the completion's NLL under the unsteered model (≤ 4 nats/token) and :func:`melbo.labels.degenerates`
  (loops, which score a low NLL, wherever they start, and gibberish);
* effect: KL(P_θ ‖ P_unsteered) of the answer's first token;
* diversity: distinct labels and openings among the fluent completions.

It picks the largest R tried at which at least three quarters of the vectors are fluent and the median completion
scores ≤ 3 nats/token (a margin: four vectors are few, and one lucky draw high up would spoil the search): effect grows with R,
fluency falls, so a bisection on log R finds it. The range is set relative to the residual norm at the source layer
(models differ by a large factor; the norm sets the scale).

Each probe trains 4 vectors, orthogonal to each other, for 30 steps with the learning rate scaled by discovery's
steps / 30, so that the vectors travel about as far as in discovery's steps. They are a little kinder than a full
discovery at the edge, hence three quarters, not half. Rows are trained on the unit sphere, θ = R·u, so several
radii can share one batch with discovery's relative step. ``bench/auto_radius.py`` measures what it chooses and costs.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from melbo.engines.blocks import block_generator
from melbo.engines.config import RadiusConfig
from melbo.engines.optimise import optimise
from melbo.files.runs import RadiusChoice, RadiusProbe
from melbo.labels import degenerates, label
from melbo.model.forward import completion_nll, effect_on_first_token, steered_generation
from melbo.objectives import orthogonalize_block, random_orthogonal_block, to_sphere

if TYPE_CHECKING:
    from melbo.engines.problem import DiscoveryProblem


def residual_scale(problem: DiscoveryProblem) -> float:
    """Median norm of the residual after the source layer over the prompts' positions (the attention sink at
    position 0 left out)."""
    norms = [state.source[0, 1:].norm(dim=-1) if state.length > 1 else state.source[0].norm(dim=-1) for state in problem.states]
    return float(torch.cat(norms).median())


def choose_radius(
    problem: DiscoveryProblem,
    cfg: RadiusConfig = RadiusConfig(),
    on_probe: Callable[[RadiusProbe], None] | None = None,
) -> RadiusChoice:
    """Calibrate R on ``problem`` (discovery's loss, prompts and settings; its R is not used); see the module text."""
    cfg.check()
    started = time.monotonic()
    scale = residual_scale(problem)
    probes: list[RadiusProbe] = []

    def tried(found: list[RadiusProbe]) -> list[RadiusProbe]:
        for probe in found:
            probes.append(probe)
            if on_probe:
                on_probe(probe)
        return found

    if cfg.radii:  # the user's candidates, all trained together
        table = tried(_probe(problem, sorted(float(r) for r in cfg.radii), cfg, stage=0))
        fluent = [p for p in table if p.usable(cfg)]
        best = fluent[-1] if fluent else None
    else:  # bisection on log R between low and high × the residual norm: fluency falls as R grows
        best = _bisect(problem, cfg, tried, None, cfg.low * scale, cfg.high * scale, range(cfg.probes))
        bracket = _extend(problem, cfg, probes, best, tried)
        if bracket is not None:  # the edge lay outside the range: bisect between the new fluent R and the failed one
            best, low, high = bracket
            best = _bisect(problem, cfg, tried, best, low, high, range(cfg.probes + cfg.extend, 2 * cfg.probes + cfg.extend - 1))
    ordered = sorted(probes, key=lambda p: p.radius)
    if best is None:
        radius = _round(min(p.radius for p in probes))
        reason = (
            f"no candidate R kept {cfg.min_fluent:.0%} of its vectors fluent; R {radius:g} is the smallest tried "
            "(try other layers, or smaller --radii)"
        )
    else:
        radius = best.radius
        failed = [p for p in ordered if p.radius > radius]
        reason = (
            f"R {radius:g} ({radius / scale:.3g} × the residual norm {scale:.0f} at layer {problem.settings.source}): the "
            f"largest tried at which most vectors stay fluent ({best.fluent}/{best.vectors}, median NLL {best.median_nll:.2f}, "
            f"first-token KL {best.median_effect:.2f})" + (f"; at R {failed[0].radius:g} {why_not(failed[0], cfg)}" if failed else "")
        )
    return RadiusChoice(radius, reason, scale, ordered, round(time.monotonic() - started, 2), problem.settings.precision)


def _bisect(
    problem: DiscoveryProblem, cfg: RadiusConfig, tried: Callable[[list[RadiusProbe]], list[RadiusProbe]],
    best: RadiusProbe | None, low: float, high: float, stages: range,
) -> RadiusProbe | None:
    """Bisection on log R between a fluent ``low`` and a failed ``high``, one probe per stage (until they are within
    5 %); returns the largest fluent probe (``best`` when none is)."""
    for stage in stages:
        if high <= low * 1.05:
            break
        probe = tried(_probe(problem, [_round(math.sqrt(low * high))], cfg, stage))[0]
        if probe.usable(cfg):
            best, low = probe, probe.radius
        else:
            high = probe.radius
    return best


def why_not(probe: RadiusProbe, cfg: RadiusConfig) -> str:
    """Which of the two criteria a candidate R failed, in words."""
    if probe.share < cfg.min_fluent:
        return f"only {probe.fluent}/{probe.vectors} fluent (at least {cfg.min_fluent:.0%} needed)"
    return f"{probe.fluent}/{probe.vectors} fluent but a median NLL of {probe.median_nll:.2f} (at most {cfg.max_median_nll:g})"


def _extend(
    problem: DiscoveryProblem, cfg: RadiusConfig, probes: list[RadiusProbe], best: RadiusProbe | None,
    tried: Callable[[list[RadiusProbe]], list[RadiusProbe]],
) -> tuple[RadiusProbe, float, float] | None:
    """When the bisection did not bracket the fluent edge, search outside the range, ×4 apart: below when no R in it
    was fluent (a model whose residual norm a few massive dimensions dominate), above when every R was. Returns
    (the largest fluent probe, it, the smallest failed R above it) once bracketed, else None."""
    stage = cfg.probes
    if best is None:
        failed = min(p.radius for p in probes)
        for _ in range(cfg.extend):
            probe = tried(_probe(problem, [_round(failed / 4)], cfg, stage))[0]
            stage += 1
            if probe.usable(cfg):
                return probe, probe.radius, failed
            failed = probe.radius
    elif all(p.usable(cfg) for p in probes):
        fluent = best
        for _ in range(cfg.extend):
            probe = tried(_probe(problem, [_round(fluent.radius * 4)], cfg, stage))[0]
            stage += 1
            if not probe.usable(cfg):
                return fluent, fluent.radius, probe.radius
            fluent = probe
        return fluent, fluent.radius, fluent.radius  # still fluent far above: the largest tried
    return None


def _round(radius: float) -> float:
    return float(f"{radius:.3g}")


def _probe(problem: DiscoveryProblem, radii: list[float], cfg: RadiusConfig, stage: int) -> list[RadiusProbe]:
    """Train ``cfg.vectors`` vectors at each radius together, then judge each radius's completions."""
    per = cfg.vectors
    thetas = _train(problem, radii, per, cfg, stage)
    s, lm = problem.settings, problem.lm
    state = problem.states[0]
    made = steered_generation(lm.model, lm.tokenizer, state.ids, thetas, s.source, cfg.completion_tokens)
    texts = made.texts
    nll = completion_nll(lm, state.ids, texts)
    effect = effect_on_first_token(lm, state, s.source, thetas, made.first_logits).tolist()
    probes = []
    for k, radius in enumerate(radii):
        rows = range(k * per, (k + 1) * per)
        labels = [label(texts[i])[0] for i in rows]
        fluent = [i for i in rows if nll[i] <= cfg.max_nll and not degenerates(texts[i])]
        counts: dict[str, int] = {}
        for name in labels:
            counts[name] = counts.get(name, 0) + 1
        probes.append(RadiusProbe(
            radius=radius, vectors=per, fluent=len(fluent),
            median_nll=statistics.median(min(nll[i], 99.0) for i in rows),
            median_effect=statistics.median(effect[i] for i in rows),
            labels=counts,
            openings=len({" ".join(texts[i].split()[:3]).lower() for i in fluent}),
            sample=texts[fluent[0] if fluent else rows[0]],
        ))
    return probes


def _train(problem: DiscoveryProblem, radii: list[float], per: int, cfg: RadiusConfig, stage: int) -> Tensor:
    """Discovery's optimisation with one radius per group of ``per`` rows: Adam on unit rows u, θ = R·u."""
    s, d = problem.settings, problem.lm.d_model
    device = problem.lm.device
    generator = block_generator(s.seed, 1_000_000 + stage)
    start = torch.cat([random_orthogonal_block(per, d, 1.0, None, generator) for _ in radii]).to(device)
    scale = torch.tensor(radii, device=device).repeat_interleave(per)[:, None]
    steps = max(1, min(cfg.steps, s.steps))
    lr = 0.01 / math.sqrt(d) * (max(s.steps, 1) / steps)  # discovery's 0.01·R/√d on θ, over its whole run of steps

    def project(u: Tensor) -> Tensor:
        return to_sphere(torch.cat([orthogonalize_block(group) for group in u.split(per)]), 1.0)

    u = torch.nn.Parameter(start)
    optimise(
        u, lambda rows: problem.training_losses(scale * rows), project, lr, steps, cosine=False,
        make_optimizer=lambda params, rate: torch.optim.AdamW(params, lr=rate, betas=(0.9, 0.98), weight_decay=0.0, amsgrad=True),
    )
    return (scale * u.detach()).clone()
