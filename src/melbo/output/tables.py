"""Results as rich tables and summary lines: what each command prints once its work is done.

Every function takes results from the API and returns the renderables to print, in order (a ``Table`` or a line
with rich markup); :func:`show` prints them. No torch: the result types are only named for type checkers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console, JustifyMethod, RenderableType
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from melbo.labels import NO_BEHAVIOUR
from melbo.output.live import console, log_line, to_log

if TYPE_CHECKING:
    from melbo.analysis.choose import BaseChoice
    from melbo.analysis.compose import ComposeResults
    from melbo.analysis.controls import Controls
    from melbo.analysis.evaluate import EvalResults
    from melbo.analysis.judge import JudgeResults
    from melbo.analysis.probe import ProbeResults
    from melbo.engines.radius import RadiusChoice, RadiusProbe
    from melbo.files.runs import Run
    from melbo.model.forward import LayerNorms
    from melbo.study.outcome import OrthoOutcome, StudyResult
    from melbo.study.spec import Study

Lines = list[RenderableType]


def show(items: Iterable[RenderableType], target: Console = console, wrap: int | None = None) -> None:
    """Print tables at their width, and lines whole (soft-wrapped: a log or a pipe gets each as one line; ``wrap``: at
    this many columns, as a notebook's output cell needs). A table narrower than its title gets the title as a line
    above it: rich would wrap it over several centred lines."""
    for item in items:
        if isinstance(item, Table) and isinstance(item.title, str) and item.title:
            width = Measurement.get(target, target.options, item).maximum
            if Text.from_markup(item.title).cell_len > width:
                target.print(Text.from_markup(item.title, style="table.title"), soft_wrap=wrap is None, width=wrap)
                item.title = None
        line = isinstance(item, (str, Text))
        target.print(item, soft_wrap=line and wrap is None, width=wrap if line else None)


def make_table(title: str, columns: Sequence[tuple[str, JustifyMethod]], **options: Any) -> Table:
    """A table with these (name, justify) columns."""
    table = Table(title=title, **options)
    for name, justify in columns:
        table.add_column(name, justify=justify)
    return table


def clip(text: str | None, width: int | None = None) -> str:
    """``text`` on one line, cut to ``width`` characters (… marks a cut)."""
    flat = " ".join((text or "").split())
    return flat if width is None or len(flat) <= width else flat[: width - 1] + "…"


NO_TEXT = "(no text)"  # a completion that is empty or blank: the model ended at once


def short(text: str | None, width: int = 110) -> str:
    """A model's text or a prompt on one line, cut to ``width``, as literal text: its brackets are never read as markup
    (a completion's ``arr[i]`` prints as written, and ``[/b]`` in one cannot stop the output). An empty or blank
    completion reads "(no text)", not as an empty cell; ``None`` (none recorded) reads "—"."""
    if text is None:
        return "—"
    flat = clip(text, width)
    return escape(flat) if flat else f"[dim]{NO_TEXT}[/dim]"


def quoted(text: str | None, width: int | None = None) -> str:
    """``repr`` of a model's text or a prompt (cut to ``width``), as literal text."""
    return escape(repr(clip(text, width)))


def or_dash(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def residual_norms(name: str, described: dict[str, Any], n_layers: int, d_model: int, device: str, tokens: int, rows: list[LayerNorms],
                   layers: tuple[int, int] | None) -> Lines:
    """``melbo info``: the model, the residual norm after each block, and how melbo chooses s, t and R."""
    from melbo.model.forward import MASSIVE_SHARE, TOP_DIMS

    out: Lines = [f"[bold]{name}[/bold] ({described['class']}): {n_layers} layers (0 to {n_layers - 1}), d_model {d_model}, "
                  f"{described['dtype']} on {device}; prompt = {tokens} tokens"]
    table = make_table("Residual-stream norm after each block",
                       [(c, "right") for c in ("layer", "first token", "median of the rest", "max of the rest",
                                               f"top {TOP_DIMS} dims' share of ‖h‖²", "attention sink")])
    for row in rows:
        flag = f"[red]×{row.first_token / row.median_rest:.0f} the median[/red]" if row.sink else ""
        table.add_row(str(row.layer), f"{row.first_token:,.1f}", f"{row.median_rest:,.1f}", f"{row.max_rest:,.1f}",
                      f"{row.top_share:.0%}", flag)
    out.append(table)
    if any(row.sink for row in rows):
        out.append("[yellow]The first token is an attention sink on the flagged layers: melbo's losses skip it by default "
                   "(--positions all to include it).[/yellow]")
    at_source = rows[layers[0]] if layers is not None else None  # rows: every layer, in order
    if at_source is not None and at_source.top_share >= MASSIVE_SHARE:
        out.append(f"[yellow]After layer {at_source.layer}, {TOP_DIMS} coordinates hold {at_source.top_share:.0%} of the residual's "
                   f"squared norm (massive activations): the norm overstates the rest of the stream, so the fluent R is a much "
                   f"smaller fraction of it than on other models (auto R searches below its usual range until it finds it).[/yellow]")
    here = ("", "") if layers is None else (f": {layers[0]} here", f": {layers[1]} here")
    out.append(f"melbo discover chooses s (about a third of the way in{here[0]}), t (about two thirds in{here[1]}) and R itself: the largest R at "
               "which most trained vectors stay fluent, a fraction of the norm at s that differs between models "
               "(melbo discover --calibrate shows the search; --radii gives the candidates yourself).")
    return out


def indented(text: str, by: str = "  ") -> str:
    """Every non-empty line of ``text`` indented (a completion's paragraphs kept)."""
    return "\n".join(f"{by}{line}" if line else "" for line in text.split("\n"))


def side_by_side(title: str, plain: str, steered: str) -> Lines:
    """``melbo generate``: the unsteered and the steered completion in two columns in a terminal; in a log (no terminal,
    COLUMNS unset), one after the other, each under its name and indented, so that no line is wider than its text."""
    plain, steered = (text if text.strip() else NO_TEXT for text in (plain, steered))
    if to_log(console):
        return [Text(title), *(Text(f"{name}:\n" + indented(text)) for name, text in (("unsteered", plain), ("steered", steered)))]
    table = make_table(escape(title), (("unsteered", "left"), ("steered", "left")), show_lines=True)
    table.add_row(Text(plain), Text(steered))
    return [table]


def discovered(run: Run, count: int) -> Lines:
    """``melbo discover``: each vector's loss, label and completion on the first prompt."""
    from melbo.labels import label

    table = make_table(f"{count} vectors, R = {run.meta.R:g}, layer {run.meta.source} → {run.meta.target}{trained_in(run)}",
                       (("#", "right"), ("loss", "right"), ("label", "left"), ("completion on the first prompt", "left")))
    for record in run.records:
        table.add_row(str(record.index), f"{record.loss:,.4g}", label(record.completion or "")[0], short(record.completion))
    return [table]


def vectors(run: Run, limit: int = 200) -> Table:
    """Each vector's norm, label and stored completion (the first ``limit``, as :func:`ortho_run` shows): a run that is
    neither a discovery nor a MELBO-ortho run of melbo's (imported from a file)."""
    from melbo.labels import label

    shown = f" (the first {limit})" if len(run.records) > limit else ""
    table = make_table(f"{len(run.records)} vectors{shown}", (("#", "right"), ("norm", "right"), ("label", "left"), ("completion", "left")))
    for record, row in zip(run.records[:limit], run.vectors, strict=False):
        table.add_row(str(record.index), f"{float(row.norm()):.3g}", label(record.completion)[0] if record.completion else "—", short(record.completion))
    return table


def trained_in(run: Run) -> str:
    """", trained with bfloat16 products" for a discovery or MELBO-ortho run that was (nothing for float32, the runs before it)."""
    return ", trained with bfloat16 products" if run.meta.config.get("precision") == "bfloat16" else ""


def log_radius_probe(probe: RadiusProbe) -> None:
    """One line per candidate R as it is measured (a search below or above the range can take a while)."""
    log_line(probe.line())


def show_radius_choice(choice: RadiusChoice) -> None:
    show(radius_choice(choice))


def radius_choice(choice: RadiusChoice) -> Lines:
    """The calibration table of -R auto / --calibrate, and the choice with its reason."""
    table = make_table(f"Choosing R: {choice.probes[0].vectors} vectors per R, fluent = NLL ≤ 4 under the unsteered model and not degenerate",
                       (("R", "right"), ("× norm", "right"), ("fluent", "right"), ("NLL", "right"), ("first-token KL", "right"),
                        ("labels", "left"), ("openings", "right"), ("a completion", "left")))
    for p in choice.probes:
        mark = "[bold green]" if p.radius == choice.radius else ""
        labels = ", ".join(f"{k} {v}" for k, v in sorted(p.labels.items(), key=lambda kv: -kv[1]))
        table.add_row(f"{mark}{p.radius:g}", f"{p.radius / choice.norm_at_source:.3g}", f"{p.fluent}/{p.vectors}", f"{p.median_nll:.2f}",
                      f"{p.median_effect:.2f}", labels, str(p.openings), short(p.sample, 60))
    products = ", probes with bfloat16 products" if choice.precision == "bfloat16" else ""
    return [table, f"{escape(choice.line())} ({choice.seconds:.0f} s{products})"]


def ortho_run(run: Run, limit: int = 200) -> Lines:
    """Index, norm, KL to the base and completion of a MELBO-ortho run's vectors, and its summary line."""
    from melbo.objectives import max_abs_cosine

    table = make_table(f"MELBO-ortho: {run.vectors.shape[0] - 1} vectors orthogonal to θ0 (row 0){trained_in(run)}",
                       (("#", "right"), ("norm", "right"), ("KL to base", "right"), ("completion", "left")))
    for record in run.records[:limit]:
        table.add_row(str(record.index), f"{record.norm:.1f}", f"{record.kl:.3f}", short(record.completion, 90))
    out: Lines = [table]
    if run.kls:
        along = run.meta.config.get("continuation") or 0
        extra = run.meta.config.get("extra_continuation")
        on_extras = f" ({extra} on the shipped prompts)" if along and extra is not None else ""
        matched = f"; the copies matched θ0 along its first {along} greedy tokens{on_extras}" if along else ""
        out.append(f"KL(P_i ‖ P_base) at the last prompt token: median {run.median_kl:.3f}, max {max(run.kls):.3f}; "
                   f"max |cos| between any two vectors {max_abs_cosine(run.vectors):.1e}; stopped: {run.meta.stopped}{matched}")
    elif run.meta.stopped:
        out.append(f"no copies; stopped: {run.meta.stopped}")
    return out


def evaluation(results: EvalResults, prompts: list[str], indices: list[int], show_rows: int) -> Lines:
    """``melbo eval``: the first prompt's table (norm, KL, label, top-3, completion), labels per hundred vectors, the KL
    summary, and for a MELBO-ortho run the behaviour share and its generalisation. What the results lack (the post's
    dumps hold neither norms nor KL) shows as "—" and its summary is left out."""
    base, mode, first_prompt = results.base, results.mode, prompts[0]  # the base the eval resolved (None: unsteered)
    against = "P_unsteered" if base is None else f"P_{base}"
    first, completions = results.first_token(first_prompt), results.completions(first_prompt, mode)
    table = make_table(f"{quoted(first_prompt)} ({mode}); KL = KL(P_i ‖ {against}) at the last prompt token",
                       (("#", "right"), ("norm", "right"), ("KL", "right"), ("label", "left"), ("top-3", "left"), ("completion", "left")))
    for i in indices[:show_rows]:
        out, top = completions[i][0], first.get(i)
        table.add_row(str(i), or_dash(results.norms[i] if i < len(results.norms) else None, "{:.1f}"), or_dash(top.kl if top else None, "{:.3f}"),
                      out.label, escape(" ".join(repr(t) for t, _ in top.top[:3])) if top else "—", short(out.text, 70))
    lines: Lines = [table, labels_line(results.label_counts(first_prompt, mode))]
    measured = [i for i in indices if i in first and first[i].kl is not None]
    if measured or results.norms:
        median, peak = results.kl_summary(first_prompt, measured, base)
        kl = ((f"KL to vector {base} (other vectors)" if base is not None else "KL to the unsteered model")
              + f": median {median:.3f}, max {peak:.3f}") if measured else "KL not measured"
        lines.append(kl + (f"; max |cos| over all pairs {results.max_abs_cos:.1e}" if results.norms else ""))
    # a MELBO-ortho run: do the copies keep θ0's behaviour? (None: nothing to compare, as before θ0 is evaluated)
    if base is not None and base == results.theta0 and (share := results.behaviour_share(first_prompt, mode, base)) is not None:
        held = results.behaviour_share(prompts[1:], mode, base, label_from=first_prompt) if len(prompts) > 1 else None
        base_label = results.base_label(first_prompt, mode, base)
        lines.append(f"behaviour share: {share:.0%} of the copies' completions carry the base's label {quoted(base_label)} "
                     f"on the run's prompt" + (f", {held:.0%} on the {len(prompts) - 1} held-out prompt(s)" if held is not None else "")
                     + (f" ({quoted(base_label)} names no behaviour: the labels read none in θ0's text, so this share says little; "
                        "θ0's completion NLL under the copies, --controls, does not need a label)" if base_label in NO_BEHAVIOUR else ""))
    summary = results.generalisation
    if len(prompts) > 1 and summary:
        shares = sorted(summary.share.values())
        best = sorted(summary.share.items(), key=lambda kv: -kv[1])[:5]
        if summary.base_label is None:  # a discovery run: does each vector's behaviour hold off the prompt?
            behaving = sorted(((i, completions[i][0].label, v) for i, v in summary.share.items()
                               if completions.get(i) and completions[i][0].label not in NO_BEHAVIOUR), key=lambda t: (-t[2], t[0]))
            kept = "; ".join(f"#{i} {lab} {v:.0%}" for i, lab, v in behaving[:8]) + (f"; {len(behaving) - 8} more" if len(behaving) > 8 else "")
            lines.append(f"generalisation over {len(prompts) - 1} held-out prompts, the share on which a vector keeps its label on the run's "
                         f"prompt: {kept or 'no vector has a label that names a behaviour'}")
        else:
            lines.append(f"generalisation over {len(prompts) - 1} held-out prompts: share producing the base label ({quoted(summary.base_label)}): "
                         f"median {shares[len(shares) // 2]:.0%}; highest: " + ", ".join(f"#{i} {v:.0%}" for i, v in best))
    return lines


def labels_line(counts: list[dict[str, int]]) -> str:
    """Label counts: per hundred vectors ("0+: code 81, other 19; 100+: …"), or in one go for a run of 100 or fewer;
    a label no vector has is left out (a block where a label seen elsewhere is missing says 0)."""
    seen = [k for k in dict.fromkeys(k for c in counts for k in c) if k != "from" and any(c.get(k) for c in counts)]

    def listed(c: dict[str, int]) -> str:
        return ", ".join(f"{k} {c.get(k, 0)}" for k in seen)

    if len(counts) == 1:
        return f"labels of the {sum(v for k, v in counts[0].items() if k != 'from')} vectors: {listed(counts[0])}"
    return "labels per hundred vectors: " + "; ".join(f"{c['from']}+: {listed(c)}" for c in counts)


def judged(judged: JudgeResults, run_prompt: str, base: int | None, results: EvalResults) -> Lines:
    """Per concept: copies rated 2, mean harmonic score per source, agreement with the regex label, and per hundred vectors
    (beside melbo's regex label per hundred, where a regex label reads the concept: the post's code dump, for one)."""
    from melbo.analysis.judge import LABEL_OF_CONCEPT, LOW_AGREEMENT

    out: Lines = [f"judge {quoted(judged.model)} at {judged.host} (template {judged.template}; scores are only as good as the judge); "
                  f"{judged.requests_last_call} request(s) this call"]
    for name, summary in judged.summary.items():
        means = ", ".join(f"{source} {value:.2f}" for source, value in summary.mean_harmonic.items())
        agree = "" if summary.label_agreement is None else f"; agrees with melbo's regex label {summary.label_agreement:.0%}"
        out.append(f"  {name}: {or_dash(summary.share_concept_2, '{:.0%}')} of the copies rated 2 on the concept on {quoted(run_prompt)}; "
                   f"mean harmonic score: {means or '—'}{agree}; {summary.unrated} rating(s) missing or unparsed")
        if name in LABEL_OF_CONCEPT and summary.disagreement(LABEL_OF_CONCEPT[name]):
            out.append(f"    on every prompt the eval asked: {summary.disagreement(LABEL_OF_CONCEPT[name])}")
            if summary.label_agreement is not None and summary.label_agreement < LOW_AGREEMENT:
                out.append(f"    the judge and the regex label disagree on {1 - summary.label_agreement:.0%} of the completions: read some of "
                           "the judge's answers (melbo report: open a vector's row) before trusting either")
        per_hundred = judged.rated_2_per_hundred(name, run_prompt, base)
        modes = list(results.prompts[run_prompt].completions) if run_prompt in results.prompts else []
        if len(per_hundred) > 1:
            out.append("    rated 2 per hundred vectors: " + "; ".join(f"{start}+: {value:.0%}" for start, value in per_hundred))
            if name in LABEL_OF_CONCEPT and modes:
                regex = LABEL_OF_CONCEPT[name]
                shares = [(c["from"], c.get(regex, 0) / max(1, sum(v for k, v in c.items() if k != "from")))
                          for c in results.label_counts(run_prompt, "greedy" if "greedy" in modes else modes[0])]
                out.append(f"    melbo's regex label {regex!r} per hundred:  " + "; ".join(f"{start}+: {value:.0%}" for start, value in shares))
    return out


def controls(controls: Controls, judged: JudgeResults | None = None) -> Lines:
    """The verdict table of ``melbo eval --controls``: one row per control (and the judge's mean harmonic score per
    concept, where the completions were judged), then the verdict."""
    concepts = dict(judged.summary) if judged is not None else {}
    columns = ("control", "vectors", "norm", "behaviour share", "held-out agreement", "base NLL held out", "base NLL run prompt", *(f"judge: {c}" for c in concepts))
    table = make_table(f"Controls: θ0's label on the run's prompt {controls.base[controls.run_prompt].label!r}; "
                       f"base NLL = θ0's first {controls.settings.get('nll_tokens', '?')} greedy tokens, nats/token, under each steering "
                       f"({len(controls.held_out)} held-out prompts)", [(c, "left" if c == "control" else "right") for c in columns])
    for r in controls.rows():
        table.add_row(r.name, str(len(r.vectors)), f"{r.norm:.1f}", or_dash(r.behaviour_share, '{:.0%}'), or_dash(r.held_out_agreement, '{:.0%}'),
                      or_dash(r.base_nll, '{:.2f}'), or_dash(r.base_nll_run_prompt, '{:.2f}'),
                      *(or_dash(summary.mean_harmonic.get(r.name), '{:.2f}') for summary in concepts.values()))
    rows = controls.nll_by_prompt()
    names = list(rows[0].median_nll) if rows else []
    by_prompt = make_table("base NLL per prompt (median over each control's vectors; the copies were trained on the first)",
                           [("prompt", "left"), ("θ0's label", "left"), *((name, "right") for name in names), ("copies vs unsteered", "left")])
    for row in rows:
        by_prompt.add_row(short(row.prompt, 48), row.base_label or "—", *(or_dash(row.median_nll[n], "{:.2f}") for n in names),
                          row.against_unsteered or "—")
    return [table, by_prompt, f"verdict: {controls.verdict()}"]


def composed(results: ComposeResults, text: str) -> Lines:
    """``melbo compose``: each combination's norm, KL, label and completion."""
    table = make_table(f"{quoted(text)}: combinations of the found vectors (KL = KL(P ‖ P_θ0) at the last prompt token)",
                       (("combination", "left"), ("norm", "right"), ("KL", "right"), ("label", "left"), ("completion", "left")))
    for r in results.combinations:
        table.add_row(r.name, or_dash(r.norm, "{:.1f}"), or_dash(r.kl, "{:.3f}"), r.label, short(r.text, 70))
    out: Lines = [table]
    if results.single_median_kl is not None:
        out.append(f"each vector rescaled to ‖θ0‖: median KL {results.single_median_kl:.3f} (their own norms: see melbo eval)")
    return out


def presence(results: ProbeResults, show_rows: int) -> Lines:
    """``melbo probe``: each vector's |cos| with the residual stream and its z against random directions."""
    table = make_table(f"Presence after layer {results.layer} over {results.tokens} generated tokens (|cos|; z against random directions)",
                       (("#", "right"), ("mean |cos|", "right"), ("max |cos|", "right"), ("z", "right")))
    for r in results.vectors[:show_rows]:
        table.add_row(str(r.index), f"{r.mean_abs_cos:.4f}", f"{r.max_abs_cos:.4f}", f"{r.z:+.1f}")
    return [table, f"random directions: mean |cos| {results.random.mean_abs_cos:.4f} ± {results.random.std:.4f}; "
                   f"vectors: median z {results.median_z:+.1f}, {results.above(3)}/{len(results.vectors)} with z > 3"]


def study_units(result: StudyResult, seconds: float | None) -> Lines:
    """``melbo study``: one row per run of every unit, then where the page is and what it took (``seconds``: None where
    it is not known, as when a notebook shows a study's result)."""
    from melbo.report.study import study_rows

    table = make_table(f"study {result.study.name}: {len(result.units)} unit(s)",
                       [(c, "left") for c in ("unit", "run", "vectors", "base", "median KL", "behaviour share", "time")])
    rows = study_rows(result)
    for r in rows:  # a base labelled "other" has no behaviour to keep: no share, as on the study's page
        share = "" if r.behaviour_share is None else "—" if r.base_label in NO_BEHAVIOUR else f"{100 * r.behaviour_share:.0f} %"
        kl = "" if r.median_kl is None else f"{r.median_kl:.3f}"
        table.add_row(r.unit, r.folder, str(r.vectors), r.base, kl, share, "" if r.seconds is None else f"{r.seconds:.0f} s")
    loads = f"; {result.model_loads} model load(s)" if result.model_loads is not None else ""
    verdicts = [f"{escape(r.unit)} {escape(r.folder)}: {escape(r.controls.verdict)}" for r in rows if r.controls is not None]
    return [table, *(["controls (eval with controls = true):", *verdicts] if verdicts else []),
            f"study: [bold]{escape(str(result.page))}[/bold]" + (f"  ({seconds:.0f} s{loads})" if seconds is not None else "")]


def demo_intro(study: Study) -> str:
    """``melbo demo``'s first line: the prompt, the layers and R it uses."""
    unit = study.units()[0]
    d = unit.discover
    assert d is not None  # the built-in study discovers
    layers = f"after layer {d.source}" if d.source is not None else "about a third of the way in"
    read = f"after layer {d.target}" if d.target is not None else "about two thirds in"
    return (f"[bold]melbo demo[/bold] on SmolLM2-135M-Instruct: prompt {quoted(unit.prompts.prompts[0])}, vectors added {layers}, "
            f"change measured {read}, R = {d.radius if isinstance(d.radius, str) else format(d.radius, 'g')}.")


def demo_outcome(result: StudyResult, seconds: float) -> Lines:
    """``melbo demo``'s summary: the base and why, the copies, their behaviour share, the controls, where the runs are."""
    from melbo.analysis.evaluate import EvalResults
    from melbo.files.runs import read_run

    outcome = result.units[0]
    choice, ortho = outcome.bases[0], outcome.orthos[0]
    copies = read_run(result.folder / ortho.folder)
    share = "" if ortho.behaviour_share is None else f"; behaviour share {ortho.behaviour_share:.0%} (copies labelled {choice.label}, as the base)"
    found = EvalResults.load(copies).controls
    reports = [result.folder / r for r in outcome.reports]
    return [*base_choice(choice, ortho, read_run(result.folder / outcome.discovery)), *ortho_run(copies),
            f"[bold]{ortho.fidelity.sentence()}[/bold]{share}.", *(controls(found) if found is not None else []),
            f"runs: [bold]{result.folder / outcome.discovery}[/bold] and [bold]{result.folder / ortho.folder}[/bold]   ({seconds:.0f} s)",
            f"report: [bold]{reports[0]}[/bold]  (open it in a browser; the discovery run's is {reports[-1]}; the study's is {result.page})"]


def base_choice(choice: BaseChoice, ortho: OrthoOutcome, found: Run) -> Lines:
    """``melbo demo``: R and why, the discovered vectors with the chosen base marked, the base and the unsteered text."""
    out: Lines = []
    if found.meta.radius_choice:
        out.append(f"layers {found.meta.source} → {found.meta.target}{trained_in(found)}, {escape(found.meta.radius_choice.line())}")
    table = make_table("Discovered vectors (fluency = NLL under the unsteered model; effect = first-token KL to unsteered)",
                       (("#", "right"), ("label", "left"), ("NLL", "right"), ("effect", "right"), ("completion", "left")))
    for c in choice.candidates:
        mark = "[bold green]" if c.index == choice.index else ""
        table.add_row(f"{mark}{c.index}", c.label, f"{c.nll:.2f}", f"{c.effect:.2f}", short(c.completion, 80))
    return [*out, table, f"[bold]Base vector:[/bold] {choice.reason()}.",
            f"  unsteered model: {quoted(ortho.fidelity.unsteered_completion, 100)}", f"  base vector:     {quoted(choice.completion, 100)}"]
