"""``melbo serve``: the runs' model behind an OpenAI-compatible API with per-request steering, and a live page."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from melbo.cli import options as opt
from melbo.cli.app import app
from melbo.output.live import console, err_console, log_line
from melbo.serve.limits import ServeLimits
from melbo.study.signals import by_sigterm, sigterm_as_interrupt

if TYPE_CHECKING:
    from melbo.serve.access import AccessLog


@app.command()
@opt.config_options(ServeLimits, before="device")
def serve(
    runs: Annotated[list[Path], typer.Argument(help="Run folders to serve (one model's), each under its folder's name; a folder of runs (a demo's, a study's, melbo-runs/) serves each run in it, named by its path there.")],
    model: opt.Model = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default: only this machine).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    device: opt.Device = "auto",
    dtype: opt.Dtype = None,
    access_log: Annotated[bool, typer.Option(help="A timestamped line on stderr per answered request: status, seconds, steering, token counts (never the text).")] = True,
    *, cfg: ServeLimits,
) -> None:
    """Serve steered completions (OpenAI API: /v1/chat/completions with a "melbo" field) and the explorer page at /."""
    from melbo.serve import serve as run_server

    def ready(count: int) -> None:  # only once the runs and the model are loaded: bad input never sees these lines
        if host not in ("127.0.0.1", "localhost", "::1"):
            err_console.print(f"[yellow]melbo serve: listening on {host}: anyone who can reach it can use the model[/yellow]")
        console.print(f"melbo serve: {count} run(s) on http://{host}:{port}/ (explorer), OpenAI API at http://{host}:{port}/v1 — Ctrl-C stops")

    def stopped(app: AccessLog) -> None:
        served.append(app)
        how = "by SIGTERM" if signal.SIGTERM in received else "by Ctrl-C" if received else ""
        console.print(f"melbo serve: stopped{' ' + how if how else ''} after {app.answered} request(s), {app.errors} answered with an error")

    received: list[int] = []
    served: list[AccessLog] = []
    try:  # uvicorn shuts down gracefully on SIGINT or SIGTERM, then raises the signal again: here, as an interrupt
        with sigterm_as_interrupt(received):
            run_server(runs, model=model, host=host, port=port, device=device, dtype=dtype, limits=cfg, on_ready=ready,
                       access_log=log_line if access_log else None, on_stop=stopped)
    except KeyboardInterrupt as exc:
        if not served:  # stopped while the model loaded
            err_console.print(f"melbo: {'stopped (SIGTERM)' if by_sigterm(exc, received) else 'interrupted'}")
        raise SystemExit(143 if by_sigterm(exc, received) else 130) from None
