"""``study.html``: one row per run of a study, linking to each run's report, and cross-run plots.

A static page (no script at all: the Content-Security-Policy allows none); every value is HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from melbo.analysis.controls import ControlSummary
from melbo.files.io import atomic_write
from melbo.files.runs import REPORT_FILE, read_meta, read_run
from melbo.labels import NO_BEHAVIOUR as NO_BEHAVIOUR_LABELS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from melbo.study.outcome import StudyResult

PAGE_FILE = "study.html"
NO_BEHAVIOUR = (*NO_BEHAVIOUR_LABELS, "")  # or no label at all


@dataclass
class StudyRow:
    """One run folder of a study, as its page's table shows it."""

    unit: str  # short: "R 20 · prompt 2" (the study's name for a study of one unit)
    settings: str  # the sweep's values in full ("discover.radius=20, prompts.prompts=[…]")
    folder: str  # relative to the study folder
    kind: str
    model: str
    layers: str
    radius: float | None
    prompt: str
    vectors: int
    base: str  # "#14 (code)" for MELBO-ortho runs
    median_kl: float | None
    behaviour_share: float | None
    same_top_token: str
    seconds: float | None
    report: str | None  # relative link, when the report exists
    base_label: str = ""  # the base's label (MELBO-ortho runs): "other" and "degenerate" are no behaviour to keep
    controls: ControlSummary | None = None  # eval with controls = true
    judged: dict[str, float | None] | None = None  # concept → share of copies the judge rated 2


def judged_cell(judged: dict[str, float | None] | None) -> str:
    return ", ".join(f"{name} {'—' if share is None else format(share, '.0%')}" for name, share in (judged or {}).items())


def controls_cell(summary: ControlSummary | None, base_label: str = "") -> str:
    """"copies 81 % vs random 6 %; NLL 1.2 vs 3.4 (unsteered 2.9)": the controls verdict in one cell. Where the base's
    label names no behaviour ("other"), θ0's text on the run's prompt stands in for the share, as in the verdict."""
    if summary is None:
        return ""
    share = [summary.get(n, "behaviour_share") for n in ("copies", "random_same_norm")]
    on_prompt = [summary.get(n, "base_nll_run_prompt") for n in ("copies", "random_same_norm")]
    nll = [summary.get(n, "base_nll") for n in ("copies", "random_same_norm", "unsteered")]
    parts = []
    if base_label in NO_BEHAVIOUR_LABELS:  # as the verdict reads it
        if None not in on_prompt:
            parts.append(f"run-prompt base NLL: copies {on_prompt[0]:.2f} vs random {on_prompt[1]:.2f}")
    elif None not in share:
        parts.append(f"share: copies {share[0]:.0%} vs random {share[1]:.0%}")
    if None not in nll:
        parts.append(f"held-out base NLL: copies {nll[0]:.2f} vs random {nll[1]:.2f} (unsteered {nll[2]:.2f})")
    return "; ".join(parts)


def study_rows(result: StudyResult) -> list[StudyRow]:
    rows = []
    labels = result.study.short_labels()
    for unit in result.units:
        orthos = {o.folder: o for o in unit.orthos}
        for folder in [unit.discovery, *orthos]:
            path = result.folder / folder
            if not (path / "run.json").is_file():
                continue
            meta = read_meta(path)
            outcome = orthos.get(folder)
            step = "discover" if folder == unit.discovery else f"ortho:{Path(folder).name}"
            seconds = unit.steps.get(step)
            report = path / REPORT_FILE
            rows.append(StudyRow(
                unit=labels.get(unit.name) or unit.label or result.study.name,
                settings=unit.label,
                folder=folder,
                kind=meta.kind,
                model=meta.model_name or "?",
                layers=f"{meta.source} → {meta.target}",
                radius=meta.R,
                prompt=(meta.prompts or [""])[0],
                vectors=len(meta.records),
                base=outcome.base.name if outcome else "",
                median_kl=outcome.fidelity.median_kl if outcome else None,
                behaviour_share=outcome.behaviour_share if outcome else None,
                same_top_token=f"{outcome.fidelity.same_top_token}/{outcome.fidelity.copies}" if outcome else "",
                seconds=seconds,
                report=str(Path(folder) / REPORT_FILE) if report.is_file() else None,
                controls=outcome.controls if outcome else None,
                judged=outcome.judged if outcome else None,
                base_label=outcome.base.label if outcome else "",
            ))
    return rows


def _plots(result: StudyResult, rows: list[StudyRow]) -> list[tuple[str, bytes]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orthos = [r for r in rows if r.kind == "ortho"]
    figures: list[tuple[str, bytes]] = []
    if not orthos:
        return figures
    names = [f"{r.unit} · {Path(r.folder).name}" if r.unit else Path(r.folder).name for r in orthos]
    fig, axes = plt.subplots(1, 2, figsize=(11, 1.6 + 0.32 * len(orthos)))
    axes[0].barh(names, [r.median_kl or 0.0 for r in orthos], color="#1f77b4")
    axes[0].set_xlabel("median KL(P_i ‖ P_base) at the last prompt token")
    behaviour = [r.base_label not in NO_BEHAVIOUR for r in orthos]  # a base labelled "other" has no behaviour to keep
    axes[1].barh(names, [100 * (r.behaviour_share or 0.0) if b else 0.0 for r, b in zip(orthos, behaviour)], color="#2ca02c")
    for y, (row, kept) in enumerate(zip(orthos, behaviour)):
        if not kept:
            axes[1].text(1, y, f"base labelled {row.base_label!r}: no behaviour to keep", va="center", fontsize=8, color="#666")
    axes[1].set_xlim(0, 100)
    axes[1].set_xlabel("behaviour share (%): copies with the base's label")
    for ax in axes:
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
    figures.append(("Fidelity of each MELBO-ortho run", _png(fig)))
    fig, ax = plt.subplots(figsize=(11, 3.4))
    for row in orthos:
        run = read_run(result.folder / row.folder)
        xs = [r.index for r in run.records if not r.base and r.kl is not None]
        ax.plot(xs, [r.kl for r in run.records if not r.base and r.kl is not None], marker=".", lw=1, label=f"{row.unit} {Path(row.folder).name}")
    ax.set_xlabel("vector index")
    ax.set_ylabel("KL to the base")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    figures.append(("KL to the base against the vector index, every MELBO-ortho run", _png(fig)))
    return figures


def _png(fig: Figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


# the table's column widths (%), in its order: unit, run, kind, model, layers, R, prompt, vectors, base, median KL,
# behaviour share, same first token, controls, judge, time; equal widths wrapped the controls cell over 15 lines
_COLUMNS = "".join(f'<col style="width:{w}%">' for w in (7, 6, 6, 10, 5, 4, 9, 5, 6, 5, 7, 5, 15, 5, 5))


def _model_cell(name: str) -> str:
    """A model file by its file name (the full path on hover: a cache path wrapped over six lines); a Hub id as it is."""
    if name.startswith(("/", "~", ".")) or name.endswith(".gguf"):
        return f'<td title="{html.escape(name)}">{html.escape(Path(name).name)}</td>'
    return _cell(name)


def _cell(value: object, fmt: str = "{}") -> str:
    if value is None or value == "":
        return "<td>—</td>"
    return f"<td>{html.escape(fmt.format(value))}</td>"


def render_study(result: StudyResult, rows: list[StudyRow]) -> str:
    e = html.escape
    body = []
    for r in rows:
        link = f'<a href="{e(r.report)}">{e(r.folder)}</a>' if r.report else e(r.folder)
        body.append(
            f"<tr><td>{e(r.unit)}" + (f"<br><small>{e(r.settings)}</small>" if r.settings and r.settings != r.unit else "") + f"</td><td>{link}</td>" + _cell(r.kind) + _model_cell(r.model) + _cell(r.layers)
            + _cell(r.radius, "{:.3g}") + _cell(r.prompt) + _cell(r.vectors) + _cell(r.base) + _cell(r.median_kl, "{:.3f}")
            + _cell(None if r.behaviour_share is None or r.base_label in NO_BEHAVIOUR else 100 * r.behaviour_share, "{:.0f} %")
            + _cell(r.same_top_token)
            + _cell(controls_cell(r.controls, r.base_label)) + _cell(judged_cell(r.judged)) + _cell(r.seconds, "{:.0f} s") + "</tr>"
        )
    plots = "".join(
        f'<figure><img alt="{e(title)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"><figcaption>{e(title)}</figcaption></figure>'
        for title, png in _plots(result, rows)
    )
    study = result.study
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>melbo study: {e(study.name)}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1300px; padding: 0 1em 3em; color: #222; }}
table {{ border-collapse: collapse; width: 100%; table-layout: fixed; }} th, td {{ border-bottom: 1px solid #eee; padding: .3em .5em; text-align: left; vertical-align: top; overflow-wrap: anywhere; }}
small {{ color: #666; }}
th {{ background: #f6f6f6; overflow-wrap: normal; }} figure {{ margin: 1em 0; }} figure img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption, footer {{ color: #666; font-size: .9em; }}
</style></head><body>
<h1>melbo study: {e(study.name)}</h1>
<p>{e(study.description)}</p>
<p>{len(result.units)} unit(s), {len(rows)} run folder(s). Behaviour share: the share of a MELBO-ortho run's copies whose
greedy completion on the run's prompt carries the base vector's label (<code>melbo eval</code>). Controls
(<code>controls = true</code> in <code>[eval]</code>): the same share for random directions orthogonal to the base at the
copies' norm, and the NLL of the base's own completion on held-out prompts under the copies, the random directions and no
steering: copies that carry the base's behaviour, not only a big push, make its text likelier than both.</p>
<table><colgroup>{_COLUMNS}</colgroup><thead><tr><th>unit</th><th>run (report)</th><th>kind</th><th>model</th><th>layers</th><th>R</th><th>prompt</th>
<th>vectors</th><th>base</th><th>median KL</th><th>behaviour share</th><th>same first token</th><th>controls</th><th>judge: copies rated 2</th><th>time</th></tr></thead>
<tbody>{"".join(body)}</tbody></table>
{plots}
<footer>Made by melbo on {_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC from {e(str(result.folder))}.</footer>
</body></html>
"""


def write_page(result: StudyResult) -> Path:
    rows = study_rows(result)
    page = result.folder / PAGE_FILE
    text = render_study(result, rows)
    atomic_write(page, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return page
