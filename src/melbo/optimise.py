"""The optimisation loop shared by MELBO and MELBO-ortho: Adam, a projection after every step, NaN recovery."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class Diverged(Exception):
    """The optimisation produced NaN or inf twice, even after a retry with a smaller step."""


def optimise(
    theta: torch.nn.Parameter,
    loss_fn: Callable[[Tensor], Tensor],
    after_step: Callable[[Tensor], Tensor],
    lr: float,
    steps: int,
    cosine: bool,
    plateau: float = 0.0,
    on_step: Callable[[int, float], None] | None = None,
    make_optimizer: Callable[[list[Tensor], float], torch.optim.Optimizer] | None = None,
) -> int:
    """Adam on ``theta`` with ``after_step`` (a projection) applied after every step; returns steps run.

    NaN or inf (in the loss or in θ) is caught: θ goes back to its last finite state and the block goes on
    with a step ten times smaller and a fresh Adam state; a second fault raises :class:`Diverged`.
    """
    make = make_optimizer or (lambda params, rate: torch.optim.Adam(params, lr=rate))
    opt = make([theta], lr)
    # Large steps first to travel to the far solutions (norms ~2× ‖θ0‖), small ones last to settle in them.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr / 20) if cosine else None
    good = theta.detach().clone()
    history: list[float] = []
    retried = False
    step = 0
    for step in range(1, steps + 1):
        losses = loss_fn(theta)
        opt.zero_grad()
        losses.sum().backward()
        opt.step()
        if schedule is not None:
            schedule.step()
        with torch.no_grad():
            theta.copy_(after_step(theta))
        if not (torch.isfinite(losses).all() and torch.isfinite(theta).all()):
            if retried:
                raise Diverged
            retried = True
            with torch.no_grad():
                theta.copy_(good)
            lr_now = opt.param_groups[0]["lr"] / 10
            opt = make([theta], lr_now)
            schedule = None
            continue
        good = theta.detach().clone()
        history.append(float(losses.detach().mean()))
        if on_step:
            on_step(step, history[-1])
        if plateau and step >= 30 and step % 10 == 0 and len(history) > 10:
            before, now = history[-11], history[-1]
            if before - now < plateau * abs(before):
                break
    return step
