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
    "add_to_residual": "melbo.layers",
    "capture_residual": "melbo.layers",
    "find_blocks": "melbo.layers",
    "residual_after": "melbo.layers",
    "start_after": "melbo.layers",
    "stop_after": "melbo.layers",
    "LoadedModel": "melbo.models",
    "load_model": "melbo.models",
    "Run": "melbo.runs",
    "read_run": "melbo.runs",
    "write_run": "melbo.runs",
}

if TYPE_CHECKING:
    from melbo.layers import add_to_residual, capture_residual, find_blocks, residual_after, start_after, stop_after
    from melbo.models import LoadedModel, load_model
    from melbo.runs import Run, read_run, write_run


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'melbo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = [
    "LoadedModel",
    "MelboError",
    "Run",
    "add_to_residual",
    "capture_residual",
    "find_blocks",
    "load_model",
    "read_run",
    "residual_after",
    "start_after",
    "stop_after",
    "write_run",
]
