"""Hardware utilisation of a MELBO-ortho fast-mode optimisation step on the embedded SmolLM2: the FLOPs the
step needs (forward and backward through layers s+1 … t for the block's rows and the prompt's tokens, counted
from the model's shapes) divided by its time, against a float32 matmul of similar shape timed in the same
process. Target ≥ 50 %. Also the process's peak memory.

FLOP count per token and layer (Llama-style block): 2·(d·q + 2·d·kv + q·d) for the attention projections,
4·T·q for the scores and the weighted sum, 6·d·ffn for the gated MLP. Backward: the weights are frozen, so
only input gradients are needed: 1× forward for the projections and the MLP, 2× for the attention scores.

    .venv/bin/python bench/utilisation.py --quick     # a few steps
    .venv/bin/python bench/utilisation.py             # 30 timed steps per block size
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from common import summary_line

from melbo.engines.config import Positions
from melbo.model.forward import prepare, target_residual
from melbo.model.loading import load_model
from melbo.model.prompts import DEFAULT_PROMPT, PromptFormat
from melbo.objectives import ortho_loss

SOURCE, TARGET = 8, 20


def step_flops(config, batch: int, tokens: int, layers: int) -> float:
    d, ffn = config.hidden_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or d // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    weights = 2 * (d * q + 2 * d * kv + q * d) + 6 * d * ffn
    scores = 4 * tokens * q
    forward = weights + scores
    backward = weights + 2 * scores
    return float(batch * tokens * layers * (forward + backward))


def time_it(fn, repeats: int, device: torch.device | None = None) -> float:
    """Seconds per call of fn after one warm-up call; on CUDA, waits for the device before each clock read."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats, blocks = (2, (16,)) if args.quick else (30, (1, 16, 64))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    lm = load_model("smollm2", device="cpu")
    state = prepare(lm, [DEFAULT_PROMPT], PromptFormat(), SOURCE)[0]
    sel = Positions("last:4").index(state.length)
    config = lm.model.config
    print(f"prompt tokens T = {state.length}, layers {SOURCE + 1}…{TARGET}, d_model {config.hidden_size}, ffn {config.intermediate_size}")
    print(f"{'block':>6}{'step (ms)':>11}{'GFLOP/step':>12}{'GFLOP/s':>10}{'matmul GFLOP/s':>16}{'utilisation':>13}")
    results = []
    for block in blocks:
        theta = torch.nn.Parameter(torch.randn(block, lm.d_model) * 30 / lm.d_model**0.5)
        z0 = torch.zeros(lm.d_model)

        def step(theta=theta, z0=z0):
            h = target_residual(lm.model, state, SOURCE, TARGET, theta)
            ortho_loss(h[:, sel].mean(dim=1), z0).sum().backward()
            theta.grad = None

        seconds = time_it(step, repeats)
        flops = step_flops(config, block, state.length, TARGET - SOURCE)
        a = torch.randn(block * state.length, config.hidden_size)
        w = torch.randn(config.hidden_size, config.intermediate_size)
        mm = time_it(lambda a=a, w=w: a @ w, max(10, repeats * 10))
        mm_rate = 2 * a.shape[0] * a.shape[1] * w.shape[1] / mm
        results.append((block, flops / seconds / mm_rate))
        print(f"{block:>6}{1000 * seconds:>11.1f}{flops / 1e9:>12.3f}{flops / seconds / 1e9:>10.2f}{mm_rate / 1e9:>16.2f}{100 * flops / seconds / mm_rate:>12.0f}%")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (max RSS): {peak_mib:.0f} MiB")
    block, share = results[-1] if len(results) == 1 else next(r for r in results if r[0] == 16)
    summary_line(f"a block-{block} step runs at {100 * share:.0f}% of a same-shape matmul's rate; peak memory {peak_mib:.0f} MiB; target ≥ 50%: {'met' if share >= 0.5 else 'missed'}")


if __name__ == "__main__":
    main()
