"""``melbo serve``: an OpenAI-compatible API with per-request steering, batched, and a live explorer page.

>>> from melbo.serve import serve
>>> serve(["runs/ortho14"], port=8000)          # doctest: +SKIP
"""

from __future__ import annotations

import errno
import importlib.util
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from melbo.errors import MelboError
from melbo.output.live import log_line
from melbo.serve.limits import ServeLimits

if TYPE_CHECKING:
    import uvicorn

    from melbo.serve.access import AccessLog


def missing_extra() -> str | None:
    """None when FastAPI and uvicorn are installed, else the one line that says how to get them."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    return f"melbo serve needs FastAPI and uvicorn ({', '.join(missing)} missing): pip install 'melbo[serve]'" if missing else None


def server_config(app: AccessLog, host: str, port: int, limits: ServeLimits, **options: object) -> uvicorn.Config:
    """How ``melbo serve`` runs uvicorn; ``options`` go to ``uvicorn.Config`` as they are (tests start their servers
    from this config, with uvicorn's logging left to pytest)."""
    import uvicorn

    settings: dict = {"log_level": "warning", "timeout_keep_alive": limits.keep_alive, **options}
    return uvicorn.Config(app, host=host, port=port, **settings)


def check_can_listen(host: str, port: int) -> None:
    """A one-line error, before the model loads, where ``host:port`` cannot be listened on (another server has the
    port, or the address is not this machine's); uvicorn would say so only after the load, and exit 3."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise MelboError(f"--host {host!r}: not an address this machine has ({exc.strerror})") from exc
    family, kind, proto, _, address = found[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise MelboError(f"{host}:{port} is in use (another server?): choose another --port") from exc
            raise MelboError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def serve(runs: Sequence[str | Path], model: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          device: str = "auto", dtype: str | None = None, limits: ServeLimits | None = None,
          on_ready: Callable[[int], None] | None = None, access_log: Callable[[str], None] | None = log_line,
          on_stop: Callable[[AccessLog], None] | None = None) -> None:
    """Load the runs' model once and serve until interrupted; ``on_ready(number of runs)`` once everything is
    checked and loaded, just before the server starts listening; ``access_log`` gets a line per answered request
    (default: a timestamped line on stderr; None: none); ``on_stop(app)`` once the server has stopped, however it
    stopped (uvicorn raises the signal that stopped it again afterwards), with ``app.answered`` and ``app.errors``."""
    problem = missing_extra()
    if problem:
        raise MelboError(problem)
    check_can_listen(host, port)
    import uvicorn

    from melbo.files.source import load_for_run
    from melbo.serve.api import create_app
    from melbo.serve.catalog import Catalog

    catalog = Catalog([Path(r) for r in runs])
    first = next(iter(catalog.runs.values()))
    lm = load_for_run(first.run, model, device, dtype)
    for served in catalog.runs.values():
        if served.run.vectors.shape[1] != lm.d_model:
            raise MelboError(f"run {served.name} has vectors of width {served.run.vectors.shape[1]}, the model {lm.d_model}")
    limits = limits or ServeLimits()
    app = create_app(lm, catalog, limits, access_log=access_log)
    if on_ready:
        on_ready(len(catalog.runs))
    try:
        uvicorn.Server(server_config(app, host, port, limits)).run()
    finally:
        if on_stop:
            on_stop(app)
