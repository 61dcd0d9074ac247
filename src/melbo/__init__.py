"""melbo: find steering vectors in language models without supervision, and study them.

Layer numbering (used everywhere in melbo): layer ``L`` is the residual stream *after* decoder block ``L``,
blocks counted from 0. It is ``model(..., output_hidden_states=True).hidden_states[L + 1]`` for every layer
but the last (whose ``hidden_states`` entry has the final norm applied). "Add a vector at layer 8, read
layer 16" therefore means: add it to the output of block 8 and read the output of block 16, as in the
MELBO and MELBO-ortho posts (TransformerLens' ``blocks.8.hook_resid_post``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from melbo.errors import MelboError

__version__ = "0.1.0"

# The public names live in submodules that import torch (about a second). They load on first use, so
# `melbo --help` and a mistyped option answer at once.
_WHERE = {
    "add_to_residual": "melbo.model.layers",
    "capture_residual": "melbo.model.layers",
    "find_blocks": "melbo.model.layers",
    "residual_after": "melbo.model.layers",
    "start_after": "melbo.model.layers",
    "stop_after": "melbo.model.layers",
    "LoadedModel": "melbo.model.loading",
    "load_model": "melbo.model.loading",
    "PromptFormat": "melbo.model.prompts",
    "DiscoverConfig": "melbo.engines.config",
    "OrthoConfig": "melbo.engines.config",
    "discover": "melbo.engines.discover",
    "ortho": "melbo.engines.ortho",
    "EvalConfig": "melbo.analysis.config",
    "GenerateConfig": "melbo.analysis.config",
    "generate": "melbo.analysis.generate",
    "evaluate": "melbo.analysis.evaluate",
    "Run": "melbo.files.runs",
    "RunMeta": "melbo.files.runs",
    "read_run": "melbo.files.runs",
    "write_run": "melbo.files.runs",
    "Study": "melbo.study.spec",
    "run_study": "melbo.study.pipeline",
}

if TYPE_CHECKING:
    from melbo.analysis.config import EvalConfig, GenerateConfig
    from melbo.analysis.evaluate import evaluate
    from melbo.analysis.generate import generate
    from melbo.engines.config import DiscoverConfig, OrthoConfig
    from melbo.engines.discover import discover
    from melbo.engines.ortho import ortho
    from melbo.files.runs import Run, RunMeta, read_run, write_run
    from melbo.model.layers import add_to_residual, capture_residual, find_blocks, residual_after, start_after, stop_after
    from melbo.model.loading import LoadedModel, load_model
    from melbo.model.prompts import PromptFormat
    from melbo.study.pipeline import run_study
    from melbo.study.spec import Study


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'melbo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = [
    "DiscoverConfig",
    "EvalConfig",
    "GenerateConfig",
    "LoadedModel",
    "MelboError",
    "OrthoConfig",
    "PromptFormat",
    "Run",
    "RunMeta",
    "Study",
    "add_to_residual",
    "capture_residual",
    "discover",
    "evaluate",
    "find_blocks",
    "generate",
    "load_model",
    "ortho",
    "read_run",
    "residual_after",
    "run_study",
    "start_after",
    "stop_after",
    "write_run",
]
