"""Forward passes with steering vectors: cached source-layer activations, steered residuals and logits,
steered generation (one vector per batch row), and the measurements built on them (fluency, first-token
effect, the residual-norm profile).

The residual stream up to the source layer ``s`` does not depend on θ, so it is computed once per prompt
(:func:`prepare`) and every optimisation step runs only blocks ``s+1 … t`` for a whole block of vectors at
once (one vector per batch row).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from melbo.model.fastpath import contiguous_head_input
from melbo.model.layers import add_to_residual, capture_residual, check_layer, head_skipped, n_layers, residual_after, start_after, stop_after
from melbo.model.prompts import PromptFormat, encode_prompt, ids_like, need_prompts
from melbo.objectives import kl_divergence

if TYPE_CHECKING:
    from melbo.model.loading import CausalLM, LoadedModel

SINK_RATIO = 10.0  # a first token this many times the median norm of the rest is flagged as a sink


@dataclass
class PromptState:
    """One prompt, tokenised, with its unsteered residual after the source layer ``(1, T, d)``.

    Several prompts packed into one sequence (:func:`melbo.model.packing.pack`) also carry each token's position id
    ``(1, T)`` and an attention mask ``(1, 1, T, T)`` (boolean, or additive for eager attention); a plain prompt has
    neither (positions 0 … T−1, causal).
    """

    text: str
    ids: Tensor
    source: Tensor
    positions: Tensor | None = None
    mask: Tensor | None = None

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])

    def inputs(self, batch: int) -> dict[str, Any]:
        """The model's keyword arguments for this sequence on ``batch`` rows (no KV cache)."""
        extra = {} if self.mask is None else {"attention_mask": self.mask, "position_ids": self.positions}
        return {"input_ids": ids_like(self.ids, batch), "use_cache": False, **extra}


def prepare(lm: LoadedModel, prompts: list[str], fmt: PromptFormat, source_layer: int) -> list[PromptState]:
    """Tokenise each prompt and cache its residual after ``source_layer``."""
    check_layer(lm.model, source_layer, "source layer")
    need_prompts(prompts)
    states = []
    for text in prompts:
        ids = encode_prompt(lm.tokenizer, text, fmt, lm.device)
        with torch.no_grad():
            cached = residual_after(lm.model, source_layer, ids).float()
        states.append(PromptState(text=text, ids=ids, source=cached))
    return states


@torch.no_grad()
def extend_with_continuation(
    lm: LoadedModel, state: PromptState, source: int, vector: Tensor, tokens: int, known: Tensor | None = None,
) -> PromptState:
    """``state`` followed by the first ``tokens`` tokens ``vector`` makes the model write greedily (added after
    ``source``), with the unsteered residual after ``source`` of the whole sequence (θ only acts after it).

    ``known``: ``vector``'s greedy tokens on this prompt already generated (:func:`greedy_tokens`), used when they
    reach ``tokens`` with no end-of-sequence among them (the continuation never stops early: greedy decoding's first
    ``tokens`` tokens are those of a longer run)."""
    out = state.ids[:1]
    if tokens and known is not None and known.shape[0] >= tokens and not eos_ids(lm) & set(known[:tokens].tolist()):
        out = torch.cat([out, known[None, :tokens].to(out)], dim=1)
    elif tokens:
        with add_to_residual(lm.model, source, vector):
            out = lm.model.generate(
                input_ids=out, attention_mask=torch.ones_like(out), max_new_tokens=tokens, min_new_tokens=tokens,
                do_sample=False, temperature=None, top_k=None, top_p=None, pad_token_id=lm.tokenizer.pad_token_id,
            )
    cached = residual_after(lm.model, source, out).float()
    return PromptState(text=state.text, ids=out, source=cached)


def target_residual(model: CausalLM, state: PromptState, source: int, target: int, thetas: Tensor) -> Tensor:
    """Residual after ``target`` ``(B, T, d)`` when row ``b`` adds ``thetas[b]`` after ``source``.

    Only blocks ``source+1 … target`` run; gradients flow back to ``thetas``.
    """
    dtype = next(model.parameters()).dtype
    steered = (state.source + thetas[:, None, :]).to(dtype)
    with start_after(model, source, steered), capture_residual(model, target) as seen, stop_after(model, target):
        model(**state.inputs(thetas.shape[0]))
    return seen[target].float()


def steered_logits(model: CausalLM, state: PromptState, source: int, thetas: Tensor, last: int | Tensor, as_computed: bool = False) -> Tensor:
    """Next-token logits ``(B, P, vocab)`` (float32; ``as_computed``: in the dtype the head computed them in, e.g.
    bfloat16 under autocast, for a consumer that reads them as float32 itself) when row ``b`` adds ``thetas[b]`` after
    ``source``, at the last ``last`` positions or at the positions ``last`` lists; blocks from ``source+1`` to the LM
    head run, gradients flow to ``thetas``."""
    dtype = next(model.parameters()).dtype
    steered = (state.source + thetas[:, None, :]).to(dtype)
    with start_after(model, source, steered), contiguous_head_input(model):
        logits = model(**state.inputs(thetas.shape[0]), logits_to_keep=last).logits
    return logits if as_computed else logits.float()


def steered_log_probs(model: CausalLM, state: PromptState, source: int, thetas: Tensor, last: int | Tensor) -> Tensor:
    """:func:`steered_logits` as log-probabilities ``(B, P, vocab)``."""
    return torch.log_softmax(steered_logits(model, state, source, thetas, last), dim=-1)


def steered_final_hidden(model: CausalLM, state: PromptState, source: int, thetas: Tensor, last: int | Tensor) -> Tensor:
    """The LM head's input (the final hidden state, after the final norm) ``(B, P, d)`` at the positions ``last`` says
    when row ``b`` adds ``thetas[b]`` after ``source``: :func:`steered_logits` without the head (V × d per position)."""
    dtype = next(model.parameters()).dtype
    steered = (state.source + thetas[:, None, :]).to(dtype)
    with start_after(model, source, steered), head_skipped(model):
        hidden = model(**state.inputs(thetas.shape[0]), logits_to_keep=last).logits
    return hidden.float()


def new_cache(model: CausalLM) -> Any:
    """An empty KV cache for ``model`` (transformers' Cache API), filled in place by each forward pass."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers before 4.56: no config argument
        return DynamicCache()


def cache_argument(model: CausalLM) -> str:
    """The name under which ``model``'s forward takes a KV cache: ``cache`` (transformers ≥ 5.x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def greedy_tokens(lm: LoadedModel, input_ids: Tensor, vector: Tensor | None, layer: int, max_new_tokens: int) -> Tensor:
    """The ids ``(n,)`` the model writes greedily after ``input_ids`` ``(1, seq)`` when ``vector`` is added after
    ``layer`` (``None``: unsteered), up to and including the first end-of-sequence token."""
    steer = contextlib.nullcontext() if vector is None else add_to_residual(lm.model, layer, vector)
    with steer:
        out = lm.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
            do_sample=False, temperature=None, top_k=None, top_p=None, pad_token_id=lm.tokenizer.pad_token_id,
        )
    return up_to_eos(lm, out[0, input_ids.shape[1]:])


def eos_ids(lm: LoadedModel) -> set[int]:
    """The model's end-of-sequence token ids."""
    eos = lm.model.generation_config.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos or [])


def up_to_eos(lm: LoadedModel, tokens: Tensor) -> Tensor:
    """``tokens`` up to and including the first end-of-sequence token."""
    ends = eos_ids(lm)
    for position, token in enumerate(tokens.tolist()):
        if token in ends:
            return tokens[: position + 1]
    return tokens


@torch.no_grad()
def continuation_nll(model: CausalLM, state: PromptState, source: int, thetas: Tensor, tokens: int, batch: int = 64) -> Tensor:
    """Mean negative log-likelihood (nats per token) of the last ``tokens`` ids of ``state`` (a prompt followed by a
    completion), teacher-forced, when row ``b`` of ``thetas`` is added after ``source`` at every position ``(B,)``.

    A zero row gives the unsteered model's NLL; only blocks ``source+1 …`` and the LM head run."""
    target = state.ids[0, -tokens:]
    out = []
    for chunk in thetas.split(batch):
        log_probs = steered_log_probs(model, state, source, chunk, tokens + 1)[:, :-1]  # position p predicts p + 1
        picked = log_probs.gather(-1, target.expand(chunk.shape[0], -1)[..., None])[..., 0]
        out.append(-picked.mean(dim=-1))
    return torch.cat(out)


def last_token_logits(model: CausalLM, state: PromptState, source: int, thetas: Tensor, batch: int = 64) -> Tensor:
    """Logits at the last prompt position ``(B, vocab)`` when steering with each row of ``thetas``."""
    dtype = next(model.parameters()).dtype
    out = []
    with torch.no_grad():
        for chunk in thetas.split(batch):
            steered = (state.source + chunk[:, None, :]).to(dtype)
            ids = ids_like(state.ids, chunk.shape[0])
            with start_after(model, source, steered), contiguous_head_input(model):
                out.append(_last_logits(model, ids))
    return torch.cat(out).float()


def _last_logits(model: CausalLM, ids: Tensor) -> Tensor:
    with contextlib.suppress(TypeError):  # only the last position's logits, where the model supports it
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
    return model(input_ids=ids, use_cache=False).logits[:, -1]


@dataclass
class Generation:
    """Completions of one prompt, one per steering row, with what the prompt's own pass gives for free."""

    texts: list[str]  # decoded completions (the prompt not repeated), special tokens removed
    new_ids: Tensor  # (B, n) the new token ids; pads follow a row's first end-of-sequence token (:func:`up_to_eos`)
    first_logits: Tensor  # (B, vocab) float32: the next-token logits at the prompt's last position, each row steered
    prompt_cache: Any = None  # keep_cache=True: the prompt's KV cache, each row steered (:func:`nll_after_prompt`); None
    # where the model's cache cannot go back to the prompt (a sliding window the completion ran past)


@torch.no_grad()
def generate_steered(
    model: CausalLM,
    tokenizer: Any,
    input_ids: Tensor,
    vectors: Tensor | None,
    layer: int,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    seed: int | None = 0,
) -> list[str]:
    """Completions of one prompt, one per row of ``vectors`` (or one unsteered completion if ``None``): the texts of
    :func:`steered_generation`."""
    return steered_generation(model, tokenizer, input_ids, vectors, layer, max_new_tokens, temperature, seed).texts


@torch.no_grad()
def steered_generation(
    model: CausalLM,
    tokenizer: Any,
    input_ids: Tensor,
    vectors: Tensor | None,
    layer: int,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    seed: int | None = 0,
    keep_cache: bool = False,
) -> Generation:
    """Completions of one prompt, one per row of ``vectors`` (or one unsteered completion if ``None``), with each row's
    first-token logits, which the pass over the prompt computes anyway (a separate :func:`last_token_logits` would run
    the prompt again).

    Args:
        input_ids: ``(1, seq)`` token ids of the formatted prompt.
        vectors: ``(B, d_model)``, each added after block ``layer`` at every position, new ones included.
        temperature: 0 for greedy decoding, else sampling at that temperature (seeded by ``seed``).
        keep_cache: keep the prompt's KV cache (each row steered), so that :func:`nll_after_prompt` can score a
            continuation of the prompt by running only the continuation.
    """
    batch = 1 if vectors is None else vectors.shape[0]
    ids = ids_like(input_ids, batch)
    sampling = temperature > 0
    options: dict[str, Any] = {"do_sample": sampling}
    if sampling:
        options.update(temperature=temperature, top_k=0, top_p=1.0)
        if seed is not None:
            torch.manual_seed(seed)
    else:
        options.update(temperature=None, top_k=None, top_p=None)
    cache = new_cache(model) if keep_cache or (vectors is not None and batch > 1) else None
    if cache is not None:
        _prefill_shared(model, ids[:1, :-1], vectors, layer, cache)
        options[cache_argument(model)] = cache  # generate takes it under the forward's name
    steer = contextlib.nullcontext() if vectors is None else add_to_residual(model, layer, vectors)
    with steer, _first_call_logits(model) as first:
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **options,
        )
        if not first:  # a generate that ran its forward passes around the module call (compiled): the prompt once more
            first.append(model(input_ids=ids, use_cache=False).logits[:, -1].float())
    new = out[:, ids.shape[1]:]
    if not keep_cache:  # the shared prefill's cache: not the caller's to hold (compose keeps every call's Generation)
        cache = None
    if cache is not None and cache.get_seq_length() > ids.shape[1]:
        try:
            cache.crop(ids.shape[1] - cache.get_seq_length())  # back to the prompt: a negative count removes that many tokens
        except (RuntimeError, ValueError):  # a sliding-window layer that has dropped states it would need: no cache
            cache = None
    return Generation(tokenizer.batch_decode(new, skip_special_tokens=True), new, first[0], cache)


def _prefill_shared(model: CausalLM, head: Tensor, vectors: Tensor | None, layer: int, cache: Any) -> bool:
    """Fill the empty KV ``cache`` with the prompt ``head`` ``(1, seq)`` (all of it but its last token, which generate
    then runs) for ``vectors``' rows: blocks 0 … ``layer`` once, unsteered, their keys and values shared by every row
    (the vectors act after ``layer``), and only the later blocks per row, steered. Returns False, leaving the cache
    empty, where the cache does not keep one layer object per block (transformers before 5) or nothing is shared."""
    layers = getattr(cache, "layers", None)
    if vectors is None or head.shape[1] == 0 or not isinstance(layers, list) or len(layers) != n_layers(model):
        return False
    passing, rows = cache_argument(model), vectors.shape[0]
    shared = new_cache(model)
    with capture_residual(model, layer) as seen, stop_after(model, layer):
        model(input_ids=head, use_cache=True, **{passing: shared})
    last = n_layers(model) - 1
    with add_to_residual(model, layer, vectors), start_after(model, layer, seen[layer].expand(rows, -1, -1)), stop_after(model, last):
        model(input_ids=ids_like(head, rows), use_cache=True, **{passing: cache})  # no head: generate runs the last token
    for index in range(layer + 1):
        keys, values = shared.layers[index].keys, shared.layers[index].values
        layers[index].update(keys.expand(rows, *keys.shape[1:]), values.expand(rows, *values.shape[1:]))
    return True


@contextlib.contextmanager
def _first_call_logits(model: CausalLM) -> Iterator[list[Tensor]]:
    """Records the last position's logits (float32) of the first forward pass of ``model`` inside the ``with``."""
    seen: list[Tensor] = []

    def hook(_module: Any, _args: Any, output: Any) -> None:
        if not seen:
            seen.append(output.logits[:, -1].float().clone())

    handle = model.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@torch.no_grad()
def nll_after_prompt(model: CausalLM, generation: Generation, vectors: Tensor, layer: int, target: Tensor) -> Tensor:
    """Mean negative log-likelihood (nats per token) per row ``(B,)`` of ``target`` ``(n,)`` written right after the
    prompt of ``generation`` (made with ``keep_cache=True``), teacher-forced, row ``b`` steered by ``vectors[b]`` after
    ``layer``: :func:`continuation_nll` without running the prompt again (its first token is scored by the generation's
    first-token logits, the others by one pass over ``target[:-1]`` on the prompt's cache)."""
    cache = generation.prompt_cache
    if cache is None:
        raise ValueError("nll_after_prompt needs a generation made with keep_cache=True")
    rows = generation.first_logits.shape[0]
    picked = torch.log_softmax(generation.first_logits, dim=-1)[:, target[:1]]  # (B, 1): the first token
    if target.shape[0] > 1:
        prompt_length = cache.get_seq_length()
        with add_to_residual(model, layer, vectors):
            logits = model(input_ids=target[None, :-1].expand(rows, -1), use_cache=True, **{cache_argument(model): cache}).logits
        rest = torch.log_softmax(logits.float(), dim=-1).gather(-1, target[None, 1:, None].expand(rows, -1, 1))[..., 0]
        picked = torch.cat([picked, rest], dim=1)
        cache.crop(prompt_length - cache.get_seq_length())  # the prompt's cache again, for another target
    return -picked.mean(dim=-1)


@torch.no_grad()
def completion_nll(lm: LoadedModel, input_ids: Tensor, completions: list[str]) -> list[float]:
    """Mean negative log-likelihood (nats per token) of each completion under the *unsteered* model.

    A fluency check: coherent text scores ~1–3 on SmolLM2, gibberish ≥ 4.5. Empty completions score inf.
    """
    scores = []
    for text in completions:
        tokens = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(lm.device)
        if tokens.shape[1] == 0:
            scores.append(float("inf"))
            continue
        full = torch.cat([input_ids, tokens], dim=1)
        logits = lm.model(input_ids=full, use_cache=False).logits[0, input_ids.shape[1] - 1 : -1]
        scores.append(float(torch.nn.functional.cross_entropy(logits.float(), tokens[0])))
    return scores


def effect_on_first_token(lm: LoadedModel, state: PromptState, source: int, thetas: Tensor, steered: Tensor | None = None) -> Tensor:
    """KL(P_θ ‖ P_unsteered) of the next-token distribution at the last prompt token, per row ``(B,)``; ``steered``:
    the rows' first-token logits where a generation already has them (:attr:`Generation.first_logits`)."""
    steered = last_token_logits(lm.model, state, source, thetas) if steered is None else steered
    plain = last_token_logits(lm.model, state, source, torch.zeros_like(thetas[:1]))
    return kl_divergence(steered, plain.expand_as(steered))


TOP_DIMS = 3  # massive activations: a few coordinates that hold most of a residual's norm (Gemma 3 270M: 96 %)
MASSIVE_SHARE = 0.9  # `melbo info` says so from this share on (SmolLM2: about 50 % after layer 8, Gemma 3 270M 96 % after 5)


@dataclass
class LayerNorms:
    """The residual norm after one block on one prompt: what a user needs to choose s, t and R."""

    layer: int
    first_token: float  # residual norm at position 0
    median_rest: float  # median residual norm over positions 1 …
    max_rest: float
    top_share: float = 0.0  # median over positions 1 … of the share of ‖h‖² in its TOP_DIMS largest coordinates

    @property
    def sink(self) -> bool:
        """Whether position 0 is an attention sink that would swamp a loss or mean including it."""
        return self.median_rest > 0 and self.first_token > SINK_RATIO * self.median_rest


@torch.no_grad()
def residual_norms(model: CausalLM, input_ids: Tensor) -> list[LayerNorms]:
    """Per layer, the norm of the residual stream after that block on ``input_ids`` ``(1, seq)``."""
    layers = list(range(n_layers(model)))
    with capture_residual(model, layers) as seen:
        model(input_ids=input_ids, use_cache=False)
    rows = []
    for layer in layers:
        h = seen[layer][0].float()
        norms = h.norm(dim=-1)
        rest = slice(1, None) if norms.numel() > 1 else slice(None)
        squares = h[rest] ** 2
        top = squares.topk(min(TOP_DIMS, squares.shape[-1]), dim=-1).values.sum(-1) / squares.sum(-1).clamp_min(1e-30)
        rows.append(LayerNorms(layer, float(norms[0]), float(norms[rest].median()), float(norms[rest].max()), float(top.median())))
    return rows
