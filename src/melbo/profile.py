"""The residual-norm profile of a model on a prompt: what a user needs to choose s, t and R."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from melbo.layers import capture_residual, n_layers

SINK_RATIO = 10.0  # a first token this many times the median norm of the rest is flagged as a sink


@dataclass
class LayerNorms:
    layer: int
    first_token: float  # residual norm at position 0
    median_rest: float  # median residual norm over positions 1 …
    max_rest: float

    @property
    def sink(self) -> bool:
        """Whether position 0 is an attention sink that would swamp a loss or mean including it."""
        return self.median_rest > 0 and self.first_token > SINK_RATIO * self.median_rest


@torch.no_grad()
def residual_norms(model: nn.Module, input_ids: Tensor) -> list[LayerNorms]:
    """Per layer, the norm of the residual stream after that block on ``input_ids`` ``(1, seq)``."""
    layers = list(range(n_layers(model)))
    with capture_residual(model, layers) as seen:
        model(input_ids=input_ids, use_cache=False)
    rows = []
    for layer in layers:
        norms = seen[layer][0].float().norm(dim=-1)
        rest = norms[1:] if norms.numel() > 1 else norms
        rows.append(LayerNorms(layer, float(norms[0]), float(rest.median()), float(rest.max())))
    return rows
