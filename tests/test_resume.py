"""Long runs survive crashes: SIGKILL in the middle, then --resume, ends as if nothing happened."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import interrupted_on_call
from safetensors.torch import save_file

from melbo import MelboError, read_run
from melbo.engines.discover import DiscoverConfig, discover
from melbo.engines.ortho import OrthoConfig, ortho
from melbo.objectives import max_abs_cosine


def melbo_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "melbo.cli", *args]


def ortho_args(tiny_folder, base_file, out):
    return [
        "ortho", str(base_file), "-s", "1", "-t", "4", "--model", str(tiny_folder), "--count", "24", "--block", "4",
        "--steps", "100", "--plateau", "0", "--completion-tokens", "0", "--device", "cpu", "--out", str(out),
        "--match", "mean", "--continuation", "0", "--extra-prompts", "0",  # melbo 0.1's objective: cheap, and what these tests were sized for
    ]


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_folder, tmp_path):
    base = torch.randn(32, generator=torch.Generator().manual_seed(3))
    base_file = tmp_path / "base.safetensors"
    save_file({"vectors": (3 * base / base.norm())[None]}, str(base_file))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    reference = tmp_path / "reference"
    done = subprocess.run(melbo_cli(*ortho_args(tiny_folder, base_file, reference)), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(melbo_cli(*ortho_args(tiny_folder, base_file, run_dir)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    saved_blocks = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                saved_blocks = json.loads((run_dir / "run.json").read_text())["progress"]["block_index"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                saved_blocks = 0
            if saved_blocks >= 2:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed: make it longer"
    assert saved_blocks < 6

    resumed = subprocess.run(melbo_cli(*ortho_args(tiny_folder, base_file, run_dir), "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    finished, expected = read_run(run_dir), read_run(reference)
    assert finished.meta.status == "complete"
    assert finished.vectors.shape == expected.vectors.shape == (25, 32)  # no vector lost or duplicated
    torch.testing.assert_close(finished.vectors, expected.vectors, atol=1e-6, rtol=1e-5)
    assert max_abs_cosine(finished.vectors) <= 1e-5
    assert [r.index for r in finished.records] == list(range(25))
    assert sorted(os.listdir(run_dir)) == ["run.json", "vectors.safetensors"]  # a write cut by the kill left nothing behind
    sessions = finished.meta.sessions
    assert len(sessions) == 2
    # the resumed process started where the saved run ended: at most the block in flight was redone
    assert sessions[1].from_block >= saved_blocks


def test_resume_with_other_settings_is_refused(tiny_folder, tmp_path):
    base_file = tmp_path / "base.safetensors"
    save_file({"vectors": torch.ones(1, 32)}, str(base_file))
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = ortho_args(tiny_folder, base_file, out)
    args[args.index("--count") + 1] = "4"
    args[args.index("--steps") + 1] = "5"
    assert subprocess.run(melbo_cli(*args), env=env, capture_output=True, timeout=300).returncode == 0
    args[args.index("--steps") + 1] = "7"
    result = subprocess.run(melbo_cli(*args, "--resume", "--penalty", "0.5"), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert "config.steps (5 in the run, 7 now)" in message and "config.penalty (0.000625 in the run, 0.5 now)" in message  # 0.02/‖θ0‖², ‖θ0‖² = 32


def test_discover_resume_gives_the_same_vectors(tiny_lm, tmp_path, monkeypatch):
    cfg = DiscoverConfig(source=1, target=4, radius=4.0, count=9, block=3, steps=8, completion_tokens=0)
    whole = discover(tiny_lm, ["hello"], cfg, out=tmp_path / "whole")

    import melbo.engines.discover as engine

    real = engine.DiscoveryProblem.train
    monkeypatch.setattr(engine.DiscoveryProblem, "train", interrupted_on_call(real, 3))
    with pytest.raises(KeyboardInterrupt):
        discover(tiny_lm, ["hello"], cfg, out=tmp_path / "cut")
    assert read_run(tmp_path / "cut").vectors.shape[0] == 6
    monkeypatch.setattr(engine.DiscoveryProblem, "train", real)
    resumed = discover(tiny_lm, ["hello"], cfg, out=tmp_path / "cut", resume=True)
    torch.testing.assert_close(resumed.vectors, whole.vectors)
    assert resumed.meta.sessions[1].from_block == 2
    with pytest.raises(MelboError, match=r"config.radius \(4.0 in the run, 5.0 now\)"):
        discover(tiny_lm, ["hello"], DiscoverConfig(**{**cfg.__dict__, "radius": 5.0}), out=tmp_path / "cut", resume=True)


@pytest.mark.parametrize("optimizer, why", [("adam", "NaN/inf twice"), ("lbfgs", "NaN/inf at its starting point")])
def test_nan_is_retried_then_dropped_with_a_warning(tiny_lm, monkeypatch, optimizer, why):
    """A block whose loss turns NaN goes back to its last good state with a smaller step (L-BFGS: only the rows
    that failed); a block that keeps failing is dropped and the run records why. Nothing non-finite is saved."""
    import melbo.engines.ortho as engine

    real = engine._Problem.losses
    calls = {"n": 0}

    def flaky(self, thetas, full=False, **kw):
        calls["n"] += 1
        out = real(self, thetas, full, **kw)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(engine._Problem, "losses", flaky)
    base = 3 * torch.nn.functional.normalize(torch.randn(32), dim=0)
    cfg = OrthoConfig(source=1, target=4, count=4, block=4, steps=20, min_norm=0.0, optimizer=optimizer)
    run = ortho(tiny_lm, base, ["hello"], cfg)
    assert run.vectors.shape == (5, 32) and torch.isfinite(run.vectors).all()
    assert run.meta.warnings == []  # recovered by the retry

    def always_nan(self, thetas, full=False, **kw):
        return real(self, thetas, full) * float("nan")

    monkeypatch.setattr(engine._Problem, "losses", always_nan)
    run = ortho(tiny_lm, base, ["hello"], cfg)
    assert run.vectors.shape == (1, 32)
    assert why in run.meta.warnings[0]
    # the stop names the NaN, not a used-up basis (a compiled kernel served from a cache built for another instruction
    # set gave NaN in every row: "basis exhausted" sent the user the wrong way)
    assert run.meta.stopped == "not finite: the last 4 vectors were dropped, block 0's loss NaN/inf"
    # and the printed summary says so where a run of no copies printed no reason at all
    from melbo.output import tables

    assert str(tables.ortho_run(run)[-1]) == "no copies; stopped: not finite: the last 4 vectors were dropped, block 0's loss NaN/inf"


def test_ctrl_c_stops_cleanly_after_saving(tiny_folder, tmp_path):
    base_file = tmp_path / "base.safetensors"
    save_file({"vectors": torch.ones(1, 32)}, str(base_file))
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = ortho_args(tiny_folder, base_file, run_dir)
    args[args.index("--steps") + 1] = "1500"  # blocks of a few seconds: the interrupt lands mid-run
    # A job started in the background by a non-interactive shell (as CI may be) inherits SIGINT ignored, and
    # Python then installs no Ctrl-C handler: give the child the disposition a terminal user's process has.
    proc = subprocess.Popen(
        melbo_cli(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not (run_dir / "run.json").is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    saved = read_run(run_dir)  # what was saved is a valid, orthogonal run
    assert saved.meta.status == "running" and max_abs_cosine(saved.vectors) <= 1e-5


def test_a_run_made_before_a_setting_existed_resumes_at_its_default(tiny_lm, tmp_path, monkeypatch):
    """Settings added after the first release (extra_prompts, first_weight, precision, warmup) default to what melbo did before
    them: a run whose run.json predates one resumes as if it recorded that default, and a resume that asks otherwise is
    refused naming the default the run ran at."""
    base = torch.randn(tiny_lm.d_model, generator=torch.Generator().manual_seed(1)) * 3
    cfg = OrthoConfig(source=1, target=4, count=6, block=2, steps=4, completion_tokens=0, match="mean", continuation=0, extra_prompts=0, precision="float32")
    whole = ortho(tiny_lm, base, ["hello"], cfg, out=tmp_path / "whole")

    import melbo.engines.ortho as engine

    real = engine._Engine.train
    monkeypatch.setattr(engine._Engine, "train", interrupted_on_call(real, 2))
    with pytest.raises(KeyboardInterrupt):
        ortho(tiny_lm, base, ["hello"], cfg, out=tmp_path / "cut")
    monkeypatch.setattr(engine._Engine, "train", real)
    meta_file = tmp_path / "cut" / "run.json"
    meta = json.loads(meta_file.read_text())
    for key in ("extra_prompts", "first_weight", "precision", "warmup"):  # as a run of an earlier melbo records it
        del meta["config"][key]
    meta_file.write_text(json.dumps(meta))

    with pytest.raises(MelboError, match=r"config.precision \('float32' in the run, 'bfloat16' now\)"):
        ortho(tiny_lm, base, ["hello"], OrthoConfig(**{**cfg.__dict__, "precision": "bfloat16"}), out=tmp_path / "cut", resume=True)
    # the mode's default is 4 extra prompts since, and the precision auto: left to the mode and the device (one with
    # bfloat16 units here), the resume goes on at the run's (none, float32)
    monkeypatch.setattr(engine, "bfloat16_is_fast", lambda device: True)
    resumed = ortho(tiny_lm, base, ["hello"], dataclasses.replace(cfg, extra_prompts=None, precision="auto"), out=tmp_path / "cut", resume=True)
    torch.testing.assert_close(resumed.vectors, whole.vectors)
    assert resumed.meta.sessions[1].from_block == 1 and resumed.meta.config["precision"] == "float32"
    assert resumed.meta.config["extra_prompts"] == 0 and resumed.meta.prompts == ["hello"]
    assert resumed.meta.config["warmup"] == 0


def test_a_run_resumes_with_compilation_switched(tiny_lm, tmp_path):
    """Compiling changes speed, not the run (to rounding): a run made eagerly resumes with --compile on, and run.json
    records how the last session ran."""
    base = torch.randn(32, generator=torch.Generator().manual_seed(7))
    cfg = dict(source=1, target=4, count=2, block=2, steps=3, completion_tokens=0, extra_prompts=0)
    first = ortho(tiny_lm, base, ["how do I do it?"], OrthoConfig(**cfg, compile="off"), out=tmp_path / "run")
    again = ortho(tiny_lm, base, ["how do I do it?"], OrthoConfig(**cfg, compile="on"), out=tmp_path / "run", resume=True)
    assert torch.equal(again.vectors, first.vectors) and first.meta.config["compiled"] is False
    with pytest.raises(MelboError, match="different settings: config.steps"):
        ortho(tiny_lm, base, ["how do I do it?"], OrthoConfig(**{**cfg, "steps": 4}, compile="on"), out=tmp_path / "run", resume=True)
