"""The shell and Python share one set of defaults: every option that sets a config field shows that field's default."""

from __future__ import annotations

import dataclasses

import pytest
import typer.main

from melbo.analysis.config import EvalConfig
from melbo.cli import app
from melbo.engines.config import DiscoverConfig, OrthoConfig

RENAMED = {"power": "p", "root": "q"}  # `-p` is a prompt everywhere; MELBO's p and q are --power and --root
NOT_CONFIG = {"discover": {"calibrate", "radii"}, "ortho": {"index", "source", "target"}, "eval": {"index", "show", "prompt_set", "labels"}}


def command(name: str):
    group = typer.main.get_command(app)
    return group.commands[name]  # type: ignore[attr-defined]


@pytest.mark.parametrize("name, config", [("discover", DiscoverConfig), ("ortho", OrthoConfig), ("eval", EvalConfig)])
def test_option_defaults_are_the_config_defaults(name, config):
    fields = {f.name: f for f in dataclasses.fields(config)}
    defaults = config()
    checked = set()
    for param in command(name).params:
        field = RENAMED.get(param.name, param.name)
        if field in fields and param.name not in NOT_CONFIG.get(name, set()):
            assert param.default == getattr(defaults, field), f"melbo {name} --{param.name}"
            checked.add(field)
    settable = {f for f in fields if f not in ("top_k",)}
    missing = settable - checked - ({"source", "target"} if name == "ortho" else set())
    assert not missing, f"melbo {name} has no option for {sorted(missing)}"


def test_p_is_always_a_prompt():
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        for param in cmd.params:
            if "-p" in getattr(param, "opts", []):
                assert param.name == "prompt", f"melbo {name}: -p is {param.name}"
