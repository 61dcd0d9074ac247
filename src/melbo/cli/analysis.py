"""Commands that study a run: ``eval``, ``compose``, ``probe`` and ``report``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from melbo.analysis.config import ComposeConfig, EvalConfig, ProbeConfig
from melbo.analysis.judge import JudgeConfig
from melbo.cli.app import (
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    NewTokensOpt,
    OrthoRunArg,
    PromptFileOpt,
    PromptsOpt,
    RunArg,
    app,
    console,
    err_console,
    interruptible,
    load_for_run,
    make_table,
    short,
)
from melbo.errors import MelboError

if TYPE_CHECKING:
    from melbo.analysis.controls import Controls
    from melbo.analysis.evaluate import EvalResults
    from melbo.analysis.judge import ConceptSummary, JudgeResults

E, C, P, J = EvalConfig(), ComposeConfig(), ProbeConfig(), JudgeConfig()  # the defaults the options below show

# The judge's options, shared by `eval` and `judge`.
JudgeOpt = Annotated[str | None, typer.Option("--judge", metavar="URL", help="Rate every completion with the OpenAI-compatible chat endpoint at URL (http/https), AxBench-style.")]
JudgeModelOpt = Annotated[str | None, typer.Option("--judge-model", help="The judge model (default: the first the endpoint lists).")]
ConceptOpt = Annotated[list[str] | None, typer.Option("--concept", help="A concept to rate (repeatable): code, alien, stem-problem, jailbreak, or 'name: description'.")]
ConceptsOpt = Annotated[Path | None, typer.Option("--concepts", help="Concepts from a TOML/JSON file: name + description.")]
JudgeKeyOpt = Annotated[str, typer.Option("--judge-key-env", help="Environment variable holding the judge's API key (never stored or printed).")]
JudgeConcurrencyOpt = Annotated[int, typer.Option("--judge-concurrency", min=1, help="Requests to the judge at once.")]


def judge_config(url: str | None, model: str | None, concept: list[str] | None, concepts: Path | None, key_env: str, concurrency: int) -> JudgeConfig | None:
    """The judge's settings from the shared options (checked), or None without --judge."""
    if url is None:
        if concept or concepts or model:
            raise MelboError("--concept, --concepts and --judge-model go with --judge URL")
        return None
    cfg = JudgeConfig(url=url, model=model, concepts=list(concept) if concept else ([] if concepts else list(J.concepts)),
                      concepts_file=str(concepts) if concepts else None, key_env=key_env, concurrency=concurrency)
    cfg.check()
    return cfg


@app.command("eval")
def eval_command(
    run: RunArg,
    index: Annotated[str, typer.Option(help="Vectors: all, 3, 0-99 or 1,4,7.")] = "all",
    prompt: PromptsOpt = None,
    prompt_file: PromptFileOpt = None,
    max_new_tokens: NewTokensOpt = E.max_new_tokens,
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
    judge: JudgeOpt = None,
    judge_model: JudgeModelOpt = J.model,
    concept: ConceptOpt = None,
    concepts: ConceptsOpt = None,
    judge_key_env: JudgeKeyOpt = J.key_env,
    judge_concurrency: JudgeConcurrencyOpt = J.concurrency,
    show: Annotated[int, typer.Option(help="Rows of the table printed.")] = 40,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """Steered completions, first-token top-10 and KL to the base, labels and checks, stored in RUN/eval.json."""
    from melbo.analysis.controls import check_controls
    from melbo.analysis.evaluate import eval_prompts, evaluate
    from melbo.cli.app import run_prompts
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
    judging = judge_config(judge, judge_model, concept, concepts, judge_key_env, judge_concurrency)
    if controls:
        check_controls(record)
    prompts = eval_prompts(record, extra, controls)
    rules = load_rules(labels) if labels else RULES
    lm, fmt = load_for_run(record, model, device, dtype)
    with err_console.status("evaluating…") as status, interruptible(run):
        results = evaluate(
            lm, record, prompts, indices, cfg, fmt, rules=rules,
            on_batch=lambda p, done, total: status.update(f"evaluating {p[:30]!r}: {done}/{total} vectors"),
        )
    first = results.first_token(prompts[0])
    completions = results.completions(prompts[0], cfg.mode())
    table = make_table(f"{prompts[0]!r} ({cfg.mode()}); KL = KL(P_i ‖ P_{base}) at the last prompt token", (("#", "right"), ("norm", "right"), ("KL", "right"), ("label", "left"), ("top-3", "left"), ("completion", "left")))
    for i in indices[:show]:
        out = completions[i][0]
        top = " ".join(repr(t) for t, _ in first[i].top[:3])
        table.add_row(str(i), f"{results.norms[i]:.1f}", f"{first[i].kl:.3f}", out.label, top, short(out.text, 70))
    console.print(table)
    console.print(
        "labels per hundred vectors: "
        + "; ".join(f"{c['from']}+: " + ", ".join(f"{k} {v}" for k, v in c.items() if k != "from") for c in results.label_counts(prompts[0], cfg.mode()))
    )
    median, peak = results.kl_summary(prompts[0], indices, base)
    console.print(f"KL to vector {base} (other vectors): median {median:.3f}, max {peak:.3f}; max |cos| over all pairs {results.max_abs_cos:.1e}")
    if record.records and record.records[base].base:  # a MELBO-ortho run: do the copies keep θ0's behaviour?
        share = results.behaviour_share(prompts[0], cfg.mode(), base)
        held = results.behaviour_share(prompts[1:], cfg.mode(), base, label_from=prompts[0]) if len(prompts) > 1 else None
        console.print(
            f"behaviour share: {share:.0%} of the copies' completions carry the base's label "
            f"{results.base_label(prompts[0], cfg.mode(), base)!r} on the run's prompt"
            + (f", {held:.0%} on the {len(prompts) - 1} held-out prompt(s)" if held is not None else "")
        )
    summary = results.generalisation
    if len(prompts) > 1 and summary:
        shares = sorted(summary.share.values())
        best = sorted(summary.share.items(), key=lambda kv: -kv[1])[:5]
        console.print(
            f"generalisation over {len(prompts) - 1} held-out prompts: share producing the base label "
            f"({summary.base_label!r}): median {shares[len(shares) // 2]:.0%}; highest: " + ", ".join(f"#{i} {v:.0%}" for i, v in best)
        )
    judged = None
    if judging is not None:
        judged = run_judge(results, judging, prompts[0], base if record.records and record.records[base].base else None,
                           lambda: results.save(record))
    if results.controls is not None:
        print_controls(results.controls, judged)
    console.print(f"results: [bold]{run / EVAL_FILE}[/bold]")


@app.command("judge")
def judge_command(
    run: Annotated[Path, typer.Argument(help="A run folder with an eval.json (melbo eval, or melbo import-post-dump).")],
    judge: JudgeOpt = None,
    judge_model: JudgeModelOpt = J.model,
    concept: ConceptOpt = None,
    concepts: ConceptsOpt = None,
    judge_key_env: JudgeKeyOpt = J.key_env,
    judge_concurrency: JudgeConcurrencyOpt = J.concurrency,
) -> None:
    """Rate the completions a run's eval holds with an LLM judge (concept, instruction, fluency: 0–2 each); no model loads."""
    from melbo.analysis.evaluate import EvalResults
    from melbo.files.runs import EVAL_FILE, read_meta

    if judge is None:
        raise MelboError("melbo judge needs --judge URL: an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    cfg = judge_config(judge, judge_model, concept, concepts, judge_key_env, judge_concurrency)
    assert cfg is not None
    meta = read_meta(run)
    results = EvalResults.read(run)
    if not results.prompts:
        raise MelboError(f"{run} holds no completions to judge: run `melbo eval {run}` first")
    base = 0 if meta.records and (meta.records[0].base or meta.kind in ("ortho", "post-dump")) else None
    run_judge(results, cfg, (meta.prompts or list(results.prompts))[0], base, lambda: results.save(run))
    console.print(f"results: [bold]{run / EVAL_FILE}[/bold] (judge)")


def run_judge(results: EvalResults, cfg: JudgeConfig, run_prompt: str, base: int | None, save: Callable[[], None]) -> dict[str, ConceptSummary]:
    """Judge, with a progress line, and print what the judge says per concept; returns the per-concept summary."""
    from melbo.analysis.judge import judge_run

    with err_console.status(f"asking the judge at {cfg.host}…") as status:
        judged = judge_run(results, cfg, run_prompt, base, save, on_progress=lambda done, total: status.update(f"judge: {done}/{total} ratings"))
    print_judge(judged, run_prompt, base, results)
    return judged.summary


def print_judge(judged: JudgeResults, run_prompt: str, base: int | None, results: EvalResults) -> None:
    """Per concept: copies rated 2, mean harmonic score per source, agreement with the regex label, and per hundred vectors
    (beside melbo's regex label per hundred, where a regex label reads the concept: the post's code dump, for one)."""
    from melbo.analysis.judge import LABEL_OF_CONCEPT

    console.print(f"judge {judged.model!r} at {judged.host} (template {judged.template}; scores are only as good as the judge); "
                  f"{judged.requests_last_call} request(s) this call")
    for name, summary in judged.summary.items():
        means = ", ".join(f"{source} {value:.2f}" for source, value in summary.mean_harmonic.items())
        agree = "" if summary.label_agreement is None else f"; agrees with melbo's regex label {summary.label_agreement:.0%}"
        console.print(f"  {name}: {_or_dash(summary.share_concept_2, '{:.0%}')} of the copies rated 2 on the concept on {run_prompt!r}; "
                      f"mean harmonic score: {means or '—'}{agree}; {summary.unrated} rating(s) missing or unparsed")
        per_hundred = judged.rated_2_per_hundred(name, run_prompt, base)
        if len(per_hundred) > 1:
            console.print("    rated 2 per hundred vectors: " + "; ".join(f"{start}+: {value:.0%}" for start, value in per_hundred), soft_wrap=True)
            modes = list(results.prompts[run_prompt].completions) if run_prompt in results.prompts else []
            if name in LABEL_OF_CONCEPT and modes:
                regex = LABEL_OF_CONCEPT[name]
                shares = [(c["from"], c.get(regex, 0) / max(1, sum(v for k, v in c.items() if k != "from")))
                          for c in results.label_counts(run_prompt, "greedy" if "greedy" in modes else modes[0])]
                console.print(f"    melbo's regex label {regex!r} per hundred:  " + "; ".join(f"{start}+: {value:.0%}" for start, value in shares),
                              soft_wrap=True)


def print_controls(controls: Controls, judged: dict[str, ConceptSummary] | None = None) -> None:
    """The verdict table of ``melbo eval --controls``: one row per control (and the judge's mean harmonic score per
    concept, where the completions were judged), then the verdict."""
    table = Table(title=f"Controls: θ0's label on the run's prompt {controls.base[controls.run_prompt].label!r}; "
                        f"base NLL = θ0's first {controls.settings.get('nll_tokens', '?')} greedy tokens, nats/token, under each steering "
                        f"({len(controls.held_out)} held-out prompts)")
    concepts = list(judged or {})
    for column in ("control", "vectors", "norm", "behaviour share", "held-out agreement", "base NLL held out", "base NLL run prompt",
                   *(f"judge: {c}" for c in concepts)):
        table.add_column(column, justify="left" if column == "control" else "right")
    for r in controls.rows():
        table.add_row(r.name, str(len(r.vectors)), f"{r.norm:.1f}", _or_dash(r.behaviour_share, '{:.0%}'), _or_dash(r.held_out_agreement, '{:.0%}'),
                      _or_dash(r.base_nll, '{:.2f}'), _or_dash(r.base_nll_run_prompt, '{:.2f}'),
                      *(_or_dash((judged or {})[c].mean_harmonic.get(r.name), '{:.2f}') for c in concepts))
    console.print(table)
    console.print(f"verdict: {controls.verdict()}")


def _or_dash(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


@app.command()
def compose(
    run: OrthoRunArg,
    k: Annotated[str, typer.Option("--k", help="Comma-separated k.")] = ",".join(map(str, C.ks)),
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Default: the run's first prompt.")] = None,
    max_new_tokens: NewTokensOpt = C.max_new_tokens,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
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
    table = make_table(f"{text!r}: combinations of the found vectors (KL = KL(P ‖ P_θ0) at the last prompt token)", (("combination", "left"), ("norm", "right"), ("KL", "right"), ("label", "left"), ("completion", "left")))
    for r in results.combinations:
        table.add_row(r.name, _or_dash(r.norm, "{:.1f}"), _or_dash(r.kl, "{:.3f}"), r.label, short(r.text, 70))
    console.print(table)
    if results.single_median_kl is not None:
        console.print(f"each vector rescaled to ‖θ0‖: median KL {results.single_median_kl:.3f} (their own norms: see melbo eval)")
    console.print(f"results: [bold]{run / COMPOSE_FILE}[/bold]")


@app.command("probe")
def probe_command(
    run: RunArg,
    prompt: PromptsOpt = None,
    prompt_file: PromptFileOpt = None,
    prompt_set: Annotated[str, typer.Option(help="Shipped prompts to use when none is given: coding, harmful, neutral, chit-chat.")] = P.prompt_set,
    max_new_tokens: NewTokensOpt = P.max_new_tokens,
    random_directions: Annotated[int, typer.Option(min=2, help="Random directions for the baseline.")] = P.random_directions,
    show: Annotated[int, typer.Option(help="Rows printed.")] = 20,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """Are the vectors present in the residual stream when the unsteered model shows the behaviour itself?"""
    from melbo.analysis import probe as engine
    from melbo.cli.app import run_prompts
    from melbo.files.runs import PROBE_FILE, read_run
    from melbo.model.prompts import shipped_prompts

    record = read_run(run)
    prompts = run_prompts(prompt, prompt_file) if (prompt or prompt_file) else shipped_prompts(prompt_set)
    lm, fmt = load_for_run(record, model, device, dtype)
    with err_console.status(f"letting the model answer {len(prompts)} prompts…"):
        results = engine.probe(lm, record, prompts, fmt, max_new_tokens, random_directions)
    table = make_table(f"Presence after layer {results.layer} over {results.tokens} generated tokens (|cos|; z against random directions)",
                       (("#", "right"), ("mean |cos|", "right"), ("max |cos|", "right"), ("z", "right")))
    for r in results.vectors[:show]:
        table.add_row(str(r.index), f"{r.mean_abs_cos:.4f}", f"{r.max_abs_cos:.4f}", f"{r.z:+.1f}")
    console.print(table)
    console.print(
        f"random directions: mean |cos| {results.random.mean_abs_cos:.4f} ± {results.random.std:.4f}; "
        f"vectors: median z {results.median_z:+.1f}, {results.above(3)}/{len(results.vectors)} with z > 3"
    )
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
