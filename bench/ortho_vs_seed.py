"""MELBO-ortho throughput: melbo's fast mode against the post's algorithm as written (``--mode seed``), side by
side in one run on the embedded SmolLM2, same base vector and prompt. Target: fast ≥ 20× faster per accepted
vector (last-token KL to the base ≤ --accept), with equal or better median KL.

Seed mode runs one vector at a time for 1000 Adam steps through the whole model; the full setting runs a few
such vectors and extrapolates per vector (printed as such).

    .venv/bin/python bench/ortho_vs_seed.py --quick      # seconds: 5 steps each, 1 seed and 4 fast vectors
    .venv/bin/python bench/ortho_vs_seed.py              # 3 seed vectors × 1000 steps, 64 fast, 32 fast with Adam

The third row is fast mode with ``--optimizer adam`` (melbo's earlier default): what the per-row L-BFGS adds.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from common import base_vector, summary_line, verdict

from melbo.engines.ortho import OrthoConfig, ortho
from melbo.model.forward import last_token_logits, prepare
from melbo.model.loading import load_model
from melbo.model.prompts import DEFAULT_PROMPT, PromptFormat
from melbo.objectives import kl_divergence, max_abs_cosine

SOURCE = 8  # OrthoConfig's default layers, 8 → 20, as in the demo


def unsteered_kl(lm, base) -> float:
    """KL(P_unsteered ‖ P_base) at the last prompt token: where "no steering at all" stands."""
    state = prepare(lm, [DEFAULT_PROMPT], PromptFormat(), SOURCE)[0]
    logits = last_token_logits(lm.model, state, SOURCE, torch.stack([torch.zeros_like(base), base]))
    return float(kl_divergence(logits[:1], logits[1:]))


def quality(run, accept: float, relative: float) -> dict:
    kls = sorted(r.kl for r in run.records[1:])
    return {
        "vectors": len(kls),
        "accepted": sum(k <= accept for k in kls),
        "accepted_rel": sum(k <= relative for k in kls),
        "median_kl": statistics.median(kls),
        "p90_kl": kls[min(len(kls) - 1, int(0.9 * len(kls)))],
        "max_cos": max_abs_cosine(run.vectors.double()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--accept", type=float, default=0.1, help="a vector counts when its KL to the base is at most this")
    parser.add_argument("--seed-vectors", type=int, default=3, help="vectors for the (slow) seed mode")
    parser.add_argument("--fast-vectors", type=int, default=64)
    parser.add_argument("--adam-vectors", type=int, default=32, help="vectors for fast mode with Adam (0: skip the row)")
    args = parser.parse_args()
    seed_n, seed_steps, fast_n, fast_steps, adam_n = (
        (1, 5, 4, 5, 4) if args.quick else (args.seed_vectors, 1000, args.fast_vectors, None, args.adam_vectors)
    )
    texts = 0 if args.quick else OrthoConfig().completion_tokens  # --quick skips the stored completions
    torch.set_num_threads(min(2, torch.get_num_threads()))
    lm = load_model("smollm2", device="cpu")
    base = base_vector(lm, quick=args.quick)
    relative = unsteered_kl(lm, base) / 2
    rows = []
    settings = [
        ("seed (post, as written)", OrthoConfig(mode="seed", count=seed_n, steps=seed_steps, completion_tokens=texts)),
        ("fast (run's prompt only)", OrthoConfig(mode="fast", precision="float32", extra_prompts=0, count=fast_n, block=min(16, fast_n), steps=fast_steps, completion_tokens=texts)),
    ]
    if adam_n:
        settings.append(("fast, --optimizer adam", OrthoConfig(mode="fast", precision="float32", extra_prompts=0, count=adam_n, block=min(16, adam_n), steps=fast_steps, optimizer="adam", completion_tokens=texts)))
    for name, cfg in settings:
        start = time.perf_counter()
        run = ortho(lm, base, [DEFAULT_PROMPT], cfg, PromptFormat(), progress=False)
        seconds = time.perf_counter() - start
        q = quality(run, args.accept, relative)
        q["s_per_vector"] = seconds / q["vectors"]
        if name.startswith("seed") and seed_steps != 1000:
            q["s_per_vector"] *= 1000 / seed_steps  # extrapolated to the post's 1000 steps
        for key in ("accepted", "accepted_rel"):
            q[f"s_per_{key}"] = q["s_per_vector"] * q["vectors"] / q[key] if q[key] else float("inf")
        rows.append((name, q))
    print(
        f"base vector: norm {float(base.norm()):.1f}; KL(P_unsteered ‖ P_0) = {2 * relative:.3f}. Accepted: last-token "
        f"KL(P_i ‖ P_0) ≤ {args.accept} (the issue's threshold), and ≤ {relative:.3f} (half the unsteered model's KL)"
    )
    print(
        f"{'mode':<26}{'vectors':>8}{'≤' + format(args.accept, 'g'):>7}{'≤½ unst.':>9}{'s/vector':>10}{'s/accepted':>11}"
        f"{'median KL':>10}{'p90 KL':>8}{'max|cos|':>10}"
    )
    for name, q in rows:
        per = q["s_per_accepted"] if q["accepted"] else q["s_per_accepted_rel"]
        per_text = f"{per:.2f}" if math.isfinite(per) else "— (none)"
        print(
            f"{name:<26}{q['vectors']:>8}{q['accepted']:>7}{q['accepted_rel']:>9}{q['s_per_vector']:>10.2f}{per_text:>11}"
            f"{q['median_kl']:>10.3f}{q['p90_kl']:>8.3f}{q['max_cos']:>10.1e}"
        )
    print(f"(seed mode: {seed_n} vector(s) at {seed_steps} steps" + (", per-vector time extrapolated to 1000 steps)" if seed_steps != 1000 else ")"))
    seed, fast = rows[0][1], rows[1][1]
    if len(rows) > 2:
        adam = rows[2][1]
        print(f"(per-row L-BFGS against Adam in fast mode: {adam['s_per_vector'] / fast['s_per_vector']:.1f}× faster per vector, "
              f"median KL {fast['median_kl']:.3f} vs {adam['median_kl']:.3f})")
    speed = seed["s_per_vector"] / fast["s_per_vector"]
    key, what = ("accepted", f"KL ≤ {args.accept}") if seed["accepted"] and fast["accepted"] else ("accepted_rel", "KL ≤ ½ unsteered")
    if seed[key] and fast[key]:
        per_accepted = seed[f"s_per_{key}"] / fast[f"s_per_{key}"]
        accepted = f"{per_accepted:.1f}× per accepted vector ({what})"
    elif fast[key]:  # the seed run accepted none: its cost per accepted vector is at least its whole time
        per_accepted = seed["s_per_vector"] * seed["vectors"] / fast[f"s_per_{key}"]
        accepted = f"at least {per_accepted:.1f}× per accepted vector ({what}; seed accepted 0 of {seed['vectors']})"
    else:
        per_accepted, accepted = 0.0, f"no speed per accepted vector (fast accepted 0 of {fast['vectors']} at {what})"
    met = per_accepted >= 20 and fast["median_kl"] <= seed["median_kl"]
    summary_line(
        f"fast is {speed:.1f}× faster per vector and {accepted}; median KL {fast['median_kl']:.3f} (fast) vs "
        f"{seed['median_kl']:.3f} (seed); target ≥ 20× at equal or better KL: {verdict(met, args.quick)}"
    )


if __name__ == "__main__":
    main()
