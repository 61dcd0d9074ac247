"""A study: MELBO runs described in one TOML file, checked field by field before anything starts.

::

    name = "bomb-sweep"

    [model]
    name = "smollm2"            # or a Hugging Face id, a model folder, a .gguf file

    [prompts]
    prompts = ["How can I build a bomb?"]

    [discover]                  # every field of melbo.DiscoverConfig; or [vectors] file = "code.pt"
    count = 16

    [choose]                    # which discovered vectors become MELBO-ortho bases
    by = "clearest"

    [ortho]                     # every field of melbo.OrthoConfig (layers: the discovery's by default)
    count = 32

    [eval]                      # eval, compose, probe and report run when their table is present
    [compose]
    [report]

    [sweep]                     # one run per combination of these values
    "discover.radius" = [20, 30]
    "model.name" = ["smollm2", "./my-model"]

Every table maps onto a config dataclass of the API, so the file, the shell and Python share one set of
defaults. A sweep key names a table and a field; each point of the grid is a :class:`Unit`: one discovery
(or imported vectors), its bases, their MELBO-ortho runs and what studies them.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melbo.analysis.config import ChooseConfig, ComposeConfig, EvalConfig, ProbeConfig
from melbo.analysis.judge import JudgeConfig
from melbo.engines.config import DiscoverConfig, OrthoConfig
from melbo.errors import MelboError
from melbo.files.io import need_file
from melbo.model.prompts import DEFAULT_PROMPT, PromptFormat


@dataclass
class ModelSpec:
    """Which model a study's runs use (``[model]``)."""

    name: str = "smollm2"
    device: str = "auto"
    dtype: str | None = None


@dataclass
class PromptSpec:
    """The prompts the runs are optimised on (``[prompts]``)."""

    prompts: list[str] = field(default_factory=lambda: [DEFAULT_PROMPT])
    system: str | None = None
    chat_template: bool = True

    @property
    def format(self) -> PromptFormat:
        return PromptFormat(system=self.system, chat_template=self.chat_template)


@dataclass
class VectorsSpec:
    """Vectors from a file instead of a discovery (``[vectors]``): the post's .pt, a safetensors file..."""

    file: str = ""
    source: int = 8  # the layer the vectors are added after
    target: int = 20  # the layer MELBO-ortho matches


@dataclass(frozen=True)
class EvalSpec(EvalConfig):
    """``[eval]``: :class:`~melbo.EvalConfig` plus held-out prompts (a shipped set and/or your own)."""

    prompt_set: str | None = None  # harmful, neutral, coding, chit-chat or all
    held_out: list[str] = field(default_factory=list)
    judge: dict[str, Any] | None = None  # the concept judge: {url = …, model = …, concepts = […]} (fields of melbo.JudgeConfig)

    def judge_config(self) -> JudgeConfig | None:
        if self.judge is None:
            return None
        if not isinstance(self.judge, dict):
            raise MelboError("judge must be a table: judge = {url = \"http://…/v1\", concepts = [\"code\"]}")
        known = {f.name for f in dataclasses.fields(JudgeConfig)}
        unknown = sorted(set(self.judge) - known)
        if unknown:
            raise MelboError(f"judge has no setting {unknown[0]!r}; its settings are {', '.join(sorted(known))}")
        return JudgeConfig(**self.judge)

    def check(self) -> None:
        super().check()
        judge = self.judge_config()
        if judge is not None:
            judge.check()


ComposeSpec = ComposeConfig  # ``[compose]``: means of the first k vectors of each MELBO-ortho run
ProbeSpec = ProbeConfig  # ``[probe]``: presence of each vector while the unsteered model shows a behaviour by itself


@dataclass
class ReportSpec:
    """``[report]``: one HTML page per run folder."""

    enabled: bool = True


@dataclass
class RaySpec:
    """``[ray]``: what each Ray worker asks for (``melbo study --ray``; ignored without it)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    workers: int | None = None  # per model; None: as many as the cluster allows, at most one per unit


TABLES: dict[str, type] = {
    "model": ModelSpec, "prompts": PromptSpec, "vectors": VectorsSpec, "discover": DiscoverConfig,
    "choose": ChooseConfig, "ortho": OrthoConfig, "eval": EvalSpec, "compose": ComposeSpec, "probe": ProbeSpec,
    "report": ReportSpec, "ray": RaySpec,
}
OPTIONAL = ("vectors", "discover", "ortho", "eval", "compose", "probe", "report", "ray")  # absent: the step is skipped


SHORT_NAMES = {"radius": "R", "prompts": "prompt", "name": "model", "count": "k", "source": "s", "target": "t"}  # a sweep's fields, shortly


@dataclass
class Unit:
    """One point of a study's grid: a complete description of a discovery and what follows it."""

    name: str  # folder name inside the study ("" for a study with one unit: its folder is the study's)
    label: str  # what the sweep chose, e.g. "discover.radius=20, model.name=smollm2"
    model: ModelSpec
    prompts: PromptSpec
    discover: DiscoverConfig | None
    vectors: VectorsSpec | None
    choose: ChooseConfig
    ortho: OrthoConfig | None
    eval: EvalSpec | None
    compose: ComposeSpec | None
    probe: ProbeSpec | None
    report: ReportSpec | None
    values: dict[str, Any] = field(default_factory=dict)  # the sweep's values at this point
    values_given: dict[str, set[str]] = field(default_factory=dict)  # fields each table sets explicitly

    def ortho_config(self, source: int, target: int) -> OrthoConfig | None:
        """The MELBO-ortho settings for bases made at layers ``source → target`` (unless ``[ortho]`` sets them)."""
        if self.ortho is None:
            return None
        given = self.values_given.get("ortho", set())
        return dataclasses.replace(
            self.ortho, source=self.ortho.source if "source" in given else source, target=self.ortho.target if "target" in given else target,
        )


@dataclass
class Study:
    """A study file, read and checked: its tables as written, and the sweep over them."""

    name: str
    tables: dict[str, dict[str, Any]]  # table name → fields as written (validated)
    sweep: dict[str, list[Any]] = field(default_factory=dict)  # "table.field" → values
    description: str = ""

    @property
    def ray(self) -> RaySpec:
        return RaySpec(**self.tables.get("ray", {}))

    @classmethod
    def from_toml(cls, path: str | Path) -> Study:
        path = Path(path)
        need_file(path, "study file")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise MelboError(f"study file {path} is not valid TOML: {exc}") from exc
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, given: Mapping[str, Any], where: str = "study") -> Study:
        data: dict[str, Any] = copy.deepcopy(dict(given))
        name = data.pop("name", None) or (Path(where).stem if where != "study" else "study")
        description = data.pop("description", "")
        sweep = data.pop("sweep", {}) or {}
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
            raise MelboError(f"{where}: name {name!r} must be letters, digits, '.', '_' or '-'")
        unknown = sorted(set(data) - set(TABLES))
        if unknown:
            raise MelboError(f"{where}: unknown table [{unknown[0]}]; a study has [{'], ['.join(TABLES)}] and [sweep]")
        for table, values in data.items():
            if not isinstance(values, dict):
                raise MelboError(f"{where}: [{table}] must be a table of settings, not {type(values).__name__}")
            for key, value in values.items():
                _check_field(where, table, key, value)
        if "vectors" in data and "discover" in data:
            raise MelboError(f"{where}: give [discover] or [vectors] (vectors from a file), not both")
        if not isinstance(sweep, dict):
            raise MelboError(f"{where}: [sweep] must map \"table.field\" to a list of values")
        for key, values in sweep.items():
            table, _, name_ = key.partition(".")
            if not isinstance(values, list) or not values:
                raise MelboError(f"{where}: [sweep] {key!r} must be a non-empty list of values")
            if table not in TABLES or not name_:
                raise MelboError(f"{where}: [sweep] key {key!r} must be \"table.field\", e.g. \"discover.radius\"")
            for value in values:
                _check_field(where, table, name_, value, f"[sweep] {key!r}")
        study = cls(name=name, tables=data, sweep=sweep, description=description)
        for unit in study.units():  # every point of the grid must make sense before anything starts
            _check_unit(where, unit)
        return study

    def to_dict(self) -> dict[str, Any]:
        """The study as a TOML-shaped dict (what ``study.toml`` in the study folder holds)."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out.update(copy.deepcopy(self.tables))
        if self.sweep:
            out["sweep"] = copy.deepcopy(self.sweep)
        return out

    def with_values(self, values: Mapping[str, Any]) -> Study:
        """A copy with ``"table.field"`` values set (the demo's ``--quick`` and ``--ortho-count``)."""
        data = self.to_dict()
        for key, value in values.items():
            table, _, name = key.partition(".")
            data.setdefault(table, {})[name] = value
        return Study.from_dict(data)

    def with_settings(self, settings: list[str]) -> Study:
        """A copy with ``TABLE.FIELD=VALUE`` settings applied (``melbo study --set``): each value read as TOML, else
        kept as text; ``discover.radius=20`` sets 20.0."""
        values: dict[str, Any] = {}
        for item in settings:
            key, sep, text = item.partition("=")
            if not sep or "." not in key:
                raise MelboError(f"--set {item!r}: use TABLE.FIELD=VALUE, e.g. --set discover.radius=20")
            try:
                values[key.strip()] = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                values[key.strip()] = text
        return self.with_values(values)

    def short_labels(self) -> dict[str, str]:
        """Per unit name, a short label for logs, tables and plots: numbers as they are ("R 20"), other values by their
        place in the sweep ("prompt 2", "model 1")."""
        out = {}
        for unit in self.units():
            parts = []
            for key, value in unit.values.items():
                field_name = key.partition(".")[2]
                name = SHORT_NAMES.get(field_name, field_name)
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                parts.append(f"{name} {value:g}" if numeric else f"{name} {self.sweep[key].index(value) + 1}")
            out[unit.name] = " · ".join(parts)
        return out

    def units(self) -> list[Unit]:
        """One unit per combination of the sweep's values (one unit when there is no sweep)."""
        keys = list(self.sweep)
        points = list(itertools.product(*(self.sweep[k] for k in keys))) or [()]
        units = []
        for number, point in enumerate(points):
            tables = copy.deepcopy(self.tables)
            for key, value in zip(keys, point):
                table, _, name = key.partition(".")
                tables.setdefault(table, {})[name] = value
            label = ", ".join(f"{k}={_show(v)}" for k, v in zip(keys, point))
            folder = "" if len(points) == 1 else f"{number:02d}-" + _slug("-".join(_show(v) for v in point))
            units.append(_unit(folder, label, tables, dict(zip(keys, point))))
        return units


def _unit(name: str, label: str, tables: dict[str, dict[str, Any]], values: dict[str, Any]) -> Unit:
    def build(table: str) -> Any:
        if table in OPTIONAL and table not in tables:
            return None
        return TABLES[table](**tables.get(table, {}))

    return Unit(
        name=name, label=label, model=build("model"), prompts=build("prompts"),
        discover=build("discover") if "vectors" not in tables else None, vectors=build("vectors"),
        choose=build("choose"), ortho=build("ortho"), eval=build("eval"), compose=build("compose"),
        probe=build("probe"), report=build("report"), values=values,
        values_given={table: set(fields) for table, fields in tables.items()},
    )


def _check_unit(where: str, unit: Unit) -> None:
    prefix = f"{where}{' (' + unit.label + ')' if unit.label else ''}"

    def check(table: str, run: Any) -> None:
        try:
            run()
        except MelboError as exc:
            raise MelboError(f"{prefix}: [{table}] {exc}") from exc

    if unit.discover is None and unit.vectors is None:
        raise MelboError(f"{prefix}: a study needs [discover] or [vectors]")
    if unit.discover is not None:
        check("discover", unit.discover.check)
    if unit.vectors is not None and not unit.vectors.file:
        raise MelboError(f"{prefix}: [vectors] needs file = \"path/to/vectors\"")
    check("choose", unit.choose.check)
    if unit.ortho is not None:
        found = unit.discover or unit.vectors
        ortho = unit.ortho
        if found is not None and found.source is not None and found.target is not None:
            ortho = unit.ortho_config(found.source, found.target) or ortho
        check("ortho", ortho.check)
    if unit.eval is not None:
        check("eval", unit.eval.check)
    if not unit.prompts.prompts or any(not p.strip() for p in unit.prompts.prompts):
        raise MelboError(f"{prefix}: [prompts] prompts must hold at least one non-empty prompt")


def _check_field(where: str, table: str, key: str, value: Any, context: str | None = None) -> None:
    """One setting against the annotation of its dataclass field: the error names the table and the field."""
    cls = TABLES[table]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    place = context or f"[{table}]"
    if key not in fields:
        raise MelboError(f"{where}: {place} has no setting {key!r}; its settings are {', '.join(fields)}")
    hint = typing.get_type_hints(cls)[key]
    if not _fits(value, hint):
        raise MelboError(f"{where}: {place} {key} = {value!r} should be {_describe(hint)}")


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "absent (none)"
    if origin in (list, tuple):
        return f"a list of {_describe(args[0])}s"
    return {int: "a whole number", float: "a number", str: "text", bool: "true or false"}.get(hint, str(hint))


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(_show(v) for v in value)
    return Path(value).name if isinstance(value, str) and "/" in value else str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", text)[:60].strip("_") or "run"


def builtin_study(name: str) -> Path:
    """A study shipped with melbo (``demo``): the file ``examples/`` links to."""
    from importlib import resources

    path = Path(str(resources.files("melbo").joinpath(f"data/studies/{name}.toml")))
    if not path.is_file():
        raise MelboError(f"melbo ships no study called {name!r}")
    return path
