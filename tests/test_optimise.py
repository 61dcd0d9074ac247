"""The per-row L-BFGS of MELBO-ortho's fast mode, on tiny problems with known answers."""

from __future__ import annotations

import pytest
import torch

from melbo.engines.optimise import Diverged, lbfgs_rows


def _quadratics(rows: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.eye(d) + 0.3 * torch.randn(rows, d, d, generator=g, dtype=torch.float64)
    c = torch.randn(rows, d, generator=g, dtype=torch.float64)
    return a, c


def _loss(a: torch.Tensor, c: torch.Tensor):
    return lambda x: 0.5 * (torch.einsum("bij,bj->bi", a, x) - c).pow(2).sum(dim=1)


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def test_each_row_converges_to_its_own_minimum():
    a, c = _quadratics(rows=3, d=6)
    x, evals = lbfgs_rows(torch.zeros(3, 6, dtype=torch.float64), _loss(a, c), _same, _same, steps=60, first_step=0.5, max_step=5.0)
    expected = torch.linalg.solve(a, c)
    assert evals == 60
    assert torch.allclose(x, expected, atol=1e-6)


def test_rows_do_not_influence_each_other():
    a, c = _quadratics(rows=4, d=5, seed=1)
    start = torch.randn(4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    together, _ = lbfgs_rows(start, _loss(a, c), _same, _same, steps=12, first_step=0.5, max_step=5.0)
    alone, _ = lbfgs_rows(start[2:3], _loss(a[2:3], c[2:3]), _same, _same, steps=12, first_step=0.5, max_step=5.0)
    assert torch.allclose(together[2], alone[0], atol=1e-12)


def test_projection_keeps_rows_in_the_allowed_subspace():
    a, c = _quadratics(rows=2, d=4, seed=3)

    def drop_first(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:]], dim=1)

    x, _ = lbfgs_rows(torch.ones(2, 4, dtype=torch.float64), _loss(a, c), drop_first, drop_first, steps=40, first_step=0.5, max_step=5.0)
    assert torch.all(x[:, 0] == 0)
    # the minimum over the subspace: least squares with the first coordinate fixed at 0
    sub = torch.linalg.lstsq(a[:, :, 1:], c[:, :, None]).solution[:, :, 0]
    assert torch.allclose(x[:, 1:], sub, atol=1e-5)


def test_a_row_that_turns_nan_goes_back_and_stays_finite():
    target = torch.tensor([[3.0, 0.0], [0.5, 0.0]], dtype=torch.float64)

    def loss(x: torch.Tensor) -> torch.Tensor:
        value = (x - target).pow(2).sum(dim=1)
        return torch.where(x[:, 0] > 1.0, torch.full_like(value, float("nan")), value)  # NaN beyond x0 = 1

    x, _ = lbfgs_rows(torch.zeros(2, 2, dtype=torch.float64), loss, _same, _same, steps=40, first_step=0.4, max_step=2.0)
    assert torch.isfinite(x).all()
    assert x[0, 0] <= 1.0 and x[0, 0] > 0.9  # pressed against the edge of the region where the loss exists
    assert torch.allclose(x[1], target[1], atol=1e-6)  # the other row is unaffected


def test_steps_are_capped_and_the_first_step_follows_the_gradient():
    loss = lambda x: 1000.0 * x.sum(dim=1)  # noqa: E731 - a plane: the gradient is huge, there is no minimum
    seen: list[float] = []
    x, _ = lbfgs_rows(torch.zeros(1, 4, dtype=torch.float64), loss, _same, _same, steps=2, first_step=0.1, max_step=1.0,
                      on_step=lambda step, value: seen.append(value))
    assert torch.allclose(x, torch.full((1, 4), -0.05, dtype=torch.float64))  # 0.1 long, along −gradient
    assert seen == [0.0, pytest.approx(-200.0)]  # one report per evaluation, the start included
    x, _ = lbfgs_rows(torch.zeros(1, 4, dtype=torch.float64), loss, _same, _same, steps=6, first_step=0.1, max_step=1.0)
    assert float(x.norm()) <= 0.1 + 5 * 1.0 + 1e-9


def test_a_loss_that_is_not_finite_at_the_start_raises():
    with pytest.raises(Diverged):
        lbfgs_rows(torch.zeros(1, 3), lambda x: x.sum(dim=1) / 0.0 * 0.0, _same, _same, steps=5, first_step=1.0, max_step=1.0)


def _into_ball(centre: torch.Tensor, sizes: list[int]):
    """The same loss for every row, as MELBO-ortho's: (|x − centre|² − 1)² outside the unit ball around ``centre``, 0
    (flat) inside it; ``sizes`` records how many rows each evaluation gets."""

    def loss(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        return ((x - centre).pow(2).sum(dim=1) - 1.0).clamp_min(0.0).pow(2)

    return loss


def test_with_patience_a_row_that_stops_improving_leaves_the_batch_and_the_others_go_on():
    """A row whose loss cannot improve is done after ``patience`` evaluations: it keeps its point, later evaluations
    run on the other rows alone, and they still reach their minima; the block ends when every row is done."""
    sizes: list[int] = []
    centre = torch.zeros(5, dtype=torch.float64)
    start = torch.randn(3, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    start = start / start.norm(dim=1, keepdim=True) * torch.tensor([[3.0], [0.5], [4.0]], dtype=torch.float64)  # row 1 starts inside
    x, evals = lbfgs_rows(start, _into_ball(centre, sizes), _same, _same, steps=200, first_step=0.5, max_step=5.0, patience=3)
    assert sizes[:4] == [3, 3, 3, 3] and sizes[4] == 2  # row 1 left after 3 evaluations without gain
    assert torch.equal(x[1], start[1])
    assert x[[0, 2]].norm(dim=1).max() <= 1.0 + 1e-4  # the others reached the flat minimum, then stopped improving too
    assert evals < 200 and len(sizes) == evals  # ... and left: the block ended when every row was done


def test_rows_that_are_done_stay_put_and_the_others_stay_orthogonal_to_them():
    """With the block's own orthogonalisation as the projection, a row that is done comes first in it: it does not
    move, and the rows still optimised are kept orthogonal to it (MELBO-ortho's copies stay orthogonal)."""
    from melbo.objectives import orthogonalize_block

    d = 6
    centre = 3.0 * torch.eye(d, dtype=torch.float64)[3]
    start = torch.stack([2.0 * torch.eye(d, dtype=torch.float64)[0], centre + 0.2 * torch.eye(d, dtype=torch.float64)[1],
                         5.0 * torch.eye(d, dtype=torch.float64)[2]])  # orthogonal; row 1, in the middle, starts inside the ball
    sizes: list[int] = []
    x, _ = lbfgs_rows(start, _into_ball(centre, sizes), orthogonalize_block, _same, steps=60, first_step=0.5, max_step=5.0, patience=2)
    left = sizes.index(2)  # evaluations of all three rows: row 1 was done after them
    then, _ = lbfgs_rows(start, _into_ball(centre, []), orthogonalize_block, _same, steps=left, first_step=0.5, max_step=5.0, patience=2)
    assert torch.equal(x[1], then[1])  # it has not moved since
    gram = x @ x.T
    assert (gram - torch.diag(gram.diagonal())).abs().max() < 1e-9 * float(x.norm(dim=1).max()) ** 2
    assert not torch.allclose(x[[0, 2]], start[[0, 2]])  # they did move


def test_without_patience_every_row_is_evaluated_to_the_last_step():
    a, c = _quadratics(rows=2, d=3, seed=8)
    sizes: list[int] = []

    def loss(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        return _loss(a, c)(x)

    _, evals = lbfgs_rows(torch.zeros(2, 3, dtype=torch.float64), loss, _same, _same, steps=40, first_step=0.5, max_step=5.0)
    assert evals == 40 and sizes == [2] * 40
