"""What a report shows, gathered from a run folder into plain data (no HTML, no plotting).

Sources, all optional but ``run.json``: ``vectors.safetensors`` (norms, the cosine check), ``eval.json``
(completions, labels, first-token top-k and KL), ``compose.json`` and ``probe.json``. Where ``eval.json``
has no figure for a vector, the record ``run.json`` keeps from the engine (norm, KL, completion) is used.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from melbo.analysis.compose import ComposeResults
from melbo.analysis.controls import Controls
from melbo.analysis.evaluate import EvalResults
from melbo.analysis.judge import JudgeResults
from melbo.analysis.probe import ProbeResults
from melbo.files.runs import RunMeta, has_vectors, read_meta, read_run
from melbo.labels import LABELS, label


@dataclass
class ReportData:
    """Everything the page and the plots are built from."""

    header: dict[str, Any]
    rows: list[VectorRow]  # one per vector
    labels: list[str]  # every label that occurs, in a stable order
    label_blocks: list[dict[str, Any]]  # label counts per block of vectors (the post's "share of code per hundred")
    block_size: int
    compose: ComposeResults | None = None
    probe: ProbeResults | None = None
    cosine: dict[str, Any] | None = None  # max |cos| off the diagonal and a histogram of |cos|
    published_plots: list[str] = field(default_factory=list)  # PNG files that came with an imported post dump
    controls: Controls | None = None  # melbo eval --controls
    judge: JudgeResults | None = None  # melbo judge / eval --judge


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


def _primary(meta: RunMeta, results: EvalResults) -> tuple[str | None, str | None]:
    """The prompt and decoding mode the table's label and KL columns use: the run's own first prompt, greedy first."""
    own = meta.prompts[0] if meta.prompts else None
    prompt = own if own in results.prompts else next(iter(results.prompts), None)
    if prompt is None:
        return None, None
    modes = list(results.prompts[prompt].completions)
    mode = "greedy" if "greedy" in modes else (modes[0] if modes else None)
    return prompt, mode


def _header(meta: RunMeta, path: Path, count: int, results: EvalResults) -> dict[str, Any]:
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
        "eval_prompts": list(results.prompts),
        "kl_against": "unsteered" if results.settings and results.base is None else "base",  # a discovery run's eval: unsteered
        "note": meta.note,
    }


@dataclass
class RowCompletion:
    prompt: str
    mode: str
    label: str
    text: str
    judge: dict[str, dict[str, Any]] = field(default_factory=dict)  # concept → its 3 ratings and the judge's words on the concept


@dataclass
class VectorRow:
    """One vector as the report's table shows it (the page's script reads :meth:`to_json`)."""

    index: int
    base: bool
    norm: float | None
    kl: float | None
    loss: float | None
    label: str | None
    top: list[tuple[str, float]]  # the first five next tokens at the last prompt token, as text
    z: float | None  # presence (melbo probe)
    generalisation: float | None  # share of held-out prompts with the base's label
    completions: list[RowCompletion]

    def value(self, key: str) -> float | None:
        """A numeric column by name (kl, norm, z…), for plots."""
        value = getattr(self, key)
        return None if value is None else float(value)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "top": [list(t) for t in self.top]}


def gather(path: str | Path) -> ReportData:
    """Read a run folder (and whatever evaluation files it holds) into a :class:`ReportData`."""
    path = Path(path)
    run = read_run(path) if has_vectors(path) else None  # post dumps have run.json only
    meta = run.meta if run is not None else read_meta(path)
    vectors = run.vectors if run is not None else None
    results = EvalResults.read(path)
    records = meta.records
    count = len(records)
    prompt, mode = _primary(meta, results)
    first = results.first_token(prompt) if prompt else {}
    norms = [float(x) for x in vectors.norm(dim=-1)] if vectors is not None else None
    probe = ProbeResults.read(path)
    z = {r.index: r.z for r in probe.vectors} if probe else {}
    gen = results.generalisation.share if results.generalisation else {}

    judge = results.judge if results.judge is not None and results.judge.summary else None
    judged = judge.of_copies() if judge is not None else {}

    def rated(prompt: str, mode: str, index: int, sample: int, text: str) -> dict[str, dict[str, Any]]:
        if judge is None:
            return {}
        return {name: {**asdict(score), "answer": judge.answer("concept", name, prompt, text)}
                for name, score in judged.get((prompt, mode, index, sample), {}).items()}

    rows = []
    for position, record in enumerate(records):
        i = record.index
        completions = [
            RowCompletion(text, m, out.label, out.text, rated(text, m, i, k, out.text))
            for text, entry in results.prompts.items() for m, by_index in entry.completions.items()
            for k, out in enumerate(by_index.get(i, []))
        ]
        completions.sort(key=lambda c: (c.prompt != prompt, c.mode != mode))
        if not completions and record.completion is not None:
            text = record.completion
            completions.append(RowCompletion((meta.prompts or [""])[0], "greedy", label(text)[0], text))
        ft = first.get(i)
        kl = ft.kl if ft is not None else record.kl
        top = ft.top if ft is not None else [(str(t), float(v)) for t, v in record.extra.get("top") or []]
        rows.append(VectorRow(
            index=i,
            base=record.base or (meta.kind in ("ortho", "post-dump") and i == 0),
            norm=norms[position] if norms is not None else record.norm,
            kl=None if kl is None or not math.isfinite(kl) else float(kl),
            loss=record.loss,
            label=completions[0].label if completions else None,
            top=[(display_token(t), v) for t, v in top[:5]],
            z=z.get(i),
            generalisation=gen.get(i),
            completions=completions,
        ))

    seen: dict[str, None] = dict.fromkeys(LABELS)
    for row in rows:
        if row.label:
            seen.setdefault(row.label, None)
    size = block_size_for(count)
    blocks: dict[int, dict[str, int]] = {}
    for row in rows:
        if row.label:
            counts = blocks.setdefault(row.index // size, {})
            counts[row.label] = counts.get(row.label, 0) + 1
    label_blocks = [{"from": b * size, "to": min(count, (b + 1) * size) - 1, "counts": blocks[b]} for b in sorted(blocks)]

    share = None
    if prompt and mode and rows and rows[0].base:  # a MELBO-ortho run: how many copies keep θ0's label
        share = results.behaviour_share(prompt, mode), results.base_label(prompt, mode)
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
        controls=results.controls,
        judge=judge,
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
