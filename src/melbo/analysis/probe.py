"""``melbo probe``: are the vectors present in the residual stream when the model shows the behaviour by itself?

The post's proposed test of whether the orthogonal vectors are "adversarial": let the *unsteered* model
answer prompts that elicit the behaviour (by default, coding requests), collect its residual after the
source layer at every generated token, and measure each vector's presence as |cos(h_t, v)|. The baseline is
the same figure for random directions of the same dimension; a vector's z-score is its mean presence minus
the random mean, over the random standard deviation. Vectors the model really uses stand out (z ≫ 0);
directions it never writes along look like random ones (z ≈ 0).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from melbo.analysis.config import ProbeConfig
from melbo.files.io import read_json, write_json
from melbo.files.runs import PROBE_FILE, Run
from melbo.model.forward import generate_steered
from melbo.model.frozen import runs_frozen
from melbo.model.layers import residual_after
from melbo.model.loading import LoadedModel
from melbo.model.prompts import PromptFormat, encode_prompt, shipped_prompts
from melbo.output.live import status_unless_given


def presence(states: Tensor, vectors: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and max over tokens of |cos(h_t, v)| for each vector: ``states`` ``(T, d)``, ``vectors`` ``(N, d)``."""
    h = torch.nn.functional.normalize(states.double(), dim=-1)
    v = torch.nn.functional.normalize(vectors.double(), dim=-1)
    cos = (h @ v.T).abs()
    return cos.mean(dim=0), cos.max(dim=0).values


@dataclass
class Presence:
    """One vector's presence in the model's own residuals: mean and max |cos| over tokens, and its z-score."""

    index: int
    mean_abs_cos: float
    max_abs_cos: float
    z: float  # (mean |cos| − random directions' mean) / their standard deviation


@dataclass
class RandomBaseline:
    directions: int
    mean_abs_cos: float
    std: float


@dataclass
class ProbeResults:
    """What ``probe.json`` holds, and its summaries."""

    prompts: list[str]
    tokens: int  # generated tokens whose residuals were read
    layer: int  # the residual after this block
    random: RandomBaseline
    vectors: list[Presence]

    @property
    def median_z(self) -> float:
        return statistics.median(r.z for r in self.vectors)

    def above(self, z: float = 3.0) -> int:
        """Vectors whose presence stands more than ``z`` standard deviations above random directions."""
        return sum(r.z > z for r in self.vectors)

    def __repr__(self) -> str:
        from melbo.output.display import probe_repr

        return probe_repr(self)

    def _repr_html_(self) -> str:
        """In Jupyter: what ``melbo probe`` prints."""
        from melbo.output.display import SHOW_ROWS, as_html
        from melbo.output.tables import presence

        return as_html(presence(self, SHOW_ROWS))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProbeResults:
        return cls(list(data["prompts"]), int(data["tokens"]), int(data["layer"]), RandomBaseline(**data["random"]),
                   [Presence(**row) for row in data["vectors"]])

    @classmethod
    def read(cls, run_folder: Path) -> ProbeResults | None:
        data = read_json(run_folder / PROBE_FILE)
        return cls.from_json(data) if data else None


@runs_frozen
def probe(
    lm: LoadedModel, run: Run, prompts: list[str] | None = None, fmt: PromptFormat | None = None, max_new_tokens: int = 48,
    random_directions: int = 512, seed: int = 0, on_prompt: Callable[[int, int], None] | None = None, progress: bool = True,
) -> ProbeResults:
    """Presence of each vector of ``run`` in the unsteered model's own residuals while it answers ``prompts``
    (``on_prompt(done, total)`` as each is answered; without it, unless ``progress`` is False, a spinner in a
    terminal or notebook, a line per prompt in a log). Defaults, as ``melbo probe RUN`` takes them: the shipped
    prompts of ``ProbeConfig().prompt_set`` and the prompt format the run was made with."""
    prompts = prompts if prompts is not None else shipped_prompts(ProbeConfig().prompt_set)
    fmt = fmt if fmt is not None else run.meta.prompt_format
    def answering(done: int, total: int, /) -> tuple[str, bool]:
        return f"probe: the model answered {done}/{total} prompts", True

    with status_unless_given(on_prompt, progress, f"letting the model answer {len(prompts)} prompts…", answering) as shown:
        return _probe(lm, run, prompts, fmt, max_new_tokens, random_directions, seed, shown)


def _probe(lm: LoadedModel, run: Run, prompts: list[str], fmt: PromptFormat, max_new_tokens: int, random_directions: int,
           seed: int, on_prompt: Callable[[int, int], None] | None) -> ProbeResults:
    source = run.source_layer
    residuals = []
    for text in prompts:
        ids = encode_prompt(lm.tokenizer, text, fmt, lm.device)
        answer = generate_steered(lm.model, lm.tokenizer, ids, None, source, max_new_tokens=max_new_tokens)[0]
        answer_ids = lm.tokenizer(answer, add_special_tokens=False, return_tensors="pt").input_ids.to(lm.device)
        full = torch.cat([ids, answer_ids], dim=1)
        with torch.no_grad():
            h = residual_after(lm.model, source, full)[0, ids.shape[1] :]
        residuals.append(h.float().cpu())
        if on_prompt:
            on_prompt(len(residuals), len(prompts))
    states = torch.cat(residuals)
    mean, peak = presence(states, run.vectors)
    generator = torch.Generator().manual_seed(seed)
    random = torch.randn(random_directions, run.vectors.shape[1], generator=generator)
    random_mean, _ = presence(states, random)
    mu, sigma = float(random_mean.mean()), float(random_mean.std().clamp_min(1e-12))
    rows = [Presence(i, float(m), float(p), (float(m) - mu) / sigma) for i, (m, p) in enumerate(zip(mean, peak))]
    results = ProbeResults(prompts, int(states.shape[0]), source, RandomBaseline(random_directions, mu, sigma), rows)
    path = run.sidecar(PROBE_FILE)
    if path is not None:
        write_json(path, results.to_json(), ascii_only=True)
    return results
