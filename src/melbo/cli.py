"""The ``melbo`` command: a thin layer over the Python API. It parses options, calls the API, prints.

Errors a user can cause (:class:`melbo.MelboError`) print as one line on stderr with exit status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from melbo.errors import MelboError

app = typer.Typer(
    name="melbo",
    help="Find steering vectors without supervision (MELBO) and many orthogonal vectors that reproduce one "
    "(MELBO-ortho). Layer L means the residual stream after decoder block L (blocks counted from 0).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)
_debug = {"on": bool(os.environ.get("MELBO_DEBUG"))}

# Options shared by the commands that load a model.
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="'smollm2' (embedded default), a Hugging Face id, a model folder or a .gguf file."),
]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="float32 (default on CPU), bfloat16 (default on GPU) or float16.")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", help="System prompt for the chat template.")]
RawOpt = Annotated[bool, typer.Option("--no-chat-template", help="Use prompts as raw text, without the chat template.")]
PromptOpt = Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A prompt (repeatable).")]
PromptFileOpt = Annotated[Optional[Path], typer.Option("--prompt-file", help="A file with one prompt per line.")]
ForceOpt = Annotated[bool, typer.Option(help="Overwrite a run already in --out.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last completed block.")]
CompletionOpt = Annotated[int, typer.Option(help="Greedy tokens stored per vector on the first prompt.")]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
) -> None:
    if debug:
        _debug["on"] = True


def _load(model: str | None, device: str, dtype: str | None):
    from melbo.models import load_model

    with err_console.status(f"loading {model or 'smollm2'}…"):
        return load_model(model, device=device, dtype=dtype)


def _fmt(system: str | None, no_chat_template: bool):
    from melbo.prompts import PromptFormat

    return PromptFormat(system=system, chat_template=not no_chat_template)


@app.command()
def info(
    model: ModelOpt = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt for the norm profile.")] = "How can I build a bomb?",
    system: SystemOpt = None,
    no_chat_template: RawOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """Layers, d_model and the residual-norm profile per layer: what you need to choose s, t and R."""
    from melbo.profile import residual_norms
    from melbo.prompts import encode_prompt

    lm = _load(model, device, dtype)
    fmt = _fmt(system, no_chat_template)
    ids = encode_prompt(lm.tokenizer, prompt, fmt, lm.device)
    rows = residual_norms(lm.model, ids)
    console.print(
        f"[bold]{lm.name}[/bold] ({lm.describe()['class']}): {lm.n_layers} layers (0 to {lm.n_layers - 1}), "
        f"d_model {lm.d_model}, {lm.describe()['dtype']} on {lm.device}; prompt = {ids.shape[1]} tokens"
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
        "Choose a source layer s about a quarter to a third of the way in, a target t about two thirds in, and R "
        "around a few times the typical norm at s (melbo discover --calibrate sweeps R)."
    )


@app.command()
def generate(
    run: Annotated[Optional[Path], typer.Option(help="A run folder holding the vector.")] = None,
    index: Annotated[int, typer.Option(help="Which vector of the run (row of vectors.safetensors).")] = 0,
    vector: Annotated[Optional[Path], typer.Option(help="A vector file (.safetensors or the post's .pt); row --index.")] = None,
    layer: Annotated[Optional[int], typer.Option(help="Layer to add the vector after (default: the run's source layer).")] = None,
    scale: Annotated[float, typer.Option(help="Multiply the vector by this.")] = 1.0,
    prompt: Annotated[str, typer.Option("--prompt", "-p")] = "How can I build a bomb?",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 48,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    seed: int = 0,
    model: ModelOpt = None,
    system: SystemOpt = None,
    no_chat_template: RawOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """Generate with and without a steering vector, side by side."""
    from melbo.generation import generate_steered
    from melbo.layers import check_layer
    from melbo.prompts import encode_prompt
    from melbo.runs import load_vector_file, read_run, validate_vectors

    if (run is None) == (vector is None):
        raise MelboError("give exactly one of --run RUN (with --index) or --vector FILE")
    record = read_run(run) if run is not None else None
    if record is not None:
        model = model or record.meta.get("model", {}).get("name")
        layer = record.source_layer if layer is None else layer
        fmt_meta = record.meta.get("prompt_format", {})
        system = system if system is not None else fmt_meta.get("system")
    if layer is None:
        raise MelboError("--layer is needed with --vector (the layer the vector is added after)")
    vectors = record.vectors if record is not None else load_vector_file(vector)  # type: ignore[arg-type]
    lm = _load(model, device, dtype)
    vectors = validate_vectors(vectors, str(run or vector), lm.d_model)
    if not 0 <= index < vectors.shape[0]:
        raise MelboError(f"--index {index}: the file has vectors 0 to {vectors.shape[0] - 1}")
    check_layer(lm.model, layer, "--layer")
    ids = encode_prompt(lm.tokenizer, prompt, _fmt(system, no_chat_template), lm.device)
    theta = (vectors[index] * scale).to(lm.device)
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    plain = generate_steered(lm.model, lm.tokenizer, ids, None, layer, **options)[0]
    steered = generate_steered(lm.model, lm.tokenizer, ids, theta[None], layer, **options)[0]
    table = Table(title=f"{prompt!r}: vector {index} (norm {float(theta.norm()):.2f}) added after layer {layer}", show_lines=True)
    table.add_column("unsteered", ratio=1)
    table.add_column("steered", ratio=1)
    table.add_row(plain, steered)
    console.print(table)


def _progress(total_blocks: int | None, steps: int, what: str):
    """A rich progress bar fed by the engines' (block, step, loss) callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(), console=err_console, transient=False,
    )
    tasks: dict[int, int] = {}

    def on_step(block: int, step: int, loss: float) -> None:
        if block not in tasks:
            for done in tasks.values():
                progress.update(done, completed=progress.tasks[done].total)
            label = f"{what} block {block + 1}" + (f"/{total_blocks}" if total_blocks else "")
            tasks[block] = progress.add_task(label, total=steps, loss="…")
        progress.update(tasks[block], completed=step, loss=f"{loss:,.4g}")

    return progress, on_step


def _out_folder(out: Path | None, kind: str, force: bool, resume: bool = False) -> Path:
    import datetime as dt

    if resume and out is None:
        raise MelboError("--resume needs --out: the run folder to continue")
    folder = out or Path("melbo-runs") / f"{kind}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    if (folder / "run.json").exists() and not (force or resume):
        raise MelboError(f"{folder} already holds a run; continue it with --resume, or pass --force to start it again")
    if folder.exists() and not folder.is_dir():
        raise MelboError(f"--out {folder} is a file, not a folder")
    _check_writable(folder)
    return folder


def _check_writable(folder: Path) -> None:
    """Fail before any work if the run folder cannot be written (a probe that leaves nothing behind)."""
    import shutil
    import tempfile

    parent = folder.absolute()
    while not parent.exists():
        parent = parent.parent
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".melbo-probe-", dir=parent))
    except OSError as exc:
        raise MelboError(f"cannot write the run folder {folder}: {exc.strerror or exc}; choose another --out") from exc


@contextlib.contextmanager
def _interruptible(folder: Path):
    """Ctrl-C ends a long run cleanly: every completed block is already saved in the run folder."""
    try:
        yield
    except KeyboardInterrupt:
        err_console.print(
            f"melbo: interrupted; {folder} holds every completed block: run the same command with --resume to continue"
        )
        sys.exit(130)


@app.command()
def discover(
    count: Annotated[int, typer.Option("--count", "-k", help="K: number of vectors.")] = 32,
    source: Annotated[int, typer.Option("--source", "-s", help="Layer s: add the vector after block s.")] = 8,
    target: Annotated[int, typer.Option("--target", "-t", help="Layer t: measure the change after block t.")] = 20,
    radius: Annotated[float, typer.Option("--radius", "-R", help="R: the norm of every vector.")] = 30.0,
    p: Annotated[float, typer.Option("-p", help="Power on each position's change.")] = 2.0,
    q: Annotated[float, typer.Option("-q", help="Root of the sum over positions.")] = 1.0,
    steps: Annotated[int, typer.Option(help="Adam steps per block.")] = 100,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default 0.01·R/√d_model).")] = None,
    block: Annotated[int, typer.Option(help="Vectors trained together (1 = the original one-at-a-time MELBO).")] = 16,
    positions: Annotated[str, typer.Option(help="skip-first (default: position 0 is often an attention sink), all, or last:N.")] = "skip-first",
    seed: int = 0,
    completion_tokens: CompletionOpt = 32,
    calibrate: Annotated[bool, typer.Option("--calibrate", help="Sweep R on a few vectors instead, to choose R.")] = False,
    radii: Annotated[Optional[str], typer.Option(help="With --calibrate: comma-separated R values.")] = None,
    prompt: PromptOpt = None,
    prompt_file: PromptFileOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default melbo-runs/discover-DATE).")] = None,
    force: ForceOpt = False,
    resume: ResumeOpt = False,
    model: ModelOpt = None,
    system: SystemOpt = None,
    no_chat_template: RawOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """MELBO: learn K orthogonal steering vectors of norm R that change layer t the most."""
    from melbo import discover as engine
    from melbo.prompts import read_prompts

    prompts = read_prompts(prompt, prompt_file)
    cfg = engine.DiscoverConfig(
        source=source, target=target, radius=radius, count=count, p=p, q=q, steps=steps, lr=lr, block=block,
        seed=seed, positions=positions, completion_tokens=completion_tokens,
    )
    cfg.check()
    if calibrate:
        values = _parse_radii(radii, radius)
        lm = _load(model, device, dtype)
        cfg.check(lm.n_layers, lm.d_model)
        with err_console.status("calibrating R…"):
            rows = engine.calibrate(lm, prompts, values, cfg, _fmt(system, no_chat_template))
        table = Table(title=f"Change at layer {target} against R (layer {source}, {steps} steps, 4 vectors each)")
        for column in ("R", "change −loss", "change / R", ""):
            table.add_column(column, justify="right")
        ratios = [row["change_per_R"] for row in rows]
        for row, ratio in zip(rows, ratios):
            bar = "█" * max(1, round(30 * ratio / max(ratios)))
            table.add_row(f"{row['R']:g}", f"{row['change']:,.4g}", f"{ratio:,.4g}", bar)
        console.print(table)
        console.print("Useful R sits just past the sharp rise of change/R; much larger R tends to give gibberish.")
        return
    folder = _out_folder(out, "discover", force, resume)
    lm = _load(model, device, dtype)
    cfg.check(lm.n_layers, lm.d_model)
    progress, on_step = _progress(-(-count // block), steps, "discover")
    with progress, _interruptible(folder):
        run = engine.discover(lm, prompts, cfg, _fmt(system, no_chat_template), out=folder, on_step=on_step, resume=resume)
    table = Table(title=f"{count} vectors, R = {radius:g}, layer {source} → {target}", show_lines=False)
    for column, justify in (("#", "right"), ("loss", "right"), ("completion on the first prompt", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for record in run.records:
        table.add_row(str(record["index"]), f"{record['loss']:,.4g}", _short(record.get("completion", "")))
    console.print(table)
    console.print(f"run folder: [bold]{folder}[/bold]")


def _parse_radii(radii: str | None, radius: float) -> list[float]:
    if radii is None:
        return [radius * f for f in (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4)]
    try:
        values = [float(x) for x in radii.split(",") if x.strip()]
    except ValueError as exc:
        raise MelboError(f"--radii {radii!r}: give numbers separated by commas, e.g. 10,20,40") from exc
    if not values or any(not v > 0 for v in values):
        raise MelboError("--radii: every R must be a positive number")
    return values


def _short(text: str, width: int = 110) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


@app.command()
def ortho(
    base: Annotated[Path, typer.Argument(help="A run folder, or a vector file (.safetensors or the post's .pt).")],
    index: Annotated[int, typer.Option(help="Which vector of BASE is θ0.")] = 0,
    mode: Annotated[str, typer.Option(help="fast (blocks, cached layers, early stop) or seed (the post's algorithm as written).")] = "fast",
    count: Annotated[Optional[int], typer.Option(help="Vectors to find (default: until the basis is exhausted).")] = None,
    source: Annotated[Optional[int], typer.Option("--source", "-s", help="Layer s (default: the run's).")] = None,
    target: Annotated[Optional[int], typer.Option("--target", "-t", help="Layer t (default: the run's).")] = None,
    block: Annotated[Optional[int], typer.Option(help="Vectors optimised together (fast: 16; seed: 1).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Evaluations per block (fast: at most 60 with lbfgs, 150 with adam; seed: 1000).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam's learning rate; lbfgs's first step is lr·√d (fast: 0.25·‖θ0‖/√d; seed: 0.01).")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="Fast mode: lbfgs (default, one L-BFGS per vector) or adam.")] = None,
    penalty: Annotated[float, typer.Option(help="λ of an extra λ‖θ‖² term (the post's proposed test).")] = 0.0,
    plateau: Annotated[float, typer.Option(min=0.0, help="Fast mode: stop a block when 10 steps gain less than this fraction (0: never).")] = 2e-3,
    positions: Annotated[Optional[str], typer.Option(help="last:4 (fast default), all (seed default), skip-first or last:N.")] = None,
    seed: int = 0,
    completion_tokens: CompletionOpt = 32,
    prompt: PromptOpt = None,
    prompt_file: PromptFileOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default melbo-runs/ortho-DATE).")] = None,
    force: ForceOpt = False,
    resume: ResumeOpt = False,
    model: ModelOpt = None,
    system: SystemOpt = None,
    no_chat_template: RawOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """MELBO-ortho: vectors orthogonal to θ0 and to each other that reproduce θ0's effect."""
    from melbo import ortho as engine
    from melbo.prompts import read_prompts
    from melbo.runs import load_vector_file, read_run

    base_info: dict = {"from": str(base), "index": index}
    if base.is_dir():
        record = read_run(base)
        vectors = record.vectors
        source = record.source_layer if source is None else source
        target = record.target_layer if target is None else target
        model = model or record.meta.get("model", {}).get("name")
        fmt_meta = record.meta.get("prompt_format", {})
        system = system if system is not None else fmt_meta.get("system")
        prompts = read_prompts(prompt, prompt_file, default=None) if (prompt or prompt_file) else record.meta.get("prompts") or read_prompts(None, None)
        if index < len(record.records):
            base_info["completion"] = record.records[index].get("completion")
    else:
        vectors = load_vector_file(base)
        prompts = read_prompts(prompt, prompt_file)
    if source is None or target is None:
        raise MelboError("--source and --target are needed with a vector file (the layers θ0 was made for)")
    if not 0 <= index < vectors.shape[0]:
        raise MelboError(f"--index {index}: {base} has vectors 0 to {vectors.shape[0] - 1}")
    cfg = engine.OrthoConfig(
        source=source, target=target, mode=mode, count=count, block=block, steps=steps, lr=lr, penalty=penalty,
        positions=positions, seed=seed, completion_tokens=completion_tokens, plateau=plateau, optimizer=optimizer,
    )
    cfg.check()
    folder = _out_folder(out, "ortho", force, resume)
    lm = _load(model, device, dtype)
    cfg.check(lm.n_layers, lm.d_model)
    resolved = cfg.resolved(float(vectors[index].norm()), lm.d_model)
    progress, on_step = _progress(-(-resolved.count // resolved.block), resolved.steps, f"ortho ({mode})")  # type: ignore[operator]
    with progress, _interruptible(folder):
        run = engine.ortho(
            lm, vectors[index], prompts, cfg, _fmt(system, no_chat_template), out=folder, on_step=on_step,
            base_info=base_info, resume=resume,
        )
    print_ortho_table(run)
    console.print(f"run folder: [bold]{folder}[/bold]")


def print_ortho_table(run, limit: int = 200) -> None:
    from melbo.objectives import max_abs_cosine

    table = Table(title=f"MELBO-ortho: {run.vectors.shape[0] - 1} vectors orthogonal to θ0 (row 0)")
    for column, justify in (("#", "right"), ("norm", "right"), ("KL to base", "right"), ("completion", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for record in run.records[:limit]:
        table.add_row(
            str(record["index"]), f"{record['norm']:.1f}", f"{record['kl']:.3f}", _short(record.get("completion", ""), 90)
        )
    console.print(table)
    kls = sorted(r["kl"] for r in run.records[1:])
    if kls:
        console.print(
            f"KL(P_i ‖ P_base) at the last prompt token: median {kls[len(kls) // 2]:.3f}, max {kls[-1]:.3f}; "
            f"max |cos| between any two vectors {max_abs_cosine(run.vectors):.1e}; stopped: {run.meta.get('stopped')}"
        )


@app.command()
def demo(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the two runs (default melbo-runs/demo-DATE).")] = None,
    ortho_count: Annotated[int, typer.Option(help="Orthogonal vectors to find.")] = 32,
    force: Annotated[bool, typer.Option(help="Overwrite runs already in --out.")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="A few seconds: few vectors and steps, to check the set-up.")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """The main job on the embedded SmolLM2: discover vectors, pick the clearest, find orthogonal copies of it."""
    import time

    from melbo import demo as engine

    started = time.monotonic()
    folder = _out_folder(out, "demo", force)
    if (folder / "ortho" / "run.json").exists() and not force:
        raise MelboError(f"{folder} already holds a demo; choose another --out or pass --force")
    cfg = engine.quick_config() if quick else engine.DemoConfig(ortho_count=ortho_count)
    lm = _load("smollm2", device, None)
    console.print(
        f"[bold]melbo demo[/bold] on SmolLM2-135M-Instruct: prompt {cfg.prompt!r}, vectors added after layer {cfg.source}, "
        f"change measured after layer {cfg.target}, R = {cfg.radius:g}."
    )
    progress, on_discover = _progress(1, cfg.discover_steps, f"1/2 discover {cfg.discover_count} vectors,")
    ortho_tasks: dict[int, int] = {}

    def on_ortho_step(block: int, step: int, loss: float) -> None:
        if block not in ortho_tasks:
            blocks = -(-cfg.ortho_count // cfg.ortho_block)
            ortho_tasks[block] = progress.add_task(f"2/2 MELBO-ortho block {block + 1}/{blocks},", total=cfg.ortho_steps, loss="…")
        progress.update(ortho_tasks[block], completed=step, loss=f"{loss:,.4g}")

    def on_stage(what: str) -> None:
        progress.console.print(f"[dim]{what}…[/dim]")

    with progress:
        result = engine.run_demo(lm, folder, cfg, on_discover, on_ortho_step, on_stage)
    table = Table(title="Discovered vectors (fluency = NLL under the unsteered model; effect = first-token KL to unsteered)")
    for column, justify in (("#", "right"), ("label", "left"), ("NLL", "right"), ("effect", "right"), ("completion", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for c in result.base.candidates:
        mark = "[bold green]" if c["index"] == result.base.index else ""
        table.add_row(f"{mark}{c['index']}", c["label"], f"{c['nll']:.2f}", f"{c['effect']:.2f}", _short(c["completion"], 80))
    console.print(table)
    console.print(f"[bold]Base vector:[/bold] {result.base.reason()}.")
    console.print(f"  unsteered model: {_short(result.unsteered_completion, 100)!r}")
    console.print(f"  base vector:     {_short(result.base.completion, 100)!r}")
    print_ortho_table(result.ortho)
    n = result.ortho.vectors.shape[0] - 1
    kls = sorted(r["kl"] for r in result.ortho.records[1:])
    small = sum(k < result.unsteered_kl / 2 for k in kls)
    console.print(
        f"[bold]{n} vectors orthogonal to the base and to each other[/bold]: median KL to the base {kls[len(kls) // 2]:.3f}, "
        f"{small}/{n} below half the unsteered model's KL ({result.unsteered_kl:.3f}); {result.same_top_token}/{n} share "
        f"the base's most likely first token."
    )
    console.print(f"runs: [bold]{folder / 'discover'}[/bold] and [bold]{folder / 'ortho'}[/bold]   ({time.monotonic() - started:.0f} s)")
    console.print(f"report: [bold]{result.reports[0]}[/bold]  (open it in a browser; the discovery run's is {result.reports[1]})")


def _load_for_run(record, model: str | None, device: str, dtype: str | None):
    """The model a run was made with (or --model), checked against its vectors, and the run's prompt format."""
    from melbo.prompts import PromptFormat
    from melbo.runs import validate_vectors

    lm = _load(model or record.meta.get("model", {}).get("name"), device, dtype)
    validate_vectors(record.vectors, str(record.path), lm.d_model)
    return lm, PromptFormat(**record.meta.get("prompt_format", {}))


@app.command("eval")
def eval_command(
    run: Annotated[Path, typer.Argument(help="A run folder.")],
    index: Annotated[str, typer.Option(help="Vectors: all, 3, 0-99 or 1,4,7.")] = "all",
    prompt: PromptOpt = None,
    prompt_file: PromptFileOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 48,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy; > 0 samples.")] = 0.0,
    samples: Annotated[int, typer.Option(min=1, help="Completions per vector when sampling.")] = 1,
    seed: int = 0,
    batch: Annotated[int, typer.Option(min=1, help="Vectors per generate call.")] = 64,
    base: Annotated[int, typer.Option(help="The vector KL is measured against (row 0 of an ortho run is θ0).")] = 0,
    prompt_set: Annotated[Optional[str], typer.Option(help="Also evaluate melbo's shipped prompts: all, harmful, neutral, coding, chit-chat.")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="Your own labels (JSON or TOML: name + pattern, or name + python FILE:FUNCTION).")] = None,
    show: Annotated[int, typer.Option(help="Rows of the table printed.")] = 40,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """Steered completions, first-token top-10 and KL to the base, labels and checks, stored in RUN/eval.json."""
    from melbo.evaluate import EvalConfig, evaluate, label_counts
    from melbo.interop import parse_indices
    from melbo.prompts import read_prompts
    from melbo.runs import read_run

    record = read_run(run)
    indices = parse_indices(index, record.vectors.shape[0])
    extra = read_prompts(prompt, prompt_file, default=None) if (prompt or prompt_file) else []
    if prompt_set:
        from melbo.probe import prompt_set as shipped

        extra += shipped(None if prompt_set == "all" else prompt_set)
    run_prompt = (record.meta.get("prompts") or read_prompts(None, None))[0]
    held_out = [p for p in dict.fromkeys(extra) if p != run_prompt]
    prompts = [run_prompt, *held_out]
    cfg = EvalConfig(max_new_tokens=max_new_tokens, temperature=temperature, samples=samples, seed=seed, batch=batch, base=base)
    cfg.check()
    from melbo.labels import RULES, load_rules

    rules = load_rules(labels) if labels else RULES
    lm, fmt = _load_for_run(record, model, device, dtype)
    with err_console.status("evaluating…") as status, _interruptible(run):
        results = evaluate(
            lm, record, prompts, indices, cfg, fmt,
            on_batch=lambda p, done, total: status.update(f"evaluating {p[:30]!r}: {done}/{total} vectors"),
            rules=rules,
        )
    first = results["prompts"][prompts[0]]
    table = Table(title=f"{prompts[0]!r} ({cfg.mode()}); KL = KL(P_i ‖ P_{base}) at the last prompt token")
    for column, justify in (("#", "right"), ("norm", "right"), ("KL", "right"), ("label", "left"), ("top-3", "left"), ("completion", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for i in indices[:show]:
        ft = first["first_token"][str(i)]
        out = first["completions"][cfg.mode()][str(i)][0]
        top = " ".join(repr(t) for t, _ in ft["top"][:3])
        table.add_row(str(i), f"{results['norms'][i]:.1f}", f"{ft['kl']:.3f}", out["label"], top, _short(out["text"], 70))
    console.print(table)
    counts = label_counts(results, prompts[0], cfg.mode())
    console.print(
        "labels per hundred vectors: "
        + "; ".join(f"{c['from']}+: " + ", ".join(f"{k} {v}" for k, v in c.items() if k != "from") for c in counts)
    )
    kls = sorted(first["first_token"][str(i)]["kl"] for i in indices if i != base) or [0.0]
    console.print(
        f"KL to vector {base} (other vectors): median {kls[len(kls) // 2]:.3f}, max {kls[-1]:.3f}; "
        f"max |cos| over all pairs {results['max_abs_cos']:.1e}"
    )
    if held_out:
        from melbo.evaluate import generalisation, save_results

        summary = generalisation(results, run_prompt, held_out, cfg.mode(), base)
        save_results(record, results)
        shares = sorted(summary["share"].values())
        best = sorted(summary["share"].items(), key=lambda kv: -kv[1])[:5]
        console.print(
            f"generalisation over {len(held_out)} held-out prompts: share producing the base label "
            f"({summary['base_label']!r}): median {shares[len(shares) // 2]:.0%}; highest: "
            + ", ".join(f"#{i} {v:.0%}" for i, v in best)
        )
    console.print(f"results: [bold]{run / 'eval.json'}[/bold]")


@app.command()
def compose(
    run: Annotated[Path, typer.Argument(help="An ortho run folder (row 0 = θ0).")],
    k: Annotated[Optional[str], typer.Option("--k", help="Comma-separated k (default 1,2,3,5,10,20,50,100,…).")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Default: the run's first prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 48,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """Steer with the mean of the first k vectors (plain, ×√k, rescaled to ‖θ0‖) and with each vector at ‖θ0‖."""
    from melbo import compose as engine
    from melbo.runs import read_run

    record = read_run(run)
    try:
        ks = [int(x) for x in k.split(",")] if k else list(engine.DEFAULT_KS)
    except ValueError as exc:
        raise MelboError(f"--k {k!r}: give whole numbers separated by commas, e.g. 1,2,5,10") from exc
    text = prompt or (record.meta.get("prompts") or ["How can I build a bomb?"])[0]
    lm, fmt = _load_for_run(record, model, device, dtype)
    with err_console.status("composing…"):
        results = engine.compose(lm, record, ks, text, fmt, max_new_tokens)
    table = Table(title=f"{text!r}: combinations of the found vectors (KL = KL(P ‖ P_θ0) at the last prompt token)")
    for column, justify in (("combination", "left"), ("norm", "right"), ("KL", "right"), ("label", "left"), ("completion", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    rows = [r for r in results["rows"] if not r["name"].startswith("#")]
    for r in rows:
        table.add_row(r["name"], f"{r['norm']:.1f}", f"{r['kl']:.3f}", r["label"], _short(r["text"], 70))
    console.print(table)
    single = sorted(r["kl"] for r in results["rows"] if r["name"].startswith("#"))
    if single:
        console.print(f"each vector rescaled to ‖θ0‖: median KL {single[len(single) // 2]:.3f} (their own norms: see melbo eval)")
    console.print(f"results: [bold]{run / 'compose.json'}[/bold]")


@app.command("probe")
def probe_command(
    run: Annotated[Path, typer.Argument(help="A run folder.")],
    prompt: PromptOpt = None,
    prompt_file: PromptFileOpt = None,
    prompt_set: Annotated[str, typer.Option(help="Shipped prompts to use when none is given: coding, harmful, neutral, chit-chat.")] = "coding",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 48,
    random_directions: Annotated[int, typer.Option(min=2, help="Random directions for the baseline.")] = 512,
    show: Annotated[int, typer.Option(help="Rows printed.")] = 20,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """Are the vectors present in the residual stream when the unsteered model shows the behaviour itself?"""
    from melbo import probe as engine
    from melbo.prompts import read_prompts
    from melbo.runs import read_run

    record = read_run(run)
    prompts = read_prompts(prompt, prompt_file, default=None) if (prompt or prompt_file) else engine.prompt_set(prompt_set)
    lm, fmt = _load_for_run(record, model, device, dtype)
    with err_console.status(f"letting the model answer {len(prompts)} prompts…"):
        results = engine.probe(lm, record, prompts, fmt, max_new_tokens, random_directions)
    table = Table(title=f"Presence after layer {results['layer']} over {results['tokens']} generated tokens (|cos|; z against random directions)")
    for column in ("#", "mean |cos|", "max |cos|", "z"):
        table.add_column(column, justify="right")
    for r in results["vectors"][:show]:
        table.add_row(str(r["index"]), f"{r['mean_abs_cos']:.4f}", f"{r['max_abs_cos']:.4f}", f"{r['z']:+.1f}")
    console.print(table)
    zs = sorted(r["z"] for r in results["vectors"])
    console.print(
        f"random directions: mean |cos| {results['random']['mean_abs_cos']:.4f} ± {results['random']['std']:.4f}; "
        f"vectors: median z {zs[len(zs) // 2]:+.1f}, {sum(z > 3 for z in zs)}/{len(zs)} with z > 3"
    )
    console.print(f"results: [bold]{run / 'probe.json'}[/bold]")


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="A run folder (melbo's own, or one made by `melbo import-post-dump`).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The page to write (default RUN/report.html).")] = None,
) -> None:
    """One self-contained HTML page for a run: header, plots (also saved as RUN/plots/*.png), every vector's outputs."""
    from melbo.report import write_report

    if out is not None and out.is_dir():
        raise MelboError(f"--out {out} is a folder: give the file to write, e.g. {out / 'report.html'}")
    with err_console.status("writing the report…"):
        page = write_report(run, out)
    console.print(f"report: [bold]{page}[/bold]  (plots also in {run / 'plots'})")


@app.command("import-post-dump")
def import_post_dump_command(
    dump: Annotated[Path, typer.Argument(help="One of the post's text dumps, e.g. code-vectors-bomb.txt.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to create.")],
    composition: Annotated[Optional[Path], typer.Option(help="The matching *-outputs-meaned-scaled.txt (found beside the dump when not given).")] = None,
    force: ForceOpt = False,
) -> None:
    """Make a run folder from the original post's published outputs, to browse with `melbo report`."""
    from melbo.postdump import import_post_dump

    if composition is not None and not composition.is_file():
        raise MelboError(f"--composition {composition} does not exist")
    folder = _out_folder(out, "post", force)
    import_post_dump(dump, folder, composition)
    console.print(f"imported {dump.name} into {folder}; browse it with: melbo report {folder}")


@app.command("export")
def export_command(
    run: Annotated[Path, typer.Argument(help="A run folder.")],
    format: Annotated[str, typer.Option("--format", "-f", help="gguf (llama.cpp), repeng, steering-vectors, pt or npy.")] = "gguf",
    index: Annotated[str, typer.Option(help="Vectors: 3, 0-9, 1,4,7 or all.")] = "0",
    scale: Annotated[float, typer.Option(help="Multiply the vectors by this.")] = 1.0,
    layer: Annotated[Optional[int], typer.Option(help="Layer the vectors are added after (default: the run's source layer).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="File (one vector, or pt/npy) or folder (several control vectors).")] = None,
) -> None:
    """Write vectors for llama.cpp (--control-vector), repeng, steering-vectors, or as .pt/.npy."""
    from melbo.interop import FORMATS, SUFFIX, export_vectors, parse_indices
    from melbo.runs import read_run

    if format not in FORMATS:
        raise MelboError(f"unknown format {format!r}: use one of {', '.join(FORMATS)}")
    record = read_run(run)
    indices = parse_indices(index, record.vectors.shape[0])
    if not scale == scale or scale in (float("inf"), float("-inf")):
        raise MelboError("--scale must be a finite number")
    target = out or Path(f"{run.name}-{index.replace(',', '_')}{SUFFIX[format]}")
    written = export_vectors(record, target, format, indices, scale, layer)
    for path in written:
        console.print(f"wrote {path}")
    if format in ("gguf", "repeng"):
        used = record.source_layer if layer is None else layer
        console.print(f"llama.cpp: llama-cli -m MODEL.gguf --control-vector {written[0]} (direction.{used} = after block {used})")


@app.command("import")
def import_command(
    source: Annotated[Path, typer.Argument(help="A .gguf control vector, a steering-vectors .pt, the post's .pt, a .npy or a .safetensors.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to create.")],
    layer: Annotated[Optional[int], typer.Option(help="The layer to take (multi-layer files) or to record (.pt/.npy).")] = None,
    force: ForceOpt = False,
) -> None:
    """Make a run folder from a vector file, so melbo's commands can use it."""
    from melbo.interop import import_file

    folder = _out_folder(out, "import", force)
    run = import_file(source, folder, layer)
    console.print(f"imported {run.vectors.shape[0]} vector(s) of width {run.vectors.shape[1]} into {folder}")


def _parsing_errors() -> tuple[type, type, type]:
    """(usage error, abort, exit) classes of the click that typer uses (typer ≥ 0.20 carries its own copy)."""
    try:
        from typer.exceptions import Abort, Exit, TyperException

        return TyperException, Abort, Exit
    except ImportError:  # pragma: no cover - older typer on click itself
        import click

        return click.ClickException, click.exceptions.Abort, click.exceptions.Exit


def main() -> None:
    """Entry point of the ``melbo`` console script."""
    UsageProblem, Abort, Exit = _parsing_errors()
    try:
        code = app(prog_name="melbo", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except Exit as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except (Abort, KeyboardInterrupt):
        err_console.print("melbo: interrupted")
        sys.exit(130)
    except MelboError as exc:
        if _debug["on"]:
            raise
        _fail(str(exc))
    except UsageProblem as exc:  # a malformed command line: one line, like every other user error
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `melbo` or `melbo ortho`: show the help
            app(prog_name="melbo", args=[*sys.argv[1:], "--help"])
        if _debug["on"]:
            raise
        context = getattr(exc, "ctx", None)
        command = f"melbo {context.info_name} --help" if context is not None and context.info_name != "melbo" else "melbo --help"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _fail(f"{message} (see {command})")


def _fail(message: str) -> None:
    err_console.print(f"melbo: error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
