"""The settings of the commands that study a run (eval, the choice of bases, compose): the one set of defaults
the CLI and study files read. No torch here, so the command line can check them before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from melbo.engines.config import BEHAVIOUR_TOKENS
from melbo.errors import MelboError
from melbo.setting import setting

LABEL_PREFERENCE = ("code", "refusal", "compliance", "other")
CHOOSE_RULES = ("clearest", "faithful", "label", "effect", "index")
DEFAULT_KS = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 1500)


@dataclass(frozen=True)
class EvalConfig:
    """What ``melbo eval`` computes (stored in eval.json beside the results); the CLI's defaults come from here."""

    max_new_tokens: int = setting(BEHAVIOUR_TOKENS, "Tokens generated per completion.", minimum=1)  # where labels are read
    temperature: float = setting(0.0, "0 = greedy; > 0 samples.", minimum=0.0)
    samples: int = setting(1, "Completions per vector when sampling.", minimum=1)
    seed: int = setting(0, "Random seed (sampling, and the controls' random directions).")
    batch: int = setting(64, "Vectors per generate call (one per row, sharing the KV-cache machinery).", minimum=1)
    base: int | None = setting(
        None, "The vector KL is measured against (default: θ0, row 0, in a MELBO-ortho run; the unsteered model in a discovery run).",
    )
    top_k: int = 10
    controls: bool = setting(  # analysis/controls.py
        False,
        "MELBO-ortho runs: also steer with norm-matched random directions, the copies at ‖θ0‖, their mean and none, and "
        "measure θ0's completion NLL under each (held-out prompts: yours, else 4 shipped ones).",
        "--controls",
    )
    control_count: int = setting(  # controls.default_count: --controls keeps within about twice the eval's time
        0, "Vectors per random or rescaled control (0: a fifth of the copies, so the eval about doubles at most, and at "
        "least as many as the verdict's tests need to reach p ≤ 0.05: 3 for 3 or 4 copies, 2 for 5 to 18).",
        minimum=0,
    )
    # nll_tokens: where a behaviour is decided, and the span fast MELBO-ortho matches (over longer spans θ0's wording
    # outweighs its behaviour)
    nll_tokens: int = setting(16, "Controls: θ0's first N greedy tokens are scored (base NLL).", minimum=1)

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

    @staticmethod
    def parse_ks(text: str) -> list[int]:
        """``"1,2,5,10"`` (the command line's --k) as a list, or a one-line error."""
        try:
            ks = [int(x) for x in text.split(",")]
        except ValueError as exc:
            raise MelboError(f"--k {text!r}: give whole numbers separated by commas, e.g. 1,2,5,10") from exc
        if min(ks) < 1:
            raise MelboError(f"--k {text!r}: each k is a number of vectors to average, at least 1")
        return ks


@dataclass
class ProbeConfig:
    """``melbo probe`` (and a study's ``[probe]``): presence of each vector while the unsteered model shows a behaviour."""

    prompt_set: str = setting("coding", "Shipped prompts to use when none is given: coding, harmful, neutral, chit-chat.")
    max_new_tokens: int = setting(48, "Tokens generated per completion.", minimum=1)
    random_directions: int = setting(512, "Random directions for the baseline.", minimum=2)


@dataclass(frozen=True)
class GenerateConfig:
    """``melbo generate`` and :func:`melbo.generate`: how one steered completion is decoded."""

    max_new_tokens: int = setting(48, "Tokens generated per completion.", minimum=1)
    temperature: float = setting(0.0, "0 = greedy; > 0 samples.", minimum=0.0)
    seed: int = setting(0, "Random seed (sampling).")


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
