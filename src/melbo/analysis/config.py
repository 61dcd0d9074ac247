"""The settings of the commands that study a run (eval, the choice of bases, compose): the one set of defaults
the CLI and study files read. No torch here, so the command line can check them before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from melbo.errors import MelboError

LABEL_PREFERENCE = ("code", "refusal", "compliance", "other")
CHOOSE_RULES = ("clearest", "faithful", "label", "effect", "index")
DEFAULT_KS = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 1500)


@dataclass(frozen=True)
class EvalConfig:
    """What ``melbo eval`` computes (stored in eval.json beside the results); the CLI's defaults come from here."""

    max_new_tokens: int = 48
    temperature: float = 0.0  # 0: greedy; > 0: sampled
    samples: int = 1  # completions per vector when sampling
    seed: int = 0
    batch: int = 64  # vectors per generate call (one per row, sharing the KV-cache machinery)
    base: int = 0  # the vector KL is measured against (row 0 of an ortho run is θ0)
    top_k: int = 10
    controls: bool = False  # MELBO-ortho runs: also steer with random directions, rescaled copies, the mean… (analysis/controls.py)
    control_count: int = 0  # vectors per random or rescaled control; 0: (copies − 4) // 5 (at least 1), so that
    # --controls keeps within about twice the eval's time
    nll_tokens: int = 16  # controls: θ0's first N greedy tokens are scored (where a behaviour is decided, and the span
    # fast MELBO-ortho matches); over longer spans θ0's particular wording outweighs its behaviour

    def mode(self) -> str:
        return "greedy" if self.temperature == 0 else f"T={self.temperature:g},seed={self.seed}"

    def check(self) -> None:
        if self.max_new_tokens < 1 or self.samples < 1 or self.batch < 1:
            raise MelboError("--max-new-tokens, --samples and --batch must be at least 1")
        if self.nll_tokens < 1:
            raise MelboError("--nll-tokens must be at least 1")
        if self.control_count < 0:
            raise MelboError("--control-count must be ≥ 0 (0: a fifth of the copies)")
        if not self.temperature >= 0:
            raise MelboError("--temperature must be ≥ 0 (0 = greedy)")


@dataclass
class ComposeConfig:
    """``melbo compose`` (and a study's ``[compose]``): steer with means of the first k copies."""

    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS))
    max_new_tokens: int = 48


@dataclass
class ProbeConfig:
    """``melbo probe`` (and a study's ``[probe]``): presence of each vector while the unsteered model shows a behaviour."""

    prompt_set: str = "coding"
    max_new_tokens: int = 48
    random_directions: int = 512


@dataclass
class ChooseConfig:
    """How bases are chosen for MELBO-ortho (a study's ``[choose]`` table)."""

    by: str = "clearest"  # clearest, faithful, label, effect or index
    count: int = 1  # bases to choose (clearest, faithful, label, effect)
    indices: list[int] = field(default_factory=list)  # by = "index"
    label: str | None = None  # by = "label"
    max_nll: float = 3.0  # nats per token under the unsteered model: above, a completion is not fluent
    trials: int = 3  # by = "faithful": the clearest candidates tried
    trial_copies: int = 4  # … each with this many MELBO-ortho copies
    trial_steps: int = 30  # … found with this many evaluations
    trial_tokens: int = 32  # … whose greedy completions are labelled

    def check(self) -> None:
        if self.by not in CHOOSE_RULES:
            raise MelboError(f"choose by {self.by!r}: use one of {', '.join(CHOOSE_RULES)}")
        if self.by == "index" and not self.indices:
            raise MelboError("choose by index needs indices, e.g. indices = [3, 7]")
        if self.by == "label" and not self.label:
            raise MelboError("choose by label needs a label, e.g. label = \"code\"")
        if self.count < 1 or self.trials < 1 or self.trial_copies < 1 or self.trial_steps < 1 or self.trial_tokens < 1:
            raise MelboError("choose count, trials, trial_copies, trial_steps and trial_tokens must be at least 1")
