"""GPU (bench item 7): MELBO-ortho fast mode and its optimisation step on CUDA, float32 against bfloat16 products on the
float32 weights (what `--precision auto` runs on a GPU), side by side in one run on one loaded model. Skips cleanly
(exit 0, a summary line saying why) where no CUDA device is present. On a lent machine that reaches nothing outside
it, bench/gpu_kit brings melbo and the model there and runs this.

    .venv/bin/python bench/gpu.py                      # on a machine with a GPU: 128 vectors, the whole basis
    .venv/bin/python bench/gpu.py --quick              # seconds
    .venv/bin/python bench/gpu.py --quick --device cpu # the same measurements on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import base_vector, summary_line
from utilisation import SOURCE, TARGET, step_flops, time_it

from melbo.engines.config import Positions
from melbo.engines.ortho import OrthoConfig, ortho
from melbo.model.fastpath import bfloat16_products
from melbo.model.forward import prepare, target_residual
from melbo.model.loading import load_model
from melbo.model.prompts import DEFAULT_PROMPT, PromptFormat
from melbo.objectives import max_abs_cosine, ortho_loss


def step_rates(lm, block: int, repeats: int, precision: str) -> tuple[float, float, float]:
    """(step seconds, step FLOP/s, same-shape matmul FLOP/s), the step's products and the matmul in ``precision``."""
    state = prepare(lm, [DEFAULT_PROMPT], PromptFormat(), SOURCE)[0]
    sel = Positions("last:4").index(state.length)
    theta = torch.nn.Parameter(torch.randn(block, lm.d_model, device=lm.device) * 30 / lm.d_model**0.5)
    z0 = torch.zeros(lm.d_model, device=lm.device)

    def step():
        with bfloat16_products(lm.model, lm.device, enabled=precision == "bfloat16"):
            h = target_residual(lm.model, state, SOURCE, TARGET, theta)
        ortho_loss(h[:, sel].float().mean(dim=1), z0).sum().backward()
        theta.grad = None

    seconds = time_it(step, repeats, lm.device)
    config = lm.model.config
    dtype = torch.bfloat16 if precision == "bfloat16" else next(lm.model.parameters()).dtype
    a = torch.randn(block * state.length, config.hidden_size, device=lm.device, dtype=dtype)
    w = torch.randn(config.hidden_size, config.intermediate_size, device=lm.device, dtype=dtype)
    mm = time_it(lambda: a @ w, repeats * 10, lm.device)
    return seconds, step_flops(config, block, state.length, TARGET - SOURCE) / seconds, 2 * a.shape[0] * a.shape[1] * w.shape[1] / mm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--count", type=int, default=128, help="vectors of the timed ortho run")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: bench item 7 runs only where a GPU is lent (see README, Benchmarks)")
        summary_line("skipped (no CUDA device)")
        return
    # quick: one copy, two steps, each timing one cold call, no warm-up (a check that the script runs, in the suite; on a CPU
    # without bfloat16 units a bfloat16 step is ~20× a float32 one, so --quick --device cpu is mostly that row)
    count, steps, repeats, full_basis = (1, 2, 0, False) if args.quick else (args.count, None, 20, True)
    block = 4 if args.quick else 16  # rows of the timed step
    lm = load_model("smollm2", device=args.device, dtype="float32")
    base = base_vector(lm, quick=args.quick).to(lm.device)
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    # each line as soon as it is measured (flushed), so that a run stopped at its time limit keeps what it finished
    print(f"device: {name}; model: embedded SmolLM2; ortho fast mode, {count} vectors" + (", then the whole basis" if full_basis else ""), flush=True)
    print(f"{'products':<10}{'s/vector':>10}{'median KL':>11}{f'step{block} (ms)':>13}{'GFLOP/s':>10}{'matmul GFLOP/s':>16}", flush=True)

    def copies(precision: str, **settings):
        """Fast-mode copies of the base on the default prompt alone, the optimisation's products in ``precision``."""
        return ortho(lm, base, [DEFAULT_PROMPT], OrthoConfig(mode="fast", precision=precision, extra_prompts=0, **settings), PromptFormat(), progress=False)

    rows = {}
    for precision in ("float32", "bfloat16"):
        if not args.quick:  # one copy, one evaluation first: the device's and the model's first-call costs out of the timed run
            copies(precision, count=1, block=1, steps=1, completion_tokens=0)
        start = time.perf_counter()
        run = copies(precision, count=count, block=min(16, count), steps=steps, completion_tokens=0 if args.quick else 32)
        per_vector = (time.perf_counter() - start) / (run.vectors.shape[0] - 1)
        kl = statistics.median(r.kl for r in run.records[1:])
        step_s, step_rate, mm_rate = step_rates(lm, block, repeats, precision)
        rows[precision] = (per_vector, kl, step_rate / mm_rate)
        print(f"{precision:<10}{per_vector:>10.3f}{kl:>11.3f}{1000 * step_s:>13.1f}{step_rate / 1e9:>10.1f}{mm_rate / 1e9:>16.1f}", flush=True)
    basis = {}
    for precision in ("bfloat16", "float32") if full_basis else ():  # melbo's default on a GPU first
        start = time.perf_counter()
        whole = copies(precision)
        basis[precision] = (time.perf_counter() - start) / 60
        found = whole.vectors.shape[0] - 1
        assert max_abs_cosine(whole.vectors.double()) < 1e-4
        print(f"whole basis, {precision} products: {found} copies in {basis[precision]:.2f} min, {60 * basis[precision] / found:.2f} s per copy", flush=True)
    f32, bf16 = rows["float32"], rows["bfloat16"]
    summary_line(
        f"{name}: bfloat16 products are {f32[0] / bf16[0]:.2f}× float32's speed per ortho vector (median KL {bf16[1]:.3f} vs {f32[1]:.3f}); "
        f"a block-{block} step runs at {100 * f32[2]:.0f}% (float32) and {100 * bf16[2]:.0f}% (bfloat16) of a same-shape matmul"
        + (f"; whole basis {basis['float32']:.1f} min (float32), {basis['bfloat16']:.1f} min (bfloat16 products)" if full_basis else "")
    )


if __name__ == "__main__":
    main()
