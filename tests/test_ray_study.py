"""Studies on Ray: the same folder and vectors as in one process, a two-node cluster that loses a node's workers
mid-study and still finishes with nothing lost, and one-line errors for what cannot start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import assert_one_line_error, melbo, melbo_here
from test_study import grid_study

from melbo import read_run
from melbo.study import Study, run_study
from melbo.study.on_ray import NOTHING_TO_RUN, RayOptions, ray_session, run_study_on_ray
from melbo.study.pipeline import finished

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.xdist_group("ray")  # the Ray tests on one worker: at most two Rays at once with the bench's
HERE = Path(__file__).resolve().parent


def same_runs(a: Path, b: Path, result) -> None:
    for unit in result.units:
        for folder in [unit.discovery, *[o.folder for o in unit.orthos]]:
            assert torch.equal(read_run(a / folder).vectors, read_run(b / folder).vectors), folder


def test_local_ray_gives_the_folder_and_vectors_of_one_process(two_models, tmp_path):
    spec = tmp_path / "grid.toml"
    spec.write_text(grid_study(two_models))
    assert not finished(Study.from_toml(spec), tmp_path / "here")
    here = run_study(Study.from_toml(spec), tmp_path / "here")
    assert finished(Study.from_toml(spec), tmp_path / "here")
    assert not finished(Study.from_toml(spec).with_settings(["eval.max_new_tokens=5"]), tmp_path / "here")  # other settings
    notes: list[str] = []  # resumed when finished: no Ray, from the API as from the CLI
    with ray_session(Study.from_toml(spec), tmp_path / "here", RayOptions(), resume=True, on_note=notes.append) as session:
        assert session is None and notes == [NOTHING_TO_RUN]
    again_here = run_study_on_ray(Study.from_toml(spec), tmp_path / "here", resume=True)
    assert again_here.model_loads == 0 and not ray.is_initialized()
    result = melbo("study", str(spec), "--ray", "--out", str(tmp_path / "ray"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 model load(s)" in result.stdout  # one per worker (one worker per model here), not one per run
    same_runs(tmp_path / "here", tmp_path / "ray", here)
    files = sorted(str(p.relative_to(tmp_path / "here")) for p in (tmp_path / "here").rglob("*") if p.suffix != ".html" and "plots" not in p.parts)
    assert files == sorted(str(p.relative_to(tmp_path / "ray")) for p in (tmp_path / "ray").rglob("*") if p.suffix != ".html" and "plots" not in p.parts)
    saved = json.loads((tmp_path / "ray" / "study.json").read_text())
    assert [u["steps"].keys() for u in saved["units"]] == [u.steps.keys() for u in here.units]
    again = melbo("study", str(spec), "--ray", "--out", str(tmp_path / "ray"), "--resume")
    assert again.returncode == 0 and "0 model load(s)" in again.stdout  # every unit finished: no worker started
    assert "Ray is not started" in again.stderr  # nor Ray itself


def long_study(models: list[str], steps: int, copies: int) -> str:
    """The grid study with longer discovery and more copies, so that a unit is still running when something happens."""
    text = grid_study(models)
    ortho_steps, ortho_count = "steps = 8\ncompletion_tokens = 4\nextra_prompts = 0\n[eval]", "[ortho]\ncount = 4\nblock = 4"
    assert text.count(ortho_steps) == 1 and text.count(ortho_count) == 1, "grid_study's [ortho] table changed: size the long study again"
    text = text.replace(ortho_steps, f"steps = {steps}\nplateau = 0.0\ncompletion_tokens = 4\nextra_prompts = 0\n[eval]")
    return text.replace(ortho_count, f"[ortho]\ncount = {copies}\nblock = 4")


def ray_processes(temp: Path) -> set[int]:
    """The Ray servers started with ``temp`` as Ray's temp dir (it is on their command lines): this test's only, whatever
    else runs on the machine."""
    return {p.pid for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] in {"raylet", "gcs_server"} and any(str(temp) in part for part in p.info["cmdline"] or [])}


@pytest.fixture(scope="module")
def long_reference(two_models, tmp_path_factory):
    """A study long enough to be interrupted, and its uninterrupted run in this process."""
    root = tmp_path_factory.mktemp("long")
    spec = root / "long.toml"
    spec.write_text(long_study(two_models, steps=60, copies=16))
    return spec, root / "reference", run_study(Study.from_toml(spec), root / "reference")


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_the_ray_workers_and_resume_finishes_the_same_study(stop, long_reference, tmp_path):
    """Ctrl-C (SIGINT to the foreground group) or a scheduler's SIGTERM to melbo: the same clean stop, no stack dump."""
    spec, reference_folder, reference = long_reference
    out = tmp_path / "ray"
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 characters
    scratch = temp / "scratch"  # the temp dir of melbo and its workers: where their unit folders go
    scratch.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "RAY_TMPDIR": str(temp), "TMPDIR": str(scratch)}
    command = [sys.executable, "-m", "melbo.cli", "study", str(spec), "--ray", "--out", str(out)]
    # its own process group, which gets the SIGINT, as a terminal's Ctrl-C reaches the whole foreground group; SIGINT as
    # in a foreground job (a test run started in the background by a non-interactive shell has it ignored, and so would
    # melbo: that was one CI run's failure)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while not list(out.rglob("run.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the first block of some run has reached the driver's folder
        assert proc.poll() is None, "the study finished before it could be interrupted"
        assert ray_processes(temp), "no Ray server runs under this test's temp dir"  # so the check below can fail
        if stop == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == (130 if stop == "ctrl-c" else 143), stderr[-3000:]  # SIGTERM: as Ctrl-C is, with its own status
    assert "Traceback" not in stderr and "--resume" in stderr.strip().splitlines()[-1]
    assert "SIGTERM received" not in stderr and "Stack trace" not in stderr and "*** " not in stderr, stderr[-3000:]
    deadline = time.monotonic() + 30
    while ray_processes(temp) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes(temp), "Ray processes were left running"
    assert not list(scratch.glob("melbo-unit-*")), "the killed workers' unit folders were left"
    shutil.rmtree(temp, ignore_errors=True)
    assert not (out / "study.html").exists()  # stopped part-way: the study page comes when every unit has run
    if stop == "sigterm":
        return  # the same clean stop; resuming after it is what the Ctrl-C case checks
    again = melbo("study", str(spec), "--ray", "--out", str(out), "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    same_runs(reference_folder, out, reference)


def test_scratch_folders_of_gone_workers_are_swept_and_live_ones_kept(tmp_path):
    """A killed worker's unit folder (its process gone) is removed; a live worker's, another study's when a token is
    given, and folders not named as melbo's are kept."""
    from melbo.study import scratch

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    folders = {name: tmp_path / f"melbo-unit-{name}" for name in (f"aaa-{gone}-x1", f"bbb-{gone}-x2", f"aaa-{os.getpid()}-x3", "old_style")}
    for folder in folders.values():
        (folder / "u" / "discover").mkdir(parents=True)
        (folder / "u" / "discover" / "run.json").write_text("{}")
    assert scratch.sweep(tmp_path, token="aaa") == [folders[f"aaa-{os.getpid()}-x3"]]  # this process is alive
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for n, f in folders.items() if n != f"aaa-{gone}-x1")
    scratch.sweep(tmp_path)  # a worker starting on the node: any study's
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"melbo-unit-aaa-{os.getpid()}-x3", "melbo-unit-old_style"]
    made = scratch.make_scratch("ccc")
    try:
        assert made.name.startswith(f"melbo-unit-ccc-{os.getpid()}-") and scratch.sweep(made.parent, token="ccc") == [made]
    finally:
        shutil.rmtree(made)


def unshare_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not unshare_works(), reason="needs `unshare -n` (a network namespace of its own, so the cluster lives on loopback only)")
def test_two_node_cluster_loses_a_nodes_workers_and_still_finishes(long_reference, tmp_path):
    spec, reference_folder, reference = long_reference
    report = tmp_path / "report.json"
    script = f"ip link set lo up && exec {sys.executable} {HERE / 'ray_two_nodes.py'} {spec} {tmp_path / 'cluster'} {report}"
    done = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(report.read_text())
    assert facts["returncode"] == 0, facts["stderr"]
    assert facts["killed"] >= 1 and facts["kill_seen_running"], f"no worker of the node was killed mid-run: {facts['stderr'][-2000:]}"
    assert facts["addresses"] and set(facts["addresses"]) <= {"127.0.0.1", "0.0.0.0", "::", "::ffff:127.0.0.1"}  # only loopback exists here
    assert facts["left"] == 0, facts["left_names"]  # every process started for the cluster was stopped
    same_runs(reference_folder, tmp_path / "cluster", reference)
    for rel in facts["interrupted"]:  # runs the killed node was in the middle of, with a block already saved
        sessions = json.loads((tmp_path / "cluster" / rel).read_text())["sessions"]
        assert len(sessions) > 1, f"{rel} did not go on from its saved block after the kill"


def test_what_cannot_start_is_one_line(two_models, tmp_path):
    spec = tmp_path / "grid.toml"
    spec.write_text(grid_study(two_models))
    assert_one_line_error(melbo("study", str(spec), "--ray", "127.0.0.1:1", "--out", str(tmp_path / "a")), "cannot reach the Ray cluster")
    assert_one_line_error(melbo_here("study", str(spec), "--ray", "nonsense", "--out", str(tmp_path / "b")), "give auto, HOST:PORT")
    assert_one_line_error(melbo("study", str(spec), "--ray", "--num-gpus", "1", "--out", str(tmp_path / "c")), "GPU(s) per worker")
    (tmp_path / "bad.toml").write_text("[discover]\ncount = -1")
    assert_one_line_error(melbo_here("study", str(tmp_path / "bad.toml"), "--ray", "--out", str(tmp_path / "d")), "at least 1")
    assert_one_line_error(melbo_here("study", str(spec), "--workers", "2", "--out", str(tmp_path / "e")), "go with --ray")
    assert not any((tmp_path / x).exists() for x in "abcde")
