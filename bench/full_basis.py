"""Full basis: MELBO-ortho (fast mode) on the embedded SmolLM2 until the basis is exhausted (at most
d_model − 1 = 575 vectors), from the demo's base vector. Target: ≤ 20 minutes on 2 CPU cores.

    .venv/bin/python bench/full_basis.py --quick     # 4 vectors, 5 steps: checks that it runs
    .venv/bin/python bench/full_basis.py             # every vector (about half an hour on 2 cores)
    .venv/bin/python bench/full_basis.py --count 96  # the first 6 blocks, with a per-block profile
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import base_vector, summary_line

from melbo.engines.ortho import OrthoConfig, ortho
from melbo.model.loading import load_model
from melbo.model.prompts import DEFAULT_PROMPT, PromptFormat
from melbo.objectives import max_abs_cosine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--count", type=int, default=None, help="stop after this many vectors (default: the whole basis)")
    parser.add_argument("--block", type=int, default=None, help="vectors per block (default: fast mode's 16)")
    parser.add_argument("--optimizer", default=None, help="lbfgs (default) or adam")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    lm = load_model("smollm2", device="cpu")
    base = base_vector(lm, quick=args.quick)
    cfg = OrthoConfig(mode="fast", count=4, block=4, steps=5, completion_tokens=0) if args.quick else OrthoConfig(mode="fast", count=args.count, block=args.block, optimizer=args.optimizer)
    blocks: dict[int, list[float]] = {}
    step_start = [time.perf_counter()]

    def on_step(block: int, step: int, loss: float) -> None:
        now = time.perf_counter()
        blocks.setdefault(block, []).append(now - step_start[0])
        step_start[0] = now

    start = time.perf_counter()
    run = ortho(lm, base, [DEFAULT_PROMPT], cfg, PromptFormat(), on_step=on_step)
    minutes = (time.perf_counter() - start) / 60
    records = run.records[1:]
    kls = [r.kl for r in records]
    print(f"{'blocks':<8}{'vectors':>8}{'steps':>7}{'s/step':>8}{'median KL':>11}{'median norm':>13}")
    per = cfg.block or 16
    for b in range(0, len(blocks), max(1, len(blocks) // 12)):
        part = [r for r in records if r.block == b]
        if part:
            times = blocks[b]
            print(f"{b:<8}{len(part):>8}{len(times):>7}{statistics.median(times):>8.2f}{statistics.median(r.kl for r in part):>11.3f}{statistics.median(r.norm for r in part):>13.1f}")
    exhausted = (run.meta.stopped or "").startswith("basis exhausted")
    steps = sum(len(t) for t in blocks.values())
    print(
        f"{len(records)} vectors in {len(blocks)} blocks of ≤ {per}, {steps} optimisation steps, {minutes:.1f} min; "
        f"median KL {statistics.median(kls):.3f}; max |cos| {max_abs_cosine(run.vectors.double()):.1e}; stopped: {run.meta.stopped}"
    )
    step_s = statistics.median(t for times in blocks.values() for t in times)
    settings = cfg.resolved(float(base.norm()), lm.d_model, lm.n_layers)
    source = run.meta.source
    through = (f"layers {source + 1}…{lm.n_layers - 1} and the LM head, over the prompt and θ0's {settings.continuation} continuation tokens"
               if settings.match == "kl" else f"layers {source + 1}…{run.meta.target}")
    if exhausted and minutes > 20:
        print(
            f"why: {steps} evaluations at a median {step_s:.2f} s (forward and backward of ≤ {per} rows through "
            f"{through}: matmul-bound, see utilisation); 20 min allows {20 * 60 / step_s / len(blocks):.0f} "
            f"evaluations per block. To close it: fewer evaluations at equal KL (a start better than a random "
            f"direction), a GPU (bench/gpu.py), or melbo 0.1's objective (--match mean --continuation 0: about 15 min "
            f"here, but copies that keep the base's behaviour far less often: bench/fidelity.py)"
        )
    target = "met" if minutes <= 20 else "missed"
    whole = "" if exhausted or args.quick else f" (stopped at {len(records)} vectors: ≈ {minutes * (lm.d_model - 1) / len(records):.0f} min for 575 if every block cost the same)"
    summary_line(f"{len(records)} orthogonal vectors in {minutes:.1f} min{whole}; target whole basis ≤ 20 min: {target if exhausted else 'not measured'}")


if __name__ == "__main__":
    main()
