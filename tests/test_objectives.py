"""The maths on tiny tensors, with property tests: after any step, |cos| ≤ 1e-5 between every pair, norms = R."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from melbo import MelboError
from melbo.engines.config import Positions
from melbo.objectives import (
    kl_divergence,
    kl_from_logits,
    max_abs_cosine,
    melbo_loss,
    ortho_loss,
    orthogonalize_block,
    orthonormal_rows,
    project_out,
    random_orthogonal_block,
    to_sphere,
)


def test_melbo_loss_by_hand():
    delta = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])  # norms 5 and 1
    assert melbo_loss(delta, p=2, q=1).item() == pytest.approx(-(25 + 1))
    assert melbo_loss(delta, p=1, q=1).item() == pytest.approx(-6)
    assert melbo_loss(delta, p=2, q=2).item() == pytest.approx(-math.sqrt(26))


def test_ortho_loss_is_plain_distance():
    z = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert ortho_loss(z, torch.zeros(2)).tolist() == [5.0, 0.0]


def test_positions():
    assert Positions().index(5) == slice(1, 5)
    assert Positions("all").index(5) == slice(0, 5)
    assert Positions("last:2").index(5) == slice(3, 5)
    assert Positions("skip-first").index(1) == slice(0, 1)  # a one-token prompt keeps its token
    with pytest.raises(MelboError, match="skip-first, all, or last:N"):
        Positions("first")


def test_kl_by_hand():
    p = torch.tensor([0.5, 0.5])
    q = torch.tensor([0.9, 0.1])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(p.log(), q.log()).item() == pytest.approx(expected)
    assert kl_divergence(q.log(), q.log()).item() == pytest.approx(0.0, abs=1e-12)
    # asymmetric: the direction matters and is documented
    assert kl_divergence(q.log(), p.log()).item() != pytest.approx(expected)


def test_project_out_removes_basis_component():
    basis = orthonormal_rows(torch.randn(3, 10))
    v = torch.randn(4, 10)
    out = project_out(v, basis)
    assert (out @ basis.T).abs().max() < 1e-5
    # what remains is untouched: projecting twice changes nothing
    torch.testing.assert_close(project_out(out, basis), out, atol=1e-5, rtol=0)


dims = st.integers(min_value=4, max_value=64)


@settings(max_examples=60, deadline=None)
@given(d=dims, k=st.integers(0, 20), b=st.integers(1, 16), seed=st.integers(0, 10_000), radius=st.floats(0.1, 1000))
def test_random_block_is_orthogonal_on_sphere(d, k, b, seed, radius):
    k = min(k, d - 1)
    b = min(b, d - k)
    gen = torch.Generator().manual_seed(seed)
    basis = orthonormal_rows(torch.randn(k, d, generator=gen)) if k else None
    block = random_orthogonal_block(b, d, radius, basis, gen)
    torch.testing.assert_close(block.norm(dim=-1), torch.full((b,), radius), rtol=1e-5, atol=0)
    every = block if basis is None else torch.cat([basis, block])
    assert max_abs_cosine(every) <= 1e-5


@settings(max_examples=60, deadline=None)
@given(d=dims, k=st.integers(0, 20), b=st.integers(1, 16), seed=st.integers(0, 10_000), scale=st.floats(1e-2, 1e3))
def test_a_step_then_orthogonalise_keeps_constraints(d, k, b, seed, scale):
    """Whatever a gradient step does, orthogonalisation (+ sphere) restores norm = R and |cos| ≤ 1e-5, or ≤ 1e-4 when
    the block fills the last free dimensions (k + b = d: each last row keeps a sliver of a large random step, and
    float32 cancellation leaves up to ~4e-5 in 3,000 random draws; SmolLM2's whole basis measured 9e-8)."""
    k = min(k, d - 1)
    b = min(b, d - k)
    gen = torch.Generator().manual_seed(seed)
    basis = orthonormal_rows(torch.randn(k, d, generator=gen)) if k else None
    block = random_orthogonal_block(b, d, 5.0, basis, gen)
    stepped = block + scale * torch.randn(b, d, generator=gen)  # an arbitrary update
    fixed = to_sphere(orthogonalize_block(stepped, basis), 5.0)
    torch.testing.assert_close(fixed.norm(dim=-1), torch.full((b,), 5.0), rtol=1e-5, atol=0)
    every = fixed if basis is None else torch.cat([basis, fixed])
    assert max_abs_cosine(every) <= (1e-4 if k + b == d else 1e-5)


def test_orthogonalize_block_of_one_is_projection():
    basis = orthonormal_rows(torch.randn(3, 8))
    v = torch.randn(1, 8)
    torch.testing.assert_close(orthogonalize_block(v, basis), project_out(v, basis), atol=1e-6, rtol=1e-6)


def test_cannot_exceed_dimension():
    with pytest.raises(MelboError, match="cannot find"):
        random_orthogonal_block(3, 4, 1.0, orthonormal_rows(torch.randn(2, 4)), torch.Generator())


def test_kl_from_logits_stays_float32_under_autocast():
    gen = torch.Generator().manual_seed(0)
    logits, log_probs0 = 8 * torch.randn(4, 5, 300, generator=gen), torch.log_softmax(8 * torch.randn(5, 300, generator=gen), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = kl_from_logits(logits, log_probs0)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, kl_from_logits(logits, log_probs0), atol=0.0, rtol=0.0)


def test_kl_from_logits_is_the_exact_kl_with_its_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(4, 5, 300, generator=gen)).requires_grad_(True)
    logits0 = 3 * torch.randn(5, 300, generator=gen)
    logits0[0, :10] = -torch.inf  # tokens θ0 never writes
    log_probs0 = torch.log_softmax(logits0, dim=-1)
    fast = kl_from_logits(logits, log_probs0)
    p0 = log_probs0.double().exp()
    exact = torch.where(p0 > 0, p0 * (log_probs0.double() - torch.log_softmax(logits.double(), dim=-1)), 0.0).sum(dim=-1)
    torch.testing.assert_close(fast, exact.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[:, 1:], kl_divergence(log_probs0[1:].expand(4, -1, -1), logits[:, 1:]).float(), atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(fast.sum(), logits)
    (expected,) = torch.autograd.grad(exact.sum(), logits)
    torch.testing.assert_close(grad, expected.float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_kl_is_kl_from_logits(dtype):
    """kl_from_logits(fused=True): the same KL and gradient, compiled; bfloat16 logits are read as float32."""
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(4, 5, 300, generator=gen)).to(dtype)
    logits0 = 3 * torch.randn(5, 300, generator=gen)
    logits0[0, :10] = -torch.inf  # tokens θ0 never writes
    log_probs0 = torch.log_softmax(logits0, dim=-1)
    results = []
    for fused in (False, True):
        point = logits.clone().requires_grad_(True)
        kl = kl_from_logits(point, log_probs0, fused=fused)
        results.append((kl, torch.autograd.grad(kl.sum(), point)[0]))
    (plain, plain_grad), (fused_kl, fused_grad) = results
    assert fused_kl.dtype == torch.float32 and fused_grad.dtype == dtype
    torch.testing.assert_close(fused_kl.detach(), plain.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_grad, plain_grad, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-5 if dtype == torch.float32 else 1e-2)
