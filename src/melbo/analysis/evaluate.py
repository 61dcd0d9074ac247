"""``melbo eval``: steered generation for every vector of a run, first-token figures, labels, checks.

Results go to ``RUN/eval.json`` (written atomically after every batch). Evaluation is incremental: a
completion already stored for the same prompt, decoding mode and vector is never generated again, so
adding prompts or vectors only computes what is new, and an interrupted evaluation resumes where it
stopped.

KL direction: ``kl`` = KL(P_i ‖ P_base), what the MELBO-ortho post's code computed
(``F.kl_div(log P_0, P_i)``), and ``kl_reverse`` = KL(P_base ‖ P_i); both at the last prompt token.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from melbo.analysis.config import EvalConfig
from melbo.analysis.controls import Controls, plan_controls
from melbo.analysis.judge import JudgeResults
from melbo.errors import MelboError
from melbo.files.io import read_json, write_json
from melbo.files.runs import EVAL_FILE, Run
from melbo.labels import LABELS, RULES, Rule, label
from melbo.model.forward import PromptState, last_token_logits, nll_after_prompt, prepare, steered_generation
from melbo.model.frozen import runs_frozen
from melbo.model.loading import LoadedModel
from melbo.model.prompts import PromptFormat, held_out_prompts, need_prompts
from melbo.objectives import kl_divergence, max_abs_cosine
from melbo.output.live import status_unless_given


@dataclass
class Completion:
    """One completion: its text, its label and the rule that gave it."""

    label: str
    rule: str
    text: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Completion:
        return cls(data["label"], data.get("rule", ""), data["text"])


@dataclass
class FirstToken:
    """At the last prompt token: the top next tokens with their logits, and the KL both ways to the base vector."""

    top: list[tuple[str, float]]
    kl: float | None = None  # KL(P_i ‖ P_base) (None: not known, e.g. the post's published dumps)
    kl_reverse: float | None = None  # KL(P_base ‖ P_i)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"top": [list(t) for t in self.top]}
        return out | ({"kl": self.kl, "kl_reverse": self.kl_reverse} if self.kl is not None else {})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FirstToken:
        return cls([(str(t), float(v)) for t, v in data.get("top", [])], data.get("kl"), data.get("kl_reverse"))


@dataclass
class PromptResults:
    """Everything evaluated on one prompt."""

    completions: dict[str, dict[int, list[Completion]]] = field(default_factory=dict)  # mode → vector index → samples
    first_token: dict[int, FirstToken] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "completions": {mode: {str(i): [c.to_json() for c in outs] for i, outs in by.items()} for mode, by in self.completions.items()},
            "first_token": {str(i): f.to_json() for i, f in self.first_token.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PromptResults:
        return cls(
            {mode: {int(i): [Completion.from_json(c) for c in outs] for i, outs in by.items()} for mode, by in data.get("completions", {}).items()},
            {int(i): FirstToken.from_json(f) for i, f in data.get("first_token", {}).items()},
        )


@dataclass
class Generalisation:
    """Per vector, the share of held-out prompts on which it produces the base's label (its label on the run's prompt),
    or where ``base_label`` is None (a discovery run) the vector's own label on the run's prompt."""

    base_label: str | None
    prompts: list[str]
    mode: str
    share: dict[int, float]

    def to_json(self) -> dict[str, Any]:
        return {"base_label": self.base_label, "prompts": self.prompts, "mode": self.mode, "share": {str(i): v for i, v in self.share.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Generalisation:
        return cls(data["base_label"], list(data["prompts"]), data["mode"], {int(i): float(v) for i, v in data["share"].items()})


@dataclass
class EvalResults:
    """What ``eval.json`` holds, typed, and the summaries the CLI and report show. Keys it does not know are kept."""

    prompts: dict[str, PromptResults] = field(default_factory=dict)  # the run's own prompt first, then the held-out ones
    settings: dict[str, Any] = field(default_factory=dict)  # the EvalConfig it was computed with
    norms: list[float] = field(default_factory=list)
    max_abs_cos: float = 0.0
    generalisation: Generalisation | None = None
    controls: Controls | None = None  # melbo eval --controls (analysis/controls.py)
    judge: JudgeResults | None = None  # melbo judge / eval --judge (analysis/judge.py)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.extra, "prompts": {p: r.to_json() for p, r in self.prompts.items()}}
        if self.settings:
            out["settings"] = self.settings
        if self.norms:
            out.update(norms=self.norms, max_abs_cos=self.max_abs_cos)
        if self.generalisation is not None:
            out["generalisation"] = self.generalisation.to_json()
        if self.controls is not None:
            out["controls"], out["control_settings"] = self.controls.to_json()
        if self.judge is not None:
            out["judge"] = self.judge.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> EvalResults:
        data = dict(data or {})
        generalisation = data.pop("generalisation", None)
        judge = data.pop("judge", None)
        return cls(
            prompts={p: PromptResults.from_json(r) for p, r in (data.pop("prompts", None) or {}).items()},
            settings=data.pop("settings", None) or {},
            norms=[float(x) for x in data.pop("norms", None) or []],
            max_abs_cos=float(data.pop("max_abs_cos", 0.0) or 0.0),
            generalisation=Generalisation.from_json(generalisation) if generalisation else None,
            controls=Controls.from_json(data.pop("controls", None), data.pop("control_settings", None)),
            judge=JudgeResults.from_json(judge) if judge else None,
            extra=data,
        )

    @classmethod
    def read(cls, run_folder: Path) -> EvalResults:
        """A run folder's eval.json (empty results when there is none)."""
        return cls.from_json(read_json(run_folder / EVAL_FILE))

    @classmethod
    def load(cls, run: Run) -> EvalResults:
        path = run.sidecar(EVAL_FILE)
        return cls.from_json(read_json(path) if path is not None else None)

    def save(self, run_folder: Run | Path) -> None:
        path = run_folder.sidecar(EVAL_FILE) if isinstance(run_folder, Run) else run_folder / EVAL_FILE
        if path is not None:
            write_json(path, self.to_json())

    def completions(self, prompt: str, mode: str) -> dict[int, list[Completion]]:
        """Per vector index, its completions on ``prompt`` in ``mode``."""
        entry = self.prompts.get(prompt)
        return entry.completions.get(mode, {}) if entry else {}

    def first_token(self, prompt: str) -> dict[int, FirstToken]:
        """Per vector index: top next tokens with logits, ``kl`` and ``kl_reverse``."""
        entry = self.prompts.get(prompt)
        return entry.first_token if entry else {}

    @property
    def base(self) -> int | None:
        """The row KL was measured against; None: the unsteered model (a discovery run's eval)."""
        base = self.settings.get("base", 0)
        return None if base is None else int(base)

    @property
    def theta0(self) -> int | None:
        """The run's θ0 row (0 in a MELBO-ortho run), None in a discovery run (evals written before it was recorded: 0)."""
        row = self.settings.get("theta0", 0)
        return None if row is None else int(row)

    @property
    def config(self) -> EvalConfig:
        """The settings the results were computed with (the EvalConfig fields of ``settings``)."""
        known = EvalConfig.__dataclass_fields__
        return EvalConfig(**{k: v for k, v in self.settings.items() if k in known})

    @property
    def run_prompt(self) -> str | None:
        """The run's own prompt: the first evaluated (:func:`eval_prompts` puts it first); None before any."""
        return next(iter(self.prompts), None)

    @property
    def mode(self) -> str:
        """The key of the completions last computed ("greedy", "T=0.7,seed=0"); for results melbo did not compute (the
        post's dumps: "T=1 (published)") the first key the run's prompt has."""
        wanted = self.config.mode()
        stored = self.prompts[self.run_prompt].completions if self.run_prompt is not None else {}
        return wanted if wanted in stored or not stored else next(iter(stored))

    def __repr__(self) -> str:
        from melbo.output.display import eval_repr

        return eval_repr(self)

    def _repr_html_(self) -> str:
        """In Jupyter: what ``melbo eval`` prints."""
        from melbo.output.display import as_html, eval_lines

        return as_html(eval_lines(self))

    def kl_summary(self, prompt: str, indices: list[int], base: int | None) -> tuple[float, float]:
        """Median and max KL to ``base`` over ``indices`` (the base itself left out; None: the unsteered model)."""
        first = self.first_token(prompt)
        kls = [kl for i in indices if i != base and i in first and (kl := first[i].kl) is not None] or [0.0]
        return statistics.median(kls), max(kls)

    def label_counts(self, prompt: str, mode: str, per: int = 100) -> list[dict[str, int]]:
        """Label counts per block of ``per`` vectors (the post's "share of code per hundred")."""
        blocks: dict[int, dict[str, int]] = {}
        for index, outs in self.completions(prompt, mode).items():
            counts = blocks.setdefault(index // per, dict.fromkeys(LABELS, 0))
            for out in outs:
                counts[out.label] = counts.get(out.label, 0) + 1
        return [{"from": b * per, **blocks[b]} for b in sorted(blocks)]

    def behaviour_share(self, prompts: str | list[str], mode: str, base: int = 0, label_from: str | None = None) -> float | None:
        """The share of the other vectors' completions on ``prompts`` that carry the base vector's label: its
        label on ``label_from`` (default: the first prompt). ``None`` before the base and another vector are
        evaluated there."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        base_outs = self.completions(label_from or prompts[0], mode).get(base)
        if not base_outs:
            return None
        base_label = base_outs[0].label
        hits = [
            out.label == base_label
            for prompt in prompts for index, samples in self.completions(prompt, mode).items() if index != base for out in samples
        ]
        return sum(hits) / len(hits) if hits else None

    def base_label(self, prompt: str, mode: str, base: int = 0) -> str | None:
        outs = self.completions(prompt, mode).get(base)
        return outs[0].label if outs else None

    def generalise(self, run_prompt: str, held_out: list[str], mode: str, base: int | None) -> Generalisation | None:
        """Per vector, the share of held-out prompts on which it produces the base vector's label (the label of
        the base vector's completion on the run's own prompt), or with ``base`` None (a discovery run) its own label
        there; stored as ``generalisation``."""
        on_run_prompt = self.completions(run_prompt, mode)
        base_outs = on_run_prompt.get(base) if base is not None else None
        if (base is not None and not base_outs) or not held_out:
            return None
        base_label = base_outs[0].label if base_outs else None
        share: dict[int, float] = {}
        per_prompt = [self.completions(p, mode) for p in held_out]
        for index in per_prompt[0]:
            own = on_run_prompt.get(index)
            wanted = base_label if base_label is not None else (own[0].label if own else None)
            hits = [outs[index][0].label == wanted for outs in per_prompt if index in outs]
            share[index] = sum(hits) / len(hits) if hits else 0.0
        self.generalisation = Generalisation(base_label, held_out, mode, share)
        return self.generalisation


def eval_prompts(run: Run, extra: list[str], controls: bool = False) -> list[str]:
    """The run's own first prompt, then each other prompt once (the held-out ones); with ``controls`` and no others,
    melbo's default held-out prompts, none of them one the run was trained on (the controls' base NLL needs some)."""
    run_prompt = run.meta.first_prompt
    if controls and not extra:
        extra = held_out_prompts(run.meta.prompts or [run_prompt])
    return [run_prompt, *[p for p in dict.fromkeys(extra) if p != run_prompt]]


@runs_frozen
def evaluate(
    lm: LoadedModel,
    run: Run,
    prompts: list[str] | None = None,
    indices: list[int] | None = None,
    cfg: EvalConfig = EvalConfig(),
    fmt: PromptFormat | None = None,
    on_batch: Callable[[str, int, int], None] | None = None,
    rules: tuple[Rule, ...] = RULES,
    progress: bool = True,
) -> EvalResults:
    """Evaluate ``indices`` of ``run`` on ``prompts`` (the first is the run's own; the others are held out for the
    generalisation share); returns and saves the whole eval.json content. ``on_batch(prompt, done, total)`` after
    each generate call; without it, unless ``progress`` is False, a spinner in a terminal or notebook, a line per
    prompt in a log.

    Defaults, as ``melbo eval RUN`` takes them: the run's prompt (and with ``cfg.controls`` melbo's held-out ones),
    every vector, and the prompt format the run was made with (``evaluate(lm, run)``)."""
    prompts = prompts if prompts is not None else eval_prompts(run, [], cfg.controls)
    indices = indices if indices is not None else list(range(run.vectors.shape[0]))
    fmt = fmt if fmt is not None else run.meta.prompt_format
    def evaluating(p: str, done: int, total: int, /) -> tuple[str, bool]:
        return f"evaluating prompt {prompts.index(p) + 1}/{len(prompts)} {p[:30]!r}: {done}/{total} vectors", done == total

    with status_unless_given(on_batch, progress, "evaluating…", evaluating) as shown:
        return _evaluate(lm, run, prompts, indices, cfg, fmt, shown, rules)


def _evaluate(lm: LoadedModel, run: Run, prompts: list[str], indices: list[int], cfg: EvalConfig, fmt: PromptFormat,
              on_batch: Callable[[str, int, int], None] | None, rules: tuple[Rule, ...]) -> EvalResults:
    cfg.check()
    base = cfg.base if cfg.base is not None else run.meta.base_row  # a discovery run has no θ0: the unsteered model
    if base is not None and not 0 <= base < run.vectors.shape[0]:
        raise MelboError(f"--base {base}: the run has vectors 0 to {run.vectors.shape[0] - 1}")
    cfg = replace(cfg, base=base)
    need_prompts(prompts)  # eval_prompts gives the run's own and the held-out ones
    outside = [i for i in indices if not 0 <= i < run.vectors.shape[0]]
    if outside:
        raise MelboError(f"vector(s) {outside[:5]}: the run has vectors 0 to {run.vectors.shape[0] - 1}")
    source = run.source_layer
    results = EvalResults.load(run)
    if results.settings and results.base != base:  # measured against another vector: the stored KL is another's
        for entry in results.prompts.values():
            entry.first_token.clear()
    results.settings = {**asdict(cfg), "source_layer": source, "theta0": run.meta.base_row,
                        "kl_direction": "kl = KL(P_i || P_base); kl_reverse = KL(P_base || P_i)"}
    plan = plan_controls(run, prompts, cfg, results.controls, indices) if cfg.controls else None
    if plan is not None:
        results.controls = plan.controls
    vectors = run.vectors.to(lm.device)
    _relabel(results, rules)  # stored completions get the current rules (e.g. a new --labels file) before the controls read them

    def copy_label(prompt: str, index: int) -> str | None:
        outs = results.completions(prompt, cfg.mode()).get(index)
        return outs[0].label if outs else None

    for text in prompts:
        state = prepare(lm, [text], fmt, source)[0]
        entry = results.prompts.setdefault(text, PromptResults())
        first = _FirstTokens(lm, state, source, vectors, [i for i in indices if i not in entry.first_token], cfg, entry)
        done = entry.completions.setdefault(cfg.mode(), {})
        # the copies' rows and the controls' in the same generate calls: one per prompt up to `batch` vectors; θ0's
        # control row first, so that its completion (what the base NLL scores) is known after the first call
        todo: list[tuple[str, int] | int] = [i for i in indices if i not in done]
        todo += plan.todo(text) if plan is not None else []
        todo.sort(key=lambda job: job != ("base", 0))
        for start in range(0, len(todo), cfg.batch):
            chunk = todo[start : start + cfg.batch]
            own = [i for i in chunk if isinstance(i, int)]
            others = [job for job in chunk if not isinstance(job, int)]
            rows = vectors[own].repeat_interleave(cfg.samples, dim=0)
            if plan is not None and others:
                rows = torch.cat([rows, plan.rows(others).to(rows)])
            made = steered_generation(
                lm.model, lm.tokenizer, state.ids, rows, source, cfg.max_new_tokens, cfg.temperature, cfg.seed + start,
                keep_cache=plan is not None,
            )
            texts = made.texts
            first.record(own, made.first_logits[:: cfg.samples][: len(own)])
            for k, index in enumerate(own):
                outs = texts[k * cfg.samples : (k + 1) * cfg.samples]
                done[index] = [Completion(*label(t, rules), text=t) for t in outs]
            if plan is not None:
                at = len(own) * cfg.samples
                if others:
                    plan.record(lm, text, others, texts[at:], list(made.new_ids[at:]), cfg, rules)
                target = plan.nll_target(text, cfg, lm.device)
                if target is not None and made.prompt_cache is not None:  # the prompt's pass is reused: only θ0's tokens run
                    nll = nll_after_prompt(lm.model, made, rows, source, target).tolist()
                    plan.record_nll(text, [*own, *others], [*nll[:at : cfg.samples], *nll[at:]])
            results.save(run)
            if on_batch:
                on_batch(text, min(start + cfg.batch, len(todo)), len(todo))
        first.finish()
        if plan is not None:
            plan.finish(lm, state, cfg, copy_label, rules)
            results.save(run)
    results.norms = [float(v) for v in run.vectors.norm(dim=-1)]
    results.max_abs_cos = max_abs_cosine(run.vectors.double())
    if len(prompts) > 1:
        results.generalise(prompts[0], run.meta.held_out(prompts[1:]), cfg.mode(), base)
    results.save(run)
    return results


def _relabel(results: EvalResults, rules: tuple[Rule, ...]) -> None:
    for entry in results.prompts.values():
        for by_index in entry.completions.values():
            for outs in by_index.values():
                for out in outs:
                    out.label, out.rule = label(out.text, rules)


@dataclass
class _FirstTokens:
    """Top-k next tokens with logits, and KL both ways against the base vector, at the last prompt token, for the
    vectors ``todo`` of one prompt: from the generate calls' own pass over the prompt (:meth:`record`), the rest
    (vectors generated earlier) with a pass of their own (:meth:`finish`)."""

    lm: LoadedModel
    state: PromptState
    source: int
    vectors: torch.Tensor
    todo: list[int]
    cfg: EvalConfig  # its base resolved: a row, or None for the unsteered model
    entry: PromptResults
    base_logits: torch.Tensor | None = None

    def record(self, indices: list[int], logits: torch.Tensor) -> None:
        """The first-token logits ``(n, vocab)`` of ``indices``' vectors, one row each."""
        wanted = [k for k, index in enumerate(indices) if index in self.todo and index not in self.entry.first_token]
        if not wanted:
            return
        if self.base_logits is None:
            base = self.cfg.base
            against = self.vectors[base][None] if base is not None else torch.zeros_like(self.vectors[:1])
            self.base_logits = last_token_logits(self.lm.model, self.state, self.source, against)
        rows = logits[wanted]
        kl = kl_divergence(rows, self.base_logits.expand_as(rows))
        kl_reverse = kl_divergence(self.base_logits.expand_as(rows), rows)
        top = rows.topk(self.cfg.top_k, dim=-1)
        for row, k in enumerate(wanted):
            tokens = self.lm.tokenizer.convert_ids_to_tokens(top.indices[row].tolist())
            self.entry.first_token[indices[k]] = FirstToken(
                [(tok if tok is not None else "", round(float(v), 4)) for tok, v in zip(tokens, top.values[row])],
                float(kl[row]), float(kl_reverse[row]),
            )

    def finish(self) -> None:
        left = [i for i in self.todo if i not in self.entry.first_token]
        if left:
            self.record(left, last_token_logits(self.lm.model, self.state, self.source, self.vectors[left]))
