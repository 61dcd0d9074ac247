"""Commands that run whole studies: ``study`` (a TOML file) and ``demo`` (the built-in study on SmolLM2)."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Annotated

import typer
from rich.live import Live
from rich.table import Table

from melbo.cli.app import DeviceOpt, app, console, err_console, log_line, make_table, out_folder, short
from melbo.errors import MelboError

if TYPE_CHECKING:  # the study package imports torch: only for type checkers here
    from melbo.study import Event, Study, StudyResult
    from melbo.study.on_ray import RayOptions


class StudyView:
    """One live table for a whole study: each unit waiting, running (stage, run, block, step, loss) or done."""

    def __init__(self, units: list[str]) -> None:
        self.rows: dict[str, list[str]] = {u: ["waiting", "", "", "", ""] for u in units}
        self.live = Live(self._table(), console=err_console, refresh_per_second=4, transient=False)
        self.plain = not err_console.is_terminal  # a log: a timestamped line per stage and block instead of the live table
        self.seen: dict[str, tuple[str, str, int]] = {}

    def _table(self) -> Table:
        table = Table(title="study", show_edge=False)
        for column in ("unit", "status", "stage", "run", "block", "step / loss"):
            table.add_column(column)
        for unit, row in self.rows.items():
            table.add_row(unit or "(the study)", *row)
        return table

    def __call__(self, event: Event) -> None:
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
        elif self.seen.get(event.unit) != (event.stage, event.run, event.block):
            self.seen[event.unit] = (event.stage, event.run, event.block)
            where = f" block {row[3]}" if row[3] else ""
            log_line(f"{event.unit or 'study'}: {event.stage} {event.run}{where}".rstrip())

    def finish(self) -> None:
        for values in self.rows.values():
            values[0] = "done"
        if not self.plain:
            self.live.update(self._table())

    def __enter__(self) -> StudyView:
        if not self.plain:
            self.live.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, trace: TracebackType | None) -> None:
        if not self.plain:
            self.live.__exit__(kind, exc, trace)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `kill`'s stop), handled as Ctrl-C is."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread (Ray's own handler would dump a stack)."""
    def stop(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(study_obj: Study, folder: Path, resume: bool, force: bool, ray: RayOptions | None = None) -> StudyResult:
    from melbo.study import run_study

    try:
        with sigterm_as_interrupt():
            if ray is None:
                with StudyView([u.label for u in study_obj.units()]) as view:
                    result = run_study(study_obj, folder, resume=resume, force=force, on_event=view)
                    view.finish()
            else:
                from melbo.study.on_ray import RaySession, run_study_on_ray

                with err_console.status("starting Ray…" if ray.address is None else f"joining the Ray cluster at {ray.address}…"):
                    session = RaySession(study_obj, ray)  # a cluster that cannot be reached or lacks GPUs: one line, nothing written
                with session, sigterm_as_interrupt(), StudyView([u.label for u in study_obj.units()]) as view:  # again: Ray set its own
                    result = run_study_on_ray(study_obj, folder, ray, resume=resume, force=force, on_event=view, session=session)
                    view.finish()
    except KeyboardInterrupt as exc:
        why = "stopped (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        err_console.print(f"melbo: {why}; {folder} holds every finished step and block: run the same command with --resume")
        raise SystemExit(143 if isinstance(exc, Terminated) else 130) from None
    return result


@app.command()
def study(
    spec: Annotated[Path, typer.Argument(help="A study file (TOML): see examples/ and the README.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Study folder (default melbo-runs/STUDY-DATE).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the study in --out: finished steps are skipped.")] = False,
    force: Annotated[bool, typer.Option(help="Start the study in --out again from scratch.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override one setting: TABLE.FIELD=VALUE (a TOML value), repeatable.")] = None,
    ray: Annotated[str | None, typer.Option(
        "--ray", metavar="[ADDRESS]",
        help="Run on Ray: alone (or 'local'), a local Ray for this call; auto, HOST:PORT or ray://HOST:10001, an existing cluster.",
    )] = None,
    num_cpus: Annotated[float | None, typer.Option(min=0.0, help="With --ray: CPUs per worker (default: the study's ray table, else 1).")] = None,
    num_gpus: Annotated[float | None, typer.Option(min=0.0, help="With --ray: GPUs per worker (default: the study's ray table, else 0).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="With --ray: workers per model (default: as the cluster allows).")] = None,
) -> None:
    """Run every run a study file describes (in this process, or on Ray); writes OUT/study.html and a report per run."""
    from melbo.study import Study

    started = time.monotonic()
    study_obj = Study.from_toml(spec)
    if set_:
        study_obj = study_obj.with_values(dict(_parse_setting(item) for item in set_))
    options = None
    if ray is not None:
        from melbo.study.on_ray import RayOptions, missing_extra

        if missing_extra():
            raise MelboError(missing_extra())
        table = study_obj.ray
        options = RayOptions(
            address=None if ray == "local" else ray, num_cpus=table.num_cpus if num_cpus is None else num_cpus,
            num_gpus=table.num_gpus if num_gpus is None else num_gpus, workers=table.workers if workers is None else workers,
        )
    elif num_cpus is not None or num_gpus is not None or workers is not None:
        raise MelboError("--num-cpus, --num-gpus and --workers go with --ray")
    folder = out_folder(out, study_obj.name, force, resume)
    result = _run(study_obj, folder, resume, force, options)
    _print_rows(result)
    loads = f"; {result.model_loads} model load(s)" if result.model_loads is not None else ""
    console.print(f"study: [bold]{result.page}[/bold]  ({time.monotonic() - started:.0f} s{loads})")


def _parse_setting(item: str) -> tuple[str, object]:
    """``discover.radius=20`` → ("discover.radius", 20.0): the value is read as TOML, else kept as text."""
    import tomllib

    key, sep, text = item.partition("=")
    if not sep or "." not in key:
        raise MelboError(f"--set {item!r}: use TABLE.FIELD=VALUE, e.g. --set discover.radius=20")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key.strip(), value


def _print_rows(result: StudyResult) -> None:
    from melbo.report.study import study_rows

    table = Table(title=f"study {result.study.name}: {len(result.units)} unit(s)")
    for column in ("unit", "run", "vectors", "base", "median KL", "behaviour share", "time"):
        table.add_column(column)
    for r in study_rows(result):
        share = "" if r.behaviour_share is None else f"{100 * r.behaviour_share:.0f} %"
        kl = "" if r.median_kl is None else f"{r.median_kl:.3f}"
        table.add_row(r.unit, r.folder, str(r.vectors), r.base, kl, share, "" if r.seconds is None else f"{r.seconds:.0f} s")
    console.print(table)


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for the two runs (default melbo-runs/demo-DATE).")] = None,
    ortho_count: Annotated[int | None, typer.Option(help="Orthogonal vectors to find (default: the study's, 32).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite runs already in --out.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the demo in --out.")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="A few seconds: few vectors and steps, to check the set-up.")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """The main job on the embedded SmolLM2 (the study examples/demo.toml): discover vectors, pick the clearest,
    find orthogonal copies of it, evaluate and compose them, and write reports."""
    from melbo.analysis.evaluate import EvalResults
    from melbo.cli.analysis import print_controls
    from melbo.cli.runs import print_ortho_table
    from melbo.files.runs import read_run
    from melbo.study import demo_study

    started = time.monotonic()
    study_obj = demo_study(quick=quick, ortho_count=ortho_count)
    if device != "auto":
        study_obj = study_obj.with_values({"model.device": device})
    folder = out_folder(out, "demo", force, resume)
    if (folder / "study.json").exists() and not (force or resume):
        raise MelboError(f"{folder} already holds a demo; choose another --out, or pass --resume or --force")
    unit = study_obj.units()[0]
    d = unit.discover
    assert d is not None and unit.ortho is not None  # the built-in study has both
    layers = f"after layer {d.source}" if d.source is not None else "about a third of the way in"
    read = f"after layer {d.target}" if d.target is not None else "about two thirds in"
    console.print(
        f"[bold]melbo demo[/bold] on SmolLM2-135M-Instruct: prompt {unit.prompts.prompts[0]!r}, vectors added {layers}, "
        f"change measured {read}, R = {d.radius if isinstance(d.radius, str) else format(d.radius, 'g')}."
    )
    result = _run(study_obj, folder, resume, force)
    outcome = result.units[0]
    choice, ortho = outcome.bases[0], outcome.orthos[0]
    found = read_run(result.folder / outcome.discovery)
    if found.meta.radius_choice:
        console.print(f"R = {found.meta.R:g}, layers {found.meta.source} → {found.meta.target}: {found.meta.radius_choice.reason}")
    table = make_table("Discovered vectors (fluency = NLL under the unsteered model; effect = first-token KL to unsteered)", (("#", "right"), ("label", "left"), ("NLL", "right"), ("effect", "right"), ("completion", "left")))
    for c in choice.candidates:
        mark = "[bold green]" if c.index == choice.index else ""
        table.add_row(f"{mark}{c.index}", c.label, f"{c.nll:.2f}", f"{c.effect:.2f}", short(c.completion, 80))
    console.print(table)
    console.print(f"[bold]Base vector:[/bold] {choice.reason()}.")
    console.print(f"  unsteered model: {short(ortho.fidelity.unsteered_completion, 100)!r}")
    console.print(f"  base vector:     {short(choice.completion, 100)!r}")
    print_ortho_table(read_run(result.folder / ortho.folder))
    share = "" if ortho.behaviour_share is None else f"; behaviour share {ortho.behaviour_share:.0%} (copies labelled {choice.label}, as the base)"
    console.print(f"[bold]{ortho.fidelity.sentence()}[/bold]{share}.")
    controls = EvalResults.load(read_run(result.folder / ortho.folder)).controls
    if controls is not None:
        print_controls(controls)
    console.print(f"runs: [bold]{result.folder / outcome.discovery}[/bold] and [bold]{result.folder / ortho.folder}[/bold]   ({time.monotonic() - started:.0f} s)")
    reports = [result.folder / r for r in outcome.reports]
    console.print(f"report: [bold]{reports[0]}[/bold]  (open it in a browser; the discovery run's is {reports[-1]}; the study's is {result.page})")
