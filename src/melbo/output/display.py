"""How melbo's objects show themselves in a notebook or a REPL: one line as their ``repr``, and in Jupyter the tables
the matching command prints (``_repr_html_``).

A run of 32 vectors used to display as its dataclass: every tensor, record and completion, thousands of characters.
Now ``run`` on the last line of a cell shows ``melbo discover``'s or ``melbo ortho``'s table, ``evaluate(lm, run)``
what ``melbo eval`` prints, and so on; ``repr()`` is one line naming what the object holds. The tables come from
:mod:`melbo.output.tables`, so the notebook and the shell say the same.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from rich.console import JUPYTER_DEFAULT_COLUMNS, Console
from rich.markup import escape

from melbo.output import tables
from melbo.output.live import LOG_WIDTH
from melbo.output.tables import Lines

if TYPE_CHECKING:
    from melbo.analysis.compose import ComposeResults
    from melbo.analysis.evaluate import EvalResults
    from melbo.analysis.probe import ProbeResults
    from melbo.files.runs import Run
    from melbo.model.loading import LoadedModel
    from melbo.study.outcome import StudyResult

SHOW_ROWS = 40  # vectors a table shows in a notebook (`melbo eval` shows 40 by default)
# what rich's own Jupyter display wraps its text in (rich.jupyter): the page's monospace font, scrolling when wide
PRE = ("<pre style=\"white-space:pre;overflow-x:auto;line-height:normal;"
       "font-family:Menlo,'DejaVu Sans Mono',consolas,'Courier New',monospace\">{code}</pre>")


def counted(n: int, thing: str) -> str:
    """"1 vector", "4 vectors"."""
    return f"{n} {thing}{'s' * (n != 1)}"


def as_html(lines: Lines) -> str:
    """Renderables (tables and lines with rich markup) as an HTML fragment for a notebook's output cell: lines wrap
    where rich wraps them in a notebook (115 columns), tables keep their natural width (a wide one scrolls sideways,
    as a wide DataFrame does, rather than squeezing its columns)."""
    target = Console(record=True, file=io.StringIO(), width=LOG_WIDTH, color_system="truecolor", force_terminal=True, force_jupyter=False)
    tables.show(lines, target, wrap=JUPYTER_DEFAULT_COLUMNS)
    return target.export_html(inline_styles=True, code_format=PRE)


def run_repr(run: Run) -> str:
    """``Run('runs/bomb': discover, 16 vectors of norm 26.6, d_model 576, layer 8 → 20, model 'smollm2')``."""
    meta, count, d_model = run.meta, run.vectors.shape[0], run.vectors.shape[1]
    where = "in memory" if run.in_memory else repr(str(run.path))
    if meta.base_row is not None and count:
        theta0 = float(run.vectors[meta.base_row].norm())
        what = f"MELBO-ortho, θ0 (norm {theta0:.3g}) and {count - 1} copies"
        what += f", median KL to θ0 {run.median_kl:.3g}" if run.median_kl is not None else ""
    else:
        radius = f" of norm {meta.R:.3g}" if meta.kind == "discover" and meta.R else ""
        what = f"{meta.kind}, {counted(count, 'vector')}{radius}"
    layers = f", layer {meta.source} → {meta.target}" if meta.source is not None and meta.target is not None else (
        f", layer {meta.source}" if meta.source is not None else "")
    model = f", model {meta.model_name!r}" if meta.model_name else ""
    running = ", unfinished" if meta.status == "running" else ""
    return f"Run({where}: {what}, d_model {d_model}{layers}{model}{running})"


def run_lines(run: Run) -> Lines:
    """What ``melbo discover`` or ``melbo ortho`` prints about a run; a plain table of norms and completions for a run
    imported from elsewhere."""
    head = escape(run_repr(run))
    if run.meta.base_row is not None and all(r.kl is not None and r.norm is not None for r in run.records):
        return [head, *tables.ortho_run(run)]
    if run.meta.kind == "discover" and all(r.loss is not None for r in run.records):
        choice = run.meta.radius_choice  # -R auto: the R chosen and why (run.meta.radius_choice holds the table)
        return [head, *([escape(choice.line())] if choice else []), *tables.discovered(run, len(run.records))]
    return [head, tables.vectors(run)]


def run_html(run: Run) -> str:
    return as_html(run_lines(run))


def eval_repr(results: EvalResults) -> str:
    """``EvalResults(5 prompts, 33 vectors, greedy, KL to vector 0; controls: …)``."""
    first = results.run_prompt
    vectors = len(results.completions(first, results.mode)) if first is not None else 0
    against = "KL to the unsteered model" if results.base is None else f"KL to vector {results.base}"
    extra = [f"controls: {results.controls.headline()}"] if results.controls is not None and results.controls.rows() else []
    extra += [f"judged by {results.judge.model!r}"] if results.judge is not None else []
    return (f"EvalResults({counted(len(results.prompts), 'prompt')}, {counted(vectors, 'vector')}, {results.mode}, {against}"
            + ("; " + "; ".join(extra) if extra else "") + ")")


def eval_lines(results: EvalResults) -> Lines:
    """What ``melbo eval`` prints: the run's prompt's table and summaries, the judge's lines and the controls' verdict."""
    first = results.run_prompt
    if first is None:
        return ["EvalResults: nothing evaluated yet"]
    held_out = results.generalisation.prompts if results.generalisation is not None else []
    indices = sorted(results.completions(first, results.mode))
    out = tables.evaluation(results, [first, *held_out], indices, SHOW_ROWS)
    if results.judge is not None:
        out += tables.judged(results.judge, first, results.base, results)
    if results.controls is not None and results.controls.rows():
        out += tables.controls(results.controls, results.judge)
    return out


def compose_repr(results: ComposeResults) -> str:
    single = f", each vector at ‖θ0‖: median KL {results.single_median_kl:.3g}" if results.single_median_kl is not None else ""
    return f"ComposeResults({results.prompt!r}: {len(results.combinations)} combinations, θ0's label {results.base_label!r}{single})"


def probe_repr(results: ProbeResults) -> str:
    return (f"ProbeResults(layer {results.layer}, {len(results.vectors)} vectors over {results.tokens} generated tokens: "
            f"median z {results.median_z:+.1f}, {results.above(3)} with z > 3)")


def model_repr(lm: LoadedModel) -> str:
    """``LoadedModel('smollm2': LlamaForCausalLM, 30 layers, d_model 576, cpu, float32)``; ``lm.model`` prints the modules."""
    dtype = str(lm.dtype).removeprefix("torch.")
    return f"LoadedModel({lm.name!r}: {type(lm.model).__name__}, {lm.n_layers} layers, d_model {lm.d_model}, {lm.device}, {dtype})"


def study_repr(result: StudyResult) -> str:
    """``StudyResult('studies/demo': study 'demo', 1 unit, 1 MELBO-ortho run, page 'studies/demo/study.html')``."""
    units, orthos = len(result.units), sum(len(u.orthos) for u in result.units)
    page = f", page {str(result.page)!r}" if result.page else ""
    return (f"StudyResult({str(result.folder)!r}: study {result.study.name!r}, {counted(units, 'unit')}, "
            f"{counted(orthos, 'MELBO-ortho run')}{page})")


def study_html(result: StudyResult) -> str:
    """What ``melbo study`` prints at the end: a row per run of every unit, the controls' verdicts, the page."""
    return as_html(tables.study_units(result, None))
