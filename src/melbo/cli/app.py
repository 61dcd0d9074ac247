"""The ``melbo`` Typer app, the options several commands share, and the helpers every command uses.

Option defaults come from the API's config dataclasses (``DiscoverConfig``, ``OrthoConfig``, ``EvalConfig``...),
so the shell and Python share one set of defaults; ``tests/test_cli_defaults.py`` checks that they agree.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from melbo.errors import MelboError
from melbo.model.prompts import DEFAULT_PROMPT, PromptFormat
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


def load(model: str | None, device: str, dtype: str | None) -> LoadedModel:
    from melbo.model.loading import load_model

    with err_console.status(f"loading {model or 'smollm2'}…"):
        return load_model(model, device=device, dtype=dtype)


def load_for_run(run: Run, model: str | None, device: str, dtype: str | None) -> tuple[LoadedModel, PromptFormat]:
    """The model a run was made with (or --model), checked against its vectors, and the run's prompt format."""
    from melbo.files.vectors import validate_vectors
    from melbo.model.loading import locate_model

    lm = load(model or locate_model(run.meta.model, f"run {run.path}"), device, dtype)
    validate_vectors(run.vectors, str(run.path), lm.d_model)
    return lm, run.meta.prompt_format


def prompt_format(system: str | None, chat_template: bool | None, run_format: PromptFormat | None = None) -> PromptFormat:
    """The prompt format a command uses: what the options say, else the run's (system prompt, chat template or raw)."""
    if run_format is not None:
        system = system if system is not None else run_format.system
        chat_template = chat_template if chat_template is not None else run_format.chat_template
    return PromptFormat(system=system, chat_template=True if chat_template is None else chat_template)


def out_folder(out: Path | None, kind: str, force: bool, resume: bool = False) -> Path:
    """The folder a command writes: checked (not another run unless --force/--resume, writable) before any work."""
    if resume and out is None:
        raise MelboError("--resume needs --out: the folder to continue")
    folder = out or Path("melbo-runs") / f"{kind}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    if (folder / "run.json").exists() and not (force or resume):
        raise MelboError(f"{folder} already holds a run; continue it with --resume, or pass --force to start it again")
    if folder.exists() and not folder.is_dir():
        raise MelboError(f"--out {folder} is a file, not a folder")
    parent = folder.absolute()
    while not parent.exists():
        parent = parent.parent
    try:  # a probe that leaves nothing behind
        shutil.rmtree(tempfile.mkdtemp(prefix=".melbo-probe-", dir=parent))
    except OSError as exc:
        raise MelboError(f"cannot write the run folder {folder}: {exc.strerror or exc}; choose another --out") from exc
    return folder


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


def run_prompts(prompts: list[str] | None, prompt_file: Path | None, fallback: list[str] | None = None) -> list[str]:
    """Prompts from --prompt/--prompt-file; else ``fallback`` (a run's prompts); else the default prompt."""
    from melbo.model.prompts import read_prompts

    if prompts or prompt_file:
        return read_prompts(prompts, prompt_file, default=None)
    return list(fallback) if fallback else [DEFAULT_PROMPT]


def fail(message: str) -> None:
    err_console.print(f"melbo: error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(2)
