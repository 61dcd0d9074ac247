"""Context managers that change how fast a forward pass runs, never what it computes (beyond rounding).

Both were found by profiling a MELBO-ortho step on a CPU (bench/utilisation.py, bench/RESULTS.md):

* :func:`contiguous_head_input` — transformers slices the final hidden states to the positions whose logits are kept
  (``logits_to_keep``), a strided view; ``nn.Linear`` on a strided 3-D input takes the batched-matmul path with the
  weight expanded per row, forward and backward. On SmolLM2's 49k-token head that was 2.5× slower than one matrix
  product over the flattened rows (0.68 s against 0.27 s for a block of 16 rows × 20 positions, with its backward).
* :func:`bfloat16_products` — autocast (the matrix products in bfloat16 on float32 weights) with the attention
  kernel kept in float32: PyTorch's CPU flash-attention backward is about 7× slower in bfloat16 than in float32
  (33 ms against 5 ms a layer), which ate most of what bfloat16 products save. With :class:`CastWeights` the linear
  maps read bfloat16 copies of their weights made once per run, the very values autocast would make at every
  product: the same numbers, without casting about 100M weights per evaluation (SmolLM2: 0.93× the step).
* :func:`compiled_blocks` — the decoder blocks a step runs, compiled (torch.compile, inductor): their elementwise
  work (norms, rotary, the MLP's gate, autocast's casts) fused into a few kernels. A bfloat16 SmolLM2 step took 0.66×
  eager's on an AMX Xeon (with the KL fused too), float32 0.88×, after about 30 s of compiling on a first run. Worth it
  for long runs only.
* :func:`kept_heap` — glibc's malloc told to keep freed memory for the next evaluation's activations.

Like every hook in melbo they restore the model on exit, also when the body raises.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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


@dataclass
class CastWeights:
    """bfloat16 copies of the weights (and biases) of some linear maps, made once: :meth:`installed` puts them in place
    of the originals while inside. Under autocast a linear map casts a float32 weight to bfloat16 at every call (the
    cast is cached only for weights that require a gradient); a weight already in bfloat16 is used as it is, so the
    products see the same numbers. Other code must not run the maps outside autocast while they are installed."""

    copies: list[tuple[nn.Module, str, nn.Parameter]]

    @classmethod
    def of(cls, modules: Sequence[nn.Module]) -> CastWeights:
        """Copies for every ``nn.Linear`` in ``modules`` (each counted once: a tied head is its own module)."""
        linears = {id(m): m for module in modules for m in module.modules() if isinstance(m, nn.Linear)}
        copies: list[tuple[nn.Module, str, nn.Parameter]] = []
        for linear in linears.values():
            for name, param in linear.named_parameters(recurse=False):
                if param.dtype == torch.float32:
                    copies.append((linear, name, nn.Parameter(param.detach().to(torch.bfloat16), requires_grad=False)))
        return cls(copies)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        originals = [module._parameters[name] for module, name, _ in self.copies]
        try:
            for module, name, copy in self.copies:
                module._parameters[name] = copy
            yield
        finally:
            for (module, name, _), original in zip(self.copies, originals):
                module._parameters[name] = original


@contextlib.contextmanager
def bfloat16_products(model: nn.Module, device: torch.device, enabled: bool = True, weights: CastWeights | None = None) -> Iterator[None]:
    """Autocast to bfloat16 on ``device`` (the model's matrix products in bfloat16, on its float32 weights); on a CPU
    with the attention kernel in float32 (:func:`float32_attention`; a GPU's bfloat16 attention is fast); ``weights``:
    bfloat16 copies the linear maps read instead of casting their own at every product. Nothing at all when not
    ``enabled``."""
    if not enabled:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        if device.type == "cpu":
            stack.enter_context(float32_attention(model))
        if weights is not None:
            stack.enter_context(weights.installed())
        yield


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
HEAP_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's own ceiling for its dynamic threshold (64-bit)
HEAP_TRIM_AFTER = 2 * HEAP_MMAP_THRESHOLD  # where glibc's dynamic rule puts the trim threshold with that mmap threshold


@contextlib.contextmanager
def kept_heap() -> Iterator[None]:
    """While inside, glibc's malloc keeps the memory a process frees for its next allocations instead of returning it
    to the system (its trim threshold at 2 GiB), and serves blocks up to 32 MiB from that heap (its mmap
    threshold at its own dynamic ceiling). An optimisation allocates the same large activations at every evaluation; after
    a block's completions had churned the heap, glibc unmapped and mapped them again each time, and a compiled
    SmolLM2 evaluation took 1.2× as long from the second block on (page faults; bench/RESULTS.md). On exit the trim
    threshold is where glibc's own dynamic rule would put it (64 MiB: larger free memory goes back to the system), and the
    mmap threshold stays at the ceiling that rule climbs to. Nothing happens where the C library is not glibc."""
    mallopt = _mallopt()
    if mallopt is None:
        yield
        return
    mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # the largest it takes (an int): 2 GiB of free memory at the top of the heap
    try:
        yield
    finally:
        mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_AFTER)


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, where the process runs on glibc."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    function = getattr(libc, "mallopt", None)
    if function is None:
        return None
    function.argtypes, function.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return function


_COMPILED: dict[type, Callable[..., Any]] = {}  # each block class's forward, compiled once per process (torch.compile)


def compiler_available(device: torch.device) -> bool:
    """Whether torch.compile's default backend (inductor) can build kernels for ``device``: a C++ compiler on a CPU,
    Triton on a CUDA GPU."""
    if device.type == "cpu":
        return any(shutil.which(name) for name in ("c++", "g++", "clang++"))
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return False


@contextlib.contextmanager
def compiled_blocks(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """While inside, ``blocks`` run their forward compiled (torch.compile of their class's ``forward``, shared by every
    block of that class: one compilation per class, input shape and grad mode). Hooks on the blocks run as before,
    outside the compiled code; each block's own forward is restored on exit."""
    try:
        for block in blocks:
            compiled = _COMPILED.get(type(block))
            if compiled is None:
                compiled = _COMPILED[type(block)] = torch.compile(type(block).forward)
            block.forward = types.MethodType(compiled, block)  # an instance attribute shadows the class's forward
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


def compile_failed(error: BaseException) -> bool:
    """Whether ``error`` is torch.compile's own failure (no working compiler, a kernel that does not build: dynamo's
    exceptions, inductor's among them), after which the same work can run eagerly; a model's own errors are not."""
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(error, TorchDynamoException)


SOFTWARE_BFLOAT16 = (  # measured: bench/RESULTS.md, discovery_speed on the AVX2 EPYC
    "bfloat16 products on a device without bfloat16 units (on a CPU: no AVX512-BF16 or AMX, or ONEDNN_MAX_CPU_ISA below "
    "them) are converted in software: "
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
    units = any(bool(getattr(cpu, name, lambda: False)()) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return units and onednn_may_use_bfloat16_units(_onednn_isa_cap())


# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) whose instructions include bfloat16 products: AVX512_CORE_BF16 and every ISA
# above it (AVX512_CORE_FP16, AVX512_CORE_AMX, AVX512_CORE_AMX_FP16, the AVX10 names)
_BFLOAT16_ISA_MARKS = ("BF16", "FP16", "AMX", "AVX10")


def _onednn_isa_cap() -> str:
    return os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""


def onednn_may_use_bfloat16_units(cap: str) -> bool:
    """Whether oneDNN, which runs PyTorch's bfloat16 matrix products on a CPU, may use the CPU's bfloat16 units under
    the ISA cap ``cap`` (the value of ``ONEDNN_MAX_CPU_ISA``; empty, ``ALL`` or ``DEFAULT``: no cap). Capped below
    AVX512_CORE_BF16 it converts in software on any CPU: on an AMX Xeon a 1024³ bfloat16 product ran at 0.8 GFLOP/s
    under ``AVX2`` and 66 under ``AVX512_CORE``, against 1,200 uncapped and 300 for float32 (2026-12-06)."""
    name = cap.strip().upper()
    return name in ("", "ALL", "DEFAULT") or any(mark in name for mark in _BFLOAT16_ISA_MARKS)
