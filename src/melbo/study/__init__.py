"""Studies: many MELBO runs described in one TOML file and run as one job (``melbo study``).

>>> from melbo.study import Study, run_study
>>> result = run_study(Study.from_toml("examples/demo.toml"), "runs/demo")     # doctest: +SKIP
>>> result.page                                                               # doctest: +SKIP
PosixPath('runs/demo/study.html')
"""

from melbo.study.outcome import Event, OrthoOutcome, StudyResult, UnitOutcome
from melbo.study.pipeline import ModelCache, run_study
from melbo.study.spec import Study, Unit, builtin_study

QUICK_DEMO = {  # a demo of under a minute that exercises every stage (`melbo demo --quick`, smoke tests); R fixed: no calibration
    "discover.count": 6, "discover.block": 6, "discover.steps": 10, "discover.completion_tokens": 12, "discover.radius": 26.0,
    "choose.trials": 2, "choose.trial_copies": 2, "choose.trial_steps": 3, "choose.trial_tokens": 8,
    "ortho.count": 4, "ortho.block": 4, "ortho.steps": 10, "ortho.completion_tokens": 12, "eval.max_new_tokens": 12,
    "ortho.extra_prompts": 0,  # the run's prompt alone: the default's 4 shipped prompts cost ~2.5× the copies' time
    "compose.max_new_tokens": 12, "eval.held_out": ["What is the capital of Australia?"],  # controls: one held-out prompt
}


def demo_study(quick: bool = False, ortho_count: int | None = None, device: str = "auto") -> Study:
    """The study ``melbo demo`` runs (``examples/demo.toml``), optionally shortened, on ``device``."""
    study = Study.from_toml(builtin_study("demo"))
    values: dict[str, object] = dict(QUICK_DEMO) if quick else {}
    if ortho_count is not None and not quick:
        values["ortho.count"] = ortho_count
    if device != "auto":
        values["model.device"] = device
    return study.with_values(values) if values else study


__all__ = [
    "Event", "ModelCache", "OrthoOutcome", "QUICK_DEMO", "Study", "StudyResult", "Unit", "UnitOutcome", "builtin_study",
    "demo_study", "run_study",
]
