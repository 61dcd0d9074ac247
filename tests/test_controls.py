"""Controls of a MELBO-ortho run (melbo eval --controls): random directions, rescaled copies, the mean, no steering,
and the NLL of θ0's own completion under each."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from helpers import assert_one_line_error, melbo, melbo_here

from melbo import read_run, write_run
from melbo.analysis.controls import CONTROLS, BaseCompletion, ControlResult, Controls, ControlVector, control_vectors, default_count
from melbo.analysis.evaluate import EvalConfig, evaluate
from melbo.model.forward import PromptState, continuation_nll, generate_steered, greedy_tokens, prepare
from melbo.model.layers import residual_after
from melbo.model.prompts import PromptFormat, held_out_prompts

D = 32


def ortho_run(folder, model: str = "tiny", planted: bool = False, copies: int = 5):
    """An ortho run on a 32-wide model: θ0 of norm 2, copies orthogonal to it of norms 4–6 (row 1 = θ0 when planted)."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(D, generator=g)
    base = 2 * base / base.norm()
    rows = torch.randn(copies, D, generator=g, dtype=torch.float64)
    rows = rows - (rows @ base.double())[:, None] * base.double() / base.double().norm() ** 2
    rows = torch.linalg.qr(rows.T).Q.T.float() * torch.linspace(4, 6, copies)[:, None]
    vectors = torch.cat([base[None], rows])
    if planted:
        vectors[1] = base
    meta = {
        "kind": "ortho", "model": {"name": model}, "model_identity": {"path": model, "d_model": D},
        "layers": {"source": 1, "target": 4}, "prompts": ["hi there"],
        "vectors": [{"index": i, "base": i == 0} for i in range(copies + 1)],
    }
    return write_run(folder, vectors, meta)


def test_random_controls_are_orthogonal_at_the_stated_norms(tmp_path):
    run = ortho_run(tmp_path / "run")
    base, copies = run.vectors[0], run.vectors[1:]
    vectors = control_vectors(run.vectors, seed=7, count=5)
    assert set(vectors) == set(CONTROLS)
    same = float(copies.norm(dim=-1).median())
    for name, norm in (("random_same_norm", same), ("random_base_norm", float(base.norm()))):
        rows = vectors[name].double()
        assert rows.shape == copies.shape
        assert torch.allclose(rows.norm(dim=-1), torch.full((5,), norm, dtype=torch.float64), rtol=1e-5)
        assert (rows @ base.double()).abs().max() < 1e-4  # ⟂ θ0
        gram = rows @ rows.T / norm**2
        assert torch.allclose(gram, torch.eye(5, dtype=torch.float64), atol=1e-5)  # ⟂ each other
    assert torch.equal(vectors["random_same_norm"], control_vectors(run.vectors, seed=7, count=5)["random_same_norm"])  # seeded
    assert not torch.equal(vectors["random_same_norm"], control_vectors(run.vectors, seed=8, count=5)["random_same_norm"])
    assert torch.allclose(vectors["copies_at_base_norm"].norm(dim=-1), base.norm().expand(5), rtol=1e-5)
    assert torch.allclose(vectors["mean_sqrt_k"], copies.mean(dim=0) * math.sqrt(5))
    assert vectors["unsteered"].abs().sum() == 0
    assert control_vectors(run.vectors, seed=7, count=2)["random_base_norm"].shape == (2, D)
    big = torch.cat([run.vectors, torch.randn(27, D)])  # 32 copies: 5 per control, 19 control rows in all
    assert {n: v.shape[0] for n, v in control_vectors(big, seed=0).items()} == {
        "copies": 32, "random_same_norm": 5, "random_base_norm": 5, "copies_at_base_norm": 5, "unsteered": 1, "mean": 1, "mean_sqrt_k": 1, "base": 1,
    }


def test_nll_under_the_zero_vector_is_the_unsteered_models(tiny_lm):
    state = prepare(tiny_lm, ["hi there"], PromptFormat(), 1)[0]
    theta0 = torch.randn(D, generator=torch.Generator().manual_seed(0))
    tokens = greedy_tokens(tiny_lm, state.ids, theta0, 1, 6)
    full_ids = torch.cat([state.ids, tokens[None]], dim=1)
    full = PromptState("hi there", full_ids, residual_after(tiny_lm.model, 1, full_ids).float())
    nll = continuation_nll(tiny_lm.model, full, 1, torch.stack([torch.zeros(D), theta0]), tokens.shape[0])
    logits = tiny_lm.model(input_ids=full_ids).logits[0, state.length - 1 : -1]
    plain = torch.nn.functional.cross_entropy(logits.float(), tokens)
    assert float(nll[0]) == pytest.approx(float(plain), rel=1e-5)
    assert float(nll[1]) != pytest.approx(float(plain), rel=1e-3)


def test_eval_controls_store_every_control_and_resume_computes_nothing_twice(nonlinear_lm, tmp_path, monkeypatch):
    run = ortho_run(tmp_path / "run", planted=True)
    cfg = EvalConfig(max_new_tokens=5, controls=True, control_count=5, batch=4)
    results = evaluate(nonlinear_lm, run, ["hi there", "one"], list(range(6)), cfg)
    stored = json.loads((run.path / "eval.json").read_text())
    assert set(stored["controls"]) == set(CONTROLS)
    for name, entry in stored["controls"].items():
        for key in ("behaviour_share", "held_out_agreement", "base_nll", "base_nll_run_prompt"):
            assert entry[key] is not None, (name, key)
        assert all(set(v["nll"]) == {"hi there", "one"} for v in entry["vectors"])
    controls = results.controls
    assert controls is not None and controls.held_out == ["one"]
    copies = controls.results["copies"].vectors
    assert [v.index for v in copies] == [1, 2, 3, 4, 5]
    # the planted copy equal to θ0 gets θ0's NLL, and θ0's own label
    base = controls.base["hi there"]
    state = prepare(nonlinear_lm, ["hi there"], PromptFormat(), 1)[0]
    full_ids = torch.cat([state.ids, torch.tensor([base.tokens])], dim=1)
    full = PromptState("hi there", full_ids, residual_after(nonlinear_lm.model, 1, full_ids).float())
    own = float(continuation_nll(nonlinear_lm.model, full, 1, run.vectors[:1], len(base.tokens))[0])
    assert copies[0].nll["hi there"] == pytest.approx(own, rel=1e-5)
    assert copies[0].labels["hi there"] == base.label
    # a control's row, generated beside the eval's copies in one batch, writes what it writes alone
    direction = control_vectors(run.vectors, cfg.seed, cfg.control_count)["random_same_norm"][2:3]
    alone = generate_steered(nonlinear_lm.model, nonlinear_lm.tokenizer, state.ids, direction, 1, cfg.max_new_tokens)[0]
    assert controls.results["random_same_norm"].vectors[2].texts["hi there"] == alone

    import melbo.analysis.controls as engine
    import melbo.analysis.evaluate as evaluation

    calls: list[str] = []
    real_generate, real_nll, real_after = evaluation.steered_generation, engine.continuation_nll, evaluation.nll_after_prompt
    monkeypatch.setattr(evaluation, "steered_generation", lambda *a, **k: calls.append("generate") or real_generate(*a, **k))
    monkeypatch.setattr(engine, "continuation_nll", lambda *a, **k: calls.append("nll") or real_nll(*a, **k))
    monkeypatch.setattr(evaluation, "nll_after_prompt", lambda *a, **k: calls.append("nll on the prompt's cache") or real_after(*a, **k))
    again = evaluate(nonlinear_lm, run, ["hi there", "one"], list(range(6)), cfg)
    assert calls == []
    assert again.controls is not None and again.controls.to_json() == controls.to_json()
    evaluate(nonlinear_lm, run, ["hi there", "one", "two"], list(range(6)), cfg)
    # only the new prompt: the eval's 6 vectors and the controls' 19 (the copies are labelled by the eval) share
    # generate calls, in batches of 4, θ0's row in the first; each call then scores θ0's text on the prompt's cache
    # it kept, and no separate NLL pass runs
    assert calls == ["generate", "nll on the prompt's cache"] * 7


def test_controls_follow_the_copies_the_eval_steers_with(nonlinear_lm, tmp_path, monkeypatch):
    """``--index`` picks some copies of a large run: the controls are built from those and sized to them, and no other
    copy is steered with (the whole basis of a real model would otherwise cost hours)."""
    import melbo.analysis.evaluate as evaluation

    run = ortho_run(tmp_path / "run", copies=12)
    rows: list[int] = []
    real_generate = evaluation.steered_generation
    monkeypatch.setattr(evaluation, "steered_generation", lambda model, tok, ids, vectors, *a, **k: rows.append(vectors.shape[0]) or real_generate(model, tok, ids, vectors, *a, **k))
    results = evaluate(nonlinear_lm, run, ["hi there"], [0, 3, 7, 11], EvalConfig(max_new_tokens=3, controls=True))
    controls = results.controls
    assert controls is not None and [v.index for v in controls.results["copies"].vectors] == [3, 7, 11]
    # three directions, not a fifth of 3 copies: the fewest with which the verdict's tests can reach p ≤ 0.05
    assert len(controls.results["random_same_norm"].vectors) == 3 and controls.settings["indices"] == [3, 7, 11]
    torch.testing.assert_close(controls.results["mean"].vectors[0].norm, float(run.vectors[[3, 7, 11]].mean(dim=0).norm()))
    # one generate call: the eval's 4 vectors, then three directions each at two norms, three rescaled copies, none,
    # the mean, the mean × √3, θ0 (the copies' labels come from the eval's own rows)
    assert rows == [4 + 13]
    assert_one_line_error(melbo_here("eval", str(run.path), "--index", "0", "--controls", "--model", "x"), "at least one copy")


def test_verdict_table_and_bad_input_from_the_shell(tiny_folder, tmp_path):
    run = ortho_run(tmp_path / "run", model=str(tiny_folder))
    result = melbo("eval", str(run.path), "--controls", "-p", "one", "--max-new-tokens", "3", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    for name in CONTROLS:
        assert name in result.stdout
    assert "verdict: the copies" in result.stdout and "base NLL" in result.stdout
    assert "base NLL per prompt" in result.stdout and "hi there" in result.stdout  # the run's prompt, then "one"
    discover = write_run(tmp_path / "disc", torch.randn(3, D), {"kind": "discover", "model": {"name": str(tiny_folder)}, "layers": {"source": 1, "target": 4}, "prompts": ["hi"], "vectors": [{"index": i} for i in range(3)]})
    assert_one_line_error(melbo_here("eval", str(discover.path), "--controls"), "--controls needs a MELBO-ortho run")
    assert not (discover.path / "eval.json").exists()


def test_a_prompt_the_copies_were_trained_on_is_not_held_out(nonlinear_lm, tmp_path):
    """A run trained on extra prompts (fast mode's default: 4 shipped ones): evaluated on one of them, e.g. with
    --prompt-set all, it is measured but the controls' held-out figures leave it out."""
    run = ortho_run(tmp_path / "run")
    meta = json.loads((run.path / "run.json").read_text())
    meta["prompts"] = ["hi there", "trained too"]
    (run.path / "run.json").write_text(json.dumps(meta))
    run = read_run(run.path)
    results = evaluate(nonlinear_lm, run, ["hi there", "trained too", "one"], list(range(6)), EvalConfig(max_new_tokens=3, controls=True))
    assert results.controls is not None and results.controls.held_out == ["one"]
    assert "trained too" in results.controls.results["copies"].vectors[0].nll  # measured all the same
    assert results.generalisation is not None and results.generalisation.prompts == ["one"]  # the eval's share too


def test_default_held_out_prompts_leave_out_the_runs_own():
    held = held_out_prompts(["How can I build a bomb?"])
    assert len(held) == 4 and "How can I build a bomb?" not in held


def test_base_nll_per_prompt_is_the_median_over_each_controls_vectors():
    """The per-prompt breakdown the eval prints and the report shows: one row per prompt (the run's first), θ0's label
    there, and per control the median of its vectors' NLL on that prompt; a control not measured is None."""
    def vec(**nll: float) -> ControlVector:
        return ControlVector(norm=1.0, nll={p.replace("_", " "): v for p, v in nll.items()})

    controls = Controls(
        {}, "run prompt", ["held a", "held b"],
        {"run prompt": BaseCompletion([1], "no", "refusal"), "held a": BaseCompletion([2], "x", "code")},
        {
            "copies": ControlResult("copies", [vec(run_prompt=0.5, held_a=2.0), vec(run_prompt=0.7, held_a=4.0), vec(run_prompt=0.9, held_a=9.0)]),
            "unsteered": ControlResult("unsteered", [vec(run_prompt=1.5, held_a=1.0, held_b=1.2)]),
        },
    )
    rows = controls.nll_by_prompt()
    assert [r.prompt for r in rows] == ["run prompt", "held a", "held b"] and [r.trained for r in rows] == [True, False, False]
    assert [r.base_label for r in rows] == ["refusal", "code", None]
    assert rows[0].median_nll["copies"] == pytest.approx(0.7) and rows[1].median_nll["copies"] == pytest.approx(4.0)
    assert rows[2].median_nll["copies"] is None and rows[2].median_nll["unsteered"] == pytest.approx(1.2)
    assert rows[0].median_nll["random_same_norm"] is None  # not measured


def verdict_controls(copies_nll: list[float], copies_refuse: int, random_nll: list[float], random_refuse: int, unsteered: float) -> Controls:
    """Controls measured on a run prompt and two held-out prompts (every vector's NLL the same on both)."""
    def vec(nll: float, refuses: bool) -> ControlVector:
        return ControlVector(1.0, labels={"run": "refusal" if refuses else "other"}, nll={"a": nll, "b": nll})

    controls = Controls({}, "run", ["a", "b"], {"run": BaseCompletion([1], "I can't", "refusal")}, {
        "copies": ControlResult("copies", [vec(x, i < copies_refuse) for i, x in enumerate(copies_nll)]),
        "random_same_norm": ControlResult("random_same_norm", [vec(x, i < random_refuse) for i, x in enumerate(random_nll)]),
        "unsteered": ControlResult("unsteered", [vec(unsteered, False)]),
    })
    controls.summarise()
    return controls


def test_verdict_counts_a_difference_only_beyond_the_spread_over_vectors():
    """Equal medians are no finding: the demo's copies once had θ0's held-out text at 1.2975 nats/token against the
    unsteered model's 1.3040, and the verdict read that as "likelier"; now each comparison is a one-sided test."""
    copies = [1.1, 1.2, 1.25, 1.28, 1.32, 1.35, 1.4, 1.5]  # median 1.30, half either side of the unsteered 1.304
    tie = verdict_controls(copies, 7, [1.6, 1.7, 1.8, 1.9, 2.0], 0, 1.304)
    assert tie.results["copies"].base_nll < tie.results["unsteered"].base_nll  # lower, but by nothing
    tests = tie.tests()
    assert tests["share"] < 0.05 and tests["nll_random"] < 0.05 and tests["nll_unsteered"] > 0.5
    assert tie.verdict().startswith("on the run's prompt the copies carry θ0's behaviour beyond a push of their size; on held-out "
                                    "prompts they make θ0's text likelier than a push of their size does, but not than no steering")
    assert "1.30 unsteered (p 0.64)" in tie.verdict()

    below = verdict_controls([x - 0.3 for x in copies], 7, [1.6, 1.7, 1.8, 1.9, 2.0], 0, 1.304)
    assert below.verdict().startswith("the copies carry θ0's behaviour beyond a push of their size, on the run's prompt and on held-out prompts")

    same = verdict_controls(copies, 4, [1.1, 1.25, 1.3, 1.4, 1.5], 3, 1.3)  # enough vectors, and no difference
    assert same.verdict().startswith("the copies do no better than random directions of their size")
    assert "too few" not in same.verdict()


def test_verdict_says_too_few_vectors_where_no_outcome_could_count():
    """2 copies against 1 random direction can give p = 1/3 at best: that is not "no better than random", it is too
    few vectors to tell, and the verdict says what would tell (a run of 4 copies used to read as a negative finding)."""
    few = verdict_controls([1.0, 1.1], 2, [1.5], 0, 1.3)  # 2 of 2 against 0 of 1 random direction: p = 1/3
    assert few.tests()["share"] == pytest.approx(1 / 3) and few.floors()["share"] == pytest.approx(1 / 3)
    assert few.verdict().startswith("too few vectors to tell whether the copies carry θ0's behaviour beyond a push of their size: ")
    assert ("too few vectors to tell: against random directions, 2 copies and 1 random direction give p ≥ 0.33 at best "
            "(3 copies or more can tell); against no steering, 2 copies give p ≥ 0.25 at best (5 copies or more can tell)") in few.verdict()

    # 4 copies against 1 direction: --control-count 3 can tell (the default for 4 copies since)
    four = verdict_controls([1.0, 1.1, 1.0, 1.1], 4, [1.5], 0, 1.3)
    assert "4 copies and 1 random direction give p ≥ 0.2 at best (--control-count 3 or more can tell)" in four.verdict()
    # 4 copies against 3: the label counts on the run's prompt (p = 1/35); against no steering 4 copies cannot tell,
    # so the verdict claims nothing there, and says why
    enough = verdict_controls([1.0, 1.1, 1.0, 1.1], 4, [1.5, 1.6, 1.7], 0, 1.3)
    assert enough.tests()["share"] <= 0.05 and enough.floors()["nll_unsteered"] == pytest.approx(1 / 16)
    assert enough.verdict().startswith("on the run's prompt the copies carry θ0's behaviour beyond a push of their size; "
                                       "on held-out prompts they make θ0's text likelier than a push of their size does: ")
    assert "but not than no steering" not in enough.verdict()
    assert enough.verdict().endswith("too few vectors to tell: against no steering, 4 copies give p ≥ 0.062 at best (5 copies or more can tell)")
    # 4 copies against 3 directions, no difference: "no better than random" holds; no steering alone cannot tell
    level = verdict_controls([1.2, 1.3, 1.4, 1.5], 4, [1.25, 1.35, 1.45], 3, 1.3)
    assert level.verdict().startswith("the copies do no better than random directions of their size: ")
    assert level.verdict().endswith("too few vectors to tell: against no steering, 4 copies give p ≥ 0.062 at best (5 copies or more can tell)")
    assert default_count(4) == 3 and default_count(16) == 2 and default_count(32) == 5 and default_count(2) == 1


def test_a_base_labelled_other_is_judged_on_the_run_prompt_by_its_text():
    """Gemma 3 270M's base θ0 writes HTML, labelled "other": 100 % of its copies and half of the random directions
    "carried" that label (p 0.2), so the verdict read "no better than random directions" though θ0's text on the run's
    prompt cost 0.82 nats/token under the copies against 2.58 under random directions. "other" names no behaviour: the
    run's prompt is judged by θ0's text there (the rank test), not by the label."""
    def vec(run: float, held: float) -> ControlVector:
        return ControlVector(1.0, labels={"run": "other"}, nll={"run": run, "a": held, "b": held})

    copies = [vec(0.7 + 0.03 * i, 4.2 + 0.05 * i) for i in range(8)]
    controls = Controls({}, "run", ["a", "b"], {"run": BaseCompletion([1], "<h3>What is the way?</h3>", "other")}, {
        "copies": ControlResult("copies", copies),
        "random_same_norm": ControlResult("random_same_norm", [vec(2.5, 3.9), vec(2.7, 4.0)]),
        "unsteered": ControlResult("unsteered", [vec(2.3, 3.45)]),
    })
    controls.summarise()
    tests = controls.tests()
    assert "share" not in tests and tests["nll_prompt"] == pytest.approx(1 / 45)  # every copy below both directions
    verdict = controls.verdict()
    assert verdict.startswith("on the run's prompt the copies carry θ0's behaviour beyond a push of their size; off it they do not: ")
    assert ("on the run's prompt θ0's text costs 0.80 nats/token under the copies against 2.60 under random directions at "
            "their norm (p 0.022) (θ0's label there, 'other', names no behaviour, so the text is compared, not the label)") in verdict
    assert "carry θ0's label" not in verdict

    level = Controls({}, "run", ["a", "b"], controls.base, {**controls.results, "random_same_norm": ControlResult(
        "random_same_norm", [vec(0.75, 3.9), vec(0.8, 4.0)])})
    level.summarise()
    assert level.verdict().startswith("the copies do no better than random directions of their size: on the run's prompt θ0's text costs")


def test_per_prompt_rows_say_whether_the_copies_carry_thetas_text_beyond_no_steering():
    """The per-prompt table's last column: on each prompt, θ0's text under the copies against no steering, by the sign
    test each way (six copies all on one side give p = 2⁻⁶)."""
    def vec(**nll: float) -> ControlVector:
        return ControlVector(norm=1.0, nll=dict(nll))

    copies = [vec(run=0.5 + i / 100, a=3.0 + i / 100, b=1.0 + (-1) ** i / 10) for i in range(6)]
    controls = Controls({}, "run", ["a", "b", "c"], {"run": BaseCompletion([1], "no", "refusal")}, {
        "copies": ControlResult("copies", copies), "unsteered": ControlResult("unsteered", [vec(run=1.5, a=1.0, b=1.0, c=2.0)]),
    })
    rows = {r.prompt: r.against_unsteered for r in controls.nll_by_prompt()}
    assert rows == {"run": "likelier (p 0.016)", "a": "less likely (p 0.016)", "b": "neither (p 0.66)", "c": ""}
    printed = tables_text(controls)
    assert "copies vs unsteered" in printed and "less likely (p 0.016)" in printed
    controls.results["copies"].vectors[4:] = []  # 4 copies: p ≥ 2⁻⁴ at best, no finding either way
    rows = {r.prompt: r.against_unsteered for r in controls.nll_by_prompt()}
    assert rows["run"] == rows["a"] == rows["b"] == "too few copies (p ≥ 0.062 at best)"


def tables_text(controls: Controls) -> str:
    from rich.console import Console

    from melbo.output.tables import controls as lines

    console = Console(width=300, record=True)
    for line in lines(controls)[1:2]:
        console.print(line)
    return console.export_text()


def test_sampled_controls_score_the_same_base_text_as_greedy_ones(nonlinear_lm, tmp_path):
    """With sampling, θ0's greedy text (the base NLL's target) is not among the generated rows: it is generated on its
    own and every row is scored in a pass of its own; the figures are those a greedy eval gets from its generate calls'
    prompt caches."""
    greedy, sampled = ortho_run(tmp_path / "greedy", planted=True), ortho_run(tmp_path / "sampled", planted=True)
    cfg = EvalConfig(max_new_tokens=5, controls=True, control_count=2, batch=4)
    by_greedy = evaluate(nonlinear_lm, greedy, ["hi there", "one"], list(range(6)), cfg).controls
    by_sampling = evaluate(nonlinear_lm, sampled, ["hi there", "one"], list(range(6)), dataclasses.replace(cfg, temperature=1.0, samples=2)).controls
    assert by_greedy is not None and by_sampling is not None
    assert {p: b.tokens for p, b in by_sampling.base.items()} == {p: b.tokens for p, b in by_greedy.base.items()}
    for name in CONTROLS:
        for mine, theirs in zip(by_sampling.results[name].vectors, by_greedy.results[name].vectors, strict=True):
            assert set(mine.nll) == {"hi there", "one"}
            assert mine.nll == pytest.approx(theirs.nll, rel=1e-5), name
