"""What the benchmarks share: the base vector they start from, and the summary line they end with."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from melbo.demo import DemoConfig, choose_base
from melbo.discover import DiscoverConfig, discover
from melbo.prompts import DEFAULT_PROMPT, PromptFormat


def base_vector(lm: Any, quick: bool) -> Tensor:
    """The demo's base vector (discovery at R = 30, layers 8 → 20, the clearest fluent behaviour);
    with ``quick``, a random direction of norm 30."""
    if quick:
        theta = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
        return 30 * theta / theta.norm()
    cfg = DemoConfig()
    run = discover(
        lm, [cfg.prompt], DiscoverConfig(source=cfg.source, target=cfg.target, radius=cfg.radius, count=cfg.discover_count,
                                         steps=cfg.discover_steps, block=cfg.discover_count, seed=cfg.seed),
        PromptFormat(),
    )
    return run.vectors[choose_base(lm, run, PromptFormat(), cfg).index]


def summary_line(text: str) -> None:
    print(f"summary: {text}")


__all__ = ["DEFAULT_PROMPT", "base_vector", "summary_line"]
