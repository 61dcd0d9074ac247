"""The shell and Python share one set of defaults: every option that sets a config field shows that field's default."""

from __future__ import annotations

import dataclasses

import pytest
import typer.main
from helpers import melbo_here

from melbo.analysis.config import ComposeConfig, EvalConfig, GenerateConfig, ProbeConfig
from melbo.analysis.judge import JudgeConfig
from melbo.cli import app
from melbo.engines.config import DiscoverConfig, OrthoConfig
from melbo.serve.limits import ServeLimits

RENAMED = {"power": "p", "root": "q", "k": "ks"}  # `-p` is a prompt everywhere; MELBO's p and q are --power and --root
NOT_CONFIG = {
    "discover": {"calibrate", "radii"}, "ortho": {"index", "source", "target", "prompt_set"},
    "eval": {"index", "show", "prompt_set", "labels", "judge", "concept", "concepts"},
}
NOT_SETTABLE = {"eval": {"top_k"}, "serve": {"max_prompt_tokens", "max_body_bytes", "window"}}  # fixed for the command line


def command(name: str):
    group = typer.main.get_command(app)
    return group.commands[name]  # type: ignore[attr-defined]


def shown(value):
    """An option's default as the config holds it (--k shows the list of k as text)."""
    return [int(k) for k in value.split(",")] if isinstance(value, str) and value.replace(",", "").isdigit() else value


@pytest.mark.parametrize("name, config, prefix", [
    ("discover", DiscoverConfig, ""), ("ortho", OrthoConfig, ""), ("eval", EvalConfig, ""), ("compose", ComposeConfig, ""),
    ("probe", ProbeConfig, ""), ("serve", ServeLimits, ""), ("judge", JudgeConfig, "judge_"), ("eval", JudgeConfig, "judge_"),
    ("generate", GenerateConfig, ""),
])
def test_option_defaults_are_the_config_defaults(name, config, prefix):
    fields = {f.name: f for f in dataclasses.fields(config)}
    defaults = config()
    checked = set()
    for param in command(name).params:
        field = RENAMED.get(param.name, param.name).removeprefix(prefix)
        if field in fields and param.name not in NOT_CONFIG.get(name, set()) and param.name.startswith(prefix):
            assert shown(param.default) == getattr(defaults, field), f"melbo {name} --{param.name}"
            checked.add(field)
    if config is JudgeConfig:  # the options the judge's command line offers, each with the config's default
        assert checked == {"model", "key_env", "concurrency", "timeout"}, checked
        return
    settable = set(fields) - NOT_SETTABLE.get(name, set())
    missing = settable - checked - ({"source", "target"} if name == "ortho" else set())
    assert not missing, f"melbo {name} has no option for {sorted(missing)}"


def test_p_is_always_a_prompt():
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        for param in cmd.params:
            if "-p" in getattr(param, "opts", []):
                assert param.name == "prompt", f"melbo {name}: -p is {param.name}"


@pytest.mark.parametrize("name, config", [
    ("discover", DiscoverConfig), ("ortho", OrthoConfig), ("eval", EvalConfig), ("probe", ProbeConfig), ("serve", ServeLimits),
    ("generate", GenerateConfig),
])
def test_described_fields_are_options_with_the_configs_help_and_flags(name, config):
    """A config field made with `setting` is an option of its command: its help, its flags, its default, its minimum."""
    from melbo.setting import described

    params = {p.name: p for p in command(name).params}
    for field in described(config):
        param = params[field.name]
        assert param.help == field.metadata["help"], f"melbo {name} --{field.name}"
        assert set(field.metadata["flags"] or [f"--{field.name.replace('_', '-')}"]) <= set(param.opts)
        assert str(param.default) == str(field.default)
        if field.metadata["minimum"] is not None:  # refused as the command line is parsed, before anything runs
            below = field.metadata["minimum"] - 1
            result = melbo_here(name, *(["x"] if name not in ("discover", "generate") else []), param.opts[0], str(below))
            assert result.returncode == 2 and f"Invalid value for '{param.opts[0]}'" in result.stderr, result.stderr
