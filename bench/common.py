"""What the benchmarks share: the base vector they start from, and the summary line they end with."""

from __future__ import annotations

import torch
from torch import Tensor

from melbo.analysis.choose import choose_bases, score_candidates
from melbo.analysis.config import ChooseConfig
from melbo.engines.discover import discover
from melbo.model.loading import LoadedModel
from melbo.model.prompts import DEFAULT_PROMPT, PromptFormat
from melbo.study import demo_study


def base_vector(lm: LoadedModel, quick: bool) -> Tensor:
    """A base vector as the demo finds one (its discovery: R chosen for the model, layers 8 → 20; the clearest fluent
    behaviour); with ``quick``, a random direction of norm 30."""
    if quick:
        theta = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
        return 30 * theta / theta.norm()
    unit = demo_study().units()[0]
    assert unit.discover is not None
    run = discover(lm, unit.prompts.prompts, unit.discover, PromptFormat())
    return run.vectors[choose_bases(score_candidates(lm, run, unit.prompts.prompts[0], PromptFormat()), ChooseConfig())[0].index]


def summary_line(text: str) -> None:
    print(f"summary: {text}")


__all__ = ["DEFAULT_PROMPT", "base_vector", "summary_line"]
