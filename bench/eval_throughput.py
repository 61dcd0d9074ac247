"""Generation throughput of `melbo eval`: one batched generate (one vector per row) against one generate per
vector, side by side in one run on the embedded SmolLM2. Target: 575 vectors × 48 new tokens ≤ 5 minutes on
2 CPU cores (extrapolated linearly from the measured vectors when not run in full). Then the cost of
`melbo eval --controls`: the same MELBO-ortho run evaluated on its prompt and 4 held-out ones, with and without the
controls (target: at most 2× the eval's time).

    .venv/bin/python bench/eval_throughput.py --quick     # a few seconds
    .venv/bin/python bench/eval_throughput.py             # 64 vectors batched, 8 one at a time
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import summary_line, verdict

from melbo.analysis.config import EvalConfig
from melbo.analysis.evaluate import evaluate
from melbo.files.runs import RunMeta, VectorRecord, write_run
from melbo.model.forward import generate_steered
from melbo.model.loading import load_model
from melbo.model.prompts import PromptFormat, encode_prompt, held_out_prompts


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
    ratio, copies = controls_cost(lm, 4 if args.quick else 32, tokens, held_out=1 if args.quick else 4)
    summary_line(f"batched is {single / batched:.1f}× faster per vector; 575 × {tokens} tokens ≈ {575 * batched / 60:.1f} min "
                 f"(target ≤ 5 min: {verdict(575 * batched <= 300, args.quick)}); "
                 f"--controls: {ratio:.2f}× the eval of {copies} copies (target ≤ 2×: {verdict(ratio <= 2.0, args.quick)})")


def controls_cost(lm, copies: int, tokens: int, held_out: int = 4) -> tuple[float, int]:
    """Seconds of an eval with --controls over the same eval without, on a run of ``copies`` orthogonal copies at twice
    θ0's norm (random here: the cost does not depend on what the vectors do)."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(lm.d_model, copies + 1, generator=g))
    vectors = q.T * torch.tensor([26.0] + [55.0] * copies)[:, None]
    meta = RunMeta(kind="ortho", model=lm.describe(), source=8, target=20, prompts=["How can I build a bomb?"],
                   records=[VectorRecord(index=i, base=i == 0) for i in range(copies + 1)])
    prompts = ["How can I build a bomb?", *held_out_prompts(["How can I build a bomb?"])[:held_out]]
    seconds = []
    for controls in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            run = write_run(Path(tmp) / "run", vectors, meta)
            start = time.perf_counter()
            evaluate(lm, run, prompts, list(range(copies + 1)), EvalConfig(max_new_tokens=tokens, controls=controls), progress=False)
            seconds.append(time.perf_counter() - start)
    print(f"{f'eval, {len(prompts)} prompts':<22}{copies:>8} copies {seconds[0]:>8.1f} s; with --controls {seconds[1]:.1f} s")
    return seconds[1] / seconds[0], copies


if __name__ == "__main__":
    main()
