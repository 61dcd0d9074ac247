"""Prompts packed into one sequence (melbo.model.packing) give each prompt's own numbers, on tiny models of every
family; MELBO-ortho's objective packs its prompts when it may and then has the same losses and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from melbo.engines.config import OrthoConfig
from melbo.engines.ortho import _prepared, _Problem, prompt_weights
from melbo.model.fastpath import bfloat16_products
from melbo.model.forward import prepare, steered_final_hidden, steered_logits, target_residual
from melbo.model.loading import LoadedModel
from melbo.model.packing import matches, pack
from melbo.model.prompts import PromptFormat
from melbo.objectives import kl_from_logits

ARCHS = ["llama", "qwen2", "gpt2", "gpt_neox", "gemma", "phi3", "opt"]
PROMPTS = ["how do I do it?", "and this one", "hi"]


def lm_of(arch: str, char_tokenizer, **overrides) -> LoadedModel:
    return LoadedModel(make_tiny_model(arch, initializer_range=0.3, **overrides), char_tokenizer, f"tiny-{arch}", {"id": "tiny"})


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_prompts_give_each_prompts_own_outputs(arch, char_tokenizer):
    lm = lm_of(arch, char_tokenizer)
    states = prepare(lm, PROMPTS, PromptFormat(), 1)
    packing = pack(states)
    common = 0
    while all(s.ids[0, common] == states[0].ids[0, common] for s in states):
        common += 1
    assert packing.shared == common > 0  # the chat template's first tokens, once
    assert packing.state.length == common + sum(s.length - common for s in states)
    thetas = torch.randn(3, lm.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for k, state in enumerate(states):
            every = slice(0, state.length)
            rows = packing.index(k, every)
            assert packing.state.ids[0, rows].tolist() == state.ids[0].tolist()
            for alone, packed in [
                (steered_logits(lm.model, state, 1, thetas, state.length), steered_logits(lm.model, packing.state, 1, thetas, rows)),
                (steered_final_hidden(lm.model, state, 1, thetas, 4), steered_final_hidden(lm.model, packing.state, 1, thetas, rows[-4:])),
                (target_residual(lm.model, state, 1, 3, thetas), target_residual(lm.model, packing.state, 1, 3, thetas)[:, rows]),
            ]:
                torch.testing.assert_close(packed, alone, atol=2e-5, rtol=1e-4)


def test_an_eager_attention_model_gets_an_additive_mask(char_tokenizer):
    lm = lm_of("llama", char_tokenizer, attn_implementation="eager")
    assert lm.model.config._attn_implementation == "eager"
    states = prepare(lm, PROMPTS, PromptFormat(), 1)
    packing = pack(states, boolean_mask=False)
    assert packing.state.mask is not None and packing.state.mask.dtype == torch.float32
    thetas = torch.randn(2, lm.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        alone = [steered_logits(lm.model, s, 1, thetas, s.length) for s in states]
        packed = steered_logits(lm.model, packing.state, 1, thetas, torch.cat([packing.index(k, slice(0, s.length)) for k, s in enumerate(states)]))
    assert matches(packed[0], [a[0] for a in alone]) and matches(packed[1], [a[1] for a in alone])
    assert not matches(packed[0], [a[1] for a in alone])


@pytest.mark.parametrize("match", ["kl", "kl-top", "mean", "each", "fisher"])
def test_ortho_objective_packs_its_prompts_with_the_same_losses_and_gradients(match, char_tokenizer):
    lm = lm_of("llama", char_tokenizer)
    base = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(2))
    cfg = OrthoConfig(match=match, continuation=4, extra_prompts=2, precision="float32")
    ready = _prepared(lm, base, PROMPTS[:1], cfg, PromptFormat())
    base, settings, prompts = ready.base, ready.settings, ready.prompts
    problem = _Problem(lm, prepare(lm, prompts, PromptFormat(), settings.source), settings, base)
    assert problem.packing is not None and len(problem.pieces) == 3
    thetas = torch.randn(4, lm.d_model, generator=torch.Generator().manual_seed(3))

    def loss_and_gradient() -> tuple[torch.Tensor, torch.Tensor]:
        point = thetas.clone().requires_grad_(True)
        losses = problem.losses(point)
        return losses.detach(), torch.autograd.grad(losses.sum(), point)[0]

    packed = loss_and_gradient()
    problem.packing = None
    alone = loss_and_gradient()
    torch.testing.assert_close(packed[0], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[1], alone[1], atol=1e-5, rtol=1e-3)


def test_the_packed_kl_stays_float32_with_bfloat16_products(char_tokenizer):
    """--precision bfloat16 runs the model's products in bfloat16, never the objective: the packed prompts' KL is
    computed in float32 from the bfloat16 forward's logits (until 2026-12-04 it ran under autocast, its p0·z product
    in bfloat16: 1.8 % off float32's loss on SmolLM2 against 0.5 % now)."""
    lm = lm_of("llama", char_tokenizer)
    base = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(2))
    cfg = OrthoConfig(match="kl", continuation=4, extra_prompts=2, precision="bfloat16")
    ready = _prepared(lm, base, PROMPTS[:1], cfg, PromptFormat())
    base, settings, prompts = ready.base, ready.settings, ready.prompts
    problem = _Problem(lm, prepare(lm, prompts, PromptFormat(), settings.source), settings, base)
    assert problem.packing is not None
    thetas = 3 * torch.randn(4, lm.d_model, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with bfloat16_products(lm.model, torch.device("cpu")):
            logits = steered_logits(lm.model, problem.packing.state, settings.source, thetas, problem.packed_rows)
        kl = kl_from_logits(logits, torch.cat(problem.z_base))
        weights = prompt_weights(len(problem.pieces), settings.first_weight)
        expected = sum(w * kl[:, piece].mean(dim=-1) for piece, w in zip(problem.pieces, weights)) + settings.penalty * thetas.pow(2).sum(dim=-1)
        torch.testing.assert_close(problem.losses(thetas), expected, atol=1e-7, rtol=1e-6)


def test_one_prompt_is_never_packed(char_tokenizer):
    lm = lm_of("llama", char_tokenizer)
    base = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(2))
    ready = _prepared(lm, base, PROMPTS[:1], OrthoConfig(continuation=4, extra_prompts=0), PromptFormat())
    base, settings, prompts = ready.base, ready.settings, ready.prompts
    assert _Problem(lm, prepare(lm, prompts, PromptFormat(), settings.source), settings, base).packing is None


def test_a_model_that_ignores_the_mask_is_not_packed(char_tokenizer, monkeypatch):
    """Packing is used only where it gives the prompts' own numbers: a mask that lets every token see every earlier
    one (what a model ignoring the packed mask computes) fails the check, and the prompts run one by one."""
    import melbo.engines.ortho as ortho_module
    from melbo.model import packing as packing_module

    def leaky(states, boolean_mask=True):
        packing = packing_module.pack(states, boolean_mask)
        length = packing.state.length
        packing.state.mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
        return packing

    monkeypatch.setattr(ortho_module, "pack", leaky)
    lm = lm_of("llama", char_tokenizer)
    base = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(2))
    ready = _prepared(lm, base, PROMPTS[:1], OrthoConfig(continuation=4, extra_prompts=2), PromptFormat())
    base, settings, prompts = ready.base, ready.settings, ready.prompts
    assert _Problem(lm, prepare(lm, prompts, PromptFormat(), settings.source), settings, base).packing is None


def test_seed_mode_with_the_kl_match_measures_the_kl(char_tokenizer):
    """The seed algorithm's full forward is for the residual matches; with --match kl its loss is the KL, as fast mode's."""
    lm = lm_of("llama", char_tokenizer)
    base = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(2))
    ready = _prepared(lm, base, PROMPTS[:1], OrthoConfig(mode="seed", match="kl"), PromptFormat())
    base, settings, prompts = ready.base, ready.settings, ready.prompts
    problem = _Problem(lm, prepare(lm, prompts, PromptFormat(), settings.source), settings, base)
    thetas = torch.randn(2, lm.d_model, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(problem.losses(thetas, full=True), problem.losses(thetas))
        assert float(problem.losses(base[None], full=True)[0]) == pytest.approx(0.0, abs=1e-5)
