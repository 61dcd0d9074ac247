"""Commands that move vectors between melbo and other tools: ``export``, ``import``, ``import-post-dump``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from melbo.cli import options as opt
from melbo.cli.app import app
from melbo.files.folders import new_run_folder
from melbo.output.live import console


@app.command("import-post-dump")
def import_post_dump_command(
    dump: Annotated[Path, typer.Argument(help="One of the post's text dumps, e.g. code-vectors-bomb.txt.")],
    out: opt.Out = None,
    composition: Annotated[Path | None, typer.Option(help="The matching *-outputs-meaned-scaled.txt (found beside the dump when not given).")] = None,
    force: opt.Force = False,
) -> None:
    """Make a run folder from the original post's published outputs, to browse with `melbo report`."""
    from melbo.files.postdump import import_post_dump

    folder = new_run_folder(out, "post", force)
    import_post_dump(dump, folder, composition)
    console.print(f"imported {dump.name} into {folder}; browse it with: melbo report {folder}")


@app.command("export")
def export_command(
    run: opt.Run,
    format: Annotated[str, typer.Option("--format", "-f", help="gguf (llama.cpp), repeng, steering-vectors, pt or npy.")] = "gguf",
    index: opt.Indices = "0",
    scale: opt.Scale = 1.0,
    layer: opt.Layer = None,
    out: Annotated[str | None, typer.Option(
        "--out", "-o", metavar="<path>", help="File (one vector, or pt/npy) or folder (several control vectors); one file into an existing "
        "folder or one ending in / is named for the run (default: here, as RUN-3.gguf, RUN-0-99.pt or RUN-all/).",
    )] = None,
) -> None:
    """Write vectors for llama.cpp (--control-vector), repeng, steering-vectors, or as .pt/.npy."""
    from melbo.files.interop import export_vectors, parse_indices
    from melbo.files.runs import read_run

    record = read_run(run)
    written = export_vectors(record, out, format, parse_indices(index, record.vectors.shape[0]), scale, layer)
    console.print("\n".join(f"wrote {path}" for path in written), soft_wrap=True)
    if format in ("gguf", "repeng"):
        used = record.source_layer if layer is None else layer
        console.print(f"llama.cpp: llama-cli -m MODEL.gguf --control-vector {written[0]} (direction.{used} = after block {used})")


@app.command("import")
def import_command(
    source: Annotated[Path, typer.Argument(help="A .gguf control vector, a steering-vectors .pt, the post's .pt, a .npy or a .safetensors.")],
    out: opt.Out = None,
    layer: Annotated[int | None, typer.Option(help="The layer to take (multi-layer files) or to record (.pt/.npy).")] = None,
    force: opt.Force = False,
) -> None:
    """Make a run folder from a vector file, so melbo's commands can use it."""
    from melbo.files.interop import import_file

    folder = new_run_folder(out, "import", force)
    run = import_file(source, folder, layer)
    console.print(f"imported {run.vectors.shape[0]} vector(s) of width {run.vectors.shape[1]} into {folder}")
