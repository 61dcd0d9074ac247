"""What the benchmarks share: the base vector they start from, the machine's pace while they run, a scratch folder for
their runs, and the summary line they end with."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from melbo.analysis.choose import choose_bases, score_candidates
from melbo.analysis.config import ChooseConfig
from melbo.engines.discover import discover
from melbo.model.loading import LoadedModel
from melbo.model.prompts import DEFAULT_PROMPT, PromptFormat
from melbo.study import demo_study


def base_vector(lm: LoadedModel, quick: bool) -> Tensor:
    """A base vector as the demo finds one (its discovery: R chosen for the model, layers 8 → 20; the clearest fluent
    behaviour); with ``quick``, a random direction of norm 30."""
    if quick:
        theta = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
        return 30 * theta / theta.norm()
    unit = demo_study().units()[0]
    assert unit.discover is not None
    run = discover(lm, unit.prompts.prompts, unit.discover, PromptFormat(), progress=False)
    return run.vectors[choose_bases(score_candidates(lm, run, unit.prompts.prompts[0], PromptFormat()), ChooseConfig())[0].index]


SCRATCH_PREFIX = "melbo-bench-"  # every benchmark's scratch folder starts so (the smoke test checks none is left)


def scratch_folder(name: str) -> Path:
    """A new temporary folder for a benchmark's runs (``melbo-bench-NAME-…``), removed when the interpreter exits: a
    benchmark reports figures, and its runs are only the way to them (run_all --in-process runs every script in one
    interpreter, so a folder per script lasts until the last one ends). A SIGTERM (``timeout``, a scheduler's time
    limit) ends the interpreter as an exit does, so the folder goes then too."""
    folder = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{name}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # by default SIGTERM ends Python without its exit handlers
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    return folder


def pace(size: int = 1024, repeats: int = 5) -> float:
    """The machine's pace now, in GFLOP/s: the best of ``repeats`` float32 products ``(size, size) @ (size, size)`` on
    the threads torch has. A long bench reads it beside its blocks, so that a slow hour can be told apart from slow work
    (a 2-core cloud machine's speed drifts: the same first 12 Qwen blocks took 26.1 min one hour and 15.8 the next)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


# the variables that hold PyTorch's CPU kernels to an instruction set (bench/as_avx2 sets all three)
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def kernels() -> str:
    """Which instructions PyTorch's CPU kernels use here: its own (and inductor's) capability, and the caps set on MKL
    (float32 products) and oneDNN (bfloat16 products); a bench prints it beside its pace, so that a run under
    ``bench/as_avx2`` says so."""
    caps = ", ".join(f"{name}={os.environ[name]}" for name in ISA_CAPS if os.environ.get(name))
    return f"{torch.backends.cpu.get_cpu_capability()} kernels" + (f" (capped: {caps})" if caps else "")


def summary_line(text: str) -> None:
    print(f"summary: {text}")


def verdict(met: bool, quick: bool) -> str:
    """A target's verdict for a summary line: a --quick run's figures only show that the code ran (fewer tokens, rows or
    steps than the target names), so it judges nothing."""
    return "not measured by --quick" if quick else ("met" if met else "missed")


__all__ = ["DEFAULT_PROMPT", "ISA_CAPS", "base_vector", "kernels", "pace", "summary_line", "verdict"]
