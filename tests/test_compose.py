from __future__ import annotations

import json
import math

import pytest
import torch

from melbo import MelboError, write_run
from melbo.compose import compose, composed_vectors
from melbo.objectives import orthonormal_rows
from melbo.prompts import PromptFormat


@pytest.fixture
def ortho_run(tmp_path):
    rows = orthonormal_rows(torch.randn(6, 32, generator=torch.Generator().manual_seed(4)))
    vectors = rows * torch.tensor([3.0, 6, 6, 6, 6, 6])[:, None]  # θ0 of norm 3, five found vectors of norm 6
    meta = {"kind": "ortho", "layers": {"source": 1, "target": 4}, "prompts": ["hi"], "vectors": [{"index": i} for i in range(6)]}
    return write_run(tmp_path / "run", vectors, meta)


def test_combinations_by_hand(ortho_run):
    names, vectors = composed_vectors(ortho_run, [1, 4, 99])
    assert names[:6] == ["k=1 mean", "k=1 mean×√k", "k=1 mean→‖θ0‖", "k=4 mean", "k=4 mean×√k", "k=4 mean→‖θ0‖"]
    torch.testing.assert_close(vectors[3], ortho_run.vectors[1:5].mean(0))
    # four orthogonal vectors of norm 6: the mean has norm 6/√4, so ×√k restores 6
    assert float(vectors[4].norm()) == pytest.approx(6.0, rel=1e-5)
    assert float(vectors[5].norm()) == pytest.approx(3.0, rel=1e-5)
    assert names[6:] == [f"#{i}→‖θ0‖" for i in range(1, 6)]
    assert all(float(v.norm()) == pytest.approx(3.0, rel=1e-5) for v in vectors[6:])


def test_compose_end_to_end(tiny_lm, ortho_run):
    results = compose(tiny_lm, ortho_run, [1, 2, 5], "hi", PromptFormat(), max_new_tokens=3)
    assert len(results["rows"]) == 3 * 3 + 5
    assert all(r["kl"] >= 0 and isinstance(r["text"], str) for r in results["rows"])
    assert json.loads((ortho_run.path / "compose.json").read_text())["rows"][0]["name"] == "k=1 mean"
    assert math.isclose(results["rows"][0]["norm"], 6.0, rel_tol=1e-5)


def test_needs_found_vectors(tmp_path):
    run = write_run(tmp_path / "r", torch.ones(1, 8), {"layers": {"source": 1, "target": 2}, "vectors": [{"index": 0}]})
    with pytest.raises(MelboError, match="compose needs an ortho run"):
        composed_vectors(run, [1])
