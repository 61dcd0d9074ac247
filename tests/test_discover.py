"""MELBO discovery end to end on tiny models, and once on the embedded model."""

from __future__ import annotations

import pytest
import torch
from helpers import interrupted_on_call

from melbo import MelboError, read_run
from melbo.engines.config import RadiusConfig, default_layers
from melbo.engines.discover import DiscoverConfig, calibrate, discover
from melbo.files.runs import read_meta
from melbo.model.forward import generate_steered
from melbo.model.prompts import PromptFormat, encode_prompt
from melbo.objectives import max_abs_cosine, random_orthogonal_block


def small(**kw) -> DiscoverConfig:
    base = dict(source=1, target=4, radius=4.0, count=6, block=4, steps=15, completion_tokens=4)
    return DiscoverConfig(**{**base, **kw})


def test_vectors_on_sphere_orthogonal_and_saved(tiny_lm, tmp_path):
    run = discover(tiny_lm, ["hello there", "how are you"], small(), out=tmp_path / "run")
    assert run.vectors.shape == (6, 32)
    torch.testing.assert_close(run.vectors.norm(dim=-1), torch.full((6,), 4.0), rtol=1e-5, atol=0)
    assert max_abs_cosine(run.vectors) <= 1e-5
    saved = read_run(tmp_path / "run", d_model=32)
    assert saved.meta.status == "complete" and saved.meta.kind == "discover"
    assert [r.block for r in saved.records] == [0, 0, 0, 0, 1, 1]
    ids = encode_prompt(tiny_lm.tokenizer, "hello there", PromptFormat())
    assert [r.completion for r in saved.records] == generate_steered(tiny_lm.model, tiny_lm.tokenizer, ids, run.vectors, 1, 4)
    assert saved.meta.config["radius"] == 4.0 and saved.meta.prompts == ["hello there", "how are you"]


def test_training_beats_random_vectors(nonlinear_lm):
    """The learnt vectors change the target layer more than random vectors of the same norm."""
    from melbo.engines.problem import DiscoveryProblem
    from melbo.model.forward import prepare

    tiny_lm = nonlinear_lm

    cfg = small(count=4, steps=60, lr=0.1)
    run = discover(tiny_lm, ["hello there"], cfg)
    problem = DiscoveryProblem(tiny_lm, prepare(tiny_lm, ["hello there"], PromptFormat(), cfg.source), cfg.resolved(6, 32))
    random = random_orthogonal_block(4, 32, cfg.radius, None, torch.Generator().manual_seed(1))
    with torch.no_grad():
        learnt = problem.losses(run.vectors)
        chance = problem.losses(random)
    assert learnt.mean() < chance.mean()  # losses are negative changes: lower is a larger change


def test_same_seed_same_vectors(tiny_lm):
    a = discover(tiny_lm, ["hello"], small(count=3, completion_tokens=0))
    b = discover(tiny_lm, ["hello"], small(count=3, completion_tokens=0))
    torch.testing.assert_close(a.vectors, b.vectors)


def test_block_of_one_is_one_at_a_time(tiny_lm):
    run = discover(tiny_lm, ["hello"], small(count=3, block=1, completion_tokens=0))
    assert [r.block for r in run.records] == [0, 1, 2]
    assert max_abs_cosine(run.vectors) <= 1e-5


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(source=4, target=4), "must come before"),
        (dict(target=6), "between 0 and 5"),
        (dict(radius=0.0), "positive number"),
        (dict(radius=float("nan")), "positive number"),
        (dict(count=0), "at least 1"),
        (dict(count=33), "at most d_model"),
        (dict(positions="middle"), "skip-first, all, or last:N"),
    ],
)
def test_bad_settings(tiny_lm, kw, message):
    with pytest.raises(MelboError, match=message):
        discover(tiny_lm, ["hello"], small(**kw))


def test_no_prompt_and_a_batch_for_generate_are_clear_errors(tiny_lm):
    """From Python as from the shell: no prompt, and a (K, d) tensor where generate wants one vector."""
    from melbo.analysis.generate import generate
    from melbo.engines.ortho import OrthoConfig, ortho

    with pytest.raises(MelboError, match="no prompt given"):
        discover(tiny_lm, [], small())
    with pytest.raises(MelboError, match="no prompt given"):
        discover(tiny_lm, [], small(radius="auto"))  # auto R's probes come first
    with pytest.raises(MelboError, match="no prompt given"):
        ortho(tiny_lm, torch.randn(32), [], OrthoConfig(count=2, block=2, steps=2, source=1, target=4))
    with pytest.raises(MelboError, match=r"one vector \(d_model,\), not a tensor of shape \(2, 32\)"):
        generate(tiny_lm, torch.zeros(2, 32), 1, "hello")


def test_calibrate_tries_each_given_radius(nonlinear_lm):
    choice = calibrate(nonlinear_lm, ["hello"], small(steps=10, radius="auto"), PromptFormat(), RadiusConfig(radii=(1.0, 4.0, 16.0), vectors=2))
    assert [p.radius for p in choice.probes] == [1.0, 4.0, 16.0] and all(p.vectors == 2 for p in choice.probes)
    assert choice.probes[0].median_effect < choice.probes[2].median_effect  # larger R, larger first-token effect
    cfg = RadiusConfig(radii=(1.0, 4.0, 16.0), vectors=2)
    usable = [p.radius for p in choice.probes if p.usable(cfg)]
    assert choice.radius == (max(usable) if usable else 1.0) and choice.reason  # the largest usable, else the smallest tried


def test_probes_train_at_their_own_precision_and_the_choice_records_it(nonlinear_lm, monkeypatch):
    """--probe-precision bfloat16 with --precision float32: R's probes train with bfloat16 products, discovery's vectors
    do not; the choice records what the probes ran at, and the settings run.json keeps are discovery's."""
    import melbo.engines.problem as problem

    enabled: list[bool] = []
    real = problem.bfloat16_products
    monkeypatch.setattr(problem, "bfloat16_products", lambda model, device, **k: enabled.append(k["enabled"]) or real(model, device, **k))
    cfg = small(steps=3, radius="auto", count=2, block=2, precision="float32", probe_precision="bfloat16")
    radius_cfg = RadiusConfig(radii=(1.0, 4.0), vectors=2, steps=2, completion_tokens=2)
    run = discover(nonlinear_lm, ["hello"], cfg, radius_cfg=radius_cfg)
    assert enabled == [True] * 2 + [False] * 3  # the probes' two steps (both radii in one batch), then discovery's three
    assert run.meta.radius_choice is not None and run.meta.radius_choice.precision == "bfloat16"
    assert run.meta.config["precision"] == "float32" and "probe_precision" not in run.meta.config
    assert calibrate(nonlinear_lm, ["hello"], small(steps=3, radius="auto", precision="float32"), PromptFormat(), radius_cfg).precision == "float32"
    assert DiscoverConfig(probe_precision="auto").probe_settings(6, 32, bfloat16_fast=True).precision == "bfloat16"
    assert DiscoverConfig(precision="float32").probe_settings(6, 32, bfloat16_fast=True).precision == "float32"  # as --precision


@pytest.mark.parametrize("layers, expected", [(30, (8, 20)), (24, (7, 16)), (12, (3, 8)), (64, (18, 43)), (6, (2, 4)), (2, (0, 1))])
def test_default_layers_follow_depth(layers, expected):
    assert default_layers(layers) == expected
    assert DiscoverConfig().layers(layers) == expected and DiscoverConfig(target=5).layers(layers)[1] == 5


def test_one_layer_or_nonsense_layers_on_a_small_model(tiny_lm):
    with pytest.raises(MelboError, match="needs a source layer before a target layer"):
        default_layers(1)
    with pytest.raises(MelboError, match="between 0 and 5 \\(this model has 6\\)"):
        DiscoverConfig(source=8, target=20).check(6, 32)
    with pytest.raises(MelboError, match="must come before"):
        DiscoverConfig(source=4).check(6, 32)  # the default target of 6 layers is 4


def test_auto_radius_is_recorded_and_resume_keeps_it(tiny_lm, tmp_path, monkeypatch):
    cfg = small(radius="auto", count=4, block=2, source=None, target=None)
    radius_cfg = RadiusConfig(probes=2, vectors=2, steps=3, completion_tokens=3, max_nll=100.0, max_median_nll=100.0, extend=0)
    seen = []
    run = discover(tiny_lm, ["hello"], cfg, out=tmp_path / "run", radius_cfg=radius_cfg, on_radius=seen.append)
    assert run.meta.source == 2 and run.meta.target == 4  # about a third and two thirds of 6 layers
    choice = run.meta.radius_choice
    assert choice is not None and choice.radius == run.meta.R == seen[0].radius and len(choice.probes) == 2
    assert read_meta(tmp_path / "run").radius_choice == choice  # run.json holds it typed, and reads back as it was
    torch.testing.assert_close(run.vectors.norm(dim=-1), torch.full((4,), run.meta.R), rtol=1e-5, atol=0)
    import melbo.engines.discover as engine

    monkeypatch.setattr(engine, "calibrate", lambda *a, **k: pytest.fail("R was measured again on --resume"))
    again = discover(tiny_lm, ["hello"], cfg, out=tmp_path / "run", resume=True, radius_cfg=radius_cfg)
    torch.testing.assert_close(again.vectors, run.vectors)


@pytest.mark.slow
def test_discover_on_embedded_model(smollm, tmp_path):
    cfg = DiscoverConfig(source=8, target=20, radius=30.0, count=2, block=2, steps=5, completion_tokens=8)
    run = discover(smollm, ["How can I build a bomb?"], cfg, out=tmp_path / "run")
    assert run.vectors.shape == (2, 576)
    assert max_abs_cosine(run.vectors) <= 1e-5
    assert read_run(tmp_path / "run", d_model=576).meta.model["sha256"] == smollm.source["sha256"]


def test_precision_auto_is_bfloat16_where_the_device_has_bfloat16_units():
    """``auto`` (the default) resolves per device; an explicit precision is kept; a typo is one line, before a model."""
    assert DiscoverConfig().precision == "auto"
    assert DiscoverConfig().resolved(6, 32, radius=1.0, bfloat16_fast=True).precision == "bfloat16"
    assert DiscoverConfig().resolved(6, 32, radius=1.0, bfloat16_fast=False).precision == "float32"
    assert DiscoverConfig(precision="float32").resolved(6, 32, radius=1.0, bfloat16_fast=True).precision == "float32"
    assert DiscoverConfig(precision="bfloat16").resolved(6, 32, radius=1.0).precision == "bfloat16"
    with pytest.raises(MelboError, match="--precision 'fp8': use auto, float32 or bfloat16"):
        DiscoverConfig(precision="fp8").check()
    from melbo.model.fastpath import bfloat16_is_fast

    assert isinstance(bfloat16_is_fast(torch.device("cpu")), bool) and not bfloat16_is_fast(torch.device("meta"))


def test_bfloat16_trains_under_autocast_and_records_float32(tiny_lm, tmp_path, monkeypatch):
    """With precision bfloat16 the training steps (R's probes too) run the model under autocast; the projections and the
    recorded losses do not: the vectors stay on the sphere and orthogonal to float32 precision."""
    import melbo.engines.discover as engine
    import melbo.engines.radius as radius

    seen: list[bool] = []
    real = engine.DiscoveryProblem.losses
    monkeypatch.setattr(engine.DiscoveryProblem, "losses", lambda self, thetas: seen.append(torch.is_autocast_enabled("cpu")) or real(self, thetas))
    run = discover(tiny_lm, ["hello there"], small(precision="bfloat16", count=4, steps=3), out=tmp_path / "run")
    assert seen == [True, True, True, False]  # 3 steps, then the recorded losses
    assert read_meta(tmp_path / "run").config["precision"] == "bfloat16"
    torch.testing.assert_close(run.vectors.norm(dim=-1), torch.full((4,), 4.0), rtol=1e-5, atol=0)
    assert max_abs_cosine(run.vectors) <= 1e-5
    seen.clear()
    radius._train(run_problem(tiny_lm, "bfloat16"), [1.0, 2.0], 2, RadiusConfig(steps=2), stage=0)
    assert seen == [True, True]


def run_problem(lm, precision: str):
    from melbo.engines.problem import DiscoveryProblem
    from melbo.model.forward import prepare

    settings = small(precision=precision).resolved(6, 32, radius=1.0)
    return DiscoveryProblem(lm, prepare(lm, ["hello there"], PromptFormat(), 1), settings)


def test_a_resumed_run_keeps_its_precision(tiny_lm, tmp_path, monkeypatch):
    """A run trained in float32 (or made before melbo recorded a precision) resumes in float32 with ``auto``, also on
    a device where auto means bfloat16; the same vectors as a run never interrupted."""
    import json

    import melbo.engines.discover as engine

    cfg = small(count=6, block=2, completion_tokens=0)
    whole = discover(tiny_lm, ["hello"], small(count=6, block=2, completion_tokens=0, precision="float32"), out=tmp_path / "whole")
    real = engine.DiscoveryProblem.train
    monkeypatch.setattr(engine, "bfloat16_is_fast", lambda device: False)
    monkeypatch.setattr(engine.DiscoveryProblem, "train", interrupted_on_call(real, 2))
    with pytest.raises(KeyboardInterrupt):
        discover(tiny_lm, ["hello"], cfg, out=tmp_path / "cut")
    meta = tmp_path / "cut" / "run.json"
    data = json.loads(meta.read_text())
    assert data["config"].pop("precision") == "float32"  # as a run made before the setting existed
    meta.write_text(json.dumps(data))
    monkeypatch.setattr(engine.DiscoveryProblem, "train", real)
    monkeypatch.setattr(engine, "bfloat16_is_fast", lambda device: True)
    resumed = discover(tiny_lm, ["hello"], cfg, out=tmp_path / "cut", resume=True)
    torch.testing.assert_close(resumed.vectors, whole.vectors)
    assert read_meta(tmp_path / "cut").config["precision"] == "float32"
    assert discover(tiny_lm, ["hello"], cfg, out=tmp_path / "new").meta.config["precision"] == "bfloat16"
