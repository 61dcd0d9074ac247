"""What a study has done: progress events, each unit's finished steps and runs (saved in study.json), and the result.

Below the pipeline and the study page alike: both read these types, neither imports the other for them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melbo.analysis.choose import BaseChoice
from melbo.analysis.controls import ControlSummary
from melbo.analysis.fidelity import OrthoFidelity
from melbo.study.spec import Study


@dataclass
class Event:
    """Progress of a study, for a live view: a stage starting, or one optimisation step of a run."""

    unit: str  # the unit's label ("" for a study of one unit)
    stage: str  # "discover", "choose", "ortho", "eval", "compose", "probe", "report"
    run: str = ""  # the run folder's name
    block: int = 0
    blocks: int | None = None
    step: int = 0
    steps: int | None = None
    loss: float | None = None
    note: str = ""  # news within a stage, a line of its own in a log: auto R's candidates and its choice


EventCallback = Callable[[Event], None]


@dataclass
class OrthoOutcome:
    """One MELBO-ortho run of a unit: its base, where it lives, and how faithful its copies are."""

    folder: str  # relative to the study folder
    base: BaseChoice
    fidelity: OrthoFidelity
    behaviour_share: float | None = None  # share of copies whose greedy completion carries θ0's label (eval)
    held_out_share: float | None = None  # the same on the eval's held-out prompts (θ0's label on the run's prompt)
    controls: ControlSummary | None = None  # eval with controls = true
    judged: dict[str, float | None] = field(default_factory=dict)  # concept → share of copies the judge rated 2 (eval judge)

    def to_json(self) -> dict[str, Any]:
        return {
            "folder": self.folder, "base": self.base.to_json(), "fidelity": self.fidelity.to_json(),
            "behaviour_share": self.behaviour_share, "held_out_share": self.held_out_share,
            "controls": self.controls.to_json() if self.controls else None, "judged": self.judged,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OrthoOutcome:
        return cls(
            data["folder"], BaseChoice.from_json(data["base"]), OrthoFidelity(**data["fidelity"]), data.get("behaviour_share"),
            data.get("held_out_share"), ControlSummary.from_json(data["controls"]) if data.get("controls") else None,
            dict(data.get("judged") or {}),
        )


@dataclass
class UnitOutcome:
    """What a unit has done so far (saved in study.json after every step)."""

    name: str
    label: str
    model: str
    steps: dict[str, float] = field(default_factory=dict)  # finished step → seconds it took
    discovery: str = ""  # folder of the discovery (or imported vectors), relative to the study folder
    bases: list[BaseChoice] = field(default_factory=list)
    orthos: list[OrthoOutcome] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(self.steps.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "label": self.label, "model": self.model, "steps": self.steps, "discovery": self.discovery,
            "bases": [b.to_json() for b in self.bases], "orthos": [o.to_json() for o in self.orthos], "reports": self.reports,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UnitOutcome:
        return cls(
            data["name"], data["label"], data["model"], data.get("steps", {}), data.get("discovery", ""),
            [BaseChoice.from_json(b) for b in data.get("bases", [])], [OrthoOutcome.from_json(o) for o in data.get("orthos", [])],
            data.get("reports", []),
        )


@dataclass
class StudyResult:
    """A finished (or resumed-to-the-end) study: its folder, units, and the page that shows them."""

    folder: Path
    study: Study
    units: list[UnitOutcome]
    page: Path | None = None
    model_loads: int | None = None  # models loaded to run it (in this process, or by every Ray worker)

    def __repr__(self) -> str:
        from melbo.output.display import study_repr

        return study_repr(self)

    def _repr_html_(self) -> str:
        """In Jupyter: the table ``melbo study`` ends with."""
        from melbo.output.display import study_html

        return study_html(self)
