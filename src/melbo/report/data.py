"""What a report shows, gathered from a run folder into plain data (no HTML, no plotting).

Sources, all optional but ``run.json``: ``vectors.safetensors`` (norms, the cosine check), ``eval.json``
(completions, labels, first-token top-k and KL), ``compose.json`` and ``probe.json``. Where ``eval.json``
has no figure for a vector, the record ``run.json`` keeps from the engine (norm, KL, completion) is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from melbo.analysis.compose import ComposeResults
from melbo.analysis.controls import Controls
from melbo.analysis.evaluate import EvalResults
from melbo.analysis.labels import LABELS, label
from melbo.analysis.probe import ProbeResults
from melbo.files.io import read_json
from melbo.files.runs import EVAL_FILE, RunMeta, has_vectors, read_meta, read_run


@dataclass
class ReportData:
    """Everything the page and the plots are built from."""

    header: dict[str, Any]
    rows: list[dict[str, Any]]  # one per vector: index, norm, kl, label, top, completions, z, ...
    labels: list[str]  # every label that occurs, in a stable order
    label_blocks: list[dict[str, Any]]  # label counts per block of vectors (the post's "share of code per hundred")
    block_size: int
    compose: ComposeResults | None = None
    probe: ProbeResults | None = None
    cosine: dict[str, Any] | None = None  # max |cos| off the diagonal and a histogram of |cos|
    published_plots: list[str] = field(default_factory=list)  # PNG files that came with an imported post dump
    controls: Controls | None = None  # melbo eval --controls
    judge: dict[str, Any] | None = None  # melbo judge / eval --judge: eval.json's "judge"


def block_size_for(count: int) -> int:
    """Blocks of 100 as in the post for long runs; about ten blocks for short ones."""
    if count >= 500:
        return 100
    return max(1, math.ceil(count / 10))


def cosine_check(vectors: Tensor) -> dict[str, Any]:
    """Max |cos| between distinct vectors, and a histogram of all off-diagonal |cos| on a log scale."""
    n = vectors.shape[0]
    if n < 2:
        return {"count": n, "max_abs_cos": 0.0, "histogram": []}
    unit = torch.nn.functional.normalize(vectors.double(), dim=-1)
    nonzero = vectors.norm(dim=-1) > 0
    cos = (unit @ unit.T).abs()
    mask = ~torch.eye(n, dtype=torch.bool) & nonzero[:, None] & nonzero[None, :]
    values = cos[mask]
    if values.numel() == 0:
        return {"count": n, "max_abs_cos": 0.0, "histogram": []}
    edges = [0.0] + [10.0**e for e in range(-16, 1)]
    counts = torch.histogram(values.clamp_max(1.0).float(), bins=torch.tensor(edges, dtype=torch.float32)).hist
    return {
        "count": n,
        "max_abs_cos": float(values.max()),
        "histogram": [{"below": hi, "pairs": int(c) // 2} for hi, c in zip(edges[1:], counts.tolist())],
    }


def _primary(meta: RunMeta, results: dict[str, Any]) -> tuple[str | None, str | None]:
    """The prompt and decoding mode the table's label and KL columns use: the run's own first prompt, greedy first."""
    prompts = results.get("prompts", {})
    own = meta.prompts[0] if meta.prompts else None
    prompt = own if own in prompts else next(iter(prompts), None)
    if prompt is None:
        return None, None
    modes = list(prompts[prompt].get("completions", {}))
    mode = "greedy" if "greedy" in modes else (modes[0] if modes else None)
    return prompt, mode


def _header(meta: RunMeta, path: Path, count: int, results: dict[str, Any]) -> dict[str, Any]:
    return {
        "title": path.resolve().name,
        "kind": meta.kind,
        "mode": meta.config.get("mode"),
        "model": meta.model_name or "?",
        "source": meta.source,
        "target": meta.target,
        "R": meta.R,
        "prompts": meta.prompts,
        "system": meta.prompt_format.system,
        "count": count,
        "status": meta.status,
        "created": meta.created,
        "updated": meta.updated,
        "melbo": meta.versions.get("melbo", "?"),
        "eval_prompts": list(results.get("prompts", {})),
        "note": meta.note,
    }


def gather(path: str | Path) -> ReportData:
    """Read a run folder (and whatever evaluation files it holds) into a :class:`ReportData`."""
    path = Path(path)
    run = read_run(path) if has_vectors(path) else None  # post dumps have run.json only
    meta = run.meta if run is not None else read_meta(path)
    vectors = run.vectors if run is not None else None
    results = read_json(path / EVAL_FILE) or {"prompts": {}}
    records = meta.records
    count = len(records)
    prompt, mode = _primary(meta, results)
    entry = results.get("prompts", {}).get(prompt, {}) if prompt else {}
    first = entry.get("first_token", {})
    norms = [float(x) for x in vectors.norm(dim=-1)] if vectors is not None else None
    probe = ProbeResults.read(path)
    z = {r.index: r.z for r in probe.vectors} if probe else {}
    gen = (results.get("generalisation") or {}).get("share", {})

    rows = []
    for position, record in enumerate(records):
        i = record.index
        key = str(i)
        completions = []
        for text, prompt_entry in results.get("prompts", {}).items():
            for m, by_index in prompt_entry.get("completions", {}).items():
                for out in by_index.get(key, []):
                    completions.append({"prompt": text, "mode": m, "label": out["label"], "text": out["text"]})
        completions.sort(key=lambda c: (c["prompt"] != prompt, c["mode"] != mode))
        if not completions and record.completion is not None:
            text = record.completion
            completions.append({"prompt": (meta.prompts or [""])[0], "mode": "greedy", "label": label(text)[0], "text": text})
        ft = first.get(key, {})
        kl = ft.get("kl", record.kl)
        rows.append({
            "index": i,
            "base": record.base or (meta.kind in ("ortho", "post-dump") and i == 0),
            "norm": norms[position] if norms is not None else record.norm,
            "kl": None if kl is None or not math.isfinite(kl) else float(kl),
            "loss": record.loss,
            "label": completions[0]["label"] if completions else None,
            "top": [[display_token(t), v] for t, v in (ft.get("top") or record.extra.get("top") or [])[:5]],
            "z": z.get(i),
            "generalisation": gen.get(key),
            "completions": completions,
        })

    seen: dict[str, None] = {}
    for name in LABELS:
        seen[name] = None
    for row in rows:
        if row["label"]:
            seen.setdefault(row["label"], None)
    size = block_size_for(count)
    blocks: dict[int, dict[str, int]] = {}
    for row in rows:
        if row["label"]:
            counts = blocks.setdefault(row["index"] // size, {})
            counts[row["label"]] = counts.get(row["label"], 0) + 1
    label_blocks = [{"from": b * size, "to": min(count, (b + 1) * size) - 1, "counts": blocks[b]} for b in sorted(blocks)]

    share = None
    if prompt and mode and rows and rows[0]["base"]:  # a MELBO-ortho run: how many copies keep θ0's label
        evaluated = EvalResults(results)
        share = evaluated.behaviour_share(prompt, mode), evaluated.base_label(prompt, mode)
    return ReportData(
        header={**_header(meta, path, count, results), "table_prompt": prompt, "table_mode": mode, "behaviour_share": share},
        rows=rows,
        labels=list(seen),
        label_blocks=label_blocks,
        block_size=size,
        compose=ComposeResults.read(path),
        probe=probe,
        cosine=cosine_check(vectors) if vectors is not None else None,
        published_plots=sorted(p.name for p in path.glob("published-*.png")),
        controls=EvalResults(results).controls,
        judge=results.get("judge") if (results.get("judge") or {}).get("summary") else None,
    )


_BYTE_LEVEL = str.maketrans({"Ġ": " ", "Ċ": "\n", "ĉ": "\t", "▁": " "})


def display_token(token: str | None) -> str:
    """A vocabulary entry as the text it stands for: the space and newline markers of byte-level BPE
    (``Ġ``, ``Ċ``) and SentencePiece (``▁``) become the characters themselves (an id with no entry: "")."""
    return (token or "").translate(_BYTE_LEVEL)


def moving_average(values: list[float | None], window: int) -> list[float | None]:
    """Trailing-and-leading centred moving average that skips missing values (None)."""
    out: list[float | None] = []
    half = window // 2
    for i in range(len(values)):
        part = [v for v in values[max(0, i - half) : i + half + 1] if v is not None]
        out.append(sum(part) / len(part) if part else None)
    return out
