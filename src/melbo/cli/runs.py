"""Commands that look at a model and find vectors: ``info``, ``generate``, ``discover``, ``ortho``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from melbo.analysis.config import GenerateConfig
from melbo.cli import options as opt
from melbo.cli.app import app, interruptible, load, warn_if_slow_bfloat16
from melbo.engines.config import DiscoverConfig, OrthoConfig, default_layers
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
    tables.show(tables.residual_norms(lm.name, lm.describe(), lm.n_layers, lm.d_model, str(lm.device), ids.shape[1], residual_norms(lm.model, ids),
                                       default_layers(lm.n_layers) if lm.n_layers >= 2 else None))


@app.command()
@opt.config_options(GenerateConfig, before="model")
def generate(
    run: Annotated[Path | None, typer.Argument(help="A run folder holding the vector (or give --vector FILE).", show_default=False)] = None,
    index: Annotated[int, typer.Option(help="Which vector of the run (row of vectors.safetensors).")] = 0,
    run_option: Annotated[Path | None, typer.Option("--run", hidden=True)] = None,  # melbo ≤ 0.1's spelling of RUN
    vector: Annotated[Path | None, typer.Option(help="A vector file (.safetensors, the post's .pt, a llama.cpp control vector .gguf, "
                                                      "steering-vectors .pt, .npy); row --index.")] = None,
    layer: opt.Layer = None,
    scale: opt.Scale = 1.0,
    prompt: opt.Prompt = DEFAULT_PROMPT,
    model: opt.Model = None, system: opt.System = None, chat_template: opt.ChatTemplate = None, device: opt.Device = "auto", dtype: opt.Dtype = None,
    *, cfg: GenerateConfig,
) -> None:
    """Generate with and without a steering vector, side by side."""
    from melbo.analysis.generate import generate as complete
    from melbo.files.source import open_vectors

    if run and run_option:
        raise MelboError("give the run once: melbo generate RUN --index I")
    run = run or run_option
    given = run or vector
    if given is None or (run and vector):
        raise MelboError("give exactly one of a run folder (melbo generate RUN --index I) or --vector FILE")
    found = open_vectors(given, layer)
    theta, layer = found.at(index, layer)
    lm, theta = load(model, device, dtype, found), theta * scale
    fmt = found.format(system, chat_template)
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
    *, cfg: DiscoverConfig,
) -> None:
    """MELBO: learn K orthogonal steering vectors of norm R that change layer t the most."""
    from melbo.engines import discover as engine
    from melbo.engines.config import RadiusConfig

    prompts = read_prompts(prompt, prompt_file)
    radius_cfg = RadiusConfig.with_radii(radii, cfg.auto_radius or calibrate)
    fmt = PromptFormat().overridden(system, chat_template)
    folder = None if calibrate else new_run_folder(out, "discover", force, resume)
    lm = load(model, device, dtype)
    cfg.check(lm.n_layers, lm.d_model)
    warn_if_slow_bfloat16(lm.device, *cfg.asked_precisions())
    if folder is None:
        with err_console.status("choosing R…"):
            tables.show_radius_choice(engine.calibrate(lm, prompts, cfg, fmt, radius_cfg, tables.log_radius_probe))
        return
    progress, on_step = block_progress(cfg.blocks, cfg.steps, "discover")
    if cfg.auto_radius and not resume:
        err_console.print("[dim]-R auto: trying a few R on 4 vectors each (about a quarter of the discovery's time)…[/dim]")
    with progress, interruptible(folder):
        run = engine.discover(
            lm, prompts, cfg, fmt, out=folder, on_step=on_step, resume=resume, radius_cfg=radius_cfg, on_radius=tables.show_radius_choice,
            on_probe=tables.log_radius_probe,
        )
    tables.show([*tables.discovered(run, cfg.count), f"run folder: [bold]{folder}[/bold]"])


@app.command()
@opt.config_options(OrthoConfig, before="index")
def ortho(
    base: Annotated[Path, typer.Argument(help="A run folder, or a vector file (as --vector of melbo generate reads: .safetensors, the post's .pt, a control vector .gguf…).")],
    index: Annotated[int, typer.Option(help="Which vector of BASE is θ0.")] = 0,
    source: Annotated[int | None, typer.Option("--source", "-s", help="Layer s (default: the run's).")] = None,
    target: Annotated[int | None, typer.Option("--target", "-t", help="Layer t (default: the run's).")] = None,
    prompt: opt.Prompts = None, prompt_file: opt.PromptFile = None,
    prompt_set: Annotated[str | None, typer.Option(help="Also train on melbo's shipped prompts (θ0's continuation on each): harmful, neutral, coding, chit-chat or all.")] = None,
    out: opt.Out = None, force: opt.Force = False, resume: opt.Resume = False,
    model: opt.Model = None, system: opt.System = None, chat_template: opt.ChatTemplate = None, device: opt.Device = "auto", dtype: opt.Dtype = None,
    *, cfg: OrthoConfig,
) -> None:
    """MELBO-ortho: vectors orthogonal to θ0 and to each other that reproduce θ0's effect (on every prompt given)."""
    from melbo.engines import ortho as engine
    from melbo.files.source import open_vectors

    found = open_vectors(base)
    theta0, (source, target) = found.row(index), found.layers(source, target)
    prompts = read_prompts(prompt, prompt_file, found.prompts or DEFAULT_PROMPT, prompt_set)
    cfg = dataclasses.replace(cfg, source=source, target=target)
    cfg.check()
    folder = new_run_folder(out, "ortho", force, resume)
    lm = load(model, device, dtype, found)
    cfg.check(lm.n_layers, lm.d_model)
    warn_if_slow_bfloat16(lm.device, *cfg.asked_precisions())
    plan = engine.progress_plan(lm, theta0, cfg)
    copies = f"{plan.count} copies" if cfg.count is not None else f"copies until the basis is exhausted (at most {plan.count})"

    def started(block: int) -> None:  # on a real model minutes pass before a block's first line: say what runs
        where = f"block {block + 1}/{plan.blocks} starts" + (" (resumed)" if block else "")
        log_line(f"ortho ({cfg.mode}): {copies} of θ0 (norm {float(theta0.norm()):.3g}, layer {source} → {target}) in blocks of "
                 f"{min(plan.block, plan.count)}; {where}")

    progress, on_step = block_progress(plan.blocks, plan.steps, f"ortho ({cfg.mode})")
    with progress, interruptible(folder):
        run = engine.ortho(
            lm, theta0, prompts, cfg, found.format(system, chat_template), out=folder, on_step=on_step,
            base_info={"from": str(base), "index": index, **({"completion": found.completion(index)} if found.is_run else {})}, resume=resume,
            on_start=started,
        )
    tables.show([*tables.ortho_run(run), f"run folder: [bold]{folder}[/bold]"])
