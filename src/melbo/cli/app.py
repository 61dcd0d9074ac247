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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console, JustifyMethod
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from melbo.errors import MelboError
from melbo.model.prompts import DEFAULT_PROMPT, PromptFormat

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
LOG_WIDTH = 1000  # when output goes to a file (nohup, a cluster job, CI): tables at their natural width, never wrapped


def _console(stderr: bool = False) -> Console:
    """A rich console; where the stream is not a terminal and COLUMNS is unset, one wide enough that table rows
    stay whole lines in a log."""
    stream = sys.stderr if stderr else sys.stdout
    plain = not (hasattr(stream, "isatty") and stream.isatty()) and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=LOG_WIDTH if plain else None)


console = _console()
err_console = _console(stderr=True)
debug = {"on": bool(os.environ.get("MELBO_DEBUG"))}

# Options shared by the commands that load a model or read prompts. `-p` is always a prompt.
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="'smollm2' (embedded default), a Hugging Face id, a model folder or a .gguf file."),
]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
DtypeOpt = Annotated[str | None, typer.Option(help="float32 (default on CPU), bfloat16 (default on GPU) or float16.")]
SystemOpt = Annotated[str | None, typer.Option("--system", help="System prompt for the chat template.")]
RawOpt = Annotated[bool | None, typer.Option(
    "--chat-template/--no-chat-template", show_default=False,
    help="Format prompts with the chat template, or use them as raw text (default: the run's format, else the template).",
)]
PromptsOpt = Annotated[list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeatable).")]
PromptOpt = Annotated[str, typer.Option("--prompt", "-p", help="The prompt.")]
PromptFileOpt = Annotated[Path | None, typer.Option("--prompt-file", help="A file with one prompt per line.")]
ForceOpt = Annotated[bool, typer.Option(help="Overwrite a run already in --out.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last completed block.")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (default melbo-runs/KIND-DATE).")]
NewTokensOpt = Annotated[int, typer.Option(min=1, help="Tokens generated per completion.")]
RunArg = Annotated[Path, typer.Argument(help="A run folder.")]
OrthoRunArg = Annotated[Path, typer.Argument(help="A MELBO-ortho run folder (row 0 = θ0).")]


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

    lm = load(model or run_model(run), device, dtype)
    validate_vectors(run.vectors, str(run.path), lm.d_model)
    return lm, run.meta.prompt_format


def run_model(run: Run) -> str | None:
    """The model a run was made with, found also after the run or a GGUF file moved (or a one-line error)."""
    from melbo.model.loading import locate_model

    return locate_model(run.meta.model, f"run {run.path}")


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


def log_line(text: str) -> None:
    """One timestamped progress line on stderr (what a log shows where no live display can be drawn)."""
    err_console.print(f"[{dt.datetime.now():%Y-%m-%d %H:%M:%S}] {text}", markup=False, highlight=False, soft_wrap=True)


class BlockLog(contextlib.AbstractContextManager["BlockLog"]):
    """Progress of blocks where stderr is not a terminal: one timestamped line as each block ends."""

    def __init__(self, total_blocks: int | None, what: str) -> None:
        self.total, self.what = total_blocks, what
        self.current: tuple[int, int, float] | None = None
        self.started = dt.datetime.now()

    def on_step(self, block: int, step: int, loss: float) -> None:
        if self.current is not None and self.current[0] != block:
            self._line()
        self.current = (block, step, loss)

    def _line(self) -> None:
        if self.current is None:
            return
        block, step, loss = self.current
        total = f"/{self.total}" if self.total else ""
        log_line(f"{self.what} block {block + 1}{total}: {step} steps, loss {loss:,.4g} ({(dt.datetime.now() - self.started).total_seconds():.0f} s)")

    def __exit__(self, *exc: object) -> None:
        self._line()


def block_progress(total_blocks: int | None, steps: int | None, what: str) -> tuple[contextlib.AbstractContextManager[object], Callable[[int, int, float], None]]:
    """A rich progress bar fed by the engines' (block, step, loss) callback; a line per block in a log."""
    if not err_console.is_terminal:
        log = BlockLog(total_blocks, what)
        return log, log.on_step
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(), console=err_console, transient=False,
    )
    tasks: dict[int, TaskID] = {}

    def on_step(block: int, step: int, loss: float) -> None:
        if block not in tasks:
            for done in tasks.values():
                progress.update(done, completed=progress.tasks[done].total)
            label = f"{what} block {block + 1}" + (f"/{total_blocks}" if total_blocks else "")
            tasks[block] = progress.add_task(label, total=steps, loss="…")
        progress.update(tasks[block], completed=step, loss=f"{loss:,.4g}")

    return progress, on_step


def make_table(title: str, columns: Sequence[tuple[str, JustifyMethod]]) -> Table:
    """A table with these (name, justify) columns."""
    table = Table(title=title)
    for name, justify in columns:
        table.add_column(name, justify=justify)
    return table


def short(text: str | None, width: int = 110) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def run_prompts(prompts: list[str] | None, prompt_file: Path | None, fallback: list[str] | None = None) -> list[str]:
    """Prompts from --prompt/--prompt-file; else ``fallback`` (a run's prompts); else the default prompt."""
    from melbo.model.prompts import read_prompts

    if prompts or prompt_file:
        return read_prompts(prompts, prompt_file, default=None)
    return list(fallback) if fallback else [DEFAULT_PROMPT]


def fail(message: str) -> None:
    err_console.print(f"melbo: error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(2)
