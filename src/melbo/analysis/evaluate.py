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
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from melbo.analysis.config import EvalConfig
from melbo.analysis.controls import Controls, check_controls, measure_controls
from melbo.analysis.labels import LABELS, RULES, Rule, label
from melbo.errors import MelboError
from melbo.files.io import read_json, write_json
from melbo.files.runs import EVAL_FILE, Run
from melbo.model.forward import PromptState, generate_steered, last_token_logits, prepare
from melbo.model.loading import LoadedModel
from melbo.model.prompts import DEFAULT_PROMPT, PromptFormat
from melbo.objectives import kl_divergence, max_abs_cosine


@dataclass
class EvalResults:
    """The content of ``eval.json`` (``data``, laid out as stored) and the summaries the CLI and report show."""

    data: dict[str, Any] = field(default_factory=lambda: {"prompts": {}})

    @classmethod
    def load(cls, run: Run) -> EvalResults:
        return cls(read_json(run.sidecar(EVAL_FILE)) or {"prompts": {}})

    def save(self, run: Run) -> None:
        write_json(run.sidecar(EVAL_FILE), self.data)

    @property
    def prompts(self) -> list[str]:
        return list(self.data.get("prompts", {}))

    def completions(self, prompt: str, mode: str) -> dict[str, list[dict[str, str]]]:
        """Per vector index (as a string), its completions ``{label, rule, text}`` on ``prompt`` in ``mode``."""
        return self.data.get("prompts", {}).get(prompt, {}).get("completions", {}).get(mode, {})

    def first_token(self, prompt: str) -> dict[str, dict[str, Any]]:
        """Per vector index (as a string): ``top`` next tokens with logits, ``kl`` and ``kl_reverse``."""
        return self.data.get("prompts", {}).get(prompt, {}).get("first_token", {})

    @property
    def max_abs_cos(self) -> float:
        return float(self.data.get("max_abs_cos", 0.0))

    @property
    def norms(self) -> list[float]:
        return list(self.data.get("norms", []))

    def kl_summary(self, prompt: str, indices: list[int], base: int) -> tuple[float, float]:
        """Median and max KL to ``base`` over ``indices`` (the base itself left out)."""
        first = self.first_token(prompt)
        kls = [first[str(i)]["kl"] for i in indices if i != base and str(i) in first] or [0.0]
        return statistics.median(kls), max(kls)

    def label_counts(self, prompt: str, mode: str, per: int = 100) -> list[dict[str, int]]:
        """Label counts per block of ``per`` vectors (the post's "share of code per hundred")."""
        blocks: dict[int, dict[str, int]] = {}
        for index, outs in self.completions(prompt, mode).items():
            counts = blocks.setdefault(int(index) // per, dict.fromkeys(LABELS, 0))
            for out in outs:
                counts[out["label"]] = counts.get(out["label"], 0) + 1
        return [{"from": b * per, **blocks[b]} for b in sorted(blocks)]

    def behaviour_share(self, prompts: str | list[str], mode: str, base: int = 0, label_from: str | None = None) -> float | None:
        """The share of the other vectors' completions on ``prompts`` that carry the base vector's label: its
        label on ``label_from`` (default: the first prompt). ``None`` before the base and another vector are
        evaluated there."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        base_outs = self.completions(label_from or prompts[0], mode).get(str(base))
        if not base_outs:
            return None
        base_label = base_outs[0]["label"]
        hits = [
            out["label"] == base_label
            for prompt in prompts for index, samples in self.completions(prompt, mode).items() if index != str(base) for out in samples
        ]
        return sum(hits) / len(hits) if hits else None

    @property
    def controls(self) -> Controls | None:
        """The controls (``melbo eval --controls``), if they were measured."""
        return Controls.from_json(self.data.get("controls"), self.data.get("control_settings"))

    def set_controls(self, controls: Controls) -> None:
        self.data["controls"], self.data["control_settings"] = controls.to_json()

    def base_label(self, prompt: str, mode: str, base: int = 0) -> str | None:
        outs = self.completions(prompt, mode).get(str(base))
        return outs[0]["label"] if outs else None

    def generalisation(self, run_prompt: str, held_out: list[str], mode: str, base: int) -> dict[str, Any]:
        """Per vector, the share of held-out prompts on which it produces the base vector's label (the label of
        the base vector's completion on the run's own prompt); stored under ``generalisation``."""
        base_outs = self.completions(run_prompt, mode).get(str(base))
        if not base_outs or not held_out:
            return {}
        base_label = base_outs[0]["label"]
        share: dict[str, float] = {}
        per_prompt = [self.completions(p, mode) for p in held_out]
        for index in per_prompt[0]:
            hits = [outs[index][0]["label"] == base_label for outs in per_prompt if index in outs]
            share[index] = sum(hits) / len(hits) if hits else 0.0
        summary = {"base_label": base_label, "prompts": held_out, "mode": mode, "share": share}
        self.data["generalisation"] = summary
        return summary


def eval_prompts(run: Run, extra: list[str]) -> list[str]:
    """The run's own first prompt, then each other prompt once (the held-out ones)."""
    run_prompt = (run.meta.prompts or [DEFAULT_PROMPT])[0]
    return [run_prompt, *[p for p in dict.fromkeys(extra) if p != run_prompt]]


def evaluate(
    lm: LoadedModel,
    run: Run,
    prompts: list[str],
    indices: list[int],
    cfg: EvalConfig = EvalConfig(),
    fmt: PromptFormat = PromptFormat(),
    on_batch: Callable[[str, int, int], None] | None = None,
    rules: tuple[Rule, ...] = RULES,
) -> EvalResults:
    """Evaluate ``indices`` of ``run`` on ``prompts`` (the first is the run's own; the others are held out for the
    generalisation share); returns and saves the whole eval.json content."""
    cfg.check()
    if not 0 <= cfg.base < run.vectors.shape[0]:
        raise MelboError(f"--base {cfg.base}: the run has vectors 0 to {run.vectors.shape[0] - 1}")
    if cfg.controls:
        check_controls(run)
    source = run.source_layer
    results = EvalResults.load(run)
    results.data["settings"] = {**asdict(cfg), "source_layer": source, "kl_direction": "kl = KL(P_i || P_base); kl_reverse = KL(P_base || P_i)"}
    vectors = run.vectors.to(lm.device)
    for text in prompts:
        state = prepare(lm, [text], fmt, source)[0]
        entry = results.data["prompts"].setdefault(text, {"completions": {}, "first_token": {}})
        _first_token(lm, state, source, vectors, indices, cfg, entry)
        done = entry["completions"].setdefault(cfg.mode(), {})
        todo = [i for i in indices if str(i) not in done]
        for start in range(0, len(todo), cfg.batch):
            chunk = todo[start : start + cfg.batch]
            rows = vectors[chunk].repeat_interleave(cfg.samples, dim=0)
            texts = generate_steered(
                lm.model, lm.tokenizer, state.ids, rows, source, cfg.max_new_tokens, cfg.temperature, cfg.seed + start,
            )
            for k, index in enumerate(chunk):
                outs = texts[k * cfg.samples : (k + 1) * cfg.samples]
                done[str(index)] = [dict(zip(("label", "rule"), label(t, rules)), text=t) for t in outs]
            results.save(run)
            if on_batch:
                on_batch(text, min(start + cfg.batch, len(todo)), len(todo))
    _relabel(results, rules)  # stored completions get the current rules too (e.g. a new --labels file)
    results.data["norms"] = [float(v) for v in run.vectors.norm(dim=-1)]
    results.data["max_abs_cos"] = max_abs_cosine(run.vectors.double())
    if len(prompts) > 1:
        results.generalisation(prompts[0], prompts[1:], cfg.mode(), cfg.base)
    results.save(run)
    if cfg.controls:

        def copy_label(prompt: str, index: int) -> str | None:
            outs = results.completions(prompt, cfg.mode()).get(str(index))
            return outs[0]["label"] if outs else None

        def save(controls: Controls) -> None:
            results.set_controls(controls)
            results.save(run)

        measure_controls(lm, run, prompts, cfg, fmt, results.controls, copy_label, rules, save, on_batch)
    return results


def _relabel(results: EvalResults, rules: tuple[Rule, ...]) -> None:
    for entry in results.data["prompts"].values():
        for by_index in entry["completions"].values():
            for outs in by_index.values():
                for out in outs:
                    out["label"], out["rule"] = label(out["text"], rules)


def _first_token(
    lm: LoadedModel, state: PromptState, source: int, vectors: torch.Tensor, indices: list[int], cfg: EvalConfig,
    entry: dict[str, Any],
) -> None:
    """Top-k next tokens with logits, and KL both ways against the base vector, at the last prompt token."""
    todo = [i for i in indices if str(i) not in entry["first_token"]]
    if not todo:
        return
    base_logits = last_token_logits(lm.model, state, source, vectors[cfg.base][None])
    logits = last_token_logits(lm.model, state, source, vectors[todo])
    kl = kl_divergence(logits, base_logits.expand_as(logits))
    kl_reverse = kl_divergence(base_logits.expand_as(logits), logits)
    top = logits.topk(cfg.top_k, dim=-1)
    for row, index in enumerate(todo):
        tokens = lm.tokenizer.convert_ids_to_tokens(top.indices[row].tolist())
        entry["first_token"][str(index)] = {
            "top": [[tok if tok is not None else "", round(float(v), 4)] for tok, v in zip(tokens, top.values[row])],
            "kl": float(kl[row]),
            "kl_reverse": float(kl_reverse[row]),
        }
