"""Are a MELBO-ortho run's copies more than a big push? Controls, and a behaviour measure that works on any prompt.

Beside the copies, ``melbo eval --controls`` steers with vectors that share one property of the copies but not how
they were found:

* ``random_same_norm`` — random directions orthogonal to θ0 and to each other, at the copies' median norm;
* ``random_base_norm`` — the same directions at ‖θ0‖;
* ``copies_at_base_norm`` — the copies rescaled to ‖θ0‖ (the post's caveat: is it only their size?);
* ``unsteered`` (no vector), ``mean`` (mean of the copies) and ``mean_sqrt_k`` (mean × √k, the post's
  "meaned-scaled"); ``copies`` themselves; and ``base``, θ0 itself (the floor: its own text under it).

Each is measured two ways, on the run's prompt and on held-out prompts:

* its greedy completion's label, against θ0's label on the same prompt (``behaviour_share`` on the run's prompt,
  ``held_out_agreement`` on the others);
* **base NLL**: the mean negative log-likelihood per token of θ0's own greedy completion (its first ``nll_tokens``
  tokens), teacher-forced, under the steering (``base_nll``: median over held-out prompts; ``base_nll_run_prompt``). If a vector carries θ0's
  behaviour, θ0's text is likely under it; a push that only moves the model elsewhere makes it unlikely. This needs
  no label and no judge, and one forward pass per vector and prompt.

Everything is stored in eval.json under ``controls`` (one :class:`ControlResult` per name, with per-vector values) and
``control_settings``; a second call computes only what is missing.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from melbo.analysis.config import EvalConfig
from melbo.analysis.significance import LEVEL, controls_needed, median_below, rank_lower, share_greater, smallest_p
from melbo.errors import MelboError
from melbo.files.runs import Run
from melbo.labels import NO_BEHAVIOUR, Rule, label
from melbo.model.forward import PromptState, continuation_nll, greedy_tokens, up_to_eos
from melbo.model.layers import residual_after
from melbo.model.loading import LoadedModel
from melbo.objectives import random_orthogonal_block

CONTROLS = ("copies", "random_same_norm", "random_base_norm", "copies_at_base_norm", "unsteered", "mean", "mean_sqrt_k", "base")
RANDOM_CONTROLS = ("random_same_norm", "random_base_norm")


def control_vectors(vectors: Tensor, seed: int, count: int | None = None) -> dict[str, Tensor]:
    """The steering vectors of every control, one per row, from a MELBO-ortho run's vectors (row 0 = θ0).

    ``count`` random directions (default: :func:`default_count`) orthogonal to θ0 and to each other, drawn with ``seed``
    (float64, so a rerun gives the same directions); ``copies_at_base_norm`` rescales the first ``count`` copies.
    ``unsteered``, ``mean``, ``mean_sqrt_k`` and ``base`` (θ0) have one row each.
    """
    if vectors.ndim != 2 or vectors.shape[0] < 2:
        raise MelboError("controls need a MELBO-ortho run with θ0 in row 0 and at least one copy")
    vectors = vectors.detach().cpu().float()
    base, copies = vectors[0], vectors[1:]
    k, d = copies.shape
    n = default_count(k) if count is None else max(1, min(count, k))
    base_norm = float(base.norm())
    if base_norm == 0:
        raise MelboError("θ0 (row 0) is zero: a run without a base vector has no controls")
    same_norm = statistics.median(float(x) for x in copies.norm(dim=-1))
    generator = torch.Generator().manual_seed(seed)
    directions = random_orthogonal_block(n, d, 1.0, (base / base_norm)[None], generator)
    mean = copies.mean(dim=0, keepdim=True)
    return {
        "copies": copies,
        "random_same_norm": directions * same_norm,
        "random_base_norm": directions * base_norm,
        "copies_at_base_norm": copies[:n] * (base_norm / copies[:n].norm(dim=-1, keepdim=True).clamp_min(1e-30)),
        "unsteered": torch.zeros(1, d),
        "mean": mean,
        "mean_sqrt_k": mean * math.sqrt(k),
        "base": base[None],
    }


def default_count(copies: int) -> int:
    """Vectors per random or rescaled control: a fifth of the copies. Their completions and the base-NLL passes (of
    the copies too: one forward over prompt and θ0's tokens per row, dearer than a generated token) then keep
    ``--controls`` within about twice the eval's time (bench/eval_throughput.py). A few copies get more: at least as
    many as the verdict's tests need to reach p ≤ ``LEVEL`` (3 against 3 or 4 copies, 2 against 5 to 18), where the
    copies allow it (:func:`melbo.analysis.significance.controls_needed`)."""
    return max(1, (copies - 4) // 5, controls_needed(copies) or 1)


@dataclass
class ControlVector:
    """One steering vector of a control: its norm, and per prompt its greedy label and θ0's completion NLL."""

    norm: float
    index: int | None = None  # the copy's index in the run (copies and copies_at_base_norm)
    labels: dict[str, str] = field(default_factory=dict)  # prompt → label of its greedy completion
    texts: dict[str, str] = field(default_factory=dict)  # prompt → its greedy completion (copies: see eval's completions)
    nll: dict[str, float] = field(default_factory=dict)  # prompt → θ0's completion NLL (nats per token) under it

    def median_nll(self, prompts: list[str]) -> float | None:
        """Median of θ0's completion NLL under this vector over ``prompts`` (those measured), or None."""
        values = [self.nll[p] for p in prompts if p in self.nll]
        return statistics.median(values) if values else None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ControlVector:
        return cls(float(data["norm"]), data.get("index"), dict(data.get("labels", {})), dict(data.get("texts", {})),
                   {k: float(v) for k, v in data.get("nll", {}).items()})


@dataclass
class ControlResult:
    """One control's summary (what the verdict table shows) and its vectors."""

    name: str
    vectors: list[ControlVector]
    behaviour_share: float | None = None  # share of its completions on the run's prompt carrying θ0's label there
    held_out_agreement: float | None = None  # share of (vector, held-out prompt) whose label is θ0's on that prompt
    base_nll: float | None = None  # median over vectors of the median over held-out prompts of θ0's completion NLL
    base_nll_run_prompt: float | None = None  # median over vectors of θ0's completion NLL on the run's prompt

    @property
    def norm(self) -> float:
        return statistics.median(v.norm for v in self.vectors) if self.vectors else 0.0

    def summarise(self, run_prompt: str, held_out: list[str], base_labels: dict[str, str]) -> None:
        """Fill the summary fields from the per-vector values (θ0's label per prompt in ``base_labels``)."""
        own = self.carries(run_prompt, base_labels.get(run_prompt))
        self.behaviour_share = sum(own) / len(own) if own else None
        agree = [v.labels[p] == base_labels.get(p) for v in self.vectors for p in held_out if p in v.labels]
        self.held_out_agreement = sum(agree) / len(agree) if agree else None
        per_vector = self.held_out_nll(held_out)
        self.base_nll = statistics.median(per_vector) if per_vector else None
        run_nll = self.nll_on(run_prompt)
        self.base_nll_run_prompt = statistics.median(run_nll) if run_nll else None

    def carries(self, prompt: str, base_label: str | None) -> list[bool]:
        """Per vector labelled on ``prompt``: whether its completion there carries ``base_label`` (θ0's)."""
        return [v.labels[prompt] == base_label for v in self.vectors if prompt in v.labels]

    def nll_on(self, prompt: str) -> list[float]:
        """Per vector measured on ``prompt``: θ0's completion NLL there under it."""
        return [v.nll[prompt] for v in self.vectors if prompt in v.nll]

    def held_out_nll(self, held_out: list[str]) -> list[float]:
        """Per vector measured: the median over ``held_out`` of θ0's completion NLL under it."""
        return [m for v in self.vectors if (m := v.median_nll(held_out)) is not None]

    def to_json(self) -> dict[str, Any]:
        return {
            "norm": self.norm, "count": len(self.vectors), "behaviour_share": self.behaviour_share,
            "held_out_agreement": self.held_out_agreement, "base_nll": self.base_nll,
            "base_nll_run_prompt": self.base_nll_run_prompt, "vectors": [v.to_json() for v in self.vectors],
        }

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> ControlResult:
        return cls(
            name, [ControlVector.from_json(v) for v in data.get("vectors", [])], data.get("behaviour_share"),
            data.get("held_out_agreement"), data.get("base_nll"), data.get("base_nll_run_prompt"),
        )


@dataclass
class BaseCompletion:
    """θ0's greedy completion on one prompt: its token ids (what the NLL is measured on), text and label."""

    tokens: list[int]  # every greedy token (the label reads them all; the NLL its first nll_tokens)
    text: str
    label: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BaseCompletion:
        return cls([int(t) for t in data["tokens"]], data["text"], data["label"])


BREAKDOWN = ("copies", "random_same_norm", "copies_at_base_norm", "unsteered", "base")  # the per-prompt table's columns


@dataclass(frozen=True)
class PromptNLL:
    """One prompt's row of :meth:`Controls.nll_by_prompt`."""

    prompt: str
    base_label: str | None  # θ0's label on this prompt
    trained: bool  # the run's prompt (the copies were trained on it)
    median_nll: dict[str, float | None]  # control name → median over its vectors of θ0's completion NLL here
    against_unsteered: str = ""  # θ0's text here under the copies against no steering, by the sign test: "likelier (p …)" …

@dataclass
class Controls:
    """eval.json's ``controls`` (per name) and ``control_settings`` (the settings, the prompts, θ0's completions)."""

    settings: dict[str, Any]
    run_prompt: str
    held_out: list[str]
    base: dict[str, BaseCompletion] = field(default_factory=dict)  # prompt → θ0's completion
    results: dict[str, ControlResult] = field(default_factory=dict)

    def summarise(self) -> None:
        labels = {p: c.label for p, c in self.base.items()}
        for result in self.results.values():
            result.summarise(self.run_prompt, self.held_out, labels)

    def to_json(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(``controls``, ``control_settings``) as eval.json stores them."""
        settings = {**self.settings, "run_prompt": self.run_prompt, "held_out": self.held_out,
                    "base_completions": {p: c.to_json() for p, c in self.base.items()}}
        return {name: r.to_json() for name, r in self.results.items()}, settings

    @classmethod
    def from_json(cls, controls: dict[str, Any] | None, settings: dict[str, Any] | None) -> Controls | None:
        if not controls or not settings:
            return None
        own = {k: v for k, v in settings.items() if k not in ("run_prompt", "held_out", "base_completions")}
        return cls(
            own, settings["run_prompt"], list(settings.get("held_out", [])),
            {p: BaseCompletion.from_json(c) for p, c in settings.get("base_completions", {}).items()},
            {name: ControlResult.from_json(name, data) for name, data in controls.items()},
        )

    def rows(self) -> list[ControlResult]:
        return [self.results[n] for n in CONTROLS if n in self.results]

    def nll_by_prompt(self, names: tuple[str, ...] = BREAKDOWN) -> list[PromptNLL]:
        """Where the base NLL comes from: per prompt (the run's first, then the held-out ones), θ0's label there and
        the median over each control's vectors of θ0's completion NLL on that prompt. A median over held-out prompts
        hides which kind of prompt a copy carries θ0's behaviour to, and on which its size does the harm."""
        out = []
        for prompt in [self.run_prompt, *self.held_out]:
            medians = {}
            for name in names:
                result = self.results.get(name)
                values = result.nll_on(prompt) if result is not None else []
                medians[name] = statistics.median(values) if values else None
            base = self.base.get(prompt)
            out.append(PromptNLL(prompt, base.label if base is not None else None, prompt == self.run_prompt, medians,
                                 self.against_unsteered(prompt)))
        return out

    def against_unsteered(self, prompt: str) -> str:
        """On one prompt, is θ0's text likelier under the copies than with no steering, less likely, or neither (the
        sign test of the copies' NLL there against the unsteered model's, each way)? "" where either was not measured;
        "too few copies" where no outcome could count (4 copies or fewer)."""
        copies, plain = self.results.get("copies"), self.results.get("unsteered")
        values = copies.nll_on(prompt) if copies is not None else []
        plain_nll = plain.nll_on(prompt) if plain is not None else []
        if not values or not plain_nll:
            return ""
        point = plain_nll[0]
        lower, higher = median_below(values, point), median_below([-v for v in values], -point)
        if lower <= LEVEL:
            return f"likelier{_p(lower)}"
        if higher <= LEVEL:
            return f"less likely{_p(higher)}"
        floor = smallest_p("nll_unsteered", len(values))
        return f"too few copies (p ≥ {floor:.2g} at best)" if floor > LEVEL else f"neither{_p(min(lower, higher))}"

    def headline(self) -> str:
        """The verdict's first clause ("the copies carry θ0's behaviour beyond a push of their size, …"), without the figures."""
        return self._verdict()[0]

    def verdict(self) -> str:
        """The headline and the figures it rests on, in one sentence."""
        head, parts = self._verdict()
        return head + (": " + "; ".join(parts) if parts else "")

    def _verdict(self) -> tuple[str, list[str]]:
        """One sentence: do the copies carry θ0's behaviour beyond a push of their size, on the run's prompt and off it?
        A difference counts when a one-sided test over the vectors gives p ≤ ``LEVEL`` (:mod:`melbo.analysis.significance`):
        equal medians, or a few vectors' worth of difference, are not a finding. A comparison whose most extreme outcome
        could not reach ``LEVEL`` with the vectors measured (4 copies against 1 random direction: p ≥ 0.2) is not read
        as "no better": the verdict says there were too few vectors to tell, and how many more it needs."""
        copies, random, plain, base = (self.results.get(n) for n in ("copies", "random_same_norm", "unsteered", "base"))
        if copies is None or random is None or plain is None:
            return "no verdict: the copies or a control are missing", []
        tests, floors = self.tests(), self.floors()
        by_text = "nll_prompt" in floors  # θ0's label names no behaviour: the run's prompt is judged by θ0's text, not the label
        on = "nll_prompt" if by_text else "share"
        on_prompt, than_random, than_plain = (tests.get(k, 1.0) <= LEVEL for k in (on, "nll_random", "nll_unsteered"))
        untold = {k for k, floor in floors.items() if floor > LEVEL and tests.get(k, 1.0) > LEVEL}  # could not have counted
        if on_prompt and than_random and than_plain:
            head = "the copies carry θ0's behaviour beyond a push of their size, on the run's prompt and on held-out prompts"
        elif not (on_prompt or than_random or than_plain):
            told_random = {on, "nll_random"} & floors.keys() - untold  # against random directions, and could count
            head = ("the copies do no better than random directions of their size" if told_random
                    else "too few vectors to tell whether the copies carry θ0's behaviour beyond a push of their size")
        else:
            what = "make θ0's text likelier" if by_text else "carry θ0's label more often"
            if on_prompt:
                head = "on the run's prompt the copies carry θ0's behaviour beyond a push of their size"
            elif on in untold:
                head = f"on the run's prompt too few vectors to tell whether the copies {what} than random directions of their size"
            elif by_text:
                head = "on the run's prompt the copies make θ0's text no likelier than random directions of their size"
            else:
                head = "on the run's prompt the copies carry θ0's label no more often than random directions of their size"
            if than_random and than_plain:
                head += "; on held-out prompts they make θ0's text likelier than a push of their size does and than no steering"
            elif than_random:
                head += "; on held-out prompts they make θ0's text likelier than a push of their size does" + (
                    "" if "nll_unsteered" in untold else ", but not than no steering")
            elif than_plain:
                head += "; on held-out prompts they make θ0's text likelier than no steering" + (
                    "" if "nll_random" in untold else ", but not than a push of their size")
            elif not untold & {"nll_random", "nll_unsteered"}:
                head += "; off it they do not"
        parts = []
        if by_text and None not in (copies.base_nll_run_prompt, random.base_nll_run_prompt):
            label = self.base[self.run_prompt].label
            parts.append(f"on the run's prompt θ0's text costs {copies.base_nll_run_prompt:.2f} nats/token under the copies against "
                         f"{random.base_nll_run_prompt:.2f} under random directions at their norm{_p(tests.get(on))} (θ0's label "
                         f"there, {label!r}, names no behaviour, so the text is compared, not the label)")
        elif copies.behaviour_share is not None and random.behaviour_share is not None:
            parts.append(f"{copies.behaviour_share:.0%} of the copies carry θ0's label on the run's prompt against "
                         f"{random.behaviour_share:.0%} of random directions at their norm{_p(tests.get('share'))}")
        if None not in (copies.base_nll, random.base_nll, plain.base_nll):
            floor = f", {base.base_nll:.2f} under θ0 itself" if base is not None and base.base_nll is not None else ""
            parts.append(f"on held-out prompts θ0's text costs {copies.base_nll:.2f} nats/token under the copies, "
                         f"{random.base_nll:.2f} under random directions{_p(tests.get('nll_random'))}, "
                         f"{plain.base_nll:.2f} unsteered{_p(tests.get('nll_unsteered'))}{floor}")
        if tests:
            parts.append(f"each p from a one-sided test over the vectors (a difference counts at p ≤ {LEVEL:g})")
        if untold:
            parts.append(self._too_few(untold, floors))
        return head, parts

    def _too_few(self, untold: set[str], floors: dict[str, float]) -> str:
        """Which comparisons could not count with the vectors measured, and what would let them."""
        n, m = (len(self.results[name].vectors) for name in ("copies", "random_same_norm"))
        said = []
        against_random = untold & {"share", "nll_prompt", "nll_random"}
        if against_random:
            needed = controls_needed(n)
            fix = ("3 copies or more can tell" if needed is None else f"--control-count {needed} or more can tell"
                   if needed > m else "more vectors can tell")
            said.append(f"against random directions, {n} copies and {m} random direction{'s' * (m != 1)} give p ≥ "
                        f"{min(floors[k] for k in against_random):.2g} at best ({fix})")
        if "nll_unsteered" in untold:
            said.append(f"against no steering, {n} copies give p ≥ {floors['nll_unsteered']:.2g} at best (5 copies or more can tell)")
        return "too few vectors to tell: " + "; ".join(said)

    def tests(self) -> dict[str, float]:
        """p-values of the verdict's three comparisons, where both sides were measured: ``share`` (more copies carry θ0's
        label on the run's prompt than random directions at their norm: Fisher's exact test; where θ0's label there names
        no behaviour, "other" or "degenerate", ``nll_prompt`` in its place: θ0's text on the run's prompt likelier under
        the copies than under those directions, the rank test), ``nll_random`` (θ0's
        held-out text likelier under the copies than under those directions: the rank test) and ``nll_unsteered`` (…
        than with no steering: the sign test of the copies' median against the unsteered model's value)."""
        return {name: test() for name, (test, _) in self._comparisons().items()}

    def floors(self) -> dict[str, float]:
        """The smallest p each of :meth:`tests`' comparisons could give with the vectors measured
        (:func:`melbo.analysis.significance.smallest_p`)."""
        return {name: floor for name, (_, floor) in self._comparisons().items()}

    def _comparisons(self) -> dict[str, tuple[Callable[[], float], float]]:
        """Each comparison measured on both sides: (its test, the smallest p its group sizes allow)."""
        copies, random, plain = (self.results.get(n) for n in ("copies", "random_same_norm", "unsteered"))
        if copies is None or random is None or plain is None:
            return {}
        out: dict[str, tuple[Callable[[], float], float]] = {}
        base = self.base.get(self.run_prompt)
        label = base.label if base is not None else None
        if label in NO_BEHAVIOUR:  # "other" is the catch-all: a random push lands there too, so the label tells little
            mine, theirs = copies.nll_on(self.run_prompt), random.nll_on(self.run_prompt)
            if mine and theirs:
                out["nll_prompt"] = (lambda: rank_lower(mine, theirs), smallest_p("nll_random", len(mine), len(theirs)))
        else:
            own, others = copies.carries(self.run_prompt, label), random.carries(self.run_prompt, label)
            if own and others:
                out["share"] = (lambda: share_greater(sum(own), len(own), sum(others), len(others)), smallest_p("share", len(own), len(others)))
        nll, random_nll = copies.held_out_nll(self.held_out), random.held_out_nll(self.held_out)
        if nll and random_nll:
            out["nll_random"] = (lambda: rank_lower(nll, random_nll), smallest_p("nll_random", len(nll), len(random_nll)))
        if nll and plain.base_nll is not None:
            point = plain.base_nll
            out["nll_unsteered"] = (lambda: median_below(nll, point), smallest_p("nll_unsteered", len(nll)))
        return out


def _p(value: float | None) -> str:
    if value is None:
        return ""
    return f" (p {value:.2g})" if value >= 0.001 else " (p < 0.001)"


@dataclass
class ControlSummary:
    """What a study keeps of a run's controls: each control's summary figures and the verdict."""

    figures: dict[str, dict[str, float | None]]  # name → behaviour_share, held_out_agreement, base_nll, base_nll_run_prompt, norm
    verdict: str

    @classmethod
    def of(cls, controls: Controls) -> ControlSummary:
        keys = ("behaviour_share", "held_out_agreement", "base_nll", "base_nll_run_prompt")
        return cls({r.name: {**{k: getattr(r, k) for k in keys}, "norm": r.norm} for r in controls.rows()}, controls.verdict())

    def get(self, name: str, key: str) -> float | None:
        return self.figures.get(name, {}).get(key)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ControlSummary:
        return cls(dict(data["figures"]), str(data["verdict"]))


def controls_problem(run: Run, indices: list[int] | None = None) -> str | None:
    """Why ``run`` can have no controls (they need θ0: a MELBO-ortho run, row 0 the base, with a copy among ``indices``,
    the vectors evaluated), or None."""
    if not (run.records and run.records[0].base):
        return f"--controls needs a MELBO-ortho run (row 0 = θ0); {run.path} is a {run.meta.kind} run"
    if run.vectors.shape[0] < 2:
        return f"--controls: {run.path} has no copies of θ0 yet"
    if indices is not None and not any(i != 0 for i in indices):
        return "--controls needs at least one copy among the vectors evaluated (θ0 is row 0)"
    return None


def check_controls(run: Run, indices: list[int] | None = None) -> None:
    problem = controls_problem(run, indices)
    if problem:
        raise MelboError(problem)


@dataclass
class ControlPlan:
    """The controls of one eval: every control's vectors, and what eval.json holds of them (:func:`plan_controls`).

    The eval generates the rows :meth:`todo` names in its own generate calls, beside the copies' (one call per
    prompt, not two), hands them to :meth:`record`, and calls :meth:`finish` once a prompt's rows are all in."""

    controls: Controls
    vectors: dict[str, Tensor]  # control name → its steering vectors, one per row
    source: int  # the run's source layer

    @property
    def flat(self) -> list[tuple[str, int]]:
        return [(name, row) for name in CONTROLS for row in range(self.vectors[name].shape[0])]

    def todo(self, prompt: str) -> list[tuple[str, int]]:
        """The rows still without a label on ``prompt``, the copies left out (their labels are the eval's own)."""
        return [(n, r) for n, r in self.flat if n != "copies" and prompt not in self.controls.results[n].vectors[r].labels]

    def rows(self, todo: list[tuple[str, int]]) -> Tensor:
        return torch.stack([self.vectors[name][row] for name, row in todo])

    def record(
        self, lm: LoadedModel, prompt: str, todo: list[tuple[str, int]], texts: list[str], ids: list[Tensor],
        cfg: EvalConfig, rules: tuple[Rule, ...],
    ) -> None:
        """The completions (and their token ids) of ``todo``'s rows on ``prompt``."""
        for (name, row), out, new in zip(todo, texts, ids, strict=True):
            vector = self.controls.results[name].vectors[row]
            vector.labels[prompt] = label(out, rules)[0]
            vector.texts[prompt] = out
            if name == "base" and cfg.temperature == 0 and prompt not in self.controls.base:  # θ0's greedy completion
                self.controls.base[prompt] = base_completion(lm, up_to_eos(lm, new), rules)

    def nll_target(self, prompt: str, cfg: EvalConfig, device: torch.device) -> Tensor | None:
        """θ0's first ``nll_tokens`` greedy tokens on ``prompt`` (what the base NLL scores), once known, else None."""
        base = self.controls.base.get(prompt)
        return torch.tensor(base.tokens[: cfg.nll_tokens], device=device) if base is not None and base.tokens else None

    def record_nll(self, prompt: str, rows: list[tuple[str, int] | int], values: list[float]) -> None:
        """θ0's completion NLL on ``prompt`` under each of ``rows``: a control's ``(name, row)``, or a copy's index in
        the run (the ``copies`` control's vector of that index, when it has one)."""
        copies = {v.index: v for v in self.controls.results["copies"].vectors}
        for job, value in zip(rows, values, strict=True):
            vector = copies.get(job) if isinstance(job, int) else self.controls.results[job[0]].vectors[job[1]]
            if vector is not None:
                vector.nll[prompt] = value

    def finish(
        self, lm: LoadedModel, state: PromptState, cfg: EvalConfig, copy_labels: Callable[[str, int], str | None],
        rules: tuple[Rule, ...],
    ) -> None:
        """``state``'s prompt, once its rows are generated: the copies' labels, θ0's completion, and every base NLL the
        generate calls did not already measure (:meth:`record_nll`)."""
        text, source = state.text, self.source
        for vector in self.controls.results["copies"].vectors:
            if text not in vector.labels and vector.index is not None:
                known = copy_labels(text, vector.index)
                if known is not None:
                    vector.labels[text] = known
        base = self.vectors["base"][0].to(lm.device)
        if text not in self.controls.base:  # sampled decoding (or a resumed prompt): θ0's greedy completion on its own
            self.controls.base[text] = base_completion(lm, greedy_tokens(lm, state.ids, base, source, cfg.max_new_tokens), rules)
        missing = [(n, r) for n, r in self.flat if text not in self.controls.results[n].vectors[r].nll]
        if missing:
            base_ids = torch.tensor([self.controls.base[text].tokens[: cfg.nll_tokens]], device=lm.device)
            full_ids = torch.cat([state.ids, base_ids], dim=1)
            with torch.no_grad():
                full = PromptState(text, full_ids, residual_after(lm.model, source, full_ids).float())
            nll = continuation_nll(lm.model, full, source, self.rows(missing).to(lm.device), base_ids.shape[1])
            for (name, row), value in zip(missing, nll.tolist()):
                self.controls.results[name].vectors[row].nll[text] = value
        self.controls.summarise()


def plan_controls(
    run: Run, prompts: list[str], cfg: EvalConfig, stored: Controls | None, indices: list[int] | None = None,
) -> ControlPlan:
    """Every control of ``run`` (a MELBO-ortho run) on ``prompts`` (the run's own first, then the held-out ones).

    ``indices``: the copies the eval steers with (``--index``; θ0, row 0, is always the base); None: every copy. The
    controls are built from those copies and sized to them, so evaluating 64 copies of a whole basis costs what 64 do.
    ``stored`` is what an earlier call computed: kept when its settings match, so only what is missing is computed.
    A prompt the run was trained on (one of its own, or a shipped one its copies also matched θ0 on) is measured but
    never counted as held out."""
    check_controls(run, indices)
    chosen = sorted({i for i in (indices if indices is not None else range(1, run.vectors.shape[0])) if i != 0})
    vectors = control_vectors(torch.cat([run.vectors[:1], run.vectors[chosen]]), cfg.seed, cfg.control_count or None)
    settings = {
        "seed": cfg.seed, "count": int(vectors["random_same_norm"].shape[0]), "copies": int(vectors["copies"].shape[0]),
        "mode": cfg.mode(), "max_new_tokens": cfg.max_new_tokens, "nll_tokens": cfg.nll_tokens, "base_norm": round(float(run.vectors[0].norm()), 4),
        **({"indices": chosen} if len(chosen) < run.vectors.shape[0] - 1 else {}),  # a subset of the copies (--index)
    }
    controls = stored if stored is not None and stored.settings == settings and stored.run_prompt == prompts[0] else None
    if controls is None:
        controls = Controls(settings, prompts[0], [])
        for name, rows in vectors.items():
            copies = name in ("copies", "copies_at_base_norm")
            controls.results[name] = ControlResult(name, [ControlVector(float(v.norm()), chosen[i] if copies else None) for i, v in enumerate(rows)])
    controls.held_out = list(dict.fromkeys([*controls.held_out, *run.meta.held_out(prompts[1:])]))
    return ControlPlan(controls, vectors, run.source_layer)


def base_completion(lm: LoadedModel, tokens: torch.Tensor, rules: tuple[Rule, ...]) -> BaseCompletion:
    """θ0's completion from its token ids: the ids (the NLL's target), the text and its label."""
    text = str(lm.tokenizer.decode(tokens, skip_special_tokens=True))
    return BaseCompletion(tokens.tolist(), text, label(text, rules)[0])
