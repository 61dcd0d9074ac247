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
from typer import _click as click  # the click typer vendors (≥ 0.26), whose classes its groups take
from typer.core import TyperGroup

from melbo.output.live import err_console, goes_to_log

if TYPE_CHECKING:
    import torch

    from melbo.files.runs import Run
    from melbo.files.source import VectorSource
    from melbo.model.loading import LoadedModel

HELP_LOG_WIDTH = 120  # --help's width in a file or a pipe
_help_to_log = goes_to_log(sys.stdout)

# `melbo --help` lists the commands in the order of the work: the main job, then choosing layers and R, finding vectors,
# studying them, moving them between tools, and running many or serving them. A command left out goes last.
HELP_ORDER = ("demo", "info", "discover", "ortho", "generate", "eval", "judge", "compose", "probe", "report",
              "export", "import", "import-post-dump", "study", "serve")


class _InWorkOrder(TyperGroup):
    """Typer lists commands in the order the modules registered them, which is the imports' (alphabetical) order."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda name: HELP_ORDER.index(name) if name in HELP_ORDER else len(HELP_ORDER))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Plain help (a file, a pipe): each command's first sentence whole, wrapped, as rich's panel shows it; click
        would cut it at one line with "..."."""
        rows = [(name, command.get_short_help_str(limit=10_000)) for name in self.list_commands(ctx)
                if (command := self.get_command(ctx, name)) is not None and not command.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


app = typer.Typer(
    name="melbo",
    cls=_InWorkOrder,
    help="Find steering vectors without supervision (MELBO) and many orthogonal vectors that reproduce one "
    "(MELBO-ortho). Layer L means the residual stream after decoder block L (blocks counted from 0).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # --help in a terminal: rich's panels; into a file or a pipe: click's plain text, HELP_LOG_WIDTH wide (rich would
    # draw its panels at 80 columns there, each option's help squeezed into a column a fifth as wide)
    rich_markup_mode=None if _help_to_log else "rich",
    context_settings={"terminal_width": HELP_LOG_WIDTH} if _help_to_log else {},
)
debug = {"on": bool(os.environ.get("MELBO_DEBUG"))}

@app.callback()
def _root(debug_flag: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False) -> None:
    debug["on"] = debug["on"] or debug_flag


def load(model: str | None, device: str, dtype: str | None, vectors: Run | VectorSource | None = None) -> LoadedModel:
    """The model (--model, else the one the vectors' run records, checked against their width), behind a spinner."""
    from melbo.files.source import VectorSource, of_run
    from melbo.model.loading import load_model

    found = of_run(vectors) if vectors is not None and not isinstance(vectors, VectorSource) else vectors
    with err_console.status(f"loading {model or ((found.recorded_model or {}).get('name') if found else None) or 'smollm2'}…"):
        return load_model(model, device=device, dtype=dtype) if found is None else found.load(model, device, dtype)


def warn_if_slow_bfloat16(device: torch.device, *precisions: str | None) -> bool:
    """One line on stderr when the options ask for bfloat16 products where ``device`` computes them in software;
    whether it warned."""
    from melbo.model.fastpath import slow_bfloat16

    why = slow_bfloat16(device, *precisions)
    if why:
        err_console.print(f"melbo: warning: {why}", markup=False, highlight=False, soft_wrap=True)
    return why is not None


@contextlib.contextmanager
def interruptible(folder: Path) -> Iterator[None]:
    """Ctrl-C ends a long run cleanly: every completed block is already saved in the run folder."""
    try:
        yield
    except KeyboardInterrupt:
        err_console.print(f"melbo: interrupted; {folder} holds every completed block: run the same command with --resume to continue")
        sys.exit(130)


def fail(message: str) -> None:
    err_console.print(f"melbo: error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(2)
