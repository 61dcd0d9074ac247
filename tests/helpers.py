"""Helpers the test modules share: melbo as a user runs it (a real subprocess) or its entry point in this process, and
the one-line error check."""

from __future__ import annotations

import os
import subprocess
import sys


def melbo(*args: str, cwd=None, columns: str | None = "200") -> subprocess.CompletedProcess:
    """``melbo ARGS`` in a subprocess, its output piped; COLUMNS set to ``columns`` (None: unset, as in a log)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if columns is None:
        env.pop("COLUMNS", None)
    else:
        env["COLUMNS"] = columns
    return subprocess.run(
        [sys.executable, "-m", "melbo.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def assert_one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr


def melbo_here(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """The same entry point (`melbo.cli.main`) in this process: for the many checks that a mistake is one line and
    exit 2, without a new interpreter's start-up (torch and transformers load once per test session, not per call).
    ``melbo`` above is the user's real process; a few tests run their cases both ways."""
    import contextlib
    import io
    import traceback

    from melbo.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, here = sys.argv, os.getcwd()
    code = 0
    try:
        sys.argv = ["melbo", *args]
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # what the interpreter would print and exit 1 with
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = argv
        os.chdir(here)
    return subprocess.CompletedProcess(["melbo", *args], code, out.getvalue(), err.getvalue())


def cpu_vendor() -> str:
    """The CPU's vendor id (GenuineIntel, AuthenticAMD, …; '' where /proc/cpuinfo does not say): the same instruction
    set rounds differently in Intel's and AMD's kernel paths."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def interrupted_on_call(real, call: int):
    """``real`` (a block's training), but Ctrl-C on its ``call``-th call: a run cut after ``call`` − 1 blocks."""
    calls = {"n": 0}

    def train(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return train


def fetched_model_marks(variable: str, title: str, minutes: int) -> list:
    """pytestmark of an optional module on a real model that bench/models.py fetches: slow, and skipped unless
    ``variable`` is 1."""
    import pytest

    reason = f"optional: set {variable}=1 (fetches {title}, ~{minutes} min)"
    return [pytest.mark.slow, pytest.mark.skipif(os.environ.get(variable) != "1", reason=reason)]


def load_fetched_model(name: str):
    """bench/models.py's model ``name``, loaded on the CPU; the test is skipped, saying why, where it cannot be had."""
    from pathlib import Path

    import pytest

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from models import FETCHED, Unavailable, load

    try:
        return load(name)[0]
    except Unavailable as exc:
        pytest.skip(f"{FETCHED[name].title} cannot be had here: {exc}")
