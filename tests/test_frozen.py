"""A model you loaded yourself (``from_pretrained`` leaves every weight requiring a gradient; a model being fine-tuned is
in training mode) gets no weight gradients and no dropout from melbo, and is handed back as it was. Before, each
optimisation step left every weight's gradient in its ``.grad`` and dropout made the vectors random."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from melbo import DiscoverConfig, EvalConfig, LoadedModel, MelboError, OrthoConfig, discover, evaluate, generate, ortho
from melbo.model.frozen import frozen

PROMPT = "hi there"


def as_you_load_it(**config) -> torch.nn.Module:
    """The tiny model as from_pretrained or a training loop leaves it: training mode, every weight requiring a gradient."""
    model = make_tiny_model("llama", initializer_range=0.3, **config)
    return model.train().requires_grad_(True)


def test_a_model_you_loaded_yourself_gets_no_weight_gradients_nor_dropout_and_comes_back_as_it_was(char_tokenizer):
    mine = LoadedModel(as_you_load_it(attention_dropout=0.5), char_tokenizer, "mine")
    ready = LoadedModel(make_tiny_model("llama", initializer_range=0.3, attention_dropout=0.5), char_tokenizer, "ready")  # as load_model leaves it
    cfg = DiscoverConfig(count=2, radius=3.0, source=1, target=4, steps=5, block=2, completion_tokens=6)
    found, expected = (discover(lm, [PROMPT], cfg, progress=False) for lm in (mine, ready))
    torch.testing.assert_close(found.vectors, expected.vectors)  # with dropout on, each step's forward pass was random
    copy_cfg = OrthoConfig(count=2, source=1, target=4, steps=5, block=2)
    copies, copies_expected = (ortho(lm, found.vectors[0], [PROMPT], copy_cfg, progress=False) for lm in (mine, ready))
    torch.testing.assert_close(copies.vectors, copies_expected.vectors)
    assert evaluate(mine, copies, cfg=EvalConfig(max_new_tokens=6), progress=False).completions(PROMPT, "greedy") == \
        evaluate(ready, copies_expected, cfg=EvalConfig(max_new_tokens=6), progress=False).completions(PROMPT, "greedy")
    assert generate(mine, found.vectors[1], 1, PROMPT) == generate(ready, found.vectors[1], 1, PROMPT)

    assert all(p.grad is None for p in mine.model.parameters())  # discover and ortho left 27 weights' gradients here
    assert all(p.requires_grad for p in mine.model.parameters()) and all(m.training for m in mine.model.modules())


def test_frozen_restores_each_module_and_parameter_also_on_an_exception():
    model = as_you_load_it()
    model.model.layers[0].eval()  # a mixed state comes back mixed
    model.lm_head.weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError), frozen(model):
        assert not any(m.training for m in model.modules()) and not any(p.requires_grad for p in model.parameters())
        raise RuntimeError("a step failed")
    assert [m.training for m in model.modules()] == modes and [p.requires_grad for p in model.parameters()] == flags


def test_a_model_without_a_language_model_head_is_refused_in_one_line(char_tokenizer):
    """AutoModel instead of AutoModelForCausalLM: the first completion failed with an AttributeError and a traceback."""
    with pytest.raises(MelboError, match=r"^LlamaModel has no language-model head: melbo steers a causal LM \(AutoModelForCausalLM"):
        LoadedModel(make_tiny_model("llama").model, char_tokenizer, "mine")

    class Unknown(torch.nn.Module):  # a causal LM whose blocks live where melbo does not look
        def __init__(self) -> None:
            super().__init__()
            self.head, self.stack = torch.nn.Linear(4, 8), torch.nn.ModuleList([torch.nn.Linear(4, 4)])

        def get_output_embeddings(self) -> torch.nn.Module:
            return self.head

        def generate(self) -> None: ...

    with pytest.raises(MelboError, match="cannot find the decoder blocks of Unknown"):
        LoadedModel(Unknown(), char_tokenizer, "mine")  # type: ignore[arg-type]
