"""Output while work runs, in a terminal or a log: the two consoles, a timestamped line, block progress and the
study's live table.

Where a stream is not a terminal (nohup, a cluster job, CI) and COLUMNS is unset, tables print at their natural
width (never wrapped to 80 columns) and progress is one timestamped line per block or step instead of a live display.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar, ParamSpec

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from melbo.study.outcome import Event
    from melbo.study.spec import Study

P = ParamSpec("P")

LOG_WIDTH = 1000  # when output goes to a file: tables at their natural width, never wrapped
HEARTBEAT_S = 60.0  # in a log, work still running this many seconds after its last line gets a line saying how far it is


def goes_to_log(stream: object) -> bool:
    """Whether ``stream`` is a log rather than a terminal: it is no terminal and COLUMNS is unset (nohup, a cluster
    job, CI, a pipe)."""
    isatty = getattr(stream, "isatty", None)
    return not (callable(isatty) and isatty()) and "COLUMNS" not in os.environ


def make_console(stderr: bool = False) -> Console:
    """A rich console; where the stream is not a terminal and COLUMNS is unset, one wide enough that table rows
    stay whole lines in a log. A notebook (Jupyter, Colab) is no log: rich draws there as in a terminal."""
    target = Console(stderr=stderr)
    if target.is_jupyter or not goes_to_log(sys.stderr if stderr else sys.stdout):
        return target
    return Console(stderr=stderr, width=LOG_WIDTH)


def live_display(target: Console) -> bool:
    """Whether ``target`` can draw a live bar or spinner: a terminal, or a notebook with ipywidgets (rich draws there
    with them, and without them only warns); anything else gets lines."""
    return target.is_terminal or (target.is_jupyter and importlib.util.find_spec("ipywidgets") is not None)


def to_log(target: Console) -> bool:
    """Whether ``target`` writes to a log (no terminal, COLUMNS unset): there, text that could be wide goes as plain lines."""
    return target.width == LOG_WIDTH and not target.is_terminal


console = make_console()
err_console = make_console(stderr=True)


def log_line(text: str) -> None:
    """One timestamped progress line on stderr (what a log shows where no live display can be drawn)."""
    err_console.print(f"[{dt.datetime.now():%Y-%m-%d %H:%M:%S}] {text}", markup=False, highlight=False, soft_wrap=True)


def rough_duration(seconds: float) -> str:
    """A duration as a person reads it in a log: "40 s", "12 min", "6.8 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


def time_left(blocks_done: int, seconds: float, blocks_left: int) -> str:
    """"about 6 min left": ``blocks_left`` more blocks at the mean pace of the ``blocks_done`` that took ``seconds``
    ("" until a block has ended, or once none is left). A first block that compiles is slower than the rest, so the
    estimate starts high and settles."""
    if blocks_done < 1 or blocks_left < 1:
        return ""
    return f"about {rough_duration(seconds / blocks_done * blocks_left)} left"


class Pace:
    """A run's pace in this session: the first block seen here and when it was first reported (its first step's end,
    so what comes before the blocks, auto R's probes and θ0's continuations, is left out; a resumed run starts past
    block 0)."""

    def __init__(self, block: int, clock: Callable[[], float]) -> None:
        self.first, self.clock, self.since = block, clock, clock()

    def left(self, next_block: int, total: int | None) -> str:
        """:func:`time_left` for blocks ``next_block`` … ``total - 1``, those before it having ended ("" if ``total``
        is unknown)."""
        return time_left(next_block - self.first, self.clock() - self.since, total - next_block) if total else ""


class Status(contextlib.AbstractContextManager["Status"]):
    """What a command is doing, for work without blocks (eval, the judge): rich's spinner in a terminal; in a log, a
    timestamped line of it at most each ``every`` seconds and at each milestone (a prompt done), so that minutes of
    work are not silent under nohup (a spinner draws nothing there)."""

    def __init__(self, text: str, clock: Callable[[], float] = time.monotonic, every: float = HEARTBEAT_S) -> None:
        self.clock, self.every = clock, every
        # under a study's live table (one live display at a time) its lines print above the table
        self.spinner = err_console.status(text) if live_display(err_console) and not StudyView.drawing else None
        self.started = self.last = clock()

    def update(self, text: str, milestone: bool = False) -> None:
        if self.spinner is not None:
            self.spinner.update(text)
            return
        now = self.clock()
        if milestone or now - self.last >= self.every:
            log_line(f"{text} ({now - self.started:.0f} s)")
            self.last = now

    def __enter__(self) -> Status:
        if self.spinner is not None:
            self.spinner.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, trace: TracebackType | None) -> None:
        if self.spinner is not None:
            self.spinner.__exit__(kind, exc, trace)


class BlockLog(contextlib.AbstractContextManager["BlockLog"]):
    """Progress of blocks where stderr is not a terminal: one timestamped line as each block ends, with the time left
    where the number of blocks is known (a whole basis on a real model runs for hours under nohup), and a line for the
    step a block has reached each ``every`` seconds it runs (one block on a 0.5B model takes minutes)."""

    def __init__(self, total_blocks: int | None, what: str, clock: Callable[[], float] = time.monotonic,
                 steps: int | None = None, every: float = HEARTBEAT_S) -> None:
        self.total, self.what, self.clock, self.steps, self.every = total_blocks, what, clock, steps, every
        self.current: tuple[int, int, float] | None = None
        self.pace: Pace | None = None
        self.started = clock()
        self.last_line = self.started  # when the last line was written, or the first step came

    def on_step(self, block: int, step: int, loss: float) -> None:
        if self.current is not None and self.current[0] != block:
            self._line()
        if self.pace is None:  # the first step: a minute's wait counts from here (a new block's from its line above)
            self.pace = Pace(block, self.clock)
            self.last_line = self.clock()
        self.current = (block, step, loss)
        if self.clock() - self.last_line >= self.every:
            steps = f"/{self.steps}" if self.steps else ""
            self._write(f"{self._block(block)}: step {step}{steps}, loss {loss:,.4g} ({self.clock() - self.started:.0f} s)")

    def _block(self, block: int) -> str:
        return f"{self.what} block {block + 1}" + (f"/{self.total}" if self.total else "")

    def _write(self, text: str) -> None:
        log_line(text)
        self.last_line = self.clock()

    def _line(self) -> None:
        if self.current is None or self.pace is None:
            return
        block, step, loss = self.current
        seconds = self.clock() - self.started
        left = self.pace.left(block + 1, self.total)
        self._write(f"{self._block(block)}: {step} steps, loss {loss:,.4g} ({seconds:.0f} s{'; ' + left if left else ''})")

    def __exit__(self, *exc: object) -> None:
        self._line()


@contextlib.contextmanager
def unless_given(on_step: Callable[[int, int, float], None] | None, show: bool, total_blocks: int | None, steps: int | None,
                 what: str) -> Iterator[Callable[[int, int, float], None] | None]:
    """An engine's own progress where its caller gave no ``on_step`` and asked for it (``discover(…)`` from a notebook
    or a script): a bar in a terminal or notebook, a timestamped line per block, and each minute, in a log."""
    if on_step is not None or not show:
        yield on_step
        return
    display, shown = block_progress(total_blocks, steps, what)
    with display:
        yield shown


@contextlib.contextmanager
def status_unless_given(given: Callable[P, None] | None, show: bool, text: str,
                        describe: Callable[P, tuple[str, bool]]) -> Iterator[Callable[P, None] | None]:
    """The progress callback of work without blocks (eval, the judge, compose, probe): the caller's own (``given``),
    or where it gave none and asked for it (``show``), one that puts ``describe(…)``, a line and whether it is a
    milestone, on a :class:`Status` opened with ``text``."""
    if given is not None or not show:
        yield given
        return
    with Status(text) as status:

        def shown(*args: P.args, **kwargs: P.kwargs) -> None:
            status.update(*describe(*args, **kwargs))

        yield shown


def block_progress(total_blocks: int | None, steps: int | None, what: str) -> tuple[contextlib.AbstractContextManager[object], Callable[[int, int, float], None]]:
    """A rich progress bar fed by the engines' (block, step, loss) callback; a line per block in a log."""
    if not live_display(err_console):
        log = BlockLog(total_blocks, what, steps=steps)
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


class StudyView:
    """One live table for a whole study: each unit waiting, running (stage, run, block, step, loss) or done; in a
    log, a timestamped line per stage and block instead. Units are named as ``names`` says (unit label → short name,
    "R 20 · prompt 1", as the study's table and page name them); a log first says what each short name stands for."""

    drawing: ClassVar[bool] = False  # a study's live table is on screen: a Status prints lines, not a second display

    def __init__(self, units: list[str], clock: Callable[[], float] = time.monotonic, names: dict[str, str] | None = None) -> None:
        self.names = {u: n for u, n in (names or {}).items() if n}
        self.rows: dict[str, list[str]] = {u: ["waiting", "", "", "", ""] for u in units}
        self.live = Live(self._table(), console=err_console, refresh_per_second=4, transient=False)
        self.plain = not live_display(err_console)
        self.seen: dict[str, tuple[str, str, str]] = {}
        self.clock = clock
        self.paces: dict[tuple[str, str, str], Pace] = {}  # by (unit, stage, run)
        self.last_line: dict[str, float] = {}  # by unit: when its last line was written

    def _table(self) -> Table:
        table = Table(title="study", show_edge=False)
        for column in ("unit", "status", "stage", "run", "block", "step / loss"):
            table.add_column(column)
        for unit, row in self.rows.items():  # Text: a unit's name is the study file's, never markup
            table.add_row(Text(self.names.get(unit, unit) or "(the study)"), *(Text(cell) for cell in row))
        return table

    def __call__(self, event: Event) -> None:
        if event.note:  # a line of its own, in a terminal too (above the live table): R's candidates take a while
            log_line(f"{self._unit(event.unit)}: {event.stage}: {event.note}")
            return
        row = self.rows.setdefault(event.unit, ["waiting", "", "", "", ""])
        for other, values in self.rows.items():
            if other != event.unit and values[0] == "running":
                values[0] = "done"
        row[0], row[1], row[2] = "running", event.stage, event.run
        if event.steps is not None or event.step:
            row[3] = f"{event.block + 1}" + (f"/{event.blocks}" if event.blocks else "")
            row[4] = f"{event.step}" + (f"/{event.steps}" if event.steps else "") + (f"  {event.loss:,.4g}" if event.loss is not None else "")
        else:
            row[3] = row[4] = ""
        if not self.plain:
            self.live.update(self._table())
        elif self.seen.get(event.unit) != (event.stage, event.run, row[3]):  # a line per stage and per block
            self.seen[event.unit] = (event.stage, event.run, row[3])
            where = f" block {row[3]}" if row[3] else ""
            self._line(event, f"{where}{self._left(event) if where else ''}")
        elif event.step and self.clock() - self.last_line.get(event.unit, self.clock()) >= HEARTBEAT_S:  # a long block
            steps = f"/{event.steps}" if event.steps else ""
            loss = f", loss {event.loss:,.4g}" if event.loss is not None else ""
            self._line(event, f" block {row[3]}: step {event.step}{steps}{loss}")

    def _line(self, event: Event, where: str) -> None:
        run = f" {event.run}" if event.run and event.run != event.stage else ""  # a one-unit study's runs are named for their stage
        log_line(f"{self._unit(event.unit)}: {event.stage}{run}{where}")
        self.last_line[event.unit] = self.clock()

    def _unit(self, unit: str) -> str:
        return self.names.get(unit, unit) or "study"

    def _left(self, event: Event) -> str:
        """", about 6 min left" in this block's run, once a block of it has ended here (a new block's line says the one
        before ended)."""
        key = (event.unit, event.stage, event.run)
        if key not in self.paces:
            self.paces[key] = Pace(event.block, self.clock)
        left = self.paces[key].left(event.block, event.blocks)
        return f", {left}" if left else ""

    def finish(self) -> None:
        for values in self.rows.values():
            values[0] = "done"
        if not self.plain:
            self.live.update(self._table())

    def __enter__(self) -> StudyView:
        for unit, name in self.names.items():
            log_line(f"{name} is {unit}")
        if not self.plain:
            self.live.__enter__()
            StudyView.drawing = True
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, trace: TracebackType | None) -> None:
        if not self.plain:
            StudyView.drawing = False
            self.live.__exit__(kind, exc, trace)


@contextlib.contextmanager
def study_view_unless_given(on_event: Callable[[Event], None] | None, show: bool, study: Study) -> Iterator[Callable[[Event], None] | None]:
    """A study's own live table (lines in a log) where its caller gave no ``on_event`` and asked for it
    (``run_study(…)`` from a notebook or a script), its units named as the study's table names them."""
    if on_event is not None or not show:
        yield on_event
        return
    units, short = study.units(), study.short_labels()
    with StudyView([u.label for u in units], names={u.label: short[u.name] for u in units}) as view:
        yield view
        view.finish()
