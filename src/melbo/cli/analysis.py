"""Commands that study a run: ``eval``, ``compose``, ``probe`` and ``report``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from melbo.analysis.config import ComposeConfig, EvalConfig, ProbeConfig
from melbo.analysis.judge import JudgeConfig
from melbo.cli import options as opt
from melbo.cli.app import app, interruptible, load
from melbo.errors import MelboError
from melbo.output import tables
from melbo.output.live import console, err_console

if TYPE_CHECKING:
    from melbo.analysis.evaluate import EvalResults
    from melbo.analysis.judge import JudgeResults

C, J = ComposeConfig(), JudgeConfig()  # the defaults the options below show


@app.command("eval")
@opt.config_options(EvalConfig, before="prompt")
def eval_command(
    run: opt.Run,
    index: opt.Indices = "all",
    prompt: opt.Prompts = None, prompt_file: opt.PromptFile = None,
    prompt_set: Annotated[str | None, typer.Option(help="Also evaluate melbo's shipped prompts: all, harmful, neutral, coding, chit-chat.")] = None,
    labels: Annotated[Path | None, typer.Option(help="Your own labels (JSON or TOML: name + pattern, or name + python FILE:FUNCTION).")] = None,
    judge: opt.Judge = None, judge_model: opt.JudgeModel = J.model, concept: opt.Concept = None, concepts: opt.Concepts = None, judge_key_env: opt.JudgeKey = J.key_env, judge_concurrency: opt.JudgeConcurrency = J.concurrency, judge_timeout: opt.JudgeTimeout = J.timeout,
    show: opt.Show = 40,
    model: opt.Model = None, device: opt.Device = "auto", dtype: opt.Dtype = None,
    *, cfg: EvalConfig,
) -> None:
    """Steered completions, first-token top-10 and KL to the base, labels and checks, stored in RUN/eval.json."""
    from melbo.analysis.controls import check_controls
    from melbo.analysis.evaluate import eval_prompts, evaluate
    from melbo.files.interop import parse_indices
    from melbo.files.runs import EVAL_FILE, read_run
    from melbo.labels import RULES, load_rules
    from melbo.model.prompts import read_prompts

    record = read_run(run)
    indices = parse_indices(index, record.vectors.shape[0])
    extra = read_prompts(prompt, prompt_file, [], prompt_set)
    judging = JudgeConfig.from_options(judge, judge_model, concept, concepts, judge_key_env, judge_concurrency, judge_timeout)
    if cfg.controls:
        check_controls(record, indices)
    prompts = eval_prompts(record, extra, cfg.controls)
    rules = load_rules(labels) if labels else RULES
    lm = load(model, device, dtype, record)
    with interruptible(run):
        results = evaluate(lm, record, prompts, indices, cfg, rules=rules)  # in the run's prompt format
    tables.show(tables.evaluation(results, prompts, indices, show))
    judged = None
    if judging is not None:
        judged = run_judge(results, judging, prompts[0], record.meta.base_row, lambda: results.save(record))
    if results.controls is not None:
        tables.show(tables.controls(results.controls, judged))
    console.print(f"results: [bold]{run / EVAL_FILE}[/bold]")


@app.command("judge")
def judge_command(
    run: Annotated[Path, typer.Argument(help="A run folder with an eval.json (melbo eval, or melbo import-post-dump).")],
    judge: opt.Judge = None, judge_model: opt.JudgeModel = J.model, concept: opt.Concept = None, concepts: opt.Concepts = None, judge_key_env: opt.JudgeKey = J.key_env, judge_concurrency: opt.JudgeConcurrency = J.concurrency, judge_timeout: opt.JudgeTimeout = J.timeout,
) -> None:
    """Rate the completions a run's eval holds with an LLM judge (concept, instruction, fluency: 0–2 each); no model loads."""
    from melbo.analysis.evaluate import EvalResults
    from melbo.files.runs import EVAL_FILE, read_meta

    judging = JudgeConfig.from_options(judge, judge_model, concept, concepts, judge_key_env, judge_concurrency, judge_timeout)
    if judging is None:
        raise MelboError("melbo judge needs --judge URL: an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    meta = read_meta(run)
    results = EvalResults.read(run)
    if not results.prompts:
        raise MelboError(f"{run} holds no completions to judge: run `melbo eval {run}` first")
    run_judge(results, judging, (meta.prompts or list(results.prompts))[0], meta.base_row, lambda: results.save(run))
    console.print(f"results: [bold]{run / EVAL_FILE}[/bold] (judge)")


def run_judge(results: EvalResults, cfg: JudgeConfig, run_prompt: str, base: int | None, save: Callable[[], None]) -> JudgeResults:
    """Judge, with a progress line, and print what the judge says per concept."""
    from melbo.analysis.judge import judge_run

    judged = judge_run(results, cfg, run_prompt, base, save)
    tables.show(tables.judged(judged, run_prompt, base, results))
    return judged


@app.command()
def compose(
    run: opt.OrthoRun,
    k: Annotated[str, typer.Option("--k", help="Comma-separated k: means of the first k vectors (a k beyond the run's vectors: all of them).")] = ",".join(map(str, C.ks)),
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Default: the run's first prompt.")] = None,
    max_new_tokens: opt.NewTokens = C.max_new_tokens,
    model: opt.Model = None, device: opt.Device = "auto", dtype: opt.Dtype = None,
) -> None:
    """Steer with the mean of the first k vectors (plain, ×√k, rescaled to ‖θ0‖) and with each vector at ‖θ0‖."""
    from melbo.analysis import compose as engine
    from melbo.files.runs import COMPOSE_FILE, read_run

    record, ks = read_run(run), ComposeConfig.parse_ks(k)
    engine.check_composable(record)  # before the model loads
    lm = load(model, device, dtype, record)
    results = engine.compose(lm, record, ks, prompt or None, max_new_tokens=max_new_tokens)  # the run's prompt and format
    tables.show(tables.composed(results, results.prompt))
    console.print(f"results: [bold]{run / COMPOSE_FILE}[/bold]")


@app.command("probe")
@opt.config_options(ProbeConfig, before="show")
def probe_command(
    run: opt.Run,
    prompt: opt.Prompts = None, prompt_file: opt.PromptFile = None,
    show: opt.Show = 20,
    model: opt.Model = None, device: opt.Device = "auto", dtype: opt.Dtype = None,
    *, cfg: ProbeConfig,
) -> None:
    """Are the vectors present in the residual stream when the unsteered model shows the behaviour itself?"""
    from melbo.analysis import probe as engine
    from melbo.files.runs import PROBE_FILE, read_run
    from melbo.model.prompts import read_prompts, shipped_prompts

    record = read_run(run)
    prompts = read_prompts(prompt, prompt_file, default=shipped_prompts(cfg.prompt_set))
    lm = load(model, device, dtype, record)
    results = engine.probe(lm, record, prompts, max_new_tokens=cfg.max_new_tokens, random_directions=cfg.random_directions)  # in the run's format
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

    with err_console.status("writing the report…"):
        page = write_report(run, out)
    console.print(f"report: [bold]{page}[/bold]  (plots also in {run / PLOTS_FOLDER})")
