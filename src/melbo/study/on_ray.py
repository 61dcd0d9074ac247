"""Running a study on Ray: on a laptop (a local Ray started for the call) or on a cluster, surviving dead workers.

Where the files live: on the driver's disk, as ``melbo study`` without Ray writes them. Workers need no storage in
common with it: each runs its unit in a scratch folder of its own node and sends every file it saves (after each
block of discovery or MELBO-ortho, after each step) to a mailbox actor; the driver takes them from the mailbox and
writes them into the study folder, atomically, as they come. The mailbox also keeps the latest copy of each file,
so a unit whose worker died goes on from its last saved block on another worker, which first takes the unit's
files back from the mailbox. A driver restarted with ``--resume`` hands the folder to the mailbox again and skips
finished units, as ``melbo study --resume`` does.

Work: one actor per model (and device) and worker slot, loading its model once and running unit after unit of
that model; when an actor's process or node dies, a new actor takes its unit (``max_restarts`` times at most). Resources per actor: ``num_cpus`` and ``num_gpus`` (the study's ``[ray]`` table or
the command line).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from melbo.errors import MelboError
from melbo.files.io import atomic_write, write_bytes
from melbo.output.live import study_view_unless_given
from melbo.study.outcome import Event, EventCallback, StudyResult, UnitOutcome
from melbo.study.pipeline import finish, finished, nothing_left_if_nothing_done, prepare_folder, run_study, save_state, unit_done
from melbo.study.scratch import make_scratch, new_token, sweep, sweep_after_kill
from melbo.study.signals import Terminated
from melbo.study.spec import ModelSpec, Study, Unit

POLL_SECONDS = 0.3


@dataclass(frozen=True)
class RayOptions:
    """How a study runs on Ray (``melbo study --ray``)."""

    address: str | None = None  # None: a local Ray for this call; "auto" or "host:port" or "ray://host:10001": a cluster
    num_cpus: float = 1.0  # per worker (each worker runs one unit at a time)
    num_gpus: float = 0.0  # per worker
    workers: int | None = None  # per model; None: as many as the cluster's CPUs (GPUs) allow, at most one per unit
    max_restarts: int = 3  # a unit whose worker (process or node) dies goes to a new worker this many times

    @classmethod
    def for_study(cls, study: Study, address: str | None, num_cpus: float | None = None, num_gpus: float | None = None,
                  workers: int | None = None) -> RayOptions | None:
        """What ``--ray ADDRESS`` ("local": a Ray for this call) asks for: the values given, else the study's ``[ray]``
        table's; ``None`` without ``--ray`` (then the other values must not be given). Ray must be installed."""
        if address is None:
            if num_cpus is not None or num_gpus is not None or workers is not None:
                raise MelboError("--num-cpus, --num-gpus and --workers go with --ray")
            return None
        if missing_extra():
            raise MelboError(str(missing_extra()))
        table = study.ray
        return cls(address=None if address == "local" else address, num_cpus=table.num_cpus if num_cpus is None else num_cpus,
                   num_gpus=table.num_gpus if num_gpus is None else num_gpus, workers=table.workers if workers is None else workers)


def missing_extra() -> str | None:
    if importlib.util.find_spec("ray") is None:
        return "melbo study --ray needs Ray: pip install 'melbo[ray]'"
    return None


def connect(options: RayOptions) -> bool:
    """Start a local Ray (pinned to 127.0.0.1) or join a cluster; True when this call started Ray."""
    problem = missing_extra()
    if problem:
        raise MelboError(problem)
    address = options.address
    if address in (None, "local"):
        # A Ray of our own needs no other machine: with clusters off, its servers listen on loopback only; it
        # sends no usage statistics.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray's default, said explicitly: no notice on stderr
        import ray

        ray.init(
            _node_ip_address="127.0.0.1", num_cpus=max(1, os.cpu_count() or 1), include_dashboard=False,
            configure_logging=False, log_to_driver=False,
        )
        return True
    import ray

    if address != "auto":
        _check_reachable(address)
    try:
        ray.init(address=address, configure_logging=False, log_to_driver=False)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, grpc errors… for a cluster it cannot join
        raise MelboError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    return False


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A quick TCP connect, so a wrong address fails in seconds with one line (Ray itself retries for a minute)."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise MelboError(f"--ray {address!r}: give auto, HOST:PORT (a cluster's GCS) or ray://HOST:10001")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise MelboError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from exc


def _check_resources(study: Study, options: RayOptions) -> None:
    import ray

    total = ray.cluster_resources()
    if options.num_gpus > total.get("GPU", 0):
        raise MelboError(f"the study asks for {options.num_gpus:g} GPU(s) per worker; this Ray cluster has {total.get('GPU', 0):g}")
    if options.num_cpus > total.get("CPU", 0):
        raise MelboError(f"the study asks for {options.num_cpus:g} CPU(s) per worker; this Ray cluster has {total.get('CPU', 0):g}")


def _mailbox_class() -> Any:
    import ray

    class Mailbox:
        """Files and progress on their way from the workers to the driver, and the latest copy of every file."""

        def __init__(self) -> None:
            self.latest: dict[str, bytes] = {}
            self.pending: dict[str, bytes] = {}
            self.states: dict[str, dict] = {}
            self.events: list[dict] = []

        def put(self, files: dict[str, bytes]) -> None:
            self.latest.update(files)
            self.pending.update(files)

        def seed(self, files: dict[str, bytes], states: dict[str, dict]) -> None:
            self.latest.update(files)
            self.states.update(states)

        def files(self, prefix: str) -> dict[str, bytes]:
            return {k: v for k, v in self.latest.items() if k == prefix or k.startswith(prefix.rstrip("/") + "/") or not prefix}

        def put_state(self, name: str, state: dict) -> None:
            self.states[name] = state

        def state(self, name: str) -> dict | None:
            return self.states.get(name)

        def event(self, event: dict) -> None:
            self.events.append(event)

        def drain(self) -> tuple[dict[str, bytes], dict[str, dict], list[dict]]:
            files, self.pending = self.pending, {}
            events, self.events = self.events, []
            return files, dict(self.states), events

    return ray.remote(Mailbox).options(num_cpus=0, max_concurrency=16)


def _worker_class() -> Any:
    import ray

    @ray.remote
    class UnitWorker:
        """Loads one model once and runs units of the study with it, in a scratch folder of its node."""

        def __init__(self, model: dict, mailbox: Any, threads: int, token: str) -> None:
            import torch

            from melbo.model.loading import load_model

            sweep()  # what killed workers left on this node
            self.token = token
            torch.set_num_threads(max(1, threads))
            spec = ModelSpec(**model)
            self.lm = load_model(spec.name, device=spec.device, dtype=spec.dtype)
            self.mailbox = mailbox

        def run(self, study: dict, unit_name: str) -> dict:
            from melbo.study.pipeline import run_unit

            unit = next(u for u in Study.from_dict(study).units() if u.name == unit_name)
            scratch = make_scratch(self.token)
            try:
                prefix = unit.name
                for rel, data in ray.get(self.mailbox.files.remote(prefix)).items():
                    target = scratch / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                saved = ray.get(self.mailbox.state.remote(unit.name))
                state = UnitOutcome.from_json(saved) if saved else UnitOutcome(unit.name, unit.label, unit.model.name)
                sent: dict[str, tuple[int, int]] = {}

                def push() -> None:
                    root = scratch / prefix if prefix else scratch
                    files = {}
                    for path in root.rglob("*"):
                        if path.is_file() and not path.name.startswith("."):
                            stat = path.stat()
                            key = str(path.relative_to(scratch))
                            if sent.get(key) != (stat.st_mtime_ns, stat.st_size):
                                files[key], sent[key] = path.read_bytes(), (stat.st_mtime_ns, stat.st_size)
                    if files:
                        ray.get(self.mailbox.put.remote(files))

                def save() -> None:
                    push()
                    ray.get(self.mailbox.put_state.remote(unit.name, state.to_json()))

                last = [0.0]

                def on_event(event: Event) -> None:
                    now = time.monotonic()
                    if event.step in (0, 1) or now - last[0] >= 0.5:
                        last[0] = now
                        self.mailbox.event.remote(asdict(event))

                run_unit(self.lm, unit, scratch, state, save, on_event, on_block=lambda _run: push())
                save()
                return state.to_json()
            finally:
                shutil.rmtree(scratch, ignore_errors=True)

    return UnitWorker


class RaySession:
    """Ray joined (or started) and checked against the study: what must hold before anything is written."""

    def __init__(self, study: Study, options: RayOptions) -> None:
        self.options = options
        self.token = new_token()  # names the unit folders of this session's workers on their nodes
        try:
            self.started_here = connect(options)
        except SystemExit as exc:  # ray.init's own SIGTERM handler, in place while it starts, exits with status 15
            if exc.code != signal.SIGTERM:
                raise
            raise Terminated from None
        try:
            _check_resources(study, options)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.started_here:
            import ray

            ray.shutdown()
            self.started_here = False
        # the unit folders of workers killed on this node (Ctrl-C, SIGTERM); other nodes': when a worker next starts there
        sweep_after_kill(self.token)

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


NOTHING_TO_RUN = "every unit of the study is finished: Ray is not started"


@contextlib.contextmanager
def ray_session(study: Study, folder: Path, options: RayOptions | None, resume: bool = False, force: bool = False,
                starting: Callable[[str], contextlib.AbstractContextManager[Any]] = lambda _: contextlib.nullcontext(),
                on_note: Callable[[str], None] | None = None) -> Iterator[RaySession | None]:
    """Ray joined (or started) for the study, left (or stopped) at the end; ``None`` without Ray ``options`` or when
    nothing is left to run (a finished study resumed: ``on_note`` hears so). ``starting(text)`` wraps the start
    (a spinner)."""
    if options is not None and resume and not force and finished(study, folder):
        if on_note:
            on_note(NOTHING_TO_RUN)
        options = None
    if options is None:
        yield None
        return
    with starting("starting Ray…" if options.address is None else f"joining the Ray cluster at {options.address}…"):
        session = RaySession(study, options)
    with session:
        yield session


def run_study_on_ray(
    study: Study,
    out: str | Path,
    options: RayOptions = RayOptions(),
    resume: bool = False,
    force: bool = False,
    on_event: EventCallback | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    session: RaySession | None = None,
    progress: bool = True,
) -> StudyResult:
    """Run the study's units on Ray workers; the study folder ends as ``run_study`` would leave it. Without a
    ``session``, Ray is joined (or started) for this call and left (or stopped) at the end; a finished study resumed
    runs nothing and starts no Ray. Without ``on_event`` it shows the study's progress unless ``progress`` is False."""
    if session is None:
        with ray_session(study, Path(out), options, resume, force) as own:
            if own is None:
                return run_study(study, out, resume=resume, force=force, on_event=on_event, progress=progress)
            return run_study_on_ray(study, out, options, resume, force, on_event, on_start, own, progress)
    with study_view_unless_given(on_event, progress, study) as on_event, nothing_left_if_nothing_done(study, Path(out)):
        states = prepare_folder(study, Path(out), resume, force)
        return _drive(study, Path(out), states, options, on_event, on_start, session.token)


def _drive(study: Study, folder: Path, states: dict[str, UnitOutcome], options: RayOptions,
           on_event: EventCallback | None, on_start: Callable[[dict[str, Any]], None] | None, token: str) -> StudyResult:
    import ray
    from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

    mailbox = _mailbox_class().remote()
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")}
    ray.get(mailbox.seed.remote(files, {name: s.to_json() for name, s in states.items()}))
    units = study.units()
    todo = [u for u in units if not unit_done(u, states.get(u.name))]
    by_model: dict[str, list[Unit]] = {}
    for unit in todo:
        by_model.setdefault(_model_key(unit.model), []).append(unit)
    total_cpu = ray.cluster_resources().get("CPU", 1)
    Worker = _worker_class()
    specs = {key: asdict(model_units[0].model) for key, model_units in by_model.items()}

    def new_worker(key: str) -> Any:
        return Worker.options(num_cpus=options.num_cpus, num_gpus=options.num_gpus).remote(specs[key], mailbox, max(1, int(options.num_cpus)), token)

    workers: dict[str, list[Any]] = {}
    for key, model_units in by_model.items():
        allowed = options.workers or max(1, int(total_cpu // max(options.num_cpus, 1e-9)) // len(by_model))
        workers[key] = [new_worker(key) for _ in range(min(len(model_units), allowed))]
    replaced = 0
    if on_start:
        on_start({"workers": sum(len(w) for w in workers.values()), "units": len(todo)})
    payload = study.to_dict()
    waiting = {key: list(us) for key, us in by_model.items()}
    running: dict[Any, tuple[str, Any, Unit, int]] = {}  # ref → (model key, worker, unit, tries)

    def start(key: str, worker: Any, unit: Unit, tries: int) -> None:
        running[worker.run.remote(payload, unit.name)] = (key, worker, unit, tries)

    for key, pool in workers.items():
        for worker in pool:
            if waiting[key]:
                start(key, worker, waiting[key].pop(0), 0)
    try:
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
            _deliver(folder, mailbox, study, states, on_event)
            for ref in ready:
                key, worker, unit, tries = running.pop(ref)
                try:
                    states[unit.name] = UnitOutcome.from_json(ray.get(ref))
                except (RayActorError, WorkerCrashedError) as exc:
                    if tries >= options.max_restarts:
                        raise MelboError(f"unit {unit.label or unit.name} failed {tries + 1} times on Ray workers ({type(exc).__name__})") from exc
                    # the worker (or its node) died: a new one takes the unit from its last saved block
                    workers[key] = [w for w in workers[key] if w is not worker] + [new_worker(key)]
                    replaced += 1
                    start(key, workers[key][-1], unit, tries + 1)
                    continue
                except RayTaskError as exc:
                    cause = exc.cause if isinstance(getattr(exc, "cause", None), MelboError) else None
                    if cause is not None:
                        raise cause from None
                    raise
                save_state(study, folder, states)
                if waiting[key]:
                    start(key, worker, waiting[key].pop(0), 0)
        _deliver(folder, mailbox, study, states, on_event)
    except KeyboardInterrupt:
        for pool in workers.values():
            for worker in pool:
                ray.kill(worker, no_restart=True)
        _deliver(folder, mailbox, study, states, on_event)
        raise
    result = finish(study, folder, states)
    result.model_loads = sum(len(pool) for pool in workers.values()) + replaced  # one per worker started, dead ones included
    return result


def _deliver(folder: Path, mailbox: Any, study: Study, states: dict[str, UnitOutcome], on_event: EventCallback | None) -> None:
    """Write what the workers sent (files, then unit states: the commit point) and pass progress on."""
    import ray

    files, unit_states, events = ray.get(mailbox.drain.remote())
    for rel, data in sorted(files.items(), key=lambda kv: kv[0].endswith("run.json")):  # run.json last in each folder
        target = folder / rel
        atomic_write(target, functools.partial(write_bytes, data))
    if unit_states:
        for name, data in unit_states.items():
            states[name] = UnitOutcome.from_json(data)
        save_state(study, folder, states)
    if on_event:
        for event in events:
            on_event(Event(**event))


def _model_key(model: ModelSpec) -> str:
    return f"{model.name}|{model.device}|{model.dtype}"
