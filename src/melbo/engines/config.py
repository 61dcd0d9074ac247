"""The settings of discovery and MELBO-ortho: what a user may set (``*Config``, with the one set of defaults the
CLI and study files read) and what an engine runs (``*Settings``, every value concrete, from ``resolved()``).

No torch here: the command line reads its defaults and checks a typo before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from melbo.errors import MelboError
from melbo.model.prompts import training_pool
from melbo.setting import setting


@dataclass(frozen=True)
class Positions:
    """Which prompt positions a loss or mean uses.

    ``"skip-first"`` (default): every position but the first, which on many models is an attention sink
    whose residual norm is ~100× the others and would swamp the loss. ``"all"``: every position (what the
    original MELBO-ortho code did). ``"last:N"``: the last N positions.
    """

    spec: str = "skip-first"

    def __post_init__(self) -> None:
        if self.spec not in ("skip-first", "all") and not re.fullmatch(r"last:[1-9]\d*", self.spec):
            raise MelboError(f"--positions {self.spec!r}: use skip-first, all, or last:N (N ≥ 1)")

    def index(self, seq_len: int) -> slice:
        if self.spec == "all":
            return slice(0, seq_len)
        if self.spec == "skip-first":
            return slice(1 if seq_len > 1 else 0, seq_len)
        n = int(self.spec.split(":")[1])
        return slice(max(0, seq_len - n), seq_len)


def shifted(spec: str, fewer: int) -> str:
    """The positions ``spec`` on a prompt whose continuation is ``fewer`` tokens shorter than the one ``spec`` was set
    for: ``last:N`` covers the same prompt tokens and the continuation it has (``last:N−fewer``, at least 1); the
    other specs are the same on any length."""
    if not fewer or not spec.startswith("last:"):
        return spec
    return f"last:{max(1, int(spec.split(':')[1]) - fewer)}"


PRECISIONS = ("float32", "bfloat16")  # an optimisation's matrix products (discovery, MELBO-ortho): as they are, or in bfloat16
PRECISION_BEFORE = "float32"  # what a run made before its precision was recorded trained at


def run_precision(precision: str, bfloat16_fast: bool) -> str:
    """The precision a run trains at: as given, or for ``auto`` bfloat16 where the device has bfloat16 units
    (``bfloat16_fast``), else float32."""
    return precision if precision != "auto" else ("bfloat16" if bfloat16_fast else "float32")


def precision_in_run(precision: str, recorded: Mapping[str, Any]) -> str:
    """The precision a resumed run goes on at: as given, or for ``auto`` the one the run recorded in its settings
    (``recorded``; :data:`PRECISION_BEFORE` for a run made before it was recorded), whatever this device has."""
    return precision if precision != "auto" else str(recorded.get("precision", PRECISION_BEFORE))


@dataclass(frozen=True)
class DiscoverSettings:
    """Discovery's settings with every value concrete (what the engine runs and run.json records)."""

    source: int  # layer s: the vector is added to the residual after block s
    target: int  # layer t: the change is measured after block t
    radius: float  # R: every vector's norm
    count: int  # K: number of vectors
    p: float  # power on each position's change
    q: float  # root of the sum over positions
    steps: int  # Adam steps per block
    lr: float
    block: int  # vectors trained together
    seed: int
    positions: str
    completion_tokens: int  # greedy completion stored per vector, on the first prompt
    precision: str = PRECISION_BEFORE  # the model's matrix products while training (a run made before it existed: float32)


SOURCE_DEPTH, TARGET_DEPTH = 0.28, 0.67  # default layers as fractions of depth: 8 → 20 on 30 layers, 7 → 16 on 24


def default_layers(n_layers: int) -> tuple[int, int]:
    """Source about a third of the way in, target about two thirds: SmolLM2 (30 layers) 8 → 20, a 24-layer model
    7 → 16, 12 layers 3 → 8, 64 layers 18 → 43."""
    if n_layers < 2:
        raise MelboError(f"this model has {n_layers} layer(s): MELBO needs a source layer before a target layer")
    source = min(round(SOURCE_DEPTH * n_layers), n_layers - 2)
    return source, max(source + 1, min(round(TARGET_DEPTH * n_layers), n_layers - 1))


@dataclass(frozen=True)
class RadiusConfig:
    """How discovery chooses R when it is ``"auto"`` (:mod:`melbo.engines.radius`)."""

    low: float = 0.06  # the search range, as multiples of the residual norm at the source layer
    high: float = 1.0
    probes: int = 4  # bisection steps (each narrows the range: 4 give about ±10 % on R)
    extend: int = 5  # when no R in the range is fluent (or every R is): probes below (above) it, ×4 apart, then bisection
    radii: tuple[float, ...] = ()  # explicit candidate radii instead (--radii): each is tried, the largest fluent one wins
    vectors: int = 4  # trained per candidate R
    steps: int = 25  # at most; the learning rate is scaled so the vectors travel as far as in discovery's steps
    completion_tokens: int = 16  # enough to see a loop or babble begin
    max_nll: float = 4.0  # nats per token under the unsteered model: above, a completion is not fluent
    min_fluent: float = 0.75  # a candidate R is usable when at least this share of its vectors is fluent
    max_median_nll: float = 3.0  # … and its median completion is clearly fluent (a margin: 4 vectors are few)

    @classmethod
    def with_radii(cls, text: str | None, choosing: bool = True) -> RadiusConfig:
        """The candidates of ``--radii 10,20,40`` (``None``: the search), checked; ``choosing``: R is to be chosen
        (``-R auto`` or ``--calibrate``), else candidates are an error."""
        if not text:
            return cls()
        if not choosing:
            raise MelboError("--radii are the candidates of -R auto (or --calibrate); with -R set to a number there is nothing to choose")
        try:
            values = tuple(float(x) for x in text.split(",") if x.strip())
        except ValueError as exc:
            raise MelboError(f"--radii {text!r}: give numbers separated by commas, e.g. 10,20,40") from exc
        if not values:
            raise MelboError(f"--radii {text!r}: every candidate R must be a positive number")
        cfg = cls(radii=values)
        cfg.check()
        return cfg

    def check(self) -> None:
        if any(not (math.isfinite(r) and r > 0) for r in self.radii):
            raise MelboError("--radii: every candidate R must be a positive number")
        if not (0 < self.low < self.high and math.isfinite(self.high)):
            raise MelboError("the R search range needs 0 < low < high")
        if self.vectors < 1 or self.probes < 1 or self.steps < 1 or self.completion_tokens < 1 or self.extend < 0:
            raise MelboError("calibration vectors, probes, steps and completion tokens must be at least 1")
        if not 0 < self.min_fluent <= 1:
            raise MelboError("min_fluent must be in (0, 1]")


@dataclass(frozen=True)
class DiscoverConfig:
    """What a user may set for MELBO discovery; the CLI's options take their defaults from here."""

    source: int | None = setting(None, "Layer s: add the vector after block s (default: about a third of the way in).", "--source", "-s")
    target: int | None = setting(None, "Layer t: measure the change after block t (default: about two thirds in).", "--target", "-t")
    radius: float | str = setting(  # calibration: engines/radius.py
        "auto", "R: the norm of every vector, or auto: the largest R at which most vectors stay fluent.", "--radius", "-R", text=True,
    )
    count: int = setting(32, "K: number of vectors.", "--count", "-k")
    p: float = setting(2.0, "p: power on each position's change.", "--power")
    q: float = setting(1.0, "q: root of the sum over positions.", "--root")
    steps: int = setting(100, "Adam steps per block.")
    lr: float | None = setting(None, "Learning rate (default 0.01·R/√d_model: a step moves θ by about 1 % of R, whatever R and d).")
    block: int = setting(16, "Vectors trained together (1 = the original one-at-a-time MELBO).")
    seed: int = setting(0, "Random seed.")
    positions: str = setting("skip-first", "skip-first (position 0 is often an attention sink), all, or last:N.")
    completion_tokens: int = setting(32, "Greedy tokens stored per vector on the first prompt.")
    precision: str = setting(  # measured in bench/discovery_speed.py
        "auto",
        "The model's matrix products while training (auto R's probes too, unless --probe-precision): float32, bfloat16 (autocast; the loss, the "
        "orthogonality and every recorded figure stay float32), or auto: bfloat16 where the device has bfloat16 units "
        "(a CPU with AVX512-BF16 or AMX, a GPU), else float32. 16 vectors 2.5× faster with AVX512-BF16 (AMD Zen 5), "
        "the same vectors to the eye and the same loss.",
    )
    probe_precision: str | None = setting(  # measured in bench/auto_radius.py
        None,
        "Auto R's probes alone: auto, float32 or bfloat16 (default: as --precision). The probes only read whether a few "
        "vectors per R stay fluent: with bfloat16 products the same R on SmolLM2 and Gemma 3 270M in ~0.6× and ~0.75× "
        "the time (AVX512-BF16, AMD Zen 5).",
    )

    def __post_init__(self) -> None:
        if isinstance(self.radius, str):  # "auto", or a number as text (a command line, a study's --set); else check() says
            text = self.radius.strip().lower()
            with contextlib.suppress(ValueError):
                object.__setattr__(self, "radius", "auto" if text == "auto" else float(text))

    @property
    def auto_radius(self) -> bool:
        return self.radius == "auto"

    def layers(self, n_layers: int) -> tuple[int, int]:
        """(source, target) on a model of this depth: the given layers, else :func:`default_layers`."""
        source, target = default_layers(n_layers) if n_layers >= 2 else (0, 0)
        return (source if self.source is None else self.source), (target if self.target is None else self.target)

    def asked_precisions(self) -> tuple[str | None, ...]:
        """Every precision option as the user set it (the training's and auto R's probes'): what a warning about software bfloat16 reads."""
        return (self.precision, self.probe_precision)

    def check(self, n_layers: int | None = None, d_model: int | None = None) -> None:
        """Raise MelboError for a bad setting. Without the model's sizes, check what needs no model (the CLI
        does that before loading one, so a typo costs a second, not a model load)."""
        given: tuple[int | None, int | None] = (self.source, self.target)
        if n_layers is not None:
            if self.source is None or self.target is None:
                default_layers(n_layers)
            given = self.layers(n_layers)
            if not all(0 <= layer < n_layers for layer in given if layer is not None):
                raise MelboError(f"layers must be between 0 and {n_layers - 1} (this model has {n_layers}); got source {given[0]}, target {given[1]}")
        source, target = given
        if source is not None and target is not None and source >= target:
            raise MelboError(f"the source layer ({source}) must come before the target layer ({target})")
        if not self.auto_radius and not (isinstance(self.radius, (int, float)) and math.isfinite(self.radius) and self.radius > 0):
            raise MelboError(f"R must be a positive number or auto, got {self.radius}")
        if self.count < 1 or self.block < 1 or self.steps < 0:
            raise MelboError("count and block size must be at least 1, steps at least 0")
        if d_model is not None and self.count > d_model:
            raise MelboError(f"at most d_model = {d_model} orthogonal vectors exist; asked for {self.count}")
        if self.p <= 0 or self.q <= 0:
            raise MelboError("p and q must be positive")
        if self.lr is not None and not self.lr > 0:
            raise MelboError("the learning rate must be positive")
        if self.precision not in ("auto", *PRECISIONS):
            raise MelboError(f"--precision {self.precision!r}: use auto, float32 or bfloat16")
        if self.probe_precision is not None and self.probe_precision not in ("auto", *PRECISIONS):
            raise MelboError(f"--probe-precision {self.probe_precision!r}: use auto, float32 or bfloat16")
        Positions(self.positions)

    @property
    def blocks(self) -> int:
        """Blocks the discovery runs (progress counts by it)."""
        return -(-self.count // self.block)

    def as_in_run(self, recorded: Mapping[str, Any]) -> DiscoverConfig:
        """This config for resuming a run whose run.json records ``recorded`` (its settings): a precision left to the
        device (auto) takes the run's (:func:`precision_in_run`), so a resumed run goes on as it began, on any device
        (:meth:`OrthoConfig.as_in_run` does the same)."""
        return dataclasses.replace(self, precision=precision_in_run(self.precision, recorded))

    def resolved(self, n_layers: int, d_model: int, radius: float | None = None, bfloat16_fast: bool = False) -> DiscoverSettings:
        """The concrete settings for a model of this depth and width (checked); ``radius`` is R when it is auto;
        ``bfloat16_fast``: whether the device has bfloat16 units (what precision auto becomes)."""
        self.check(n_layers, d_model)
        if radius is None:
            if self.auto_radius:
                raise MelboError("R is auto: choose it first (melbo.engines.radius.choose_radius)")
            radius = float(self.radius)  # not auto: a number (checked above)
        source, target = self.layers(n_layers)
        lr = self.lr if self.lr is not None else 0.01 * radius / math.sqrt(d_model)
        values = {**dataclasses.asdict(self), "source": source, "target": target, "radius": float(radius), "lr": lr,
                  "precision": run_precision(self.precision, bfloat16_fast)}
        del values["probe_precision"]  # how R was chosen, not how the vectors train: radius_choice records it
        return DiscoverSettings(**values)

    def probe_settings(self, n_layers: int, d_model: int, bfloat16_fast: bool = False) -> DiscoverSettings:
        """The settings auto R's probes train with (:mod:`melbo.engines.radius`; R is theirs to choose): discovery's,
        at ``probe_precision`` where it is given."""
        settings = self.resolved(n_layers, d_model, radius=1.0, bfloat16_fast=bfloat16_fast)
        return dataclasses.replace(settings, precision=run_precision(self.probe_precision or self.precision, bfloat16_fast))


# Fast mode's evaluations per block (each a forward and backward pass of the block), by optimiser; with match "kl"
# L-BFGS stops at STEPS_FAST_KL. Chosen by bench/ortho_vs_seed.py and bench/fidelity.py: see bench/RESULTS.md.
STEPS_FAST = {"lbfgs": 60, "adam": 150}
STEPS_FAST_KL = 30

# Fast mode's objective: the next-token KL(P_θ0 ‖ P_θ) at the last 4 prompt positions and along θ0's own first 16
# greedy tokens (teacher-forced). Why, against the other variants: bench/fidelity.py, figures in bench/RESULTS.md.
FAST_MATCH, FAST_CONTINUATION = "kl", 16
# ... computed as "kl-top" (the same KL on θ0's likeliest tokens holding 99.99 % of its probability at each position,
# plus one bucket for the rest; exact at the last prompt token, where θ0's text begins) where the vocabulary has KL_TOP_VOCAB tokens or more: there the LM head over every token is most of an
# evaluation. On Gemma 3 270M (262k tokens) a block-16 evaluation takes 0.49× kl's time (AVX2 EPYC; 0.37× on the
# AVX-512 Xeon) with the same copies (median last-token KL 0.084 and 0.122 in the first two blocks against 0.090 and
# 0.137) and the whole basis 39.5 min against about 79 (full_basis). On SmolLM2 (49k) θ0's likeliest tokens are most of
# the vocabulary (27k–44k per prompt for the demo's base): 0.84–0.98× kl's time (bench/utilisation.py --kl-top) for
# kl's copies (share 94 % and 91 % against 91 % and 91 %, held-out base NLL alike: fidelity), so kl, the exact
# reference that the demo's verdict was measured with, stays there.
FAST_MATCH_LARGE_VOCAB, KL_TOP_VOCAB = "kl-top", 100_000


def fast_match(vocab: int | None) -> str:
    """Fast mode's objective on a model whose plain LM head has ``vocab`` tokens (None: not known, or a head with a bias
    or logits capped or rescaled after it, which kl-top cannot run on): FAST_MATCH, or FAST_MATCH_LARGE_VOCAB from
    KL_TOP_VOCAB tokens on."""
    return FAST_MATCH_LARGE_VOCAB if vocab is not None and vocab >= KL_TOP_VOCAB else FAST_MATCH

# ... and longer where θ0's behaviour shows later on the run's prompt: through the token at which its completion (of
# BEHAVIOUR_TOKENS, the eval's length) first takes the label of the whole, at most FAST_CONTINUATION_MAX. A base whose
# refusal came at token 26 ("I'm sorry for the unintended consequences of your actions. I'm here to help you with your
# tasks, but I'm not able…") kept its label in 28 % of 16-token copies (two seeds): their opening, not their refusal;
# in 56 % through token 26 (two seeds), at ~1.25× the time per copy. bench/fidelity.py "melbo default".
FAST_CONTINUATION_MAX, BEHAVIOUR_TOKENS = 32, 48  # BEHAVIOUR_TOKENS: melbo eval's default length (EvalConfig)
# Fast mode's copies start at ‖θ0‖ and pay FAST_PENALTY·(‖θ‖/‖θ0‖)² nats: of copies that match θ0 alike, the smaller.
# A copy's norm stays near where its search starts (started at 2‖θ0‖, melbo 0.1's start, the demo's copies ended at
# 59 = 2.2‖θ0‖; at ‖θ0‖ with the penalty, at 38), and a smaller push does less to the model off the run's prompt:
# bench/fidelity.py, 32 copies of the demo's base: held-out base NLL 1.30 against 1.62, share 88 % against 94 %.
FAST_INIT_SCALE, FAST_PENALTY = 1.0, 0.02
# Fast mode's copies also match θ0 along its continuation on FAST_EXTRA_PROMPTS of melbo's shipped prompts (one of each
# kind, never one the controls hold out), the run's prompt keeping FAST_FIRST_WEIGHT of the loss: the one setting
# measured that keeps θ0's label on the run's prompt (91 % of 32 copies of the demo's base, two seeds) and makes θ0's
# text likelier off it than no steering does (held-out base NLL 1.19 against 1.30, p < 0.001), at ~2.5× the time per
# copy (the five prompts packed into one sequence, melbo.model.packing, after a warm-up on the run's prompt alone);
# without them (--extra-prompts 0, the whole basis's objective) 78 % and 1.30 (a tie). bench/fidelity.py. With a chat
# template only (the shipped prompts are chat requests; raw, on Gemma 3 270M, they cost the run's prompt its match).
FAST_EXTRA_PROMPTS, FAST_FIRST_WEIGHT = 4, 0.8
# With those extra prompts, each block's first FAST_WARMUP evaluations train on the run's prompt alone (0.27× the time
# of an evaluation on all five on SmolLM2: bench/utilisation.py --warmup), then STEPS_AFTER_WARMUP on all five, L-BFGS
# restarted at a quarter of its first step. 32 copies of the demo's base, two seeds: about 0.7× the time per copy of 30
# evaluations on all five, the same share (91 %, 91 %) and held-out NLL (1.17 and 1.20 against 1.18 and 1.20; p 0.00027
# and 0.0035), bench/fidelity.py. Fewer after it lost: 20 + 10 kept the share but not the held-out gain (p 0.11 on
# seed 1; with the 8-token extras below p 0.3, at 0.67–0.82× the time per copy), 15 + 15 lost the share (69 % on seed 0).
FAST_WARMUP, STEPS_AFTER_WARMUP = 20, 15
# On the shipped prompts the copies match θ0 along its first FAST_EXTRA_CONTINUATION tokens only (at most the run's
# continuation): 0.75× the time of an evaluation on all five, 0.81× per copy, and both halves of the controls' bar
# on two seeds (the demo's base: 88 % and 84 % keep θ0's label, held-out base NLL 1.16 and 1.22 against 1.30
# unsteered, p 1e-5 and 0.01; along all 16: 81 % and 100 %, 1.15 and 1.22), AMD EPYC Zen 3, 2026-12-04: bench/fidelity.py.
FAST_EXTRA_CONTINUATION = 8
# A copy (an L-BFGS row) that has not improved its loss for FAST_PATIENCE evaluations in a row is done: it leaves its
# block's batch and later evaluations run on the other rows alone (melbo.engines.optimise.lbfgs_rows). On Qwen2.5-Coder
# 0.5B the median row stops improving after ~13 of 30 evaluations (per-row losses of a block of 16: 62–65 % of the
# row-evaluations needed with a patience of 3–4, every row within 1.1 % of its final loss), and 32 copies took 0.86× the
# time with it (15.8 s per copy against 18.5 s, AVX2 EPYC), 94 % writing code against 84 %; on SmolLM2 fewer rows stop
# early (521 row-evaluations of a block of 16 against 560), a block took ≈ 0.89× (side by side) and the demo's verdict
# is the same to the digit. bench/RESULTS.md full_basis.
FAST_PATIENCE = 4
# A fast-mode run of LONG_RUN copies or more is long: it compiles the blocks each evaluation runs and its KL
# (torch.compile; melbo.model.fastpath) where a compiler is at hand, and trains LONG_RUN_BLOCK copies at a time.
# Compiling costs about 30 s on a first run (21 s for the first batch shape, 11 s more once a row leaves its block; a
# few seconds once inductor's disk cache holds them), and a block of 16 SmolLM2 copies saves about 7 s with bfloat16
# products (a step 0.66× eager's, AMX Xeon) and 4 s in float32 (0.88×): bench/utilisation.py --compile. SmolLM2's whole
# basis took 9.9 min against 13.3. Blocks of 32 cost 0.72× per copy on SmolLM2, 0.85× on Gemma 3 270M and 0.97× on
# Qwen2.5 0.5B (evaluations and completions, compiled, bfloat16 products: bench/utilisation.py --blocks), and SmolLM2's
# whole basis took 8.0 min against 9.9 with the same verdict over two seeds (bench/RESULTS.md full_basis). In float32 on
# a 2-core AVX2 EPYC (Zen 3) the two together took Qwen2.5 0.5B's first 64 copies in 0.79× the time of eager blocks of
# 16 (13.1 min against 16.5, one base, one run after the other; RESULTS full_basis, 2026-12-07). A short run
# keeps blocks of 16 (a progress line and a checkpoint every 16 copies, and the first copies' KL a little lower): eager
# and in float32 one block of 32 took the demo's 32 copies 1.03× the time of two of 16 there (RESULTS fidelity).
# Blocks of 64 took a whole basis 0.86× the time of 32 on SmolLM2 and Qwen2.5 0.5B and 0.81× on Gemma 3 270M, with copies
# further from θ0 on all three (median KL 1.11×, 1.56×, 1.52×; 16 → 32 cost 1.05× and 1.10×): 32 stays.
LONG_RUN = 128
FAST_BLOCK, LONG_RUN_BLOCK = 16, 32
COMPILES = ("auto", "on", "off")
FOLLOW_THE_RUN = ("block", "match", "extra_prompts", "first_weight", "warmup", "continuation", "extra_continuation", "patience")  # left to the mode, a resume takes the run's (OrthoConfig.as_in_run)
MATCHES = ("mean", "each", "kl", "kl-top", "fisher")


def fast_continuation(shows_at: int | None) -> int:
    """Fast mode's continuation: FAST_CONTINUATION tokens, or through token ``shows_at`` (where θ0's behaviour shows on
    the run's prompt) when that comes later, at most FAST_CONTINUATION_MAX."""
    return FAST_CONTINUATION if shows_at is None else min(max(FAST_CONTINUATION, shows_at), FAST_CONTINUATION_MAX)


@dataclass(frozen=True)
class OrthoSettings:
    """MELBO-ortho's settings with every value concrete (what the engine runs and run.json records)."""

    source: int
    target: int
    mode: str  # "fast" or "seed"
    count: int  # vectors to find besides θ0
    block: int
    steps: int  # evaluations (L-BFGS) or steps (Adam) per block
    lr: float
    optimizer: str  # "lbfgs" or "adam"
    penalty: float
    positions: str
    min_norm: float
    stop_after_dropped: int
    plateau: float
    init_scale: float
    seed: int
    completion_tokens: int
    continuation: int  # θ0's own greedy tokens after the prompt that the loss also covers
    match: str  # one of MATCHES
    # Added after the first release: each default is what melbo did before the field existed (a run that lacks it resumes at it)
    first_weight: float | None = None  # the first prompt's share of the loss (the others share the rest); None: equal
    extra_prompts: int = 0  # shipped prompts trained on besides the user's (melbo.model.prompts.training_prompts)
    precision: str = PRECISION_BEFORE  # one of PRECISIONS: the model's forward and backward while optimising
    warmup: int = 0  # evaluations per block on the run's own prompts alone before the extra prompts join (lbfgs)
    warmup_precision: str | None = None  # one of PRECISIONS: the warm-up's matrix products; None: as ``precision`` (or no warm-up)
    extra_continuation: int | None = None  # θ0's tokens matched on each shipped prompt; None: ``continuation``, as on the run's
    patience: int = 0  # lbfgs: evaluations in a row without improvement after which a row is done (0: never)
    compiled: bool = False  # fast mode: the blocks each evaluation runs, and its KL, compiled (torch.compile)

    @property
    def fast(self) -> bool:
        return self.mode == "fast"

    @property
    def blocks(self) -> int:
        """Blocks to run if every vector is kept (progress counts by it; a basis exhausted early stops sooner)."""
        return -(-self.count // self.block)


@dataclass(frozen=True)
class OrthoConfig:
    """What a user may set for MELBO-ortho; ``None`` means "the mode's default" (see :meth:`resolved`).
    The CLI's options take their defaults from here."""

    source: int | None = None  # layer s; None: the model's default (about a third of the way in; the CLI: the base run's)
    target: int | None = None  # layer t; None: about two thirds in
    mode: str = setting("fast", "fast (blocks, cached layers, early stop) or seed (the post's algorithm as written).")
    count: int | None = setting(None, "Vectors to find besides θ0 (default: until the basis is exhausted).", "--count", "-k")
    block: int | None = setting(  # measured in bench/full_basis.py (--block 16, 32, 64)
        None,
        f"Vectors optimised together (fast: {FAST_BLOCK}, {LONG_RUN_BLOCK} in runs of {LONG_RUN} copies or more; seed: 1). "
        "Larger blocks are faster per copy and leave copies further from θ0 (a whole basis in blocks of 64: 0.81–0.86× "
        "the time of 32, median KL 1.1–1.6×).",
    )
    steps: int | None = setting(
        None,
        "Evaluations per block (fast: at most 30 with lbfgs and match kl, the warm-up + 15 with one, 60 with mean or each, "
        "150 with adam; seed: 1000).",
    )
    lr: float | None = setting(None, "Adam's learning rate; lbfgs's first step is lr·√d (fast: 0.25·‖θ0‖/√d, about a quarter of θ0's typical coordinate; seed: 0.01).")
    optimizer: str | None = setting(None, "Fast mode: lbfgs (default, one L-BFGS per vector) or adam (cosine schedule); seed mode: adam only.")
    penalty: float | None = setting(
        None,
        "λ of an extra λ‖θ‖² term (the post's proposed test of whether the large norms are needed). Fast default: "
        "0.02/‖θ0‖², i.e. 0.02 nats for a copy of θ0's norm (of copies that match θ0 alike, the smaller); seed: 0.",
    )
    positions: str | None = setting(None, "last:20 (fast default: the last 4 prompt tokens and the 16 of θ0's continuation), all (seed default), skip-first or last:N.")
    min_norm: float | None = setting(None, "Vectors at or below this norm are dropped (fast: 1.5 % of ‖θ0‖; seed: 0.1).")
    stop_after_dropped: int | None = setting(None, "This many dropped in a row: the basis is exhausted (fast: a block; seed: 5).")
    plateau: float = setting(2e-3, "Fast mode: stop a block when 10 steps gain less than this fraction (0: never).", minimum=0.0)
    patience: int | None = setting(
        None,
        f"Fast mode with lbfgs: a vector that has not improved for this many evaluations in a row is done and leaves its "
        f"block, the others going on without it (fast default: {FAST_PATIENCE}; 0: never).",
        minimum=0,
    )
    init_scale: float = setting(
        FAST_INIT_SCALE, "Fast mode: the first block starts at this × ‖θ0‖ (later ones at the last block's median norm; melbo 0.1: 2)."
    )
    seed: int = setting(0, "Random seed.")
    completion_tokens: int = setting(32, "Greedy tokens stored per vector on the first prompt (0: none).")
    continuation: int | None = setting(
        None,
        "Also match along θ0's own first N greedy tokens (fast: 16, or through the token where θ0's behaviour shows on "
        "the run's prompt when later, at most 32; seed: 0).",
        minimum=0,
    )
    match: str | None = setting(  # fisher: objectives.fisher_metric
        None,
        "What each copy matches: kl (fast default: θ0's next-token distributions; the forward runs to the LM head and t is "
        "not used), kl-top (the same KL on θ0's likeliest tokens at each position and one bucket for the rest, on every token at the last "
        "prompt token: the head runs on those tokens "
        f"only; fast default on vocabularies of {KL_TOP_VOCAB:,} tokens or more, where the head is most of a step), fisher (the same KL to second order in the LM head's input: the head never runs), mean (seed default: "
        "the residual after t, averaged over positions) or each (position by position).",
    )
    first_weight: float | None = setting(
        None,
        "With several prompts: the first prompt's share of the loss, the others sharing the rest (fast default: 0.8 with "
        "its own extra prompts; equal shares when you give --extra-prompts or several prompts yourself).",
    )
    extra_prompts: int | None = setting(  # melbo.model.prompts.training_prompts; trade-off measured in bench/fidelity.py
        None,
        "Also train on this many shipped prompts, θ0's continuation on each (never the controls' held-out ones), so the "
        "copies carry θ0's behaviour off your prompt too (fast default: 4, one of each kind, ~2× the time per copy, with a "
        "chat template; 0 with raw prompts, in seed mode, or for your prompts only, the whole basis's objective).",
        minimum=0,
    )
    extra_continuation: int | None = setting(  # measured in bench/fidelity.py
        None,
        "With extra prompts: match θ0 along its first N greedy tokens on each shipped prompt (fast default: 8, at most "
        "--continuation; each token runs through blocks s+1 … L in every evaluation: 0.8× the time per copy of 16, the "
        "same share and held-out verdict on the demo's base).",
        minimum=0,
    )
    warmup: int | None = setting(  # measured in bench/fidelity.py
        None,
        "With extra prompts and lbfgs: each block's first N evaluations train on your prompt(s) alone (a fraction of the "
        f"cost), the rest on every prompt (fast default with match kl or kl-top: {FAST_WARMUP}, then {STEPS_AFTER_WARMUP} on every "
        "prompt; 0: every evaluation on every prompt, 30 of them).",
        minimum=0,
    )
    warmup_precision: str | None = setting(  # measured in bench/fidelity.py
        None,
        "The warm-up's matrix products alone: float32 or bfloat16 (default: as --precision). bfloat16 on a CPU with "
        "bfloat16 units: ~0.85× the time per copy with melbo's default warm-up (AVX512-BF16, AMD Zen 5).",
    )
    precision: str = setting(  # measured in bench/full_basis.py --precision and bench/fidelity.py
        "auto",
        "The model's matrix products while optimising, the LM head's among them: float32, bfloat16 (autocast; the "
        "weights, the rest of the objective's maths, the orthogonality and every recorded figure stay float32), or auto: "
        "bfloat16 where the device has bfloat16 units "
        "(a CPU with AVX512-BF16 or AMX, a GPU) in fast mode, else float32 (seed mode: the post's algorithm as written). "
        "Per copy 2.1–2.5× faster with AVX512-BF16 (AMD Zen 5), 1.4× with AMX, with the same share and held-out verdict "
        "on the demo's base.",
    )

    compile: str = setting(  # measured in bench/utilisation.py --compile and bench/full_basis.py
        "auto",
        "Fast mode: compile (torch.compile) the blocks each evaluation runs and its KL: on, off, or auto: on for runs of "
        f"{LONG_RUN} copies or more where a compiler is found (a C++ compiler on a CPU, Triton on a GPU). "
        "SmolLM2's whole basis in 9.9 min against 13.3 eagerly (bfloat16 products, AMX Xeon; a step 0.66× eager's, 0.88× "
        "in float32), after about 30 s of compiling on a first run (inductor caches it on disk); the same maths to rounding.",
    )

    def layers(self, n_layers: int | None) -> tuple[int, int]:
        """(source, target): as given, else :func:`default_layers` of a model this deep."""
        if (self.source is None or self.target is None) and n_layers is None:
            raise MelboError("MELBO-ortho needs its layers: give source and target (or the model, for the default layers)")
        source, target = default_layers(n_layers) if n_layers is not None else (0, 0)
        return (source if self.source is None else self.source), (target if self.target is None else self.target)

    def resolved(
        self, base_norm: float, d_model: int, n_layers: int | None = None, own_prompts: int = 1, chat: bool = True, shows_at: int | None = None,
        bfloat16_fast: bool = False, vocab: int | None = None, can_compile: bool = False,
    ) -> OrthoSettings:
        """The concrete settings for θ0 of this norm on a model this wide and deep, trained on ``own_prompts`` prompts of
        the user's (besides the shipped ones), in a chat template (``chat``) or raw; ``shows_at``: the token of θ0's
        completion on the run's prompt at which its behaviour shows (None: none, or not measured); ``bfloat16_fast``:
        whether the device has bfloat16 units (what precision auto becomes); ``vocab``: the tokens of the model's LM head
        where kl-top can run on it (``LoadedModel.plain_head_vocab``; None: not known, or a head it cannot run on), what
        fast mode's match becomes (:func:`fast_match`); ``can_compile``: whether torch.compile can build kernels for the
        device (what compile auto needs)."""
        optimizer = self._optimizer()
        source, target = self.layers(n_layers)
        fast = self.mode == "fast"
        continuation = self.continuation if self.continuation is not None else (fast_continuation(shows_at) if fast else 0)
        match = self.match or (fast_match(vocab) if fast else "mean")
        count = self.count if self.count is not None else d_model - 1
        block = self.block_size(count)
        # the shipped prompts are chat requests: raw, on a base model, θ0's continuation there is another kind of text, and
        # matching it cost Gemma 3 270M's copies θ0's effect on the run's prompt (median KL 5.5 against 0.23: RESULTS)
        extra = self.extra_prompts if self.extra_prompts is not None else (FAST_EXTRA_PROMPTS if fast and chat else 0)
        default_warmup = FAST_WARMUP if match in ("kl", "kl-top") else 0  # measured with these two (fidelity)
        warmup = (self.warmup if self.warmup is not None else default_warmup) if fast and extra and optimizer == "lbfgs" else 0
        return OrthoSettings(
            source=source,
            target=target,
            mode=self.mode,
            count=count,
            block=block,
            steps=self.steps if self.steps is not None else (self._fast_steps(optimizer, match, warmup) if fast else 1000),
            lr=self.lr if self.lr is not None else (0.25 * base_norm / math.sqrt(d_model) if fast else 0.01),
            optimizer=optimizer,
            penalty=self.penalty if self.penalty is not None else (float(f"{FAST_PENALTY / base_norm**2:.4g}") if fast else 0.0),
            positions=self.positions or (f"last:{4 + continuation}" if fast else "all"),
            min_norm=self.min_norm if self.min_norm is not None else (0.015 * base_norm if fast else 0.1),
            stop_after_dropped=self.stop_after_dropped or (block if fast else 5),
            plateau=self.plateau,
            init_scale=self.init_scale,
            seed=self.seed,
            completion_tokens=self.completion_tokens,
            continuation=continuation,
            match=match,
            first_weight=self.first_weight if self.first_weight is not None else self._default_first_weight(fast and extra > 0, own_prompts),
            extra_prompts=extra,
            precision=run_precision(self.precision, bfloat16_fast and fast),  # seed mode: the post's, as written (float32)
            warmup=warmup,
            warmup_precision=self.warmup_precision if warmup else None,
            extra_continuation=self._extra_continuation(fast and extra > 0, continuation),
            patience=(self.patience if self.patience is not None else FAST_PATIENCE) if fast and optimizer == "lbfgs" else 0,
            compiled=fast and (self.compile == "on" or (self.compile == "auto" and can_compile and count >= LONG_RUN)),
        )

    def _extra_continuation(self, extras: bool, continuation: int) -> int | None:
        """The shipped prompts' continuation: as given, else FAST_EXTRA_CONTINUATION (at most the run's) in fast mode with
        extra prompts; None where it is the run's prompt's (``continuation``), as runs made before it record it."""
        tokens = self.extra_continuation if self.extra_continuation is not None else min(FAST_EXTRA_CONTINUATION, continuation)
        return tokens if extras and tokens != continuation else None

    def _default_first_weight(self, own_extras: bool, own_prompts: int) -> float | None:
        """The run's prompt's share when none is given: FAST_FIRST_WEIGHT with fast mode's own extra prompts
        (``own_extras``) and one prompt of the user's; equal shares (None) when the extra prompts are given (as
        ``--extra-prompts N`` did before it had a default), when the user gives several prompts (each of theirs then
        weighs as much as a shipped one), or with none."""
        return FAST_FIRST_WEIGHT if own_extras and self.extra_prompts is None and own_prompts == 1 else None

    def as_in_run(self, recorded: Mapping[str, Any]) -> OrthoConfig:
        """This config for resuming a run whose run.json records ``recorded`` (its settings): the settings whose mode
        default changed after runs were made (:data:`FOLLOW_THE_RUN`) and that this config leaves to the mode take the
        run's values (a run made before one existed: what melbo did then), and so does a precision left to the device
        (auto), so a resumed run goes on as it began, on any device."""
        earlier = {f.name: f.default for f in dataclasses.fields(OrthoSettings) if f.name in FOLLOW_THE_RUN and f.default is not dataclasses.MISSING}
        values = {name: recorded.get(name, earlier.get(name)) for name in FOLLOW_THE_RUN if getattr(self, name) is None and (name in recorded or name in earlier)}
        if values.get("extra_continuation", 0) is None:  # the run matched its continuation on every prompt
            values["extra_continuation"] = recorded.get("continuation")
        return dataclasses.replace(self, **values, precision=precision_in_run(self.precision, recorded))

    def block_size(self, count: int) -> int:
        """Vectors optimised together in a run of ``count`` copies: as set, else in fast mode FAST_BLOCK, or
        LONG_RUN_BLOCK from LONG_RUN copies, and 1 in seed mode (the post's one at a time)."""
        if self.block:
            return self.block
        if self.mode != "fast":
            return 1
        return LONG_RUN_BLOCK if count >= LONG_RUN else FAST_BLOCK

    @staticmethod
    def _fast_steps(optimizer: str, match: str, warmup: int) -> int:
        """Fast mode's evaluations per block: after a warm-up, 15 on every prompt (kl-like matches; 60 with mean, each)."""
        kl_like = optimizer == "lbfgs" and match in ("kl", "kl-top", "fisher")
        return warmup + (STEPS_AFTER_WARMUP if warmup and kl_like else STEPS_FAST_KL if kl_like else STEPS_FAST[optimizer])

    def _optimizer(self) -> str:
        """The optimiser this mode uses, after checking that mode and optimiser go together."""
        if self.mode not in ("fast", "seed"):
            raise MelboError(f"--mode {self.mode!r}: use fast or seed")
        fast = self.mode == "fast"
        optimizer = self.optimizer or ("lbfgs" if fast else "adam")
        if optimizer not in ("lbfgs", "adam"):
            raise MelboError(f"--optimizer {optimizer!r}: use lbfgs or adam")
        if not fast and optimizer != "adam":
            raise MelboError("--mode seed is the post's algorithm: its optimiser is Adam (use --mode fast for lbfgs)")
        return optimizer

    def asked_precisions(self) -> tuple[str | None, ...]:
        """Every precision option as the user set it (the training's and the warm-up's): what a warning about software bfloat16 reads."""
        return (self.precision, self.warmup_precision)

    def check(self, n_layers: int | None = None, d_model: int | None = None) -> None:
        """Raise MelboError for a bad setting. Without the model's sizes, check what needs no model (the CLI
        does that before loading one)."""
        source, target = self.layers(n_layers) if n_layers is not None or None not in (self.source, self.target) else (self.source, self.target)
        if n_layers is not None and not all(0 <= layer < n_layers for layer in (source, target) if layer is not None):
            raise MelboError(f"layers must be between 0 and {n_layers - 1}; got source {source}, target {target}")
        if source is not None and target is not None and source >= target:
            raise MelboError(f"the source layer ({source}) must come before the target layer ({target})")
        self._optimizer()
        if self.count is not None and (self.count < 1 or (d_model is not None and self.count > d_model - 1)):
            raise MelboError("--count must be at least 1" if d_model is None else f"--count must be between 1 and d_model − 1 = {d_model - 1}")
        if (self.block is not None and self.block < 1) or (self.steps is not None and self.steps < 1):
            raise MelboError("block size and steps must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise MelboError("the learning rate must be positive")
        if self.penalty is not None and self.penalty < 0:
            raise MelboError("the L2 penalty must be ≥ 0")
        if not (math.isfinite(self.init_scale) and self.init_scale > 0):
            raise MelboError(f"--init-scale {self.init_scale:g}: give a positive number (the first block starts at it × ‖θ0‖)")
        if self.completion_tokens < 0:
            raise MelboError("--completion-tokens must be ≥ 0")
        available = len(training_pool())
        if self.extra_prompts is not None and not 0 <= self.extra_prompts <= available:
            raise MelboError(f"--extra-prompts {self.extra_prompts}: give 0 to {available} (the shipped prompts that are never held out)")
        if self.first_weight is not None and not 0 < self.first_weight <= 1:
            raise MelboError(f"--first-weight {self.first_weight:g}: give a share above 0 and at most 1")
        if self.continuation is not None and (self.continuation < 0 or (self.continuation and self.mode == "seed")):
            raise MelboError("--continuation must be ≥ 0, and 0 in seed mode (the post's objective)")
        if self.extra_continuation is not None and (self.extra_continuation < 0 or (self.extra_continuation and self.mode == "seed")):
            raise MelboError("--extra-continuation must be ≥ 0, and 0 in seed mode (the post's objective)")
        if self.match is not None and self.match not in MATCHES:
            raise MelboError(f"--match {self.match!r}: use {', '.join(MATCHES[:-1])} or {MATCHES[-1]}")
        if self.precision not in ("auto", *PRECISIONS):
            raise MelboError(f"--precision {self.precision!r}: use auto, float32 or bfloat16")
        if self.compile not in COMPILES:
            raise MelboError(f"--compile {self.compile!r}: use auto, on or off")
        if self.warmup_precision is not None and self.warmup_precision not in PRECISIONS:
            raise MelboError(f"--warmup-precision {self.warmup_precision!r}: use float32 or bfloat16")
        if self.match in ("fisher", "kl-top") and self.mode == "seed":
            raise MelboError(f"--match {self.match} is a fast-mode objective (the seed mode is the post's: mean)")
        if self.positions is not None:
            Positions(self.positions)
        if self.warmup is not None and self.warmup < 0:
            raise MelboError("--warmup must be ≥ 0")
        if self.warmup and self._optimizer() != "lbfgs":
            raise MelboError("--warmup is a stage of fast mode's lbfgs: it needs --mode fast with --optimizer lbfgs")
