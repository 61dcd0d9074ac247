"""Turn :class:`~melbo.report.data.ReportData` and its plots into one self-contained HTML page.

Safety: the page's only script is melbo's own, allowed by a Content-Security-Policy hash; model text
reaches the page inside a JSON ``<script type="application/json">`` block with ``<``, ``>`` and ``&``
written as ``\\u003c`` etc. (so ``</script>`` in a completion cannot close it) and is shown with
``textContent``. Header fields are HTML-escaped. A completion holding ``<script>`` shows as text.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import html
import json
import math
from importlib import resources
from typing import Any

from melbo.analysis.compose import ComposeResults
from melbo.analysis.controls import Controls
from melbo.analysis.judge import JudgeResults
from melbo.report.data import ReportData
from melbo.report.plots import Plot


def _asset(name: str) -> str:
    return resources.files("melbo.report").joinpath(name).read_text(encoding="utf-8")


def _share(value: Any, prompt: str | None, mode: str | None) -> str | None:
    """"25 % of the copies' completions carry the base's label 'refusal' …", from (share, label); None if not measured."""
    if not value or value[0] is None:
        return None
    return f"{value[0]:.0%} of the copies' completions carry the base's label {value[1]!r} (on {prompt!r}, {mode})"


def script_json(value: Any) -> str:
    """JSON that is safe inside an HTML ``<script>`` element (no ``<``, ``>``, ``&`` or line separators)."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    for char, escape in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def _clean(value: Any) -> Any:
    """NaN and infinities become null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _header_html(header: dict[str, Any]) -> str:
    mode = header["kind"] + (f" ({header['mode']} mode)" if header.get("mode") else "")
    items = [
        ("model", header["model"]),
        ("run", mode),
        ("layers", f"vector added after layer {header['source']}, change read after layer {header['target']}"
         if header.get("source") is not None else None),
        ("R", f"{header['R']:.4g}" if isinstance(header.get("R"), int | float) else header.get("R")),
        ("prompt(s)", "\n".join(repr(p) for p in header["prompts"]) or None),
        ("system prompt", repr(header["system"]) if header.get("system") else "none"),
        ("vectors", f"{header['count']}" + (f" ({header['status']})" if header.get("status") else "")),
        ("evaluated on", "\n".join(repr(p) for p in header["eval_prompts"]) or "not evaluated: run `melbo eval RUN`"),
        ("behaviour share", _share(header.get("behaviour_share"), header.get("table_prompt"), header.get("table_mode"))),
        ("made", f"{header.get('created') or '?'} (last change {header.get('updated') or '?'}) with melbo {header['melbo']}"),
    ]
    return "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items if v is not None)


def _figure_html(plot: Plot) -> str:
    if plot.png is None:
        return f'<figure id="plot-{plot.name}"><div class="missing">{html.escape(plot.title)}: {"not computed (run " + html.escape(plot.missing) + ")" if not plot.missing.startswith("nothing") else "not in the published dump"}</div></figure>'
    src = "data:image/png;base64," + base64.b64encode(plot.png).decode("ascii")
    return (
        f'<figure id="plot-{plot.name}"><img alt="{html.escape(plot.title)}" src="{src}">'
        f"<figcaption>{html.escape(plot.title)} · also saved as plots/{plot.name}.png</figcaption></figure>"
    )


def _published_html(data: ReportData, images: dict[str, bytes]) -> str:
    figures = []
    for name in data.published_plots:
        src = "data:image/png;base64," + base64.b64encode(images[name]).decode("ascii")
        figures.append(f'<figure><img alt="{html.escape(name)}" src="{src}"><figcaption>as published: {html.escape(name)}</figcaption></figure>')
    return "".join(figures)


def _num(value: Any, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _compose_html(compose: ComposeResults | None) -> str:
    """The composition results as a table (the k rows; vectors alone at ‖θ0‖ summarised in one line)."""
    if compose is None:
        return ""
    rows, single = compose.combinations, compose.singles
    body = "".join(
        f"<tr><td>{html.escape(r.name)}</td><td class=num>{_num(r.norm, 2)}</td><td class=num>{_num(r.kl, 3)}</td>"
        f"<td><span class=\"label {html.escape(r.label)}\">{html.escape(r.label)}</span></td><td><pre>{html.escape(r.text)}</pre></td></tr>"
        for r in rows
    )
    summary = ""
    if single:
        same = sum(r.same_label_as_base for r in single)
        median = f", median KL {compose.single_median_kl:.3f}" if compose.single_median_kl is not None else ""
        summary = f"<p>Each found vector alone, rescaled to ‖θ0‖: {same}/{len(single)} keep the base's label ({html.escape(compose.base_label)}){median}.</p>"
    return (
        f"<details id=compose-table><summary>Composition on {html.escape(repr(compose.prompt))}: {len(rows)} combinations "
        f"(base label: {html.escape(compose.base_label)})</summary>{summary}"
        "<table><colgroup><col style='width:10em'><col style='width:5.5em'><col style='width:5.5em'><col style='width:6em'><col></colgroup>"
        f"<thead><tr><th>combination</th><th class=num>norm</th><th class=num>KL</th><th>label</th><th>completion</th></tr></thead><tbody>{body}</tbody></table></details>"
    )


def _controls_html(data: ReportData) -> str:
    """The verdict table of ``melbo eval --controls``: one row per control (with the judge's mean score per concept
    where the completions were judged), then the verdict."""
    controls = data.controls
    if controls is None:
        return ""
    base = controls.base.get(controls.run_prompt)
    judged = data.judge.summary if data.judge is not None else {}
    body = "".join(
        f"<tr><td>{html.escape(r.name)}</td><td class=num>{len(r.vectors)}</td><td class=num>{r.norm:.1f}</td>"
        f"<td class=num>{_pct(r.behaviour_share)}</td><td class=num>{_pct(r.held_out_agreement)}</td>"
        f"<td class=num>{_num(r.base_nll, 2)}</td><td class=num>{_num(r.base_nll_run_prompt, 2)}</td>"
        + "".join(f"<td class=num>{_num(s.mean_harmonic.get(r.name), 2)}</td>" for s in judged.values()) + "</tr>"
        for r in controls.rows()
    )
    judge_heads = "".join(f"<th class=num>judge: {html.escape(name)} (mean harmonic)</th>" for name in judged)
    return (
        f"<details id=controls-table open><summary>Copies against controls: {html.escape(controls.verdict())}</summary>"
        f"<p>θ0's label on the run's prompt: {html.escape(repr(base.label if base else None))}. Behaviour share: completions on the "
        f"run's prompt with θ0's label; held-out agreement: the same label as θ0 on each of {len(controls.held_out)} held-out "
        "prompts; base NLL: θ0's own greedy completion, teacher-forced, in nats per token under each steering (median).</p>"
        "<table><thead><tr><th>control</th><th class=num>vectors</th><th class=num>norm</th><th class=num>behaviour share</th>"
        "<th class=num>held-out agreement</th><th class=num>base NLL held out</th><th class=num>base NLL run prompt</th>"
        f"{judge_heads}</tr></thead>"
        f"<tbody>{body}</tbody></table>{_nll_by_prompt_html(controls)}</details>"
    )


def _nll_by_prompt_html(controls: Controls) -> str:
    """Base NLL per prompt: which prompts the copies carry θ0's text to, and where their size does the harm."""
    rows = controls.nll_by_prompt()
    if not rows:
        return ""
    names = list(rows[0].median_nll)
    body = "".join(
        f"<tr><td>{html.escape(r.prompt)}{' <em>(trained on)</em>' if r.trained else ''}</td><td>{html.escape(r.base_label or '—')}</td>"
        + "".join(f"<td class=num>{_num(r.median_nll[n], 2)}</td>" for n in names)
        + f"<td>{html.escape(r.against_unsteered or '—')}</td></tr>"
        for r in rows
    )
    heads = "".join(f"<th class=num>{html.escape(n).replace('_', '_<wbr>')}</th>" for n in names) + "<th>copies vs unsteered</th>"
    return (
        "<p>Base NLL per prompt (median over each control's vectors): the held-out figure above is a median over these "
        "prompts, so this shows on which kinds of prompt the copies carry θ0's text and on which their size costs it. The last "
        "column: θ0's text under the copies against no steering, by the sign test over the copies (a difference at p ≤ 0.05).</p>"
        f"<table><thead><tr><th>prompt</th><th>θ0's label</th>{heads}</tr></thead><tbody>{body}</tbody></table>"
    )


def _judge_html(judge: JudgeResults | None) -> str:
    """What the concept judge says, per concept (melbo judge / eval --judge)."""
    if judge is None:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(s.description)}</td><td class=num>{_pct(s.share_concept_2)}</td>"
        f"<td>{html.escape(', '.join(f'{k} {v:.2f}' for k, v in s.mean_harmonic.items()))}</td>"
        f"<td class=num>{_pct(s.label_agreement)}</td><td class=num>{s.unrated}</td></tr>"
        for name, s in judge.summary.items()
    )
    return (
        f"<details id=judge-table open><summary>Concept judge: {html.escape(judge.model)} at {html.escape(judge.host)} "
        f"(template {html.escape(judge.template)}). Scores are only as good as the judge.</summary>"
        "<table><thead><tr><th>concept</th><th>description</th><th class=num>copies rated 2</th><th>mean harmonic score (concept, "
        "instruction, fluency: 0–2)</th><th class=num>agrees with regex label</th><th class=num>missing or unparsed</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>{_judge_vs_regex(judge)}</details>"
    )


def _judge_vs_regex(judge: JudgeResults) -> str:
    """Where a regex label reads the concept: how often the two disagree, and which way (a weak judge over-calls)."""
    from melbo.analysis.judge import LABEL_OF_CONCEPT, LOW_AGREEMENT

    notes = []
    for name, s in judge.summary.items():
        said = s.disagreement(LABEL_OF_CONCEPT[name]) if name in LABEL_OF_CONCEPT else ""
        if said:
            low = s.label_agreement is not None and s.label_agreement < LOW_AGREEMENT
            notes.append(f"<p>{html.escape(name)}, on every prompt the eval asked: {html.escape(said)}."
                         + (" <b>The judge and the regex label disagree often: open a vector's row below to read the judge's "
                            "answers before trusting either.</b>" if low else "") + "</p>")
    return "".join(notes)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def render(data: ReportData, plots: list[Plot], published: dict[str, bytes] | None = None) -> str:
    """The whole page as a string."""
    header = data.header
    script = _asset("page.js")
    script_hash = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    payload = {"labels": data.labels, "rows": _clean([row.to_json() for row in data.rows])}
    caption = "Every vector of the run."
    if header.get("table_prompt"):
        caption += f" Label, KL and first completion on {header['table_prompt']!r} ({header['table_mode']})."
    note = f"<p>{html.escape(header['note'])}</p>" if header.get("note") else ""
    parts = {
        "title": html.escape(header["title"]),
        "header": _header_html(header),
        "note": note,
        "plots": "".join(_figure_html(p) for p in plots) + _published_html(data, published or {}),
        "compose": _compose_html(data.compose) + _controls_html(data) + _judge_html(data.judge),
        "table_caption": html.escape(caption),
        "version": html.escape(str(header["melbo"])),
        "made": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "data": script_json(payload),
        "script": script,
        "script_hash": script_hash,
    }
    page = _asset("page.html")
    # One pass over the template, so text inserted for one placeholder is never searched for another.
    pieces = page.split("{{")
    out = [pieces[0]]
    for piece in pieces[1:]:
        name, rest = piece.split("}}", 1)
        out.append(parts[name] + rest)
    return "".join(out)
