"""Choosing R: the bisection finds the largest fluent R, probes train each radius on its own sphere."""

from __future__ import annotations

import pytest
import torch

import melbo.engines.radius as radius
from melbo.engines.config import DiscoverConfig, RadiusConfig
from melbo.engines.problem import DiscoveryProblem
from melbo.engines.radius import RadiusProbe, choose_radius, residual_scale
from melbo.model.forward import Generation, prepare
from melbo.model.prompts import PromptFormat
from melbo.objectives import max_abs_cosine


@pytest.fixture
def problem(tiny_lm):
    states = prepare(tiny_lm, ["hello there"], PromptFormat(), 1)
    return DiscoveryProblem(tiny_lm, states, DiscoverConfig(source=1, target=4, steps=10).resolved(6, 32, radius=1.0))


def fake_model(edge: float, calls: list[list[float]]):
    """Probes whose vectors are fluent below ``edge`` and babble above it."""

    def probe(problem, radii, cfg, stage):
        calls.append(list(radii))
        out = []
        for r in radii:
            fluent = cfg.vectors if r <= edge else 0
            out.append(RadiusProbe(r, cfg.vectors, fluent, 1.0 if fluent else 6.0, r / 10, {"other": cfg.vectors}, fluent, "text"))
        return out

    return probe


def test_bisection_finds_the_largest_fluent_radius(problem, monkeypatch):
    calls: list[list[float]] = []
    scale = residual_scale(problem)
    monkeypatch.setattr(radius, "_probe", fake_model(0.3 * scale, calls))
    choice = choose_radius(problem, RadiusConfig(probes=6))
    assert len(calls) == 6 and all(len(c) == 1 for c in calls)
    tried = [c[0] for c in calls]
    assert choice.radius == max(r for r in tried if r <= 0.3 * scale)
    assert 0.25 * scale < choice.radius <= 0.3 * scale  # six halvings of log(1/0.06): within 5 %
    assert [p.radius for p in choice.probes] == sorted(tried)
    assert f"R {choice.radius:g}" in choice.reason and "most vectors stay fluent" in choice.reason


def test_nothing_fluent_and_everything_fluent(problem, monkeypatch):
    monkeypatch.setattr(radius, "_probe", fake_model(0.0, []))
    choice = choose_radius(problem, RadiusConfig(probes=3, extend=2))
    lowest_in_range = sorted(p.radius for p in choice.probes)[2]
    assert len(choice.probes) == 5 and "no candidate R" in choice.reason  # three in the range, then two steps ×4 below it
    assert choice.radius == min(p.radius for p in choice.probes) == pytest.approx(lowest_in_range / 16, rel=2e-2)
    calls: list[list[float]] = []
    monkeypatch.setattr(radius, "_probe", fake_model(1e9, calls))
    choice = choose_radius(problem, RadiusConfig(radii=(3.0, 1.0, 2.0)))
    assert calls == [[1.0, 2.0, 3.0]] and choice.radius == 3.0  # the user's candidates, trained together


@pytest.mark.parametrize("edge", [0.012, 0.004, 3.0, 20.0])
def test_the_edge_is_found_outside_the_range(problem, monkeypatch, edge):
    """Gemma 3 270M's fluent edge lies near 0.01–0.02 × its residual norm (a few massive dimensions dominate it), far
    below the bisection's range (0.06–1 ×): the search goes on below the range (or above it) until the edge is
    bracketed, then bisects."""
    calls: list[list[float]] = []
    scale = residual_scale(problem)
    monkeypatch.setattr(radius, "_probe", fake_model(edge * scale, calls))
    choice = choose_radius(problem, RadiusConfig())
    tried = [c[0] for c in calls]
    assert choice.radius == max(r for r in tried if r <= edge * scale)
    assert edge * scale / 1.5 < choice.radius <= edge * scale  # bracketed ×4, then three halvings of log 4
    assert len(tried) <= 4 + 5 + 3 and "most vectors stay fluent" in choice.reason


def test_the_reason_names_the_criterion_that_failed(problem, monkeypatch):
    scale = residual_scale(problem)

    def probe(problem, radii, cfg, stage):  # every vector fluent, but above 0.3 × the norm the median NLL is too high
        return [RadiusProbe(r, 4, 4, 2.0 if r <= 0.3 * scale else 3.5, 1.0, {"other": 4}, 4, "text") for r in radii]

    monkeypatch.setattr(radius, "_probe", probe)
    choice = choose_radius(problem, RadiusConfig())
    assert "4/4 fluent but a median NLL of 3.50 (at most 3)" in choice.reason


def test_probe_rows_lie_on_their_spheres_and_are_orthogonal_within_a_radius(problem):
    thetas = radius._train(problem, [2.0, 5.0], 3, RadiusConfig(steps=4), stage=0)
    norms = thetas.norm(dim=-1)
    torch.testing.assert_close(norms, torch.tensor([2.0] * 3 + [5.0] * 3), rtol=1e-5, atol=0)
    assert max_abs_cosine(thetas[:3]) <= 1e-5 and max_abs_cosine(thetas[3:]) <= 1e-5


def test_probes_judge_fluency_by_nll_and_label(problem, monkeypatch):
    texts = iter([["fine words here", "from from from from from", "fine again", "babble"]])
    vocab = problem.lm.model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(radius, "steered_generation", lambda *a, **k: Generation(next(texts), torch.zeros(4, 1), torch.zeros(4, vocab)))
    monkeypatch.setattr(radius, "completion_nll", lambda lm, ids, t: [1.0, 1.0, 2.0, 9.0])
    (probe,) = radius._probe(problem, [3.0], RadiusConfig(vectors=4, steps=2), stage=0)
    assert probe.fluent == 2 and probe.labels["degenerate"] == 1  # the loop scores a low NLL and still fails
    assert probe.sample == "fine words here" and probe.openings == 2
    assert not probe.usable(RadiusConfig()) and probe.usable(RadiusConfig(min_fluent=0.5))


def test_the_choice_line_says_r_once():
    """"R = 80.3: R 80.3 (0.0213 × …)" said R twice in discover's, the demo's and a study's line."""
    from melbo.files.runs import RadiusChoice

    chosen = RadiusChoice(80.3, "R 80.3 (0.0213 × the residual norm 3773 at layer 5): the largest tried at which most vectors stay fluent", 3773.0)
    assert chosen.line() == "R = 80.3 (0.0213 × the residual norm 3773 at layer 5): the largest tried at which most vectors stay fluent"
    none = RadiusChoice(5.0, "no candidate R kept 75% of its vectors fluent; R 5 is the smallest tried", 3773.0)
    assert none.line() == "R = 5: no candidate R kept 75% of its vectors fluent; R 5 is the smallest tried"
