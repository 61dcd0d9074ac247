"""Commands that look at a model and find vectors: ``info``, ``generate``, ``discover``, ``ortho``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from melbo.cli import options as opt
from melbo.cli.app import app, interruptible, load, out_folder, prompt_format, run_prompts
from melbo.engines.config import DiscoverConfig, OrthoConfig
from melbo.errors import MelboError
from melbo.model.prompts import DEFAULT_PROMPT
from melbo.output import tables
from melbo.output.live import block_progress, err_console, log_line

D, OC = DiscoverConfig(), OrthoConfig()  # the defaults every option below shows


@app.command()
def info(
    model: opt.Model = None,
    prompt: opt.Prompt = DEFAULT_PROMPT,
    system: opt.System = None,
    chat_template: opt.ChatTemplate = None,
    device: opt.Device = "auto",
    dtype: opt.Dtype = None,
) -> None:
    """Layers, d_model and the residual-norm profile per layer: what you need to choose s, t and R."""
    from melbo.model.forward import residual_norms
    from melbo.model.prompts import encode_prompt

    lm = load(model, device, dtype)
    ids = encode_prompt(lm.tokenizer, prompt, prompt_format(system, chat_template), lm.device)
    tables.show(tables.residual_norms(lm.name, lm.describe(), lm.n_layers, lm.d_model, str(lm.device), ids.shape[1], residual_norms(lm.model, ids)))


@app.command()
def generate(
    run: Annotated[Path | None, typer.Option(help="A run folder holding the vector.")] = None,
    index: Annotated[int, typer.Option(help="Which vector of the run (row of vectors.safetensors).")] = 0,
    vector: Annotated[Path | None, typer.Option(help="A vector file (.safetensors or the post's .pt); row --index.")] = None,
    layer: Annotated[int | None, typer.Option(help="Layer to add the vector after (default: the run's source layer).")] = None,
    scale: Annotated[float, typer.Option(help="Multiply the vector by this.")] = 1.0,
    prompt: opt.Prompt = DEFAULT_PROMPT,
    max_new_tokens: opt.NewTokens = 48,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    seed: int = 0,
    model: opt.Model = None, system: opt.System = None, chat_template: opt.ChatTemplate = None, device: opt.Device = "auto", dtype: opt.Dtype = None,
) -> None:
    """Generate with and without a steering vector, side by side."""
    if (run is None) == (vector is None):
        raise MelboError("give exactly one of --run RUN (with --index) or --vector FILE")
    from melbo.files.source import open_vectors
    from melbo.files.vectors import validate_vectors
    from melbo.model.forward import generate_steered
    from melbo.model.layers import check_layer
    from melbo.model.prompts import encode_prompt

    path = run or vector
    assert path is not None  # one of the two (checked above)
    found = open_vectors(path)
    layer = found.source if layer is None else layer
    if layer is None:
        raise MelboError(f"--layer is needed: {found.path} does not record the layer its vectors are added after")
    found.row(index)
    lm = load(found.model(model), device, dtype)
    vectors = validate_vectors(found.vectors, str(found.path), lm.d_model)
    check_layer(lm.model, layer, "--layer")
    ids = encode_prompt(lm.tokenizer, prompt, prompt_format(system, chat_template, found.prompt_format), lm.device)
    theta = (vectors[index] * scale).to(lm.device)
    options: dict[str, Any] = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    plain = generate_steered(lm.model, lm.tokenizer, ids, None, layer, **options)[0]
    steered = generate_steered(lm.model, lm.tokenizer, ids, theta[None], layer, **options)[0]
    title = f"{prompt!r}: vector {index} (norm {float(theta.norm()):.2f}) added after layer {layer}"
    tables.show(tables.side_by_side(title, plain, steered))


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
    prompt: opt.Prompts = None, prompt_file: opt.PromptFile = None,
    out: opt.Out = None, force: opt.Force = False, resume: opt.Resume = False,
    model: opt.Model = None, system: opt.System = None, chat_template: opt.ChatTemplate = None, device: opt.Device = "auto", dtype: opt.Dtype = None,
) -> None:
    """MELBO: learn K orthogonal steering vectors of norm R that change layer t the most."""
    from melbo.engines import discover as engine
    from melbo.engines.config import RadiusConfig

    prompts = run_prompts(prompt, prompt_file)
    cfg = DiscoverConfig(
        source=source, target=target, radius=radius, count=count, p=power, q=root, steps=steps, lr=lr,
        block=block, seed=seed, positions=positions, completion_tokens=completion_tokens,
    )
    cfg.check()
    radius_cfg = RadiusConfig.with_radii(radii) if radii else RadiusConfig()
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
    tables.show([*tables.discovered(run, count), f"run folder: [bold]{folder}[/bold]"])


def print_probe(probe: Any) -> None:
    log_line(tables.radius_probe(probe))


def print_radius_choice(choice: Any) -> None:
    tables.show(tables.radius_choice(choice))


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
    match: Annotated[str | None, typer.Option(help="What each copy matches: kl (fast default: θ0's next-token distributions), fisher (the same KL to second order in the LM head's input: the head never runs), mean (seed default: the residual after t, averaged over positions) or each (position by position).")] = OC.match,
    continuation: Annotated[int | None, typer.Option(min=0, help="Also match along θ0's own first N greedy tokens (fast: 16; seed: 0).")] = OC.continuation,
    seed: int = OC.seed,
    completion_tokens: Annotated[int, typer.Option(help="Greedy tokens stored per vector on the first prompt.")] = OC.completion_tokens,
    prompt: opt.Prompts = None, prompt_file: opt.PromptFile = None,
    prompt_set: Annotated[str | None, typer.Option(help="Also train on melbo's shipped prompts (θ0's continuation on each): harmful, neutral, coding, chit-chat or all.")] = None,
    extra_prompts: Annotated[int, typer.Option(min=0, help="Also train on this many shipped prompts (never the controls' held-out ones): θ0's text likelier off your prompt, its label kept less often on it, 2–4× the cost (default 0).")] = OC.extra_prompts,
    first_weight: Annotated[float | None, typer.Option(help="With several prompts: the first prompt's share of the loss (default: all equal).")] = OC.first_weight,
    out: opt.Out = None, force: opt.Force = False, resume: opt.Resume = False,
    model: opt.Model = None, system: opt.System = None, chat_template: opt.ChatTemplate = None, device: opt.Device = "auto", dtype: opt.Dtype = None,
) -> None:
    """MELBO-ortho: vectors orthogonal to θ0 and to each other that reproduce θ0's effect (on every prompt given)."""
    from melbo.engines import ortho as engine
    from melbo.files.source import open_vectors
    from melbo.model.prompts import shipped_prompts

    found = open_vectors(base)
    theta0 = found.row(index)
    source, target = (found.source if source is None else source), (found.target if target is None else target)
    if source is None or target is None:
        raise MelboError(f"--source and --target are needed: {base} does not record the layers θ0 was made for")
    prompts = run_prompts(prompt, prompt_file, found.prompts)
    if prompt_set:
        prompts = list(dict.fromkeys([*prompts, *shipped_prompts(prompt_set)]))
    cfg = OrthoConfig(
        source=source, target=target, mode=mode, count=count, block=block, steps=steps, lr=lr, penalty=penalty,
        positions=positions, seed=seed, completion_tokens=completion_tokens, plateau=plateau, optimizer=optimizer,
        min_norm=min_norm, stop_after_dropped=stop_after_dropped, init_scale=init_scale, match=match, continuation=continuation,
        extra_prompts=extra_prompts, first_weight=first_weight,
    )
    cfg.check()
    folder = out_folder(out, "ortho", force, resume)
    lm = load(found.model(model), device, dtype)
    cfg.check(lm.n_layers, lm.d_model)
    settings = cfg.resolved(float(theta0.norm()), lm.d_model, lm.n_layers)
    progress, on_step = block_progress(-(-settings.count // settings.block), settings.steps, f"ortho ({mode})")
    with progress, interruptible(folder):
        run = engine.ortho(
            lm, theta0, prompts, cfg, prompt_format(system, chat_template, found.prompt_format), out=folder, on_step=on_step,
            base_info={"from": str(base), "index": index, **({"completion": found.completion(index)} if found.is_run else {})}, resume=resume,
        )
    tables.show([*tables.ortho_run(run), f"run folder: [bold]{folder}[/bold]"])
