"""Measurements on steered outputs that do not need a run folder: fluency and first-token effect."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from melbo.objectives import kl_divergence
from melbo.steered import PromptState, last_token_logits


@torch.no_grad()
def completion_nll(lm: Any, input_ids: Tensor, completions: list[str]) -> list[float]:
    """Mean negative log-likelihood (nats per token) of each completion under the *unsteered* model.

    A fluency check: coherent text scores ~1–3 on SmolLM2, gibberish ≥ 4.5. Empty completions score inf.
    """
    scores = []
    for text in completions:
        tokens = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(lm.device)
        if tokens.shape[1] == 0:
            scores.append(float("inf"))
            continue
        full = torch.cat([input_ids, tokens], dim=1)
        logits = lm.model(input_ids=full, use_cache=False).logits[0, input_ids.shape[1] - 1 : -1]
        scores.append(float(torch.nn.functional.cross_entropy(logits.float(), tokens[0])))
    return scores


def effect_on_first_token(lm: Any, state: PromptState, source: int, thetas: Tensor) -> Tensor:
    """KL(P_θ ‖ P_unsteered) of the next-token distribution at the last prompt token, per row ``(B,)``."""
    steered = last_token_logits(lm.model, state, source, thetas)
    plain = last_token_logits(lm.model, state, source, torch.zeros_like(thetas[:1]))
    return kl_divergence(steered, plain.expand_as(steered))
