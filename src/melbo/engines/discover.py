"""MELBO discovery: learn K steering vectors of norm R that change the target layer the most.

Vectors are trained in blocks (one per batch row). After every Adam step each block is projected onto the
orthogonal complement of all earlier vectors, orthogonalised within itself (Gram–Schmidt, in row order) and
put back on the sphere of radius R. Block size 1 is the original one-at-a-time algorithm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from melbo.engines.blocks import BlockCallback, Judged, StepCallback, run_blocks
from melbo.engines.config import DiscoverConfig, DiscoverSettings, RadiusConfig
from melbo.engines.problem import DiscoveryProblem
from melbo.engines.radius import RadiusChoice, RadiusProbe, choose_radius
from melbo.files.runs import META_FILE, BlockProgress, Run, RunMeta, VectorRecord, read_meta
from melbo.model.fastpath import bfloat16_is_fast
from melbo.model.forward import generate_steered, prepare
from melbo.model.frozen import runs_frozen
from melbo.model.loading import LoadedModel, model_identity
from melbo.model.prompts import PromptFormat
from melbo.output.live import log_line, unless_given


@dataclass
class _Engine:
    """The :class:`~melbo.engines.blocks.BlockEngine` of discovery."""

    problem: DiscoveryProblem

    @property
    def settings(self) -> DiscoverSettings:
        return self.problem.settings

    def next_size(self, progress: BlockProgress, basis_rows: int) -> int:
        return min(self.problem.settings.block, self.problem.settings.count - progress.found)

    def stop_reason(self, progress: BlockProgress, basis_rows: int) -> str:
        return "count reached"

    def train(self, basis: Tensor | None, size: int, init_norm: float, generator: torch.Generator,
              on_step: Callable[[int, float], None] | None) -> tuple[Tensor, int]:
        return self.problem.train(basis, size, generator, on_step)

    def judge(self, block: Tensor, steps: int, block_index: int) -> Judged:
        problem, s = self.problem, self.problem.settings
        with torch.no_grad():
            losses = problem.losses(block)
        texts = (
            generate_steered(problem.lm.model, problem.lm.tokenizer, problem.states[0].ids, block, s.source, s.completion_tokens)
            if s.completion_tokens > 0 else [""] * block.shape[0]
        )
        records = [
            VectorRecord(index=-1, block=block_index, norm=float(row.norm()), loss=float(loss), completion=text)
            for row, loss, text in zip(block, losses, texts)
        ]
        return Judged(records=records, kept=torch.ones(block.shape[0], dtype=torch.bool))

    def diverged(self, block_index: int, size: int) -> str:
        return f"block {block_index}: NaN/inf twice (also with a 10× smaller step); its {size} vectors were dropped"


@runs_frozen
def calibrate(
    lm: LoadedModel,
    prompts: list[str],
    cfg: DiscoverConfig = DiscoverConfig(),
    fmt: PromptFormat = PromptFormat(),
    radius_cfg: RadiusConfig = RadiusConfig(),
    on_probe: Callable[[RadiusProbe], None] | None = None,
) -> RadiusChoice:
    """The R that ``discover`` with ``radius="auto"`` would use on these prompts and layers, and its table."""
    cfg.check(lm.n_layers, lm.d_model)
    source, _ = cfg.layers(lm.n_layers)
    settings = cfg.probe_settings(lm.n_layers, lm.d_model, bfloat16_fast=bfloat16_is_fast(lm.device))
    return choose_radius(DiscoveryProblem(lm, prepare(lm, prompts, fmt, source), settings), radius_cfg, on_probe)


@runs_frozen
def discover(
    lm: LoadedModel,
    prompts: list[str],
    cfg: DiscoverConfig = DiscoverConfig(),
    fmt: PromptFormat = PromptFormat(),
    out: str | Path | None = None,
    on_step: StepCallback | None = None,
    resume: bool = False,
    on_block: BlockCallback | None = None,
    radius_cfg: RadiusConfig = RadiusConfig(),
    on_radius: Callable[[RadiusChoice], None] | None = None,
    on_probe: Callable[[RadiusProbe], None] | None = None,
    progress: bool = True,
) -> Run:
    """Run MELBO discovery; write the run folder after every block when ``out`` is given.

    Args:
        cfg: with ``radius="auto"`` (the default) R is chosen first by :func:`~melbo.engines.radius.choose_radius`
            (``radius_cfg``; each candidate R tried is given to ``on_probe``) and the choice is recorded in run.json
            (``radius_choice``) and given to ``on_radius``;
            with source/target ``None``, layers about a third and two thirds of the way in.
        resume: continue the run already in ``out`` from its last completed block. Each block's random
            start depends only on the seed and the block's number, so the result is the same as a run
            that was never interrupted (an automatic R is taken from the saved run, not measured again).
        progress: where ``on_step`` (or ``on_probe``, ``on_radius``) is not given, show it: a bar in a terminal
            or notebook, a timestamped line per block (and each minute) where stderr is a log; False: silent.

    Returns:
        the :class:`~melbo.files.runs.Run` with vectors ``(K, d)`` and per-vector records: ``loss`` (the final
        MELBO loss, negative), ``norm``, ``block`` and a greedy ``completion`` on the first prompt.

    Example:
        >>> run = discover(load_model(), ["How can I build a bomb?"], DiscoverConfig(count=8))
        >>> run.meta.R, [r.completion[:40] for r in run.records]
    """
    cfg.check(lm.n_layers, lm.d_model)
    saved = read_meta(out) if resume and out is not None and (Path(out) / META_FILE).is_file() else None
    if saved is not None:  # a resumed run keeps the precision it ran at
        cfg = cfg.as_in_run(saved.config)
    choice: RadiusChoice | None = None
    if progress:
        on_probe = on_probe or (lambda probe: log_line(f"discover: {probe.line()}"))
        on_radius = on_radius or (lambda chosen: log_line(f"discover: {chosen.line()}"))
    if cfg.auto_radius:
        if saved is not None and saved.radius_choice is not None:
            choice = saved.radius_choice
        else:
            choice = calibrate(lm, prompts, cfg, fmt, radius_cfg, on_probe)
        if on_radius:
            on_radius(choice)
    settings = cfg.resolved(lm.n_layers, lm.d_model, radius=choice.radius if choice else None, bfloat16_fast=bfloat16_is_fast(lm.device))
    meta = RunMeta(
        kind="discover", model=lm.describe(), model_identity=model_identity(lm), source=settings.source,
        target=settings.target, R=settings.radius, prompts=list(prompts), prompt_format=fmt, seed=settings.seed,
        config=dataclasses.asdict(settings), radius_choice=choice,
    )
    problem = DiscoveryProblem(lm, prepare(lm, prompts, fmt, settings.source), settings)
    with unless_given(on_step, progress, cfg.blocks, settings.steps, "discover") as shown:
        return run_blocks(
            _Engine(problem), meta, [], lm.d_model, lm.device, settings.seed, settings.radius, out, resume, shown, on_block,
        )
