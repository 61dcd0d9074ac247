"""Steered generation: one steering vector per batch row, one ``generate`` call for the whole batch."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from melbo.layers import add_to_residual
from melbo.prompts import ids_like


@torch.no_grad()
def generate_steered(
    model: Any,
    tokenizer: Any,
    input_ids: Tensor,
    vectors: Tensor | None,
    layer: int,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    seed: int | None = 0,
) -> list[str]:
    """Completions of one prompt, one per row of ``vectors`` (or one unsteered completion if ``None``).

    Args:
        input_ids: ``(1, seq)`` token ids of the formatted prompt.
        vectors: ``(B, d_model)``, each added after block ``layer`` at every position, new ones included.
        temperature: 0 for greedy decoding, else sampling at that temperature (seeded by ``seed``).
    Returns:
        ``B`` decoded completions (the prompt is not repeated), special tokens removed.
    """
    batch = 1 if vectors is None else vectors.shape[0]
    ids = ids_like(input_ids, batch)
    sampling = temperature > 0
    options: dict[str, Any] = {"do_sample": sampling}
    if sampling:
        options.update(temperature=temperature, top_k=0, top_p=1.0)
        if seed is not None:
            torch.manual_seed(seed)
    else:
        options.update(temperature=None, top_k=None, top_p=None)
    steer = contextlib.nullcontext() if vectors is None else add_to_residual(model, layer, vectors)
    with steer:
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **options,
        )
    return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
