"""Commands that study a run: ``eval``, ``compose``, ``probe`` and ``report``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from melbo.analysis.config import ComposeConfig, EvalConfig, ProbeConfig
from melbo.analysis.judge import JudgeConfig
from melbo.cli import options as opt
from melbo.cli.app import app, interruptible, load_for_run, run_prompts
from melbo.errors import MelboError
from melbo.output import tables
from melbo.output.live import console, err_console

if TYPE_CHECKING:
    from melbo.analysis.evaluate import EvalResults
    from melbo.analysis.judge import JudgeResults

E, C, P, J = EvalConfig(), ComposeConfig(), ProbeConfig(), JudgeConfig()  # the defaults the options below show


@app.command("eval")
def eval_command(
    run: opt.Run,
    index: Annotated[str, typer.Option(help="Vectors: all, 3, 0-99 or 1,4,7.")] = "all",
    prompt: opt.Prompts = None, prompt_file: opt.PromptFile = None,
    max_new_tokens: opt.NewTokens = E.max_new_tokens,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy; > 0 samples.")] = E.temperature,
    samples: Annotated[int, typer.Option(min=1, help="Completions per vector when sampling.")] = E.samples,
    seed: int = E.seed,
    batch: Annotated[int, typer.Option(min=1, help="Vectors per generate call.")] = E.batch,
    base: Annotated[int, typer.Option(help="The vector KL is measured against (row 0 of an ortho run is θ0).")] = E.base,
    prompt_set: Annotated[str | None, typer.Option(help="Also evaluate melbo's shipped prompts: all, harmful, neutral, coding, chit-chat.")] = None,
    labels: Annotated[Path | None, typer.Option(help="Your own labels (JSON or TOML: name + pattern, or name + python FILE:FUNCTION).")] = None,
    controls: Annotated[bool, typer.Option("--controls", help="MELBO-ortho runs: also steer with norm-matched random directions, the copies at ‖θ0‖, their mean and none, and measure θ0's completion NLL under each (held-out prompts: yours, else 4 shipped ones).")] = E.controls,
    control_count: Annotated[int, typer.Option(min=0, help="Vectors per random or rescaled control (0: a fifth of the copies, so the eval about doubles at most).")] = E.control_count,
    nll_tokens: Annotated[int, typer.Option(min=1, help="Controls: θ0's first N greedy tokens are scored (base NLL).")] = E.nll_tokens,
    judge: opt.Judge = None, judge_model: opt.JudgeModel = J.model, concept: opt.Concept = None, concepts: opt.Concepts = None, judge_key_env: opt.JudgeKey = J.key_env, judge_concurrency: opt.JudgeConcurrency = J.concurrency,
    show: Annotated[int, typer.Option(help="Rows of the table printed.")] = 40,
    model: opt.Model = None, device: opt.Device = "auto", dtype: opt.Dtype = None,
) -> None:
    """Steered completions, first-token top-10 and KL to the base, labels and checks, stored in RUN/eval.json."""
    from melbo.analysis.controls import check_controls
    from melbo.analysis.evaluate import eval_prompts, evaluate
    from melbo.files.interop import parse_indices
    from melbo.files.runs import EVAL_FILE, read_run
    from melbo.labels import RULES, load_rules
    from melbo.model.prompts import shipped_prompts

    record = read_run(run)
    indices = parse_indices(index, record.vectors.shape[0])
    extra = run_prompts(prompt, prompt_file) if (prompt or prompt_file) else []
    if prompt_set:
        extra += shipped_prompts(prompt_set)
    cfg = EvalConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, samples=samples, seed=seed, batch=batch, base=base,
        controls=controls, control_count=control_count, nll_tokens=nll_tokens,
    )
    cfg.check()
    judging = JudgeConfig.from_options(judge, judge_model, concept, concepts, judge_key_env, judge_concurrency)
    if controls:
        check_controls(record, indices)
    prompts = eval_prompts(record, extra, controls)
    rules = load_rules(labels) if labels else RULES
    lm, fmt = load_for_run(record, model, device, dtype)
    with err_console.status("evaluating…") as status, interruptible(run):
        results = evaluate(
            lm, record, prompts, indices, cfg, fmt, rules=rules,
            on_batch=lambda p, done, total: status.update(f"evaluating {p[:30]!r}: {done}/{total} vectors"),
        )
    tables.show(tables.evaluation(results, record, prompts, indices, cfg, show))
    judged = None
    if judging is not None:
        judged = run_judge(results, judging, prompts[0], base if record.records and record.records[base].base else None,
                           lambda: results.save(record))
    if results.controls is not None:
        tables.show(tables.controls(results.controls, judged))
    console.print(f"results: [bold]{run / EVAL_FILE}[/bold]")


@app.command("judge")
def judge_command(
    run: Annotated[Path, typer.Argument(help="A run folder with an eval.json (melbo eval, or melbo import-post-dump).")],
    judge: opt.Judge = None, judge_model: opt.JudgeModel = J.model, concept: opt.Concept = None, concepts: opt.Concepts = None, judge_key_env: opt.JudgeKey = J.key_env, judge_concurrency: opt.JudgeConcurrency = J.concurrency,
) -> None:
    """Rate the completions a run's eval holds with an LLM judge (concept, instruction, fluency: 0–2 each); no model loads."""
    from melbo.analysis.evaluate import EvalResults
    from melbo.files.runs import EVAL_FILE, read_meta

    if judge is None:
        raise MelboError("melbo judge needs --judge URL: an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    cfg = JudgeConfig.from_options(judge, judge_model, concept, concepts, judge_key_env, judge_concurrency)
    assert cfg is not None
    meta = read_meta(run)
    results = EvalResults.read(run)
    if not results.prompts:
        raise MelboError(f"{run} holds no completions to judge: run `melbo eval {run}` first")
    base = 0 if meta.records and (meta.records[0].base or meta.kind in ("ortho", "post-dump")) else None
    run_judge(results, cfg, (meta.prompts or list(results.prompts))[0], base, lambda: results.save(run))
    console.print(f"results: [bold]{run / EVAL_FILE}[/bold] (judge)")


def run_judge(results: EvalResults, cfg: JudgeConfig, run_prompt: str, base: int | None, save: Callable[[], None]) -> JudgeResults:
    """Judge, with a progress line, and print what the judge says per concept."""
    from melbo.analysis.judge import judge_run

    with err_console.status(f"asking the judge at {cfg.host}…") as status:
        judged = judge_run(results, cfg, run_prompt, base, save, on_progress=lambda done, total: status.update(f"judge: {done}/{total} ratings"))
    tables.show(tables.judged(judged, run_prompt, base, results))
    return judged


@app.command()
def compose(
    run: opt.OrthoRun,
    k: Annotated[str, typer.Option("--k", help="Comma-separated k.")] = ",".join(map(str, C.ks)),
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Default: the run's first prompt.")] = None,
    max_new_tokens: opt.NewTokens = C.max_new_tokens,
    model: opt.Model = None, device: opt.Device = "auto", dtype: opt.Dtype = None,
) -> None:
    """Steer with the mean of the first k vectors (plain, ×√k, rescaled to ‖θ0‖) and with each vector at ‖θ0‖."""
    from melbo.analysis import compose as engine
    from melbo.files.runs import COMPOSE_FILE, read_run
    from melbo.model.prompts import DEFAULT_PROMPT

    record = read_run(run)
    try:
        ks = [int(x) for x in k.split(",")]
    except ValueError as exc:
        raise MelboError(f"--k {k!r}: give whole numbers separated by commas, e.g. 1,2,5,10") from exc
    text = prompt or (record.meta.prompts or [DEFAULT_PROMPT])[0]
    lm, fmt = load_for_run(record, model, device, dtype)
    with err_console.status("composing…"):
        results = engine.compose(lm, record, ks, text, fmt, max_new_tokens)
    tables.show(tables.composed(results, text))
    console.print(f"results: [bold]{run / COMPOSE_FILE}[/bold]")


@app.command("probe")
def probe_command(
    run: opt.Run,
    prompt: opt.Prompts = None, prompt_file: opt.PromptFile = None,
    prompt_set: Annotated[str, typer.Option(help="Shipped prompts to use when none is given: coding, harmful, neutral, chit-chat.")] = P.prompt_set,
    max_new_tokens: opt.NewTokens = P.max_new_tokens,
    random_directions: Annotated[int, typer.Option(min=2, help="Random directions for the baseline.")] = P.random_directions,
    show: Annotated[int, typer.Option(help="Rows printed.")] = 20,
    model: opt.Model = None, device: opt.Device = "auto", dtype: opt.Dtype = None,
) -> None:
    """Are the vectors present in the residual stream when the unsteered model shows the behaviour itself?"""
    from melbo.analysis import probe as engine
    from melbo.files.runs import PROBE_FILE, read_run
    from melbo.model.prompts import shipped_prompts

    record = read_run(run)
    prompts = run_prompts(prompt, prompt_file) if (prompt or prompt_file) else shipped_prompts(prompt_set)
    lm, fmt = load_for_run(record, model, device, dtype)
    with err_console.status(f"letting the model answer {len(prompts)} prompts…"):
        results = engine.probe(lm, record, prompts, fmt, max_new_tokens, random_directions)
    tables.show(tables.presence(results, show))
    console.print(f"results: [bold]{run / PROBE_FILE}[/bold]")


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="A run folder (melbo's own, or one made by `melbo import-post-dump`).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="The page to write (default RUN/report.html).")] = None,
) -> None:
    """One self-contained HTML page for a run: header, plots (also saved as RUN/plots/*.png), every vector's outputs."""
    from melbo.files.runs import PLOTS_FOLDER
    from melbo.report import write_report

    if out is not None and out.is_dir():
        raise MelboError(f"--out {out} is a folder: give the file to write, e.g. {out / 'report.html'}")
    with err_console.status("writing the report…"):
        page = write_report(run, out)
    console.print(f"report: [bold]{page}[/bold]  (plots also in {run / PLOTS_FOLDER})")
