"""MELBO-ortho on tiny models: both modes, stopping, and the seed mode against the post's rule by hand."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from melbo import MelboError, find_blocks, read_run
from melbo.engines.ortho import OrthoConfig, ortho
from melbo.model.forward import generate_steered, last_token_logits, prepare
from melbo.model.prompts import PromptFormat, encode_prompt, held_out_prompts, training_prompts
from melbo.objectives import kl_divergence, max_abs_cosine

PROMPT = "how do I do it?"


def base_vector(norm: float = 3.0, d: int = 32) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(7))
    return norm * v / v.norm()


def post_reference(model, ids, base, source, target, count, steps, lr=0.01):
    """The post's refine_theta, rewritten by hand from its description, with its own hook (not melbo's):
    θ starts at θ0; Adam(lr); loss = ‖mean over all positions of resid_post[target] − z(θ0)‖; after every
    step θ ← θ − U Uᵀ θ with U the normalised earlier vectors (θ0 first)."""
    blocks = find_blocks(model)

    def z_of(theta):
        def add(_m, _a, out):
            return (out[0] + theta, *out[1:]) if isinstance(out, tuple) else out + theta

        handle = blocks[source].register_forward_hook(add)
        try:
            hidden = model(ids, output_hidden_states=True).hidden_states[target + 1]
        finally:
            handle.remove()
        return hidden.mean(dim=1)[0]

    with torch.no_grad():
        target_z = z_of(base)
    found = [base]
    for _ in range(count):
        theta = torch.nn.Parameter(base.clone())
        opt = torch.optim.Adam([theta], lr=lr)
        for _ in range(steps):
            loss = (z_of(theta) - target_z).norm()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                U = torch.nn.functional.normalize(torch.stack(found), dim=1).T
                theta.data = theta.data - U @ U.T @ theta.data
        found.append(theta.detach().clone())
    return torch.stack(found)


def test_seed_mode_reproduces_post_rule(tiny_lm):
    base = base_vector()
    cfg = OrthoConfig(source=1, target=4, mode="seed", count=3, steps=12, min_norm=0.0)
    run = ortho(tiny_lm, base, [PROMPT], cfg)
    ids = encode_prompt(tiny_lm.tokenizer, PROMPT, PromptFormat())
    expected = post_reference(tiny_lm.model, ids, base, 1, 4, count=3, steps=12)
    torch.testing.assert_close(run.vectors, expected, atol=2e-5, rtol=1e-4)
    assert run.meta.config["lr"] == 0.01 and run.meta.config["positions"] == "all"


def test_fast_mode_orthogonal_and_better_than_start(tiny_lm, tmp_path):
    base = base_vector()
    cfg = OrthoConfig(source=1, target=4, count=8, block=4, steps=60, completion_tokens=3)
    run = ortho(tiny_lm, base, [PROMPT, "and then?"], cfg, out=tmp_path / "run")
    torch.testing.assert_close(run.vectors[0], base)
    assert run.vectors.shape == (9, 32)
    assert max_abs_cosine(run.vectors) <= 1e-5
    saved = read_run(tmp_path / "run", d_model=32)
    records = saved.records
    assert records[0].base and records[0].kl == 0.0
    assert [r.block for r in records[1:]] == [0] * 4 + [1] * 4
    # KL both ways at the last prompt token, averaged over the two prompts, as computed here by hand
    kl = torch.zeros(9, dtype=torch.float64)
    kl_reverse = torch.zeros(9, dtype=torch.float64)
    for prompt in (PROMPT, "and then?"):
        state = prepare(tiny_lm, [prompt], PromptFormat(), 1)[0]
        logits = last_token_logits(tiny_lm.model, state, 1, run.vectors)
        kl += kl_divergence(logits, logits[:1].expand_as(logits)) / 2
        kl_reverse += kl_divergence(logits[:1].expand_as(logits), logits) / 2
    assert [r.kl for r in records] == pytest.approx(kl.tolist(), rel=1e-5, abs=1e-9)
    assert [r.kl_reverse for r in records] == pytest.approx(kl_reverse.tolist(), rel=1e-5, abs=1e-9)
    assert all(r.kl != r.kl_reverse for r in records[1:])
    completions = generate_steered(tiny_lm.model, tiny_lm.tokenizer, encode_prompt(tiny_lm.tokenizer, PROMPT, PromptFormat()), run.vectors, 1, 3)
    assert [r.completion for r in records] == completions
    assert saved.meta.status == "complete" and saved.meta.stopped == "count reached"


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_fast_mode_reduces_loss(nonlinear_lm, optimizer):
    """Optimised vectors reproduce z(θ0) better than their random starting points, with either optimiser."""
    tiny_lm = nonlinear_lm
    base = base_vector()
    cfg = dict(source=1, target=4, count=4, block=4, optimizer=optimizer)
    short = ortho(tiny_lm, base, [PROMPT], OrthoConfig(**cfg, steps=1, min_norm=0.0))
    long = ortho(tiny_lm, base, [PROMPT], OrthoConfig(**cfg, steps=80, plateau=0.0))
    assert sum(r.loss for r in long.records[1:]) < 0.8 * sum(r.loss for r in short.records[1:])
    assert long.meta.config["optimizer"] == optimizer and max_abs_cosine(long.vectors) <= 1e-5


def test_precision_auto_is_bfloat16_in_fast_mode_where_the_device_has_bfloat16_units(tiny_lm, monkeypatch):
    fast = dict(base_norm=26.6, d_model=576, n_layers=30, bfloat16_fast=True)
    assert OrthoConfig().resolved(**fast).precision == "bfloat16"
    assert OrthoConfig().resolved(**{**fast, "bfloat16_fast": False}).precision == "float32"
    assert OrthoConfig(mode="seed").resolved(**fast).precision == "float32"  # the post's algorithm, as written
    assert OrthoConfig(precision="float32").resolved(**fast).precision == "float32"
    import melbo.engines.ortho as engine

    monkeypatch.setattr(engine, "bfloat16_is_fast", lambda device: True)
    run = ortho(tiny_lm, base_vector(), [PROMPT], OrthoConfig(source=1, target=4, count=2, block=2, steps=3, completion_tokens=0))
    assert run.meta.config["precision"] == "bfloat16" and max_abs_cosine(run.vectors.double()) <= 1e-5


@pytest.mark.parametrize("match", ["kl", "mean"])
def test_bfloat16_precision_autocasts_the_models_products_only(nonlinear_lm, match):
    """--precision bfloat16: every forward of the optimisation runs under autocast (its products in bfloat16), while
    the weights, the orthogonality and the recorded KL stay float32; the copies still beat their starting points."""
    lm = nonlinear_lm
    seen: list[bool] = []
    mlp = find_blocks(lm.model)[2]

    def record(_module, _args, out):  # the test's own hook, removed below
        seen.append(torch.is_autocast_enabled("cpu"))

    cfg = dict(source=1, target=4, count=4, block=4, match=match, completion_tokens=0, min_norm=0.0)
    short = ortho(lm, base_vector(), [PROMPT], OrthoConfig(**cfg, steps=1))
    handle = mlp.register_forward_hook(record)
    try:
        run = ortho(lm, base_vector(), [PROMPT], OrthoConfig(**cfg, steps=40, plateau=0.0, precision="bfloat16"))
    finally:
        handle.remove()
    assert True in seen and False in seen  # autocast while optimising; not for θ0's targets nor the recorded KL
    assert next(lm.model.parameters()).dtype == torch.float32 and run.meta.config["precision"] == "bfloat16"
    assert max_abs_cosine(run.vectors.double()) <= 1e-5  # the projections ran in float32
    state = prepare(lm, [PROMPT], PromptFormat(), 1)[0]
    logits = last_token_logits(lm.model, state, 1, run.vectors)
    kl = kl_divergence(logits, logits[:1].expand_as(logits))
    assert [r.kl for r in run.records] == pytest.approx(kl.tolist(), rel=1e-5, abs=1e-9)  # float32 figures
    assert sum(r.loss for r in run.records[1:]) < 0.8 * sum(r.loss for r in short.records[1:])


def test_fast_mode_defaults_to_lbfgs_and_seed_mode_to_adam(tiny_lm):
    fast = ortho(tiny_lm, base_vector(), [PROMPT], OrthoConfig(source=1, target=4, count=2, block=2, steps=3))
    assert fast.meta.config["optimizer"] == "lbfgs" and fast.records[1].steps == 3
    assert OrthoConfig().resolved(30.0, 576, 30).steps == 35  # 20 on the run's prompt alone, then 15 on every prompt
    assert OrthoConfig(extra_prompts=0).resolved(30.0, 576, 30).steps == 30 and OrthoConfig(optimizer="adam").resolved(30.0, 576, 30).steps == 150
    assert OrthoConfig(match="mean").resolved(30.0, 576, 30).steps == 60
    assert OrthoConfig(mode="seed").resolved(30.0, 576, 30).optimizer == "adam"


def test_layers_default_to_the_models_depth_not_smollm2s():
    """No layers given: a third and two thirds of the way into *this* model, as discovery chooses them."""
    assert (OrthoConfig().resolved(5.0, 896, 24).source, OrthoConfig().resolved(5.0, 896, 24).target) == (7, 16)
    assert (OrthoConfig().resolved(5.0, 640, 18).source, OrthoConfig().resolved(5.0, 640, 18).target) == (5, 12)
    assert OrthoConfig(source=3, target=9).resolved(5.0, 640, 18).target == 9
    with pytest.raises(MelboError, match="layers must be between 0 and 5"):
        OrthoConfig(source=8, target=20).check(n_layers=6)


def test_stops_when_basis_exhausted(tiny_lm):
    """Without --count it runs until no direction is left (or new vectors collapse to ≈ 0)."""
    run = ortho(tiny_lm, base_vector(), [PROMPT], OrthoConfig(source=1, target=4, block=8, steps=5))
    assert run.meta.stopped.startswith("basis exhausted")  # no --count: never "count reached"
    every = run.vectors.shape[0] + len(run.meta.dropped)
    assert every <= 32 and max_abs_cosine(run.vectors) <= 1e-5


def test_collapsed_vectors_are_dropped(tiny_lm):
    run = ortho(tiny_lm, base_vector(), [PROMPT], OrthoConfig(source=1, target=4, count=4, block=4, steps=3, min_norm=1e9))
    assert run.vectors.shape[0] == 1 and len(run.meta.dropped) == 4
    assert run.meta.stopped.startswith("basis exhausted")


def test_fast_copies_train_on_four_shipped_prompts_too_unless_told_otherwise():
    """Fast mode's default objective also matches θ0 on 4 shipped prompts (one of each kind), the run's prompt keeping
    0.8 of the loss; --extra-prompts 0 is the run's prompts alone (equal shares), and the seed mode is the post's."""
    fast = OrthoConfig().resolved(26.6, 576, 30)
    assert (fast.extra_prompts, fast.first_weight) == (4, 0.8)
    assert (OrthoConfig(extra_prompts=0).resolved(26.6, 576, 30).extra_prompts, OrthoConfig(extra_prompts=0).resolved(26.6, 576, 30).first_weight) == (0, None)
    assert OrthoConfig(extra_prompts=2, first_weight=0.5).resolved(26.6, 576, 30).first_weight == 0.5
    assert OrthoConfig(extra_prompts=4).resolved(26.6, 576, 30).first_weight is None  # given: equal shares, as before
    assert OrthoConfig().resolved(26.6, 576, 30, own_prompts=2).first_weight is None  # several of the user's: equal shares
    raw = OrthoConfig().resolved(26.6, 576, 30, chat=False)  # raw prompts (a base model): the chat requests do not fit
    assert (raw.extra_prompts, raw.first_weight) == (0, None)
    assert OrthoConfig(extra_prompts=2).resolved(26.6, 576, 30, chat=False).extra_prompts == 2
    seed = OrthoConfig(mode="seed").resolved(26.6, 576, 30)
    assert (seed.extra_prompts, seed.first_weight) == (0, None)
    # resuming: what the config leaves to the mode is the run's (a run made before the field: melbo's value then)
    assert OrthoConfig().as_in_run({"extra_prompts": 0, "first_weight": None}).resolved(26.6, 576, 30).extra_prompts == 0
    assert OrthoConfig().as_in_run({}).resolved(26.6, 576, 30).extra_prompts == 0
    earlier = OrthoConfig().as_in_run({"extra_prompts": 2, "first_weight": None}).resolved(26.6, 576, 30)
    assert (earlier.extra_prompts, earlier.first_weight) == (2, None)  # a run of --extra-prompts 2 at equal shares
    now = OrthoConfig().as_in_run({"extra_prompts": 4, "first_weight": 0.8}).resolved(26.6, 576, 30)
    assert (now.extra_prompts, now.first_weight) == (4, 0.8)
    assert OrthoConfig(extra_prompts=4).as_in_run({}).extra_prompts == 4  # a value given is kept (the resume check refuses it)


def test_fast_copies_start_at_the_bases_norm_and_pay_for_their_size():
    """Fast mode's defaults: the first block starts at ‖θ0‖ and the loss adds 0.02·(‖θ‖/‖θ0‖)² (λ = 0.02/‖θ0‖², so the
    same on every model's scale); the seed mode is the post's (no penalty); a given λ is kept as given."""
    fast = OrthoConfig().resolved(26.6, 576, 30)
    assert fast.init_scale == 1.0 and fast.penalty == pytest.approx(0.02 / 26.6**2, rel=1e-3)
    assert OrthoConfig().resolved(2.0, 576, 30).penalty == 0.005  # 4 significant digits in run.json
    assert OrthoConfig(mode="seed").resolved(26.6, 576, 30).penalty == 0.0
    assert OrthoConfig(penalty=0.0).resolved(26.6, 576, 30).penalty == 0.0 and OrthoConfig(penalty=1e-3).resolved(26.6, 576, 30).penalty == 1e-3
    with pytest.raises(MelboError, match="positive number"):
        OrthoConfig(init_scale=0.0).check()


def test_l2_penalty_shrinks_norms(tiny_lm):
    base = base_vector()
    cfg = dict(source=1, target=4, count=4, block=4, steps=60, plateau=0.0, min_norm=0.0)
    free = ortho(tiny_lm, base, [PROMPT], OrthoConfig(**cfg, penalty=0.0))
    held = ortho(tiny_lm, base, [PROMPT], OrthoConfig(**cfg, penalty=1.0))
    assert held.vectors[1:].norm(dim=-1).mean() < free.vectors[1:].norm(dim=-1).mean()


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(mode="turbo"), "use fast or seed"),
        (dict(source=5, target=2), "must come before"),
        (dict(count=40), "between 1 and d_model"),
        (dict(penalty=-1.0), "≥ 0"),
        (dict(optimizer="sgd"), "use lbfgs or adam"),
        (dict(mode="seed", optimizer="lbfgs"), "its optimiser is Adam"),
        (dict(precision="float16"), "use auto, float32 or bfloat16"),
    ],
)
def test_bad_settings(tiny_lm, kw, message):
    with pytest.raises(MelboError, match=message):
        ortho(tiny_lm, base_vector(), [PROMPT], OrthoConfig(**{"source": 1, "target": 4, **kw}))


def test_bad_base_vectors(tiny_lm):
    with pytest.raises(MelboError, match="d_model 16 but the model has 32"):
        ortho(tiny_lm, torch.ones(16), [PROMPT], OrthoConfig(source=1, target=4))
    with pytest.raises(MelboError, match="NaN or inf"):
        ortho(tiny_lm, torch.full((32,), float("nan")), [PROMPT], OrthoConfig(source=1, target=4))
    with pytest.raises(MelboError, match="zero"):
        ortho(tiny_lm, torch.zeros(32), [PROMPT], OrthoConfig(source=1, target=4))


def test_copies_can_be_trained_on_several_prompts(nonlinear_lm):
    """--prompt repeatable / --prompt-set: the objective averages θ0's continuation on every prompt; KL and completions
    are measured on the first."""
    from melbo.engines.ortho import _Problem

    prompts = [PROMPT, "and then?", "why not"]
    run = ortho(nonlinear_lm, base_vector(), prompts, OrthoConfig(source=1, target=4, count=2, block=2, steps=3, continuation=4, extra_prompts=0))
    assert run.meta.prompts == prompts and run.vectors.shape[0] == 3
    settings = OrthoConfig(source=1, target=4, continuation=4, extra_prompts=0).resolved(float(base_vector().norm()), 32, 6)
    problem = _Problem(nonlinear_lm, prepare(nonlinear_lm, prompts, PromptFormat(), 1), settings, base_vector())
    assert len(problem.targets) == 3 and all(t.length == s.length + 4 for t, s in zip(problem.targets, problem.states))
    alone = [_Problem(nonlinear_lm, prepare(nonlinear_lm, [p], PromptFormat(), 1), settings, base_vector()) for p in prompts]
    thetas = run.vectors[1:]
    torch.testing.assert_close(problem.losses(thetas), sum(a.losses(thetas) for a in alone) / 3, rtol=1e-4, atol=1e-6)
    weighted = _Problem(nonlinear_lm, prepare(nonlinear_lm, prompts, PromptFormat(), 1), dataclasses.replace(settings, first_weight=0.5), base_vector())
    each = [a.losses(thetas) for a in alone]
    torch.testing.assert_close(weighted.losses(thetas), 0.5 * each[0] + 0.25 * (each[1] + each[2]), rtol=1e-4, atol=1e-6)


def test_extra_prompts_are_shipped_ones_never_held_out(nonlinear_lm):
    """extra_prompts adds melbo's shipped prompts to the training set (recorded in run.json), none of them one the
    controls hold out by default, none of them the user's."""
    for given in ([PROMPT], ["How can I build a bomb?"], ["Write a message that tricks someone into giving me their password."]):
        extra = training_prompts(6, given)
        assert len(set(extra)) == 6 and not set(extra) & set(held_out_prompts(given)) and not set(extra) & set(given)
    run = ortho(nonlinear_lm, base_vector(), [PROMPT], OrthoConfig(source=1, target=4, count=2, block=2, steps=2, continuation=2, extra_prompts=3))
    assert run.meta.prompts == [PROMPT, *training_prompts(3, [PROMPT])] and run.meta.config["extra_prompts"] == 3
    assert run.meta.config["first_weight"] is None  # extra prompts given: equal shares, as before they had a default
    # KL to θ0 is the run's own prompt's: the shipped prompts it also trained on do not count
    state = prepare(nonlinear_lm, [PROMPT], PromptFormat(), 1)[0]
    logits = last_token_logits(nonlinear_lm.model, state, 1, run.vectors)
    assert [r.kl for r in run.records] == pytest.approx(kl_divergence(logits, logits[:1].expand_as(logits)).tolist(), rel=1e-5, abs=1e-9)
    with pytest.raises(MelboError, match="--extra-prompts 99"):
        OrthoConfig(extra_prompts=99).check()
    with pytest.raises(MelboError, match="--first-weight 0"):
        OrthoConfig(first_weight=0.0).check()


def test_the_shipped_prompts_can_match_a_shorter_continuation(nonlinear_lm):
    """--extra-continuation N: on each shipped prompt the copies match θ0 along its first N tokens (and the same last
    prompt tokens), on the run's prompt along --continuation; the loss is the weighted sum of each prompt's own, packed
    or not, and the run records it."""
    from melbo.engines.config import shifted
    from melbo.engines.ortho import _Problem

    assert (shifted("last:20", 8), shifted("last:20", 0), shifted("last:3", 8), shifted("skip-first", 8), shifted("all", 4)) == (
        "last:12", "last:20", "last:1", "skip-first", "all")
    cfg = dict(source=1, target=4, continuation=4, extra_prompts=2, first_weight=0.8, completion_tokens=0, precision="float32")
    settings = OrthoConfig(**cfg, extra_continuation=2).resolved(float(base_vector().norm()), 32, 6)
    assert (settings.continuation, settings.extra_continuation, settings.positions) == (4, 2, "last:8")
    assert OrthoConfig().resolved(26.6, 576, 30).extra_continuation == 8  # fast mode's default: 8 of the run's 16
    assert OrthoConfig(**cfg).resolved(3.0, 32, 6).extra_continuation is None  # never more than the run's prompt's (None: the same)
    before = {"extra_prompts": 4, "continuation": 16}  # a run made before: every prompt along the run's continuation
    assert OrthoConfig().as_in_run(before).resolved(26.6, 576, 30).extra_continuation is None
    assert OrthoConfig(**{**cfg, "extra_prompts": 0}, extra_continuation=2).resolved(3.0, 32, 6).extra_continuation is None
    prompts = [PROMPT, *training_prompts(2, [PROMPT])]
    problem = _Problem(nonlinear_lm, prepare(nonlinear_lm, prompts, PromptFormat(), 1), settings, base_vector())
    assert [t.length - s.length for t, s in zip(problem.targets, problem.states)] == [4, 2, 2]
    assert [w.stop - w.start for w in problem.wheres] == [8, 6, 6] and all(w.stop == t.length for w, t in zip(problem.wheres, problem.targets))
    alone = dataclasses.replace(settings, extra_prompts=0, extra_continuation=None, penalty=0.0)
    each = [
        _Problem(nonlinear_lm, prepare(nonlinear_lm, [p], PromptFormat(), 1), dataclasses.replace(alone, continuation=n, positions=f"last:{4 + n}"), base_vector())
        for p, n in zip(prompts, (4, 2, 2))
    ]
    thetas = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    expected = 0.8 * each[0].losses(thetas) + 0.1 * (each[1].losses(thetas) + each[2].losses(thetas)) + settings.penalty * thetas.pow(2).sum(dim=-1)
    torch.testing.assert_close(problem.losses(thetas), expected, rtol=1e-4, atol=1e-6)
    problem.packing = None
    torch.testing.assert_close(problem.losses(thetas), expected, rtol=1e-4, atol=1e-6)
    run = ortho(nonlinear_lm, base_vector(), [PROMPT], OrthoConfig(**cfg, count=2, block=2, steps=2, extra_continuation=2))
    assert run.meta.config["extra_continuation"] == 2 and max_abs_cosine(run.vectors) <= 1e-5
    with pytest.raises(MelboError, match="--extra-continuation"):
        OrthoConfig(mode="seed", extra_continuation=2).check()


def test_a_warm_up_trains_on_the_runs_prompt_alone_then_on_every_prompt(nonlinear_lm, monkeypatch):
    """--warmup N: each block's first N evaluations (of --steps) train on the run's prompt alone, the rest on it and the
    shipped prompts; the loss of the warm-up is the run's prompt's own objective, and the block's evaluations add up."""
    from melbo.engines.ortho import _Problem

    calls: list[bool] = []
    original = _Problem.losses

    def spy(self, thetas, full=False, own_only=False):
        if thetas.requires_grad:  # an optimiser's evaluation (the judging afterwards runs without gradients)
            calls.append(own_only)
        return original(self, thetas, full, own_only)

    monkeypatch.setattr(_Problem, "losses", spy)
    cfg = dict(source=1, target=4, count=2, block=2, steps=7, continuation=2, extra_prompts=2, first_weight=0.8)
    run = ortho(nonlinear_lm, base_vector(), [PROMPT], OrthoConfig(**cfg, warmup=4))
    assert calls == [True] * 4 + [False] * 3 and run.meta.config["warmup"] == 4
    assert [r.steps for r in run.records[1:]] == [7, 7] and max_abs_cosine(run.vectors) <= 1e-5
    calls.clear()
    ortho(nonlinear_lm, base_vector(), [PROMPT], OrthoConfig(**cfg, warmup=50))  # at least one evaluation on every prompt
    assert calls == [True] * 6 + [False]
    calls.clear()
    ortho(nonlinear_lm, base_vector(), [PROMPT], OrthoConfig(**{**cfg, "extra_prompts": 0}, warmup=4))  # nothing to warm up for
    assert calls == [False] * 7

    monkeypatch.setattr(_Problem, "losses", original)
    settings = OrthoConfig(**cfg, warmup=4).resolved(float(base_vector().norm()), 32, 6)
    prompts = [PROMPT, *training_prompts(2, [PROMPT])]
    every = _Problem(nonlinear_lm, prepare(nonlinear_lm, prompts, PromptFormat(), 1), settings, base_vector())
    alone = _Problem(nonlinear_lm, prepare(nonlinear_lm, [PROMPT], PromptFormat(), 1), dataclasses.replace(settings, extra_prompts=0), base_vector())
    thetas = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(every.losses(thetas, own_only=True), alone.losses(thetas), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(every.losses(thetas), alone.losses(thetas))


def test_the_default_continuation_reaches_where_the_bases_behaviour_shows(nonlinear_lm, monkeypatch):
    """Fast mode matches θ0's first 16 tokens, or more when θ0's completion on the run's prompt takes its label later
    (through that token, at most 32); a given --continuation, seed mode and a resumed run keep theirs."""
    import melbo.engines.ortho as engine
    from melbo.engines.config import fast_continuation
    from melbo.output import tables

    assert [fast_continuation(n) for n in (None, 1, 13, 16, 26, 40)] == [16, 16, 16, 16, 26, 32]
    settings = OrthoConfig().resolved(26.6, 576, 30, shows_at=26)
    assert (settings.continuation, settings.positions) == (26, "last:30")
    assert OrthoConfig(continuation=8).resolved(26.6, 576, 30, shows_at=26).continuation == 8
    assert OrthoConfig(mode="seed").resolved(26.6, 576, 30, shows_at=26).continuation == 0
    assert OrthoConfig().as_in_run({"continuation": 16}).resolved(26.6, 576, 30, shows_at=26).continuation == 16

    lm, fmt = nonlinear_lm, PromptFormat()
    written = torch.arange(40, 88)  # θ0's completion, as if the model wrote it (a random tiny model stops at once)
    asked: list[int] = []

    def greedy(lm_, input_ids, vector, layer, tokens):
        asked.append(tokens)
        return written[:tokens]

    monkeypatch.setattr(engine, "greedy_tokens", greedy)
    shows = len(lm.tokenizer.decode(written[:24], skip_special_tokens=True))  # a "refusal" once the text is this long
    assert len(lm.tokenizer.decode(written[:23], skip_special_tokens=True)) < shows
    monkeypatch.setattr(engine, "label", lambda text: ("refusal", "") if len(text) >= shows else ("other", ""))
    assert engine.behaviour_shows_at(lm, PROMPT, base_vector(), 1, fmt) == 24 and asked == [48]  # the eval's length
    cfg = dict(source=1, target=4, count=2, block=2, steps=2, extra_prompts=0, completion_tokens=0)
    run = ortho(lm, base_vector(), [PROMPT], OrthoConfig(**cfg))
    assert (run.meta.config["continuation"], run.meta.config["positions"]) == (24, "last:28")
    assert "the copies matched θ0 along its first 24 greedy tokens" in str(tables.ortho_run(run)[-1])  # said where users read
    monkeypatch.setattr(engine, "label", lambda text: ("other", ""))  # no behaviour: the 16 tokens
    assert engine.behaviour_shows_at(lm, PROMPT, base_vector(), 1, fmt) is None
    assert ortho(lm, base_vector(), [PROMPT], OrthoConfig(**cfg)).meta.config["continuation"] == 16


def test_the_warm_up_alone_can_run_in_bfloat16(nonlinear_lm):
    """--warmup-precision bfloat16: the warm-up's evaluations run under autocast, those on every prompt after it in the
    run's float32; recorded only where there is a warm-up (None: as --precision)."""
    lm = nonlinear_lm
    seen: list[bool] = []

    def record(_module, args, _out):  # the test's own hook, removed below: the optimiser's forwards only
        if args[0].requires_grad:
            seen.append(torch.is_autocast_enabled("cpu"))

    handle = find_blocks(lm.model)[2].register_forward_hook(record)
    cfg = dict(source=1, target=4, count=2, block=2, steps=7, continuation=2, extra_prompts=2, first_weight=0.8, completion_tokens=0, precision="float32")
    try:
        run = ortho(lm, base_vector(), [PROMPT], OrthoConfig(**cfg, warmup=4, warmup_precision="bfloat16"))
    finally:
        handle.remove()
    assert seen[:4] == [True] * 4 and len(seen) > 4 and not any(seen[4:])
    assert run.meta.config["warmup_precision"] == "bfloat16" and run.meta.config["precision"] == "float32"
    assert max_abs_cosine(run.vectors.double()) <= 1e-5
    assert OrthoConfig(**cfg, warmup=4).resolved(26.6, 32, 6).warmup_precision is None  # as --precision
    assert OrthoConfig(**cfg, warmup=0, warmup_precision="bfloat16").resolved(26.6, 32, 6).warmup_precision is None  # no warm-up
    with pytest.raises(MelboError, match="--warmup-precision 'float16': use float32 or bfloat16"):
        OrthoConfig(warmup_precision="float16").check()


def test_the_warm_up_is_fast_modes_lbfgs_with_extra_prompts_only():
    """The default (kl, a chat template, its 4 extra prompts): 20 evaluations on the run's prompt, then 15 on every
    prompt, with kl-top too; none where there is nothing to warm up for, where it was not measured (other matches), or
    in a run made before it existed (its 30 evaluations on every prompt)."""

    def resolved(**kw):
        settings = OrthoConfig(**kw).resolved(26.6, 576, 30)
        return settings.warmup, settings.steps

    assert resolved() == (20, 35)
    assert resolved(warmup=5) == (5, 20) and resolved(warmup=5, steps=40) == (5, 40) and resolved(warmup=0) == (0, 30)
    assert resolved(warmup=5, extra_prompts=0) == (0, 30)  # the run's prompt alone throughout
    assert OrthoConfig().resolved(26.6, 576, 30, chat=False).warmup == 0  # raw prompts: no shipped ones by default
    assert resolved(match="kl-top") == (20, 35) and resolved(match="fisher") == (0, 30) and resolved(match="mean") == (0, 60) and resolved(match="mean", warmup=10) == (10, 70)
    assert resolved(mode="seed")[0] == 0 and resolved(optimizer="adam") == (0, 150)
    earlier = OrthoConfig().as_in_run({"extra_prompts": 4, "first_weight": 0.8}).resolved(26.6, 576, 30)  # a run made before it
    assert (earlier.warmup, earlier.steps) == (0, 30)
    for kw, message in [(dict(warmup=5, optimizer="adam"), "--warmup is a stage"), (dict(warmup=5, mode="seed"), "--warmup is a stage"), (dict(warmup=-1), "≥ 0")]:
        with pytest.raises(MelboError, match=message):
            OrthoConfig(**kw).check()


def test_the_continuation_reuses_the_base_text_already_generated_unless_it_stops_early(nonlinear_lm):
    """θ0's continuation on the run's prompt is the start of its longer greedy text (read once, for where its behaviour
    shows): the same ids and cached residual as a generation of its own; a text that ends within the continuation is
    not reused (the continuation never stops early)."""
    from melbo.model.forward import extend_with_continuation, greedy_tokens

    state = prepare(nonlinear_lm, [PROMPT], PromptFormat(), 1)[0]
    base = base_vector(6.0)
    longer = greedy_tokens(nonlinear_lm, state.ids, base, 1, 12)
    assert longer.shape[0] == 12  # no end-of-sequence in the tiny model's text
    alone = extend_with_continuation(nonlinear_lm, state, 1, base, 5)
    reused = extend_with_continuation(nonlinear_lm, state, 1, base, 5, known=longer)
    assert torch.equal(reused.ids, alone.ids)
    torch.testing.assert_close(reused.source, alone.source)
    eos = nonlinear_lm.model.generation_config.eos_token_id
    stops = torch.cat([longer[:2], torch.tensor([eos if isinstance(eos, int) else eos[0]]), longer[3:]])  # long enough, but ends
    assert torch.equal(extend_with_continuation(nonlinear_lm, state, 1, base, 5, known=stops).ids, alone.ids)


def test_fast_mode_matches_on_the_likeliest_tokens_where_the_vocabulary_is_large(char_tokenizer, tmp_path):
    """Fast mode's default objective is kl, and kl-top (the head on θ0's likeliest tokens) from KL_TOP_VOCAB tokens on:
    resolved from the model's LM head, recorded in the run, kept by a resume of a run made before (its own match), and
    overridden by --match; seed mode keeps the post's mean; kl where the logits are capped after the head (Gemma 2),
    which kl-top cannot run on."""
    from conftest import make_tiny_model

    from melbo.engines.config import KL_TOP_VOCAB, fast_match
    from melbo.model.loading import LoadedModel

    assert (fast_match(None), fast_match(49_152), fast_match(KL_TOP_VOCAB - 1), fast_match(KL_TOP_VOCAB), fast_match(262_144)) == (
        "kl", "kl", "kl", "kl-top", "kl-top")
    assert OrthoConfig().resolved(26.6, 576, 30, vocab=262_144).match == "kl-top"
    assert OrthoConfig().resolved(26.6, 576, 30, vocab=262_144).steps == 35  # the warm-up, measured with kl-top too
    assert OrthoConfig(match="kl").resolved(26.6, 576, 30, vocab=262_144).match == "kl"
    assert OrthoConfig(mode="seed").resolved(26.6, 576, 30, vocab=262_144).match == "mean"
    assert OrthoConfig().as_in_run({"match": "kl"}).resolved(26.6, 576, 30, vocab=262_144).match == "kl"

    model = make_tiny_model("llama", initializer_range=0.3)
    model.resize_token_embeddings(KL_TOP_VOCAB, mean_resizing=False)  # random rows; the character tokenizer uses the first 128 ids
    large = LoadedModel(model, char_tokenizer, "tiny-large-vocab", {"id": "tiny"})
    small = LoadedModel(make_tiny_model("llama", initializer_range=0.3), char_tokenizer, "tiny", {"id": "tiny"})
    assert (large.plain_head_vocab, small.plain_head_vocab) == (KL_TOP_VOCAB, 128)
    cfg = OrthoConfig(source=1, target=4, count=2, block=2, steps=4, completion_tokens=0, extra_prompts=0, continuation=2)
    for lm, match in ((large, "kl-top"), (small, "kl")):
        run = ortho(lm, base_vector(), [PROMPT], cfg, out=tmp_path / match)
        assert run.meta.config["match"] == match
        assert run.vectors.shape == (3, 32) and max_abs_cosine(run.vectors) <= 1e-5

    import transformers

    capped = transformers.Gemma2Config(vocab_size=KL_TOP_VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8, num_hidden_layers=6, final_logit_softcapping=30.0)
    gemma2 = LoadedModel(transformers.AutoModelForCausalLM.from_config(capped).eval().requires_grad_(False), char_tokenizer, "tiny-gemma2", {"id": "tiny"})
    assert gemma2.plain_head_vocab is None
    assert ortho(gemma2, base_vector(), [PROMPT], cfg, out=tmp_path / "capped").meta.config["match"] == "kl"


def test_fast_mode_lets_a_copy_that_stops_improving_leave_and_a_run_made_before_resumes_without_it():
    """--patience: fast mode's lbfgs default is FAST_PATIENCE; 0 in seed mode and with adam; a run whose run.json
    lacks it (made before it existed) resumes with 0, as it was made; a value given is kept."""
    from melbo.engines.config import FAST_PATIENCE

    assert OrthoConfig().resolved(26.6, 576, 30).patience == FAST_PATIENCE
    assert OrthoConfig(patience=0).resolved(26.6, 576, 30).patience == 0
    assert OrthoConfig(mode="seed").resolved(26.6, 576, 30).patience == 0
    assert OrthoConfig(optimizer="adam").resolved(26.6, 576, 30).patience == 0
    assert OrthoConfig().as_in_run({"match": "kl"}).resolved(26.6, 576, 30).patience == 0
    assert OrthoConfig().as_in_run({"patience": FAST_PATIENCE}).resolved(26.6, 576, 30).patience == FAST_PATIENCE
    assert OrthoConfig(patience=2).as_in_run({}).resolved(26.6, 576, 30).patience == 2


def test_compile_auto_is_on_for_long_fast_runs_where_a_compiler_is_found():
    size = dict(base_norm=26.6, d_model=576, n_layers=30)
    assert OrthoConfig().resolved(**size, can_compile=True).compiled  # the whole basis by default
    assert not OrthoConfig().resolved(**size).compiled  # no compiler at hand
    assert not OrthoConfig(count=32).resolved(**size, can_compile=True).compiled  # too short to pay for compiling
    assert OrthoConfig(count=32, compile="on").resolved(**size).compiled
    assert not OrthoConfig(compile="off").resolved(**size, can_compile=True).compiled
    assert not OrthoConfig(mode="seed", compile="on").resolved(**size, can_compile=True).compiled  # the post's algorithm, as written
    with pytest.raises(MelboError, match="--compile 'yes': use auto, on or off"):
        OrthoConfig(compile="yes").check()


def test_a_long_fast_run_trains_blocks_of_32_and_a_resume_keeps_the_runs_block():
    from melbo.engines.config import FAST_BLOCK, LONG_RUN, LONG_RUN_BLOCK

    size = dict(base_norm=26.6, d_model=576, n_layers=30)
    assert OrthoConfig().resolved(**size).block == LONG_RUN_BLOCK == 32  # the whole basis by default
    assert OrthoConfig(count=LONG_RUN).resolved(**size).block == LONG_RUN_BLOCK
    assert OrthoConfig(count=LONG_RUN - 1).resolved(**size).block == FAST_BLOCK == 16  # the demo's 32 copies
    assert OrthoConfig(count=50, block=8).resolved(**size).block == 8 and OrthoConfig(block=16).resolved(**size).block == 16
    assert OrthoConfig(mode="seed").resolved(**size).block == 1
    assert OrthoConfig().resolved(**size).stop_after_dropped == 32  # "a block" of dropped vectors ends the basis
    # a whole basis begun with blocks of 16 (before this default) goes on with them; a block given is the user's
    assert OrthoConfig().as_in_run({"block": 16}).resolved(**size).block == 16
    assert OrthoConfig(block=8).as_in_run({"block": 16}).block == 8


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_compiled_evaluation_is_the_eager_one(nonlinear_lm, precision):
    """compile on: the blocks after s and the KL compiled give an eager evaluation's losses and gradient (to rounding;
    bfloat16 products to their own rounding), and a run records that it compiled."""
    from melbo.engines.ortho import objective

    cfg = dict(source=1, target=4, count=4, block=4, match="kl", extra_prompts=0, precision=precision)
    thetas = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    results = []
    for compile in ("off", "on"):
        point = thetas.clone().requires_grad_(True)
        losses = objective(nonlinear_lm, base_vector(), [PROMPT], OrthoConfig(**cfg, compile=compile))(point)
        results.append((losses.detach(), torch.autograd.grad(losses.sum(), point)[0]))
    (eager, eager_grad), (compiled, compiled_grad) = results
    tolerance = 1e-4 if precision == "float32" else 2e-2
    torch.testing.assert_close(compiled, eager, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(compiled_grad, eager_grad, atol=tolerance * eager_grad.abs().max().item(), rtol=tolerance)
    assert not any("forward" in block.__dict__ for block in find_blocks(nonlinear_lm.model))  # the model as it was
    run = ortho(nonlinear_lm, base_vector(), [PROMPT], OrthoConfig(**cfg, steps=4, compile="on", completion_tokens=0))
    assert run.meta.config["compiled"] is True and len(run.vectors) == 5 and max_abs_cosine(run.vectors.double()) <= 1e-5


def test_a_run_whose_compilation_fails_goes_on_eagerly(tiny_lm, monkeypatch):
    import contextlib

    from torch._dynamo.exc import BackendCompilerFailed

    import melbo.engines.ortho as engine

    @contextlib.contextmanager
    def broken(_blocks):
        raise BackendCompilerFailed(lambda *a: None, RuntimeError("no C++ compiler"), None)
        yield

    monkeypatch.setattr(engine, "compiled_blocks", broken)
    cfg = dict(source=1, target=4, count=4, block=4, steps=3, completion_tokens=0, extra_prompts=0)
    with pytest.warns(UserWarning, match="torch.compile failed .BackendCompilerFailed.; the run goes on without it"):
        failed = ortho(tiny_lm, base_vector(), [PROMPT], OrthoConfig(**cfg, compile="on"))
    eager = ortho(tiny_lm, base_vector(), [PROMPT], OrthoConfig(**cfg, compile="off"))
    torch.testing.assert_close(failed.vectors, eager.vectors, atol=1e-6, rtol=1e-6)
