"""MELBO-ortho: many vectors, orthogonal to a base vector θ0 and to each other, that reproduce its effect.

``z(θ)`` is the residual after the target layer, averaged over the selected prompt positions, when θ is
added after the source layer. Each new θ minimises ``‖z(θ) − z(θ0)‖₂ (+ λ‖θ‖²)`` while orthogonal to θ0
and to every earlier θ.

Two modes:

* ``seed`` — what the post's code did, step for step, so results compare: one vector at a time, Adam with
  lr 0.01 for 1000 steps, the full forward pass from the embeddings at every step, the mean over *all*
  prompt positions, and θ projected onto the orthogonal complement after every step. What the post left
  unsaid, chosen here: θ starts at θ0 (the post's ``refine_theta(pretrained_theta=…)``); the first projection
  removes it, so the search effectively starts at 0 with Adam's step counter at 1. The post filtered
  vectors with NaN or norm ≤ 0.1 afterwards; here they are dropped as they appear (kept in the basis when
  finite, so the next vector still moves to a new direction).
* ``fast`` (default) — blocks of vectors optimised together (one per batch row), forward only through
  blocks s+1 … t from cached layer-s activations, one L-BFGS per vector (:func:`~melbo.optimise.lbfgs_rows`:
  its own curvature history and step length, first step ¼‖θ0‖ long, no step over ‖θ0‖; ``optimizer="adam"``
  gives Adam with a learning rate scaled to ‖θ0‖ and a cosine decay instead), early stop when the block's
  loss plateaus, each block started at the norm the previous block converged to, and
  z taken over the last 4 prompt positions. Those are the positions that decide the answer (with a chat
  template, the assistant-turn header); the mean over every position lets a vector match θ0 on the user's
  words while the answer differs. Measured on SmolLM2 (s 8, t 20, a base with a clear opener, 16 vectors,
  150 steps): median last-token KL to θ0 0.77 with ``last:4`` against 4.2 with ``skip-first``, when the
  unsteered model is at 3.9 (``last:1``: 0.48, but z is then one position). ``--positions`` chooses otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from melbo.errors import MelboError
from melbo.generation import generate_steered
from melbo.optimise import Diverged, lbfgs_rows, optimise
from melbo.layers import residual_after
from melbo.objectives import (
    Positions,
    kl_divergence,
    extend_orthonormal,
    orthogonalize_block,
    orthonormal_rows,
    ortho_loss,
    project_out,
    random_orthogonal_block,
)
from melbo.models import model_identity
from melbo.prompts import PromptFormat
from melbo.runs import RESUME_KEYS, Run, check_same_settings, now_iso, read_run, validate_vectors, write_run
from melbo.steered import PromptState, last_token_logits, prepare, target_residual

StepCallback = Callable[[int, int, float], None]  # (block index, step, mean loss of the block)


# Fast mode's evaluations per block (each a forward and backward pass of the block through layers s+1 … t).
# Measured on SmolLM2 (8 → 20, R 30, the demo's base; bench/ortho_vs_seed.py): per-row L-BFGS at 60
# evaluations is 2.4× faster per vector than Adam at 150 steps and 2.0× faster per vector within half the
# unsteered model's KL to θ0 (61 % of vectors against 75 %); its median KL is higher (first 32 vectors: 1.20
# against 1.07). More L-BFGS evaluations lower ‖z − z0‖ but not the KL (80: 1.44, 150: 1.65), so 60 it is;
# ``optimizer="adam"`` for the best KL per vector.
STEPS_FAST = {"lbfgs": 60, "adam": 150}


@dataclass
class OrthoConfig:
    """Hyper-parameters of MELBO-ortho. ``None`` means "the mode's default" (see :meth:`resolved`)."""

    source: int = 8
    target: int = 20
    mode: str = "fast"  # "fast" or "seed"
    count: int | None = None  # vectors to find besides θ0; None: until the basis is exhausted
    block: int | None = None  # fast: 16; seed: 1
    steps: int | None = None  # evaluations per block; fast: at most STEPS_FAST (early stop); seed: 1000
    lr: float | None = None  # fast: 0.25 · ‖θ0‖ / sqrt(d), i.e. ~¼ of θ0's typical coordinate; seed: 0.01
    optimizer: str | None = None  # fast: "lbfgs" (per-row L-BFGS) or "adam" (cosine schedule); seed: "adam" only
    penalty: float = 0.0  # λ of the optional λ‖θ‖² term
    positions: str | None = None  # fast: "last:4"; seed: "all"
    min_norm: float | None = None  # vectors at or below are dropped; fast: 0.015 · ‖θ0‖; seed: 0.1
    stop_after_dropped: int | None = None  # this many dropped in a row: the basis is exhausted; fast: block; seed: 5
    plateau: float = 2e-3  # fast: stop a block when 10 steps improve its loss by less than this fraction
    init_scale: float = 2.0  # fast: the first block starts at this × ‖θ0‖; later ones at the last block's median norm
    seed: int = 0
    completion_tokens: int = 0  # greedy completion stored per vector (0: none)

    def resolved(self, base_norm: float, d_model: int) -> "OrthoConfig":
        optimizer = self._optimizer()
        fast = self.mode == "fast"
        block = self.block or (16 if fast else 1)
        default_steps = (STEPS_FAST[optimizer] if fast else 1000)
        return replace(
            self,
            block=block,
            optimizer=optimizer,
            steps=self.steps if self.steps is not None else default_steps,
            lr=self.lr if self.lr is not None else (0.25 * base_norm / math.sqrt(d_model) if fast else 0.01),
            positions=self.positions or ("last:4" if fast else "all"),
            min_norm=self.min_norm if self.min_norm is not None else (0.015 * base_norm if fast else 0.1),
            stop_after_dropped=self.stop_after_dropped or (block if fast else 5),
            count=self.count if self.count is not None else d_model - 1,
        )

    def _optimizer(self) -> str:
        """The optimiser this mode uses, after checking that mode and optimiser go together."""
        if self.mode not in ("fast", "seed"):
            raise MelboError(f"--mode {self.mode!r}: use fast or seed")
        fast = self.mode == "fast"
        optimizer = self.optimizer or ("lbfgs" if fast else "adam")
        if optimizer not in ("lbfgs", "adam"):
            raise MelboError(f"--optimizer {optimizer!r}: use lbfgs or adam")
        if not fast and optimizer != "adam":
            raise MelboError("--mode seed is the post's algorithm: its optimiser is Adam (use --mode fast for lbfgs)")
        return optimizer

    def check(self, n_layers: int | None = None, d_model: int | None = None) -> None:
        """Raise MelboError for a bad setting. Without the model's sizes, check what needs no model (the CLI
        does that before loading one)."""
        if n_layers is not None and (not 0 <= self.source < n_layers or not 0 <= self.target < n_layers):
            raise MelboError(f"layers must be between 0 and {n_layers - 1}; got source {self.source}, target {self.target}")
        if self.source >= self.target:
            raise MelboError(f"the source layer ({self.source}) must come before the target layer ({self.target})")
        self._optimizer()
        if self.count is not None and (self.count < 1 or (d_model is not None and self.count > d_model - 1)):
            raise MelboError("--count must be at least 1" if d_model is None else f"--count must be between 1 and d_model − 1 = {d_model - 1}")
        if (self.block is not None and self.block < 1) or (self.steps is not None and self.steps < 1):
            raise MelboError("block size and steps must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise MelboError("the learning rate must be positive")
        if self.penalty < 0:
            raise MelboError("the L2 penalty must be ≥ 0")
        if self.positions is not None:
            Positions(self.positions)


@dataclass
class _Problem:
    """Everything the loss needs: model, prompts and the base vector's target means ``z(θ0)``."""

    lm: Any
    states: list[PromptState]
    z_base: list[Tensor]
    cfg: OrthoConfig

    def z(self, state: PromptState, thetas: Tensor, full: bool) -> Tensor:
        sel = Positions(self.cfg.positions).index(state.length)
        if full:  # the seed algorithm: every layer from the embeddings, at every step
            ids = state.ids.expand(thetas.shape[0], -1)
            h = residual_after(self.lm.model, self.cfg.target, ids, steer=(self.cfg.source, thetas)).float()
        else:
            h = target_residual(self.lm.model, state, self.cfg.source, self.cfg.target, thetas)
        return h[:, sel].mean(dim=1)

    def losses(self, thetas: Tensor, full: bool = False) -> Tensor:
        total = thetas.new_zeros(thetas.shape[0])
        for state, z0 in zip(self.states, self.z_base):
            total = total + ortho_loss(self.z(state, thetas, full), z0)
        total = total / len(self.states)
        if self.cfg.penalty:
            total = total + self.cfg.penalty * thetas.pow(2).sum(dim=-1)
        return total


def _seed_vector(problem: _Problem, base: Tensor, basis: Tensor) -> tuple[Tensor, int]:
    """The post's update rule: Adam(lr) on θ starting at θ0, full forward, project θ after every step."""
    cfg = problem.cfg
    theta = torch.nn.Parameter(base.clone()[None])
    steps = optimise(
        theta, lambda t: problem.losses(t, full=True), lambda t: project_out(t, basis), cfg.lr, cfg.steps, cosine=False  # type: ignore[arg-type]
    )
    return theta.detach(), steps


def _fast_block(
    problem: _Problem, basis: Tensor, size: int, init_norm: float, generator: torch.Generator,
    on_step: Callable[[int, float], None] | None,
) -> tuple[Tensor, int]:
    cfg = problem.cfg
    init = random_orthogonal_block(size, problem.lm.d_model, init_norm, basis, generator).to(basis.device)
    if cfg.optimizer == "lbfgs":
        first = cfg.lr * math.sqrt(problem.lm.d_model)  # type: ignore[operator]  # Adam's largest first move
        return lbfgs_rows(
            init, problem.losses, lambda t: orthogonalize_block(t, basis), lambda g: project_out(g, basis),
            cfg.steps, first_step=first, max_step=4 * first, plateau=cfg.plateau, on_step=on_step,  # type: ignore[arg-type]
        )
    theta = torch.nn.Parameter(init)
    steps = optimise(
        theta, problem.losses, lambda t: orthogonalize_block(t, basis), cfg.lr, cfg.steps, cosine=True,  # type: ignore[arg-type]
        plateau=cfg.plateau, on_step=on_step,
    )
    return theta.detach(), steps


def ortho(
    lm: Any,
    base: Tensor,
    prompts: list[str],
    cfg: OrthoConfig = OrthoConfig(),
    fmt: PromptFormat = PromptFormat(),
    out: str | Path | None = None,
    on_step: StepCallback | None = None,
    base_info: dict[str, Any] | None = None,
    resume: bool = False,
) -> Run:
    """Find vectors orthogonal to ``base`` and to each other that reproduce its effect.

    Args:
        resume: continue the run already in ``out`` from its last completed block (same settings
            required; the same random state per block makes the result identical to an uninterrupted run).

    Returns:
        a :class:`~melbo.runs.Run` whose row 0 is θ0 and rows 1… the vectors found, each record holding
        ``norm``, ``loss`` (‖z(θ) − z(θ0)‖), ``kl`` = KL(P_θ ‖ P_θ0) and ``kl_reverse`` = KL(P_θ0 ‖ P_θ) of the
        next-token distributions at the last prompt token (averaged over prompts), ``block`` and ``steps``.
        The run folder is written after every block when ``out`` is given.
    """
    cfg.check(lm.n_layers, lm.d_model)
    base = validate_vectors(base.detach().cpu(), "base vector", lm.d_model)[0].to(lm.device)
    base_norm = float(base.norm())
    if base_norm == 0:
        raise MelboError("the base vector is zero: choose a vector with an effect")
    cfg = cfg.resolved(base_norm, lm.d_model)
    meta = {
        "kind": "ortho",
        "model": lm.describe(),
        "model_identity": model_identity(lm),
        "layers": {"source": cfg.source, "target": cfg.target},
        "R": base_norm,
        "prompts": prompts,
        "prompt_format": asdict(fmt),
        "seed": cfg.seed,
        "config": asdict(cfg),
        "base": {"norm": base_norm, **(base_info or {})},
        "kl_direction": "kl = KL(P_i || P_0) as the post's code computed (F.kl_div(log P_0, P_i)); kl_reverse = KL(P_0 || P_i)",
    }
    states = prepare(lm, prompts, fmt, cfg.source)
    problem = _Problem(lm=lm, states=states, z_base=[], cfg=cfg)
    with torch.no_grad():
        problem.z_base = [problem.z(s, base[None], full=False)[0] for s in states]
        base_logits = [last_token_logits(lm.model, s, cfg.source, base[None]) for s in states]

    previous = _previous_run(out, meta, base) if resume else None
    if previous is not None and previous.meta.get("status") == "complete":
        return previous
    state = _OrthoState.start(base, cfg, lm, states) if previous is None else _OrthoState.resume(previous, base)
    # One entry per start or resumption: shows which blocks each process computed.
    meta["sessions"] = (previous.meta.get("sessions", []) if previous else []) + [{"started": now_iso(), "from_block": state.block_index}]
    run = Run(path=Path(out or "."), vectors=torch.stack(state.vectors), meta={**meta, "vectors": state.records})
    while state.found < cfg.count and state.basis.shape[0] < lm.d_model and state.in_a_row < cfg.stop_after_dropped:  # type: ignore[operator]
        size = min(cfg.block, cfg.count - state.found, lm.d_model - state.basis.shape[0])  # type: ignore[type-var,operator]
        block_index = state.block_index
        step_cb = (lambda step, loss, b=block_index: on_step(b, step, loss)) if on_step else None
        try:
            if cfg.mode == "seed":
                block, steps = _seed_vector(problem, base, state.basis)
                if on_step:
                    on_step(block_index, steps, float(problem.losses(block).detach()[0]))
            else:
                generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + block_index)
                block, steps = _fast_block(problem, state.basis, size, state.init_norm, generator, step_cb)
        except Diverged:
            why = "NaN/inf at its starting point" if cfg.optimizer == "lbfgs" else "NaN/inf twice (also with a 10× smaller step)"
            state.warnings.append(f"block {block_index}: {why}; its {size} vectors were dropped")
            state.found += size
            state.in_a_row += size
            state.block_index += 1
            continue
        block_records, kept = _judge(problem, block, base_logits, cfg, block_index, steps)
        state.add_block(block, block_records, kept)
        if cfg.completion_tokens and kept.any():
            texts = _completions(lm, states[0], block[kept], cfg)
            for record, text in zip(state.records[-int(kept.sum()):], texts):
                record["completion"] = text
        run = Run(run.path, torch.stack(state.vectors), {**meta, **state.meta(), "status": "running"})
        if out:
            run = write_run(out, run.vectors, run.meta, state.extra())
    if state.in_a_row >= cfg.stop_after_dropped:  # type: ignore[operator]
        reason = f"basis exhausted: the last {state.in_a_row} vectors collapsed to norm ≤ {cfg.min_norm:.3g}"
    elif state.basis.shape[0] >= lm.d_model:
        reason = "basis exhausted: every direction of the residual stream is used"
    else:
        reason = "count reached"
    run = Run(run.path, torch.stack(state.vectors), {**meta, **state.meta(), "status": "complete", "stopped": reason})
    if out:
        run = write_run(out, run.vectors, run.meta, state.extra())
    return run


def _previous_run(out: str | Path | None, meta: dict[str, Any], base: Tensor) -> Run | None:
    """The run to continue in ``out`` (None if there is none yet), after checking it has our settings."""
    if out is None or not (Path(out) / "run.json").is_file():
        return None
    previous = read_run(out, d_model=base.shape[0])
    check_same_settings(previous.meta, meta, RESUME_KEYS)
    if not torch.equal(previous.vectors[0], base.cpu().float()):
        raise MelboError(f"cannot resume {out}: its base vector (row 0) is not the one given now")
    if "progress" not in previous.meta:
        raise MelboError(f"cannot resume {out}: its run.json has no progress record (made by another melbo?)")
    return previous


@dataclass
class _OrthoState:
    """Everything the loop carries from block to block; saved in the run folder so --resume can go on."""

    vectors: list[Tensor]
    records: list[dict[str, Any]]
    dropped: list[dict[str, Any]]
    basis: Tensor
    processed: list[Tensor]  # every finite vector tried, in order: rebuilds the basis bit for bit
    block_sizes: list[int]
    found: int = 0
    block_index: int = 0
    in_a_row: int = 0
    init_norm: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, base: Tensor, cfg: OrthoConfig, lm: Any, states: list[PromptState]) -> "_OrthoState":
        record: dict[str, Any] = {"index": 0, "base": True, "norm": float(base.norm()), "loss": 0.0, "kl": 0.0, "kl_reverse": 0.0}
        if cfg.completion_tokens:
            record["completion"] = _completions(lm, states[0], base[None], cfg)[0]
        return cls(
            vectors=[base.cpu()], records=[record], dropped=[], basis=orthonormal_rows(base[None]), processed=[],
            block_sizes=[], init_norm=cfg.init_scale * float(base.norm()),
        )

    @classmethod
    def resume(cls, run: Run, base: Tensor) -> "_OrthoState":
        progress = run.meta["progress"]
        processed = run.extra.get("processed", torch.zeros(0, base.shape[0]))
        basis = orthonormal_rows(base[None])
        start = 0
        for size in progress["block_sizes"]:
            basis = extend_orthonormal(basis, processed[start : start + size].to(base.device))
            start += size
        return cls(
            vectors=list(run.vectors), records=run.records, dropped=run.meta.get("dropped", []), basis=basis,
            processed=list(processed), block_sizes=list(progress["block_sizes"]), found=progress["found"],
            block_index=progress["block_index"], in_a_row=progress["in_a_row"], init_norm=progress["init_norm"],
            warnings=run.meta.get("warnings", []),
        )

    def add_block(self, block: Tensor, records: list[dict[str, Any]], kept: Tensor) -> None:
        finite = torch.isfinite(block).all(dim=1)
        self.basis = extend_orthonormal(self.basis, block[finite])
        self.processed += list(block[finite].cpu())
        self.block_sizes.append(int(finite.sum()))
        for row, record in zip(block, records):
            if record.pop("_kept"):
                record["index"] = len(self.vectors)
                self.vectors.append(row.cpu())
                self.records.append(record)
                self.in_a_row = 0
            else:
                self.dropped.append(record)
                self.in_a_row += 1
        norms = block[kept].norm(dim=-1)
        self.init_norm = float(norms.median()) if norms.numel() else self.init_norm
        self.found += block.shape[0]
        self.block_index += 1

    def meta(self) -> dict[str, Any]:
        progress = {
            "found": self.found, "block_index": self.block_index, "in_a_row": self.in_a_row,
            "init_norm": self.init_norm, "block_sizes": self.block_sizes,
        }
        return {"vectors": self.records, "dropped": self.dropped, "warnings": self.warnings, "progress": progress}

    def extra(self) -> dict[str, Tensor]:
        return {"processed": torch.stack(self.processed)} if self.processed else {}


def _judge(
    problem: _Problem, block: Tensor, base_logits: list[Tensor], cfg: OrthoConfig, block_index: int, steps: int
) -> tuple[list[dict[str, Any]], Tensor]:
    """Per-vector figures of a finished block, and which vectors are kept (finite, norm > min_norm)."""
    finite = torch.isfinite(block).all(dim=1)
    safe = torch.where(finite[:, None], block, torch.zeros_like(block))
    with torch.no_grad():
        losses = problem.losses(safe)
        kl = torch.zeros(block.shape[0], dtype=torch.float64)
        kl_rev = torch.zeros_like(kl)
        for state, logits0 in zip(problem.states, base_logits):
            logits = last_token_logits(problem.lm.model, state, cfg.source, safe)
            kl += kl_divergence(logits, logits0.expand_as(logits)).cpu()
            kl_rev += kl_divergence(logits0.expand_as(logits), logits).cpu()
    n = len(problem.states)
    norms = block.norm(dim=-1)
    kept = finite & (norms > cfg.min_norm)  # type: ignore[operator]
    records = [
        {
            "norm": float(norms[i]) if finite[i] else float("nan"),
            "loss": float(losses[i]),
            "kl": float(kl[i] / n),
            "kl_reverse": float(kl_rev[i] / n),
            "block": block_index,
            "steps": steps,
            "_kept": bool(kept[i]),
        }
        for i in range(block.shape[0])
    ]
    return records, kept


def _completions(lm: Any, state: PromptState, thetas: Tensor, cfg: OrthoConfig) -> list[str]:
    return generate_steered(lm.model, lm.tokenizer, state.ids, thetas, cfg.source, max_new_tokens=cfg.completion_tokens)
