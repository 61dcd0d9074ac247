"""How faithfully a MELBO-ortho run's copies reproduce their base θ0 (row 0).

First-token figures: each copy's KL to θ0 at the last prompt token (stored by the engine), set against where
"no steering at all" stands (KL(P_unsteered ‖ P_θ0)), and how many copies share θ0's most likely first token.
A copy can match the first token and then do something else, so the behaviour itself is read from
``melbo eval``'s labels: the share of copies whose completions carry θ0's label.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch

from melbo.files.runs import Run
from melbo.model.forward import generate_steered, last_token_logits, prepare
from melbo.model.loading import LoadedModel
from melbo.model.prompts import PromptFormat
from melbo.objectives import kl_divergence


@dataclass
class OrthoFidelity:
    """The first-token summary of a MELBO-ortho run (the demo prints it; study pages show it)."""

    copies: int  # vectors found besides θ0
    median_kl: float | None  # median KL(P_i ‖ P_0) at the last prompt token
    unsteered_kl: float  # KL(P_unsteered ‖ P_0): where "no steering at all" stands
    below_half: int  # copies whose KL is below half of unsteered_kl
    same_top_token: int  # copies whose most likely first token is θ0's
    unsteered_completion: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def sentence(self) -> str:
        median = "—" if self.median_kl is None else f"{self.median_kl:.3f}"
        return (
            f"{self.copies} vectors orthogonal to the base and to each other: median KL to the base {median}, "
            f"{self.below_half}/{self.copies} below half the unsteered model's KL ({self.unsteered_kl:.3f}); "
            f"{self.same_top_token}/{self.copies} share the base's most likely first token"
        )


def ortho_fidelity(lm: LoadedModel, run: Run, fmt: PromptFormat, completion_tokens: int = 32) -> OrthoFidelity:
    """First-token agreement of every copy with θ0 on the run's first prompt."""
    source = run.source_layer
    state = prepare(lm, run.meta.prompts[:1], fmt, source)[0]
    with torch.no_grad():
        logits = last_token_logits(lm.model, state, source, run.vectors.to(lm.device))
        plain = last_token_logits(lm.model, state, source, torch.zeros(1, lm.d_model, device=lm.device))
    top = logits.argmax(dim=-1)
    unsteered_kl = float(kl_divergence(plain[0], logits[0]))
    kls = run.kls
    unsteered = generate_steered(lm.model, lm.tokenizer, state.ids, None, source, max_new_tokens=max(1, completion_tokens))[0]
    return OrthoFidelity(
        copies=run.vectors.shape[0] - 1,
        median_kl=statistics.median(kls) if kls else None,
        unsteered_kl=unsteered_kl,
        below_half=sum(k < unsteered_kl / 2 for k in kls),
        same_top_token=int((top[1:] == top[0]).sum()),
        unsteered_completion=unsteered,
    )
