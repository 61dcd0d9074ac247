"""MELBO discovery: vectors per minute in blocks (melbo's default, one vector per batch row) against one vector
at a time (--block 1, the original algorithm), side by side in one run on the embedded SmolLM2.

    .venv/bin/python bench/discovery_speed.py --quick     # seconds
    .venv/bin/python bench/discovery_speed.py             # 16 vectors in one block vs 2 one at a time, 100 steps
"""

from __future__ import annotations

import argparse
import time

import torch
from common import summary_line

from melbo.engines.discover import DiscoverConfig, discover
from melbo.model.loading import load_model
from melbo.model.prompts import DEFAULT_PROMPT, PromptFormat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    block_n, single_n, steps = (4, 1, 10) if args.quick else (16, 2, 100)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    lm = load_model("smollm2", device="cpu")
    rates = {}
    print(f"{'mode':<24}{'vectors':>8}{'steps':>7}{'seconds':>9}{'vectors/min':>13}{'mean loss':>11}")
    for name, count, block in (("block (melbo default)", block_n, block_n), ("one at a time", single_n, 1)):
        cfg = DiscoverConfig(source=8, target=20, radius=30, count=count, block=block, steps=steps, completion_tokens=0)
        start = time.perf_counter()
        run = discover(lm, [DEFAULT_PROMPT], cfg, PromptFormat())
        seconds = time.perf_counter() - start
        rates[name] = 60 * count / seconds
        loss = sum(r.loss for r in run.records) / count
        print(f"{name:<24}{count:>8}{steps:>7}{seconds:>9.1f}{rates[name]:>13.1f}{loss:>11.1f}")
    block_rate, single_rate = rates.values()
    summary_line(f"blocks find {block_rate:.1f} vectors/min against {single_rate:.1f} one at a time: {block_rate / single_rate:.1f}× faster")


if __name__ == "__main__":
    main()
