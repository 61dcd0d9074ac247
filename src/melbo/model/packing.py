"""Several prompts as one sequence: the tokens they all begin with once, then each prompt's own tokens.

MELBO-ortho's default trains on the run's prompt and four shipped chat prompts, and all five begin with the same chat
template system turn (24 of ~55 tokens on SmolLM2). θ is added at every position, so those tokens go through blocks
s+1 … L alike in every prompt. Packed, they are computed once; each prompt's own tokens follow, attending to the common
tokens and to their own earlier tokens only (a two-level tree of causal masks), at the position ids they have alone.
One forward pass over ~⅔ of the tokens then gives every prompt's outputs, equal to running the prompts one by one up to
rounding (:func:`matches` checks it on the model at hand; a model that ignores a custom mask would fail it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from melbo.model.forward import PromptState


@dataclass(frozen=True)
class Packing:
    """Prompts packed by :func:`pack`: the packed sequence and where each prompt's tokens are in it."""

    state: PromptState
    shared: int  # the first tokens every prompt has, computed once
    starts: tuple[int, ...]  # where each prompt's own tokens (its position `shared` on) begin in the packed sequence

    def index(self, prompt: int, positions: slice) -> Tensor:
        """The packed positions ``(P,)`` of prompt ``prompt``'s ``positions`` (a slice of its own positions)."""
        own = torch.arange(positions.start, positions.stop)
        packed = torch.where(own < self.shared, own, own - self.shared + self.starts[prompt])
        return packed.to(self.state.ids.device)


def pack(states: list[PromptState], boolean_mask: bool = True) -> Packing:
    """``states`` (prompts with their source-layer residuals, as :func:`~melbo.model.forward.prepare` makes them) as
    one sequence. ``boolean_mask``: the mask as booleans (True: may attend; what SDPA takes) or additive (0 or the
    dtype's minimum; what eager attention adds to its scores)."""
    lengths = [state.length for state in states]
    shared = 0
    first = states[0].ids[0]
    while shared < min(lengths) - 1 and all(bool(state.ids[0, shared] == first[shared]) for state in states):
        shared += 1
    starts, ids, source, positions = [], [first[:shared]], [states[0].source[0, :shared]], [torch.arange(shared)]
    at = shared
    for state in states:
        starts.append(at)
        ids.append(state.ids[0, shared:])
        source.append(state.source[0, shared:])
        positions.append(torch.arange(shared, state.length))
        at += state.length - shared
    device = first.device
    allowed = torch.zeros(at, at, dtype=torch.bool, device=device)
    allowed[:, :shared] = True
    for start, length in zip(starts, lengths):
        allowed[start : start + length - shared, start : start + length - shared] = True
    allowed &= torch.ones_like(allowed).tril()
    dtype = states[0].source.dtype
    mask = allowed if boolean_mask else torch.zeros(at, at, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    state = PromptState(
        text="\n".join(s.text for s in states), ids=torch.cat(ids)[None], source=torch.cat(source)[None],
        positions=torch.cat(positions)[None].to(device), mask=mask[None, None],
    )
    return Packing(state=state, shared=shared, starts=tuple(starts))


def matches(packed: Tensor, separate: list[Tensor], tolerance: float = 1e-3) -> bool:
    """Whether the packed forward's outputs ``(ΣP, …)`` equal the prompts' own ``(P_k, …)``, concatenated, to
    ``tolerance`` of their largest magnitude."""
    whole = torch.cat(separate)
    if packed.shape != whole.shape or not torch.isfinite(packed).all():
        return False
    return float((packed - whole).abs().max()) <= tolerance * float(whole.abs().max().clamp_min(1e-30))

