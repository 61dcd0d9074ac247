"""MELBO discovery: vectors per minute in blocks (melbo's default, one vector per batch row) against one vector
at a time (--block 1, the original algorithm), and a block trained with bfloat16 products (what ``--precision auto``
picks on a CPU with bfloat16 units) against float32, side by side in one run on the embedded SmolLM2. For the two
precisions also what they find: the mean loss (recorded in float32 for both) and how many vectors write a greedy
completion with the same label, row for row. On a CPU without bfloat16 units (AVX2) a whole bfloat16 block would take
most of an hour: there a few steps of the block in each precision, side by side, say why ``auto`` trains in float32.

    .venv/bin/python bench/discovery_speed.py --quick     # seconds
    .venv/bin/python bench/discovery_speed.py             # 16 vectors in one block vs 2 one at a time, 100 steps
"""

from __future__ import annotations

import argparse
import time

import torch
from common import summary_line

from melbo.engines.discover import DiscoverConfig, discover
from melbo.engines.problem import DiscoveryProblem
from melbo.labels import label
from melbo.model.fastpath import bfloat16_is_fast
from melbo.model.forward import generate_steered, prepare
from melbo.model.loading import load_model
from melbo.model.prompts import DEFAULT_PROMPT, PromptFormat
from melbo.objectives import random_orthogonal_block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    block_n, single_n, steps = (4, 1, 10) if args.quick else (16, 2, 100)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    lm = load_model("smollm2", device="cpu")
    fast = bfloat16_is_fast(lm.device)
    rows = [("block, float32", block_n, block_n, "float32"), ("one at a time, float32", single_n, 1, "float32")]
    if fast:
        rows.insert(1, ("block, bfloat16", block_n, block_n, "bfloat16"))
    rates, runs = {}, {}
    print(f"--precision auto here: {'bfloat16' if fast else 'float32'} ({'bfloat16 units' if fast else 'no bfloat16 units'})")
    print(f"{'mode':<24}{'vectors':>8}{'steps':>7}{'seconds':>9}{'vectors/min':>13}{'mean loss':>11}")
    for name, count, block, precision in rows:
        cfg = DiscoverConfig(source=8, target=20, radius=30, count=count, block=block, steps=steps, completion_tokens=0, precision=precision)
        start = time.perf_counter()
        runs[name] = discover(lm, [DEFAULT_PROMPT], cfg, PromptFormat(), progress=False)
        seconds = time.perf_counter() - start
        rates[name] = 60 * count / seconds
        loss = sum(r.loss for r in runs[name].records) / count
        print(f"{name:<24}{count:>8}{steps:>7}{seconds:>9.1f}{rates[name]:>13.1f}{loss:>11.1f}")
    text = f"blocks find {rates['block, float32']:.1f} vectors/min against {rates['one at a time, float32']:.1f} one at a time: " \
           f"{rates['block, float32'] / rates['one at a time, float32']:.1f}× faster"
    if fast:
        ids = prepare(lm, [DEFAULT_PROMPT], PromptFormat(), 8)[0].ids
        labels = {name: [label(t)[0] for t in generate_steered(lm.model, lm.tokenizer, ids, runs[name].vectors, 8, 32)]
                  for name in ("block, float32", "block, bfloat16")}
        same = sum(a == b for a, b in zip(*labels.values()))
        print(f"labels of the 32-token greedy completions, row for row: {same}/{block_n} the same")
        for name, found in labels.items():
            print(f"  {name:<18}" + " ".join(found))
        text += f"; bfloat16 products {rates['block, bfloat16'] / rates['block, float32']:.1f}× the float32 block's speed, " \
                f"{same}/{block_n} vectors labelled alike"
    else:
        seconds = software_bfloat16_steps(lm, block_n, 1 if args.quick else 3)
        ratio = seconds["bfloat16"] / seconds["float32"]
        print(f"no bfloat16 units: one {block_n}-row step (forward and backward), median of a few, side by side: "
              f"{seconds['bfloat16']:.2f} s with bfloat16 products against {seconds['float32']:.2f} s in float32 ({ratio:.0f}× slower)")
        text += f"; bfloat16 products in software {ratio:.0f}× slower per step (no bfloat16 units: --precision auto trains in float32 here)"
    summary_line(text)


def software_bfloat16_steps(lm, rows: int, repeats: int) -> dict[str, float]:
    """Median seconds of one discovery step (the loss and its gradient, ``rows`` vectors) per precision, alternating."""
    theta = random_orthogonal_block(rows, lm.d_model, 30.0, None, torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    problems = {
        precision: DiscoveryProblem(lm, prepare(lm, [DEFAULT_PROMPT], PromptFormat(), 8), DiscoverConfig(source=8, target=20, radius=30, precision=precision)
                                    .resolved(lm.n_layers, lm.d_model, radius=30, bfloat16_fast=False))
        for precision in times
    }
    for _ in range(repeats):
        for precision, problem in problems.items():
            x = theta.clone().requires_grad_(True)
            start = time.perf_counter()
            torch.autograd.grad(problem.training_losses(x).sum(), x)
            times[precision].append(time.perf_counter() - start)
    return {precision: sorted(values)[len(values) // 2] for precision, values in times.items()}


if __name__ == "__main__":
    main()
