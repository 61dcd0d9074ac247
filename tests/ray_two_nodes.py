"""A two-node Ray cluster on this machine, a study on it, and one node's workers SIGKILLed mid-study.

Run by tests/test_ray_study.py inside a network namespace of its own (``unshare -n``) that has only the loopback
interface: every Ray server listens there and every address is 127.0.0.1, so nothing can leave loopback. The
head and the worker node each get their own temp dir (``--temp-dir``); the cluster is stopped by killing exactly
the processes started for it, also when something fails.

    python tests/ray_two_nodes.py STUDY.toml OUT REPORT.json
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_start(*args: str, temp: Path) -> None:
    # TMPDIR: the node's workers make their unit scratch folders under its temp dir, where this script can see them
    (temp / "scratch").mkdir(exist_ok=True)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "TMPDIR": str(temp / "scratch")}
    command = [str(BIN / "ray"), "start", "--node-ip-address=127.0.0.1", "--num-cpus=1", f"--temp-dir={temp}", "--disable-usage-stats", *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    if done.returncode != 0:
        raise SystemExit(f"ray start failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")


def processes_of(temp: Path) -> list[psutil.Process]:
    """Every live process started for the node whose temp dir is ``temp`` (its path is on their command lines;
    zombies, already dead, are left out)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and any(str(temp) in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def workers_of(temp: Path) -> list[psutil.Process]:
    """The node's worker processes that run melbo units (children of its raylet)."""
    raylets = [p for p in processes_of(temp) if p.name() == "raylet"]
    out = []
    for raylet in raylets:
        for child in raylet.children(recursive=True):
            try:
                if "UnitWorker" in " ".join(child.cmdline()) or child.name().startswith("ray::UnitWorker"):
                    out.append(child)
            except psutil.NoSuchProcess:
                pass
    return out


def says_running(meta: Path) -> bool:
    """Whether a run's ``run.json`` (read as text: a worker may be writing it) says the run is still going."""
    return '"status": "running"' in meta.read_text(errors="ignore")


def saved_on(temp: Path, out: Path) -> list[Path]:
    """Runs that a worker of the node at ``temp`` is in the middle of and of which a saved block has reached the
    driver's folder ``out``: killing the node now must make another worker go on from a saved block (the last one
    delivered; the worker may have saved another since: asking for the very last one left a window of a block's time,
    which a loaded machine's poll could miss and a study of tiny models could finish without)."""
    found = []
    for scratch in (temp / "scratch").glob("melbo-unit-*"):
        for meta in scratch.rglob("run.json"):
            delivered = out / meta.relative_to(scratch)
            try:
                if says_running(meta) and says_running(delivered):
                    found.append(delivered)
            except OSError:
                pass
    return found


def stop(temps: list[Path]) -> None:
    """SIGTERM, then SIGKILL, every process of the nodes; again while new ones appear (a raylet may start a worker
    while it is being stopped)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        procs = [p for t in temps for p in processes_of(t)]
        if not procs:
            return
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)


def main() -> None:
    spec, out, report = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    head_temp, node_temp = Path(tempfile.mkdtemp(prefix="rayhead-")), Path(tempfile.mkdtemp(prefix="raynode-"))
    port = free_port()
    facts: dict = {"killed": 0, "kill_seen_running": False}
    try:
        ray_start("--head", f"--port={port}", "--include-dashboard=false", temp=head_temp)
        ray_start(f"--address=127.0.0.1:{port}", temp=node_temp)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
        study = subprocess.Popen(
            [sys.executable, "-m", "melbo.cli", "study", str(spec), "--ray", f"127.0.0.1:{port}", "--out", str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and study.poll() is None and not facts["killed"]:
            running = saved_on(node_temp, out)
            victims = workers_of(node_temp)
            if running and victims:
                facts["kill_seen_running"] = True
                for victim in victims:
                    victim.kill()
                facts["killed"] = len(victims)
                facts["interrupted"] = [str(p.relative_to(out)) for p in running]
            time.sleep(0.05)
        stdout, stderr = study.communicate(timeout=600)
        facts.update(returncode=study.returncode, stdout=stdout[-4000:], stderr=stderr[-4000:])
        facts["addresses"] = sorted({c.laddr.ip for t in (head_temp, node_temp) for p in processes_of(t) for c in _listening(p)})
    finally:
        stop([head_temp, node_temp])
        left = processes_of(head_temp) + processes_of(node_temp)
        facts["left"] = len(left)
        facts["left_names"] = [_describe(p) for p in left]
        report.write_text(json.dumps(facts))
        if not left:  # the nodes' Ray sessions and scratch folders; kept where a process was left, to look into
            for temp in (head_temp, node_temp):
                shutil.rmtree(temp, ignore_errors=True)


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {proc.status()} {' '.join(proc.cmdline())[:200]}"
    except psutil.NoSuchProcess:
        return f"{proc.pid} gone"


def _listening(proc: psutil.Process) -> list:
    try:
        return [c for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


if __name__ == "__main__":
    main()
