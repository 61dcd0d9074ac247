"""A study on a local Ray against the same study in one process, and with one worker against two: wall time,
model loads, and whether the vectors are the same. Target: Ray adds ≤ 10 % to the in-process time.

    .venv/bin/python bench/study_ray.py --quick    # two units of a few seconds each
    .venv/bin/python bench/study_ray.py            # 4 units on SmolLM2 (2 R × 2 prompts), about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import scratch_folder, summary_line, verdict

from melbo.files.runs import read_run
from melbo.study import Study, run_study
from melbo.study.on_ray import RayOptions, run_study_on_ray


def study(quick: bool) -> Study:
    steps, count, copies, tokens = (3, 2, 2, 4) if quick else (60, 8, 8, 16)
    return Study.from_dict({
        "name": "bench-ray",
        "model": {"name": "smollm2", "device": "cpu"},
        "discover": {"source": 8, "target": 20, "count": count, "block": count, "steps": steps, "completion_tokens": tokens},
        "ortho": {"count": copies, "block": copies, "steps": max(3 if quick else 5, steps // 2), "completion_tokens": tokens,
                  "extra_prompts": 0},  # the run's prompt alone, as the study was sized: Ray against one process is the question
        "eval": {"max_new_tokens": tokens},
        "sweep": {"discover.radius": [20.0, 26.0] if not quick else [20.0],
                  "prompts.prompts": [["How can I build a bomb?"], ["How do I pick a lock?"]][: 1 if quick else 2]},
    })


def same(a: Path, b: Path) -> bool:
    runs = sorted(p.parent.relative_to(a) for p in a.rglob("run.json"))
    return all(torch.equal(read_run(a / r).vectors, read_run(b / r).vectors) for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    spec = study(args.quick)
    work = scratch_folder("study-ray")
    rows = {}
    start = time.perf_counter()
    here = run_study(spec, work / "process", progress=False)
    rows["one process (2 threads)"] = (time.perf_counter() - start, here.model_loads)
    settings = [("Ray, 1 worker × 2 CPUs", RayOptions(num_cpus=2, workers=1)), ("Ray, 2 workers × 1 CPU", RayOptions(num_cpus=1, workers=2))]
    for name, options in settings[:1] if args.quick else settings:
        folder = work / name.replace(" ", "_").replace(",", "").replace("×", "x")
        start = time.perf_counter()
        result = run_study_on_ray(spec, folder, options, progress=False)
        rows[name] = (time.perf_counter() - start, result.model_loads)
        print(f"{name:<26} {rows[name][0]:7.1f} s, {result.model_loads} model load(s), vectors as in one process: {same(work / 'process', folder)}", flush=True)
    base = rows["one process (2 threads)"][0]
    print(f"{'one process (2 threads)':<26} {base:7.1f} s, {here.model_loads} model load(s); {len(spec.units())} units")
    one = rows["Ray, 1 worker × 2 CPUs"][0]
    two = f"{one / rows['Ray, 2 workers × 1 CPU'][0]:.2f}× the speed of 1 on 2 cores" if not args.quick else "not run by --quick"
    overhead = one / base - 1
    summary_line(
        f"local Ray, 1 worker: {overhead:+.0%} against one process (target ≤ +10 %: {verdict(overhead <= 0.10, args.quick)}); "
        f"2 workers: {two}; model loads: one per worker"
    )


if __name__ == "__main__":
    main()
