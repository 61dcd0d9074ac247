"""The maths of MELBO and MELBO-ortho as pure functions on tensors: losses,
projections, keeping a block of vectors orthogonal (and on a sphere), KL divergence.

Shapes: ``B`` vectors in a block, ``T`` token positions, ``d`` = d_model, ``K`` basis vectors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from melbo.errors import MelboError


def melbo_loss(delta: Tensor, p: float = 2.0, q: float = 1.0) -> Tensor:
    """MELBO's objective, to minimise: ``-(Σ_t ‖Δh_t‖₂^p)^(1/q)`` per row.

    Args:
        delta: ``(B, T, d)`` change of the target-layer residual at the selected positions.
    Returns:
        ``(B,)`` losses (negative: larger changes are better).
    """
    return -delta.norm(dim=-1).pow(p).sum(dim=-1).pow(1.0 / q)


def ortho_loss(z: Tensor, z_base: Tensor) -> Tensor:
    """MELBO-ortho's objective: plain (not squared) L2 distance ``‖z(θ) − z(θ0)‖₂`` per row ``(B,)``.

    ``z`` is ``(B, d)``, the target-layer residual averaged over the selected positions; ``z_base`` is ``(d,)``.
    """
    return (z - z_base).norm(dim=-1)


def ortho_loss_each(zs: Tensor, zs_base: Tensor) -> Tensor:
    """MELBO-ortho's objective position by position: the mean over positions of ``‖z_p(θ) − z_p(θ0)‖₂`` ``(B,)``.

    ``zs`` is ``(B, P, d)``, the target-layer residual at the selected positions; ``zs_base`` is ``(P, d)``.
    """
    return (zs - zs_base).norm(dim=-1).mean(dim=-1)


def kl_along(log_probs: Tensor, log_probs_base: Tensor) -> Tensor:
    """``KL(P_θ0 ‖ P_θ)`` of the next-token distributions, averaged over positions, per row ``(B,)``.

    ``log_probs`` is ``(B, P, V)``; ``log_probs_base`` is ``(P, V)``.
    """
    return (log_probs_base.exp() * (log_probs_base - log_probs)).sum(dim=-1).mean(dim=-1)


def kl_from_logits(logits: Tensor, log_probs_base: Tensor, fused: bool = False) -> Tensor:
    """``KL(P_θ0 ‖ P_θ)`` of the next-token distributions per row and position ``(B, P)``, from the logits ``(B, P, V)``
    and θ0's log-probabilities ``(P, V)``: :func:`kl_along` before its mean over positions, to rounding.

    ``KL = Σ p0 log p0 − p0·z + logsumexp(z)``, with the gradient ``softmax(z) − p0`` written out: the log-softmax
    over the vocabulary is never stored, and the backward is one softmax (on a 49k vocabulary, 3× faster than
    autograd through ``log_softmax``; bench/utilisation.py). ``fused``: the same sum compiled (torch.compile), its
    passes over the vocabulary fused into a few (the logits in any float dtype, read as float32): 0.16× the time of a
    16-row step's KL on SmolLM2 (AMX Xeon), after a few seconds of compiling per shape."""
    if fused:
        return _fused_kl()(logits, log_probs_base.exp(), _neg_entropy(log_probs_base))
    return _KLFromLogits.apply(logits.float(), log_probs_base.exp(), _neg_entropy(log_probs_base))


def _kl_terms(logits: Tensor, probs_base: Tensor, neg_entropy: Tensor) -> Tensor:
    """:func:`kl_from_logits` written plainly, for torch.compile to fuse."""
    z = logits.float()
    return neg_entropy - (z * probs_base).sum(dim=-1) + torch.logsumexp(z, dim=-1)


@functools.cache
def _fused_kl() -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """:func:`_kl_terms` compiled, once per process."""
    return torch.compile(_kl_terms)


def _neg_entropy(log_probs: Tensor) -> Tensor:
    probs = log_probs.exp()
    return torch.where(probs > 0, probs * log_probs, 0.0).sum(dim=-1)


class _KLFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, probs_base: Tensor, neg_entropy: Tensor) -> Tensor:
        ctx.save_for_backward(logits, probs_base)
        with torch.autocast(logits.device.type, enabled=False):  # under autocast the product p0·z would run in bfloat16
            return neg_entropy - torch.einsum("bpv,pv->bp", logits, probs_base) + torch.logsumexp(logits, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, probs_base = ctx.saved_tensors
        out = torch.softmax(logits, dim=-1)
        return out.sub_(probs_base).mul_(grad[..., None]), None, None


def likeliest(probs: Tensor, mass: float) -> Tensor:
    """The ids of the fewest tokens that hold ``mass`` of the distribution ``probs`` ``(V,)``, likeliest first."""
    sorted_p, order = probs.sort(descending=True)
    count = int(torch.searchsorted(sorted_p.cumsum(0), torch.tensor(mass, dtype=sorted_p.dtype, device=sorted_p.device))) + 1
    return order[:count]


def fisher_metric(log_probs_base: Tensor, head: Tensor, mass: float = 0.9999) -> Tensor:
    """The KL's second-order form in the LM head's input, per position ``(P, d, d)``: ``F = Wᵀ(diag p − p pᵀ)W``.

    ``KL(P_0 ‖ P_θ) ≈ ½ Δhᵀ F Δh`` for logits ``z = W h`` near ``z0`` (the Fisher information of the softmax, pulled
    back through ``W``). ``log_probs_base`` ``(P, V)``; ``head`` ``W`` ``(V, d)``. Per position only the likeliest
    tokens holding ``mass`` of the probability enter (the rest add < 1 − mass to any term): a peaked distribution costs
    a few hundred rows of ``W``, not the vocabulary.
    """
    metrics = []
    for row in log_probs_base.float():
        kept = likeliest(row.exp(), mass)
        p, w = row[kept].exp(), head[kept].float()
        mean = p @ w
        metrics.append((w * p[:, None]).T @ w - torch.outer(mean, mean))
    return torch.stack(metrics)


def fisher_along(hidden: Tensor, hidden_base: Tensor, metric: Tensor) -> Tensor:
    """The second-order KL ``½ Δhᵀ F Δh`` averaged over positions, per row ``(B,)``: :func:`kl_along` without the LM
    head. ``hidden`` ``(B, P, d)``; ``hidden_base`` ``(P, d)``; ``metric`` ``(P, d, d)`` from :func:`fisher_metric`."""
    delta = hidden - hidden_base
    return 0.5 * torch.einsum("bpi,pij,bpj->bp", delta, metric, delta).mean(dim=-1)


@dataclass(frozen=True)
class TopTokens:
    """What :func:`kl_top_along` needs at one target: at each position θ0's likeliest tokens there and one bucket for
    every other token."""

    rows: list[Tensor]  # per position (k, d): the LM head's rows of its kept tokens (the head itself, or one bfloat16 copy, where it keeps every token)
    log_p0: list[Tensor]  # per position (k,): θ0's log-probabilities of those tokens there
    rest_log_p0: Tensor  # (P,): log of θ0's probability of every other token together (−inf where there is none)
    rest_mean: Tensor  # (P, d): the mean head row of the other tokens, weighted by θ0's probabilities
    hidden0: Tensor  # (P, d): θ0's final hidden state

    @property
    def counts(self) -> list[int]:
        """How many tokens each position keeps."""
        return [len(kept) for kept in self.log_p0]


def top_tokens(
    log_probs_base: Tensor, hidden_base: Tensor, head: Tensor, mass: float = 0.9999, branch: int | None = None, branch_rows: Tensor | None = None
) -> TopTokens:
    """Set up :func:`kl_top_along` from θ0's log-probabilities ``(P, V)``, its final hidden state ``(P, d)`` and the
    LM head ``W`` ``(V, d)``: the head runs over the whole vocabulary here, once, and over each position's kept tokens
    after. Position by position, not their union: on a real model a few positions spread θ0's probability over tens
    of thousands of tokens and most over a few hundred, so the union costs several times the rows (Qwen2.5 0.5B, 31
    positions: 318k rows position by position against 2.6M for the union's 83k tokens at each). The price is memory:
    the kept rows are copied once (1.1 GB there, float32).

    The row ``branch`` (the last prompt token's, where θ0's text begins) keeps every token, so the KL there is exact (by
    default the head itself, not a copy). A copy far into a basis tends to open with a token that θ0 finds very
    unlikely there (one it writes later); in the bucket, priced to first order, such a token's rise goes unseen. On
    Gemma 3 270M's whole basis this cut the median KL(P_θ ‖ P_θ0) at that token from 1.14 to 0.62–0.68 for 1.1× the
    time per copy (the union of every position's tokens at every position: 0.58 for 1.5–1.8×; bench/RESULTS.md
    ``full_basis``). ``branch_rows``: the head as that row multiplies by it (default: in float32); a bfloat16 copy gives
    it bfloat16 products, half the memory to read at every evaluation."""
    log_p0 = log_probs_base.float()
    probs = log_p0.exp()
    w = head.float()
    every = torch.arange(probs.shape[-1], device=probs.device)
    ids = [every if p == branch else likeliest(row, mass) for p, row in enumerate(probs)]
    rest_p = probs.clone()
    for p, kept in enumerate(ids):
        rest_p[p, kept] = 0.0
    rest_mass = rest_p.sum(dim=-1)
    rest_mean = (rest_p @ w) / rest_mass.clamp_min(1e-30)[:, None]
    return TopTokens(
        rows=[(w if branch_rows is None else branch_rows) if p == branch else w.index_select(0, kept) for p, kept in enumerate(ids)],
        log_p0=[row if p == branch else row[kept] for p, (row, kept) in enumerate(zip(log_p0, ids))],
        rest_log_p0=torch.where(rest_mass > 0, rest_mass.clamp_min(1e-30).log(), -torch.inf), rest_mean=rest_mean,
        hidden0=hidden_base.float(),
    )


def kl_top_along(hidden: Tensor, top: TopTokens) -> Tensor:
    """``KL(P_θ0 ‖ P_θ)`` on θ0's likeliest tokens at each position plus one bucket for the rest, averaged over
    positions, per row ``(B,)``.

    With ``Δh`` the change of the final hidden state, token ``v``'s logit moves by ``Δh·W_v``, so exactly
    ``KL = log Σ_v p0_v e^{Δh·W_v} − Δh·E_p0[W]``. Here the sum runs over the position's kept tokens and one bucket for
    the others, whose log-mean-exp is taken to first order (``Δh·`` their mean row): the head runs over the kept tokens
    only, not the vocabulary. Exact at θ0 with a zero gradient there, never negative, never above the exact KL (the
    bucket's first-order log-mean-exp is below the true one: Jensen), and exact whenever the other tokens' logits move
    together. ``hidden`` ``(B, P, d)``. The gradient ``Σ_v (q_v − p0_v) W_v + (q_rest − p0_rest)
    W_rest`` (``q`` the moved distribution over the kept tokens and the bucket) is written out, one position at a time.
    Both terms of the KL come from the same products ``Δh·W_v``, and the gradient from one product by ``q − p0``, so a
    product's rounding cancels where the copy is close to θ0 (a bfloat16 head at the branch: otherwise its rounding,
    about 2⁻⁹ of each logit's change, would enter the KL at first order).
    """
    return _KLTop.apply(hidden.float() - top.hidden0, top).mean(dim=-1)


class _KLTop(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, delta: Tensor, top: TopTokens) -> Tensor:
        out = delta.new_empty(delta.shape[:2])
        moved: list[tuple[Tensor, Tensor]] = []  # per position: q − p0 on the kept tokens and on the bucket
        for p, (rows, log_p0) in enumerate(zip(top.rows, top.log_p0)):
            step, p0, p0_rest = delta[:, p], log_p0.exp(), top.rest_log_p0[p].exp()
            change = _product(step, rows.T)  # (B, k): each kept token's logit change Δh·W_v
            change_rest = step @ top.rest_mean[p]
            expected = change @ p0 + p0_rest * change_rest  # Δh·E_p0[W], from the very products the sum below sees
            kept, rest = change.add_(log_p0), top.rest_log_p0[p] + change_rest
            lse = torch.logsumexp(torch.cat([kept, rest[:, None]], dim=-1), dim=-1)
            out[:, p] = lse - expected
            if ctx.needs_input_grad[0]:
                moved.append((kept.sub_(lse[:, None]).exp_().sub_(p0), (rest - lse).exp() - p0_rest))
        ctx.top, ctx.moved = top, moved
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        top: TopTokens = ctx.top
        out = grad.new_empty(*grad.shape, top.hidden0.shape[-1])
        for p, (rows, (dq, dq_rest)) in enumerate(zip(top.rows, ctx.moved)):
            out[:, p] = _product(dq, rows).add_(dq_rest[:, None] * top.rest_mean[p]).mul_(grad[:, p, None])
        ctx.moved = []
        return out, None


def _product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` in float32, computed in ``b``'s dtype (a bfloat16 head's rows: a bfloat16 product, rounded to bfloat16
    as autocast would give it)."""
    return a @ b if a.dtype == b.dtype else (a.to(b.dtype) @ b).float()


def project_out(vectors: Tensor, basis: Tensor | None) -> Tensor:
    """Remove from each row of ``vectors`` its component along the rows of ``basis`` (orthonormal rows)."""
    if basis is None or basis.numel() == 0:
        return vectors
    return vectors - (vectors @ basis.T) @ basis


def orthonormal_rows(vectors: Tensor, eps: float = 1e-8) -> Tensor:
    """Orthonormal rows spanning the same space as ``vectors`` (Gram–Schmidt order kept); null rows dropped."""
    return extend_orthonormal(vectors.new_zeros(0, vectors.shape[-1]), vectors, eps)


def extend_orthonormal(basis: Tensor, rows: Tensor, eps: float = 1e-8) -> Tensor:
    """``basis`` (orthonormal rows, left untouched) followed by ``rows`` made orthonormal to it and to each
    other, in order; rows with nothing left are dropped. Growing a basis block by block this way gives
    the same numbers as rebuilding it in the same order, which is what makes a resumed run identical."""
    out: list[Tensor] = []
    for row in rows:
        for _ in range(2):  # twice is enough (Kahan–Parlett): keeps |cos| at float rounding level
            row = project_out(row[None], basis)[0]
            for done in out:
                row = row - (row @ done) * done
        norm = row.norm()
        if norm > eps:
            out.append(row / norm)
    return torch.cat([basis, torch.stack(out)]) if out else basis


def orthogonalize_block(block: Tensor, basis: Tensor | None = None) -> Tensor:
    """Make a block's rows orthogonal to ``basis`` and to each other, keeping each row's norm as it is after
    projection. Row ``i`` only loses its components along the basis and along rows ``< i`` (Gram–Schmidt),
    so block size 1 is exactly "project onto the orthogonal complement of the earlier vectors".
    """
    block = project_out(project_out(block, basis), basis)  # twice: one pass leaves ~1e-7 relative error
    out: list[Tensor] = []
    units: list[Tensor] = []
    for row in block:
        for unit in units:
            row = row - (row @ unit) * unit
        for unit in units:
            row = row - (row @ unit) * unit
        out.append(row)
        norm = row.norm()
        units.append(row / norm if norm > 0 else row)
    return torch.stack(out)


def to_sphere(block: Tensor, radius: float, eps: float = 1e-12) -> Tensor:
    """Rescale each row to norm ``radius``."""
    return radius * block / block.norm(dim=-1, keepdim=True).clamp_min(eps)


def random_orthogonal_block(
    count: int, d: int, radius: float, basis: Tensor | None, generator: torch.Generator
) -> Tensor:
    """``count`` random rows of norm ``radius``, orthogonal to ``basis`` and to each other."""
    if count + (0 if basis is None else basis.shape[0]) > d:
        raise MelboError(f"cannot find {count} more orthogonal vectors in dimension {d}")
    block = torch.randn(count, d, generator=generator, dtype=torch.float64)
    basis64 = None if basis is None else basis.to(torch.float64)
    return to_sphere(orthogonalize_block(block, basis64), radius).to(torch.float32)


def max_abs_cosine(vectors: Tensor) -> float:
    """Largest ``|cos|`` between two different rows (all pairs): the orthogonality check."""
    if vectors.shape[0] < 2:
        return 0.0
    units = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    cos = units @ units.T
    cos.fill_diagonal_(0.0)
    return float(cos.abs().max())


def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``KL(P ‖ Q) = Σ P (log P − log Q)`` over the last dimension, from logits (float64 inside)."""
    log_p = torch.log_softmax(logits_p.double(), dim=-1)
    log_q = torch.log_softmax(logits_q.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)
