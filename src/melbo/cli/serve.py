"""``melbo serve``: the runs' model behind an OpenAI-compatible API with per-request steering, and a live page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from melbo.cli import options as opt
from melbo.cli.app import app
from melbo.output.live import console, err_console
from melbo.serve.limits import ServeLimits


@app.command()
@opt.config_options(ServeLimits, before="device")
def serve(
    runs: Annotated[list[Path], typer.Argument(help="Run folders to serve (one model's), each under its folder's name; a folder of runs (a demo's, a study's, melbo-runs/) serves each run in it, named by its path there.")],
    model: opt.Model = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default: only this machine).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    device: opt.Device = "auto",
    dtype: opt.Dtype = None,
    *, cfg: ServeLimits,
) -> None:
    """Serve steered completions (OpenAI API: /v1/chat/completions with a "melbo" field) and the explorer page at /."""
    from melbo.serve import serve as run_server

    def ready(count: int) -> None:  # only once the runs and the model are loaded: bad input never sees these lines
        if host not in ("127.0.0.1", "localhost", "::1"):
            err_console.print(f"[yellow]melbo serve: listening on {host}: anyone who can reach it can use the model[/yellow]")
        console.print(f"melbo serve: {count} run(s) on http://{host}:{port}/ (explorer), OpenAI API at http://{host}:{port}/v1 — Ctrl-C stops")

    run_server(runs, model=model, host=host, port=port, device=device, dtype=dtype, limits=cfg, on_ready=ready)
