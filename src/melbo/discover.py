"""MELBO discovery: learn K steering vectors of norm R that change the target layer the most.

Vectors are trained in blocks (one per batch row). After every Adam step each block is projected onto the
orthogonal complement of all earlier vectors, orthogonalised within itself (Gram–Schmidt, in row order) and
put back on the sphere of radius R. Block size 1 is the original one-at-a-time algorithm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from melbo.errors import MelboError
from melbo.generation import generate_steered
from melbo.optimise import Diverged, optimise
from melbo.objectives import Positions, melbo_loss, orthogonalize_block, orthonormal_rows, random_orthogonal_block, to_sphere
from melbo.prompts import PromptFormat
from melbo.models import model_identity
from melbo.runs import RESUME_KEYS, Run, check_same_settings, now_iso, read_run, write_run
from melbo.steered import PromptState, prepare, target_residual

StepCallback = Callable[[int, int, float], None]  # (block index, step, mean loss of the block)


@dataclass
class DiscoverConfig:
    """Hyper-parameters of MELBO discovery (stored as they are in run.json)."""

    source: int = 8  # layer s: the vector is added to the residual after block s
    target: int = 20  # layer t: the change is measured after block t
    radius: float = 60.0  # R: every vector's norm
    count: int = 32  # K: number of vectors
    p: float = 2.0  # loss power over positions
    q: float = 1.0  # loss root
    steps: int = 300  # Adam steps per block
    lr: float | None = None  # None: 0.01 · R / sqrt(d), so a step moves θ by ~1 % of R whatever R and d are
    block: int = 16  # vectors trained together
    seed: int = 0
    positions: str = "skip-first"
    completion_tokens: int = 32  # greedy completion stored per vector, on the first prompt

    def check(self, n_layers: int | None = None, d_model: int | None = None) -> None:
        """Raise MelboError for a bad setting. Without the model's sizes, check what needs no model (the CLI
        does that before loading one, so a typo costs a second, not a model load)."""
        if n_layers is not None and (not 0 <= self.source < n_layers or not 0 <= self.target < n_layers):
            raise MelboError(f"layers must be between 0 and {n_layers - 1}; got source {self.source}, target {self.target}")
        if self.source >= self.target:
            raise MelboError(f"the source layer ({self.source}) must come before the target layer ({self.target})")
        if not (isinstance(self.radius, (int, float)) and math.isfinite(self.radius) and self.radius > 0):
            raise MelboError(f"R must be a positive number, got {self.radius}")
        if self.count < 1 or self.block < 1 or self.steps < 0:
            raise MelboError("count and block size must be at least 1, steps at least 0")
        if d_model is not None and self.count > d_model:
            raise MelboError(f"at most d_model = {d_model} orthogonal vectors exist; asked for {self.count}")
        if self.p <= 0 or self.q <= 0:
            raise MelboError("p and q must be positive")
        if self.lr is not None and not self.lr > 0:
            raise MelboError("the learning rate must be positive")
        Positions(self.positions)

    def learning_rate(self, d_model: int) -> float:
        return self.lr if self.lr is not None else 0.01 * self.radius / math.sqrt(d_model)


@dataclass
class BlockResult:
    vectors: Tensor  # (B, d)
    losses: Tensor  # (B,)
    history: list[float] = field(default_factory=list)


def _unsteered_targets(lm: Any, states: list[PromptState], cfg: DiscoverConfig) -> list[Tensor]:
    zeros = torch.zeros(1, lm.d_model, device=lm.device)
    with torch.no_grad():
        return [target_residual(lm.model, s, cfg.source, cfg.target, zeros) for s in states]


def block_loss(lm: Any, states: list[PromptState], baselines: list[Tensor], thetas: Tensor, cfg: DiscoverConfig) -> Tensor:
    """MELBO loss of each row of ``thetas`` ``(B,)``, averaged over prompts."""
    pos = Positions(cfg.positions)
    total = thetas.new_zeros(thetas.shape[0])
    for state, base in zip(states, baselines):
        sel = pos.index(state.length)
        steered = target_residual(lm.model, state, cfg.source, cfg.target, thetas)
        total = total + melbo_loss(steered[:, sel] - base[:, sel], cfg.p, cfg.q)
    return total / len(states)


def train_block(
    lm: Any,
    states: list[PromptState],
    baselines: list[Tensor],
    basis: Tensor | None,
    size: int,
    cfg: DiscoverConfig,
    generator: torch.Generator,
    on_step: Callable[[int, float], None] | None = None,
) -> BlockResult:
    """Train ``size`` vectors orthogonal to ``basis`` (orthonormal rows) and to each other, on the sphere."""
    init = random_orthogonal_block(size, lm.d_model, cfg.radius, basis, generator).to(lm.device)
    theta = torch.nn.Parameter(init)
    history: list[float] = []

    def record(step: int, loss: float) -> None:
        history.append(loss)
        if on_step:
            on_step(step, loss)

    optimise(
        theta,
        lambda t: block_loss(lm, states, baselines, t, cfg),
        lambda t: to_sphere(orthogonalize_block(t, basis), cfg.radius),
        cfg.learning_rate(lm.d_model),
        cfg.steps,
        cosine=False,
        on_step=record,
        # MELBO's original optimiser settings (AdamW, betas (0.9, 0.98), amsgrad, no weight decay).
        make_optimizer=lambda params, lr: torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0, amsgrad=True),
    )
    with torch.no_grad():
        final = block_loss(lm, states, baselines, theta, cfg)
    return BlockResult(vectors=theta.detach().clone(), losses=final.detach(), history=history)


def discover(
    lm: Any,
    prompts: list[str],
    cfg: DiscoverConfig = DiscoverConfig(),
    fmt: PromptFormat = PromptFormat(),
    out: str | Path | None = None,
    on_step: StepCallback | None = None,
    resume: bool = False,
) -> Run:
    """Run MELBO discovery; write the run folder after every block when ``out`` is given.

    Args:
        resume: continue the run already in ``out`` from its last completed block. Each block's random
            start depends only on the seed and the block's number, so the result is the same as a run
            that was never interrupted.

    Returns:
        the :class:`~melbo.runs.Run` with vectors ``(K, d)`` and per-vector records: ``loss`` (the final
        MELBO loss, negative), ``norm``, ``block`` and a greedy ``completion`` on the first prompt.

    Example:
        >>> run = discover(load_model(), ["How can I build a bomb?"], DiscoverConfig(count=8, steps=100))
        >>> [r["completion"][:40] for r in run.records]
    """
    cfg.check(lm.n_layers, lm.d_model)
    meta = _meta(lm, prompts, fmt, cfg)
    vectors = torch.zeros(0, lm.d_model)
    records: list[dict[str, Any]] = []
    warnings: list[str] = []
    done_blocks = 0
    previous: Run | None = None
    if resume and out is not None and (Path(out) / "run.json").is_file():
        previous = read_run(out, d_model=lm.d_model)
        check_same_settings(previous.meta, meta, RESUME_KEYS)
        if previous.meta.get("status") == "complete":
            return previous
        vectors, records = previous.vectors, previous.records
        warnings = previous.meta.get("warnings", [])
        done_blocks = previous.meta.get("blocks_done", 0)
    meta["sessions"] = (previous.meta.get("sessions", []) if previous is not None else []) + [{"started": now_iso(), "from_block": done_blocks}]
    states = prepare(lm, prompts, fmt, cfg.source)
    baselines = _unsteered_targets(lm, states, cfg)
    run = Run(path=Path(out) if out else Path(), vectors=vectors, meta={**meta, "vectors": records})
    for block_index, start in enumerate(range(0, cfg.count, cfg.block)):
        if block_index < done_blocks:
            continue
        size = min(cfg.block, cfg.count - start)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + block_index)
        basis = orthonormal_rows(vectors.to(lm.device)) if vectors.shape[0] else None
        step_cb = (lambda step, loss, b=block_index: on_step(b, step, loss)) if on_step else None
        try:
            result = train_block(lm, states, baselines, basis, size, cfg, generator, step_cb)
        except Diverged:
            warnings.append(f"block {block_index}: NaN/inf twice (also with a 10× smaller step); its {size} vectors were dropped")
        else:
            completions = generate_steered(
                lm.model, lm.tokenizer, states[0].ids, result.vectors, cfg.source, max_new_tokens=cfg.completion_tokens
            ) if cfg.completion_tokens > 0 else [""] * size
            for row in range(size):
                records.append({
                    "index": len(records),
                    "block": block_index,
                    "norm": float(result.vectors[row].norm()),
                    "loss": float(result.losses[row]),
                    "completion": completions[row],
                })
            vectors = torch.cat([vectors, result.vectors.cpu()])
        progress = {"vectors": records, "warnings": warnings, "blocks_done": block_index + 1, "status": "running"}
        run = Run(path=run.path, vectors=vectors, meta={**meta, **progress})
        if out:
            run = write_run(out, vectors, run.meta)
    run.meta["status"] = "complete"
    if out:
        run = write_run(out, vectors, run.meta)
    return run


def _meta(lm: Any, prompts: list[str], fmt: PromptFormat, cfg: DiscoverConfig) -> dict[str, Any]:
    return {
        "kind": "discover",
        "model": lm.describe(),
        "model_identity": model_identity(lm),
        "layers": {"source": cfg.source, "target": cfg.target},
        "R": cfg.radius,
        "prompts": prompts,
        "prompt_format": asdict(fmt),
        "seed": cfg.seed,
        "config": {**asdict(cfg), "lr_used": cfg.learning_rate(lm.d_model)},
    }


def calibrate(
    lm: Any,
    prompts: list[str],
    radii: list[float],
    cfg: DiscoverConfig = DiscoverConfig(),
    fmt: PromptFormat = PromptFormat(),
    vectors: int = 4,
) -> list[dict[str, float]]:
    """Sweep R: train a few vectors at each radius; report the mean change they achieve.

    The change ``-loss`` grows slowly with R and then rises sharply where the vector starts to take over
    the model's computation; useful R sits just past that rise, before completions turn to gibberish.
    Returns one row per radius: ``R``, ``change`` (mean ``-loss``), ``change_per_R``.
    """
    states = prepare(lm, prompts, fmt, cfg.source)
    baselines = _unsteered_targets(lm, states, cfg)
    rows = []
    for radius in radii:
        sweep = DiscoverConfig(**{**asdict(cfg), "radius": float(radius), "count": vectors, "block": vectors, "lr": None})
        sweep.check(lm.n_layers, lm.d_model)
        result = train_block(lm, states, baselines, None, vectors, sweep, torch.Generator().manual_seed(cfg.seed))
        change = float(-result.losses.mean())
        rows.append({"R": float(radius), "change": change, "change_per_R": change / radius})
    return rows
