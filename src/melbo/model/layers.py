"""Where a model's decoder blocks are, and hooks on the residual stream between them.

This is the one module that knows how to find layers. Layer ``L`` means the residual stream after decoder
block ``L`` (blocks counted from 0), i.e. ``hidden_states[L + 1]`` of a Hugging Face forward pass with
``output_hidden_states=True`` (except for the last layer, whose ``hidden_states`` entry is normed).

Every hook is a context manager that removes itself on exit, also when the body raises::

    with add_to_residual(model, 8, theta), capture_residual(model, 16) as seen, stop_after(model, 16):
        model(input_ids)
    h16 = seen[16]          # (batch, seq, d_model), still attached to the autograd graph of theta
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from melbo.errors import MelboError

# Attribute paths of the decoder-block list in the model families transformers ships. The first one that
# exists and is a ModuleList wins; a guesser over named_modules() covers the rest.
BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 1/2, Phi, Phi-3, OLMo, SmolLM...
    "model.language_model.layers",  # Gemma 3 and other multimodal wrappers
    "model.model.layers",  # PEFT-style double wrapping
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom, CodeGen
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.layers",  # ChatGLM-style
    "transformer.blocks",  # MPT
    "layers",
)


def _get_path(obj: Any, path: str) -> Any:
    return functools.reduce(lambda o, name: getattr(o, name, None), path.split("."), obj)


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """Return the list of decoder blocks of a causal LM.

    Tries the known attribute paths of :data:`BLOCK_PATHS`, then the longest ``ModuleList`` whose
    length equals ``config.num_hidden_layers``.

    Raises:
        MelboError: naming the model class when no block list can be found.
    """
    for path in BLOCK_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        m for _, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers
    ]
    if n_layers and len(candidates) == 1:
        return candidates[0]
    raise MelboError(
        f"cannot find the decoder blocks of {type(model).__name__}: none of "
        f"{', '.join(BLOCK_PATHS)} is a list of layers; please open an issue naming this model class"
    )


def n_layers(model: nn.Module) -> int:
    """Number of decoder blocks, hence of residual-stream layers 0 … n-1."""
    return len(find_blocks(model))


def check_layer(model: nn.Module, layer: int, what: str = "layer") -> int:
    """Return ``layer`` if it names a block of ``model``, else raise a MelboError saying the range."""
    count = n_layers(model)
    if not isinstance(layer, int) or not 0 <= layer < count:
        raise MelboError(f"{what} {layer} is out of range: this model has layers 0 to {count - 1}")
    return layer


def _hidden(output: Any) -> Tensor:
    """The residual-stream tensor inside a block's output (a tensor, or a tuple whose first item is)."""
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output: Any, hidden: Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextlib.contextmanager
def add_to_residual(model: nn.Module, layer: int, vector: Tensor | Callable[[], Tensor]) -> Iterator[None]:
    """Add ``vector`` to the residual stream after block ``layer``, at every position.

    Args:
        model: a causal LM.
        layer: the block after which to add.
        vector: ``(d_model,)`` for the same vector on every row, or ``(batch, d_model)`` for one vector
            per batch row. Positions produced during ``generate`` (with a KV cache) get it too. A function
            returning the vector is called at every forward pass (a batch whose rows change as it decodes).
    """
    check_layer(model, layer)
    if isinstance(vector, Tensor) and vector.dim() not in (1, 2):
        raise MelboError(f"a steering vector must be (d_model,) or (batch, d_model), not {tuple(vector.shape)}")

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        hidden = _hidden(output)
        delta = (vector() if callable(vector) else vector).to(dtype=hidden.dtype, device=hidden.device)
        if delta.shape[-1] != hidden.shape[-1]:
            raise MelboError(f"a steering vector of width {delta.shape[-1]} for a residual stream of width {hidden.shape[-1]} (the model's d_model)")
        if delta.dim() == 2:
            if delta.shape[0] != hidden.shape[0]:
                raise MelboError(
                    f"{delta.shape[0]} steering vectors for a batch of {hidden.shape[0]} rows: give one per row"
                )
            delta = delta[:, None, :]
        return _with_hidden(output, hidden + delta)

    handle = find_blocks(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_residual(model: nn.Module, layers: int | Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """Record the residual stream after each of ``layers``; yields a dict filled during the forward pass.

    The tensors are kept as they are (on the graph), so a loss on them back-propagates.
    """
    wanted = [layers] if isinstance(layers, int) else list(layers)
    blocks = find_blocks(model)
    seen: dict[int, Tensor] = {}
    handles = []
    try:
        for layer in wanted:
            check_layer(model, layer)

            def hook(_module: nn.Module, _args: Any, output: Any, layer: int = layer) -> None:
                seen[layer] = _hidden(output)

            handles.append(blocks[layer].register_forward_hook(hook))
        yield seen
    finally:
        for handle in handles:
            handle.remove()


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass early; caught by :func:`stop_after`."""


@contextlib.contextmanager
def stop_after(model: nn.Module, layer: int) -> Iterator[None]:
    """End the forward pass right after block ``layer``: later blocks and the LM head never run.

    The model call inside the ``with`` returns nothing (the exception that stops it is swallowed on exit),
    so read what you need with :func:`capture_residual`. Code after the model call inside the same
    ``with`` body does not run.
    """
    check_layer(model, layer)

    def hook(_module: nn.Module, _args: Any, _output: Any) -> None:
        raise _StopForward

    handle = find_blocks(model)[layer].register_forward_hook(hook)
    try:
        yield
    except _StopForward:
        pass
    finally:
        handle.remove()


def lm_head(model: nn.Module) -> nn.Linear:
    """The LM head, where the logits are exactly ``h Wᵀ`` of the final hidden state ``h`` (after the final norm).

    Raises MelboError otherwise (a bias, or logits capped or rescaled after the head)."""
    output_embeddings: Any = getattr(model, "get_output_embeddings", None)
    head = output_embeddings() if output_embeddings is not None else None
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise MelboError(f"{type(model).__name__}: its LM head is not a plain linear map; use --match kl")
    config: Any = getattr(model, "config", None)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    if getattr(config, "final_logit_softcapping", None) or any(getattr(config, name, None) not in (None, 1) for name in ("logit_scale", "logits_scaling")):
        raise MelboError(f"{type(model).__name__} rescales or caps its logits after the head; use --match kl")
    return head


@contextlib.contextmanager
def head_skipped(model: nn.Module) -> Iterator[None]:
    """While inside, the LM head (:func:`lm_head`) passes its input through: the model's ``logits`` are the final
    hidden states ``(B, T, d)``."""
    head = lm_head(model)

    def passthrough(hidden_states: Tensor) -> Tensor:
        return hidden_states

    try:
        head.__dict__["forward"] = passthrough  # an instance attribute shadows the class's forward; deleting it restores it
        yield
    finally:
        head.__dict__.pop("forward", None)


@contextlib.contextmanager
def start_after(model: nn.Module, layer: int, residual: Tensor) -> Iterator[None]:
    """Skip blocks 0 … ``layer``: the forward pass takes ``residual`` as the output of block ``layer``.

    Used to avoid recomputing the unchanged early layers when only the residual after ``layer`` varies
    (MELBO adds its vector there). ``residual`` must be ``(batch, seq, d_model)`` matching the input ids
    passed to the model; the embeddings are still looked up (cheap) but their result is discarded.
    Runs without a KV cache (pass ``use_cache=False``).
    """
    check_layer(model, layer)
    blocks = find_blocks(model)
    template = _output_template(model)

    def skipped(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        return _as_block_output(template, hidden_states)

    def replaced(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        return _as_block_output(template, residual.to(hidden_states.dtype))

    try:
        for index in range(layer + 1):
            # An instance attribute shadows the class's forward; deleting it restores the original.
            blocks[index].forward = replaced if index == layer else skipped
        yield
    finally:
        for index in range(layer + 1):
            blocks[index].__dict__.pop("forward", None)


def _as_block_output(template: int, hidden: Tensor) -> Any:
    return hidden if template == 0 else (hidden, *([None] * (template - 1)))


_BLOCK_OUTPUT: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()  # per model, without touching it


def _output_template(model: nn.Module) -> int:
    """0 when a block returns a tensor, else the length of the tuple it returns (found once, cached)."""
    cached = _BLOCK_OUTPUT.get(model)
    if cached is not None:
        return cached
    found: list[int] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        found.append(len(output) if isinstance(output, tuple) else 0)

    handle = find_blocks(model)[0].register_forward_hook(hook)
    try:
        with stop_after(model, 0), torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model_device(model)), use_cache=False)
    finally:
        handle.remove()
    _BLOCK_OUTPUT[model] = found[0]
    return found[0]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def residual_after(
    model: nn.Module,
    layer: int,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    steer: tuple[int, Tensor] | None = None,
) -> Tensor:
    """Residual stream after block ``layer`` for ``input_ids``, computing no block beyond it.

    Args:
        steer: optional ``(source_layer, vector)`` added with :func:`add_to_residual` first.
    """
    with contextlib.ExitStack() as stack:
        if steer is not None:
            stack.enter_context(add_to_residual(model, steer[0], steer[1]))
        seen = stack.enter_context(capture_residual(model, layer))
        stack.enter_context(stop_after(model, layer))
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return seen[layer]
