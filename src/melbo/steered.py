"""Forward passes with a block of steering vectors, starting from cached source-layer activations.

The residual stream up to the source layer ``s`` does not depend on θ, so it is computed once per prompt
(:func:`prepare`) and every optimisation step runs only blocks ``s+1 … t`` for the whole block of vectors at
once (one vector per batch row).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from melbo.layers import capture_residual, check_layer, residual_after, start_after, stop_after
from melbo.prompts import PromptFormat, encode_prompt, ids_like


@dataclass
class PromptState:
    """One prompt, tokenised, with its unsteered residual after the source layer ``(1, T, d)``."""

    text: str
    ids: Tensor
    source: Tensor

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])


def prepare(lm: Any, prompts: list[str], fmt: PromptFormat, source_layer: int) -> list[PromptState]:
    """Tokenise each prompt and cache its residual after ``source_layer``."""
    check_layer(lm.model, source_layer, "source layer")
    states = []
    for text in prompts:
        ids = encode_prompt(lm.tokenizer, text, fmt, lm.device)
        with torch.no_grad():
            cached = residual_after(lm.model, source_layer, ids).float()
        states.append(PromptState(text=text, ids=ids, source=cached))
    return states


def target_residual(model: nn.Module, state: PromptState, source: int, target: int, thetas: Tensor) -> Tensor:
    """Residual after ``target`` ``(B, T, d)`` when row ``b`` adds ``thetas[b]`` after ``source``.

    Only blocks ``source+1 … target`` run; gradients flow back to ``thetas``.
    """
    dtype = next(model.parameters()).dtype
    steered = (state.source + thetas[:, None, :]).to(dtype)
    ids = ids_like(state.ids, thetas.shape[0])
    with start_after(model, source, steered), capture_residual(model, target) as seen, stop_after(model, target):
        model(input_ids=ids, use_cache=False)
    return seen[target].float()


def last_token_logits(model: nn.Module, state: PromptState, source: int, thetas: Tensor, batch: int = 64) -> Tensor:
    """Logits at the last prompt position ``(B, vocab)`` when steering with each row of ``thetas``."""
    dtype = next(model.parameters()).dtype
    out = []
    with torch.no_grad():
        for chunk in thetas.split(batch):
            steered = (state.source + chunk[:, None, :]).to(dtype)
            ids = ids_like(state.ids, chunk.shape[0])
            with start_after(model, source, steered):
                out.append(_last_logits(model, ids))
    return torch.cat(out).float()


def _last_logits(model: nn.Module, ids: Tensor) -> Tensor:
    with contextlib.suppress(TypeError):  # only the last position's logits, where the model supports it
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
    return model(input_ids=ids, use_cache=False).logits[:, -1]
