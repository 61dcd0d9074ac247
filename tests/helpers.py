"""Helpers the test modules share: melbo as a user runs it (a real subprocess), and the one-line error check."""

from __future__ import annotations

import os
import subprocess
import sys


def melbo(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "melbo.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def assert_one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr
