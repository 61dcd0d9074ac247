"""Hardware utilisation of a MELBO-ortho fast-mode optimisation step on the embedded SmolLM2: the FLOP floor of the
step (forward and input-gradient backward of exactly what the objective needs, counted from the model's shapes)
divided by the step's time, against a float32 matmul of similar shape timed in the same process. Target ≥ 50 %.
Also the fast paths of melbo.model.fastpath side by side (a kl step with and without them, float32 and
--precision bfloat16), the default objective's five chat prompts run one by one or packed into one sequence
(:func:`packing`), a block with or without its warm-up on the run's prompt alone (:func:`warmup`), the process's peak memory, and (full run only) how many of a block's evaluations its rows need: each row's loss
after each evaluation against its final one, for copies of a discovered base (the case for a per-row early stop), and
whether a start better than a random direction exists (:func:`starts`).

Objectives: the default (``kl``: layers s+1 … L−1 over the prompt and θ0's 16 continuation tokens, the LM head at the
last 20 positions), ``fisher`` (the same layers, no LM head: a d × d quadratic form per position) and melbo 0.1's
``mean`` (layers s+1 … t over the prompt alone).

FLOP count per token and layer (Llama-style block): 2·(d·q + 2·d·kv + q·d) for the attention projections,
4·T·q for the scores and the weighted sum, 6·d·ffn for the gated MLP; the LM head 2·V·d per position it runs at.
Backward: the weights are frozen, so only input gradients are needed: 1× forward for the projections, the MLP and the
head, 2× for the attention scores.

Every measurement runs eagerly (``--compile off``, as they did before it existed) but ``--compile``'s and ``--blocks``' own.

    .venv/bin/python bench/utilisation.py --quick     # a few steps
    .venv/bin/python bench/utilisation.py             # 10 timed steps per objective and block size
    .venv/bin/python bench/utilisation.py --packing   # the default objective's five prompts packed or not, block 16
    .venv/bin/python bench/utilisation.py --gemma-kl  # Gemma 3 270M: the KL through a log-softmax or from the logits
    .venv/bin/python bench/utilisation.py --warmup    # the default's block: 30 evaluations on all five prompts or a warm-up
    .venv/bin/python bench/utilisation.py --compile   # a block-16 step eager against --compile on (blocks s+1 … L and the KL compiled)
    .venv/bin/python bench/utilisation.py --kl-chunks # melbo's KL from the logits against the same in chunks (not taken)
    .venv/bin/python bench/utilisation.py --default   # the default objective's two evaluations against their FLOP floor, and a block's
    .venv/bin/python bench/utilisation.py --kl-top    # kl against kl-top on SmolLM2 (49k tokens), Gemma 3 270M (262k) and Qwen2.5 0.5B (152k): the default by vocabulary
    .venv/bin/python bench/utilisation.py --blocks    # a whole-basis block's time per copy by its rows (16, 32, 64) on the three models
    .venv/bin/python bench/utilisation.py --floors    # the whole basis's FLOP floor on this CPU: SmolLM2, Gemma 3 270M, a Qwen2 0.5B's shapes
"""

from __future__ import annotations

import argparse
import resource
import time
from types import SimpleNamespace

import torch
from common import summary_line, verdict

from melbo.engines.config import OrthoConfig, Positions
from melbo.engines.ortho import objective
from melbo.model.forward import prepare
from melbo.model.loading import load_model
from melbo.model.prompts import DEFAULT_PROMPT, PromptFormat

SOURCE, TARGET = 8, 20


def step_flops(config, batch: int, tokens: int, layers: int) -> float:
    """Forward + input-gradient backward of ``layers`` decoder blocks over ``tokens`` tokens for ``batch`` rows."""
    d, ffn = config.hidden_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or d // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    weights = 2 * (d * q + 2 * d * kv + q * d) + 6 * d * ffn
    scores = 4 * tokens * q
    return float(batch * tokens * layers * (2 * weights + 3 * scores))


def floor_flops(config, match: str, batch: int, tokens: int, positions: int, n_layers: int) -> float:
    """What the objective needs at the least: its layers, plus the LM head (kl) or the quadratic form (fisher)."""
    d, vocab = config.hidden_size, config.vocab_size
    if match == "mean":
        return step_flops(config, batch, tokens, TARGET - SOURCE)
    layers = step_flops(config, batch, tokens, n_layers - 1 - SOURCE)
    per_position = 2 * vocab * d if match == "kl" else 2 * d * d
    return layers + 2.0 * batch * positions * per_position


def time_it(fn, repeats: int, device: torch.device | None = None) -> float:
    """Seconds per call of fn over ``repeats`` calls after one warm-up call; ``repeats`` 0: one call, timed cold (the
    --quick smoke tests' reading: a figure that only shows the code ran). On CUDA, waits for the device before each
    clock read."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    if repeats > 0:
        fn()
        sync()
    calls = max(1, repeats)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls


def matmul_rate(config, rows: int, repeats: int) -> float:
    """FLOP/s of a float32 matmul shaped like a step's MLP product: ``(rows, d) @ (d, ffn)``, the rate a floor is read at."""
    a, w = torch.randn(rows, config.hidden_size), torch.randn(config.hidden_size, config.intermediate_size)
    return 2 * a.shape[0] * a.shape[1] * w.shape[1] / time_it(lambda: a @ w, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--packing", action="store_true", help="only the default objective's prompts, packed or not (block 16)")
    parser.add_argument("--gemma-kl", action="store_true", help="only the KL before and from the logits on Gemma 3 270M (block 16)")
    parser.add_argument("--warmup", action="store_true", help="only the default's block with or without its warm-up (block 16)")
    parser.add_argument("--compile", action="store_true", help="only a step eager against --compile on (blocks s+1 … L and the KL compiled; block 16)")
    parser.add_argument("--kl-chunks", action="store_true", help="only the KL's passes over the logits in one piece or in chunks (block 16)")
    parser.add_argument("--kl-top", action="store_true", help="only kl against kl-top on SmolLM2, Gemma 3 270M and Qwen2.5 0.5B where they can be had (block 16): fast mode's match by vocabulary")
    parser.add_argument("--floors", action="store_true", help="only the whole basis's FLOP floor at this CPU's matmul rate: SmolLM2, Gemma 3 270M and the shapes of a Qwen2 0.5B")
    parser.add_argument("--blocks", action="store_true", help="only a whole-basis block's time per copy at 16, 32 and 64 rows (evaluations and completions) on SmolLM2, Gemma 3 270M and Qwen2.5 0.5B where they can be had")
    parser.add_argument("--default", action="store_true", help="only the default objective's evaluations (warm-up, packed) against their floor (block 16)")
    args = parser.parse_args()
    if args.gemma_kl:
        summary_line(gemma_kl(3))
        return
    repeats, blocks, matches = (0, (4,), ("kl", "fisher")) if args.quick else (10, (1, 16, 64), ("kl", "fisher", "mean"))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    lm = load_model("smollm2", device="cpu")
    config = lm.model.config
    base = seeded_base(lm.d_model, 26.6)
    for option, (measure, repeats_each) in ONLY.items():  # one measurement alone, block 16
        if getattr(args, option):
            summary_line(measure(lm, base, 16, repeats_each))
            return
    prompt_tokens = prepare(lm, [DEFAULT_PROMPT], PromptFormat(), SOURCE)[0].length
    print(f"prompt tokens T = {prompt_tokens}, source layer {SOURCE}, d_model {config.hidden_size}, ffn {config.intermediate_size}, "
          f"vocabulary {config.vocab_size}, {lm.n_layers} layers")
    print(f"{'objective':<10}{'block':>6}{'step (ms)':>11}{'GFLOP floor':>13}{'GFLOP/s':>10}{'matmul GFLOP/s':>16}{'utilisation':>13}")
    results: dict[tuple[str, int], tuple[float, float]] = {}
    for match in matches:
        cfg = OrthoConfig(compile="off", source=SOURCE, target=TARGET, extra_prompts=0, precision="float32", match=match, **({"continuation": 0} if match == "mean" else {}))
        settings = cfg.resolved(float(base.norm()), lm.d_model, lm.n_layers)
        loss = objective(lm, base, [DEFAULT_PROMPT], cfg)
        tokens = prompt_tokens + settings.continuation
        positions = tokens - Positions(settings.positions).index(tokens).start
        for block in blocks:
            theta = torch.nn.Parameter(torch.randn(block, lm.d_model) * 50 / lm.d_model**0.5)

            def step(theta=theta, loss=loss):
                loss(theta).sum().backward()
                theta.grad = None

            seconds = time_it(step, repeats)
            flops = floor_flops(config, match, block, tokens, positions, lm.n_layers)
            mm_rate = matmul_rate(config, block * tokens, max(10, repeats * 10))
            results[(match, block)] = (seconds, flops / seconds / mm_rate)
            print(f"{match:<10}{block:>6}{1000 * seconds:>11.1f}{flops / 1e9:>13.3f}{flops / seconds / 1e9:>10.2f}{mm_rate / 1e9:>16.2f}"
                  f"{100 * flops / seconds / mm_rate:>12.0f}%")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (max RSS): {peak_mib:.0f} MiB")
    # quick: one row, one round (a smoke test; on a CPU without bfloat16 units a block-4 bfloat16 step takes ~25 s)
    paths = fast_paths(lm, base, 1, repeats, rounds=1) if args.quick else fast_paths(lm, base, 16, repeats)
    packed = packing(lm, base, 4, repeats, rounds=1, precisions=("float32",)) if args.quick else packing(lm, base, 16, 3)
    warm = warmup(lm, base, 4, repeats, rounds=1) if args.quick else warmup(lm, base, 16, 3)
    converged = "" if args.quick else convergence(lm)
    block = 16 if ("kl", 16) in results else blocks[0]
    (kl_s, share), (fisher_s, _) = results[("kl", block)], results[("fisher", block)]
    summary_line(f"a block-{block} step of the default objective (kl) runs at {100 * share:.0f}% of its FLOP floor at a same-shape matmul's rate; "
                 f"fisher's step takes {fisher_s / kl_s:.2f}× its time; peak memory {peak_mib:.0f} MiB; target ≥ 50%: {verdict(share >= 0.5, args.quick)}"
                 f"; {paths}; {packed}; {warm}{converged}")


def packing(lm, base, block: int, repeats: int, rounds: int = 2, precisions: tuple[str, ...] = ("float32", "bfloat16")) -> str:
    """The default objective's five prompts (the run's and 4 shipped ones, chat template) side by side: as melbo ran
    them until 2026-12-03 (one forward each, the KL through a log-softmax over the vocabulary), one by one with the KL
    from the logits (objectives.kl_from_logits), and packed into one sequence (melbo.model.packing); float32 and
    --precision bfloat16, alternating, best of two rounds."""
    import melbo.engines.ortho as ortho_engine
    from melbo.objectives import kl_from_logits

    ways = {"before": (kl_through_log_softmax, False), "one by one": (kl_from_logits, False), "packed": (kl_from_logits, True)}
    times: dict[tuple[str, str], float] = {}
    tokens = {}
    # one objective per precision, built as melbo builds it; each way swaps the KL and the packing in for its steps only
    losses = {precision: objective(lm, base, [DEFAULT_PROMPT], OrthoConfig(compile="off", source=SOURCE, target=TARGET, precision=precision))
              for precision in precisions}
    packings = {precision: loss.__self__.packing for precision, loss in losses.items()}
    assert all(p is not None for p in packings.values()), "the default objective's prompts were not packed"
    try:
        for _ in range(rounds):
            for precision in precisions:
                for name, (kl, packed) in ways.items():
                    ortho_engine.kl_from_logits = kl
                    loss, whole = losses[precision], packings[precision]
                    problem = loss.__self__
                    tokens[name] = whole.state.length if packed else sum(t.length for t in problem.targets)
                    problem.packing = whole if packed else None
                    seconds = step_seconds(loss, block, lm.d_model, 26.6, repeats)
                    times[(precision, name)] = min(seconds, times.get((precision, name), seconds))
    finally:
        ortho_engine.kl_from_logits = kl_from_logits
    print(f"the default objective (run's prompt + 4 shipped, chat template), a block-{block} step, best of {rounds} round(s) side by side; "
          f"tokens per row: {tokens['one by one']} one by one, {tokens['packed']} packed")
    print(f"{'precision':<11}" + "".join(f"{name + ' (ms)':>17}" for name in ways) + f"{'packed / before':>17}")
    for precision in precisions:
        row = [times[(precision, name)] for name in ways]
        print(f"{precision:<11}" + "".join(f"{1000 * t:>17.1f}" for t in row) + f"{row[2] / row[0]:>17.2f}")
    return "the default objective's step packed: " + ", ".join(
        f"{times[(precision, 'packed')] / times[(precision, 'before')]:.2f}× its time before in {precision}" for precision in precisions)


def warmup(lm, base, block: int, repeats: int, rounds: int = 2) -> str:
    """The default objective's evaluation (float32) on the run's prompt alone (the warm-up's) and on all five prompts,
    packed, alternating, best of ``rounds``; and so a default block's evaluations: 30 on all five (melbo until
    2026-12-04) against the warm-up and then 15 on all five (engines.config.FAST_WARMUP, STEPS_AFTER_WARMUP)."""
    import functools

    from melbo.engines.config import FAST_WARMUP, STEPS_AFTER_WARMUP, STEPS_FAST_KL

    losses = objective(lm, base, [DEFAULT_PROMPT], OrthoConfig(compile="off", source=SOURCE, target=TARGET, precision="float32"))
    ways = {"run's prompt alone": functools.partial(losses, own_only=True), "all five, packed": losses}
    times: dict[str, float] = {}
    for _ in range(rounds):
        for name, loss in ways.items():
            seconds = step_seconds(loss, block, lm.d_model, 26.6, repeats)
            times[name] = min(seconds, times.get(name, seconds))
    own, every = times["run's prompt alone"], times["all five, packed"]
    before, now = STEPS_FAST_KL * every, FAST_WARMUP * own + STEPS_AFTER_WARMUP * every
    print(f"the default objective, a block-{block} evaluation, best of {rounds} round(s) side by side, float32")
    print(f"{'run prompt alone (ms)':>22}{'all five (ms)':>15}{'ratio':>7}{f'{STEPS_FAST_KL} on all five (s)':>21}"
          f"{f'{FAST_WARMUP} + {STEPS_AFTER_WARMUP} (s)':>12}{'block ratio':>13}")
    print(f"{1000 * own:>22.1f}{1000 * every:>15.1f}{own / every:>7.2f}{before:>21.1f}{now:>12.1f}{now / before:>13.2f}")
    return (f"an evaluation on the run's prompt alone takes {own / every:.2f}× one on all five; a default block with its warm-up "
            f"({FAST_WARMUP} + {STEPS_AFTER_WARMUP}) {now / before:.2f}× the time of {STEPS_FAST_KL} on all five")


def default_floor(lm, base, block: int, repeats: int, rounds: int = 2) -> str:
    """melbo's default objective (float32) as a block runs it: the warm-up's evaluation on the run's prompt alone and the
    evaluation on all five prompts, packed; each against its FLOP floor (:func:`floor_flops` over the tokens it runs and
    the positions its KL covers) at the rate of a same-shape matmul timed beside it; then a default block (FAST_WARMUP +
    STEPS_AFTER_WARMUP evaluations) measured that way and at the floor, and the demo's 32 copies (two blocks)."""
    import functools

    from melbo.engines.config import FAST_WARMUP, STEPS_AFTER_WARMUP

    config = lm.model.config
    losses = objective(lm, base, [DEFAULT_PROMPT], OrthoConfig(compile="off", source=SOURCE, target=TARGET, precision="float32"))
    problem = losses.__self__
    assert problem.packing is not None, "the default objective's prompts were not packed"
    shapes = {  # name → (loss, tokens a row runs, positions the KL covers)
        "run's prompt alone": (functools.partial(losses, own_only=True), problem.targets[0].length, len(range(problem.targets[0].length)[problem.wheres[0]])),
        "all five, packed": (losses, problem.packing.state.length, len(problem.packed_rows)),
    }
    rows: dict[str, tuple[float, float, float]] = {}
    for _ in range(rounds):
        for name, (loss, tokens, positions) in shapes.items():
            seconds = step_seconds(loss, block, lm.d_model, 26.6, repeats)
            rate = matmul_rate(config, block * tokens, 10 * repeats)
            flops = floor_flops(config, "kl", block, tokens, positions, lm.n_layers)
            if name not in rows or seconds < rows[name][0]:
                rows[name] = (seconds, flops, rate)
    print(f"melbo's default objective, a block-{block} evaluation (float32), best of {rounds} rounds; floor: forward and input-gradient "
          "backward of blocks s+1 … L over the tokens and the LM head at the KL's positions, at a same-shape matmul's rate")
    print(f"{'evaluation':<22}{'tokens':>7}{'KL at':>7}{'step (ms)':>11}{'GFLOP floor':>13}{'GFLOP/s':>9}{'matmul GFLOP/s':>16}"
          f"{'floor (ms)':>12}{'utilisation':>13}")
    for name, (_, tokens, positions) in shapes.items():
        seconds, flops, rate = rows[name]
        print(f"{name:<22}{tokens:>7}{positions:>7}{1000 * seconds:>11.1f}{flops / 1e9:>13.1f}{flops / seconds / 1e9:>9.1f}"
              f"{rate / 1e9:>16.1f}{1000 * flops / rate:>12.1f}{100 * flops / rate / seconds:>12.0f}%")
    own, every = rows["run's prompt alone"], rows["all five, packed"]
    measured = FAST_WARMUP * own[0] + STEPS_AFTER_WARMUP * every[0]
    floor = FAST_WARMUP * own[1] / own[2] + STEPS_AFTER_WARMUP * every[1] / every[2]
    print(f"a default block ({FAST_WARMUP} + {STEPS_AFTER_WARMUP} evaluations): {measured:.1f} s of evaluations, {floor:.1f} s at the floor; "
          f"the demo's 32 copies (two blocks): {2 * measured:.0f} s and {2 * floor:.0f} s")
    return (f"the default objective's evaluations run at {100 * own[1] / own[2] / own[0]:.0f}% (run's prompt alone) and "
            f"{100 * every[1] / every[2] / every[0]:.0f}% (all five, packed) of their floor at a same-shape matmul's rate; "
            f"the demo's 32 copies: {2 * measured:.0f} s of evaluations, {2 * floor:.0f} s at the floor")


def kl_chunks(lm, base, block: int, repeats: int, rounds: int = 2) -> str:
    """A default kl evaluation (float32) with melbo's KL from the logits (objectives.kl_from_logits: its logsumexp and
    softmax over the whole logits tensor at once) against :func:`chunked_kl` (the same maths a few positions at a time,
    CHUNKS values a piece, so each pass over the logits might stay in the cache), alternating, best of ``rounds``:
    SmolLM2's on the run's prompt alone and on all five, packed; Gemma 3 270M's on its raw prompt (262k tokens a
    position) where it can be had. Measured, not taken (bench/RESULTS.md utilisation)."""
    import functools

    from models import Unavailable, load

    import melbo.engines.ortho as ortho_engine
    from melbo.objectives import kl_from_logits

    cases = {}
    losses = objective(lm, base, [DEFAULT_PROMPT], OrthoConfig(compile="off", source=SOURCE, target=TARGET, precision="float32"))
    cases["SmolLM2, run's prompt alone"] = (functools.partial(losses, own_only=True), lm.d_model, 26.6)
    cases["SmolLM2, all five packed"] = (losses, lm.d_model, 26.6)
    try:
        gemma = load("gemma")[0]
        cases["Gemma 3 270M, raw prompt"] = (gemma_objective(gemma), gemma.d_model, GEMMA_NORM)
    except Unavailable as why:
        print(f"Gemma 3 270M left out: {why}")
    ways = {"one piece (melbo)": kl_from_logits, **{f"{size} values": functools.partial(chunked_kl, chunk=size) for size in CHUNKS}}
    times: dict[tuple[str, str], float] = {}
    try:
        for _ in range(rounds):
            for way, kl in ways.items():
                ortho_engine.kl_from_logits = kl
                for name, (loss, d, norm) in cases.items():
                    seconds = step_seconds(loss, block, d, norm, repeats)
                    times[(way, name)] = min(seconds, times.get((way, name), seconds))
    finally:
        ortho_engine.kl_from_logits = kl_from_logits
    melbo = "one piece (melbo)"
    print(f"a block-{block} kl evaluation (float32), best of {rounds} rounds side by side: the KL's passes over the logits "
          "in one piece or in chunks of N values (ms, and the ratio to one piece)")
    print(f"{'KL':<18}" + "".join(f"{name:>30}{'ratio':>7}" for name in cases))
    for way in ways:
        print(f"{way:<18}" + "".join(f"{1000 * times[(way, name)]:>30.1f}{times[(way, name)] / times[(melbo, name)]:>7.2f}" for name in cases))
    return "the KL in chunks of {} values: {}".format(
        " / ".join(str(size) for size in CHUNKS),
        ", ".join(f"{name} " + " / ".join(f"{times[(f'{size} values', name)] / times[(melbo, name)]:.2f}" for size in CHUNKS) + "× its time in one piece"
                  for name in cases))


CHUNKS = (1 << 18, 1 << 20, 1 << 22)  # logits per piece of chunked_kl: 1, 4 and 16 MiB in float32


def chunked_kl(logits, log_probs_base, chunk: int, fused: bool = False):
    """objectives.kl_from_logits with its logsumexp (forward) and softmax (backward) run over ``chunk`` logits at a time
    (a few positions of one row), writing the gradient into one preallocated tensor."""
    from melbo.objectives import _neg_entropy

    class Chunked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, probs_base, neg_entropy):
            pieces = _pieces(logits, chunk)
            lse = logits.new_empty(logits.shape[:-1])
            for b, where in pieces:
                lse[b, where] = torch.logsumexp(logits[b, where], dim=-1)
            ctx.save_for_backward(logits, probs_base, lse)
            return neg_entropy - torch.einsum("bpv,pv->bp", logits, probs_base) + lse

        @staticmethod
        def backward(ctx, grad):
            logits, probs_base, lse = ctx.saved_tensors
            out = torch.empty_like(logits, memory_format=torch.contiguous_format)
            for b, where in _pieces(logits, chunk):
                piece = out[b, where]
                torch.sub(logits[b, where], lse[b, where, None], out=piece)
                piece.exp_().sub_(probs_base[where]).mul_(grad[b, where, None])
            return out, None, None

    return Chunked.apply(logits, log_probs_base.exp(), _neg_entropy(log_probs_base))


def _pieces(logits, chunk: int):
    rows, positions, vocabulary = logits.shape
    step = max(1, chunk // vocabulary)
    return [(b, slice(p, p + step)) for b in range(rows) for p in range(0, positions, step)]


def seeded_base(d_model: int, norm: float) -> torch.Tensor:
    """The random base the timings use: a fixed-seed direction of norm ``norm``."""
    base = torch.randn(d_model, generator=torch.Generator().manual_seed(0))
    return norm * base / base.norm()


GEMMA_NORM = 67.0  # ‖θ0‖ of the random base the Gemma 3 270M timings use (gemma_kl, kl_chunks)


def gemma_objective(lm, match: str = "kl"):
    """Gemma 3 270M's ``match`` objective (layers 5 → 12, float32) on its raw prompt, for a random base of norm
    GEMMA_NORM (fixed seed): one prompt, nothing packed."""
    from models import GEMMA_PROMPT

    return objective(lm, seeded_base(lm.d_model, GEMMA_NORM), [GEMMA_PROMPT],
                     OrthoConfig(compile="off", source=5, target=12, match=match, precision="float32"), PromptFormat(chat_template=False))


QWEN_NORM = 8.0  # ‖θ0‖ of the random base the Qwen2.5 0.5B timings use: about auto R there (8.03)


def qwen_objective(lm, fmt: PromptFormat, match: str):
    """Qwen2.5 0.5B's ``match`` objective as the whole basis runs it (layers 7 → 16, the run's prompt alone with its
    chat template, float32) for a random base of norm QWEN_NORM (fixed seed)."""
    from models import FETCHED

    return objective(lm, seeded_base(lm.d_model, QWEN_NORM), [FETCHED["qwen"].prompt],
                     OrthoConfig(compile="off", source=7, target=16, match=match, precision="float32", extra_prompts=0), fmt)


def kl_top(lm, base, block: int, repeats: int, rounds: int = 2) -> str:
    """Why fast mode's match is kl on SmolLM2 and kl-top from KL_TOP_VOCAB tokens (engines.config.fast_match): a
    block-``block`` evaluation (float32) with each, alternating, best of ``rounds``, on SmolLM2 (49k tokens; the default
    objective, on the run's prompt alone and on all five packed), on Gemma 3 270M (262k; its raw prompt) and on Qwen2.5
    0.5B (152k; its chat prompt alone, as the whole basis runs it) where they can be had; with the LM head rows each
    runs on and kl-top's loss against kl's on the same rows."""
    import functools

    from models import Unavailable, load

    cases = {}  # name → ({match: loss}, d, norm)
    smol = {m: objective(lm, base, [DEFAULT_PROMPT], OrthoConfig(compile="off", source=SOURCE, target=TARGET, precision="float32", match=m)) for m in ("kl", "kl-top")}
    cases[f"SmolLM2 ({lm.plain_head_vocab:,}), run's prompt alone"] = ({m: functools.partial(f, own_only=True) for m, f in smol.items()}, lm.d_model, 26.6)
    cases[f"SmolLM2 ({lm.plain_head_vocab:,}), all five packed"] = (smol, lm.d_model, 26.6)
    try:
        gemma = load("gemma")[0]
        cases[f"Gemma 3 270M ({gemma.plain_head_vocab:,}), raw prompt"] = ({m: gemma_objective(gemma, m) for m in ("kl", "kl-top")}, gemma.d_model, GEMMA_NORM)
    except Unavailable as why:
        print(f"Gemma 3 270M left out: {why}")
    try:
        qwen, qwen_format = load("qwen")
        cases[f"Qwen2.5 0.5B ({qwen.plain_head_vocab:,}), run's prompt alone"] = (
            {m: qwen_objective(qwen, qwen_format, m) for m in ("kl", "kl-top")}, qwen.d_model, QWEN_NORM)
    except Unavailable as why:
        print(f"Qwen2.5 0.5B left out: {why}")
    times: dict[tuple[str, str], float] = {}
    for _ in range(rounds):
        for name, (losses, d, norm) in cases.items():
            for match, loss in losses.items():
                seconds = step_seconds(loss, block, d, norm, repeats)
                times[(name, match)] = min(seconds, times.get((name, match), seconds))
    print(f"a block-{block} evaluation (float32), kl against kl-top, best of {rounds} rounds side by side; head rows: the LM head's rows "
          "each batch row's KL runs on (kl: positions × vocabulary; kl-top: each position's own likeliest tokens, summed); "
          "loss: kl-top's against kl's on the same random rows (median ratio)")
    print(f"{'objective':<48}{'kl (ms)':>10}{'kl-top (ms)':>13}{'ratio':>7}{'head rows kl':>14}{'kl-top':>11}{'loss':>7}")
    ratios = []
    for name, (losses, d, norm) in cases.items():
        theta = torch.randn(block, d, generator=torch.Generator().manual_seed(0)) * norm / d**0.5
        with torch.no_grad():
            agree = float((losses["kl-top"](theta) / losses["kl"](theta)).median())
        problem = getattr(losses["kl-top"], "func", losses["kl-top"]).__self__
        own_only = getattr(losses["kl-top"], "keywords", {}).get("own_only", False)
        tops = problem.tops[: problem.own] if own_only else problem.tops  # the run's prompt alone: its own target only
        kept = sum(sum(top.counts) for top in tops)
        every = sum(len(top.counts) for top in tops) * problem.lm.plain_head_vocab
        ratio = times[(name, "kl-top")] / times[(name, "kl")]
        ratios.append(f"{name} {ratio:.2f}×")
        print(f"{name:<48}{1000 * times[(name, 'kl')]:>10.1f}{1000 * times[(name, 'kl-top')]:>13.1f}{ratio:>7.2f}{every:>14,}{kept:>11,}{agree:>7.3f}")
    return "a kl-top evaluation takes " + ", ".join(ratios) + " kl's time"


def kl_through_log_softmax(logits, log_probs_base, fused: bool = False):
    """The KL per position as melbo computed it until 2026-12-03 (autograd through a log-softmax over the vocabulary):
    the "before" of :func:`packing` and :func:`gemma_kl`."""
    log_probs = torch.log_softmax(logits, dim=-1)
    return (log_probs_base.exp() * (log_probs_base - log_probs)).sum(dim=-1)


def gemma_kl(repeats: int, block: int = 16) -> str:
    """On Gemma 3 270M (262k-token vocabulary; raw prompt, so the default trains on it alone, no packing), a default
    kl step with the KL through a log-softmax (melbo until 2026-12-03) and from the logits, alternating, best of two."""
    from models import load

    import melbo.engines.ortho as ortho_engine
    from melbo.objectives import kl_from_logits

    lm = load("gemma")[0]
    times: dict[str, float] = {}
    try:
        for _ in range(2):
            for name, kl in (("before", kl_through_log_softmax), ("from the logits", kl_from_logits)):
                ortho_engine.kl_from_logits = kl
                loss = gemma_objective(lm)
                seconds = step_seconds(loss, block, lm.d_model, GEMMA_NORM, repeats)
                times[name] = min(seconds, times.get(name, seconds))
    finally:
        ortho_engine.kl_from_logits = kl_from_logits
    print(f"Gemma 3 270M, layers 5 → 12, match kl, a block-{block} step (raw prompt: one prompt, nothing packed), best of two rounds")
    print(f"{'before (ms)':>12}{'from the logits (ms)':>22}{'ratio':>8}")
    ratio = times["from the logits"] / times["before"]
    print(f"{1000 * times['before']:>12.1f}{1000 * times['from the logits']:>22.1f}{ratio:>8.2f}")
    return f"Gemma 3 270M: a kl step with the KL from the logits takes {ratio:.2f}× its time before"


def step_seconds(loss, block: int, d: int, norm: float, repeats: int) -> float:
    """Seconds per evaluation of ``loss`` and its gradient on ``block`` random rows of about ``norm`` (fixed seed)."""
    theta = torch.nn.Parameter(torch.randn(block, d, generator=torch.Generator().manual_seed(0)) * norm / d**0.5)

    def step() -> None:
        loss(theta).sum().backward()
        theta.grad = None

    return time_it(step, repeats)


def compiled(lm, base, block: int, repeats: int, rounds: int = 2) -> str:
    """melbo's --compile (the blocks an evaluation runs and its KL compiled: melbo.model.fastpath.compiled_blocks,
    objectives.kl_from_logits fused) against the same step eager, side by side, best of ``rounds`` alternated rounds, on
    three objectives: the default (five prompts packed, float32) and the run's prompt alone (the whole basis's) in
    float32 and with bfloat16 products. The first compiled call's time (tracing and C++ compilation of the forward and
    the backward; less where inductor's on-disk cache holds them) is the compile cost, paid per process and shape."""
    cases = {
        "five prompts, float32": dict(precision="float32"),
        "run's prompt, float32": dict(extra_prompts=0, precision="float32"),
        "run's prompt, bfloat16": dict(extra_prompts=0, precision="bfloat16"),
    }
    print(f"a block-{block} step, eager against --compile on (torch {torch.__version__}), best of {rounds} rounds side by side")
    print(f"{'objective':<24}{'eager (ms)':>12}{'compiled (ms)':>15}{'ratio':>8}{'compiling (s)':>15}")
    from melbo.model.fastpath import kept_heap

    ratios = []
    for name, options in cases.items():
        with kept_heap():  # as a run's evaluations are (melbo.engines.ortho)
            ratios.append(_compiled_case(lm, base, block, repeats, rounds, name, options))
    return "--compile on: " + ", ".join(f"{name} {r:.2f}× eager's step" for name, r in zip(cases, ratios))


def _compiled_case(lm, base, block: int, repeats: int, rounds: int, name: str, options: dict) -> float:
    """One row of :func:`compiled`: its ratio, compiled to eager."""
    losses = {mode: objective(lm, base, [DEFAULT_PROMPT], OrthoConfig(source=SOURCE, target=TARGET, compile=mode, **options)) for mode in ("off", "on")}
    theta = torch.nn.Parameter(torch.randn(block, lm.d_model) * 26.6 / lm.d_model**0.5)
    start = time.perf_counter()
    losses["on"](theta).sum().backward()  # the first call compiles
    compiling = time.perf_counter() - start
    times: dict[str, float] = {}
    for _ in range(rounds):
        for mode in ("off", "on"):
            seconds = step_seconds(losses[mode], block, lm.d_model, 26.6, repeats)
            times[mode] = min(seconds, times.get(mode, seconds))
    ratio = times["on"] / times["off"]
    print(f"{name:<24}{1000 * times['off']:>12.1f}{1000 * times['on']:>15.1f}{ratio:>8.2f}{compiling:>15.1f}")
    return ratio


def fast_paths(lm, base, block: int, repeats: int, rounds: int = 2) -> str:
    """melbo.model.fastpath side by side: a kl step (float32, and --precision bfloat16) with the fast paths and with
    them switched off (the LM head on transformers' strided slice; plain autocast, its attention in bfloat16),
    alternating, best of ``rounds`` rounds each."""
    import contextlib

    import melbo.engines.ortho as ortho_engine
    import melbo.model.forward as forward

    fast = (forward.contiguous_head_input, ortho_engine.bfloat16_products)

    def plain_autocast(model, device, enabled=True, weights=None):  # autocast casting every weight itself, attention in bfloat16
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)

    slow = (lambda model: contextlib.nullcontext(), plain_autocast)
    times: dict[tuple[str, str], float] = {}
    # one objective per precision, built with the fast paths as melbo builds it; the paths are swapped for its steps only
    losses = {precision: objective(lm, base, [DEFAULT_PROMPT], OrthoConfig(compile="off", source=SOURCE, target=TARGET, extra_prompts=0, precision=precision))
              for precision in ("float32", "bfloat16")}
    try:
        for _ in range(rounds):
            for precision in ("float32", "bfloat16"):
                for name, (head, products) in (("without", slow), ("with", fast)):
                    forward.contiguous_head_input, ortho_engine.bfloat16_products = head, products
                    seconds = step_seconds(losses[precision], block, lm.d_model, 50.0, repeats)
                    times[(precision, name)] = min(seconds, times.get((precision, name), seconds))
    finally:
        forward.contiguous_head_input, ortho_engine.bfloat16_products = fast
    print(f"fast paths (melbo.model.fastpath), a block-{block} kl step, best of {rounds} round(s) side by side")
    print(f"{'precision':<11}{'without (ms)':>14}{'with (ms)':>11}{'ratio':>8}")
    for precision in ("float32", "bfloat16"):
        without, with_ = times[(precision, "without")], times[(precision, "with")]
        print(f"{precision:<11}{1000 * without:>14.1f}{1000 * with_:>11.1f}{with_ / without:>8.2f}")
    ratio = times[("bfloat16", "with")] / times[("float32", "without")]
    return (f"fast paths: float32 step {times[('float32', 'with')] / times[('float32', 'without')]:.2f}× its time without them, "
            f"bfloat16 {times[('bfloat16', 'with')] / times[('bfloat16', 'without')]:.2f}× ({ratio:.2f}× float32's without)")


def convergence(lm) -> str:
    """How many of a block's evaluations each row needs: one block of 16 copies of the demo's base with the default
    objective, every row's loss after each evaluation against its final loss. Rows that were done early could leave the
    batch (a per-row early stop) and fewer evaluations would do; neither pays if no row has settled."""
    from common import base_vector

    from melbo.engines.optimise import lbfgs_rows
    from melbo.objectives import orthogonalize_block, orthonormal_rows, project_out, random_orthogonal_block

    base = base_vector(lm, quick=False)
    cfg = OrthoConfig(compile="off", source=SOURCE, target=TARGET, extra_prompts=0, precision="float32")
    settings = cfg.resolved(float(base.norm()), lm.d_model, lm.n_layers)
    loss = objective(lm, base, [DEFAULT_PROMPT], cfg)
    basis = orthonormal_rows(base[None])
    start = random_orthogonal_block(settings.block, lm.d_model, settings.init_scale * float(base.norm()), basis, torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []

    def logged(theta):
        out = loss(theta)
        seen.append(out.detach().clone())
        return out

    first = settings.lr * lm.d_model**0.5  # as melbo.engines.ortho does
    block, _ = lbfgs_rows(start, logged, lambda t: orthogonalize_block(t, basis), lambda g: project_out(g, basis), settings.steps, first_step=first, max_step=4 * first)
    best = torch.cummin(torch.stack(seen), dim=0).values  # (evaluations, rows): each row's best loss so far
    ratio = best / best[-1]
    print(f"per-row convergence: {settings.block} copies of the demo's base (‖θ0‖ {float(base.norm()):.1f}), kl, {len(seen)} evaluations")
    print(f"{'evaluations':>12}{'median loss / final':>21}{'max loss / final':>18}{'rows within 10% of final':>26}")
    for k in (5, 10, 15, 20, 25, len(seen)):
        print(f"{k:>12}{float(ratio[k - 1].median()):>21.2f}{float(ratio[k - 1].max()):>18.2f}{int((ratio[k - 1] <= 1.1).sum()):>23}/{ratio.shape[1]}")
    half = len(seen) // 2
    saved = starts(lm, base, loss, start, block, settings.steps, first)
    return (f"; after {half} of {len(seen)} evaluations the median row's loss is {float(ratio[half - 1].median()):.2f}× its final, "
            f"{int((ratio[half - 1] <= 1.1).sum())}/{ratio.shape[1]} rows within 10%; {saved}")


def energy_in(vectors: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Each row's share of its squared norm in the span of the orthonormal ``directions``."""
    return (vectors @ directions.T).pow(2).sum(-1) / vectors.pow(2).sum(-1)


def starts(lm, base, loss, start, block, steps: int, first: float) -> str:
    """Is there a start better than a random direction (the speed issue's route)? Two tests on the block above:
    whether its copies sit in a subspace the Jacobian of θ ↦ h_t singles out (its top singular directions at 0 and at
    θ0, by finite differences at the loss's 20 positions), against random directions ⟂ θ0; and whether the next block
    converges faster when its random start gets the component the first block's corrections (final − start) share."""
    from melbo.engines.optimise import lbfgs_rows
    from melbo.model.forward import extend_with_continuation, target_residual
    from melbo.objectives import orthogonalize_block, orthonormal_rows, project_out, random_orthogonal_block

    d = lm.d_model
    state = extend_with_continuation(lm, prepare(lm, [DEFAULT_PROMPT], PromptFormat(), SOURCE)[0], SOURCE, base, 16)
    where = slice(state.length - 20, state.length)
    others = torch.randn(256, d, generator=torch.Generator().manual_seed(2))
    others = project_out(others, orthonormal_rows(base[None]))
    print("copies' energy in the top-k right singular directions of the Jacobian of θ ↦ h_t (share of ‖θ‖²; median over rows)")
    print(f"{'Jacobian at':>12}{'k':>5}{'copies':>9}{'random ⟂ θ0':>13}{'θ0':>7}")
    for name, at in (("0", torch.zeros(d)), ("θ0", base)):
        with torch.no_grad():
            h = lambda t: target_residual(lm.model, state, SOURCE, TARGET, t)[:, where].reshape(t.shape[0], -1)  # noqa: E731
            h0, eps, eye = h(at[None]), 0.5, torch.eye(d)
            jac = torch.cat([(h(at[None] + eps * eye[i:i + 32]) - h0) / eps for i in range(0, d, 32)]).T
        top = torch.linalg.svd(jac, full_matrices=False).Vh
        for k in (16, 64, 128):
            shares = [float(energy_in(v, top[:k]).median()) for v in (block, others, base[None])]
            print(f"{name:>12}{k:>5}{shares[0]:>9.3f}{shares[1]:>13.3f}{shares[2]:>7.3f}")
    basis = orthonormal_rows(torch.cat([base[None], block]))
    norm = float(block.norm(dim=1).median())
    random = random_orthogonal_block(block.shape[0], d, norm, basis, torch.Generator().manual_seed(1))
    shared = project_out((block - start).mean(dim=0)[None], basis)[0]
    nudged = orthogonalize_block(random + float((block - start).mean(dim=0).norm()) * shared / shared.norm(), basis)
    nudged = nudged * (norm / nudged.norm(dim=1, keepdim=True))
    traces: dict[str, list[float]] = {}
    for name, init in (("random", random), ("random + shared correction", nudged)):
        traces[name] = []
        lbfgs_rows(init, loss, lambda t: orthogonalize_block(t, basis), lambda g: project_out(g, basis), steps, first_step=first,
                   max_step=4 * first, on_step=lambda _, m, trace=traces[name]: trace.append(m))
    print(f"the next block ({block.shape[0]} rows) from each start: mean loss after evaluations")
    print(f"{'start':<28}" + "".join(f"{k:>8}" for k in (1, 10, 20, steps)))
    for name, means in traces.items():
        print(f"{name:<28}" + "".join(f"{means[k - 1]:>8.3f}" for k in (1, 10, 20, steps)))
    target = traces["random"][-1]
    needed = next(i + 1 for i, m in enumerate(traces["random + shared correction"]) if m <= target) if min(traces["random + shared correction"]) <= target else None
    return (f"the shared-correction start reaches the random start's {steps}-evaluation loss after {needed} evaluations"
            if needed else f"the shared-correction start does not reach the random start's {steps}-evaluation loss")

# The shapes of the issue's ~0.5B chat model (Qwen2-0.5B-Instruct's published config) and of Gemma 3 270M (as melbo
# loads the GGUF), with their prompts' tokens: a floor needs only shapes, so neither model is loaded. Gemma: its raw
# GEMMA_PROMPT with its start token; Qwen2: its chat template with its default system prompt around DEFAULT_PROMPT,
# counted by hand.
SHAPES = {
    "gemma3-270m": (SimpleNamespace(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                                    num_key_value_heads=1, head_dim=256, vocab_size=262_144), 10),
    "qwen2-0.5b": (SimpleNamespace(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                   num_key_value_heads=2, head_dim=64, vocab_size=151_936), 26),
}
FLOOR_EVALUATIONS = 30  # a whole-basis block's evaluations (fast mode on the run's prompt alone: bench/full_basis.py)
KL_TOP_KEPT = 20_000  # tokens kl-top's head runs on: Gemma's kept 18k over a run's 20 positions (README), 63k on another base


def floors(lm, base, block: int, repeats: int) -> str:
    """The whole basis's floor per model: blocks of ``block`` rows × FLOOR_EVALUATIONS evaluations, each the forward and
    input-gradient backward of layers s+1 … L−1 over the prompt and θ0's continuation and the LM head at the KL's
    positions (every token for kl, KL_TOP_KEPT for kl-top; s, the continuation and the positions as fast mode resolves
    them for the model), at the rate of a same-shape float32 matmul here. What a run adds to it (completions,
    orthogonalisation, a step's other work) is the gap to full_basis's minutes."""
    shapes = {"smollm2": (lm.model.config, prepare(lm, [DEFAULT_PROMPT], PromptFormat(), SOURCE)[0].length), **SHAPES}
    print(f"{'model':<13}{'d':>5}{'layers':>8}{'tokens':>7}{'vocab':>9}{'matmul GFLOP/s':>16}{'eval floor kl / kl-top':>24}"
          f"{'copies':>8}{'basis floor kl / kl-top':>25}")
    out = []
    for name, (config, prompt_tokens) in shapes.items():
        d, n_layers = config.hidden_size, config.num_hidden_layers
        settings = OrthoConfig(extra_prompts=0).resolved(1.0, d, n_layers)  # s 8 of 30 layers, 5 of 18, 7 of 24; 16 tokens; last:20
        source, tokens = settings.source, prompt_tokens + settings.continuation
        positions = len(range(tokens)[Positions(settings.positions).index(tokens)])
        body = step_flops(config, block, tokens, n_layers - 1 - source)
        head = {match: 2.0 * block * positions * 2 * kept * d for match, kept in (("kl", config.vocab_size), ("kl-top", min(KL_TOP_KEPT, config.vocab_size)))}
        rate = max(matmul_rate(config, block * tokens, max(10, repeats * 10)) for _ in range(5))  # the best of 5: a floor
        seconds = {match: (body + flops) / rate for match, flops in head.items()}
        blocks = -(-(d - 1) // block)
        minutes = {match: blocks * FLOOR_EVALUATIONS * value / 60 for match, value in seconds.items()}
        print(f"{name:<13}{d:>5}{f'{source + 1}…{n_layers - 1}':>8}{tokens:>7}{config.vocab_size:>9,}{rate / 1e9:>16.1f}"
              f"{seconds['kl']:>14.2f} / {seconds['kl-top']:.2f} s{d - 1:>8}{minutes['kl']:>15.1f} / {minutes['kl-top']:.1f} min")
        out.append(f"{name} {minutes['kl']:.0f} / {minutes['kl-top']:.0f} min ({60 * minutes['kl-top'] / (d - 1):.2f} s per copy with kl-top)")
    return (f"whole basis at the FLOP floor here (kl / kl-top, {FLOOR_EVALUATIONS} evaluations per block of {block}): " + "; ".join(out))


BLOCK_ROWS = (16, 32, 64)
BLOCK_MODELS = {"smollm2": (SOURCE, TARGET, 26.6), "gemma": (5, 12, GEMMA_NORM), "qwen": (7, 16, QWEN_NORM)}  # source, target, ‖θ0‖ (about auto R)


def block_rows(lm, base, block: int, repeats: int, rounds: int = 2) -> str:
    """A whole-basis block's cost per copy by its rows (:data:`BLOCK_ROWS`), as a long run resolves the rest (the run's
    prompt alone, bfloat16 products where the CPU has the units, compiled where a compiler is found): FLOOR_EVALUATIONS
    evaluations (a block's at most) plus each row's judged completion (completion_tokens greedy tokens, float32), per
    row, on SmolLM2, Gemma 3 270M and Qwen2.5 0.5B where they can be had; best of ``rounds`` rounds, the sizes
    alternated. What fast mode's block for long runs (melbo.engines.config.LONG_RUN_BLOCK) rests on."""
    from models import FETCHED, Unavailable
    from models import load as load_bench_model

    from melbo.model.fastpath import bfloat16_is_fast, compiler_available, kept_heap
    from melbo.model.forward import steered_generation

    precision = "bfloat16" if bfloat16_is_fast(torch.device("cpu")) else "float32"
    compile_mode = "on" if compiler_available(torch.device("cpu")) else "off"
    print(f"a whole-basis block per copy: {FLOOR_EVALUATIONS} evaluations + its completion, {precision} products, compile {compile_mode}; "
          f"best of {rounds} rounds, block sizes alternated")
    print(f"{'model':<9}{'rows':>6}{'step (ms)':>11}{'per row':>9}{'completions (s)':>17}{'per row':>9}{'s per copy':>12}{'vs 16':>7}")
    out = []
    for name, (source, target, norm) in BLOCK_MODELS.items():
        try:
            model, fmt = (lm, PromptFormat()) if name == "smollm2" else load_bench_model(name)
        except Unavailable as exc:
            print(f"{name:<9}unavailable: {exc}")
            continue
        prompt = DEFAULT_PROMPT if name == "smollm2" else FETCHED[name].prompt
        cfg = OrthoConfig(source=source, target=target, extra_prompts=0, precision=precision, compile=compile_mode)
        loss = objective(model, seeded_base(model.d_model, norm), [prompt], cfg, fmt)
        ids = prepare(model, [prompt], fmt, source)[0].ids
        steps: dict[int, float] = {}
        made: dict[int, float] = {}
        with kept_heap():
            for rows in BLOCK_ROWS:  # the first call of each shape compiles
                step_seconds(loss, rows, model.d_model, norm, 1)
            for _ in range(rounds):
                for rows in BLOCK_ROWS:
                    seconds = step_seconds(loss, rows, model.d_model, norm, repeats)
                    steps[rows] = min(seconds, steps.get(rows, seconds))
                    thetas = torch.randn(rows, model.d_model, generator=torch.Generator().manual_seed(1)) * norm / model.d_model**0.5
                    start = time.perf_counter()
                    steered_generation(model.model, model.tokenizer, ids, thetas, source, cfg.completion_tokens)
                    seconds = time.perf_counter() - start
                    made[rows] = min(seconds, made.get(rows, seconds))
        per_copy = {rows: (FLOOR_EVALUATIONS * steps[rows] + made[rows]) / rows for rows in BLOCK_ROWS}
        for rows in BLOCK_ROWS:
            print(f"{name:<9}{rows:>6}{1000 * steps[rows]:>11.1f}{1000 * steps[rows] / rows:>9.1f}{made[rows]:>17.2f}{made[rows] / rows:>9.3f}"
                  f"{per_copy[rows]:>12.3f}{per_copy[rows] / per_copy[16]:>7.2f}")
        out.append(f"{name} " + ", ".join(f"{rows} rows {per_copy[rows] / per_copy[16]:.2f}×" for rows in BLOCK_ROWS[1:]))
    return "a whole-basis block's time per copy against 16 rows: " + "; ".join(out)


ONLY = {  # the options that run one measurement alone on SmolLM2 (block 16): its function and repeats per timing
    "packing": (packing, 3), "warmup": (warmup, 3), "compile": (compiled, 3), "kl_chunks": (kl_chunks, 2), "default": (default_floor, 3),
    "kl_top": (kl_top, 3), "floors": (floors, 3), "blocks": (block_rows, 2),
}


if __name__ == "__main__":
    main()
