"""The ``melbo`` command: a thin layer over the Python API. It parses options, calls the API, prints.

Errors a user can cause (:class:`melbo.MelboError`) print as one line on stderr with exit status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

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
    from melbo.runs import load_vector_file, read_run

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
    lm = _load(model, device, dtype)
    vectors = record.vectors if record is not None else load_vector_file(vector)  # type: ignore[arg-type]
    from melbo.runs import validate_vectors

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


def main() -> None:
    """Entry point of the ``melbo`` console script."""
    try:
        app(prog_name="melbo")
    except MelboError as exc:
        if _debug["on"]:
            raise
        err_console.print(f"melbo: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("melbo: interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
