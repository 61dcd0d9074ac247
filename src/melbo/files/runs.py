"""Run folders: the one place that knows their format.

A run is a folder holding

* ``vectors.safetensors``: one float32 tensor ``vectors`` of shape ``(N, d_model)``; row ``i`` is vector
  ``i``. In a MELBO-ortho run row 0 is the base vector θ0, as in the original post's ``.pt`` files. Engine
  state kept for ``--resume`` (``processed``: every finite vector tried, in order) lies beside it.
* ``run.json``: what produced the vectors (:class:`RunMeta`: model and its revision or file hash, layers, R,
  prompts, system prompt, seed, every hyper-parameter, package versions) and one :class:`VectorRecord` per
  vector (norm, loss, KL to the base, a completion...).
* sidecars written by the commands that study a run: ``eval.json``, ``compose.json``, ``probe.json``,
  ``report.html`` and ``plots/`` (names below; their contents belong to the module that computes them).

Both run files are written atomically (temporary file + rename), vectors first and ``run.json`` last:
``run.json`` is the commit point, so a crash between the two leaves the previous run readable, and rows of
``vectors.safetensors`` beyond the records of ``run.json`` are ignored. Nothing outside this module reads
``run.json`` by key: it is read into :class:`RunMeta`, and keys it does not know are kept as they are.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import platform
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from melbo.errors import MelboError
from melbo.files.io import atomic_write, write_json
from melbo.files.vectors import load_safetensors, validate_vectors
from melbo.model.prompts import DEFAULT_PROMPT, PromptFormat

if TYPE_CHECKING:
    from melbo.engines.config import RadiusConfig

VECTORS_FILE = "vectors.safetensors"
META_FILE = "run.json"
EVAL_FILE = "eval.json"
COMPOSE_FILE = "compose.json"
PROBE_FILE = "probe.json"
REPORT_FILE = "report.html"
PLOTS_FOLDER = "plots"
FORMAT_VERSION = 1
PROCESSED = "processed"  # the extra tensor that rebuilds an engine's orthogonal basis on --resume


@dataclass
class VectorRecord:
    """What run.json says of one vector. Fields an engine did not measure stay ``None``."""

    index: int
    norm: float | None = None
    loss: float | None = None  # the engine's final loss for this vector
    kl: float | None = None  # ortho: KL(P_i ‖ P_0) at the last prompt token
    kl_reverse: float | None = None  # ortho: KL(P_0 ‖ P_i)
    block: int | None = None
    steps: int | None = None
    completion: str | None = None  # greedy completion on the run's first prompt
    base: bool = False  # row 0 of an ortho run
    extra: dict[str, Any] = field(default_factory=dict)  # keys written by another melbo, kept as they are

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.base:
            out["base"] = True
        for name in ("norm", "loss", "kl", "kl_reverse", "block", "steps", "completion"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], position: int = 0) -> VectorRecord:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("index", position)
        values["base"] = bool(values.get("base", False))
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})


@dataclass
class Session:
    """One start (or resumption) of a run: which block it began with."""

    started: str
    from_block: int


@dataclass
class BlockProgress:
    """Where a block-by-block run stands: enough to go on after a crash with the same numbers."""

    block_index: int = 0  # blocks finished (kept, dropped or failed)
    found: int = 0  # vectors tried, kept or not
    in_a_row: int = 0  # vectors dropped in a row (ortho: the basis is exhausted when this reaches a block)
    init_norm: float = 0.0  # norm the next block starts at (ortho)
    block_sizes: list[int] = field(default_factory=list)  # finite vectors each block added to the basis


@dataclass
class RadiusProbe:
    """One candidate R of the calibration table."""

    radius: float
    vectors: int
    fluent: int
    median_nll: float
    median_effect: float  # first-token KL to the unsteered model
    labels: dict[str, int]
    openings: int  # distinct first three words among the fluent completions
    sample: str  # a fluent completion when there is one

    @property
    def share(self) -> float:
        return self.fluent / self.vectors

    def summary(self) -> str:
        """One plain line as the candidate is measured: "R 67.5: 3/4 fluent, median NLL 2.56, first-token KL 0.88"."""
        return f"R {self.radius:g}: {self.fluent}/{self.vectors} fluent, median NLL {self.median_nll:.2f}, first-token KL {self.median_effect:.2f}"

    def line(self) -> str:
        """The candidate as a log line: "-R auto: R 67.5: 3/4 fluent, …"."""
        return f"-R auto: {self.summary()}"

    def usable(self, cfg: RadiusConfig) -> bool:
        """Whether this R passes the choice's rule (:class:`melbo.engines.config.RadiusConfig`)."""
        return self.share >= cfg.min_fluent and self.median_nll <= cfg.max_median_nll


@dataclass
class RadiusChoice:
    """The R discovery uses, why, and the table it was read from (stored in run.json as ``radius_choice``)."""

    radius: float
    reason: str
    norm_at_source: float  # median residual norm after the source layer: the candidates' scale
    probes: list[RadiusProbe] = field(default_factory=list)
    seconds: float = 0.0
    precision: str | None = None  # the probes' matrix products (float32 or bfloat16; None: a choice recorded before this)

    def line(self) -> str:
        """"R = 80.3 (0.0213 × the residual norm 3773 at layer 5): the largest tried at which …": the choice and its
        reason without saying R twice (the reason, stored on its own, starts with "R 80.3")."""
        said = f"R {self.radius:g}"
        rest = self.reason[len(said):] if self.reason.startswith(said) else f": {self.reason}"
        return f"R = {self.radius:g}{rest}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RadiusChoice:
        return cls(**{**data, "probes": [RadiusProbe(**p) for p in data.get("probes", [])]})


@dataclass
class RunMeta:
    """Everything ``run.json`` holds, typed. :func:`read_run` and :func:`write_run` convert it."""

    kind: str  # "discover", "ortho", "import" or "post-dump"
    model: dict[str, Any] = field(default_factory=dict)  # LoadedModel.describe(): name, file hash or id, shapes
    model_identity: dict[str, Any] = field(default_factory=dict)  # what must not change on --resume
    source: int | None = None  # layer s: vectors are added after block s
    target: int | None = None  # layer t
    R: float | None = None  # the vectors' norm (discover) or θ0's norm (ortho)
    prompts: list[str] = field(default_factory=list)
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    seed: int | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the engine's resolved settings, as they are
    records: list[VectorRecord] = field(default_factory=list)
    status: str | None = None  # "running" or "complete" (engine runs)
    sessions: list[Session] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    progress: BlockProgress | None = None
    dropped: list[VectorRecord] = field(default_factory=list)  # ortho: vectors that collapsed or turned NaN
    stopped: str | None = None  # why a finished run stopped
    base: dict[str, Any] | None = None  # ortho: θ0's norm, where it came from and why it was chosen
    radius_choice: RadiusChoice | None = None  # discover -R auto: the calibration table and the reason
    kl_direction: str | None = None
    imported_from: str | None = None
    source_file: str | None = None
    note: str | None = None
    created: str | None = None
    updated: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this melbo does not know, kept as they are

    @property
    def model_name(self) -> str | None:
        """What to pass to ``load_model`` to get this run's model again."""
        return self.model.get("name") or self.model.get("id")

    @property
    def first_prompt(self) -> str:
        """The run's prompt (the first, where it has several); melbo's default prompt where it records none."""
        return self.prompts[0] if self.prompts else DEFAULT_PROMPT

    def held_out(self, prompts: Iterable[str]) -> list[str]:
        """``prompts`` less those the run was trained on (its own, and the shipped ones a MELBO-ortho run's copies also
        matched θ0 on): what an eval may count as held out."""
        trained = set(self.prompts)
        return [p for p in prompts if p not in trained]

    @property
    def base_row(self) -> int | None:
        """The row holding θ0: 0 in a MELBO-ortho run (and the post's dumps of one); ``None`` where there is none."""
        return 0 if self.records and (self.records[0].base or self.kind in ("ortho", "post-dump")) else None

    def to_json(self, count: int, d_model: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "model": self.model,
            "model_identity": self.model_identity,
            "layers": {"source": self.source, "target": self.target},
            "R": self.R,
            "prompts": self.prompts,
            "prompt_format": dataclasses.asdict(self.prompt_format),
            "seed": self.seed,
            "config": self.config,
        }
        optional = {
            "status": self.status,
            "base": self.base,
            "radius_choice": self.radius_choice.to_json() if self.radius_choice else None,
            "kl_direction": self.kl_direction,
            "progress": dataclasses.asdict(self.progress) if self.progress is not None else None,
            "stopped": self.stopped,
            "imported_from": self.imported_from,
            "source_file": self.source_file,
            "note": self.note,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        out["sessions"] = [dataclasses.asdict(s) for s in self.sessions]
        out["warnings"] = self.warnings
        out["dropped"] = [r.to_json() for r in self.dropped]
        out.update(self.extra)
        out.update(
            created=self.created or now_iso(),
            updated=self.updated or now_iso(),
            versions=self.versions or package_versions(),
            count=count,
            d_model=d_model,
            vectors=[r.to_json() for r in self.records],
        )
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunMeta:
        """Read run.json as written by this melbo or an earlier release (their keys differ a little)."""
        data = dict(data)
        layers = data.pop("layers", None) or {}
        fmt = data.pop("prompt_format", None) or {}
        progress = data.pop("progress", None)
        blocks_done = data.pop("blocks_done", None)  # discover runs of the first release kept it here
        records = [VectorRecord.from_json(r, i) for i, r in enumerate(data.pop("vectors", None) or [])]
        meta = cls(
            kind=str(data.pop("kind", "import")),
            source=layers.get("source"),
            target=layers.get("target"),
            prompt_format=PromptFormat(**{k: v for k, v in fmt.items() if k in ("system", "chat_template")}),
            records=records,
            sessions=[Session(**s) for s in data.pop("sessions", None) or []],
            dropped=[VectorRecord.from_json(r, i) for i, r in enumerate(data.pop("dropped", None) or [])],
        )
        if progress is not None:
            meta.progress = BlockProgress(**{k: v for k, v in progress.items() if k in BlockProgress.__dataclass_fields__})
        elif blocks_done is not None:
            meta.progress = _legacy_discover_progress(meta, int(blocks_done), data.get("config") or {})
        for name in ("format", "count", "d_model"):  # derived from the vectors on every write
            data.pop(name, None)
        choice = data.pop("radius_choice", None)
        meta.radius_choice = RadiusChoice.from_json(choice) if choice else None
        simple = {f.name for f in dataclasses.fields(cls)} - {"kind", "source", "target", "prompt_format", "records", "sessions", "dropped", "progress", "extra", "radius_choice"}
        for name in simple:
            if name in data:
                setattr(meta, name, data.pop(name))
        meta.extra = data
        return meta


def _legacy_discover_progress(meta: RunMeta, blocks_done: int, config: Mapping[str, Any]) -> BlockProgress:
    """The progress record of a discover run written before runs kept one: its vectors are the basis."""
    sizes: dict[int, int] = {}
    for record in meta.records:
        sizes[record.block or 0] = sizes.get(record.block or 0, 0) + 1
    block = int(config.get("block") or 1)
    return BlockProgress(
        block_index=blocks_done,
        found=min(int(config.get("count") or len(meta.records)), blocks_done * block),
        init_norm=float(meta.R or 0.0),
        block_sizes=[sizes.get(b, 0) for b in range(blocks_done)],
    )


@dataclass
class Run:
    """A run folder in memory: its vectors ``(N, d_model)``, its metadata, and engine state for --resume."""

    path: Path
    vectors: Tensor
    meta: RunMeta
    extra: dict[str, Tensor] = field(default_factory=dict)
    in_memory: bool = False  # an engine run without ``out``: nothing is read from or written to ``path``

    @property
    def records(self) -> list[VectorRecord]:
        return self.meta.records

    @property
    def source_layer(self) -> int:
        if self.meta.source is None:
            raise MelboError(f"run {self.path} does not record the layer its vectors are added after; give --layer")
        return int(self.meta.source)

    @property
    def target_layer(self) -> int:
        if self.meta.target is None:
            raise MelboError(f"run {self.path} does not record its target layer; give --target")
        return int(self.meta.target)

    def vector(self, index: int) -> Tensor:
        if not 0 <= index < self.vectors.shape[0]:
            raise MelboError(f"run {self.path} has vectors 0 to {self.vectors.shape[0] - 1}, not {index}")
        return self.vectors[index]

    @property
    def kls(self) -> list[float]:
        """KL to the base of every vector but the base, where the engine measured it (ortho runs)."""
        return [r.kl for r in self.records if not r.base and r.kl is not None]

    @property
    def median_kl(self) -> float | None:
        return statistics.median(self.kls) if self.kls else None

    def __repr__(self) -> str:
        from melbo.output.display import run_repr

        return run_repr(self)

    def _repr_html_(self) -> str:
        """In Jupyter: the table ``melbo discover`` or ``melbo ortho`` prints (index, loss or KL, label, completion)."""
        from melbo.output.display import run_html

        return run_html(self)

    def sidecar(self, name: str) -> Path | None:
        """Where a file that studies this run lives (``EVAL_FILE``, ``COMPOSE_FILE``...); None for a run only in memory
        (results stay in the returned objects: nothing lands in the working directory)."""
        return None if self.in_memory else self.path / name


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("melbo", "torch", "transformers", "safetensors", "gguf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def write_run(
    path: str | Path, vectors: Tensor, meta: RunMeta | Mapping[str, Any], extra: dict[str, Tensor] | None = None
) -> Run:
    """Write (or overwrite) a run folder atomically and return it.

    ``meta`` holds one record per row of ``vectors`` (a :class:`RunMeta`, or a mapping laid out as run.json);
    ``extra`` tensors (engine state for resuming) are stored beside ``vectors``.
    """
    path = Path(path)
    vectors = vectors.detach().to("cpu", torch.float32).contiguous()
    if vectors.dim() != 2:
        raise MelboError(f"vectors must be (N, d_model), got {tuple(vectors.shape)}")
    meta = meta if isinstance(meta, RunMeta) else RunMeta.from_json(meta)
    if len(meta.records) != vectors.shape[0]:
        raise MelboError(f"{len(meta.records)} records for {vectors.shape[0]} vectors")
    meta.created = meta.created or now_iso()
    meta.updated = now_iso()
    meta.versions = meta.versions or package_versions()
    try:
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob(".*.tmp"):  # left by a process killed in the middle of a write
            stale.unlink(missing_ok=True)
        tensors = {"vectors": vectors, **{k: v.detach().to("cpu", torch.float32).contiguous() for k, v in (extra or {}).items()}}
        atomic_write(path / VECTORS_FILE, lambda tmp: save_file(tensors, str(tmp)))
        text = json.dumps(meta.to_json(vectors.shape[0], vectors.shape[1]), indent=1, allow_nan=True)
        atomic_write(path / META_FILE, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
    except PermissionError as exc:
        raise MelboError(f"cannot write to {path}: permission denied; choose another --out folder") from exc
    except OSError as exc:
        raise MelboError(f"cannot write run folder {path}: {exc.strerror or exc}; the previous files are intact") from exc
    return Run(path=path, vectors=vectors, meta=meta, extra=dict(extra or {}))


def write_meta_only(path: Path, meta: RunMeta) -> None:
    """``run.json`` alone, for a folder that holds outputs but no vectors (the post's published dumps)."""
    write_json(path / META_FILE, meta.to_json(len(meta.records), 0))


def read_meta(path: str | Path) -> RunMeta:
    """The validated ``run.json`` of a run folder (what a report needs even where there are no vectors)."""
    path = Path(path)
    if not path.is_dir():
        raise MelboError(f"run folder {path} does not exist")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        inside = runs_in(path)
        hint = "" if not inside else (f"; it holds the run folder{'s' * (len(inside) > 1)} "
                                      f"{', '.join(str(r) for r in inside[:4])}{', …' if len(inside) > 4 else ''}: give one")
        raise MelboError(f"{path} is not a melbo run folder: it has no {META_FILE}{hint}")
    try:
        data = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MelboError(f"{meta_path} is corrupt (not valid JSON: {exc}); restore it or start a new run") from exc
    if not isinstance(data, dict) or not isinstance(data.get("vectors"), list):
        raise MelboError(f"{meta_path} is not a melbo run record (no list of vectors)")
    try:
        return RunMeta.from_json(data)
    except (TypeError, ValueError, AttributeError) as exc:
        raise MelboError(f"{meta_path} is not a melbo run record ({exc})") from exc


def has_vectors(path: str | Path) -> bool:
    return (Path(path) / VECTORS_FILE).is_file()


def runs_in(folder: str | Path, depth: int = 3) -> list[Path]:
    """The run folders (holding vectors) inside ``folder``, up to ``depth`` levels down, sorted: a demo's or a study's
    folder, or melbo-runs/. Empty when ``folder`` is itself a run, or holds none."""
    folder = Path(folder)
    if (folder / META_FILE).is_file() or not folder.is_dir():
        return []
    found: list[Path] = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (child / META_FILE).is_file():
            found += [child] if has_vectors(child) else []
        elif depth > 1:
            found += runs_in(child, depth - 1)
    return found


def read_run(path: str | Path, d_model: int | None = None) -> Run:
    """Read and validate a run folder.

    Args:
        d_model: when given, the vectors must have this width (the model's hidden size).

    Raises:
        MelboError: saying which file is missing or wrong, and how.
    """
    path = Path(path)
    meta = read_meta(path)
    vectors_path = path / VECTORS_FILE
    if meta.kind == "post-dump":
        raise MelboError(f"{path} holds the original post's published outputs, not vectors: only `melbo report` reads it")
    if not vectors_path.is_file():
        raise MelboError(f"run folder {path} has {META_FILE} but no {VECTORS_FILE}")
    tensors = load_safetensors(vectors_path)
    if "vectors" not in tensors:
        raise MelboError(f"{vectors_path} has no tensor named 'vectors'")
    vectors = validate_vectors(tensors.pop("vectors"), str(vectors_path), d_model)
    count = len(meta.records)
    if vectors.shape[0] < count:
        raise MelboError(f"{vectors_path} holds {vectors.shape[0]} vectors but {META_FILE} describes {count}")
    return Run(path=path, vectors=vectors[:count], meta=meta, extra=tensors)


def write_imported(out: str | Path, vectors: Tensor, source: str | Path, layer: int | None, model_name: str | None) -> Run:
    """A run folder of kind ``import`` holding ``vectors`` read from ``source``."""
    records = [VectorRecord(index=i, norm=float(v.norm())) for i, v in enumerate(vectors)]
    meta = RunMeta(
        kind="import", imported_from=str(source), source=layer, records=records,
        model={"name": model_name} if model_name else {},
    )
    return write_run(out, vectors, meta)
