"""The data a report is built from, the page's escaping, and the post-dump import."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, melbo, melbo_here
from report_runs import PLANTED, PROMPT, make_run

from melbo.errors import MelboError
from melbo.files.postdump import import_post_dump, read_post_composition
from melbo.files.runs import read_run
from melbo.report import gather, write_report
from melbo.report.data import block_size_for, cosine_check, moving_average
from melbo.report.render import script_json

POST = Path(__file__).resolve().parents[2] / "shared" / "reference" / "melbo-ortho-post"
needs_post = pytest.mark.skipif(not POST.is_dir(), reason="../shared/reference/melbo-ortho-post is not beside the project")


def test_gather_takes_figures_from_eval(tmp_path):
    data = gather(make_run(tmp_path / "run", n=30))
    assert [r.index for r in data.rows] == list(range(30))
    assert data.rows[0].base and not data.rows[1].base
    assert data.rows[7].kl == pytest.approx(0.07)
    assert data.rows[6].label == "refusal" and data.rows[5].label == "code"
    assert data.rows[3].completions[0].text == PLANTED[3] + " #3"
    assert len(data.rows[0].top) == 5  # eval keeps 10 (here 6); the table shows 5
    assert data.rows[0].top[0] == (" def", 3.0)  # SentencePiece's ▁ shown as the space it stands for
    assert data.rows[0].norm == pytest.approx(5.0, rel=1e-5)
    assert data.header["table_prompt"] == PROMPT and data.header["table_mode"] == "greedy"
    assert data.block_size == 3 and len(data.label_blocks) == 10
    assert sum(sum(b["counts"].values()) for b in data.label_blocks) == 30
    assert data.label_blocks[0] == {"from": 0, "to": 2, "counts": {"code": 1, "refusal": 1, "other": 1}}
    assert data.cosine["max_abs_cos"] < 1e-5


def test_gather_without_eval_uses_the_run_records(tmp_path):
    data = gather(make_run(tmp_path / "run", n=10, with_eval=False))
    assert data.rows[4].kl == pytest.approx(0.04)
    assert data.rows[1].label == "refusal"  # labelled from the record's completion with melbo's rules
    assert data.rows[0].top == [] and data.header["eval_prompts"] == []


def test_cosine_check_counts_pairs_and_finds_duplicates():
    vectors = torch.eye(5) * 3
    check = cosine_check(vectors)
    assert check["max_abs_cos"] == 0 and sum(b["pairs"] for b in check["histogram"]) == 10
    check = cosine_check(torch.cat([vectors, -vectors[:1]]))
    assert check["max_abs_cos"] == pytest.approx(1.0)


def test_block_size_and_moving_average():
    assert block_size_for(1558) == 100 and block_size_for(33) == 4 and block_size_for(1) == 1
    assert moving_average([1.0, None, 3.0, 5.0], 3) == [1.0, 2.0, 4.0, 4.0]


@pytest.mark.parametrize("text", ["</script><script>alert(1)</script>", "a & b <!-- c", "\u2028line\u2029", "</SCRIPT >"])
def test_script_json_cannot_leave_its_script_element(text):
    encoded = script_json({"t": text})
    assert "<" not in encoded and ">" not in encoded and "&" not in encoded
    assert json.loads(encoded) == {"t": text}


def test_page_is_self_contained_and_escapes_model_text(tmp_path):
    run = make_run(tmp_path / "run", n=30)
    page = write_report(run).read_text(encoding="utf-8")
    assert "<script>window.__pwned" not in page and "<img src=x" not in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from the network
    script = re.search(r"<script>(.*?)</script>", page, re.DOTALL)[1]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in page  # the CSP allows melbo's script and nothing else
    assert page.count("<script") == 2  # the data block and melbo's script
    data = json.loads(re.search(r'<script type="application/json" id="melbo-data">(.*?)</script>', page, re.DOTALL)[1])
    assert data["rows"][2]["completions"][0]["text"].startswith("<script>window.__pwned")
    for name in ("kl", "norm", "labels", "cosine"):
        png = (run / "plots" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and base64.b64encode(png).decode()[:200] in page
    assert "not computed (run melbo probe RUN)" in page and "not computed (run melbo compose RUN)" in page


def test_report_of_a_run_still_in_progress_has_nan_free_json(tmp_path):
    run = make_run(tmp_path / "run", n=4)
    meta = json.loads((run / "run.json").read_text())
    meta["vectors"][2]["kl"] = float("nan")
    (run / "eval.json").unlink()
    (run / "run.json").write_text(json.dumps(meta))
    page = write_report(run).read_text()
    assert "NaN" not in page
    assert gather(run).rows[2].kl is None


@needs_post
def test_import_post_dump_keeps_every_vector_and_the_published_plots(tmp_path):
    out = import_post_dump(POST / "code-vectors-bomb.txt", tmp_path / "post")
    data = gather(out)
    assert len(data.rows) == 1558 and data.header["model"] == "Qwen/Qwen1.5-1.8B-Chat"
    assert data.rows[0].completions[0].text.startswith("class Bomb:")
    assert data.rows[0].top and data.rows[0].kl is None and data.cosine is None
    assert data.label_blocks[0]["counts"] == {"code": 100}  # the post: ~100% code in 0-799
    assert data.published_plots == ["published-kl-div-ortho-coding-plot.png", "published-magnitude-ortho-coding-plot.png"]
    assert data.compose is not None and [r.combination.k for r in data.compose.rows][:3] == [2, 5, 10]
    page = write_report(out).read_text()
    assert "published-kl-div-ortho-coding-plot.png" in page and "not in the published dump" in page
    with pytest.raises(MelboError, match="published outputs, not vectors"):
        read_run(out)


@needs_post
def test_read_post_composition():
    entries = read_post_composition(POST / "code-vectors-outputs-meaned-scaled.txt")
    assert len(entries) == 11 and entries[0][0] == 2 and entries[0][1].startswith("class Bomb:")
    assert not any(text.endswith("=") for _, text in entries)


def test_cli_report_and_its_errors(tmp_path):
    run = make_run(tmp_path / "run", n=5)
    result = melbo("report", str(run))
    assert result.returncode == 0, result.stderr
    assert str(run / "report.html") in result.stdout.replace("\n", "")
    assert_one_line_error(melbo_here("report", str(tmp_path / "nope")), "does not exist")
    assert_one_line_error(melbo_here("report", str(run), "--out", str(tmp_path)), "is a folder")
    (tmp_path / "not-a-dump.txt").write_text("hello")
    assert_one_line_error(melbo_here("import-post-dump", str(tmp_path / "not-a-dump.txt"), "-o", str(tmp_path / "p")), "not one of the post's dumps")
    assert not (tmp_path / "p").exists()


def test_probe_and_compose_results_are_drawn_and_tabled(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", n=12)
    probe = {
        "prompts": ["Write a function."], "tokens": 40, "layer": 2, "random": {"directions": 64, "mean_abs_cos": 0.03, "std": 0.01},
        "vectors": [{"index": i, "mean_abs_cos": 0.03, "max_abs_cos": 0.1, "z": float(i - 6)} for i in range(12)],
    }
    (run / "probe.json").write_text(json.dumps(probe))
    rows = [{"name": f"k={k} {kind}", "norm": 5.0, "kl": 0.1 * k, "label": "code", "same_label_as_base": True, "text": "<b>x</b>"}
            for k in (1, 2, 5) for kind in ("mean", "mean×√k", "mean→‖θ0‖")]
    rows += [{"name": f"#{i}→‖θ0‖", "norm": 5.0, "kl": 2.0, "label": "other", "same_label_as_base": False, "text": "y"} for i in range(1, 12)]
    (run / "compose.json").write_text(json.dumps({"prompt": PROMPT, "base_label": "code", "rows": rows}))
    page = write_report(run).read_text()
    assert (run / "plots" / "presence.png").is_file() and (run / "plots" / "compose.png").is_file()
    assert page.count("not computed") == 1 and "not computed (run melbo eval RUN --controls)" in page  # only the controls
    assert page.count("<tr><td>k=") == 9 and "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert "0/11 keep the base's label (code), median KL 2.000" in page
    data = gather(run)
    assert data.rows[11].z == 5.0

    from melbo.report import plots  # the composition's k axis: a tick at each k, written as k, and the legend beside it

    axes = []
    monkeypatch.setattr(plots, "_png", lambda fig: axes.append(fig.axes[0]) or b"png")
    assert plots.plot_compose(data) == b"png"
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["1", "2", "5"]  # "10⁰", "2×10⁰" before
    assert axes[0].get_legend().get_bbox_to_anchor().x0 > axes[0].get_window_extent().x1 - 1  # outside the axes
    plots.plt.close("all")


def test_label_plot_says_which_completions_it_labels(tmp_path):
    """Before ``melbo eval`` the plot labels the completions the run stored; its title said "(None, None)"."""
    from melbo.report.plots import labels_title

    assert labels_title(gather(make_run(tmp_path / "e", n=5)).header, 3) == f"Label share per block ({PROMPT!r}, greedy)"
    assert labels_title(gather(make_run(tmp_path / "n", n=5, with_eval=False)).header, 3) == (
        "Label share per block (the completion stored with each vector, on the run's first prompt)")
    # ten vectors or fewer come in blocks of one: each bar is one vector's label, not a share ("per block of 1")
    assert labels_title(gather(make_run(tmp_path / "e", n=5)).header, 1) == f"Label of each vector ({PROMPT!r}, greedy)"


def test_norm_plot_of_equal_norms_starts_at_zero(tmp_path, monkeypatch):
    """A discovery's norms are all R up to float noise: the axis spans 0 to above R, not the sixth digit."""
    from melbo.report import plots

    axes = []
    monkeypatch.setattr(plots, "_png", lambda fig: axes.append(fig.axes[0]) or b"png")
    assert plots.plot_norm(gather(make_run(tmp_path / "run", n=5, with_eval=False))) == b"png"
    low, high = axes[0].get_ylim()
    assert low == 0 and 5.0 < high < 6.0  # make_run's norms are 5
    assert all(tick == int(tick) for tick in axes[0].get_xticks())  # vector indices, no 0.5
    plots.plt.close("all")
