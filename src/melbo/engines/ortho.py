"""MELBO-ortho: many vectors, orthogonal to a base vector θ0 and to each other, that reproduce its effect.

Each new θ is orthogonal to θ0 and to every earlier θ and minimises a distance between what θ and θ0 do (+ λ‖θ‖²).
The post's distance (``match="mean"``) is ``‖z(θ) − z(θ0)‖₂`` with ``z`` the residual after the target layer
averaged over the selected prompt positions. melbo's fast default (``match="kl"``) is the next-token KL(P_θ0 ‖ P_θ)
at the last 4 prompt positions and along θ0's own first 16 greedy tokens (teacher-forced; more, at most 32, when θ0's
behaviour shows later on the run's prompt: :func:`behaviour_shows_at`): copies then reproduce the base's behaviour,
not only its first token (see ``FAST_MATCH`` in :mod:`melbo.engines.config` for the figures).

Two modes:

* ``seed`` — what the post's code did, step for step, so results compare: one vector at a time, Adam with
  lr 0.01 for 1000 steps, the full forward pass from the embeddings at every step, the mean over *all*
  prompt positions, and θ projected onto the orthogonal complement after every step. What the post left
  unsaid, chosen here: θ starts at θ0 (the post's ``refine_theta(pretrained_theta=…)``); the first projection
  removes it, so the search effectively starts at 0 with Adam's step counter at 1. The post filtered
  vectors with NaN or norm ≤ 0.1 afterwards; here they are dropped as they appear (kept in the basis when
  finite, so the next vector still moves to a new direction).
* ``fast`` (default) — blocks of vectors optimised together (one per batch row), forward from cached layer-s
  activations (through blocks s+1 … t for "mean" and "each", to the LM head for "kl"), one L-BFGS per vector
  (:func:`~melbo.engines.optimise.lbfgs_rows`: its own curvature history and step length, first step ¼‖θ0‖ long,
  no step over ‖θ0‖; ``optimizer="adam"`` gives Adam with a learning rate scaled to ‖θ0‖ and a cosine decay
  instead), a vector that stops improving leaving its block (``patience``: ``FAST_PATIENCE`` evaluations without
  gain), early stop when the block's loss plateaus, each block started at the norm the previous block converged to. Positions: the last 4 of the prompt (with a chat template, the assistant-turn header that decides
  the answer) and θ0's continuation; the mean over every position lets a vector match θ0 on the user's words while
  the answer differs (bench/fidelity.py). ``--positions``, ``--match`` and ``--continuation`` choose otherwise.
  Prompts: with a chat template, the run's and 4 of melbo's shipped ones (one of each kind, never held out), θ0's
  continuation on each (its first 8 tokens on the shipped ones: ``FAST_EXTRA_CONTINUATION``), the run's prompt keeping
  0.8 of the loss, so copies carry θ0's behaviour off the run's prompt too (``FAST_EXTRA_PROMPTS`` in
  :mod:`melbo.engines.config`); raw prompts, or ``extra_prompts=0``: the run's prompts alone, ~2× faster. Several prompts run as one packed sequence, their common first tokens (the chat template's
  system turn) once (:mod:`melbo.model.packing`), where the model gives the same numbers so (checked at θ0); each
  block's L-BFGS first runs 20 evaluations on the run's prompt alone, then 15 on every prompt (``FAST_WARMUP``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from melbo.engines.blocks import BlockCallback, Judged, StepCallback, run_blocks
from melbo.engines.config import BEHAVIOUR_TOKENS, OrthoConfig, OrthoSettings, Positions, shifted
from melbo.engines.optimise import lbfgs_rows, optimise
from melbo.errors import MelboError
from melbo.files.runs import META_FILE, BlockProgress, Run, RunMeta, VectorRecord, read_meta
from melbo.files.vectors import validate_vectors
from melbo.labels import NO_BEHAVIOUR, label
from melbo.model.fastpath import CastWeights, bfloat16_is_fast, bfloat16_products, compile_failed, compiled_blocks, compiler_available, kept_heap
from melbo.model.forward import (
    Generation,
    PromptState,
    extend_with_continuation,
    greedy_tokens,
    last_token_logits,
    prepare,
    steered_final_hidden,
    steered_generation,
    steered_log_probs,
    steered_logits,
    target_residual,
)
from melbo.model.frozen import runs_frozen
from melbo.model.layers import find_blocks, lm_head, residual_after
from melbo.model.loading import LoadedModel, model_identity
from melbo.model.packing import Packing, matches, pack
from melbo.model.prompts import PromptFormat, encode_prompt, need_prompts, training_prompts
from melbo.objectives import (
    TopTokens,
    fisher_along,
    fisher_metric,
    kl_divergence,
    kl_from_logits,
    kl_top_along,
    ortho_loss,
    ortho_loss_each,
    orthogonalize_block,
    project_out,
    random_orthogonal_block,
    top_tokens,
)
from melbo.output.live import unless_given

KL_DIRECTION = "kl = KL(P_i || P_0) as the post's code computed (F.kl_div(log P_0, P_i)); kl_reverse = KL(P_0 || P_i)"


@dataclass
class _Problem:
    """Everything the loss needs: model, prompts, and the base vector's target-layer residuals ``z(θ0)``.

    ``states`` are the prompts (KL and completions are measured at their last token); ``targets`` are what the
    loss matches on: the same prompts, or with ``continuation`` the prompts followed by θ0's own first tokens.
    Fast mode runs several targets as one packed sequence (:mod:`melbo.model.packing`) when the model gives the same
    numbers so.
    """

    lm: LoadedModel
    states: list[PromptState]
    settings: OrthoSettings
    base: Tensor
    known: Tensor | None = None  # θ0's greedy tokens on the first prompt, where already generated (_Prepared.known)
    targets: list[PromptState] = field(default_factory=list)
    z_base: list[Tensor] = field(default_factory=list)
    base_logits: list[Tensor] = field(default_factory=list)
    metrics: list[Tensor] = field(default_factory=list)  # match "fisher": F per position of each target, from θ0's distribution
    tops: list[TopTokens] = field(default_factory=list)  # match "kl-top": θ0's likeliest tokens at each target
    packing: Packing | None = None  # the targets as one sequence (fast mode, several targets, same numbers)
    packed_rows: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # every target's selected positions in the packed sequence, in order
    pieces: list[slice] = field(default_factory=list)  # each target's part of the packed outputs
    wheres: list[slice] = field(default_factory=list)  # each target's positions the match covers
    blocks: list[nn.Module] = field(default_factory=list)  # the decoder blocks an evaluation runs
    weights: CastWeights | None = None  # bfloat16 copies of the weights an evaluation multiplies by (precision bfloat16)
    compiled: bool = False  # the evaluations' blocks and KL compiled (settings.compiled, until a compilation fails)

    def __post_init__(self) -> None:
        s = self.settings
        self.compiled = s.compiled
        every = find_blocks(self.lm.model)  # s+1 … t for the residual matches, s+1 … L−1 for the others
        self.blocks = list(every[s.source + 1 : s.target + 1 if s.match in ("mean", "each") else len(every)])
        tokens = [s.continuation if k < self.own or s.extra_continuation is None else s.extra_continuation for k in range(len(self.states))]
        self.targets = [
            extend_with_continuation(self.lm, st, s.source, self.base, n, self.known if k == 0 else None) if n else st
            for k, (st, n) in enumerate(zip(self.states, tokens))
        ]
        self.wheres = [Positions(shifted(s.positions, s.continuation - n)).index(st.length) for st, n in zip(self.targets, tokens)]
        with torch.no_grad():
            outputs = [self._at(st, self.base[None], where)[0] for st, where in zip(self.targets, self.wheres)]
            self.z_base = [self._as_z(out) for out in outputs]
            self.base_logits = [last_token_logits(self.lm.model, st, s.source, self.base[None]) for st in self.states]
            if s.match in ("fisher", "kl-top"):
                head = lm_head(self.lm.model).weight
                log_probs = [steered_log_probs(self.lm.model, st, s.source, self.base[None], where.stop - where.start)[0] for st, where in zip(self.targets, self.wheres)]
                if s.match == "fisher":
                    self.metrics = [fisher_metric(lp, head) for lp in log_probs]
                else:
                    # once, shared by every target (a copy per target in a bfloat16 model otherwise). Each target's branch
                    # multiplies by the whole head at every evaluation; with bfloat16 products in bfloat16, half the
                    # memory to read: Gemma 3 270M's README example (16 copies) 20–21 s a block against 23–25 s, the
                    # same loss and KL over 6 seeds (AMX Xeon; bench/RESULTS.md full_basis)
                    float_head = head.float()
                    every_row = head.to(torch.bfloat16) if s.precision == "bfloat16" else float_head
                    branches = [prompt_end(st, where) for st, where in zip(self.states, self.wheres)]
                    self.tops = [top_tokens(lp, z0, float_head, branch=b, branch_rows=every_row) for lp, z0, b in zip(log_probs, self.z_base, branches)]
            if s.fast:
                self._pack(outputs)
        if "bfloat16" in (s.precision, s.warmup_precision):
            output = self.lm.model.get_output_embeddings() if s.match == "kl" else None
            self.weights = CastWeights.of([*self.blocks, *([output] if isinstance(output, nn.Module) else [])])

    def _at(self, state: PromptState, thetas: Tensor, where: slice | Tensor, fused: bool = False) -> Tensor:
        """What the match compares, at positions ``where`` of ``state`` ``(B, P, ·)``: the next-token logits (match
        "kl"; ``fused``: in the dtype the head computed them in, for the fused KL), the LM head's input ("fisher",
        "kl-top"), the target-layer residual ("mean", "each")."""
        s = self.settings
        if s.match in ("mean", "each"):
            return target_residual(self.lm.model, state, s.source, s.target, thetas)[:, where]
        keep = state.length - where.start if isinstance(where, slice) else where
        if s.match == "kl":
            return steered_logits(self.lm.model, state, s.source, thetas, keep, as_computed=fused)
        return steered_final_hidden(self.lm.model, state, s.source, thetas, keep)

    def _as_z(self, out: Tensor) -> Tensor:
        """θ0's :meth:`_at` as the loss takes it: log-probabilities (kl), averaged over positions (mean), as it is."""
        match = self.settings.match
        return torch.log_softmax(out, dim=-1) if match == "kl" else out.mean(dim=-2) if match == "mean" else out

    def _pack(self, outputs: list[Tensor]) -> None:
        """Pack the targets when there are several and the packed forward gives θ0's outputs as they are one by one."""
        if len(self.targets) < 2:
            return
        implementation = getattr(getattr(self.lm.model, "config", None), "_attn_implementation", None)
        packing = pack(self.targets, boolean_mask=implementation != "eager")
        rows = torch.cat([packing.index(k, where) for k, where in enumerate(self.wheres)])
        try:
            packed = self._at(packing.state, self.base[None], rows)[0]
        except (TypeError, ValueError, RuntimeError, IndexError):  # a model whose forward takes no mask or position ids
            return
        if matches(packed, outputs):
            sizes = [out.shape[0] for out in outputs]
            ends = torch.tensor(sizes).cumsum(0).tolist()
            self.packing, self.packed_rows = packing, rows
            self.pieces = [slice(end - size, end) for end, size in zip(ends, sizes)]

    def z(self, k: int, thetas: Tensor) -> Tensor:
        """The seed algorithm's target-layer residual on target ``k``: every layer from the embeddings, averaged over the
        selected positions (match "mean") or at each ``(B, P, d)``."""
        s = self.settings
        ids = self.targets[k].ids.expand(thetas.shape[0], -1)
        h = residual_after(self.lm.model, s.target, ids, steer=(s.source, thetas)).float()[:, self.wheres[k]]
        return h.mean(dim=1) if s.match == "mean" else h

    @property
    def own(self) -> int:
        """How many of the prompts are the run's own; melbo's shipped ones (``extra_prompts``) come after them."""
        return len(self.states) - self.settings.extra_prompts

    def losses(self, thetas: Tensor, full: bool = False, own_only: bool = False) -> Tensor:
        """Each row's loss; ``own_only``: on the run's own prompts alone (fast mode's warm-up), else on every prompt.
        Compiled where the settings say so and a gradient is wanted (an evaluation of the optimiser's); where the
        compilation fails, the run goes on eagerly with a warning."""
        if self.compiled and torch.is_grad_enabled() and not full:
            try:
                with compiled_blocks(self.blocks):
                    return self._losses(thetas, own_only=own_only, fused=True)
            except Exception as error:
                if not compile_failed(error):
                    raise
                self.compiled = False
                warnings.warn(f"melbo: torch.compile failed ({type(error).__name__}); the run goes on without it (--compile off)", stacklevel=2)
        return self._losses(thetas, full, own_only)

    def _losses(self, thetas: Tensor, full: bool = False, own_only: bool = False, fused: bool = False) -> Tensor:
        match = self.settings.match
        count = self.own if own_only else len(self.targets)
        weights = prompt_weights(count, self.settings.first_weight)
        packed: Tensor | None = None  # every target's outputs as one sequence (packing)
        with self._precision(own_only):  # the model's forward (and so its backward); outputs come out float32 (the fused KL reads them so), the objective below stays so
            if full and match in ("mean", "each"):  # the seed algorithm: every layer from the embeddings, at every step
                outputs = [self.z(k, thetas) for k in range(len(self.targets))]
            elif own_only:
                outputs = [self._at(st, thetas, where, fused) for st, where in zip(self.targets[:count], self.wheres)]
            elif self.packing is not None:
                packed = self._at(self.packing.state, thetas, self.packed_rows, fused)
            else:
                outputs = [self._at(st, thetas, where, fused) for st, where in zip(self.targets, self.wheres)]
        if packed is not None:
            if match == "kl":  # per position first: slicing (B, P, vocab) would cost its backward a vocabulary-wide fill
                packed = kl_from_logits(packed, torch.cat(self.z_base), fused=fused)
            outputs = [packed[:, piece] for piece in self.pieces]
        total = thetas.new_zeros(thetas.shape[0])
        for k, (out, z0, weight) in enumerate(zip(outputs, self.z_base, weights)):
            if match == "kl":
                loss = (out if out.dim() == 2 else kl_from_logits(out, z0, fused=fused)).mean(dim=-1)
            elif match == "fisher":
                loss = fisher_along(out, z0, self.metrics[k])
            elif match == "kl-top":
                loss = kl_top_along(out, self.tops[k])
            elif match == "mean":
                loss = ortho_loss(out if out.dim() == 2 else out.mean(dim=1), z0)
            else:
                loss = ortho_loss_each(out, z0)
            total = total + weight * loss
        if self.settings.penalty:
            total = total + self.settings.penalty * thetas.pow(2).sum(dim=-1)
        return total

    def _precision(self, warmup: bool = False) -> contextlib.AbstractContextManager[None]:
        """With precision bfloat16 (``warmup``: the warm-up's), autocast: the model's matrix products in bfloat16 on its
        own weights (on a CPU with the attention kernel in float32, see :mod:`melbo.model.fastpath`)."""
        s = self.settings
        precision = (s.warmup_precision or s.precision) if warmup else s.precision
        return bfloat16_products(self.lm.model, self.lm.device, enabled=precision == "bfloat16", weights=self.weights)

    def generation(self, thetas: Tensor) -> Generation:
        """Each row's greedy completion on the run's first prompt, and its first-token logits there."""
        s = self.settings
        return steered_generation(self.lm.model, self.lm.tokenizer, self.states[0].ids, thetas, s.source, s.completion_tokens)


def prompt_end(prompt: PromptState, where: slice) -> int | None:
    """The row of ``prompt``'s last token among the positions ``where`` of its target (the prompt, then θ0's
    continuation), where θ0's text begins; None when ``where`` does not cover it."""
    last = prompt.length - 1
    return last - where.start if where.start <= last < where.stop else None


def prompt_weights(count: int, first: float | None) -> list[float]:
    """Each prompt's share of the loss: equal, or ``first`` for the first and the rest shared equally by the others."""
    if first is None or count == 1:
        return [1.0 / count] * count
    return [first, *[(1.0 - first) / (count - 1)] * (count - 1)]


@dataclass
class _Engine:
    """The :class:`~melbo.engines.blocks.BlockEngine` of MELBO-ortho."""

    problem: _Problem
    diverged_blocks: set[int] = field(default_factory=set)  # blocks dropped for NaN/inf in this session

    @property
    def settings(self) -> OrthoSettings:
        return self.problem.settings

    def next_size(self, progress: BlockProgress, basis_rows: int) -> int:
        s, d = self.settings, self.problem.lm.d_model
        if progress.found >= s.count or basis_rows >= d or progress.in_a_row >= s.stop_after_dropped:
            return 0
        return min(s.block, s.count - progress.found, d - basis_rows)

    def stop_reason(self, progress: BlockProgress, basis_rows: int) -> str:
        if progress.in_a_row >= self.settings.stop_after_dropped:
            last = progress.block_index - 1
            if last in self.diverged_blocks:
                hint = "; the evaluations ran compiled: try --compile off" if self.problem.compiled else ""
                return f"not finite: the last {progress.in_a_row} vectors were dropped, block {last}'s loss NaN/inf{hint}"
            return f"basis exhausted: the last {progress.in_a_row} vectors collapsed to norm ≤ {self.settings.min_norm:.3g}"
        if basis_rows >= self.problem.lm.d_model:
            return "basis exhausted: every direction of the residual stream is used"
        return "count reached"

    def train(self, basis: Tensor | None, size: int, init_norm: float, generator: torch.Generator,
              on_step: Callable[[int, float], None] | None) -> tuple[Tensor, int]:
        assert basis is not None  # θ0 opens the basis
        problem, s = self.problem, self.settings
        if not s.fast:  # the post's update rule: Adam(lr) on θ starting at θ0, full forward, project after every step
            theta = torch.nn.Parameter(problem.base.clone()[None])
            steps = optimise(theta, lambda t: problem.losses(t, full=True), lambda t: project_out(t, basis), s.lr, s.steps, cosine=False)
            if on_step:
                on_step(steps, float(problem.losses(theta.detach()).detach()[0]))
            return theta.detach(), steps
        init = random_orthogonal_block(size, problem.lm.d_model, init_norm, basis, generator).to(basis.device)
        if s.optimizer == "lbfgs":
            return self._lbfgs(init, basis, on_step)
        theta = torch.nn.Parameter(init)
        steps = optimise(
            theta, problem.losses, lambda t: orthogonalize_block(t, basis), s.lr, s.steps, cosine=True,
            plateau=s.plateau, on_step=on_step,
        )
        return theta.detach(), steps

    def _lbfgs(self, init: Tensor, basis: Tensor, on_step: Callable[[int, float], None] | None) -> tuple[Tensor, int]:
        """One L-BFGS per row: with a warm-up, first on the run's own prompts alone (a fraction of the cost of an
        evaluation on every prompt), then on every prompt from where that left off, with a fresh curvature history and
        a first step a quarter as long (the rows are near a minimum already)."""
        problem, s = self.problem, self.settings
        first = s.lr * math.sqrt(problem.lm.d_model)  # Adam's largest first move

        def run(start: Tensor, losses: Callable[[Tensor], Tensor], steps: int, first_step: float, offset: int) -> tuple[Tensor, int]:
            report = (lambda e, m: on_step(offset + e, m)) if on_step else None
            return lbfgs_rows(
                start, losses, lambda t: orthogonalize_block(t, basis), lambda g: project_out(g, basis),
                steps, first_step=first_step, max_step=4 * first, plateau=s.plateau, on_step=report, patience=s.patience,
            )

        warmup = min(s.warmup, s.steps - 1) if problem.own < len(problem.targets) else 0
        if not warmup:
            return run(init, problem.losses, s.steps, first, 0)
        start, done = run(init, lambda t: problem.losses(t, own_only=True), warmup, first, 0)
        end, more = run(start, problem.losses, s.steps - done, first / 4, done)
        return end, done + more

    def judge(self, block: Tensor, steps: int, block_index: int) -> Judged:
        """Per-vector figures of a finished block, and which vectors are kept (finite, norm > min_norm)."""
        problem, s = self.problem, self.settings
        finite = torch.isfinite(block).all(dim=1)
        safe = torch.where(finite[:, None], block, torch.zeros_like(block))
        norms = block.norm(dim=-1)
        kept = finite & (norms > s.min_norm)
        # the completions on the run's first prompt; their pass over it gives that prompt's first-token logits too
        made = problem.generation(safe) if s.completion_tokens and kept.any() else None
        with torch.no_grad():
            losses = problem.losses(safe)
            kl = torch.zeros(block.shape[0], dtype=torch.float64)
            kl_rev = torch.zeros_like(kl)
            own = problem.own  # the run's own prompts; the shipped ones it also trains on come last
            for k, (state, logits0) in enumerate(zip(problem.states[:own], problem.base_logits[:own])):
                logits = made.first_logits if made is not None and k == 0 else last_token_logits(problem.lm.model, state, s.source, safe)
                kl += kl_divergence(logits, logits0.expand_as(logits)).cpu()
                kl_rev += kl_divergence(logits0.expand_as(logits), logits).cpu()
        n = own
        records = [
            VectorRecord(
                index=-1, norm=float(norms[i]) if finite[i] else float("nan"), loss=float(losses[i]),
                kl=float(kl[i] / n), kl_reverse=float(kl_rev[i] / n), block=block_index, steps=steps,
            )
            for i in range(block.shape[0])
        ]
        if made is not None:
            for record, text, keep in zip(records, made.texts, kept.tolist()):
                if keep:
                    record.completion = text
        return Judged(records=records, kept=kept)

    def diverged(self, block_index: int, size: int) -> str:
        self.diverged_blocks.add(block_index)
        why = "NaN/inf at its starting point" if self.settings.optimizer == "lbfgs" else "NaN/inf twice (also with a 10× smaller step)"
        return f"block {block_index}: {why}; its {size} vectors were dropped"


def objective(lm: LoadedModel, base: Tensor, prompts: list[str], cfg: OrthoConfig = OrthoConfig(), fmt: PromptFormat = PromptFormat()) -> Callable[[Tensor], Tensor]:
    """The loss MELBO-ortho minimises, per row of a ``(B, d)`` block of vectors (differentiable): what ``ortho`` with
    these settings optimises, to time it (bench/utilisation.py), plot it or try another optimiser on it."""
    ready = _prepared(lm, base, prompts, cfg, fmt)
    return _Problem(lm, prepare(lm, ready.prompts, fmt, ready.settings.source), ready.settings, ready.base, ready.known).losses


def progress_plan(lm: LoadedModel, base: Tensor, cfg: OrthoConfig) -> OrthoSettings:
    """``cfg`` resolved for ``base`` on ``lm`` before θ0's continuations are read: the count, blocks and steps that
    progress is counted by (``melbo ortho``'s log and bar, a study's events). The run's own settings may differ in
    what the continuations tell (where θ0's behaviour shows), not in its blocks."""
    return cfg.resolved(float(base.norm()), lm.d_model, lm.n_layers, vocab=lm.plain_head_vocab)


def _prepared(lm: LoadedModel, base: Tensor, prompts: list[str], cfg: OrthoConfig, fmt: PromptFormat) -> _Prepared:
    """θ0 (checked, on the model's device), the settings it resolves to, every prompt trained on (the given ones and
    ``extra_prompts`` of melbo's shipped ones), and θ0's greedy tokens on the run's prompt where reading its behaviour
    needed them (its continuation and completion there are their first tokens)."""
    cfg.check(lm.n_layers, lm.d_model)
    need_prompts(prompts)  # before prompts[0] is read
    base = validate_vectors(base.detach().cpu(), "base vector", lm.d_model)[0].to(lm.device)
    if float(base.norm()) == 0:
        raise MelboError("the base vector is zero: choose a vector with an effect")
    shows_at, known = None, None
    if cfg.mode == "fast" and cfg.continuation is None:  # the default continuation covers θ0's behaviour on the run's prompt
        known = greedy_tokens(lm, encode_prompt(lm.tokenizer, prompts[0], fmt, lm.device), base, cfg.layers(lm.n_layers)[0], BEHAVIOUR_TOKENS)
        shows_at = label_shows_at(lm, known)  # behaviour_shows_at, keeping the tokens
    settings = cfg.resolved(
        float(base.norm()), lm.d_model, lm.n_layers, own_prompts=len(prompts), chat=fmt.chat_template, shows_at=shows_at,
        bfloat16_fast=bfloat16_is_fast(lm.device), vocab=lm.plain_head_vocab, can_compile=compiler_available(lm.device),
    )
    return _Prepared(base, settings, [*prompts, *training_prompts(settings.extra_prompts, prompts)], known)


@dataclass
class _Prepared:
    base: Tensor  # θ0, checked, on the model's device
    settings: OrthoSettings
    prompts: list[str]  # every prompt trained on
    known: Tensor | None  # θ0's greedy tokens on the run's prompt (BEHAVIOUR_TOKENS, up to end-of-sequence), where read


def behaviour_shows_at(lm: LoadedModel, prompt: str, vector: Tensor, source: int, fmt: PromptFormat, tokens: int = BEHAVIOUR_TOKENS) -> int | None:
    """The token of ``vector``'s greedy completion of ``prompt`` (``tokens`` long) at which the text so far first takes
    the label of the whole (melbo.labels); None when the whole shows no behaviour (other, degenerate)."""
    state = prepare(lm, [prompt], fmt, source)[0]
    return label_shows_at(lm, greedy_tokens(lm, state.ids, vector, source, tokens))


def label_shows_at(lm: LoadedModel, tokens: Tensor) -> int | None:
    """The token of a completion ``tokens`` at which the text so far first takes the label of the whole; None when
    the whole shows no behaviour."""
    ids = tokens.tolist()

    def named(n: int) -> str:
        return label(str(lm.tokenizer.decode(ids[:n], skip_special_tokens=True)))[0]

    whole = named(len(ids))
    if whole in NO_BEHAVIOUR:
        return None
    return next(n for n in range(1, len(ids) + 1) if named(n) == whole)


@runs_frozen
def ortho(
    lm: LoadedModel,
    base: Tensor,
    prompts: list[str],
    cfg: OrthoConfig = OrthoConfig(),
    fmt: PromptFormat = PromptFormat(),
    out: str | Path | None = None,
    on_step: StepCallback | None = None,
    base_info: dict[str, Any] | None = None,
    resume: bool = False,
    on_block: BlockCallback | None = None,
    on_start: Callable[[int], None] | None = None,
    progress: bool = True,
) -> Run:
    """Find vectors orthogonal to ``base`` and to each other that reproduce its effect on every prompt: ``prompts``
    and ``cfg.extra_prompts`` of melbo's shipped ones (all recorded in run.json; KL and completions are measured on
    the first, the run's prompt).

    Args:
        resume: continue the run already in ``out`` from its last completed block (same settings
            required; the same random state per block makes the result identical to an uninterrupted run).
        on_start: called with the first block's index once θ0's continuations are read and every check has passed.
        progress: where ``on_step`` is not given, show it: a bar in a terminal or notebook, a timestamped line per
            block (and each minute) where stderr is a log; False: silent.

    Returns:
        a :class:`~melbo.files.runs.Run` whose row 0 is θ0 and rows 1… the vectors found, each record holding
        ``norm``, ``loss`` (the objective: the KL along θ0's continuation by default, ‖z(θ) − z(θ0)‖ with match
        "mean"), ``kl`` = KL(P_θ ‖ P_θ0) and ``kl_reverse`` = KL(P_θ0 ‖ P_θ) of the
        next-token distributions at the last prompt token (averaged over ``prompts``, not the shipped ones), ``block``
        and ``steps``.
        The run folder is written after every block when ``out`` is given.
    """
    if resume and out is not None and (Path(out) / META_FILE).is_file():
        cfg = cfg.as_in_run(read_meta(out).config)
    ready = _prepared(lm, base, prompts, cfg, fmt)
    base, settings, prompts = ready.base, ready.settings, ready.prompts
    base_norm = float(base.norm())
    meta = RunMeta(
        kind="ortho", model=lm.describe(), model_identity=model_identity(lm), source=settings.source,
        target=settings.target, R=base_norm, prompts=list(prompts), prompt_format=fmt, seed=settings.seed,
        config=dataclasses.asdict(settings), base={"norm": base_norm, **(base_info or {})}, kl_direction=KL_DIRECTION,
    )
    problem = _Problem(lm, prepare(lm, prompts, fmt, settings.source), settings, base, ready.known)
    first = VectorRecord(index=0, base=True, norm=base_norm, loss=0.0, kl=0.0, kl_reverse=0.0)
    if settings.completion_tokens and ready.known is not None and settings.completion_tokens <= BEHAVIOUR_TOKENS:
        first.completion = str(lm.tokenizer.decode(ready.known[: settings.completion_tokens], skip_special_tokens=True))
    elif settings.completion_tokens:
        first.completion = problem.generation(base[None]).texts[0]
    # every evaluation allocates the same large activations again (kept_heap)
    with kept_heap(), unless_given(on_step, progress, settings.blocks, settings.steps, f"ortho ({settings.mode})") as shown:
        return run_blocks(
            _Engine(problem), meta, [(base, first)], lm.d_model, lm.device, settings.seed, settings.init_scale * base_norm,
            out, resume, shown, on_block, on_start,
        )
