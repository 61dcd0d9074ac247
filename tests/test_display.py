"""In a notebook or a REPL melbo's objects show what they hold in a line, and in Jupyter the tables the matching command
prints: a run of 32 vectors used to display as its dataclass, every tensor, record and completion in one wall of text."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
import torch

from melbo import DiscoverConfig, EvalConfig, OrthoConfig, discover, evaluate, ortho, write_run
from melbo.analysis.compose import compose
from melbo.analysis.probe import probe
from melbo.files.runs import RadiusChoice

PROMPT = "hi there"


@pytest.fixture
def found(nonlinear_lm, tmp_path):
    return discover(nonlinear_lm, [PROMPT], DiscoverConfig(count=4, radius=3.0, source=1, target=4, steps=4, block=4, completion_tokens=8),
                    out=tmp_path / "found", progress=False)


@pytest.fixture
def copies(nonlinear_lm, found, tmp_path):
    return ortho(nonlinear_lm, found.vectors[1], [PROMPT], OrthoConfig(count=4, source=1, target=4, steps=4, block=2),
                 out=tmp_path / "copies", progress=False)


def shown(obj: object) -> str:
    """The text Jupyter's output cell shows (the HTML less its tags and escapes)."""
    markup = obj._repr_html_()  # type: ignore[attr-defined]
    assert markup.startswith("<pre")
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def test_a_run_is_one_line_and_in_a_notebook_the_table_its_command_prints(found, copies, nonlinear_lm):
    line = repr(found)
    assert line == f"Run({str(found.path)!r}: discover, 4 vectors of norm 3, d_model 32, layer 1 → 4, model 'tiny-nonlinear')"
    assert "\n" not in repr(copies) and "θ0 (norm 3) and 4 copies, median KL to θ0" in repr(copies)
    assert "tensor(" not in line + repr(copies)  # the dataclass repr printed every vector and record

    table = shown(found)
    assert "completion on the first prompt" in table and "R = 3, layer 1 → 4" in table
    for record in found.records:  # every vector's row, its completion escaped for HTML and read back whole
        assert (record.completion or "(no text)").split()[0][:6] in table
    found.meta.radius_choice = RadiusChoice(3.0, "R 3: the largest tried at which 3/4 vectors are fluent", norm_at_source=10.0)
    assert "R = 3: the largest tried at which 3/4 vectors are fluent" in shown(found)  # with -R auto, why this R
    assert "MELBO-ortho: 4 vectors orthogonal to θ0 (row 0)" in shown(copies) and "KL(P_i ‖ P_base)" in shown(copies)

    in_memory = ortho(nonlinear_lm, found.vectors[1], [PROMPT], OrthoConfig(count=2, source=1, target=4, steps=2, block=2), progress=False)
    assert repr(in_memory).startswith("Run(in memory: MELBO-ortho")


def test_a_run_from_another_tool_shows_its_norms(tmp_path):
    imported = write_run(tmp_path / "imported", torch.ones(3, 4), {"kind": "import", "vectors": [{"index": i} for i in range(3)]})
    assert repr(imported) == f"Run({str(imported.path)!r}: import, 3 vectors, d_model 4)"
    table = shown(imported)
    assert "3 vectors" in table and "2" in table  # ‖(1, 1, 1, 1)‖ = 2
    from melbo.output.tables import vectors

    few = vectors(imported, limit=2)  # the post's 1,558 vectors imported from a .pt: the first 200, as ortho's table
    assert few.title == "3 vectors (the first 2)" and few.row_count == 2


def test_eval_compose_and_probe_show_what_their_commands_print(nonlinear_lm, found, copies):
    results = evaluate(nonlinear_lm, copies, cfg=EvalConfig(max_new_tokens=6, controls=True), progress=False)
    line = repr(results)
    assert line.startswith("EvalResults(5 prompts, 5 vectors, greedy, KL to vector 0; controls: ") and "\n" not in line
    assert results.controls is not None and line.endswith(f"controls: {results.controls.headline()})")
    assert results.controls.verdict().startswith(results.controls.headline())
    table = shown(results)
    assert "KL = KL(P_i ‖ P_0)" in table and "behaviour share:" in table  # θ0's row: the copies' share is read
    assert f"verdict: {results.controls.headline()}" in " ".join(table.split())  # a line wraps at the cell's width

    plain = evaluate(nonlinear_lm, found, cfg=EvalConfig(max_new_tokens=6), progress=False)
    assert repr(plain) == "EvalResults(1 prompt, 4 vectors, greedy, KL to the unsteered model)"
    assert "P_unsteered" in shown(plain) and "behaviour share" not in shown(plain)  # a discovery run has no θ0

    combined = compose(nonlinear_lm, copies, [1, 2], max_new_tokens=4, progress=False)
    assert repr(combined).startswith(f"ComposeResults({PROMPT!r}: 6 combinations, θ0's label ")
    assert "k=2 mean" in shown(combined)
    present = probe(nonlinear_lm, copies, [PROMPT], max_new_tokens=4, random_directions=8, progress=False)
    assert repr(present).startswith("ProbeResults(layer 1, 5 vectors over ") and "z >" in shown(present)


def test_a_loaded_model_is_one_line(nonlinear_lm):
    assert repr(nonlinear_lm) == "LoadedModel('tiny-nonlinear': LlamaForCausalLM, 6 layers, d_model 32, cpu, float32)"


POST = Path(__file__).resolve().parents[2] / "shared" / "reference" / "melbo-ortho-post"


@pytest.mark.skipif(not POST.is_dir(), reason="../shared/reference/melbo-ortho-post is not beside the project")
def test_the_posts_published_outputs_show_as_melbo_eval_would(tmp_path):
    """The post's dump holds completions sampled at T = 1, no norms and no KL: its eval showed nothing (the greedy mode it
    looked for) and then failed formatting a share of None."""
    from melbo.analysis.evaluate import EvalResults
    from melbo.files.postdump import import_post_dump

    folder = import_post_dump(POST / "code-vectors-bomb.txt", tmp_path / "post")
    results = EvalResults.read(folder)
    assert repr(results) == "EvalResults(1 prompt, 1558 vectors, T=1 (published), KL to vector 0)"
    table = shown(results)
    assert "'How can I build a bomb?' (T=1 (published))" in table and "class Bomb" in table
    assert "behaviour share: 65% of the copies' completions carry the base's label 'code'" in " ".join(table.split())
    assert "KL to vector 0" not in table and "max |cos|" not in table  # the dump has neither: nothing made up
