"""Studies: the file is checked field by field, the pipeline reproduces the demo bit for bit, a grid runs the same
from Python and from the shell, and a study resumes where it stopped."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from helpers import assert_one_line_error, cpu_vendor, melbo
from safetensors.torch import load_file

from melbo import MelboError, read_run
from melbo.model.loading import LoadedModel
from melbo.study import QUICK_DEMO, ModelCache, Study, builtin_study, demo_study, run_study

DATA = Path(__file__).parent / "data"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def tiny_demo(**tables) -> dict:
    """The demo study shrunk to a tiny model: the settings the refactor's pin was made with."""
    study = {
        "name": "pin", "model": {"name": "tiny"}, "prompts": {"prompts": ["How can I do it?"]},
        "discover": {"source": 1, "target": 4, "radius": 4.0, "count": 6, "block": 6, "steps": 20, "completion_tokens": 8,
                     "precision": "float32"},  # melbo 0.1 trained in float32 (auto: bfloat16 on a CPU with bfloat16 units)
        # the choice and the objective melbo 0.1's demo made on this model: vector 5, the residual mean at last:4 from 2‖θ0‖
        "choose": {"by": "index", "indices": [5]}, "ortho": {"count": 8, "block": 4, "steps": 20, "completion_tokens": 8, "match": "mean", "continuation": 0, "init_scale": 2.0, "penalty": 0.0,
                  "extra_prompts": 0, "precision": "float32", "patience": 0},  # 0.1 evaluated every row to the last step
        "eval": {"max_new_tokens": 8}, "compose": {"ks": [1, 2], "max_new_tokens": 8}, "report": {},
    }
    for name, values in tables.items():
        study[name] = {**study.get(name, {}), **values}
    return study


@pytest.fixture
def pinned_lm(char_tokenizer):
    return LoadedModel(make_tiny_model("llama", n_layers=6, initializer_range=0.3), char_tokenizer, "tiny", {"id": "tiny"})


def test_pipeline_reproduces_the_demo_vectors_of_release_0_1(pinned_lm, tmp_path, capsys):
    """The vectors melbo 0.1's `run_demo` found on this tiny model (tests/data/demo_tiny_pin.safetensors). Bit for bit on
    the CPU kernels they were recorded with (an Intel CPU with AVX-512); other kernels round floats differently (an AMD
    CPU with AVX-512 differs by 6e-7 in discovery), so there only closely."""
    result = run_study(Study.from_dict(tiny_demo()), tmp_path / "pin", models=ModelCache({"tiny": pinned_lm}))
    # from Python too, a study shows its progress as melbo study does (here stderr is no terminal: lines)
    logged = [re.sub(r"^\[[\d\- :]+\] ", "", line) for line in capsys.readouterr().err.splitlines()]
    assert {"study: discover", "study: discover block 1/1", "study: ortho block 1/2", "study: eval ortho", "study: report ortho"} <= set(logged), logged
    # and the work without blocks says how far it is, as melbo eval and compose do (on Qwen an eval takes minutes)
    after_eval = logged[logged.index("study: eval ortho") + 1]
    assert re.fullmatch(r"evaluating prompt 1/\d+ 'How can I do it\?': 9/9 vectors \(\d+ s\)", after_eval), logged
    assert any(re.fullmatch(r"composing: \d+/\d+ completions \(\d+ s\)", line) for line in logged), logged
    pin = load_file(DATA / "demo_tiny_pin.safetensors")
    found = {"discover": read_run(tmp_path / "pin" / "discover").vectors, "ortho": read_run(tmp_path / "pin" / "ortho").vectors}
    with open(DATA / "demo_tiny_pin.safetensors", "rb") as handle:  # the safetensors header holds the metadata
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    recorded = header["__metadata__"]
    same_kernels = (recorded["cpu_capability"], recorded["cpu_vendor"]) == (torch.backends.cpu.get_cpu_capability(), cpu_vendor())
    for name, vectors in found.items():
        if same_kernels:
            assert torch.equal(vectors, pin[name]), name
        else:
            # rounding grows over the optimisation's steps: 2e-4 at most on the AMD CPU, against vectors of norm 4 to 8
            torch.testing.assert_close(vectors, pin[name], atol=1e-3, rtol=1e-3)
    assert result.units[0].bases[0].index == int(header["__metadata__"]["base"])
    assert (tmp_path / "pin" / "study.html").is_file() and (tmp_path / "pin" / "ortho" / "report.html").is_file()
    # in a notebook: one line, and the table melbo study ends with (its dataclass repr held every unit's choice)
    assert repr(result) == f"StudyResult({str(tmp_path / 'pin')!r}: study 'pin', 1 unit, 1 MELBO-ortho run, page {str(result.page)!r})"
    shown = html.unescape(re.sub(r"<[^>]+>", "", result._repr_html_()))
    assert "study pin: 1 unit(s)" in shown and "ortho" in shown and f"study: {result.page}" in shown


def test_resume_skips_finished_steps_and_the_page_shows_every_run(pinned_lm, tmp_path, monkeypatch):
    study = Study.from_dict(tiny_demo(ortho={"count": 8, "block": 4}, choose={"by": "index", "indices": [1, 3]}))
    models = ModelCache({"tiny": pinned_lm})
    import melbo.study.pipeline as pipeline

    real = pipeline.evaluate
    calls = {"eval": 0}

    def crash_on_second_eval(*args, **kwargs):
        calls["eval"] += 1
        if calls["eval"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "evaluate", crash_on_second_eval)
    with pytest.raises(KeyboardInterrupt):
        run_study(study, tmp_path / "s", models=models)
    saved = json.loads((tmp_path / "s" / "study.json").read_text())["units"][0]["steps"]
    assert "ortho:ortho-" + str(json.loads((tmp_path / "s" / "study.json").read_text())["units"][0]["bases"][1]["index"]) in saved
    assert sum(name.startswith("eval:") for name in saved) == 1  # the first eval finished, the second did not

    with pytest.raises(MelboError, match="already holds a study"):
        run_study(study, tmp_path / "s", models=models)
    monkeypatch.setattr(pipeline, "evaluate", real)
    monkeypatch.setattr(pipeline, "discover", lambda *a, **k: pytest.fail("a finished discovery ran again"))
    result = run_study(study, tmp_path / "s", resume=True, models=models)
    steps = result.units[0].steps
    assert {k for k in steps if k.startswith("eval:")} == {f"eval:ortho-{b.index}" for b in result.units[0].bases}
    assert len(result.units[0].orthos) == 2 and all(o.behaviour_share is not None for o in result.units[0].orthos)
    page = (tmp_path / "s" / "study.html").read_text()
    for outcome in result.units[0].orthos:
        assert f'href="{outcome.folder}/report.html"' in page
    again = run_study(study, tmp_path / "s", resume=True, models=ModelCache())  # finished: the unit's model never loads
    assert again.model_loads == 0 and again.units[0].steps == steps
    other = Study.from_dict(tiny_demo(discover={"radius": 5.0}))
    with pytest.raises(MelboError, match=r"discover.radius: 4.0 → 5.0"):
        run_study(other, tmp_path / "s", resume=True, models=models)


def test_a_study_that_stopped_before_writing_anything_runs_again_without_force(pinned_lm, tmp_path, monkeypatch):
    """A first `melbo study` that stopped at a bad setting (Gemma's file without chat_template = false) left its settings,
    and the rerun with the setting fixed said "already holds a study; --resume or --force". Now it leaves nothing. A
    discovery stopped mid-way has no finished step but a run folder: that stays, for --resume."""
    import melbo.study.pipeline as pipeline

    study = Study.from_dict(tiny_demo(ortho={"count": 4, "block": 4}, choose={"by": "index", "indices": [1]}))
    models = ModelCache({"tiny": pinned_lm})
    real = pipeline.discover

    def bad_setting(*args, **kwargs):
        raise MelboError("this tokenizer has no chat template")

    monkeypatch.setattr(pipeline, "discover", bad_setting)
    with pytest.raises(MelboError, match="no chat template"):
        run_study(study, tmp_path / "s", models=models)
    assert not (tmp_path / "s").exists()  # nothing half-written: the settings it wrote went with it
    fixed = Study.from_dict(tiny_demo(ortho={"count": 4, "block": 4}, choose={"by": "index", "indices": [1]}, discover={"radius": 5.0}))

    def stop_after_a_block(lm, prompts, cfg, fmt, out, **kwargs):
        real(lm, prompts, cfg, fmt, out=out, **kwargs)  # its one block saved, then stopped before the step was recorded
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "discover", stop_after_a_block)
    with pytest.raises(KeyboardInterrupt):
        run_study(fixed, tmp_path / "s", models=models)  # no --force needed: nothing was written before
    assert (tmp_path / "s" / "discover" / "run.json").is_file()
    with pytest.raises(MelboError, match="already holds a study"):
        run_study(fixed, tmp_path / "s", models=models)


def test_a_study_reports_auto_rs_candidates_as_they_are_measured(pinned_lm, tmp_path, monkeypatch):
    """Under nohup `melbo study` said "study: discover" and nothing more while auto R tried its candidates (75 s on
    Gemma 3 270M, minutes on a 0.5B model); each candidate and the choice are now events, a line each in a log."""
    import melbo.study.pipeline as pipeline
    from melbo.files.runs import RadiusChoice, RadiusProbe

    probes = [RadiusProbe(r, 4, f, nll, 0.5, {"other": 4}, 3, "text") for r, f, nll in ((80.3, 3, 2.19), (95.5, 2, 3.9))]

    def auto_r_then_stop(lm, prompts, cfg, fmt, out, on_probe, on_radius, **kwargs):
        for probe in probes:
            on_probe(probe)
        on_radius(RadiusChoice(80.3, "R 80.3 (0.0213 × the residual norm 3773 at layer 5): the largest tried at which most vectors stay fluent", 3773.0, probes))
        raise KeyboardInterrupt  # the rest is discovery's own work

    monkeypatch.setattr(pipeline, "discover", auto_r_then_stop)
    events = []
    with pytest.raises(KeyboardInterrupt):
        run_study(Study.from_dict(tiny_demo(discover={"radius": "auto"})), tmp_path / "s", models=ModelCache({"tiny": pinned_lm}),
                  on_event=events.append)
    assert [(e.stage, e.note) for e in events if e.note] == [
        ("discover", "-R auto: R 80.3: 3/4 fluent, median NLL 2.19, first-token KL 0.50"),
        ("discover", "-R auto: R 95.5: 2/4 fluent, median NLL 3.90, first-token KL 0.50"),
        ("discover", "R = 80.3 (0.0213 × the residual norm 3773 at layer 5): the largest tried at which most vectors stay fluent"),
    ]


def test_a_whole_basis_study_counts_its_blocks_and_steps_as_melbo_ortho_does(pinned_lm, tmp_path, monkeypatch):
    """With no count and no steps, a study's ortho events said "block 3" and "step 12": the log could give no time left
    for a whole basis, which runs for hours. They now carry the blocks and steps `melbo ortho` counts by."""
    from melbo.engines.config import OrthoConfig
    from melbo.study import pipeline

    def one_step_then_stop(lm, base, prompts, cfg, fmt, out, on_step, **kwargs):
        on_step(0, 1, 0.5)
        raise KeyboardInterrupt  # the rest is ortho's own work

    monkeypatch.setattr(pipeline, "ortho", one_step_then_stop)
    study = tiny_demo()
    del study["ortho"]["count"], study["ortho"]["steps"]
    events = []
    with pytest.raises(KeyboardInterrupt):
        run_study(Study.from_dict(study), tmp_path / "s", models=ModelCache({"tiny": pinned_lm}), on_event=events.append)
    (step,) = [e for e in events if e.stage == "ortho" and e.step]
    cfg = OrthoConfig(**{k: v for k, v in study["ortho"].items()})
    plan = cfg.resolved(1.0, pinned_lm.d_model, pinned_lm.n_layers, vocab=pinned_lm.plain_head_vocab)
    assert (step.blocks, step.steps) == (-(-(pinned_lm.d_model - 1) // 4), plan.steps) and plan.steps > 0


def grid_study(models: list[str]) -> str:
    return f"""
name = "grid"
[model]
device = "cpu"
[prompts]
prompts = ["How can I do it?"]
[discover]
source = 1
target = 4
count = 4
block = 4
steps = 8
completion_tokens = 4
[ortho]
count = 4
block = 4
steps = 8
completion_tokens = 4
extra_prompts = 0
[eval]
max_new_tokens = 4
[report]
[sweep]
"model.name" = {json.dumps(models)}
"discover.radius" = [3.0, 5.0]
"""


def test_a_grid_of_two_models_and_two_radii_gives_the_same_runs_from_python_and_the_shell(two_models, tmp_path):
    spec = tmp_path / "grid.toml"
    spec.write_text(grid_study(two_models))
    study = Study.from_toml(spec)
    assert [u.label for u in study.units()] == [
        f"model.name={Path(m).name}, discover.radius={r}" for m in two_models for r in (3.0, 5.0)
    ]
    models = ModelCache()
    python = run_study(study, tmp_path / "py", models=models)
    assert models.loads == 2  # one load per model, reused by both of its units
    shell = melbo("study", str(spec), "--out", str(tmp_path / "sh"))
    assert shell.returncode == 0, shell.stderr
    assert "study: " in shell.stdout and "study.html" in shell.stdout
    for unit in python.units:
        for folder in [unit.discovery, *[o.folder for o in unit.orthos]]:
            a, b = read_run(tmp_path / "py" / folder), read_run(tmp_path / "sh" / folder)
            assert torch.equal(a.vectors, b.vectors), folder
    radii = {read_run(tmp_path / "py" / u.discovery).meta.R for u in python.units}
    assert radii == {3.0, 5.0}
    rows = (tmp_path / "py" / "study.html").read_text().count("<tr>")
    assert rows == 1 + 4 * 2  # header, then a discovery and a MELBO-ortho run per unit


@pytest.mark.parametrize(
    "text, needle",
    [
        ('[discover]\nradus = 3', "[discover] has no setting 'radus'"),
        ('[discover]\nradius = "big"', "[discover] R must be a positive number or auto, got big"),
        ('[discover]\ncount = 2.5', "[discover] count = 2.5 should be a whole number"),
        ('[discover]\nsource = 9\ntarget = 4', "must come before"),
        ("[discovery]\ncount = 3", "unknown table [discovery]"),
        ('[discover]\n[sweep]\n"discover.radius" = 3', "must be a non-empty list"),
        ('[discover]\n[sweep]\n"radius" = [3]', 'must be "table.field"'),
        ('[discover]\n[sweep]\n"discover.radius" = [3, -1]', "R must be a positive number"),
        ('[discover]\n[choose]\nby = "best"', "choose by 'best'"),
        ('[discover]\n[ortho]\noptimizer = "sgd"', "use lbfgs or adam"),
        ("[vectors]\nfile = 'a.pt'\n[discover]", "not both"),
        ("[discover\ncount = 3", "not valid TOML"),
    ],
    ids=lambda v: v if len(v) < 30 else v[:30],
)
def test_a_bad_study_file_is_one_line_and_nothing_starts(text, needle, tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    with pytest.raises(MelboError, match=None) as caught:
        Study.from_toml(spec)
    assert needle in str(caught.value) and str(spec) in str(caught.value)
    result = melbo("study", str(spec), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, needle)
    assert not (tmp_path / "out").exists()


def test_examples_are_valid_studies_and_the_demo_example_is_the_builtin():
    for path in EXAMPLES.glob("*.toml"):
        Study.from_toml(path)
    assert (EXAMPLES / "demo.toml").read_text() == builtin_study("demo").read_text()
    quick = demo_study(quick=True).units()[0]
    assert quick.discover.count == QUICK_DEMO["discover.count"] and quick.ortho.count == QUICK_DEMO["ortho.count"]


def test_study_toml_in_the_folder_reruns_the_same_study(pinned_lm, tmp_path):
    study = Study.from_dict(tiny_demo(eval={"prompt_set": "harmful"}, compose={"ks": [1]}))
    run_study(study, tmp_path / "s", models=ModelCache({"tiny": pinned_lm}))
    assert Study.from_toml(tmp_path / "s" / "study.toml").to_dict() == study.to_dict()


@pytest.mark.slow
def test_demo_from_the_shell_runs_the_demo_study(tmp_path):
    """`melbo demo` is `melbo study examples/demo.toml`: the study it records (and reruns with `melbo study`) is the
    example's, with --quick's values; that one study gives the same runs from Python and the shell is tested on tiny
    models above, so the embedded model runs once here."""
    result = melbo("demo", "--quick", "--out", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    assert "Base vector:" in result.stdout and "orthogonal to the base" in result.stdout
    recorded = Study.from_toml(tmp_path / "demo" / "study.toml")
    assert recorded.to_dict() == Study.from_toml(EXAMPLES / "demo.toml").with_values(dict(QUICK_DEMO)).to_dict()
    assert read_run(tmp_path / "demo" / "ortho").vectors.shape == (5, 576)
    for page in ("ortho/report.html", "discover/report.html", "study.html"):
        assert (tmp_path / "demo" / page).is_file()
    assert (tmp_path / "demo" / "ortho" / "eval.json").is_file() and (tmp_path / "demo" / "ortho" / "compose.json").is_file()


def test_faithful_choice_tries_candidates_and_keeps_the_best_copied(pinned_lm, tmp_path):
    choose = {"by": "faithful", "trials": 3, "trial_copies": 2, "trial_steps": 3, "trial_tokens": 6}
    study = Study.from_dict(tiny_demo(choose=choose, ortho={"count": 4, "block": 4, "steps": 5}))
    events = []
    result = run_study(study, tmp_path / "f", models=ModelCache({"tiny": pinned_lm}), on_event=events.append)
    (base,) = result.units[0].bases
    assert len(base.trials) == 3 and all(t["share"] in (0.0, 0.5, 1.0) for t in base.trials)  # 2 trial copies each
    notes = [e.note for e in events if e.stage == "choose" and e.note]  # a line each in a log: the trials take minutes
    tried = ", ".join(f"#{t['index']} ({t['label']})" for t in base.trials)
    assert notes == [f"2 trial copies of each of {tried}",
                     *(f"#{t['index']} ({t['label']}): {t['share']:.0%} of its trial copies keep its label" for t in base.trials),
                     f"base #{base.index} ({base.label})"]
    assert len({t["index"] for t in base.trials}) == 3
    def rank(t):  # ranked_trials: a behaviour kept by half its copies first, then the share; ties: the clearer first
        return (not (t["label"] not in ("other", "degenerate", base.unsteered_label) and t["share"] >= 0.5), -t["share"])

    assert base.index == sorted(base.trials, key=rank)[0]["index"] and base.trial_share == sorted(base.trials, key=rank)[0]["share"]
    assert "trial copies" in base.reason()


def test_study_page_short_unit_labels_and_no_share_for_a_base_without_behaviour(pinned_lm, tmp_path):
    """Units are named "prompt 1", "R 4" on the page (the full settings under them), and a base labelled "other" shows
    no behaviour share that could pass for success."""
    study = Study.from_dict({**tiny_demo(ortho={"count": 4, "block": 4}, compose={}, eval={"max_new_tokens": 4}),
                             "sweep": {"prompts.prompts": [["How can I do it?"], ["Why?"]], "discover.radius": [4.0]}})
    result = run_study(study, tmp_path / "s", models=ModelCache({"tiny": pinned_lm}))
    page = (tmp_path / "s" / "study.html").read_text()
    for unit in ("prompt 1 · R 4", "prompt 2 · R 4"):
        assert f"<tr><td>{unit}<br><small>prompts.prompts=" in page
    outcomes = [o for u in result.units for o in u.orthos]
    assert outcomes and all(o.behaviour_share is not None for o in outcomes)
    for outcome in outcomes:
        row = page.split(f'href="{outcome.folder}/report.html"')[1].split("</tr>")[0]
        cells = re.findall(r"<td>(.*?)</td>", row)
        share = cells[8]  # kind, model, layers, R, prompt, vectors, base, median KL, behaviour share
        if outcome.base.label in ("other", "degenerate"):
            assert share == "—", row
        else:
            assert share.endswith("%"), row


def test_study_page_controls_cell_reads_a_base_without_behaviour_by_its_text_and_names_a_model_file_briefly():
    """As the verdict: a base labelled "other" gets θ0's run-prompt NLL, not a share that random pushes match (Gemma:
    "share: copies 88% vs random 50%"); a model file shows its file name, not a cache path wrapped over six lines."""
    from melbo.analysis.controls import ControlSummary
    from melbo.report.study import _model_cell, controls_cell

    figures = {"copies": {"behaviour_share": 0.88, "base_nll": 3.91, "base_nll_run_prompt": 0.56},
               "random_same_norm": {"behaviour_share": 0.5, "base_nll": 3.73, "base_nll_run_prompt": 0.93},
               "unsteered": {"behaviour_share": 1.0, "base_nll": 3.6, "base_nll_run_prompt": 2.0}}
    summary = ControlSummary(figures, "verdict")
    held = "held-out base NLL: copies 3.91 vs random 3.73 (unsteered 3.60)"
    assert controls_cell(summary, "other") == f"run-prompt base NLL: copies 0.56 vs random 0.93; {held}"
    assert controls_cell(summary, "code") == f"share: copies 88% vs random 50%; {held}"
    cell = _model_cell("~/.cache/melbo/models/gemma-3-270m-q4_k_m.gguf")
    assert cell == '<td title="~/.cache/melbo/models/gemma-3-270m-q4_k_m.gguf">gemma-3-270m-q4_k_m.gguf</td>'
    assert _model_cell("Qwen/Qwen2.5-0.5B-Instruct") == "<td>Qwen/Qwen2.5-0.5B-Instruct</td>"


def test_a_study_takes_its_vectors_from_a_llama_cpp_control_vector(tiny_folder, tmp_path):
    """``[vectors]`` reads a file as `melbo import` does: a .gguf control vector too, at the layer the study names."""
    from melbo import write_run
    from melbo.files.interop import export_vectors

    vectors = torch.randn(2, 32) * 3
    meta = {"model": {"name": str(tiny_folder), "model_type": "llama"}, "layers": {"source": 2, "target": 4}, "vectors": [{"index": 0}, {"index": 1}]}
    write_run(tmp_path / "made", vectors, meta)
    export_vectors(read_run(tmp_path / "made"), tmp_path / "v.gguf", "gguf", [1])
    spec = tmp_path / "from-gguf.toml"
    spec.write_text(f"""
name = "from-gguf"
[model]
name = {json.dumps(str(tiny_folder))}
device = "cpu"
[prompts]
prompts = ["How can I do it?"]
[vectors]
file = {json.dumps(str(tmp_path / "v.gguf"))}
source = 2
target = 4
[choose]
by = "index"
indices = [0]
[ortho]
count = 2
block = 2
steps = 4
completion_tokens = 4
""")
    result = run_study(Study.from_toml(spec), tmp_path / "out")
    unit = result.units[0]
    imported = read_run(tmp_path / "out" / unit.discovery)
    assert imported.vectors.shape == (1, 32) and imported.meta.source == 2
    torch.testing.assert_close(imported.vectors[0], vectors[1])
    copies = read_run(tmp_path / "out" / unit.orthos[0].folder)
    torch.testing.assert_close(copies.vectors[0], vectors[1])  # row 0: θ0, the control vector
    assert copies.vectors.shape[0] == 3
