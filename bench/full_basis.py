"""Full basis: MELBO-ortho (fast mode) until the basis is exhausted (at most d_model − 1 vectors), on the embedded
SmolLM2 (from the demo's base vector), on Gemma 3 270M (from the clearest vector of an auto-R discovery on a raw
prompt) or on Qwen2.5-Coder-0.5B-Instruct (the same on its chat template and melbo's default prompt). Targets on 2 CPU
cores: SmolLM2 ≤ 10 min; a ~0.5B model ≤ 4 s per copy (Qwen2.5-Coder 0.5B is one; Gemma 3 270M a smaller stand-in).

Besides minutes and seconds per copy it reports what the copies are worth: the behaviour share over every copy (the
label of its stored greedy completion on the run's prompt against θ0's) and the controls' verdict from an eval of 64
copies spread over the basis (random directions at their norm, unsteered, θ0's text NLL on held-out prompts).

    .venv/bin/python bench/full_basis.py --quick                 # 4 vectors, 5 steps: checks that it runs
    .venv/bin/python bench/full_basis.py                         # SmolLM2, every vector (10 min with --precision bfloat16 on an AMX Xeon, compiled)
    .venv/bin/python bench/full_basis.py --model gemma           # Gemma 3 270M (fetched by bench/models.py)
    .venv/bin/python bench/full_basis.py --model qwen --count 64 # Qwen2.5-Coder 0.5B (fetched too): 4 blocks, the rest extrapolated
    .venv/bin/python bench/full_basis.py --match fisher          # the KL to second order: the LM head never runs
    .venv/bin/python bench/full_basis.py --match kl-top          # the KL on θ0's likeliest tokens: the head runs on those only
                                                                 # (melbo's default from 100k tokens: Gemma's 262k; --match kl there for the exact KL)
    .venv/bin/python bench/full_basis.py --count 96              # the first 6 blocks, with a per-block profile
    .venv/bin/python bench/full_basis.py --precision bfloat16    # the optimisation's matrix products in bfloat16 (CPUs with AMX or AVX512-BF16)
    .venv/bin/python bench/full_basis.py --dtype bfloat16        # the whole model in bfloat16
    .venv/bin/python bench/full_basis.py --compile off           # each evaluation eager (melbo compiles from 128 copies where it can)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import base_vector, kernels, pace, summary_line
from models import FETCHED, load

from melbo.analysis.choose import choose_bases, score_candidates
from melbo.analysis.config import ChooseConfig, EvalConfig
from melbo.analysis.evaluate import eval_prompts, evaluate
from melbo.engines.config import DiscoverConfig
from melbo.engines.discover import discover
from melbo.engines.ortho import OrthoConfig, ortho
from melbo.files.runs import Run, read_run
from melbo.labels import label
from melbo.model.fastpath import compiler_available
from melbo.model.loading import LoadedModel
from melbo.model.prompts import DEFAULT_PROMPT, PromptFormat
from melbo.objectives import max_abs_cosine

TARGET_MIN = {"smollm2": 10.0}  # whole basis, minutes on 2 CPU cores
TARGET_S_PER_COPY = 4.0  # a ~0.5B model's whole basis in an hour (the goal): Qwen2.5-Coder 0.5B, Gemma 3 270M
EVALUATED = 64  # copies spread over the basis that the controls' eval steers with


def chosen_base(lm: LoadedModel, fmt: PromptFormat, base_run: str | None, prompt: str) -> tuple[torch.Tensor, str]:
    """The clearest fluent vector of ``base_run`` (a discovery made before, e.g. `melbo discover --model GEMMA
    --no-chat-template -p PROMPT -k 16`), or of an auto-R discovery of 16 vectors on ``prompt``."""
    run = read_run(base_run) if base_run else discover(lm, [prompt], DiscoverConfig(count=16, block=16, precision="float32"), fmt)  # as RESULTS' bases
    prompt = run.meta.prompts[0]
    choice = choose_bases(score_candidates(lm, run, prompt, fmt), ChooseConfig())[0]
    return run.vectors[choice.index], prompt


def controls_verdict(lm: LoadedModel, run: Run, fmt: PromptFormat, tokens: int, quick: bool = False) -> tuple[float | None, str]:
    """Behaviour share over every copy (stored completions) and the controls' verdict over ``EVALUATED`` copies (with
    ``quick``: on one held-out prompt, not melbo's four)."""
    base_label = label(run.records[0].completion or "")[0]
    copies = run.records[1:]
    share = statistics.mean(label(r.completion or "")[0] == base_label for r in copies) if copies else None
    step = max(1, len(copies) // EVALUATED)
    indices = [0, *range(1, len(copies) + 1, step)][: EVALUATED + 1]
    prompts = eval_prompts(run, [], controls=True)
    results = evaluate(lm, run, prompts[:2] if quick else prompts, indices, EvalConfig(max_new_tokens=tokens, controls=True), fmt, progress=False)
    assert results.controls is not None
    return share, f"{results.controls.verdict()} ({len(indices) - 1} copies evaluated: " + ("all" if step == 1 else f"one in {step}") + ")"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", choices=("smollm2", "gemma", "qwen"), default="smollm2")
    parser.add_argument("--match", default=None, help="kl, kl-top, fisher, mean or each (default: melbo's, kl or kl-top on a vocabulary of 100k tokens or more)")
    parser.add_argument("--count", type=int, default=None, help="stop after this many vectors (default: the whole basis)")
    parser.add_argument("--block", type=int, default=None, help="vectors per block (default: fast mode's, 32 for a run this long)")
    parser.add_argument("--optimizer", default=None, help="lbfgs (default) or adam")
    parser.add_argument("--patience", type=int, default=None, help="lbfgs: evaluations without gain after which a copy leaves its block (default: fast mode's; 0: never)")
    parser.add_argument("--no-controls", action="store_true", help="skip the eval with controls after the basis")
    parser.add_argument("--base-run", default=None, help="take θ0 from this discovery run (its clearest fluent vector) instead of discovering")
    parser.add_argument("--extra-prompts", type=int, default=0,
                        help="shipped prompts trained on besides the run's (default 0: the whole basis's objective, as the targets were set; "
                             "melbo's default, 4, costs ~5× per copy)")
    parser.add_argument("--precision", default="float32", help="the optimisation's matrix products: float32 (default) or bfloat16 (autocast)")
    parser.add_argument("--dtype", default=None, help="the whole model in this dtype: float32 (default) or bfloat16 (on a CPU slower than --precision bfloat16: see RESULTS)")
    parser.add_argument("--compile", default="auto", help="compile each evaluation's blocks and KL: auto (melbo's default: on from 128 copies where a compiler is found), on or off")
    parser.add_argument("--seed", type=int, default=0, help="MELBO-ortho's random seed (each block's random start)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.perf_counter()
    lm, fmt = load(args.model, args.dtype)
    if args.model != "smollm2":
        prompt = FETCHED[args.model].prompt
        base, prompt = chosen_base(lm, fmt, args.base_run, prompt) if not args.quick else (base_vector(lm, quick=True), prompt)
    else:
        prompt = DEFAULT_PROMPT
        if args.base_run:
            base, prompt = chosen_base(lm, fmt, args.base_run, prompt)
        else:
            base = base_vector(lm, quick=args.quick)
    base_seconds = time.perf_counter() - started
    settings = dict(count=4, block=4, steps=5, completion_tokens=8) if args.quick else dict(count=args.count, block=args.block, optimizer=args.optimizer, patience=args.patience)
    cfg = OrthoConfig(mode="fast", match=args.match, precision=args.precision, extra_prompts=args.extra_prompts, compile=args.compile, seed=args.seed, **settings)
    blocks: dict[int, list[float]] = {}
    paces = [pace()]
    step_start = [time.perf_counter()]

    def on_step(block: int, step: int, loss: float) -> None:
        now = time.perf_counter()
        if block not in blocks and blocks:  # a progress line per block, for a log read while the basis runs
            done = max(blocks)
            paces.append(pace())
            print(f"[{time.strftime('%H:%M:%S')}] block {done} done: {len(blocks[done])} steps, {sum(blocks[done]):.0f} s; "
                  f"{(now - start) / 60:.1f} min so far; pace {paces[-1]:.0f} GFLOP/s", flush=True)
            now = time.perf_counter()  # the pace's own time is no block's
        blocks.setdefault(block, []).append(now - step_start[0])
        step_start[0] = now

    start = time.perf_counter()
    run = ortho(lm, base, [prompt], cfg, fmt, on_step=on_step)
    minutes = (time.perf_counter() - start) / 60
    paces.append(pace())
    records = run.records[1:]
    if not records:  # a stopped run, or a first block that collapsed (NaN from a bad compiled kernel did so once)
        summary_line(f"{lm.name}: no copies in {minutes:.1f} min; stopped: {run.meta.stopped}")
        raise SystemExit(1)
    kls = [r.kl for r in records]
    resolved = cfg.resolved(float(base.norm()), lm.d_model, lm.n_layers, vocab=lm.plain_head_vocab, can_compile=compiler_available(lm.device))
    dtype = (str(next(lm.model.parameters()).dtype).removeprefix("torch.") + ("" if args.precision == "float32" else f", {args.precision} products")
             + (", compiled" if resolved.compiled else ""))
    print(f"{lm.name} ({dtype}): d_model {lm.d_model}, layers {resolved.source} → {resolved.target}, ‖θ0‖ {float(base.norm()):.1f}, match {resolved.match}, "
          f"extra prompts {resolved.extra_prompts}, base found in {base_seconds:.0f} s; θ0: {(run.records[0].completion or '')[:80]!r}")
    print(f"{'blocks':<8}{'vectors':>8}{'steps':>7}{'s/step':>8}{'median KL':>11}{'median norm':>13}")
    per = resolved.block
    for b in range(0, len(blocks), max(1, len(blocks) // 12)):
        part = [r for r in records if r.block == b]
        if part:
            times = blocks[b]
            print(f"{b:<8}{len(part):>8}{len(times):>7}{statistics.median(times):>8.2f}{statistics.median(r.kl for r in part):>11.3f}{statistics.median(r.norm for r in part):>13.1f}")
    exhausted = (run.meta.stopped or "").startswith("basis exhausted")
    steps = sum(len(t) for t in blocks.values())
    per_copy = minutes * 60 / max(1, len(records))
    print(
        f"{len(records)} vectors in {len(blocks)} blocks of ≤ {per}, {steps} optimisation steps, {minutes:.1f} min ({per_copy:.2f} s per copy); "
        f"median KL {statistics.median(kls):.3f}; max |cos| {max_abs_cosine(run.vectors.double()):.1e}; stopped: {run.meta.stopped}"
    )
    print(f"the machine's pace (float32 1024³ products, read before the first block and after each): {min(paces):.0f}–{max(paces):.0f} GFLOP/s, "
          f"median {statistics.median(paces):.0f}: compare runs made at a like pace; {kernels()}")
    share, verdict = (None, "not measured (--no-controls)") if args.no_controls else controls_verdict(lm, run, fmt, 8 if args.quick else 32, quick=args.quick)
    print(f"behaviour share over every copy (its stored greedy completion on the run's prompt): {'—' if share is None else f'{share:.0%}'}")
    print(f"controls: {verdict}")
    step_s = statistics.median(t for times in blocks.values() for t in times)
    source = run.meta.source
    through = {"kl": f"layers {source + 1}…{lm.n_layers - 1} and the LM head", "fisher": f"layers {source + 1}…{lm.n_layers - 1} (no LM head)",
               "kl-top": f"layers {source + 1}…{lm.n_layers - 1} and the LM head's rows of θ0's likeliest tokens"}.get(
        resolved.match, f"layers {source + 1}…{run.meta.target}")
    target_min = TARGET_MIN.get(args.model)
    met = (minutes <= target_min) if target_min is not None else (per_copy <= TARGET_S_PER_COPY)
    target = f"whole basis ≤ {target_min:g} min" if target_min is not None else f"≤ {TARGET_S_PER_COPY:g} s per copy"
    if exhausted and not met:
        bfloat16 = ("" if args.precision != "float32" else
                    "--precision bfloat16 on a CPU with bfloat16 units (per copy 1.4× on SmolLM2 and 1.9× on Qwen2.5 0.5B with AMX, 2.1× on SmolLM2 "
                    "with AVX512-BF16 on an AMD Zen 5: RESULTS), ")
        compile_hint = "" if resolved.compiled else "--compile on where a C++ compiler is found (a bfloat16 SmolLM2 step 0.6× eager's on an AMX Xeon: RESULTS), "
        # a block's first step is timed from the previous block's last: its judging (completions) in it, so take the median
        evaluating = sum(sum(times[1:]) + statistics.median(times) for times in blocks.values())
        rest = max(0.0, minutes * 60 - evaluating)
        allowed = ((target_min * 60 if target_min is not None else TARGET_S_PER_COPY * len(records)) - rest) / step_s / len(blocks)
        print(
            f"why: {steps} evaluations at a median {step_s:.2f} s, {evaluating / 60:.1f} min (forward and backward of ≤ {per} rows through {through}, over the "
            f"prompt and θ0's {resolved.continuation} continuation tokens: matmul-bound, see utilisation), and {rest / 60:.1f} min besides (each block's "
            f"completions and judging, the orthogonalisation); after those the target allows {allowed:.0f} evaluations per block against {steps / len(blocks):.0f} (a row that stops improving leaves its block, --patience; on SmolLM2 "
            f"rows improve almost to the last, and no start measured beats a random direction: utilisation). To close it: a GPU (bench/gpu.py), {bfloat16}{compile_hint}or melbo 0.1's "
            f"objective (--match mean --continuation 0, copies that keep the base's behaviour far less often: bench/fidelity.py)"
        )
    whole = "" if exhausted or args.quick else f" (stopped at {len(records)} vectors: ≈ {minutes * (lm.d_model - 1) / len(records):.0f} min for {lm.d_model - 1} if every block cost the same)"
    summary_line(f"{lm.name}{'' if dtype == 'float32' else f' ({dtype})'}, match {resolved.match}: {len(records)} orthogonal vectors in {minutes:.1f} min, {per_copy:.2f} s per copy{whole}; "
                 f"behaviour share {'—' if share is None else f'{share:.0%}'}; target {target}: {('met' if met else 'missed') if exhausted else 'not measured'}")


if __name__ == "__main__":
    main()
