"""Smoke test of the benchmarks: every script's --quick setting runs and ends with its summary line.
(Timings are never asserted in tests; bench/RESULTS.md holds the measured figures.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.slow
def test_every_benchmark_runs_quick():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--quick"], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sections = out.stdout.split("## ")[1:]
    assert [s.split("\n", 1)[0] for s in sections] == [
        "model_load", "ortho_vs_seed", "full_basis", "utilisation", "discovery_speed", "eval_throughput", "gpu",
    ]
    for section in sections:
        assert "\nsummary: " in section, section
    if not torch.cuda.is_available():
        assert "summary: skipped (no CUDA device)" in sections[-1]


@pytest.mark.slow
def test_gpu_benchmark_measures_on_the_cpu_when_asked():
    """The GPU script's measuring code (float32 against bfloat16), run on the CPU so CI exercises it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--quick", "--device", "cpu"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line.split()[0] for line in out.stdout.splitlines() if line.startswith(("float32", "bfloat16"))]
    assert rows == ["float32", "bfloat16"]
    assert "summary: CPU: bfloat16 is" in out.stdout
