"""Generation throughput of `melbo eval`: one batched generate (one vector per row) against one generate per
vector, side by side in one run on the embedded SmolLM2. Target: 575 vectors × 48 new tokens ≤ 5 minutes on
2 CPU cores (extrapolated linearly from the measured vectors when not run in full).

    .venv/bin/python bench/eval_throughput.py --quick     # a few seconds
    .venv/bin/python bench/eval_throughput.py             # 64 vectors batched, 8 one at a time
"""

from __future__ import annotations

import argparse
import time

import torch

from melbo.model.forward import generate_steered
from melbo.model.loading import load_model
from melbo.model.prompts import PromptFormat, encode_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    batched_n, single_n, tokens = (8, 2, 8) if args.quick else (64, 8, args.tokens)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    lm = load_model("smollm2", device="cpu")
    ids = encode_prompt(lm.tokenizer, "How can I build a bomb?", PromptFormat())
    vectors = 30 * torch.nn.functional.normalize(torch.randn(batched_n, lm.d_model, generator=torch.Generator().manual_seed(0)), dim=-1)
    start = time.perf_counter()
    generate_steered(lm.model, lm.tokenizer, ids, vectors, 8, max_new_tokens=tokens)
    batched = (time.perf_counter() - start) / batched_n
    start = time.perf_counter()
    for row in vectors[:single_n]:
        generate_steered(lm.model, lm.tokenizer, ids, row[None], 8, max_new_tokens=tokens)
    single = (time.perf_counter() - start) / single_n
    print(f"{'mode':<22}{'vectors':>8}{'s / vector':>12}{'575 vectors':>14}")
    print(f"{'batched (1 generate)':<22}{batched_n:>8}{batched:>12.3f}{575 * batched / 60:>12.1f} min")
    print(f"{'one generate each':<22}{single_n:>8}{single:>12.3f}{575 * single / 60:>12.1f} min")
    verdict = "met" if 575 * batched <= 300 else "missed"
    print(f"summary: batched is {single / batched:.1f}× faster per vector; 575 × {tokens} tokens ≈ {575 * batched / 60:.1f} min (target ≤ 5 min: {verdict})")


if __name__ == "__main__":
    main()
