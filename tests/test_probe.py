from __future__ import annotations

import json

import pytest
import torch

from melbo import MelboError, residual_after, write_run
from melbo.analysis.probe import ProbeResults, presence, probe
from melbo.model.forward import generate_steered
from melbo.model.prompts import PromptFormat, encode_prompt, shipped_prompts


def test_presence_by_hand():
    states = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    vectors = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    mean, peak = presence(states, vectors)
    torch.testing.assert_close(mean, torch.tensor([0.5, 0.0, 2**-0.5], dtype=torch.float64))
    torch.testing.assert_close(peak, torch.tensor([1.0, 0.0, 2**-0.5], dtype=torch.float64))


def test_shipped_prompt_sets():
    assert len(shipped_prompts()) == 20 and len(shipped_prompts("coding")) == 5
    with pytest.raises(MelboError, match="unknown prompt set"):
        shipped_prompts("poetry")


def test_probe_finds_a_direction_the_model_uses(tiny_lm, tmp_path):
    """The model's own mean residual direction is 'present'; a random direction is not."""
    ids = encode_prompt(tiny_lm.tokenizer, "hello", PromptFormat())
    answer = generate_steered(tiny_lm.model, tiny_lm.tokenizer, ids, None, 1, max_new_tokens=8)[0]
    answer_ids = tiny_lm.tokenizer(answer, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():  # the mean direction of the model's own residuals while it answers
        used = residual_after(tiny_lm.model, 1, torch.cat([ids, answer_ids], dim=1))[0, ids.shape[1] :].mean(dim=0)
    vectors = torch.stack([used, torch.randn(32, generator=torch.Generator().manual_seed(9))])
    run = write_run(tmp_path / "run", vectors, {"layers": {"source": 1, "target": 4}, "vectors": [{"index": 0}, {"index": 1}]})
    results = probe(tiny_lm, run, ["hello"], PromptFormat(), max_new_tokens=8, random_directions=64)
    z_used, z_random = results.vectors[0].z, results.vectors[1].z
    assert z_used > 3 and abs(z_random) < 3
    assert json.loads((run.path / "probe.json").read_text())["tokens"] == results.tokens > 0
    assert ProbeResults.read(run.path) == results  # probe.json reads back as it was


def test_probe_lm_run_takes_what_melbo_probe_takes(tiny_lm, tmp_path):
    """From a notebook, ``probe(lm, run)``: melbo's coding prompts and the run's prompt format."""
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    run = write_run(tmp_path / "run", vectors, {"layers": {"source": 1, "target": 4}, "vectors": [{"index": 0}, {"index": 1}]})
    results = probe(tiny_lm, run, max_new_tokens=2, random_directions=8, progress=False)
    assert results.prompts == shipped_prompts("coding") and results.tokens > 0
