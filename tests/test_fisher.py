"""``--match fisher``: the KL's second-order form in the LM head's input, checked against the exact KL (``--match kl``)
on tiny models of several families."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from melbo import MelboError
from melbo.engines.ortho import OrthoConfig, ortho
from melbo.model.forward import prepare, steered_final_hidden, steered_log_probs
from melbo.model.layers import head_skipped, lm_head
from melbo.model.loading import LoadedModel
from melbo.model.prompts import PromptFormat
from melbo.objectives import fisher_along, fisher_metric, kl_along, kl_top_along, likeliest, max_abs_cosine, top_tokens

PROMPT = "how do I do it?"
ARCHS = ["llama", "qwen2", "gpt2", "gpt_neox", "gemma", "phi3", "opt"]


def lm_of(arch: str, char_tokenizer) -> LoadedModel:
    model = make_tiny_model(arch, initializer_range=0.3 if arch in ("llama", "qwen2") else 0.02)
    return LoadedModel(model, char_tokenizer, f"tiny-{arch}", {"id": "tiny"})


@pytest.mark.parametrize("arch", ARCHS)
def test_final_hidden_times_the_head_gives_the_models_log_probs(arch, char_tokenizer):
    lm = lm_of(arch, char_tokenizer)
    state = prepare(lm, [PROMPT], PromptFormat(), 1)[0]
    thetas = torch.randn(3, lm.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = steered_final_hidden(lm.model, state, 1, thetas, 5)
        exact = steered_log_probs(lm.model, state, 1, thetas, 5)
    weight = lm_head(lm.model).weight
    torch.testing.assert_close(torch.log_softmax(hidden @ weight.T, dim=-1), exact, atol=1e-5, rtol=1e-5)
    ids = state.ids
    with torch.no_grad():  # the head is the model's own again outside the context
        assert lm.model(input_ids=ids).logits.shape[-1] == weight.shape[0]
        with head_skipped(lm.model):
            assert lm.model(input_ids=ids).logits.shape[-1] == lm.d_model
        assert "forward" not in lm_head(lm.model).__dict__


@pytest.mark.parametrize("arch", ARCHS)
def test_second_order_kl_matches_the_exact_kl_near_the_base(arch, char_tokenizer):
    """½ Δhᵀ F Δh → KL(P_θ0 ‖ P_θ) as θ → θ0: within 5 % for a small step, its error shrinking with the step."""
    lm = lm_of(arch, char_tokenizer)
    state = prepare(lm, [PROMPT], PromptFormat(), 1)[0]
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(lm.d_model, generator=gen)
    direction = torch.randn(4, lm.d_model, generator=gen)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        log_probs0 = steered_log_probs(lm.model, state, 1, base[None], 6)[0]
        hidden0 = steered_final_hidden(lm.model, state, 1, base[None], 6)[0]
        metric = fisher_metric(log_probs0, lm_head(lm.model).weight, mass=1.0)
        errors = []
        for step in (0.4, 0.1):
            thetas = base + step * base.norm() * direction
            exact = kl_along(steered_log_probs(lm.model, state, 1, thetas, 6), log_probs0)
            approx = fisher_along(steered_final_hidden(lm.model, state, 1, thetas, 6), hidden0, metric)
            assert (exact > 0).all()
            errors.append(((approx - exact).abs() / exact).max().item())
    assert errors[1] < 0.05 and errors[1] < errors[0], errors


def test_the_metric_is_the_softmax_fisher_pulled_back_through_the_head():
    gen = torch.Generator().manual_seed(2)
    head, log_probs = torch.randn(50, 8, generator=gen), torch.log_softmax(torch.randn(3, 50, generator=gen), dim=-1)
    metric = fisher_metric(log_probs, head, mass=1.0)
    for p, f in zip(log_probs.exp(), metric):
        torch.testing.assert_close(f, head.T @ (torch.diag(p) - torch.outer(p, p)) @ head, atol=1e-4, rtol=1e-4)
    assert (torch.linalg.eigvalsh(metric) > -1e-5).all()  # positive semi-definite: the loss is ≥ 0
    peaked = torch.log_softmax(torch.tensor([[12.0, 0.0, *[-30.0] * 48]]), dim=-1)
    torch.testing.assert_close(fisher_metric(peaked, head), fisher_metric(peaked, head, mass=1.0), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("match", ["fisher", "kl-top"])
def test_ortho_with_a_cheaper_kl_finds_orthogonal_copies_close_in_exact_kl(match, nonlinear_lm):
    base = torch.randn(32, generator=torch.Generator().manual_seed(7))
    base = 3.0 * base / base.norm()
    settings = dict(source=1, target=4, count=4, block=4, steps=40, plateau=0.0, continuation=4, completion_tokens=0)
    start = ortho(nonlinear_lm, base, [PROMPT], OrthoConfig(**{**settings, "steps": 1}, match=match, min_norm=0.0))
    found = ortho(nonlinear_lm, base, [PROMPT], OrthoConfig(**settings, match=match))
    assert found.meta.config["match"] == match and max_abs_cosine(found.vectors) <= 1e-5
    # judged with the exact KL at the last prompt token, as every run is: better than one step from a random start
    assert sorted(r.kl for r in found.records[1:])[1] < sorted(r.kl for r in start.records[1:])[1]
    with pytest.raises(MelboError, match="fast-mode objective"):
        OrthoConfig(mode="seed", match=match).check()


def test_fisher_is_refused_where_logits_are_capped_after_the_head(char_tokenizer):
    import transformers

    config = transformers.Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=8, num_hidden_layers=2, final_logit_softcapping=30.0)
    with pytest.raises(MelboError, match="use --match kl"):
        lm_head(transformers.AutoModelForCausalLM.from_config(config))


MASS = 0.99  # 1 % of θ0's probability in the bucket at each position (the default: 0.01 %)


def kl_top_by_autograd(hidden, top):
    """kl_top_along's sum as plain tensor code, for autograd to differentiate: the written-out gradient's reference."""
    delta, per_position = hidden - top.hidden0, []
    for p, (rows, log_p0) in enumerate(zip(top.rows, top.log_p0)):
        kept = log_p0 + delta[:, p] @ rows.T
        rest = top.rest_log_p0[p] + delta[:, p] @ top.rest_mean[p]
        expected = (delta[:, p] @ rows.T) @ log_p0.exp() + top.rest_log_p0[p].exp() * (delta[:, p] @ top.rest_mean[p])  # Δh·E_p0[W]
        per_position.append(torch.logsumexp(torch.cat([kept, rest[:, None]], dim=-1), dim=-1) - expected)
    return torch.stack(per_position, dim=-1).mean(dim=-1)


@pytest.mark.parametrize("arch", ARCHS)
def test_kl_on_the_top_tokens_matches_the_exact_kl(arch, char_tokenizer):
    """``--match kl-top`` against the exact KL: equal, with the same gradient, with every token kept; with 99 % of θ0's
    mass kept at each position (1 % in the bucket, against 0.01 % by default) within 5 % on the peaked tiny models
    (18 % with 10 % in the bucket), with the gradient of its own sum; zero with a zero gradient at θ0; never negative, and
    never above the exact KL on any family (the bucket's log-mean-exp to first order is a lower bound of the true one)."""
    lm = lm_of(arch, char_tokenizer)
    state = prepare(lm, [PROMPT], PromptFormat(), 1)[0]
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(lm.d_model, generator=gen)
    direction = torch.nn.functional.normalize(torch.randn(4, lm.d_model, generator=gen), dim=-1)
    head = lm_head(lm.model).weight
    with torch.no_grad():
        log_probs0 = steered_log_probs(lm.model, state, 1, base[None], 6)[0]
        hidden0 = steered_final_hidden(lm.model, state, 1, base[None], 6)[0]
        every, most = top_tokens(log_probs0, hidden0, head, mass=1.0), top_tokens(log_probs0, hidden0, head, mass=MASS)
        assert max(most.counts) < head.shape[0] and torch.isfinite(most.rest_log_p0).all()
        # position by position: each keeps its own likeliest tokens, the fewest holding 90 % of θ0's probability there
        assert most.counts == [len(likeliest(row.exp(), MASS)) for row in log_probs0]
    for step in (1.0, 0.1):
        thetas = base + step * base.norm() * direction
        with torch.no_grad():
            exact = kl_along(steered_log_probs(lm.model, state, 1, thetas, 6), log_probs0)
            hidden = steered_final_hidden(lm.model, state, 1, thetas, 6)
            torch.testing.assert_close(kl_top_along(hidden, every), exact, atol=1e-6, rtol=1e-3)
            approx = kl_top_along(hidden, most)
            assert (approx >= 0).all() and (approx <= exact + 1e-6).all()
        if arch in ("llama", "qwen2"):  # peaked distributions; the others are nearly flat over 128 tokens
            assert ((approx - exact).abs() / exact).max() < 0.05
        # the written-out gradient is the KL's own: against autograd through the exact KL from the same hidden states
        moved = hidden.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(kl_top_along(moved, every).sum(), moved)
        logits = moved @ head.T
        reference = (log_probs0.exp() * (log_probs0 - torch.log_softmax(logits, dim=-1))).sum(dim=-1).mean(dim=-1)
        (expected,) = torch.autograd.grad(reference.sum(), moved)
        torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-3)
        # and with tokens in the bucket: against autograd through the same sum, written with logsumexp
        (grad,) = torch.autograd.grad(kl_top_along(moved, most).sum(), moved)
        (expected,) = torch.autograd.grad(kl_top_by_autograd(moved, most).sum(), moved)
        torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-3)
    at_base = hidden0[None].clone().requires_grad_(True)
    value = kl_top_along(at_base, most)
    (grad,) = torch.autograd.grad(value.sum(), at_base)
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-6) and grad.abs().max() < 1e-5


def test_the_last_prompt_token_keeps_every_token():
    """At ``branch`` (the last prompt token's row) kl-top keeps every token, the head itself and not a copy, so a copy
    that opens with a token θ0 finds very unlikely there (one it writes later) pays the exact KL for it; in the
    first-order bucket that token's rise goes unseen."""
    gen = torch.Generator().manual_seed(3)
    vocab, d = 64, 16
    head = torch.randn(vocab, d, generator=gen)
    logits0 = torch.full((2, vocab), -12.0)
    logits0[0, 5], logits0[1, 9] = 8.0, 8.0  # θ0 writes token 5, then token 9
    logits0 += 0.1 * torch.randn(2, vocab, generator=gen)
    log_probs0 = torch.log_softmax(logits0, dim=-1)
    hidden0 = torch.zeros(2, d)
    own, branched = top_tokens(log_probs0, hidden0, head), top_tokens(log_probs0, hidden0, head, branch=0)
    assert own.counts == [1, 1] and branched.counts == [vocab, 1] and branched.rows[0].data_ptr() == head.data_ptr()
    assert branched.rest_log_p0[0] == -torch.inf and torch.equal(branched.rows[1], own.rows[1])
    # a change of the final hidden state at the first position that raises token 9's logit there by 24
    delta = torch.zeros(3, 2, d)
    delta[0, 0] = 24 * head[9] / head[9].norm() ** 2
    delta[1:] = 0.3 * torch.randn(2, 2, d, generator=gen)
    exact = kl_along(torch.log_softmax(logits0 + delta @ head.T, dim=-1), log_probs0)
    seen, unseen = kl_top_along(delta, branched), kl_top_along(delta, own)
    assert float(exact[0]) > 1.0 and float(unseen[0]) < 0.5 * float(exact[0])
    torch.testing.assert_close(seen[0], exact[0], rtol=1e-4, atol=1e-6)
    # its gradient, against autograd through the same sum
    moved = delta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(kl_top_along(moved, branched).sum(), moved)
    (expected,) = torch.autograd.grad(kl_top_by_autograd(moved, branched).sum(), moved)
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-4)
    # with a bfloat16 head at the branch (bfloat16 products): the same KL and gradient to bfloat16's rounding, which
    # cancels near θ0 (rows 1 and 2, KL ~1e-7; Δh·E_p0[W] from float32 rows left them at -3e-3, a negative KL)
    halved = top_tokens(log_probs0, hidden0, head, branch=0, branch_rows=head.bfloat16())
    assert halved.rows[0].dtype == torch.bfloat16 and halved.rows[1].dtype == torch.float32
    torch.testing.assert_close(kl_top_along(delta, halved), seen, rtol=2e-2, atol=1e-5)
    (rounded,) = torch.autograd.grad(kl_top_along(moved, halved).sum(), moved)
    torch.testing.assert_close(rounded, grad, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_kl_top_branches_at_each_prompts_last_token(nonlinear_lm, precision):
    """The engine gives kl-top the row of the prompt's last token among the positions it matches (the last 4 prompt
    tokens, then the continuation): there it keeps every token (the head itself in float32, one bfloat16 copy with
    bfloat16 products), elsewhere each position its own likeliest."""
    from melbo.engines.ortho import _Problem, prompt_end

    base = torch.randn(32, generator=torch.Generator().manual_seed(0))
    settings = OrthoConfig(source=1, target=4, continuation=4, match="kl-top", completion_tokens=0, precision=precision).resolved(3.0, 32, 6)
    problem = _Problem(nonlinear_lm, prepare(nonlinear_lm, [PROMPT], PromptFormat(), 1), settings, base)
    state, where = problem.states[0], problem.wheres[0]
    assert where.stop - where.start == 8 and prompt_end(state, where) == 3
    assert prompt_end(state, slice(state.length, state.length + 4)) is None
    with torch.no_grad():
        log_probs0 = steered_log_probs(nonlinear_lm.model, problem.targets[0], 1, base[None], 8)[0]
    expected = [len(likeliest(row.exp(), 0.9999)) for row in log_probs0]
    vocab = log_probs0.shape[-1]
    assert problem.tops[0].counts == [*expected[:3], vocab, *expected[4:]] and expected[3] < vocab
    branch, head = problem.tops[0].rows[3], lm_head(nonlinear_lm.model).weight
    if precision == "float32":
        assert branch is head
    else:
        assert branch.dtype == torch.bfloat16 and torch.equal(branch, head.bfloat16())
    assert all(rows.dtype == torch.float32 for p, rows in enumerate(problem.tops[0].rows) if p != 3)
