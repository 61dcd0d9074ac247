from __future__ import annotations

import json
import math

import pytest
import torch

from melbo import MelboError, write_run
from melbo.analysis.compose import ComposeResults, compose, composed_vectors
from melbo.model.forward import generate_steered, last_token_logits, prepare
from melbo.model.prompts import PromptFormat
from melbo.objectives import kl_divergence, orthonormal_rows


@pytest.fixture
def ortho_run(tmp_path):
    rows = orthonormal_rows(torch.randn(6, 32, generator=torch.Generator().manual_seed(4)))
    vectors = rows * torch.tensor([3.0, 6, 6, 6, 6, 6])[:, None]  # θ0 of norm 3, five found vectors of norm 6
    meta = {"kind": "ortho", "layers": {"source": 1, "target": 4}, "prompts": ["hi"], "vectors": [{"index": i} for i in range(6)]}
    return write_run(tmp_path / "run", vectors, meta)


def test_combinations_by_hand(ortho_run):
    combos, vectors = composed_vectors(ortho_run, [1, 4, 99, 100])
    names = [c.name for c in combos]
    assert names[:6] == ["k=1 mean", "k=1 mean×√k", "k=1 mean→‖θ0‖", "k=4 mean", "k=4 mean×√k", "k=4 mean→‖θ0‖"]
    # k 99 and 100 on five found vectors: the mean of all five, once
    assert names[6:9] == ["k=5 mean", "k=5 mean×√k", "k=5 mean→‖θ0‖"] and combos[9].kind == "single"
    torch.testing.assert_close(vectors[6], ortho_run.vectors[1:].mean(0))
    names, vectors = names[:6] + names[9:], torch.cat([vectors[:6], vectors[9:]])
    torch.testing.assert_close(vectors[3], ortho_run.vectors[1:5].mean(0))
    # four orthogonal vectors of norm 6: the mean has norm 6/√4, so ×√k restores 6
    assert float(vectors[4].norm()) == pytest.approx(6.0, rel=1e-5)
    assert float(vectors[5].norm()) == pytest.approx(3.0, rel=1e-5)
    assert names[6:] == [f"#{i}→‖θ0‖" for i in range(1, 6)]
    assert all(float(v.norm()) == pytest.approx(3.0, rel=1e-5) for v in vectors[6:])


def test_compose_end_to_end(tiny_lm, ortho_run):
    results = compose(tiny_lm, ortho_run, [1, 2, 5], "hi", PromptFormat(), max_new_tokens=3)
    assert len(results.rows) == 3 * 3 + 5 and len(results.combinations) == 9
    assert json.loads((ortho_run.path / "compose.json").read_text())["rows"][0]["name"] == "k=1 mean"
    assert math.isclose(results.rows[0].norm, 6.0, rel_tol=1e-5)
    assert ComposeResults.read(ortho_run.path).to_json() == results.to_json()  # compose.json reads back as it was
    # the mean of the first vector alone is vector 1: its KL to θ0 and its completion, computed here by hand
    state = prepare(tiny_lm, ["hi"], PromptFormat(), 1)[0]
    logits = last_token_logits(tiny_lm.model, state, 1, ortho_run.vectors[[0, 1]])
    assert results.rows[0].kl == pytest.approx(float(kl_divergence(logits[1:], logits[:1])), rel=1e-6)
    alone = generate_steered(tiny_lm.model, tiny_lm.tokenizer, state.ids, ortho_run.vectors[1:2], 1, max_new_tokens=3)[0]
    assert results.rows[0].text == alone
    # each single vector at ‖θ0‖: KL by hand for #2, and the median of the five as the summary says
    logits2 = last_token_logits(tiny_lm.model, state, 1, ortho_run.vectors[2:3] / 2)
    single = {r.name: r.kl for r in results.singles}
    assert single["#2→‖θ0‖"] == pytest.approx(float(kl_divergence(logits2, logits[:1])), rel=1e-6)
    assert results.single_median_kl == pytest.approx(sorted(single.values())[2])


def test_compose_lm_run_takes_what_melbo_compose_takes(tiny_lm, ortho_run, tmp_path):
    """From a notebook, ``compose(lm, run)``: melbo's k, the run's prompt and format; a discovery run is refused in
    one line, as by the command (from Python it ran, and measured every mean against a discovery's vector 0)."""
    by_default = compose(tiny_lm, ortho_run, [1, 2], max_new_tokens=3, progress=False)
    spelled_out = compose(tiny_lm, ortho_run, [1, 2], "hi", ortho_run.meta.prompt_format, max_new_tokens=3, progress=False)
    assert by_default.to_json() == spelled_out.to_json() and by_default.prompt == "hi"
    found = write_run(tmp_path / "found", ortho_run.vectors, {"kind": "discover", "layers": {"source": 1, "target": 4}, "prompts": ["hi"],
                                                            "vectors": [{"index": i} for i in range(6)]})
    with pytest.raises(MelboError, match="compose needs a MELBO-ortho run"):
        compose(tiny_lm, found, [1])


def test_needs_found_vectors(tmp_path):
    run = write_run(tmp_path / "r", torch.ones(1, 8), {"layers": {"source": 1, "target": 2}, "vectors": [{"index": 0}]})
    with pytest.raises(MelboError, match="compose needs an ortho run"):
        composed_vectors(run, [1])
