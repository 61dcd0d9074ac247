"""The optimisers MELBO and MELBO-ortho share: Adam (:func:`optimise`) and one L-BFGS per batch row
(:func:`lbfgs_rows`), each with a projection after every step, an early stop on a plateau and NaN recovery."""

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
        if _plateaued(history, step, plateau):
            break
    return step


def _plateaued(history: list[float], step: int, plateau: float) -> bool:
    """Every 10th step from the 30th: did the last 10 steps improve the mean loss by less than ``plateau``?"""
    if not plateau or step < 30 or step % 10 or len(history) <= 10:
        return False
    before, now = history[-11], history[-1]
    return before - now < plateau * abs(before)


def lbfgs_rows(
    theta: Tensor,
    loss_fn: Callable[[Tensor], Tensor],
    project: Callable[[Tensor], Tensor],
    project_direction: Callable[[Tensor], Tensor],
    steps: int,
    first_step: float,
    max_step: float,
    history: int = 10,
    plateau: float = 0.0,
    on_step: Callable[[int, float], None] | None = None,
    patience: int = 0,
) -> tuple[Tensor, int]:
    """L-BFGS with one history and one step length per row; returns the final rows and the evaluations run.

    The rows of ``theta`` are separate problems evaluated together: ``loss_fn`` maps ``(B, d)`` to per-row
    losses ``(B,)``. Each iteration costs exactly one evaluation (loss and gradient of every row): a row steps
    along its own quasi-Newton direction, at most ``max_step`` long; a row whose loss got worse (or NaN)
    goes back to where it was and halves its step, a row that improved doubles it back towards the full
    step. ``project`` maps points back to the feasible set after a step (here: orthogonal to a basis and to
    the earlier rows); ``project_direction`` removes the forbidden directions from gradients and steps.
    The first step of a row is ``first_step`` long, along minus its gradient.

    ``patience`` (0: never): a row that has not improved for this many evaluations in a row is done; it keeps its
    point and leaves the batch, so that later evaluations run on the other rows alone, and the block ends when every
    row is done. ``project`` then sees the done rows first: Gram–Schmidt leaves them where they are (they are
    orthogonal to every row already) and keeps the others orthogonal to them.

    Why not Adam: it needs more evaluations per faithful vector (bench/ortho_vs_seed.py; bench/RESULTS.md).
    Why not ``torch.optim.LBFGS``: it treats the block as one problem with one line search, and cannot send one
    row back alone.

    Raises:
        Diverged: the loss is not finite at the start.
    """
    x = project(theta.detach())
    f, g = _loss_and_gradient(x, loss_fn, project_direction)
    if not torch.isfinite(f).all():
        raise Diverged
    rows, d = x.shape
    active = torch.ones(rows, dtype=torch.bool, device=x.device)
    stale = torch.zeros(rows, dtype=torch.long, device=x.device)  # evaluations in a row without improvement
    s_hist = x.new_zeros(history, rows, d)
    y_hist = x.new_zeros(history, rows, d)
    rho = x.new_zeros(history, rows)
    gamma = first_step / g.norm(dim=1).clamp_min(1e-30)  # H0 = γ·I, from the newest curvature pair later
    scale = x.new_ones(rows)
    means = [float(f.mean())]
    evals = 1
    if on_step:
        on_step(evals, means[-1])
    while evals < steps:
        direction = -project_direction(_two_loop(g, s_hist, y_hist, rho, gamma))
        uphill = (direction * g).sum(dim=1) >= 0
        direction = torch.where(uphill[:, None], -gamma[:, None] * g, direction)
        length = direction.norm(dim=1).clamp_min(1e-30)
        t = torch.where(active, scale * (max_step / length).clamp(max=1.0), 0.0)
        x_new = _project_done_first(x + t[:, None] * direction, project, active)
        if bool(active.all()):
            f_new, g_new = _loss_and_gradient(x_new, loss_fn, project_direction)
        else:  # the rows that are done keep their loss and gradient and are not evaluated
            f_new, g_new = f.clone(), g.clone()
            f_new[active], g_new[active] = _loss_and_gradient(x_new[active], loss_fn, project_direction)
        evals += 1
        better = active & torch.isfinite(f_new) & torch.isfinite(g_new).all(dim=1) & (f_new <= f)
        stale = torch.where(active & (f_new < f), 0, stale + 1)
        s, y = x_new - x, g_new - g
        sy = (s * y).sum(dim=1)
        use = better & (sy > 1e-10 * s.norm(dim=1) * y.norm(dim=1))  # curvature condition, else skip the pair
        s_hist = torch.cat([s_hist[1:], torch.where(use[:, None], s, 0.0)[None]])
        y_hist = torch.cat([y_hist[1:], torch.where(use[:, None], y, 0.0)[None]])
        rho = torch.cat([rho[1:], torch.where(use, 1 / torch.where(use, sy, 1.0), 0.0)[None]])
        gamma = torch.where(use, sy / (y * y).sum(dim=1).clamp_min(1e-30), gamma)
        scale = torch.where(better, (2 * scale).clamp(max=1.0), scale / 2)
        x = _project_done_first(torch.where(better[:, None], x_new, x), project, active)
        f = torch.where(better, f_new, f)
        g = torch.where(better[:, None], g_new, g)
        means.append(float(f.mean()))
        if on_step:
            on_step(evals, means[-1])
        if patience:
            active &= stale < patience
        if _plateaued(means, evals, plateau) or not active.any():
            break
    return x, evals


def _project_done_first(x: Tensor, project: Callable[[Tensor], Tensor], active: Tensor) -> Tensor:
    """``project`` of the block with the rows that are done (not ``active``) first, in the rows' own order."""
    if bool(active.all()):
        return project(x)
    order = torch.cat([(~active).nonzero()[:, 0], active.nonzero()[:, 0]])
    out = torch.empty_like(x)
    out[order] = project(x[order])
    return out


def _loss_and_gradient(
    x: Tensor, loss_fn: Callable[[Tensor], Tensor], project_direction: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    point = x.detach().requires_grad_(True)
    losses = loss_fn(point)
    (grad,) = torch.autograd.grad(losses.sum(), point)
    return losses.detach(), project_direction(grad)


def _two_loop(g: Tensor, s_hist: Tensor, y_hist: Tensor, rho: Tensor, gamma: Tensor) -> Tensor:
    """``H·g`` for every row at once (L-BFGS two-loop recursion); empty history slots hold zeros and ρ = 0."""
    q = g.clone()
    alpha = torch.zeros_like(rho)
    for i in range(rho.shape[0] - 1, -1, -1):
        alpha[i] = rho[i] * (s_hist[i] * q).sum(dim=1)
        q -= alpha[i][:, None] * y_hist[i]
    r = gamma[:, None] * q
    for i in range(rho.shape[0]):
        beta = rho[i] * (y_hist[i] * r).sum(dim=1)
        r += s_hist[i] * (alpha[i] - beta)[:, None]
    return r
