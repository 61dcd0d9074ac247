"""melbo.model.fastpath: the contiguous LM-head input and the float32 attention under autocast change speed, not
results, on tiny models of several families; both leave the model as it was, also when the body raises."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import ARCHS, make_tiny_model

import melbo.model.forward as forward
from melbo.model.fastpath import FLOAT32_SDPA, bfloat16_products, contiguous_head_input, float32_attention
from melbo.model.forward import prepare, steered_log_probs
from melbo.model.loading import LoadedModel
from melbo.model.prompts import PromptFormat

PROMPT = "how do I do it?"


def lm_of(arch: str, char_tokenizer) -> LoadedModel:
    return LoadedModel(make_tiny_model(arch, initializer_range=0.3), char_tokenizer, f"tiny-{arch}", {"id": "tiny"})


def log_probs_and_gradient(lm: LoadedModel, thetas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    state = prepare(lm, [PROMPT], PromptFormat(), 1)[0]
    point = thetas.clone().requires_grad_(True)
    out = steered_log_probs(lm.model, state, 1, point, 6)
    (grad,) = torch.autograd.grad(out.exp().pow(2).sum(), point)
    return out.detach(), grad


@pytest.mark.parametrize("arch", ARCHS)
def test_the_head_reads_a_contiguous_input_and_computes_the_same(arch, char_tokenizer, monkeypatch):
    lm = lm_of(arch, char_tokenizer)
    head = lm.model.get_output_embeddings()
    thetas = torch.randn(3, lm.d_model, generator=torch.Generator().manual_seed(0))
    seen: list[bool] = []

    def record(_module, args, _output):  # the test's own hook: what the head computed on, after the pre-hooks
        seen.append(args[0].is_contiguous())

    handle = head.register_forward_hook(record)
    try:
        fast = log_probs_and_gradient(lm, thetas)  # steered_log_probs enters contiguous_head_input
        monkeypatch.setattr(forward, "contiguous_head_input", lambda model: contextlib.nullcontext())
        slow = log_probs_and_gradient(lm, thetas)  # the model's own (strided) path
    finally:
        handle.remove()
    assert seen == [True, False]  # melbo's hook made the head's input contiguous; the plain path slices
    assert not head._forward_pre_hooks  # and it is gone
    torch.testing.assert_close(fast[0], slow[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fast[1], slow[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_float32_attention_under_autocast_is_float32_and_restores_the_model(arch, char_tokenizer):
    lm = lm_of(arch, char_tokenizer)
    config = lm.model.config
    assert config._attn_implementation == "sdpa"
    ids = prepare(lm, [PROMPT], PromptFormat(), 1)[0].ids
    seen: list[tuple[torch.dtype, torch.dtype, bool]] = []  # (query, value, autocast on): how the kernel will compute
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):  # the test's own stand-in, restored below
        seen.append((query.dtype, value.dtype, torch.is_autocast_enabled("cpu")))
        return real(query, key, value, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            exact = lm.model(input_ids=ids).logits
            seen.clear()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                plain = lm.model(input_ids=ids).logits.float()
            plain_dtypes = set(seen)
            seen.clear()
            with bfloat16_products(lm.model, torch.device("cpu")):
                assert torch.is_autocast_enabled("cpu") and config._attn_implementation == FLOAT32_SDPA
                fast = lm.model(input_ids=ids).logits.float()
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    assert all(on for _, _, on in plain_dtypes)  # plain autocast: the kernel casts its inputs to bfloat16
    assert set(seen) == {(torch.float32, torch.float32, False)}  # melbo's: float32 in, autocast off
    assert config._attn_implementation == "sdpa" and not torch.is_autocast_enabled("cpu")
    for approximate in (plain, fast):  # bfloat16 products, either way: within their rounding of the float32 logits
        torch.testing.assert_close(approximate, exact, atol=0.5, rtol=0.1)


def test_float32_attention_leaves_other_implementations_and_restores_on_error(char_tokenizer):
    lm = lm_of("llama", char_tokenizer)
    lm.model.config._attn_implementation = "eager"
    with float32_attention(lm.model) as switched:
        assert switched is False and lm.model.config._attn_implementation == "eager"
    lm.model.config._attn_implementation = "sdpa"
    with pytest.raises(RuntimeError, match="boom"), float32_attention(lm.model) as switched:
        assert switched is True
        raise RuntimeError("boom")
    assert lm.model.config._attn_implementation == "sdpa"
    with bfloat16_products(lm.model, torch.device("cpu"), enabled=False):
        assert not torch.is_autocast_enabled("cpu") and lm.model.config._attn_implementation == "sdpa"
    with contiguous_head_input(torch.nn.Linear(2, 2)):  # a module without output embeddings: nothing to do
        pass
