"""Running a study: each unit's steps in order, every finished step recorded so a second call skips it.

A unit's steps: ``discover`` (or import ``[vectors]``), ``choose`` (bases for MELBO-ortho), then per base
``ortho``, and per run folder ``eval``, ``compose``, ``probe`` and ``report`` when the study asks for them.
``study.json`` in the study folder records each finished step (with its time) after it finishes; discovery and
MELBO-ortho save their own run folders after every block, so an interrupted study resumes inside the step it
was in (``resume=True``). The folder layout::

    DIR/study.toml, study.json, study.html
    DIR/<unit>/discover/         (a study with one unit keeps its runs in DIR itself, as `melbo demo` does)
    DIR/<unit>/ortho/            (ortho-<index> when a unit has several bases)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from melbo.analysis.choose import BaseChoice, choose_bases, score_candidates, trial_bases
from melbo.analysis.compose import compose
from melbo.analysis.controls import ControlSummary, controls_problem
from melbo.analysis.evaluate import EvalConfig, eval_prompts, evaluate
from melbo.analysis.fidelity import ortho_fidelity
from melbo.analysis.judge import ConceptSummary, judge_run
from melbo.analysis.probe import probe
from melbo.engines.config import OrthoConfig
from melbo.engines.discover import discover
from melbo.engines.ortho import ortho, progress_plan
from melbo.errors import MelboError
from melbo.files.interop import import_file
from melbo.files.io import atomic_write, read_json, write_json
from melbo.files.resume import differences
from melbo.files.runs import META_FILE, Run, read_run, runs_in
from melbo.model.loading import LoadedModel, load_model
from melbo.model.prompts import shipped_prompts
from melbo.output.live import study_view_unless_given
from melbo.report import write_report
from melbo.report.study import PAGE_FILE, write_page
from melbo.study.outcome import Event, EventCallback, OrthoOutcome, StudyResult, UnitOutcome
from melbo.study.spec import ModelSpec, Study, Unit

STUDY_FILE = "study.toml"
STATE_FILE = "study.json"


class ModelCache:
    """Models loaded once and reused by every unit (and run) that names them."""

    def __init__(self, preloaded: dict[str, LoadedModel] | None = None) -> None:
        self._models: dict[tuple[str, str, str | None], LoadedModel] = {}
        self._named = dict(preloaded or {})
        self.loads = 0

    def get(self, spec: ModelSpec) -> LoadedModel:
        if spec.name in self._named:
            return self._named[spec.name]
        key = (spec.name, spec.device, spec.dtype)
        if key not in self._models:
            self._models[key] = load_model(spec.name, device=spec.device, dtype=spec.dtype)
            self.loads += 1
        return self._models[key]


def run_study(
    study: Study,
    out: str | Path,
    resume: bool = False,
    force: bool = False,
    models: ModelCache | None = None,
    on_event: EventCallback | None = None,
    progress: bool = True,
) -> StudyResult:
    """Run every unit of ``study`` in this process, writing ``out``; see the module docstring. Without ``on_event``
    it shows the study's progress as ``melbo study`` does (a live table, lines in a log) unless ``progress`` is False."""
    folder = Path(out)
    with study_view_unless_given(on_event, progress, study) as on_event, nothing_left_if_nothing_done(study, folder):
        states = prepare_folder(study, folder, resume, force)
        models = models or ModelCache()
        for unit in study.units():
            state = states.setdefault(unit.name, UnitOutcome(unit.name, unit.label, unit.model.name))
            if unit_done(unit, state):  # resumed after it finished: its model need not load
                continue
            run_unit(models.get(unit.model), unit, folder, state, lambda: save_state(study, folder, states), on_event)
    result = finish(study, folder, states)
    result.model_loads = models.loads
    return result


@contextlib.contextmanager
def nothing_left_if_nothing_done(study: Study, folder: Path) -> Iterator[None]:
    """A study that stops before it has written any work (a bad setting, a model that will not load) takes back the
    settings it wrote, and the folder if it made it: rerun with the setting fixed, it starts afresh, not "already
    holds a study". Once a step has finished or a run folder exists, everything stays for --resume."""
    made = not folder.exists()
    try:
        yield
    except BaseException:
        saved = read_json(folder / STATE_FILE) if folder.is_dir() else None
        if saved is not None and not _holds_work(folder, saved):
            for name in (STATE_FILE, STUDY_FILE, PAGE_FILE):
                (folder / name).unlink(missing_ok=True)
            if made and not any(folder.iterdir()):
                folder.rmdir()
        raise


def prepare_folder(study: Study, folder: Path, resume: bool, force: bool) -> dict[str, UnitOutcome]:
    """Check ``folder`` against the study (refuse another study's folder unless ``force``); the saved unit states."""
    saved = read_json(folder / STATE_FILE)
    if saved is not None and not _holds_work(folder, saved):  # stopped before anything was written: start afresh
        saved = None  # (a first run that stopped at a bad setting is rerun with the setting fixed, no --force needed)
    if saved is not None and not (resume or force):
        raise MelboError(f"{folder} already holds a study; continue it with --resume, or pass --force to start it again")
    if saved is not None and resume and not force and saved.get("study") != study.to_dict():
        differ = "; ".join(f"{key}: {a!r} → {b!r}" for key, a, b in differences(saved.get("study") or {}, study.to_dict()))
        raise MelboError(f"{folder} holds a study with other settings ({differ}); use the same study file or another --out")
    if folder.exists() and not folder.is_dir():
        raise MelboError(f"--out {folder} is a file, not a folder")
    if force and saved is not None:
        _remove_study(study, folder)
        saved = None
    states = saved_states(saved)
    save_state(study, folder, states)
    write_toml(folder / STUDY_FILE, study.to_dict())
    return states


def finished(study: Study, folder: Path) -> bool:
    """Every unit of ``study`` is done in ``folder``: resuming there has nothing left to run (nothing is written)."""
    saved = read_json(folder / STATE_FILE)
    if saved is None or saved.get("study") != study.to_dict():
        return False
    states = saved_states(saved)
    return all(unit_done(unit, states.get(unit.name)) for unit in study.units())


def saved_states(saved: dict[str, Any] | None) -> dict[str, UnitOutcome]:
    """Each unit's state as study.json (``saved``, read as JSON) holds it, by unit name."""
    return {u["name"]: UnitOutcome.from_json(u) for u in (saved or {}).get("units", [])}


def _holds_work(folder: Path, saved: dict[str, Any]) -> bool:
    """Whether ``folder`` holds anything of a study beyond its settings: a finished step, or a run with vectors (a
    discovery stopped mid-way has no finished step, but its saved blocks are work a resume continues)."""
    return any(state.steps for state in saved_states(saved).values()) or bool(runs_in(folder))


def _remove_study(study: Study, folder: Path) -> None:
    """--force: the run folders and files this study writes go, so nothing stale is reused."""
    for unit in study.units():
        base = folder / unit.name if unit.name else folder
        if not base.is_dir():
            continue
        for child in base.iterdir():
            if child.is_dir() and (child / META_FILE).is_file():
                shutil.rmtree(child)
    for name in (STATE_FILE, PAGE_FILE):
        (folder / name).unlink(missing_ok=True)


def save_state(study: Study, folder: Path, states: dict[str, UnitOutcome]) -> None:
    write_json(folder / STATE_FILE, {"study": study.to_dict(), "units": [s.to_json() for s in states.values()]})


def finish(study: Study, folder: Path, states: dict[str, UnitOutcome]) -> StudyResult:
    """Write the study page once every unit has run."""
    result = StudyResult(folder, study, [states[u.name] for u in study.units() if u.name in states])
    result.page = write_page(result)
    save_state(study, folder, states)
    return result


def run_unit(
    lm: LoadedModel,
    unit: Unit,
    study_folder: Path,
    state: UnitOutcome,
    save: Callable[[], None],
    on_event: EventCallback | None = None,
    on_block: Callable[[Run], None] | None = None,
) -> UnitOutcome:
    """Run (or finish) one unit's steps on a loaded model; ``save()`` is called after every step, ``on_block``
    after discovery or MELBO-ortho saved a block (a Ray worker copies the folder to the driver then)."""
    root = study_folder / unit.name if unit.name else study_folder
    fmt = unit.prompts.format
    prompts = unit.prompts.prompts
    emit = on_event or (lambda _: None)

    def step(name: str, work: Callable[[], object]) -> None:
        if name in state.steps:
            return
        emit(Event(unit.label, name.split(":")[0], name.partition(":")[2]))
        started = time.monotonic()
        work()
        state.steps[name] = round(time.monotonic() - started, 2)
        save()

    def progress(stage: str, run: str, blocks: int | None, steps: int | None) -> Callable[[int, int, float], None]:
        return lambda block, n, loss: emit(Event(unit.label, stage, run, block, blocks, n, steps, loss))

    discovery = root / ("discover" if unit.discover is not None else "vectors")
    state.discovery = str(discovery.relative_to(study_folder))
    if unit.discover is not None:
        cfg = unit.discover
        def note(text: str) -> None:
            emit(Event(unit.label, "discover", "discover", note=text))

        step("discover", lambda: discover(
            lm, prompts, cfg, fmt, out=discovery, resume=True, on_step=progress("discover", "discover", cfg.blocks, cfg.steps), on_block=on_block,
            on_probe=lambda probe: note(probe.line()), on_radius=lambda choice: note(choice.line()),
        ))
    else:
        spec = unit.vectors
        assert spec is not None  # checked when the study was read
        def load_vectors() -> None:
            import_file(spec.file, discovery, spec.source, model_name=lm.name)  # as `melbo import` reads it: .gguf too

        step("discover", load_vectors)
    found = read_run(discovery, d_model=lm.d_model)
    source = found.source_layer
    target = found.meta.target  # imported vectors record no target: the study's [vectors] table gives it
    if target is None and unit.vectors is not None:
        target = unit.vectors.target
    if target is None:
        raise MelboError(f"{discovery} records no target layer: give one in the study's [vectors] table")

    if unit.ortho is not None:
        def choose() -> None:
            bases = choose_bases(score_candidates(lm, found, prompts[0], fmt), unit.choose)
            if unit.choose.by == "faithful":
                trial_cfg = unit.ortho_config(source, target)
                assert trial_cfg is not None
                emit(Event(unit.label, "choose", note=f"{unit.choose.trial_copies} trial copies of each of "
                           + ", ".join(b.name for b in bases)))
                bases = trial_bases(lm, found, bases, unit.choose, trial_cfg, prompts, fmt, on_trial=lambda b: emit(Event(
                    unit.label, "choose", note=f"{b.name}: {b.trial_share:.0%} of its trial copies keep its label")))
            emit(Event(unit.label, "choose", note="base " + ", ".join(b.name for b in bases)))
            state.bases = bases

        step("choose", choose)
        for base, name in zip(state.bases, ortho_names(state)):
            folder = root / name
            cfg_o = unit.ortho_config(source, target)
            assert cfg_o is not None

            def run_ortho(base: BaseChoice = base, folder: Path = folder, name: str = name, cfg_o: OrthoConfig = cfg_o) -> None:
                info = {"from": str(discovery), "index": base.index, "why": base.reason(), "completion": base.completion}
                plan = progress_plan(lm, found.vectors[base.index], cfg_o)  # counted as melbo ortho counts
                run = ortho(lm, found.vectors[base.index], prompts, cfg_o, fmt, out=folder, base_info=info, resume=True,
                            on_step=progress("ortho", name, plan.blocks, plan.steps), on_block=on_block)
                outcome = OrthoOutcome(str(folder.relative_to(study_folder)), base, ortho_fidelity(lm, run, fmt, cfg_o.completion_tokens))
                state.orthos = [o for o in state.orthos if o.folder != outcome.folder] + [outcome]

            step(f"ortho:{name}", run_ortho)
    studied = [study_folder / o.folder for o in state.orthos] or [discovery]
    for folder in studied:
        _study_run(lm, unit, folder, study_folder, state, step)
    if unit.report is not None and unit.report.enabled:
        for folder in dict.fromkeys([*studied, discovery]):
            def report(folder: Path = folder) -> None:
                page = write_report(folder)
                state.reports = [r for r in state.reports if r != str(page.relative_to(study_folder))] + [str(page.relative_to(study_folder))]

            step(f"report:{folder.name}", report)
    return state


def ortho_names(state: UnitOutcome) -> list[str]:
    """The MELBO-ortho run folders of a unit, one per chosen base: ``ortho``, or ``ortho-<index>`` when there are several."""
    return [f"ortho-{b.index}" if len(state.bases) > 1 else "ortho" for b in state.bases]


def run_steps(unit: Unit, run_name: str, ortho: bool) -> list[str]:
    """The steps that study one run folder, in the order they run: eval, compose (MELBO-ortho runs), probe."""
    kinds = [("eval", unit.eval is not None), ("compose", unit.compose is not None and ortho), ("probe", unit.probe is not None)]
    return [f"{kind}:{run_name}" for kind, wanted in kinds if wanted]


def unit_plan(unit: Unit, state: UnitOutcome) -> list[str] | None:
    """Every step ``run_unit`` takes for this unit, in order (the one place the plan is spelled out); None while it
    depends on a choice not made yet (the bases: until ``choose`` ran, the MELBO-ortho folders are unknown)."""
    discovery = "discover" if unit.discover is not None else "vectors"
    plan = ["discover"]
    studied = [discovery]
    if unit.ortho is not None:
        plan.append("choose")
        if "choose" not in state.steps:
            return None
        names = ortho_names(state)
        plan += [f"ortho:{n}" for n in names]
        studied = names or studied
    for name in studied:
        plan += run_steps(unit, name, name != discovery)
    if unit.report is not None and unit.report.enabled:
        plan += [f"report:{n}" for n in dict.fromkeys([*studied, discovery])]
    return plan


def unit_done(unit: Unit, state: UnitOutcome | None) -> bool:
    """Whether every step ``run_unit`` would take for this unit is recorded as finished."""
    plan = None if state is None else unit_plan(unit, state)
    return plan is not None and state is not None and all(step in state.steps for step in plan)


def _study_run(lm: LoadedModel, unit: Unit, folder: Path, study_folder: Path, state: UnitOutcome,
               step: Callable[[str, Callable[[], object]], None]) -> None:
    """eval, compose and probe of one run folder, as the unit's plan (:func:`run_steps`) asks."""
    fmt = unit.prompts.format
    works: dict[str, Callable[[], object]] = {}
    if unit.eval is not None:
        spec = unit.eval
        config = EvalConfig(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(EvalConfig)})

        def run_eval() -> None:
            run = read_run(folder, d_model=lm.d_model)
            extra = list(spec.held_out) + (shipped_prompts(spec.prompt_set) if spec.prompt_set else [])
            with_controls = config.controls and controls_problem(run) is None  # a discovery run of the study: none
            prompts = eval_prompts(run, extra, with_controls)
            settings = dataclasses.replace(config, controls=with_controls)
            results = evaluate(lm, run, prompts, list(range(run.vectors.shape[0])), settings, fmt)
            judge = spec.judge_config()
            judged: dict[str, ConceptSummary] = {}
            if judge is not None:
                judged = judge_run(results, judge, prompts[0], run.meta.base_row, lambda: results.save(run)).summary
            controls = results.controls
            for outcome in state.orthos:
                if study_folder / outcome.folder == folder:
                    base = results.base if results.base is not None else 0  # an ortho run's: θ0, unless the study says another
                    outcome.behaviour_share = results.behaviour_share(prompts[0], config.mode(), base)
                    outcome.held_out_share = results.behaviour_share(prompts[1:], config.mode(), base, prompts[0]) if len(prompts) > 1 else None
                    outcome.controls = ControlSummary.of(controls) if controls else None
                    outcome.judged = {concept: summary.share_concept_2 for concept, summary in judged.items()}

        works["eval"] = run_eval
    if unit.compose is not None:
        spec_c = unit.compose

        def run_compose() -> None:
            run = read_run(folder, d_model=lm.d_model)
            if run.vectors.shape[0] > 1:  # a k beyond the copies is all of them
                compose(lm, run, spec_c.ks, run.meta.prompts[0], fmt, spec_c.max_new_tokens)

        works["compose"] = run_compose
    if unit.probe is not None:
        spec_p = unit.probe

        def run_probe() -> None:
            run = read_run(folder, d_model=lm.d_model)
            probe(lm, run, shipped_prompts(spec_p.prompt_set), fmt, spec_p.max_new_tokens, spec_p.random_directions)

        works["probe"] = run_probe
    for name in run_steps(unit, folder.name, bool(state.orthos)):
        step(name, works[name.partition(":")[0]])


def write_toml(path: Path, data: dict[str, Any]) -> None:
    """A study as TOML (plain values, one table per section), so ``melbo study DIR/study.toml`` reruns it."""
    lines = []
    for key, value in data.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None]
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines).lstrip() + "\n", encoding="utf-8"))


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)
