"""Commands that run whole studies: ``study`` (a TOML file) and ``demo`` (the built-in study on SmolLM2)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from melbo.cli import options as opt
from melbo.cli.app import app, warn_if_slow_bfloat16
from melbo.files.folders import new_run_folder
from melbo.output import tables
from melbo.output.live import console, err_console, study_view_unless_given

if TYPE_CHECKING:  # the study package imports torch: only for type checkers here
    from melbo.study import Study, StudyResult
    from melbo.study.on_ray import RayOptions


def _run(study_obj: Study, folder: Path, resume: bool, force: bool, ray: RayOptions | None = None) -> StudyResult:
    """The study in this process or on Ray, with its live table; Ctrl-C or SIGTERM: one line, status 130 or 143."""
    from melbo.study import run_study
    from melbo.study.on_ray import ray_session, run_study_on_ray
    from melbo.study.signals import by_sigterm, sigterm_as_interrupt, stopping_on_signals

    received: list[int] = []
    try:  # a Ray cluster that cannot be reached or lacks GPUs: one line, nothing written
        with sigterm_as_interrupt(received), ray_session(study_obj, folder, ray, resume, force, err_console.status, err_console.print) as session:
            # SIGTERM again: Ray set its own handler while it started
            with sigterm_as_interrupt(received), study_view_unless_given(None, True, study_obj) as view:
                assert view is not None
                on_event = stopping_on_signals(view, received)
                if session is None:
                    result = run_study(study_obj, folder, resume=resume, force=force, on_event=on_event)
                else:
                    result = run_study_on_ray(study_obj, folder, session.options, resume=resume, force=force, on_event=on_event, session=session)
    except KeyboardInterrupt as exc:
        stopped = by_sigterm(exc, received)
        err_console.print(f"melbo: {'stopped (SIGTERM)' if stopped else 'interrupted'}; {folder} holds every finished step and block: run the same command with --resume")
        raise SystemExit(143 if stopped else 130) from None
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
    num_cpus: Annotated[float | None, typer.Option(min=0.0, callback=opt.finite, help="With --ray: CPUs per worker (default: the study's ray table, else 1).")] = None,
    num_gpus: Annotated[float | None, typer.Option(min=0.0, callback=opt.finite, help="With --ray: GPUs per worker (default: the study's ray table, else 0).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="With --ray: workers per model (default: as the cluster allows).")] = None,
) -> None:
    """Run every run a study file describes (in this process, or on Ray); writes OUT/study.html and a report per run."""
    from melbo.study import Study

    started = time.monotonic()
    study_obj = Study.from_toml(spec).with_settings(set_ or [])
    from melbo.study.on_ray import RayOptions

    options = RayOptions.for_study(study_obj, ray, num_cpus, num_gpus, workers)
    folder = new_run_folder(out, study_obj.name, force, resume)
    if options is None:  # in this process (on Ray the workers' devices are not known here)
        _warn_if_slow_bfloat16(study_obj)
    result = _run(study_obj, folder, resume, force, options)
    tables.show(tables.study_units(result, time.monotonic() - started))


def _warn_if_slow_bfloat16(study_obj: Study) -> None:
    """discover's and ortho's one-line warning, once, when a unit asks for bfloat16 products on its device and the
    device computes them in software."""
    from melbo.errors import MelboError
    from melbo.model.loading import resolve_device

    for unit in study_obj.units():
        try:
            device = resolve_device(unit.model.device)
        except MelboError:  # the unit says so in one line when it starts
            continue
        asked = [*(unit.discover.asked_precisions() if unit.discover else ()), *(unit.ortho.asked_precisions() if unit.ortho else ())]
        if warn_if_slow_bfloat16(device, *asked):
            return


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for the two runs (default melbo-runs/demo-DATE).")] = None,
    ortho_count: Annotated[int | None, typer.Option(help="Orthogonal vectors to find (default: the study's, 32).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite runs already in --out.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the demo in --out.")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Under a minute on 2 CPU cores (47 s on an AVX2 EPYC): few vectors and steps, to check the set-up.")] = False,
    device: opt.Device = "auto",
) -> None:
    """The main job on the embedded SmolLM2 (the study examples/demo.toml): discover vectors, pick the clearest,
    find orthogonal copies of it, evaluate and compose them, and write reports."""
    from melbo.study import demo_study

    started = time.monotonic()
    study_obj = demo_study(quick=quick, ortho_count=ortho_count, device=device)
    folder = new_run_folder(out, "demo", force, resume)
    console.print(tables.demo_intro(study_obj))
    result = _run(study_obj, folder, resume, force)
    tables.show(tables.demo_outcome(result, time.monotonic() - started))
