"""Evaluation: batching gives the same greedy completions as one vector at a time; results are incremental."""

from __future__ import annotations

import json
import re

import pytest
import torch

from melbo import MelboError, write_run
from melbo.analysis.evaluate import EvalConfig, EvalResults, evaluate
from melbo.model.forward import generate_steered
from melbo.model.prompts import PromptFormat, encode_prompt
from melbo.objectives import kl_divergence


@pytest.fixture
def run(tmp_path):
    vectors = 3 * torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    meta = {"kind": "ortho", "layers": {"source": 1, "target": 4}, "prompts": ["hi there"], "vectors": [{"index": i} for i in range(5)]}
    return write_run(tmp_path / "run", vectors, meta)


def test_batched_equals_one_at_a_time(tiny_lm, run):
    results = evaluate(tiny_lm, run, ["hi there"], list(range(5)), EvalConfig(max_new_tokens=6, batch=3))
    ids = encode_prompt(tiny_lm.tokenizer, "hi there", PromptFormat())
    greedy = results.completions("hi there", "greedy")
    for i in range(5):
        alone = generate_steered(tiny_lm.model, tiny_lm.tokenizer, ids, run.vectors[i : i + 1], 1, max_new_tokens=6)[0]
        assert greedy[i][0].text == alone


def test_kl_both_directions_and_checks(tiny_lm, run):
    results = evaluate(tiny_lm, run, ["hi there"], [0, 2], EvalConfig(max_new_tokens=2, base=0))
    first = results.first_token("hi there")
    assert first[0].kl == pytest.approx(0.0, abs=1e-9)
    assert first[2].kl > 0 and first[2].kl_reverse > 0 and first[2].kl != first[2].kl_reverse
    assert len(first[2].top) == 10
    assert results.norms[2] == pytest.approx(float(run.vectors[2].norm()))
    assert results.max_abs_cos > 0  # random vectors are not orthogonal, and the check says so
    assert json.loads((run.path / "eval.json").read_text())["prompts"]["hi there"]["first_token"]["2"]["kl"] == first[2].kl


def test_a_discovery_run_is_measured_against_the_unsteered_model(tiny_lm, tmp_path):
    """A discovery run has no θ0: its eval gave each vector's KL to vector 0 (vector 0 itself 0.000), and the share of
    held-out prompts carrying vector 0's label. Now KL is to the unsteered model (the discovery's "effect"), and each
    vector's generalisation is the share carrying its own label."""
    from melbo.model.forward import last_token_logits, prepare

    vectors = 3 * torch.randn(4, 32, generator=torch.Generator().manual_seed(5))
    meta = {"kind": "discover", "layers": {"source": 1, "target": 4}, "prompts": ["hi there"], "vectors": [{"index": i} for i in range(4)]}
    found = write_run(tmp_path / "found", vectors, meta)
    results = evaluate(tiny_lm, found, ["hi there", "one", "two"], list(range(4)), EvalConfig(max_new_tokens=3))
    assert results.settings["base"] is None and results.base is None
    state = prepare(tiny_lm, ["hi there"], PromptFormat(), 1)[0]
    steered = last_token_logits(tiny_lm.model, state, 1, vectors)
    unsteered = last_token_logits(tiny_lm.model, state, 1, torch.zeros(1, 32))
    first = results.first_token("hi there")
    for i in range(4):
        assert first[i].kl == pytest.approx(float(kl_divergence(steered[i : i + 1], unsteered)), rel=1e-4, abs=1e-7)
    assert first[0].kl > 0  # not the base of anything
    done = {p: results.completions(p, "greedy") for p in ("hi there", "one", "two")}
    for p, labels in (("hi there", ["code", "refusal", "other", "code"]), ("one", ["code", "code", "other", "other"]),
                      ("two", ["other", "refusal", "other", "code"])):
        for i, lab in enumerate(labels):
            done[p][i][0].label = lab
    summary = results.generalise("hi there", ["one", "two"], "greedy", base=None)
    assert summary is not None and summary.base_label is None
    assert summary.share == {0: 0.5, 1: 0.5, 2: 1.0, 3: 0.5}  # each against its own label on the run's prompt
    assert EvalResults.from_json(results.to_json()) == results
    from melbo.output.tables import evaluation

    said = [line for line in evaluation(results, ["hi there", "one", "two"], list(range(4)), 10) if isinstance(line, str)]
    assert any(line.startswith("KL to the unsteered model: median ") for line in said), said
    assert ("generalisation over 2 held-out prompts, the share on which a vector keeps its label on the run's prompt: "
            "#0 code 50%; #1 refusal 50%; #3 code 50%") in said  # 'other' (#2, 100%) names no behaviour
    assert not any("behaviour share" in line for line in said)  # no θ0 whose behaviour copies could share


def test_another_base_measures_kl_again_rather_than_keeping_the_old(tiny_lm, run):
    """`melbo eval --base 2` after an eval against θ0 kept every stored KL (to vector 0) under the new setting."""
    evaluate(tiny_lm, run, ["hi there"], [0, 1, 2], EvalConfig(max_new_tokens=2))
    again = evaluate(tiny_lm, run, ["hi there"], [0, 1, 2], EvalConfig(max_new_tokens=2, base=2))
    first = again.first_token("hi there")
    assert first[2].kl == pytest.approx(0.0, abs=1e-9) and first[0].kl > 0 and again.base == 2


def test_evaluate_lm_run_takes_what_melbo_eval_takes(tiny_lm, tmp_path):
    """From a notebook, ``evaluate(lm, run)``: the run's prompt, every vector and the prompt format the run was made
    with. The format defaulted to PromptFormat(), so a run made with a system prompt was evaluated without it."""
    vectors = 3 * torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    fmt = PromptFormat(system="Answer in one word.")
    meta = {"kind": "ortho", "layers": {"source": 1, "target": 4}, "prompts": ["hi there"], "vectors": [{"index": i} for i in range(3)],
            "prompt_format": {"system": fmt.system, "chat_template": fmt.chat_template}}
    run = write_run(tmp_path / "fmt", vectors, meta)
    assert run.meta.prompt_format == fmt
    results = evaluate(tiny_lm, run, cfg=EvalConfig(max_new_tokens=4))
    assert list(results.prompts) == ["hi there"]
    greedy = results.completions("hi there", "greedy")
    ids = encode_prompt(tiny_lm.tokenizer, "hi there", fmt)
    assert ids.shape != encode_prompt(tiny_lm.tokenizer, "hi there", PromptFormat()).shape  # the system prompt is in it
    for i in range(3):
        assert greedy[i][0].text == generate_steered(tiny_lm.model, tiny_lm.tokenizer, ids, vectors[i : i + 1], 1, max_new_tokens=4)[0]


def test_incremental(tiny_lm, run, monkeypatch):
    evaluate(tiny_lm, run, ["hi there"], [0, 1], EvalConfig(max_new_tokens=2))
    import melbo.analysis.evaluate as engine

    calls: list[int] = []
    real = engine.steered_generation

    def counting(model, tok, ids, vectors, *args, **kwargs):
        calls.append(vectors.shape[0])
        return real(model, tok, ids, vectors, *args, **kwargs)

    monkeypatch.setattr(engine, "steered_generation", counting)
    results = evaluate(tiny_lm, run, ["hi there", "and you?"], [0, 1, 2], EvalConfig(max_new_tokens=2))
    assert calls == [1, 3]  # only vector 2 on the old prompt, all three on the new one
    assert set(results.prompts) == {"hi there", "and you?"}


def test_sampling_and_label_counts(tiny_lm, run):
    cfg = EvalConfig(max_new_tokens=3, temperature=1.0, samples=2, seed=1)
    results = evaluate(tiny_lm, run, ["hi there"], [0, 1, 2], cfg)
    sampled = results.completions("hi there", cfg.mode())
    assert all(len(outs) == 2 for outs in sampled.values())
    counts = results.label_counts("hi there", cfg.mode())
    assert counts[0]["from"] == 0 and sum(v for k, v in counts[0].items() if k != "from") == 6


def test_bad_settings(tiny_lm, run):
    with pytest.raises(MelboError, match="--base 9"):
        evaluate(tiny_lm, run, ["hi"], [0], EvalConfig(base=9))
    with pytest.raises(MelboError, match="temperature"):
        evaluate(tiny_lm, run, ["hi"], [0], EvalConfig(temperature=-1))
    n = run.vectors.shape[0]
    for indices in ([n], [-1]):  # -1 would have been evaluated and stored as a vector "-1"
        with pytest.raises(MelboError, match=rf"vector\(s\) \[{indices[0]}\]: the run has vectors 0 to {n - 1}"):
            evaluate(tiny_lm, run, ["hi"], indices)
    with pytest.raises(MelboError, match="no prompt given"):
        evaluate(tiny_lm, run, [], [0])


def test_kl_by_hand_on_real_logits():
    p, q = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 1.0, 0.0])
    P, Q = p.softmax(-1), q.softmax(-1)
    assert kl_divergence(p, q).item() == pytest.approx(float((P * (P / Q).log()).sum()))


def test_eval_from_the_shell(tmp_path, run):
    import os
    import subprocess
    import sys

    from conftest import save_tiny_folder

    folder = save_tiny_folder(tmp_path / "tiny", initializer_range=0.02)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    command = [sys.executable, "-m", "melbo.cli", "eval", str(run.path), "--model", str(folder), "--max-new-tokens", "3"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(r"labels of the \d+ vectors: ", result.stdout) and "max |cos|" in result.stdout
    assert (run.path / "eval.json").is_file()
    bad = subprocess.run([*command, "--index", "7"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "vectors 0 to 4" in bad.stderr and "Traceback" not in bad.stderr


def test_generalisation_and_behaviour_share(tiny_lm, run):
    results = evaluate(tiny_lm, run, ["hi there", "one", "two"], [0, 1, 2], EvalConfig(max_new_tokens=3))
    assert results.generalisation is not None and results.generalisation.prompts == ["one", "two"]  # computed whenever prompts are held out
    # rewrite labels by hand so the expected shares are known
    done = {p: results.completions(p, "greedy") for p in ("hi there", "one", "two")}
    done["hi there"][0][0].label = "code"
    for p, labels in (("one", ["code", "code", "other"]), ("two", ["code", "other", "other"])):
        for i, lab in enumerate(labels):
            done[p][i][0].label = lab
    done["hi there"][1][0].label = "code"
    done["hi there"][2][0].label = "other"
    summary = results.generalise("hi there", ["one", "two"], "greedy", base=0)
    assert summary is not None and summary.base_label == "code"
    assert summary.share == {0: 1.0, 1: 0.5, 2: 0.0}
    assert EvalResults.from_json(results.to_json()) == results  # eval.json reads back as it was
    assert results.behaviour_share("hi there", "greedy", base=0) == 0.5  # of vectors 1 and 2, one carries "code"
    assert results.behaviour_share("one", "greedy", base=0) == 0.5
    assert results.behaviour_share("never evaluated", "greedy") is None


def test_new_labels_apply_to_stored_completions(tiny_lm, run):
    from melbo.labels import RULES, Rule

    evaluate(tiny_lm, run, ["hi there"], [0, 1], EvalConfig(max_new_tokens=3))
    everything = (Rule("anything", "always", predicate=lambda text: True), *RULES)
    results = evaluate(tiny_lm, run, ["hi there"], [0, 1], EvalConfig(max_new_tokens=3), rules=everything)
    outs = results.completions("hi there", "greedy")
    assert {o[0].label for o in outs.values()} == {"anything"}


def test_a_run_only_in_memory_is_evaluated_without_writing_to_the_working_directory(tiny_lm, tmp_path, monkeypatch):
    """ortho() without ``out`` then evaluate() and compose() (a notebook's way): results come back, no eval.json or
    compose.json lands in the current directory, and a stray one there is never read as this run's."""
    from melbo.analysis.compose import compose
    from melbo.engines.ortho import OrthoConfig, ortho

    monkeypatch.chdir(tmp_path)
    (tmp_path / "eval.json").write_text("not json")
    run = ortho(tiny_lm, torch.ones(32) * 0.5, ["hi"], OrthoConfig(source=1, target=4, count=2, block=2, steps=2, completion_tokens=0))
    results = evaluate(tiny_lm, run, ["hi"], [0, 1, 2], EvalConfig(max_new_tokens=3))
    assert len(results.completions("hi", "greedy")) == 3 and EvalResults.load(run).prompts == {}
    compose(tiny_lm, run, [1, 2], "hi", PromptFormat(), 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_a_share_of_a_label_that_names_no_behaviour_says_so(tiny_lm, tmp_path):
    """θ0 labelled "other" (the labels read no behaviour in its text): eval still counts the copies that are "other"
    too, but says the share says little, as the study's page shows no share for such a base."""
    from test_controls import ortho_run

    from melbo.labels import NO_BEHAVIOUR
    from melbo.output.tables import evaluation

    run = ortho_run(tmp_path / "run")
    cfg = EvalConfig(max_new_tokens=6)
    results = evaluate(tiny_lm, run, ["hi there"], list(range(run.vectors.shape[0])), cfg)
    label = results.base_label("hi there", cfg.mode(), 0)
    assert label in NO_BEHAVIOUR  # a tiny random model writes nothing the labels know
    line = next(str(x) for x in evaluation(results, ["hi there"], list(range(6)), 10) if str(x).startswith("behaviour share"))
    assert f"('{label}' names no behaviour: the labels read none in θ0's text, so this share says little" in line


def test_labels_line_leaves_out_labels_no_vector_has():
    from melbo.output.tables import labels_line

    one = {"from": 0, "code": 0, "compliance": 0, "refusal": 0, "degenerate": 0, "other": 9}
    assert labels_line([one]) == "labels of the 9 vectors: other 9"
    blocks = [{"from": 0, "code": 81, "refusal": 0, "other": 19}, {"from": 100, "code": 0, "refusal": 0, "other": 30}]
    assert labels_line(blocks) == "labels per hundred vectors: 0+: code 81, other 19; 100+: code 0, other 30"
