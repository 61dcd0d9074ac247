"""Run every benchmark and write bench/RESULTS.md from what they print.

    .venv/bin/python bench/run_all.py                  # full settings, about 1.5 hours on 2 CPU cores
    .venv/bin/python bench/run_all.py --quick          # every script's --quick, to stdout only
    .venv/bin/python bench/run_all.py --only model_load,eval_throughput   # update those sections only
    .venv/bin/python bench/run_all.py --args full_basis="--count 96"      # extra arguments for one script
    .venv/bin/python bench/run_all.py --quick --in-process                # one interpreter for all (the smoke test)

RESULTS.md keeps one section per script; --only rewrites the named sections and keeps the others. A section opens with
its script's full output (command, date, machine, output), written here; the runs added below it (other arguments, other
models, each with its own command, date and machine) and what they say are kept when the opening is rewritten.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import os
import platform
import re
import runpy
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

from melbo.files.io import atomic_write

HERE = Path(__file__).resolve().parent
SCRIPTS = (
    "model_load", "ortho_vs_seed", "full_basis", "utilisation", "discovery_speed", "eval_throughput", "gpu",
    "auto_radius", "fidelity", "serve", "study_ray",
)
RESULTS = HERE / "RESULTS.md"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_units() -> str:
    """", AMX-BF16" or ", AVX512-BF16" where the CPU has them (bfloat16 products run several times faster there: two
    Xeons that both report AVX512 kernels differ by that)."""
    import torch

    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return ", AMX-BF16"
    return ", AVX512-BF16" if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() else ""


def machine() -> str:
    """One line naming this machine; every section carries it, since --only may update sections on another."""
    text = f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"
    try:
        import torch
        from common import kernels

        device = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else f"CPU, {kernels()}{bf16_units()}"
        text += f", torch {torch.__version__} ({device})"
    except ImportError:
        pass
    return text


def run(script: str, extra: list[str], quick: bool) -> tuple[str, float, int]:
    command = [sys.executable, str(HERE / f"{script}.py"), *(["--quick"] if quick else []), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE)}
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    text = out.stdout + (f"\n[stderr]\n{out.stderr.strip()}" if out.returncode else "")
    return text.strip(), time.perf_counter() - start, out.returncode


def run_here(script: str, extra: list[str], quick: bool) -> tuple[str, float, int]:
    """One script in this interpreter, as ``python bench/SCRIPT.py`` would run it: the smoke test's way, which imports
    torch and transformers once for all scripts instead of once each."""
    saved_argv, saved_path = sys.argv, sys.path[:]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)  # their subprocesses
    sys.argv, sys.path[:0] = [str(HERE / f"{script}.py"), *(["--quick"] if quick else []), *extra], [str(HERE)]
    out, code = io.StringIO(), 0
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(HERE / f"{script}.py"), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int | None):
            out.write(f"\n{exc.code}")
    except Exception:  # a failing script is reported, as a subprocess's exit status would be, and the others still run
        code = 1
        out.write("\n[stderr]\n" + traceback.format_exc())
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return out.getvalue().strip(), time.perf_counter() - start, code


def sections(text: str) -> dict[str, str]:
    found = {}
    for match in re.finditer(r"^## (\w+)\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL):
        found[match[1]] = match[2].strip()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=",".join(SCRIPTS))
    parser.add_argument("--args", action="append", default=[], metavar="SCRIPT=ARGS")
    parser.add_argument("--in-process", action="store_true", help="with --quick: every script in this interpreter (the smoke test)")
    args = parser.parse_args()
    if args.in_process and not args.quick:
        sys.exit("run_all: --in-process is for --quick (full runs measure each script in its own process)")
    extra = {k: shlex.split(v) for k, v in (a.split("=", 1) for a in args.args)}
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCRIPTS]
    if unknown:
        sys.exit(f"run_all: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(SCRIPTS)}")
    old = sections(RESULTS.read_text(encoding="utf-8")) if RESULTS.is_file() and not args.quick else {}
    failed = 0
    here = machine()
    for script in chosen:
        output, seconds, code = (run_here if args.in_process else run)(script, extra.get(script, []), args.quick)
        failed += code != 0
        command = " ".join(["python", f"bench/{script}.py", *(["--quick"] if args.quick else []), *extra.get(script, [])])
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        body = f"`{command}` — {when}, {seconds:.0f} s{'' if code == 0 else f', FAILED (exit {code})'}\nMachine: {here}.\n\n```\n{output}\n```"
        print(f"## {script}\n{body}\n", flush=True)
        old[script] = with_added_runs(body, old.get(script, ""))
        if not args.quick:
            write(old)  # after every script: a run stopped part-way keeps the sections it finished
    if not args.quick:
        print(f"wrote {RESULTS}")
    sys.exit(1 if failed else 0)


def with_added_runs(opening: str, section: str) -> str:
    """A section whose opening (command line, machine line, output block) is ``opening``, keeping what ``section`` has
    below its own opening: the runs added by hand with their commands, dates and machines."""
    match = re.match(r".*?^```\n.*?^```$", section, re.DOTALL | re.MULTILINE)  # up to the end of the first output block
    added = section[match.end():].strip() if match else ""
    return f"{opening}\n\n{added}" if added else opening


def write(found: dict[str, str]) -> None:
    lines = [
        "# melbo benchmarks",
        "",
        "Written by `bench/run_all.py`: each section opens with one script's full output; runs added below it (other",
        "arguments or models) carry their own command, date and machine, and run_all keeps them. Absolute times depend on",
        "the machine (each run names its own); the ratios in each summary line are measured side by side in one run.",
        "",
    ]
    for script in SCRIPTS:
        if script in found:
            lines += [f"## {script}", found[script], ""]
    atomic_write(RESULTS, lambda tmp: tmp.write_text("\n".join(lines), encoding="utf-8"))


if __name__ == "__main__":
    main()
