"""Commands that look at a model and find vectors: ``info``, ``generate``, ``discover``, ``ortho``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from melbo.cli.app import (
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    ModelOpt,
    NewTokensOpt,
    OutOpt,
    PromptFileOpt,
    PromptOpt,
    PromptsOpt,
    RawOpt,
    ResumeOpt,
    SystemOpt,
    app,
    block_progress,
    console,
    err_console,
    interruptible,
    load,
    log_line,
    make_table,
    out_folder,
    prompt_format,
    run_model,
    run_prompts,
    short,
)
from melbo.engines.config import DiscoverConfig, OrthoConfig
from melbo.errors import MelboError
from melbo.model.prompts import DEFAULT_PROMPT

D, OC = DiscoverConfig(), OrthoConfig()  # the defaults every option below shows


@app.command()
def info(
    model: ModelOpt = None,
    prompt: PromptOpt = DEFAULT_PROMPT,
    system: SystemOpt = None,
    chat_template: RawOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """Layers, d_model and the residual-norm profile per layer: what you need to choose s, t and R."""
    from melbo.model.forward import residual_norms
    from melbo.model.prompts import encode_prompt

    lm = load(model, device, dtype)
    ids = encode_prompt(lm.tokenizer, prompt, prompt_format(system, chat_template), lm.device)
    rows = residual_norms(lm.model, ids)
    described = lm.describe()
    console.print(
        f"[bold]{lm.name}[/bold] ({described['class']}): {lm.n_layers} layers (0 to {lm.n_layers - 1}), "
        f"d_model {lm.d_model}, {described['dtype']} on {lm.device}; prompt = {ids.shape[1]} tokens"
    )
    table = Table(title="Residual-stream norm after each block")
    for column in ("layer", "first token", "median of the rest", "max of the rest", ""):
        table.add_column(column, justify="right")
    for row in rows:
        flag = f"[red]sink ×{row.first_token / row.median_rest:.0f}[/red]" if row.sink else ""
        table.add_row(str(row.layer), f"{row.first_token:,.1f}", f"{row.median_rest:,.1f}", f"{row.max_rest:,.1f}", flag)
    console.print(table)
    if any(row.sink for row in rows):
        console.print(
            "[yellow]The first token is an attention sink on the flagged layers: melbo's losses skip it by default "
            "(--positions all to include it).[/yellow]"
        )
    console.print(
        "melbo discover chooses s (about a third of the way in), t (about two thirds in) and R itself: the largest R at "
        "which most trained vectors stay fluent, a fraction of the norm at s that differs between models "
        "(melbo discover --calibrate shows the search; --radii gives the candidates yourself)."
    )


@app.command()
def generate(
    run: Annotated[Path | None, typer.Option(help="A run folder holding the vector.")] = None,
    index: Annotated[int, typer.Option(help="Which vector of the run (row of vectors.safetensors).")] = 0,
    vector: Annotated[Path | None, typer.Option(help="A vector file (.safetensors or the post's .pt); row --index.")] = None,
    layer: Annotated[int | None, typer.Option(help="Layer to add the vector after (default: the run's source layer).")] = None,
    scale: Annotated[float, typer.Option(help="Multiply the vector by this.")] = 1.0,
    prompt: PromptOpt = DEFAULT_PROMPT,
    max_new_tokens: NewTokensOpt = 48,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    seed: int = 0,
    model: ModelOpt = None,
    system: SystemOpt = None,
    chat_template: RawOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """Generate with and without a steering vector, side by side."""
    from melbo.files.runs import read_run
    from melbo.files.vectors import load_vector_file, validate_vectors
    from melbo.model.forward import generate_steered
    from melbo.model.layers import check_layer
    from melbo.model.prompts import encode_prompt

    if (run is None) == (vector is None):
        raise MelboError("give exactly one of --run RUN (with --index) or --vector FILE")
    run_format = None
    if run is not None:
        record = read_run(run)
        model = model or run_model(record)
        layer = record.source_layer if layer is None else layer
        run_format = record.meta.prompt_format
        vectors = record.vectors
    else:
        assert vector is not None  # one of the two is given (checked above)
        vectors = load_vector_file(vector)
    if layer is None:
        raise MelboError("--layer is needed with --vector (the layer the vector is added after)")
    lm = load(model, device, dtype)
    vectors = validate_vectors(vectors, str(run or vector), lm.d_model)
    if not 0 <= index < vectors.shape[0]:
        raise MelboError(f"--index {index}: the file has vectors 0 to {vectors.shape[0] - 1}")
    check_layer(lm.model, layer, "--layer")
    ids = encode_prompt(lm.tokenizer, prompt, prompt_format(system, chat_template, run_format), lm.device)
    theta = (vectors[index] * scale).to(lm.device)
    options: dict[str, Any] = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    plain = generate_steered(lm.model, lm.tokenizer, ids, None, layer, **options)[0]
    steered = generate_steered(lm.model, lm.tokenizer, ids, theta[None], layer, **options)[0]
    table = Table(title=f"{prompt!r}: vector {index} (norm {float(theta.norm()):.2f}) added after layer {layer}", show_lines=True)
    table.add_column("unsteered", ratio=1)
    table.add_column("steered", ratio=1)
    table.add_row(plain, steered)
    console.print(table)


@app.command()
def discover(
    count: Annotated[int, typer.Option("--count", "-k", help="K: number of vectors.")] = D.count,
    source: Annotated[int | None, typer.Option("--source", "-s", help="Layer s: add the vector after block s (default: about a third of the way in).")] = D.source,
    target: Annotated[int | None, typer.Option("--target", "-t", help="Layer t: measure the change after block t (default: about two thirds in).")] = D.target,
    radius: Annotated[str, typer.Option("--radius", "-R", help="R: the norm of every vector, or auto: the largest R at which most vectors stay fluent.")] = str(D.radius),
    power: Annotated[float, typer.Option("--power", help="p: power on each position's change.")] = D.p,
    root: Annotated[float, typer.Option("--root", help="q: root of the sum over positions.")] = D.q,
    steps: Annotated[int, typer.Option(help="Adam steps per block.")] = D.steps,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default 0.01·R/√d_model).")] = D.lr,
    block: Annotated[int, typer.Option(help="Vectors trained together (1 = the original one-at-a-time MELBO).")] = D.block,
    positions: Annotated[str, typer.Option(help="skip-first (position 0 is often an attention sink), all, or last:N.")] = D.positions,
    seed: int = D.seed,
    completion_tokens: Annotated[int, typer.Option(help="Greedy tokens stored per vector on the first prompt.")] = D.completion_tokens,
    calibrate: Annotated[bool, typer.Option("--calibrate", help="Only choose R (as -R auto does) and print the table.")] = False,
    radii: Annotated[str | None, typer.Option(help="With -R auto or --calibrate: candidate R values to try, comma-separated.")] = None,
    prompt: PromptsOpt = None,
    prompt_file: PromptFileOpt = None,
    out: OutOpt = None,
    force: ForceOpt = False,
    resume: ResumeOpt = False,
    model: ModelOpt = None,
    system: SystemOpt = None,
    chat_template: RawOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """MELBO: learn K orthogonal steering vectors of norm R that change layer t the most."""
    from melbo.engines import discover as engine
    from melbo.engines.config import RadiusConfig

    prompts = run_prompts(prompt, prompt_file)
    cfg = DiscoverConfig(
        source=source, target=target, radius=_parse_radius(radius), count=count, p=power, q=root, steps=steps, lr=lr,
        block=block, seed=seed, positions=positions, completion_tokens=completion_tokens,
    )
    cfg.check()
    radius_cfg = RadiusConfig(radii=_parse_radii(radii)) if radii else RadiusConfig()
    if radii and not (cfg.auto_radius or calibrate):
        raise MelboError("--radii are the candidates of -R auto (or --calibrate); with -R set to a number there is nothing to choose")
    radius_cfg.check()
    fmt = prompt_format(system, chat_template)
    if calibrate:
        lm = load(model, device, dtype)
        cfg.check(lm.n_layers, lm.d_model)
        with err_console.status("choosing R…"):
            choice = engine.calibrate(lm, prompts, cfg, fmt, radius_cfg, print_probe)
        print_radius_choice(choice)
        return
    folder = out_folder(out, "discover", force, resume)
    lm = load(model, device, dtype)
    cfg.check(lm.n_layers, lm.d_model)
    progress, on_step = block_progress(-(-count // block), steps, "discover")
    if cfg.auto_radius and not resume:
        err_console.print("[dim]-R auto: trying a few R on 4 vectors each (about a quarter of the discovery's time)…[/dim]")
    with progress, interruptible(folder):
        run = engine.discover(
            lm, prompts, cfg, fmt, out=folder, on_step=on_step, resume=resume, radius_cfg=radius_cfg, on_radius=print_radius_choice,
            on_probe=print_probe,
        )
    source_used, target_used = run.meta.source, run.meta.target
    table = make_table(f"{count} vectors, R = {run.meta.R:g}, layer {source_used} → {target_used}", (("#", "right"), ("loss", "right"), ("label", "left"), ("completion on the first prompt", "left")))
    from melbo.labels import label

    for record in run.records:
        table.add_row(str(record.index), f"{record.loss:,.4g}", label(record.completion or "")[0], short(record.completion))
    console.print(table)
    console.print(f"run folder: [bold]{folder}[/bold]")


def print_probe(probe: Any) -> None:
    """One line per candidate R as it is measured (a search below or above the range can take a while)."""
    log_line(f"-R auto: R {probe.radius:g}: {probe.fluent}/{probe.vectors} fluent, median NLL {probe.median_nll:.2f}, "
             f"first-token KL {probe.median_effect:.2f}")


def print_radius_choice(choice: Any) -> None:
    """The calibration table of -R auto / --calibrate, and the choice with its reason."""
    table = make_table(f"Choosing R: {choice.probes[0].vectors} vectors per R, fluent = NLL ≤ 4 under the unsteered model and not degenerate", (("R", "right"), ("× norm", "right"), ("fluent", "right"), ("NLL", "right"), ("first-token KL", "right"),
                            ("labels", "left"), ("openings", "right"), ("a completion", "left")))
    for p in choice.probes:
        mark = "[bold green]" if p.radius == choice.radius else ""
        labels = ", ".join(f"{k} {v}" for k, v in sorted(p.labels.items(), key=lambda kv: -kv[1]))
        table.add_row(f"{mark}{p.radius:g}", f"{p.radius / choice.norm_at_source:.3g}", f"{p.fluent}/{p.vectors}", f"{p.median_nll:.2f}",
                      f"{p.median_effect:.2f}", labels, str(p.openings), short(p.sample, 60))
    console.print(table)
    console.print(f"[bold]R = {choice.radius:g}[/bold]: {choice.reason} ({choice.seconds:.0f} s)")


def _parse_radius(value: str) -> float | str:
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError as exc:
        raise MelboError(f"-R {value!r}: give a positive number or auto") from exc


def _parse_radii(radii: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in radii.split(",") if x.strip())
    except ValueError as exc:
        raise MelboError(f"--radii {radii!r}: give numbers separated by commas, e.g. 10,20,40") from exc
    if not values or any(not (v > 0 and v < float("inf")) for v in values):
        raise MelboError(f"--radii {radii!r}: every candidate R must be a positive number")
    return values


@app.command()
def ortho(
    base: Annotated[Path, typer.Argument(help="A run folder, or a vector file (.safetensors or the post's .pt).")],
    index: Annotated[int, typer.Option(help="Which vector of BASE is θ0.")] = 0,
    mode: Annotated[str, typer.Option(help="fast (blocks, cached layers, early stop) or seed (the post's algorithm as written).")] = OC.mode,
    count: Annotated[int | None, typer.Option(help="Vectors to find (default: until the basis is exhausted).")] = OC.count,
    source: Annotated[int | None, typer.Option("--source", "-s", help="Layer s (default: the run's).")] = None,
    target: Annotated[int | None, typer.Option("--target", "-t", help="Layer t (default: the run's).")] = None,
    block: Annotated[int | None, typer.Option(help="Vectors optimised together (fast: 16; seed: 1).")] = OC.block,
    steps: Annotated[int | None, typer.Option(help="Evaluations per block (fast: at most 30 with lbfgs and match kl, 60 with mean or each, 150 with adam; seed: 1000).")] = OC.steps,
    lr: Annotated[float | None, typer.Option(help="Adam's learning rate; lbfgs's first step is lr·√d (fast: 0.25·‖θ0‖/√d; seed: 0.01).")] = OC.lr,
    optimizer: Annotated[str | None, typer.Option(help="Fast mode: lbfgs (default, one L-BFGS per vector) or adam.")] = OC.optimizer,
    penalty: Annotated[float, typer.Option(help="λ of an extra λ‖θ‖² term (the post's proposed test).")] = OC.penalty,
    plateau: Annotated[float, typer.Option(min=0.0, help="Fast mode: stop a block when 10 steps gain less than this fraction (0: never).")] = OC.plateau,
    positions: Annotated[str | None, typer.Option(help="last:20 (fast default: the last 4 prompt tokens and the 16 of θ0's continuation), all (seed default), skip-first or last:N.")] = OC.positions,
    min_norm: Annotated[float | None, typer.Option(help="Vectors at or below this norm are dropped (fast: 1.5 % of ‖θ0‖; seed: 0.1).")] = OC.min_norm,
    stop_after_dropped: Annotated[int | None, typer.Option(help="This many dropped in a row: the basis is exhausted (fast: a block; seed: 5).")] = OC.stop_after_dropped,
    init_scale: Annotated[float, typer.Option(help="Fast mode: the first block starts at this × ‖θ0‖.")] = OC.init_scale,
    match: Annotated[str | None, typer.Option(help="What each copy matches: kl (fast default: θ0's next-token distributions), mean (seed default: the residual after t, averaged over positions) or each (position by position).")] = OC.match,
    continuation: Annotated[int | None, typer.Option(min=0, help="Also match along θ0's own first N greedy tokens (fast: 16; seed: 0).")] = OC.continuation,
    seed: int = OC.seed,
    completion_tokens: Annotated[int, typer.Option(help="Greedy tokens stored per vector on the first prompt.")] = OC.completion_tokens,
    prompt: PromptsOpt = None,
    prompt_file: PromptFileOpt = None,
    prompt_set: Annotated[str | None, typer.Option(help="Also train on melbo's shipped prompts (θ0's continuation on each): harmful, neutral, coding, chit-chat or all.")] = None,
    extra_prompts: Annotated[int, typer.Option(min=0, help="Also train on this many shipped prompts (never the controls' held-out ones): θ0's text likelier off your prompt, its label kept less often on it, 2–4× the cost (default 0).")] = OC.extra_prompts,
    first_weight: Annotated[float | None, typer.Option(help="With several prompts: the first prompt's share of the loss (default: all equal).")] = OC.first_weight,
    out: OutOpt = None,
    force: ForceOpt = False,
    resume: ResumeOpt = False,
    model: ModelOpt = None,
    system: SystemOpt = None,
    chat_template: RawOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """MELBO-ortho: vectors orthogonal to θ0 and to each other that reproduce θ0's effect (on every prompt given)."""
    from melbo.engines import ortho as engine
    from melbo.files.runs import read_run
    from melbo.files.vectors import load_vector_file

    base_info: dict[str, Any] = {"from": str(base), "index": index}
    run_format = None
    if base.is_dir():
        record = read_run(base)
        vectors = record.vectors
        source = record.source_layer if source is None else source
        target = record.target_layer if target is None else target
        model = model or run_model(record)
        run_format = record.meta.prompt_format
        prompts = run_prompts(prompt, prompt_file, record.meta.prompts)
        if index < len(record.records):
            base_info["completion"] = record.records[index].completion
    else:
        vectors = load_vector_file(base)
        prompts = run_prompts(prompt, prompt_file)
    if prompt_set:
        from melbo.model.prompts import shipped_prompts

        prompts = list(dict.fromkeys([*prompts, *shipped_prompts(prompt_set)]))
    if source is None or target is None:
        raise MelboError("--source and --target are needed with a vector file (the layers θ0 was made for)")
    if not 0 <= index < vectors.shape[0]:
        raise MelboError(f"--index {index}: {base} has vectors 0 to {vectors.shape[0] - 1}")
    cfg = OrthoConfig(
        source=source, target=target, mode=mode, count=count, block=block, steps=steps, lr=lr, penalty=penalty,
        positions=positions, seed=seed, completion_tokens=completion_tokens, plateau=plateau, optimizer=optimizer,
        min_norm=min_norm, stop_after_dropped=stop_after_dropped, init_scale=init_scale, match=match, continuation=continuation,
        extra_prompts=extra_prompts, first_weight=first_weight,
    )
    cfg.check()
    folder = out_folder(out, "ortho", force, resume)
    lm = load(model, device, dtype)
    cfg.check(lm.n_layers, lm.d_model)
    settings = cfg.resolved(float(vectors[index].norm()), lm.d_model, lm.n_layers)
    progress, on_step = block_progress(-(-settings.count // settings.block), settings.steps, f"ortho ({mode})")
    with progress, interruptible(folder):
        run = engine.ortho(
            lm, vectors[index], prompts, cfg, prompt_format(system, chat_template, run_format), out=folder, on_step=on_step,
            base_info=base_info, resume=resume,
        )
    print_ortho_table(run)
    console.print(f"run folder: [bold]{folder}[/bold]")


def print_ortho_table(run: Any, limit: int = 200) -> None:
    """Index, norm, KL to the base and completion of a MELBO-ortho run's vectors, and its summary line."""
    from melbo.objectives import max_abs_cosine

    table = make_table(f"MELBO-ortho: {run.vectors.shape[0] - 1} vectors orthogonal to θ0 (row 0)", (("#", "right"), ("norm", "right"), ("KL to base", "right"), ("completion", "left")))
    for record in run.records[:limit]:
        table.add_row(str(record.index), f"{record.norm:.1f}", f"{record.kl:.3f}", short(record.completion, 90))
    console.print(table)
    if run.kls:
        console.print(
            f"KL(P_i ‖ P_base) at the last prompt token: median {run.median_kl:.3f}, max {max(run.kls):.3f}; "
            f"max |cos| between any two vectors {max_abs_cosine(run.vectors):.1e}; stopped: {run.meta.stopped}"
        )
