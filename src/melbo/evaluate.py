"""``melbo eval``: steered generation for every vector of a run, first-token figures, labels, checks.

Results go to ``RUN/eval.json`` (written atomically after every batch). Evaluation is incremental: a
completion already stored for the same prompt, decoding mode and vector is never generated again, so
adding prompts or vectors only computes what is new, and an interrupted evaluation resumes where it
stopped.

KL direction: ``kl`` = KL(P_i ‖ P_base), what the MELBO-ortho post's code computed
(``F.kl_div(log P_0, P_i)``), and ``kl_reverse`` = KL(P_base ‖ P_i); both at the last prompt token.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from melbo.errors import MelboError
from melbo.generation import generate_steered
from melbo.labels import RULES, Rule, label
from melbo.objectives import kl_divergence, max_abs_cosine
from melbo.prompts import PromptFormat
from melbo.runs import Run, write_json
from melbo.steered import last_token_logits, prepare

EVAL_FILE = "eval.json"


@dataclass
class EvalConfig:
    """What ``melbo eval`` computes (stored in eval.json beside the results)."""

    max_new_tokens: int = 48
    temperature: float = 0.0  # 0: greedy; > 0: sampled
    samples: int = 1  # completions per vector when sampling
    seed: int = 0
    batch: int = 64  # vectors per generate call (one per row, sharing the KV-cache machinery)
    base: int = 0  # the vector KL is measured against (row 0 of an ortho run is θ0)
    top_k: int = 10

    def mode(self) -> str:
        return "greedy" if self.temperature == 0 else f"T={self.temperature:g},seed={self.seed}"

    def check(self) -> None:
        if self.max_new_tokens < 1 or self.samples < 1 or self.batch < 1:
            raise MelboError("--max-new-tokens, --samples and --batch must be at least 1")
        if not self.temperature >= 0:
            raise MelboError("--temperature must be ≥ 0 (0 = greedy)")


def load_results(run: Run) -> dict[str, Any]:
    path = run.path / EVAL_FILE
    if not path.is_file():
        return {"prompts": {}}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MelboError(f"{path} is corrupt ({exc}); delete it to evaluate again from scratch") from exc


def save_results(run: Run, results: dict[str, Any]) -> None:
    write_json(run.path / EVAL_FILE, results)


def evaluate(
    lm: Any,
    run: Run,
    prompts: list[str],
    indices: list[int],
    cfg: EvalConfig = EvalConfig(),
    fmt: PromptFormat = PromptFormat(),
    on_batch: Callable[[str, int, int], None] | None = None,
    rules: tuple[Rule, ...] = RULES,
) -> dict[str, Any]:
    """Evaluate ``indices`` of ``run`` on ``prompts``; returns (and saves) the whole eval.json content."""
    cfg.check()
    if not 0 <= cfg.base < run.vectors.shape[0]:
        raise MelboError(f"--base {cfg.base}: the run has vectors 0 to {run.vectors.shape[0] - 1}")
    source = run.source_layer
    results = load_results(run)
    results["settings"] = {**asdict(cfg), "source_layer": source, "kl_direction": "kl = KL(P_i || P_base); kl_reverse = KL(P_base || P_i)"}
    vectors = run.vectors.to(lm.device)
    for text in prompts:
        state = prepare(lm, [text], fmt, source)[0]
        entry = results["prompts"].setdefault(text, {"completions": {}, "first_token": {}})
        _first_token(lm, state, source, vectors, indices, cfg, entry)
        done = entry["completions"].setdefault(cfg.mode(), {})
        todo = [i for i in indices if str(i) not in done]
        for start in range(0, len(todo), cfg.batch):
            chunk = todo[start : start + cfg.batch]
            rows = vectors[chunk].repeat_interleave(cfg.samples, dim=0)
            texts = generate_steered(
                lm.model, lm.tokenizer, state.ids, rows, source, cfg.max_new_tokens, cfg.temperature,
                cfg.seed + start,
            )
            for k, index in enumerate(chunk):
                outs = texts[k * cfg.samples : (k + 1) * cfg.samples]
                done[str(index)] = [dict(zip(("label", "rule"), label(t, rules)), text=t) for t in outs]
            save_results(run, results)
            if on_batch:
                on_batch(text, min(start + cfg.batch, len(todo)), len(todo))
    _relabel(results, rules)  # stored completions get the current rules too (e.g. a new --labels file)
    results["norms"] = [float(v) for v in run.vectors.norm(dim=-1)]
    results["max_abs_cos"] = max_abs_cosine(run.vectors.double())
    save_results(run, results)
    return results


def _relabel(results: dict[str, Any], rules: tuple[Rule, ...]) -> None:
    for entry in results["prompts"].values():
        for by_index in entry["completions"].values():
            for outs in by_index.values():
                for out in outs:
                    out["label"], out["rule"] = label(out["text"], rules)


def _first_token(
    lm: Any, state: Any, source: int, vectors: torch.Tensor, indices: list[int], cfg: EvalConfig, entry: dict[str, Any]
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
            "top": [[tok, round(float(v), 4)] for tok, v in zip(tokens, top.values[row])],
            "kl": float(kl[row]),
            "kl_reverse": float(kl_reverse[row]),
        }


def label_counts(results: dict[str, Any], prompt: str, mode: str, per: int = 100) -> list[dict[str, int]]:
    """Label counts per block of ``per`` vectors (the post's "share of code per hundred")."""
    done = results["prompts"].get(prompt, {}).get("completions", {}).get(mode, {})
    blocks: dict[int, dict[str, int]] = {}
    for index, outs in done.items():
        counts = blocks.setdefault(int(index) // per, {"code": 0, "refusal": 0, "other": 0})
        for out in outs:
            counts[out["label"]] = counts.get(out["label"], 0) + 1
    return [{"from": b * per, **blocks[b]} for b in sorted(blocks)]


def generalisation(results: dict[str, Any], run_prompt: str, held_out: list[str], mode: str, base: int) -> dict[str, Any]:
    """Per vector, the share of held-out prompts on which it produces the base vector's label (the label of
    the base vector's completion on the run's own prompt)."""
    base_outs = results["prompts"].get(run_prompt, {}).get("completions", {}).get(mode, {}).get(str(base))
    if not base_outs or not held_out:
        return {}
    base_label = base_outs[0]["label"]
    share: dict[str, float] = {}
    per_prompt = [results["prompts"][p]["completions"][mode] for p in held_out]
    for index in per_prompt[0]:
        hits = [outs[index][0]["label"] == base_label for outs in per_prompt if index in outs]
        share[index] = sum(hits) / len(hits) if hits else 0.0
    summary = {"base_label": base_label, "prompts": held_out, "mode": mode, "share": share}
    results["generalisation"] = summary
    return summary
