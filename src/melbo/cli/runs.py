"""Commands that look at a model and find vectors: ``info``, ``generate``, ``discover``, ``ortho``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from melbo.analysis.config import GenerateConfig
from melbo.cli import options as opt
from melbo.cli.app import app, interruptible, load
from melbo.engines.config import DiscoverConfig, OrthoConfig
from melbo.errors import MelboError
from melbo.files.folders import new_run_folder
from melbo.model.prompts import DEFAULT_PROMPT, PromptFormat, read_prompts
from melbo.output import tables
from melbo.output.live import block_progress, err_console, log_line


@app.command()
def info(
    prompt: opt.Prompt = DEFAULT_PROMPT,
    model: opt.Model = None, system: opt.System = None, chat_template: opt.ChatTemplate = None, device: opt.Device = "auto", dtype: opt.Dtype = None,
) -> None:
    """Layers, d_model and the residual-norm profile per layer: what you need to choose s, t and R."""
    from melbo.model.forward import residual_norms
    from melbo.model.prompts import encode_prompt

    lm = load(model, device, dtype)
    ids = encode_prompt(lm.tokenizer, prompt, PromptFormat().overridden(system, chat_template), lm.device)
    tables.show(tables.residual_norms(lm.name, lm.describe(), lm.n_layers, lm.d_model, str(lm.device), ids.shape[1], residual_norms(lm.model, ids)))


@app.command()
@opt.config_options(GenerateConfig, before="model")
def generate(
    run: Annotated[Path | None, typer.Option(help="A run folder holding the vector.")] = None,
    index: Annotated[int, typer.Option(help="Which vector of the run (row of vectors.safetensors).")] = 0,
    vector: Annotated[Path | None, typer.Option(help="A vector file (.safetensors or the post's .pt); row --index.")] = None,
    layer: opt.Layer = None,
    scale: opt.Scale = 1.0,
    prompt: opt.Prompt = DEFAULT_PROMPT,
    model: opt.Model = None, system: opt.System = None, chat_template: opt.ChatTemplate = None, device: opt.Device = "auto", dtype: opt.Dtype = None,
    **settings: Any,
) -> None:
    """Generate with and without a steering vector, side by side."""
    if (run is None) == (vector is None):
        raise MelboError("give exactly one of --run RUN (with --index) or --vector FILE")
    from melbo.analysis.generate import generate as complete
    from melbo.files.source import open_vectors
    from melbo.files.vectors import validate_vectors

    given = run or vector
    assert given is not None  # exactly one of the two (checked above)
    found = open_vectors(given)
    layer = found.source if layer is None else layer
    if layer is None:
        raise MelboError(f"--layer is needed: {found.path} does not record the layer its vectors are added after")
    found.row(index)
    lm = load(found.model(model), device, dtype)
    theta = validate_vectors(found.vectors, str(found.path), lm.d_model)[index] * scale
    fmt, cfg = (found.prompt_format or PromptFormat()).overridden(system, chat_template), GenerateConfig(**settings)
    plain, steered = (complete(lm, v, layer, prompt, fmt, cfg) for v in (None, theta))
    tables.show(tables.side_by_side(f"{prompt!r}: vector {index} (norm {float(theta.norm()):.2f}) added after layer {layer}", plain, steered))


@app.command()
@opt.config_options(DiscoverConfig, before="calibrate")
def discover(
    calibrate: Annotated[bool, typer.Option("--calibrate", help="Only choose R (as -R auto does) and print the table.")] = False,
    radii: Annotated[str | None, typer.Option(help="With -R auto or --calibrate: candidate R values to try, comma-separated.")] = None,
    prompt: opt.Prompts = None, prompt_file: opt.PromptFile = None,
    out: opt.Out = None, force: opt.Force = False, resume: opt.Resume = False,
    model: opt.Model = None, system: opt.System = None, chat_template: opt.ChatTemplate = None, device: opt.Device = "auto", dtype: opt.Dtype = None,
    **settings: Any,
) -> None:
    """MELBO: learn K orthogonal steering vectors of norm R that change layer t the most."""
    from melbo.engines import discover as engine
    from melbo.engines.config import RadiusConfig

    prompts = read_prompts(prompt, prompt_file)
    cfg = DiscoverConfig(**settings)
    cfg.check()
    radius_cfg = RadiusConfig.with_radii(radii) if radii else RadiusConfig()
    if radii and not (cfg.auto_radius or calibrate):
        raise MelboError("--radii are the candidates of -R auto (or --calibrate); with -R set to a number there is nothing to choose")
    radius_cfg.check()
    fmt = PromptFormat().overridden(system, chat_template)
    if calibrate:
        lm = load(model, device, dtype)
        cfg.check(lm.n_layers, lm.d_model)
        with err_console.status("choosing R…"):
            choice = engine.calibrate(lm, prompts, cfg, fmt, radius_cfg, print_probe)
        print_radius_choice(choice)
        return
    folder = new_run_folder(out, "discover", force, resume)
    lm = load(model, device, dtype)
    cfg.check(lm.n_layers, lm.d_model)
    progress, on_step = block_progress(-(-cfg.count // cfg.block), cfg.steps, "discover")
    if cfg.auto_radius and not resume:
        err_console.print("[dim]-R auto: trying a few R on 4 vectors each (about a quarter of the discovery's time)…[/dim]")
    with progress, interruptible(folder):
        run = engine.discover(
            lm, prompts, cfg, fmt, out=folder, on_step=on_step, resume=resume, radius_cfg=radius_cfg, on_radius=print_radius_choice,
            on_probe=print_probe,
        )
    tables.show([*tables.discovered(run, cfg.count), f"run folder: [bold]{folder}[/bold]"])


def print_probe(probe: Any) -> None:
    log_line(tables.radius_probe(probe))


def print_radius_choice(choice: Any) -> None:
    tables.show(tables.radius_choice(choice))


@app.command()
@opt.config_options(OrthoConfig, before="index")
def ortho(
    base: Annotated[Path, typer.Argument(help="A run folder, or a vector file (.safetensors or the post's .pt).")],
    index: Annotated[int, typer.Option(help="Which vector of BASE is θ0.")] = 0,
    source: Annotated[int | None, typer.Option("--source", "-s", help="Layer s (default: the run's).")] = None,
    target: Annotated[int | None, typer.Option("--target", "-t", help="Layer t (default: the run's).")] = None,
    prompt: opt.Prompts = None, prompt_file: opt.PromptFile = None,
    prompt_set: Annotated[str | None, typer.Option(help="Also train on melbo's shipped prompts (θ0's continuation on each): harmful, neutral, coding, chit-chat or all.")] = None,
    out: opt.Out = None, force: opt.Force = False, resume: opt.Resume = False,
    model: opt.Model = None, system: opt.System = None, chat_template: opt.ChatTemplate = None, device: opt.Device = "auto", dtype: opt.Dtype = None,
    **settings: Any,
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
    prompts = read_prompts(prompt, prompt_file, found.prompts or DEFAULT_PROMPT)
    if prompt_set:
        prompts = list(dict.fromkeys([*prompts, *shipped_prompts(prompt_set)]))
    cfg = OrthoConfig(source=source, target=target, **settings)
    cfg.check()
    folder = new_run_folder(out, "ortho", force, resume)
    lm = load(found.model(model), device, dtype)
    cfg.check(lm.n_layers, lm.d_model)
    plan = cfg.resolved(float(theta0.norm()), lm.d_model, lm.n_layers)
    progress, on_step = block_progress(-(-plan.count // plan.block), plan.steps, f"ortho ({cfg.mode})")
    with progress, interruptible(folder):
        run = engine.ortho(
            lm, theta0, prompts, cfg, (found.prompt_format or PromptFormat()).overridden(system, chat_template), out=folder, on_step=on_step,
            base_info={"from": str(base), "index": index, **({"completion": found.completion(index)} if found.is_run else {})}, resume=resume,
        )
    tables.show([*tables.ortho_run(run), f"run folder: [bold]{folder}[/bold]"])
