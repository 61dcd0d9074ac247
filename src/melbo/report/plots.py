"""The report's figures, drawn with matplotlib (Agg backend: no display needed) as PNG bytes.

Each ``plot_*`` takes :class:`~melbo.report.data.ReportData` and returns a titled PNG, or ``None`` where the
run holds nothing to plot (e.g. no ``probe.json``); the page then says which command computes it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

from melbo.analysis.compose import COMBINATIONS, ComposeRow
from melbo.report.data import ReportData, moving_average

LABEL_COLOURS = {"code": "#1f77b4", "compliance": "#ff7f0e", "refusal": "#d62728", "degenerate": "#8c564b", "other": "#b0b0b0"}
EXTRA_COLOURS = ("#2ca02c", "#9467bd", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f")


@dataclass
class Plot:
    name: str  # file stem: kl, norm, labels, presence, compose, cosine
    title: str
    png: bytes | None
    missing: str = ""  # what to run to get it, when png is None


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _figure() -> tuple[Figure, plt.Axes]:
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    ax.grid(alpha=0.3)
    return fig, ax


def _window(n: int) -> int:
    return max(3, min(50, n // 10))


def _series(data: ReportData, key: str, title: str, ylabel: str, from_zero: bool = False) -> bytes | None:
    values = [row.value(key) for row in data.rows]
    if not any(v is not None for v in values):
        return None
    fig, ax = _figure()
    xs = [row.index for row in data.rows]
    ax.scatter([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None], s=6, alpha=0.5, label="vector")
    if len(values) >= 10:
        w = _window(len(values))
        avg = moving_average(values, w)
        ax.plot([x for x, v in zip(xs, avg) if v is not None], [v for v in avg if v is not None], color="black", lw=1.5, label=f"moving average ({w})")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("vector index (0 = base)" if data.rows and data.rows[0].base else "vector index")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no tick at vector 0.5 on a short run
    ax.set_ylabel(ylabel)
    ax.ticklabel_format(axis="y", useOffset=False)
    if from_zero:  # norms: a run of equal norms reads as one level, not as noise in the sixth digit blown up to the axis
        ax.set_ylim(0, 1.1 * max(v for v in values if v is not None) or 1.0)
    ax.set_title(title, fontsize=10)
    return _png(fig)


def plot_kl(data: ReportData) -> bytes | None:
    against = "P_unsteered" if data.header.get("kl_against") == "unsteered" else "P_base"
    return _series(data, "kl", f"KL(P_i ‖ {against}) of the next-token distribution at the last prompt token", "KL (nats)")


def plot_norm(data: ReportData) -> bytes | None:
    return _series(data, "norm", "Norm of each vector", "‖θ_i‖", from_zero=True)


def _colour(name: str, labels: list[str]) -> str:
    if name in LABEL_COLOURS:
        return LABEL_COLOURS[name]
    extra = [lab for lab in labels if lab not in LABEL_COLOURS]
    return EXTRA_COLOURS[extra.index(name) % len(EXTRA_COLOURS)]


def labels_title(header: dict[str, Any], block_size: int) -> str:
    """The label plot's title: which completions were labelled (an evaluated prompt, or, before ``melbo eval``,
    the completion each vector's run stored on its first prompt); blocks of one vector are each vector's label."""
    prompt, mode = header.get("table_prompt"), header.get("table_mode")
    on = f"{prompt!r}, {mode}" if prompt else "the completion stored with each vector, on the run's first prompt"
    return f"{'Label of each vector' if block_size == 1 else 'Label share per block'} ({on})"


def plot_labels(data: ReportData) -> bytes | None:
    if not data.label_blocks:
        return None
    fig, ax = _figure()
    names = [str(b["from"]) if b["from"] == b["to"] else f"{b['from']}–{b['to']}" for b in data.label_blocks]
    totals = [sum(b["counts"].values()) for b in data.label_blocks]
    bottom = [0.0] * len(names)
    for lab in data.labels:
        share = [100 * b["counts"].get(lab, 0) / t if t else 0 for b, t in zip(data.label_blocks, totals)]
        if any(share):
            ax.bar(names, share, bottom=bottom, color=_colour(lab, data.labels), label=lab)
            bottom = [b + s for b, s in zip(bottom, share)]
    if data.block_size == 1:  # up to ten vectors: a share "per block of 1" is each vector's label, a full bar
        ax.set_yticks([])
        ax.set_xlabel("vector")
    else:
        ax.set_ylabel("% of completions")
        ax.set_xlabel(f"vectors, per block of {data.block_size}")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)  # beside the bars: at 100 % there is no room above
    ax.set_title(labels_title(data.header, data.block_size), fontsize=10)
    if len(names) > 8 and any(len(name) > 3 for name in names):  # ranges ("100–199"), not single vectors, crowd the axis
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    return _png(fig)


def plot_presence(data: ReportData) -> bytes | None:
    probe = data.probe
    if probe is None:
        return None
    fig, ax = _figure()
    ax.scatter([r.index for r in probe.vectors], [r.z for r in probe.vectors], s=8, alpha=0.6)
    ax.axhspan(-2, 2, color="grey", alpha=0.2, label="random directions (±2σ)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("vector index")
    ax.set_ylabel("z-score of mean |cos(h_t, θ_i)|")
    ax.legend(loc="best", fontsize=8)
    ax.set_title(
        f"Presence in the unsteered model's residual after layer {probe.layer} ({len(probe.prompts)} prompts, {probe.tokens} tokens)",
        fontsize=10,
    )
    return _png(fig)


def plot_compose(data: ReportData) -> bytes | None:
    compose = data.compose
    if compose is None or not compose.rows:
        return None
    rows = compose.combinations
    if not any(r.kl is not None for r in compose.rows):
        return _compose_labels(data, rows)
    fig, ax = _figure()
    for kind, marker in zip(COMBINATIONS, ("o", "s", "^")):
        part = [(r.combination.k, r.kl, r.same_label_as_base) for r in rows if r.combination.kind == kind]
        points = [(k, kl, same) for k, kl, same in part if k is not None and kl is not None]
        if points:
            ax.plot([k for k, _, _ in points], [kl for _, kl, _ in points], marker=marker, label=kind)
            same = [(k, kl) for k, kl, kept in points if kept]
            if same:
                ax.scatter([k for k, _ in same], [kl for _, kl in same], s=90, facecolors="none", edgecolors="green")
    if compose.single_median_kl is not None:
        ax.axhline(compose.single_median_kl, color="red", ls="--", lw=1, label="median: each vector alone at ‖θ0‖")
    if rows:
        _k_axis(ax, [r.combination.k for r in rows])
    ax.set_xlabel("k (first k orthogonal vectors)")
    ax.set_ylabel("KL to the base (nats)")
    # beside the axes: inside, it hid the points at small k and the red line's level
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title="green ring: same label as base", title_fontsize=7)
    ax.set_title(f"Composition on {compose.prompt!r}", fontsize=10)
    return _png(fig)


def _k_axis(ax: plt.Axes, ks: list[int | None]) -> None:
    """A log axis of k with a tick at each k composed, written as k ("8", not "6×10⁰" and "10⁰" between them)."""
    ax.set_xscale("log")
    shown = sorted({k for k in ks if k})
    ax.set_xticks(shown, [str(k) for k in shown])
    ax.xaxis.set_minor_formatter(NullFormatter())


def _compose_labels(data: ReportData, rows: list[ComposeRow]) -> bytes | None:
    """Where only completions are known (the post's composition files): the label of each k."""
    if not rows or data.compose is None:
        return None
    fig, ax = _figure()
    labels = list(dict.fromkeys([*data.labels, *(r.label for r in rows)]))
    ax.scatter([r.combination.k or 0 for r in rows], [labels.index(r.label) for r in rows], c=[_colour(r.label, labels) for r in rows], s=60)
    ax.set_yticks(range(len(labels)), labels)
    _k_axis(ax, [r.combination.k for r in rows])
    ax.set_xlabel("k (first k orthogonal vectors)")
    ax.set_title(f"Composition (mean×√k) on {data.compose.prompt!r}: label of the completion; base: {data.compose.base_label}", fontsize=10)
    return _png(fig)


def plot_cosine(data: ReportData) -> bytes | None:
    if not data.cosine or not data.cosine["histogram"]:
        return None
    fig, ax = _figure()
    bins = data.cosine["histogram"]
    ax.bar([f"{b['below']:.0e}" for b in bins], [b["pairs"] for b in bins], color="#555")
    ax.set_yscale("symlog")
    ax.set_xlabel("|cos| between two distinct vectors, below")
    ax.set_ylabel("pairs")
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    ax.set_title(f"Cosine check: max |cos| = {data.cosine['max_abs_cos']:.2e} over {data.cosine['count']} vectors", fontsize=10)
    return _png(fig)


CONTROL_STYLE = {  # name → colour, marker, legend
    "copies": ("#1f77b4", "o", "copies"),
    "random_same_norm": ("#d62728", "x", "random (orthogonal to θ0), copies' norm"),
    "random_base_norm": ("#ff7f0e", "+", "random (orthogonal to θ0), ‖θ0‖"),
    "copies_at_base_norm": ("#9467bd", ".", "copies rescaled to ‖θ0‖"),
}
CONTROL_LINES = {"base": ("#1f77b4", "-"), "unsteered": ("black", "--"), "mean": ("#2ca02c", ":"), "mean_sqrt_k": ("#8c564b", "-.")}


def plot_controls(data: ReportData) -> bytes | None:
    """θ0's completion NLL per vector under the copies and the controls: held-out prompts and the run's prompt."""
    controls = data.controls
    if controls is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 3.6), sharey=True)
    for ax, held_out in zip(axes, (True, False)):
        for result in controls.rows():
            prompts = controls.held_out if held_out else [controls.run_prompt]
            medians = [(vector.index if vector.index is not None else row + 1, vector.median_nll(prompts)) for row, vector in enumerate(result.vectors)]
            values = [(x, y) for x, y in medians if y is not None]
            if not values:
                continue
            if result.name in CONTROL_STYLE:
                colour, marker, legend = CONTROL_STYLE[result.name]
                ax.scatter(*zip(*values), c=colour, marker=marker, s=18, label=legend)
            elif result.name in CONTROL_LINES:
                colour, style = CONTROL_LINES[result.name]
                ax.axhline(values[0][1], color=colour, ls=style, lw=1.2, label={"base": "θ0 itself", "mean_sqrt_k": "mean × √k"}.get(result.name, result.name))
        ax.grid(alpha=0.3)
        ax.set_xlabel("vector index")
        ax.set_title(f"{len(controls.held_out)} held-out prompts (median per vector)" if held_out else f"the run's prompt {controls.run_prompt[:40]!r}", fontsize=9)
    axes[0].set_ylabel("θ0's completion NLL (nats/token)")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)  # beside the panel: inside, it hid the copies
    fig.suptitle("Is it more than a big push? θ0's own text under each steering (lower: closer to θ0's behaviour)", fontsize=10)
    return _png(fig)


PLOTS: tuple[tuple[str, str, Callable[[ReportData], bytes | None], str], ...] = (
    ("kl", "KL at the last prompt token", plot_kl, "melbo eval RUN"),
    ("norm", "Norms", plot_norm, "a run with vectors"),
    ("labels", "Labels", plot_labels, "melbo eval RUN"),
    ("presence", "Presence in the model's own residuals", plot_presence, "melbo probe RUN"),
    ("compose", "Composition", plot_compose, "melbo compose RUN"),
    ("cosine", "Cosine check", plot_cosine, "a run with vectors"),
    ("controls", "Copies against controls", plot_controls, "melbo eval RUN --controls"),
)


def draw_all(data: ReportData) -> list[Plot]:
    published = data.header.get("kind") == "post-dump"
    ortho = data.header.get("kind") == "ortho"
    return [
        Plot(name, title, draw(data), "nothing: the published dump does not hold it" if published else missing)
        for name, title, draw, missing in PLOTS
        if name != "controls" or ortho  # controls need θ0: MELBO-ortho runs only
    ]
