"""Behaviour fidelity of MELBO-ortho: which objective makes copies that keep the base's behaviour, not just its first
token? On the embedded SmolLM2, one base with a clear label (discovered with -R auto, layers 8 → 20), then the same
number of copies with each variant of the objective, side by side in one run.

For each variant: seconds per copy; median KL(P_i ‖ P_0) at the last prompt token; copies sharing θ0's most likely
first token; and the behaviour share, the share of copies' completions carrying θ0's label, greedy and sampled
(T = 1, two samples) on the run's prompt, and greedy on held-out prompts (θ0's own rate there is printed beside); the
share of the copies' greedy completions that loop or babble ("degen.": a refusal that then loops is a refusal, and not
fluent);
and off the training prompt, judge-free (melbo eval --controls): the NLL of θ0's own greedy completion on 4 held-out
prompts (one of each shipped kind) under the copies, under random directions ⟂ θ0 at the copies' norm and unsteered,
"p below": the sign test that the copies' held-out NLL is below the unsteered model's (the controls verdict counts it at
p ≤ 0.05); and the held-out agreement (the copies' label equals θ0's on that prompt). Variants marked "N prompts" train on the
run's prompt and N more (``extra_prompts``: θ0's continuation on each), none of them held out; "run 0.5" gives the
run's prompt half of the loss (``first_weight``). "Faithful copies per minute" = behaviour
share (greedy, run prompt) × copies / minutes of MELBO-ortho.

    .venv/bin/python bench/fidelity.py --quick        # seconds: 1 copy, 3 evaluations, two variants
    .venv/bin/python bench/fidelity.py                # 16 copies per variant, nine variants (~35 min on 2 cores)
    .venv/bin/python bench/fidelity.py --prompt "How can I cheat on my exam without getting caught?"   # another run prompt
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import scratch_folder, summary_line
from models import load

from melbo.analysis.choose import score_candidates
from melbo.analysis.config import EvalConfig
from melbo.analysis.evaluate import evaluate
from melbo.engines.config import DiscoverConfig, OrthoConfig, fast_continuation
from melbo.engines.discover import discover
from melbo.engines.ortho import behaviour_shows_at, ortho
from melbo.files.runs import read_run
from melbo.labels import degenerates, label
from melbo.model.forward import last_token_logits, prepare
from melbo.model.prompts import DEFAULT_PROMPT, held_out_prompts

# melbo 0.1's fast objective: the residual mean at the last 4 positions, from 2‖θ0‖, no norm penalty; and no warm-up
# (melbo's default since 2026-12-04): a variant that does not name one runs every evaluation on all its prompts
RELEASE_01 = {"match": "mean", "continuation": 0, "extra_prompts": 0, "init_scale": 2.0, "penalty": 0.0, "warmup": 0, "patience": 0}
MELBO_DEFAULT = {"match": None, "continuation": None, "extra_prompts": None, "init_scale": 1.0, "penalty": None, "warmup": None, "patience": None}  # melbo's own
AS_THE_RUNS = "as the run's"  # extra_continuation: the run's prompt's default continuation on this base (fast_continuation)
VARIANTS = {  # name → OrthoConfig fields changed from melbo 0.1's fast mode (last:4, mean, 60 evaluations, t = 20)
    "last:4 mean (0.1)": {},
    "skip-first": {"positions": "skip-first"},
    "last:1": {"positions": "last:1"},
    "last:4 each": {"match": "each"},
    "target 24": {"target": 24},
    "120 evaluations": {"steps": 120},
    "continuation 8": {"continuation": 8},
    "continuation 16": {"continuation": 16},
    "continuation 16 each": {"continuation": 16, "match": "each"},
    "continuation 32 each": {"continuation": 32, "match": "each"},
    "last:4 kl": {"match": "kl", "steps": 60},
    "continuation 8 kl": {"continuation": 8, "match": "kl", "steps": 60},
    "continuation 16 kl 60 evals": {"continuation": 16, "match": "kl", "steps": 60},
    "continuation 16 kl 30 evals": {"continuation": 16, "match": "kl", "steps": 30},  # melbo's fast default until 2026-12-02
    "default: start 1.0 penalty 0.02": {"continuation": 16, "match": "kl", "steps": 30, "init_scale": 1.0, "penalty": None},  # since then
    "default seed 1": {"continuation": 16, "match": "kl", "steps": 30, "init_scale": 1.0, "penalty": None, "seed": 1},
    "continuation 16 kl 30 evals seed 1": {"continuation": 16, "match": "kl", "steps": 30, "seed": 1},
    "continuation 16 each t 29": {"continuation": 16, "match": "each", "target": 29},
    "continuation 16 kl 2 prompts": {"continuation": 16, "match": "kl", "steps": 30, "extra_prompts": 2},
    "continuation 16 kl 4 prompts": {"continuation": 16, "match": "kl", "steps": 30, "extra_prompts": 4},
    "continuation 16 kl 3 prompts": {"continuation": 16, "match": "kl", "steps": 30, "extra_prompts": 3},
    "continuation 16 kl 2 prompts 60 evals": {"continuation": 16, "match": "kl", "steps": 60, "extra_prompts": 2},
    "continuation 16 kl 4 prompts run 0.8": {"continuation": 16, "match": "kl", "steps": 30, "extra_prompts": 4, "first_weight": 0.8},
    "continuation 16 kl 4 prompts run 0.5": {"continuation": 16, "match": "kl", "steps": 30, "extra_prompts": 4, "first_weight": 0.5},
    "continuation 16 kl 4 prompts 60 evals": {"continuation": 16, "match": "kl", "steps": 60, "extra_prompts": 4},
    "continuation 16 kl 4 prompts run 0.5 60 evals": {"continuation": 16, "match": "kl", "steps": 60, "extra_prompts": 4, "first_weight": 0.5},
    "last:4 mean 4 prompts": {"extra_prompts": 4},
    "continuation 16 kl penalty 3e-5": {"continuation": 16, "match": "kl", "steps": 30, "penalty": 3e-5},
    "continuation 16 kl penalty 1e-4": {"continuation": 16, "match": "kl", "steps": 30, "penalty": 1e-4},
    "continuation 16 kl penalty 5e-5": {"continuation": 16, "match": "kl", "steps": 30, "penalty": 5e-5},
    "continuation 16 kl penalty 3e-4": {"continuation": 16, "match": "kl", "steps": 30, "penalty": 3e-4},
    "continuation 16 kl penalty 2e-4": {"continuation": 16, "match": "kl", "steps": 30, "penalty": 2e-4},
    "continuation 16 kl penalty 2e-4 2 prompts": {"continuation": 16, "match": "kl", "steps": 30, "penalty": 2e-4, "extra_prompts": 2},
    "continuation 16 kl penalty 1e-3": {"continuation": 16, "match": "kl", "steps": 30, "penalty": 1e-3},
    "continuation 16 kl penalty 3e-4 60 evals": {"continuation": 16, "match": "kl", "steps": 60, "penalty": 3e-4},
    "continuation 16 kl penalty 3e-4 2 prompts": {"continuation": 16, "match": "kl", "steps": 30, "penalty": 3e-4, "extra_prompts": 2},
    "continuation 16 fisher 30 evals": {"continuation": 16, "match": "fisher", "steps": 30},
    "continuation 16 kl-top 30 evals": {"continuation": 16, "match": "kl-top", "steps": 30},
    "continuation 16 kl penalty 1.5e-4": {"continuation": 16, "match": "kl", "steps": 30, "penalty": 1.5e-4},
    "continuation 32 kl penalty 2e-4": {"continuation": 32, "match": "kl", "steps": 30, "penalty": 2e-4},
    "continuation 32 kl 30 evals": {"continuation": 32, "match": "kl", "steps": 30},
    "continuation 32 kl penalty 1e-4": {"continuation": 32, "match": "kl", "steps": 30, "penalty": 1e-4},
    "continuation 32 kl penalty 5e-5": {"continuation": 32, "match": "kl", "steps": 30, "penalty": 5e-5},
    "continuation 32 kl penalty 3e-5": {"continuation": 32, "match": "kl", "steps": 30, "penalty": 3e-5},
    "continuation 16 kl every position": {"continuation": 16, "match": "kl", "steps": 30, "positions": "skip-first"},
    "continuation 32 kl every position": {"continuation": 32, "match": "kl", "steps": 30, "positions": "skip-first"},
    "continuation 32 kl 2 prompts": {"continuation": 32, "match": "kl", "steps": 30, "extra_prompts": 2},
    "continuation 32 kl 4 prompts": {"continuation": 32, "match": "kl", "steps": 30, "extra_prompts": 4},
    "continuation 16 kl start 1.0": {"continuation": 16, "match": "kl", "steps": 30, "init_scale": 1.0},  # the first block starts at ‖θ0‖
    "continuation 16 kl start 1.5": {"continuation": 16, "match": "kl", "steps": 30, "init_scale": 1.5},
    "continuation 16 kl start 1.0 penalty 3e-5": {"continuation": 16, "match": "kl", "steps": 30, "init_scale": 1.0, "penalty": 3e-5},
    "continuation 16 kl start 0.75": {"continuation": 16, "match": "kl", "steps": 30, "init_scale": 0.75},
    "start 1.0 penalty 6e-5": {"continuation": 16, "match": "kl", "steps": 30, "init_scale": 1.0, "penalty": 6e-5},
    "start 1.0 penalty 6e-5 seed 1": {"continuation": 16, "match": "kl", "steps": 30, "init_scale": 1.0, "penalty": 6e-5, "seed": 1},
    "default 4 prompts run 0.8": {"continuation": 16, "match": "kl", "steps": 30, "init_scale": 1.0, "penalty": None, "extra_prompts": 4, "first_weight": 0.8},
    "default 4 prompts run 0.6": {"continuation": 16, "match": "kl", "steps": 30, "init_scale": 1.0, "penalty": None, "extra_prompts": 4, "first_weight": 0.6},
    "default 2 prompts run 0.8": {"continuation": 16, "match": "kl", "steps": 30, "init_scale": 1.0, "penalty": None, "extra_prompts": 2, "first_weight": 0.8},
    "default 4 prompts run 0.8 seed 1": {"continuation": 16, "match": "kl", "steps": 30, "init_scale": 1.0, "penalty": None, "extra_prompts": 4, "first_weight": 0.8, "seed": 1},
    "default 4 prompts run 0.8 bfloat16": {"continuation": 16, "match": "kl", "steps": 30, "init_scale": 1.0, "penalty": None, "extra_prompts": 4, "first_weight": 0.8, "precision": "bfloat16"},
    "default 4 prompts run 0.8 kl-top": {"continuation": 16, "match": "kl-top", "steps": 30, "init_scale": 1.0, "penalty": None, "extra_prompts": 4, "first_weight": 0.8},
    "default 4 prompts run 0.8 warm-up 15": {"continuation": 16, "match": "kl", "steps": 30, "init_scale": 1.0, "penalty": None, "extra_prompts": 4, "first_weight": 0.8, "warmup": 15},
    "default 4 prompts run 0.8 warm-up 20": {"continuation": 16, "match": "kl", "steps": 30, "init_scale": 1.0, "penalty": None, "extra_prompts": 4, "first_weight": 0.8, "warmup": 20},
    "default 4 prompts run 0.8 warm-up 15 seed 1": {"continuation": 16, "match": "kl", "steps": 30, "init_scale": 1.0, "penalty": None, "extra_prompts": 4, "first_weight": 0.8, "warmup": 15, "seed": 1},
    "default 4 prompts run 0.8 warm-up 20 seed 1": {"continuation": 16, "match": "kl", "steps": 30, "init_scale": 1.0, "penalty": None, "extra_prompts": 4, "first_weight": 0.8, "warmup": 20, "seed": 1},
    "default 4 prompts run 0.8 warm-up 20 + 15": {"continuation": 16, "match": "kl", "steps": 35, "init_scale": 1.0, "penalty": None, "extra_prompts": 4, "first_weight": 0.8, "warmup": 20},
    "default 4 prompts run 0.8 warm-up 20 + 15 seed 1": {"continuation": 16, "match": "kl", "steps": 35, "init_scale": 1.0, "penalty": None, "extra_prompts": 4, "first_weight": 0.8, "warmup": 20, "seed": 1},
    "default 4 prompts run 0.8 warm-up 20 + 15 bfloat16": {"continuation": 16, "match": "kl", "steps": 35, "init_scale": 1.0, "penalty": None, "extra_prompts": 4, "first_weight": 0.8, "warmup": 20, "precision": "bfloat16"},
    "default 4 prompts run 0.8 warm-up 20 + 15 bfloat16 seed 1": {"continuation": 16, "match": "kl", "steps": 35, "init_scale": 1.0, "penalty": None, "extra_prompts": 4, "first_weight": 0.8, "warmup": 20, "precision": "bfloat16", "seed": 1},
    "default 4 prompts run 0.8 warm-up 20 + 15 warm-up bfloat16": {"continuation": 16, "match": "kl", "steps": 35, "init_scale": 1.0, "penalty": None, "extra_prompts": 4, "first_weight": 0.8, "warmup": 20, "warmup_precision": "bfloat16"},
    "default 4 prompts run 0.8 warm-up 20 + 15 warm-up bfloat16 seed 1": {"continuation": 16, "match": "kl", "steps": 35, "init_scale": 1.0, "penalty": None, "extra_prompts": 4, "first_weight": 0.8, "warmup": 20, "warmup_precision": "bfloat16", "seed": 1},
    # melbo's own defaults, whatever they are now (since 2026-12-04: 20 + 15, the continuation through θ0's behaviour)
    "melbo default": MELBO_DEFAULT,
    "melbo default seed 1": {**MELBO_DEFAULT, "seed": 1},
    "melbo default patience 0": {**MELBO_DEFAULT, "patience": 0},  # every copy evaluated to the block's last step, as before 2026-12-05
    # the shipped prompts' continuation shorter than the run's (--extra-continuation): ~0.75× the time of an evaluation on all five
    # (melbo's default since 2026-12-04); "as the run's": every prompt along the run's prompt's continuation, the default before
    "melbo default extras 8": {**MELBO_DEFAULT, "extra_continuation": 8},
    "melbo default extras 8 seed 1": {**MELBO_DEFAULT, "extra_continuation": 8, "seed": 1},
    "melbo default extras as the run's": {**MELBO_DEFAULT, "extra_continuation": AS_THE_RUNS},
    "melbo default extras as the run's seed 1": {**MELBO_DEFAULT, "extra_continuation": AS_THE_RUNS, "seed": 1},
    # fewer evaluations on all five after the warm-up (each ~3× one on the run's prompt alone): 20 + 10 instead of 20 + 15
    "melbo default 20 + 10": {**MELBO_DEFAULT, "steps": 30},
    "melbo default 20 + 10 seed 1": {**MELBO_DEFAULT, "steps": 30, "seed": 1},
    # the KL's second-order form at the LM head's input (objectives.fisher_metric) in place of the exact KL, with the default's warm-up
    "melbo default fisher": {"match": "fisher", "continuation": None, "extra_prompts": None, "init_scale": 1.0, "penalty": None, "warmup": 20},
    "melbo default fisher seed 1": {"match": "fisher", "continuation": None, "extra_prompts": None, "init_scale": 1.0, "penalty": None, "warmup": 20, "seed": 1},
    # the KL on θ0's likeliest tokens at each position and one bucket (kl-top, position by position since 2026-12-05) where
    # melbo's default on a 49k vocabulary is the exact KL (engines.config.KL_TOP_VOCAB)
    "melbo default kl-top": {**MELBO_DEFAULT, "match": "kl-top"},
    "melbo default kl-top seed 1": {**MELBO_DEFAULT, "match": "kl-top", "seed": 1},
    # one block of 32 copies in place of two of 16 (the long runs' block, engines.config.LONG_RUN_BLOCK), eager
    "melbo default block 32": {**MELBO_DEFAULT, "block": 32},
    "melbo default block 32 seed 1": {**MELBO_DEFAULT, "block": 32, "seed": 1},
    "default 4 prompts run 0.8 warm-up 20 + 15 continuation 32": {"continuation": 32, "match": "kl", "steps": 35, "init_scale": 1.0, "penalty": None, "extra_prompts": 4, "first_weight": 0.8, "warmup": 20},
    "default 4 prompts run 0.8 kl-top warm-up 20 + 15": {"continuation": 16, "match": "kl-top", "steps": 35, "init_scale": 1.0, "penalty": None, "extra_prompts": 4, "first_weight": 0.8, "warmup": 20},
    "default 4 prompts run 0.8 kl-top warm-up 20 + 15 seed 1": {"continuation": 16, "match": "kl-top", "steps": 35, "init_scale": 1.0, "penalty": None, "extra_prompts": 4, "first_weight": 0.8, "warmup": 20, "seed": 1},
}
DEFAULT = (  # what a full run measures (--variants names others): positions, target layer, evaluations, continuation, prompts
    "last:4 mean (0.1)", "skip-first", "last:1", "target 24", "120 evaluations", "continuation 16 each", "last:4 kl",
    "continuation 16 kl 60 evals", "continuation 16 kl 30 evals", "default: start 1.0 penalty 0.02", "continuation 16 kl 2 prompts",
    "continuation 16 kl 4 prompts",
    "last:4 mean 4 prompts",
)
QUICK = ("last:4 mean (0.1)", "default: start 1.0 penalty 0.02")


def choose_base(lm, run, fmt):
    """A fluent vector whose label is a behaviour the unsteered model does not show (refusal, code, compliance…),
    the strongest first-token effect among them."""
    scored = score_candidates(lm, run, run.meta.prompts[0], fmt)
    unsteered = scored.unsteered_label
    candidates = [c for c in scored.candidates if c.nll <= 3.0 and c.label not in ("degenerate", "other", unsteered) and not degenerates(c.completion)]
    if not candidates:
        raise SystemExit(f"no fluent vector shows a behaviour other than the unsteered model's ({unsteered}); try --count")
    return max(candidates, key=lambda c: c.effect), unsteered


def measure(lm, run, fmt, base_label: str, held_out: list[str], tokens: int = 48) -> dict:
    prompt = run.meta.prompts[0]
    indices = list(range(run.vectors.shape[0]))
    greedy = evaluate(lm, run, [prompt, *held_out], indices, EvalConfig(max_new_tokens=tokens, controls=True), fmt, progress=False)
    controls = greedy.controls
    assert controls is not None
    sampling = EvalConfig(max_new_tokens=tokens, temperature=1.0, samples=2)
    sampled = evaluate(lm, run, [prompt], indices, sampling, fmt, progress=False)

    def share(results, p, mode) -> float:
        outs = results.completions(p, mode)
        hits = [o.label == base_label for i, samples in outs.items() if i != 0 for o in samples]
        return sum(hits) / len(hits)

    held = statistics.mean(share(greedy, p, "greedy") for p in held_out)
    base_held = statistics.mean(greedy.completions(p, "greedy")[0][0].label == base_label for p in held_out)
    base_sampled = statistics.mean(o.label == base_label for o in sampled.completions(prompt, sampling.mode())[0])
    state = prepare(lm, [prompt], fmt, run.meta.source)[0]
    top = last_token_logits(lm.model, state, run.meta.source, run.vectors.to(lm.device)).argmax(dim=-1)
    return {
        "greedy": share(greedy, prompt, "greedy"), "sampled": share(sampled, prompt, sampling.mode()),
        "held_out": held, "base_held_out": base_held, "base_sampled": base_sampled, "median_kl": run.median_kl, "same_top": int((top[1:] == top[0]).sum()),
        "degenerate": statistics.mean(degenerates(o.text) for i, s in greedy.completions(prompt, "greedy").items() if i != 0 for o in s),
        "nll": controls.results["copies"].base_nll, "nll_random": controls.results["random_same_norm"].base_nll,
        "nll_unsteered": controls.results["unsteered"].base_nll, "agree": controls.results["copies"].held_out_agreement,
        "agree_random": controls.results["random_same_norm"].held_out_agreement,
        "p_unsteered": controls.tests().get("nll_unsteered", 1.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--copies", type=int, default=16)
    parser.add_argument("--count", type=int, default=16, help="vectors discovered to find a base")
    parser.add_argument("--variants", default=",".join(DEFAULT), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--base-run", type=Path, help="a discovery run to take the base from (skips the discovery)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the run's prompt, to discover on and to train the copies on")
    parser.add_argument("--model", choices=("smollm2", "qwen"), default="smollm2",
                        help="the embedded SmolLM2, or Qwen2.5-Coder 0.5B (a chat model fetched by bench/models.py)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    lm, fmt = load(args.model)
    names = QUICK if args.quick else [v.strip() for v in args.variants.split(",")]
    copies, steps = (1, 3) if args.quick else (args.copies, None)
    work = scratch_folder("fidelity")
    if args.base_run:
        found = read_run(args.base_run)
    else:
        cfg = DiscoverConfig(count=2 if args.quick else args.count, radius=20.0 if args.quick else "auto", steps=5 if args.quick else 100,
                             completion_tokens=8 if args.quick else 32, precision="float32")  # the bases RESULTS names were found in float32
        found = discover(lm, [args.prompt], cfg, fmt, out=work / "discover", progress=False)
    held_out = held_out_prompts(found.meta.prompts[:1])[: 1 if args.quick else None]  # one prompt of each kind, never trained on
    if args.quick:
        base_index, base_label, unsteered = 0, label(found.records[0].completion or "")[0], "?"
    else:
        choice, unsteered = choose_base(lm, found, fmt)
        base_index, base_label = choice.index, choice.label
    base = found.vectors[base_index]
    print(f"base: vector {base_index} of a discovery at R {found.meta.R:g}, layers {found.meta.source} → {found.meta.target}, "
          f"labelled {base_label} (the unsteered model: {unsteered}); {copies} copies per variant; held-out: {len(held_out)} prompts, one of each kind")
    print(f"  θ0: {(found.records[base_index].completion or '')[:100]!r}")
    print(f"{'variant':<32}{'s/copy':>8}{'median KL':>10}{'same 1st':>9}{'greedy':>8}{'sampled':>8}{'held-out':>9}{'degen.':>7}"
          f"{'faithful/min':>13}{'NLL held-out':>13}{'NLL random':>11}{'NLL unst.':>10}{'p below':>8}{'agree':>7}{'agree rnd':>10}")
    rows = {}
    for name in names:
        variant = dict(VARIANTS[name])
        options = {
            "source": found.meta.source, "target": found.meta.target, "count": copies, "block": min(16, copies), "completion_tokens": 0,
            "precision": "float32", **RELEASE_01, **variant,  # float32 unless a variant says: RESULTS' rows before auto
        }
        if options.get("extra_continuation") == AS_THE_RUNS:
            shows_at = behaviour_shows_at(lm, found.meta.prompts[0], base, found.meta.source, fmt)
            options["extra_continuation"] = options["continuation"] if options["continuation"] is not None else fast_continuation(shows_at)
        if steps is not None:  # --quick: a few steps whatever the variant asks (it checks that each runs)
            options["steps"] = steps
        start = time.perf_counter()
        run = ortho(lm, base, [found.meta.prompts[0]], OrthoConfig(**options), fmt, out=work / name.replace(" ", "_").replace(":", "").replace(",", ""), progress=False)
        seconds = time.perf_counter() - start
        m = measure(lm, run, fmt, base_label, held_out, tokens=8 if args.quick else 48)
        m["s_per_copy"] = seconds / copies
        m["per_minute"] = m["greedy"] * copies / (seconds / 60)
        rows[name] = m
        print(
            f"{name:<32}{m['s_per_copy']:>8.2f}{m['median_kl']:>10.3f}{m['same_top']:>6}/{copies:<2}{m['greedy']:>8.0%}{m['sampled']:>8.0%}"
            f"{m['held_out']:>9.0%}{m['degenerate']:>7.0%}{m['per_minute']:>13.1f}{m['nll']:>13.2f}{m['nll_random']:>11.2f}"
            f"{m['nll_unsteered']:>10.2f}{m['p_unsteered']:>8.2g}{m['agree']:>7.0%}{m['agree_random']:>10.0%}", flush=True,
        )
    print(f"(θ0 itself carries its label in {rows[names[0]]['base_sampled']:.0%} of its sampled completions and on "
          f"{rows[names[0]]['base_held_out']:.0%} of the held-out prompts)")
    reference = rows[names[0]]
    eligible = {n: m for n, m in rows.items() if m["median_kl"] <= reference["median_kl"]}
    best = max(eligible, key=lambda n: eligible[n]["per_minute"])
    top = max(rows, key=lambda n: rows[n]["greedy"])
    general = min(rows, key=lambda n: rows[n]["nll"])
    summary_line(
        f"best faithful copies per minute at a median KL no worse than 0.1's: {best} ({rows[best]['per_minute']:.1f}/min, "
        f"behaviour share {rows[best]['greedy']:.0%} greedy, {rows[best]['sampled']:.0%} sampled, {rows[best]['held_out']:.0%} held-out, "
        f"median KL {rows[best]['median_kl']:.3f}) against 0.1's {reference['per_minute']:.1f}/min and {reference['greedy']:.0%}; "
        f"highest share: {top} ({rows[top]['greedy']:.0%}, median KL {rows[top]['median_kl']:.3f}); off the training prompt, "
        f"θ0's text likeliest under {general} (held-out NLL {rows[general]['nll']:.2f} against {rows[general]['nll_random']:.2f} for "
        f"random directions at the copies' norm and {rows[general]['nll_unsteered']:.2f} unsteered, {rows[general]['s_per_copy']:.1f} s per copy)"
    )


if __name__ == "__main__":
    main()
