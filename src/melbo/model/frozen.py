"""A model you loaded yourself, run as melbo needs it and handed back as it was.

``load_model`` returns a model in eval mode with no parameter gradients. A model built elsewhere and wrapped in a
:class:`~melbo.model.loading.LoadedModel` (``LoadedModel(AutoModelForCausalLM.from_pretrained(...), tokenizer,
"name")``) usually has neither: ``from_pretrained`` leaves every parameter requiring a gradient, and a model being
fine-tuned is in training mode. Then each optimisation step of ``discover`` or ``ortho`` also computed the gradient of
every weight it ran through and left it in the model's ``.grad`` (SmolLM2-135M from ``from_pretrained``: 162 MiB kept
after a small discovery, which took 1.15× as long), and dropout made every forward pass random. :func:`frozen`
switches both off for the duration of a call and restores them, also on an exception, as melbo's hooks remove
themselves; :func:`runs_frozen` applies it to an API function whose first argument is the model.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import torch

from melbo.model.loading import LoadedModel

P = ParamSpec("P")
R = TypeVar("R")


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode with no parameter requiring a gradient inside the block; each module's mode and each
    parameter's flag as they were after it."""
    training = [(module, module.training) for module in model.modules()]
    grads = [(param, param.requires_grad) for param in model.parameters()]
    if not any(mode for _, mode in training) and not any(flag for _, flag in grads):
        yield  # as load_model leaves it: nothing to switch
        return
    model.eval()
    model.requires_grad_(False)
    try:
        yield
    finally:
        for module, mode in training:
            module.training = mode
        for param, flag in grads:
            param.requires_grad_(flag)


def runs_frozen(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn(lm, ...)`` run with ``lm.model`` :func:`frozen`."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        lm = args[0] if args else kwargs.get("lm")
        if not isinstance(lm, LoadedModel):
            return fn(*args, **kwargs)
        with frozen(lm.model):
            return fn(*args, **kwargs)

    return wrapper
