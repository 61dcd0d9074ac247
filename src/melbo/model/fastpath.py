"""Context managers that change how fast a forward pass runs, never what it computes (beyond rounding).

Both were found by profiling a MELBO-ortho step on a CPU (bench/utilisation.py, bench/RESULTS.md):

* :func:`contiguous_head_input` — transformers slices the final hidden states to the positions whose logits are kept
  (``logits_to_keep``), a strided view; ``nn.Linear`` on a strided 3-D input takes the batched-matmul path with the
  weight expanded per row, forward and backward. On SmolLM2's 49k-token head that was 2.5× slower than one matrix
  product over the flattened rows (0.68 s against 0.27 s for a block of 16 rows × 20 positions, with its backward).
* :func:`bfloat16_products` — autocast (the matrix products in bfloat16 on float32 weights) with the attention
  kernel kept in float32: PyTorch's CPU flash-attention backward is about 7× slower in bfloat16 than in float32
  (33 ms against 5 ms a layer), which ate most of what bfloat16 products save.

Like every hook in melbo they restore the model on exit, also when the body raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

FLOAT32_SDPA = "melbo_float32_sdpa"  # the attention function registered with transformers by float32_attention


@contextlib.contextmanager
def contiguous_head_input(model: nn.Module) -> Iterator[None]:
    """While inside, the output embeddings (the LM head) read a contiguous copy of their input. Nothing else changes:
    the same product, over the same rows."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        yield
        return

    def contiguous(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if args and isinstance(args[0], Tensor) and not args[0].is_contiguous():
            return (args[0].contiguous(), *args[1:])
        return None

    handle = head.register_forward_pre_hook(contiguous)
    try:
        yield
    finally:
        handle.remove()


def _in_float32(attention: Callable[..., tuple[Tensor, Any]]) -> Callable[..., tuple[Tensor, Any]]:
    """``attention`` (a transformers attention function) computed in float32 whatever autocast says, its output in the
    inputs' dtype."""

    def computed(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, Any]:
        dtype = query.dtype
        mask = attention_mask.float() if attention_mask is not None and attention_mask.is_floating_point() else attention_mask
        with torch.autocast(query.device.type, enabled=False):
            out, weights = attention(module, query.float(), key.float(), value.float(), mask, **kwargs)
        return out.to(dtype), weights

    return computed


def _registered() -> bool:
    """Register :data:`FLOAT32_SDPA` with transformers (once): the SDPA attention in float32, with SDPA's masks.
    False where this transformers has no attention interface (nothing to switch)."""
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return False
    if FLOAT32_SDPA not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(FLOAT32_SDPA, _in_float32(ALL_ATTENTION_FUNCTIONS["sdpa"]))
    if FLOAT32_SDPA not in ALL_MASK_ATTENTION_FUNCTIONS:  # the masks SDPA gets (without, transformers would build none)
        ALL_MASK_ATTENTION_FUNCTIONS.register(FLOAT32_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return True


@contextlib.contextmanager
def float32_attention(model: nn.Module) -> Iterator[bool]:
    """While inside, a model that uses transformers' SDPA attention computes it in float32 (under autocast too); yields
    whether it switched. Other attention implementations (eager, flash) and models without ``config`` are left as they
    are. The model's own setting is restored on exit."""
    config: Any = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" or not _registered():
        yield False
        return
    config._attn_implementation = FLOAT32_SDPA
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"


@contextlib.contextmanager
def bfloat16_products(model: nn.Module, device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Autocast to bfloat16 on ``device`` (the model's matrix products in bfloat16, on its float32 weights); on a CPU
    with the attention kernel in float32 (:func:`float32_attention`; a GPU's bfloat16 attention is fast). Nothing at all
    when not ``enabled``."""
    if not enabled:
        yield
        return
    with torch.autocast(device.type, dtype=torch.bfloat16), float32_attention(model) if device.type == "cpu" else contextlib.nullcontext():
        yield


SOFTWARE_BFLOAT16 = (  # measured: bench/RESULTS.md, discovery_speed on the AVX2 EPYC
    "bfloat16 products on a device without bfloat16 units (on a CPU: no AVX512-BF16 or AMX) are converted in software: "
    "about 36× slower than float32 (a 16-row discovery step 30.4 s against 0.85 s on a 2-core AVX2 EPYC); "
    "--precision auto runs float32 here"
)


def slow_bfloat16(device: torch.device, *precisions: str | None) -> str | None:
    """:data:`SOFTWARE_BFLOAT16` when one of ``precisions`` (as a user set them: auto, float32, bfloat16 or None) asks
    for bfloat16 products on ``device`` and it has no bfloat16 units; else None."""
    return SOFTWARE_BFLOAT16 if "bfloat16" in precisions and not bfloat16_is_fast(device) else None


def bfloat16_is_fast(device: torch.device) -> bool:
    """Whether ``device`` has bfloat16 units, so that :func:`bfloat16_products` saves time there: a CUDA GPU that
    supports bfloat16, or a CPU with AVX512-BF16 or AMX. Elsewhere (an AVX2 CPU) bfloat16 is converted in software and
    costs time."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    cpu: Any = torch.cpu
    return any(bool(getattr(cpu, name, lambda: False)()) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
