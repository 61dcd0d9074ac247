"""The block driver that discover and MELBO-ortho share: vectors are found a block at a time (one vector per
batch row), each block orthogonal to every vector tried before it.

The driver owns what the two engines have in common: each block's random generator (a function of the seed
and the block's number only), the orthogonal basis grown block by block, a block that diverges (dropped, with
a warning), the run folder saved after every block, ``--resume`` (the basis is rebuilt from the saved tried
vectors in the same order, so a resumed run ends with exactly the vectors of one that was never
interrupted), and one :class:`~melbo.files.runs.Session` per start. An engine says only how big the next
block is, how to train one, and how to judge what it found.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from melbo.engines.config import DiscoverSettings, OrthoSettings
from melbo.engines.optimise import Diverged
from melbo.errors import MelboError
from melbo.files.resume import check_same_settings
from melbo.files.runs import META_FILE, PROCESSED, BlockProgress, Run, RunMeta, Session, VectorRecord, now_iso, read_run, write_run
from melbo.objectives import extend_orthonormal

StepCallback = Callable[[int, int, float], None]  # (block index, step, mean loss of the block)
BlockCallback = Callable[[Run], None]  # after each block is saved


@dataclass
class Judged:
    """One finished block: a record per row and which rows are kept as vectors of the run."""

    records: list[VectorRecord]  # ``index`` is filled in by the driver
    kept: Tensor  # (B,) bool


class BlockEngine(Protocol):
    """What discover and MELBO-ortho each tell the driver."""

    @property
    def settings(self) -> DiscoverSettings | OrthoSettings:
        """The engine's settings (a dataclass; run.json's ``config``): its fields with a default are those added after
        the first release, at what melbo did before them, so a run made before one existed still resumes."""

    def next_size(self, progress: BlockProgress, basis_rows: int) -> int:
        """Vectors in the next block; 0 when the run is over."""

    def stop_reason(self, progress: BlockProgress, basis_rows: int) -> str:
        """Why the run ended (after :meth:`next_size` returned 0)."""

    def train(self, basis: Tensor | None, size: int, init_norm: float, generator: torch.Generator,
              on_step: Callable[[int, float], None] | None) -> tuple[Tensor, int]:
        """A block of ``size`` vectors orthogonal to ``basis``, and the optimisation steps it took.
        Raises :class:`~melbo.engines.optimise.Diverged` when it cannot recover from NaN or inf."""

    def judge(self, block: Tensor, steps: int, block_index: int) -> Judged:
        """Records of a trained block, completions included."""

    def diverged(self, block_index: int, size: int) -> str:
        """The warning stored when a block diverged."""


def block_generator(seed: int, block_index: int) -> torch.Generator:
    """The random state of one block: a function of the seed and the block's number alone."""
    return torch.Generator().manual_seed(seed * 1_000_003 + block_index)


@dataclass
class _State:
    """What the loop carries from block to block; saved in the run folder so --resume can go on."""

    d_model: int
    vectors: list[Tensor]
    records: list[VectorRecord]
    basis: Tensor | None  # orthonormal rows (on the model's device), None before the first vector
    processed: list[Tensor]  # every finite vector tried, in order: rebuilds the basis bit for bit
    progress: BlockProgress
    dropped: list[VectorRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def basis_rows(self) -> int:
        return 0 if self.basis is None else int(self.basis.shape[0])

    def add_block(self, block: Tensor, judged: Judged) -> None:
        finite = torch.isfinite(block).all(dim=1)
        self.basis = _extend(self.basis, block[finite])
        self.processed += list(block[finite].cpu())
        self.progress.block_sizes.append(int(finite.sum()))
        for row, record, keep in zip(block, judged.records, judged.kept.tolist()):
            if keep:
                record.index = len(self.vectors)
                self.vectors.append(row.cpu())
                self.records.append(record)
                self.progress.in_a_row = 0
            else:
                self.dropped.append(record)
                self.progress.in_a_row += 1
        norms = block[judged.kept].norm(dim=-1)
        if norms.numel():
            self.progress.init_norm = float(norms.median())
        self.progress.found += block.shape[0]
        self.progress.block_index += 1

    def skip_block(self, size: int, warning: str) -> None:
        self.warnings.append(warning)
        self.progress.found += size
        self.progress.in_a_row += size
        self.progress.block_index += 1

    def extra(self) -> dict[str, Tensor]:
        return {PROCESSED: torch.stack(self.processed)} if self.processed else {}


def _extend(basis: Tensor | None, rows: Tensor) -> Tensor | None:
    if basis is None:
        if rows.shape[0] == 0:
            return None
        basis = rows.new_zeros(0, rows.shape[1])
    return extend_orthonormal(basis, rows)


def run_blocks(
    engine: BlockEngine,
    meta: RunMeta,
    first: list[tuple[Tensor, VectorRecord]],
    d_model: int,
    device: torch.device,
    seed: int,
    init_norm: float,
    out: str | Path | None = None,
    resume: bool = False,
    on_step: StepCallback | None = None,
    on_block: BlockCallback | None = None,
    on_start: Callable[[int], None] | None = None,
) -> Run:
    """Run ``engine`` block by block; save after every block when ``out`` is given; return the run.

    Args:
        meta: the run's settings (records and progress are filled in here).
        first: rows that open the run and the basis before any block (MELBO-ortho's θ0), with their records.
        resume: continue the run already in ``out`` (same settings required) from its last saved block.
        on_start: called with the first block's index once every check has passed, before that block runs.
    """
    previous = _previous(out, meta, d_model, first, later_defaults(engine.settings)) if resume else None
    if previous is not None and previous.meta.status == "complete":
        return previous
    state = _fresh(first, d_model, init_norm, device) if previous is None else _resumed(previous, first, device)
    meta.sessions = (previous.meta.sessions if previous is not None else []) + [Session(now_iso(), state.progress.block_index)]
    run = _snapshot(meta, state, out, "running", save=False)
    if on_start:
        on_start(state.progress.block_index)
    while (size := engine.next_size(state.progress, state.basis_rows)) > 0:
        index = state.progress.block_index
        step_cb = (lambda step, loss, b=index: on_step(b, step, loss)) if on_step else None
        try:
            block, steps = engine.train(state.basis, size, state.progress.init_norm, block_generator(seed, index), step_cb)
        except Diverged:
            state.skip_block(size, engine.diverged(index, size))
        else:
            state.add_block(block, engine.judge(block, steps, index))
        run = _snapshot(meta, state, out, "running", save=out is not None)
        if on_block:
            on_block(run)
    meta.stopped = engine.stop_reason(state.progress, state.basis_rows)
    return _snapshot(meta, state, out, "complete", save=out is not None)


def _snapshot(meta: RunMeta, state: _State, out: str | Path | None, status: str, save: bool) -> Run:
    meta.records, meta.dropped, meta.warnings = state.records, state.dropped, state.warnings
    meta.progress, meta.status = state.progress, status
    vectors = torch.stack(state.vectors) if state.vectors else torch.zeros(0, state.d_model)
    if save and out is not None:
        return write_run(out, vectors, meta, state.extra())
    return Run(path=Path(out or "."), vectors=vectors, meta=meta, extra=state.extra(), in_memory=out is None)


def _fresh(first: list[tuple[Tensor, VectorRecord]], d_model: int, init_norm: float, device: torch.device) -> _State:
    rows = [v.to(device) for v, _ in first]
    return _State(
        d_model=d_model, vectors=[v.cpu() for v in rows], records=[r for _, r in first],
        basis=_extend(None, torch.stack(rows)) if rows else None, processed=[],
        progress=BlockProgress(init_norm=init_norm),
    )


def _resumed(run: Run, first: list[tuple[Tensor, VectorRecord]], device: torch.device) -> _State:
    progress = run.meta.progress
    if progress is None:
        raise MelboError(f"cannot resume {run.path}: its {META_FILE} has no progress record (made by another melbo?)")
    processed = run.extra.get(PROCESSED)
    if processed is None:  # a discover run of the first release: every vector it tried is a vector of the run
        processed = run.vectors[len(first):]
    basis = _extend(None, torch.stack([v.to(device) for v, _ in first])) if first else None
    start = 0
    for size in progress.block_sizes:
        basis = _extend(basis, processed[start : start + size].to(device))
        start += size
    return _State(
        d_model=int(run.vectors.shape[1]), vectors=list(run.vectors), records=run.records, basis=basis, processed=list(processed),
        progress=progress, dropped=run.meta.dropped, warnings=run.meta.warnings,
    )


def later_defaults(settings: DiscoverSettings | OrthoSettings) -> dict[str, Any]:
    """The fields of a settings dataclass that have a default (those added after the first release), with it."""
    return {f.name: f.default for f in dataclasses.fields(settings) if f.default is not dataclasses.MISSING}


def _previous(out: str | Path | None, meta: RunMeta, d_model: int, first: list[tuple[Tensor, VectorRecord]],
              added_later: dict[str, Any]) -> Run | None:
    """The run to continue in ``out`` (None if there is none yet), after checking it has our settings."""
    if out is None or not (Path(out) / META_FILE).is_file():
        return None
    previous = read_run(out, d_model=d_model)
    check_same_settings(previous.meta, meta, added_later)
    for row, (vector, _) in enumerate(first):
        if row >= previous.vectors.shape[0] or not torch.equal(previous.vectors[row], vector.cpu().float()):
            raise MelboError(f"cannot resume {out}: its base vector (row {row}) is not the one given now")
    return previous
