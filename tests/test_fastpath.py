"""melbo.model.fastpath: the contiguous LM-head input, the float32 attention under autocast, the bfloat16 weight copies
and the compiled blocks change speed, not results, on tiny models of several families; each leaves the model as it
was, also when the body raises."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import ARCHS, make_tiny_model

import melbo.model.forward as forward
from melbo.model.fastpath import (
    FLOAT32_SDPA,
    CastWeights,
    bfloat16_is_fast,
    bfloat16_products,
    compile_failed,
    compiled_blocks,
    compiler_available,
    contiguous_head_input,
    float32_attention,
    onednn_may_use_bfloat16_units,
)
from melbo.model.forward import prepare, steered_log_probs
from melbo.model.layers import find_blocks
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


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cast_weights_give_autocasts_numbers_and_put_the_originals_back(arch, char_tokenizer):
    """bfloat16 copies made once: under autocast the same logits and gradient as autocast casting the float32 weights
    itself; outside, the model's own parameters again (also when the body raises)."""
    lm = lm_of(arch, char_tokenizer)
    originals = [p for p in lm.model.parameters()]
    blocks = list(find_blocks(lm.model))
    weights = CastWeights.of([*blocks, lm.model.get_output_embeddings()])
    assert weights.copies and all(copy.dtype == torch.bfloat16 and not copy.requires_grad for _, _, copy in weights.copies)
    thetas = torch.randn(3, lm.d_model, generator=torch.Generator().manual_seed(0))
    with bfloat16_products(lm.model, torch.device("cpu")):
        plain = log_probs_and_gradient(lm, thetas)
    with bfloat16_products(lm.model, torch.device("cpu"), weights=weights):
        assert lm.model.get_output_embeddings().weight.dtype == torch.bfloat16
        cast = log_probs_and_gradient(lm, thetas)
    torch.testing.assert_close(cast[0], plain[0], atol=0.0, rtol=0.0)
    torch.testing.assert_close(cast[1], plain[1], atol=0.0, rtol=0.0)
    with pytest.raises(RuntimeError, match="boom"), weights.installed():
        raise RuntimeError("boom")
    assert all(a is b for a, b in zip(lm.model.parameters(), originals))


def test_compiled_blocks_compute_the_same_and_restore_the_model(char_tokenizer):
    lm = lm_of("llama", char_tokenizer)
    blocks = list(find_blocks(lm.model))[2:]
    thetas = torch.randn(3, lm.d_model, generator=torch.Generator().manual_seed(0))
    eager = log_probs_and_gradient(lm, thetas)
    with compiled_blocks(blocks):
        assert all("forward" in block.__dict__ for block in blocks)
        compiled = log_probs_and_gradient(lm, thetas)
    assert not any("forward" in block.__dict__ for block in blocks)
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="boom"), compiled_blocks(blocks):
        raise RuntimeError("boom")
    assert not any("forward" in block.__dict__ for block in blocks)


def test_compile_failures_are_told_from_other_errors():
    from torch._dynamo.exc import BackendCompilerFailed

    assert compile_failed(BackendCompilerFailed(lambda *a: None, RuntimeError("no compiler"), None))
    assert not compile_failed(RuntimeError("a shape mismatch")) and not compile_failed(ValueError())
    assert compiler_available(torch.device("meta")) is False


def test_kept_heap_sets_glibcs_thresholds_and_lets_memory_go_back_after(monkeypatch):
    import melbo.model.fastpath as fastpath

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(fastpath, "_mallopt", lambda: lambda param, value: calls.append((param, value)) or 1)
    with pytest.raises(RuntimeError, match="boom"), fastpath.kept_heap():
        assert calls == [(fastpath.M_MMAP_THRESHOLD, 32 * 2**20), (fastpath.M_TRIM_THRESHOLD, 2**31 - 1)]
        raise RuntimeError("boom")
    assert calls[-1] == (fastpath.M_TRIM_THRESHOLD, 64 * 2**20)  # freed memory beyond 64 MiB goes back to the system
    monkeypatch.setattr(fastpath, "_mallopt", lambda: None)  # not glibc: nothing to set
    with fastpath.kept_heap():
        pass
    assert len(calls) == 3


def test_bfloat16_is_slow_where_onednn_is_capped_below_its_units(monkeypatch):
    # an AVX2 stand-in on a CPU with AMX (ONEDNN_MAX_CPU_ISA=AVX2) converts bfloat16 in software: --precision auto must
    # then pick float32, whatever the CPU's flags say
    assert onednn_may_use_bfloat16_units("") and onednn_may_use_bfloat16_units("ALL") and onednn_may_use_bfloat16_units("default")
    for cap in ("AVX512_CORE_BF16", "avx512_core_amx", "AVX512_CORE_FP16", "AVX10_1_512_AMX"):
        assert onednn_may_use_bfloat16_units(cap), cap
    for cap in ("AVX2", "avx512_core", "AVX512_CORE_VNNI", "SSE41", "AVX2_VNNI"):
        assert not onednn_may_use_bfloat16_units(cap), cap
    cpu = torch.cpu
    monkeypatch.setattr(cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert bfloat16_is_fast(torch.device("cpu"))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not bfloat16_is_fast(torch.device("cpu"))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE")
    assert not bfloat16_is_fast(torch.device("cpu"))
