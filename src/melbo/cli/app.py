"""The ``melbo`` Typer app, the options several commands share, and the helpers every command uses.

Option defaults come from the API's config dataclasses (``DiscoverConfig``, ``OrthoConfig``, ``EvalConfig``...),
so the shell and Python share one set of defaults; ``tests/test_cli_defaults.py`` checks that they agree.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from melbo.output.live import err_console

if TYPE_CHECKING:
    from melbo.files.runs import Run
    from melbo.model.loading import LoadedModel

app = typer.Typer(
    name="melbo",
    help="Find steering vectors without supervision (MELBO) and many orthogonal vectors that reproduce one "
    "(MELBO-ortho). Layer L means the residual stream after decoder block L (blocks counted from 0).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
debug = {"on": bool(os.environ.get("MELBO_DEBUG"))}

@app.callback()
def _root(debug_flag: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False) -> None:
    if debug_flag:
        debug["on"] = True


def load(model: str | None, device: str, dtype: str | None, run: Run | None = None) -> LoadedModel:
    """The model (--model, else the run's, checked against its vectors), loaded behind a spinner."""
    from melbo.files.source import load_for_run
    from melbo.model.loading import load_model

    with err_console.status(f"loading {model or (run.meta.model.get('name') if run else None) or 'smollm2'}…"):
        return load_model(model, device=device, dtype=dtype) if run is None else load_for_run(run, model, device, dtype)


@contextlib.contextmanager
def interruptible(folder: Path) -> Iterator[None]:
    """Ctrl-C ends a long run cleanly: every completed block is already saved in the run folder."""
    try:
        yield
    except KeyboardInterrupt:
        err_console.print(
            f"melbo: interrupted; {folder} holds every completed block: run the same command with --resume to continue"
        )
        sys.exit(130)


def fail(message: str) -> None:
    err_console.print(f"melbo: error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(2)
