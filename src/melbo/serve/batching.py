"""Steered generation for many requests at once: one forward pass per token for every request in flight, each
with its own steering vector (one vector per batch row, as ``melbo eval`` does).

A worker thread owns the model. Requests wait in a bounded queue; the worker takes the first, waits a short window
for more (up to ``max_batch``), left-pads their prompts into one batch, and decodes token by token with a KV cache.
Each new token goes to its request's callback as soon as it is chosen (streaming). A request that finishes (end of
text, ``max_tokens``, a stop string) or is cancelled (its client went away) leaves the batch at once: its row is
dropped from the cache, so the others go on without it. Requests that arrive while a batch decodes form the next.

Greedy decoding of a lone request is exactly ``melbo generate``'s (the same forward passes); in a batch, prompts
of other lengths are left-padded and masked, which can move float rounding and, rarely, a tie between two tokens.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from melbo.errors import MelboError
from melbo.model.forward import cache_argument, new_cache
from melbo.model.layers import add_to_residual
from melbo.model.loading import LoadedModel
from melbo.serve.limits import ServeLimits

# What a request's callback receives: a piece of text (may be ""), and when the request is over, why
# ("stop": end of text or a stop string, "length": max_tokens, "cancelled", "error: …").
Emit = Callable[[str, str | None], None]


class QueueFull(MelboError):
    """Too many requests are waiting: the server answers 429."""


@dataclass
class Request:
    """One completion to generate."""

    prompt_ids: list[int]
    emit: Emit
    vector: Tensor | None = None  # (d_model,), already scaled; None: unsteered
    layer: int = 0  # added after this block
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None  # when its batch began decoding
    generated: int = 0  # tokens chosen so far (an end-of-text token not counted)
    reason: str | None = None  # why it ended, once it has: what ``emit`` was last given

    def cancel(self) -> None:
        self.cancelled.set()

    def send(self, piece: str, reason: str | None) -> None:
        """Hand ``piece`` (and, at the end, ``reason``) to the request's callback, keeping the reason."""
        if reason is not None:
            self.reason = reason
        self.emit(piece, reason)


@dataclass
class _Row:
    """A request in the batch being decoded."""

    request: Request
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already emitted
    generator: torch.Generator | None = None


class Batcher:
    """The worker thread and its queue; ``submit`` is safe from any thread."""

    def __init__(self, lm: LoadedModel, max_batch: int = 16, window: float = 0.02, max_queue: int = 64) -> None:
        self.lm = lm
        self.max_batch = max_batch
        self.window = window
        self.queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.eos = _eos_ids(lm)
        self.batches = 0  # batches run so far (a test and the bench read it)
        self.largest_batch = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="melbo-batcher", daemon=True)
        self._thread.start()

    @classmethod
    def from_limits(cls, lm: LoadedModel, limits: ServeLimits) -> Batcher:
        return cls(lm, max_batch=limits.max_batch, window=limits.window, max_queue=limits.max_queue)

    def submit(self, request: Request) -> None:
        try:
            self.queue.put_nowait(request)
        except queue.Full as exc:
            raise QueueFull(f"{self.queue.maxsize} requests are already waiting; try again shortly") from exc

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.window
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            live = [r for r in batch if not r.cancelled.is_set()]
            for r in batch:
                if r.cancelled.is_set():
                    r.send("", "cancelled")
            if not live:
                continue
            try:
                self._decode(live)
            except Exception as exc:  # a failure must reach every waiting client, and the worker goes on
                for r in live:
                    with contextlib.suppress(Exception):
                        r.send("", f"error: {type(exc).__name__}: {exc}")

    @torch.no_grad()
    def _decode(self, requests: list[Request]) -> None:
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(requests))
        started = time.monotonic()
        for r in requests:
            r.started = started
        device = self.lm.device
        rows = [_Row(r, generator=_generator(r)) for r in requests]
        width = max(len(r.prompt_ids) for r in requests)
        pad = self.lm.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests], device=device)
        vectors = _vectors_by_layer(requests, self.lm.d_model, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = new_cache(self.lm.model)
        passing = cache_argument(self.lm.model)
        with _steer(self.lm, vectors) as keep_rows:
            out = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{passing: cache})
            logits = out.logits[:, -1]
            while rows:
                done = self._step(rows, logits)
                if len(done) == len(rows):
                    break
                keep = [i for i in range(len(rows)) if i not in done]
                if done:
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    mask, positions = mask[index], positions[index]
                    keep_rows(index)
                rows = [rows[i] for i in keep]
                nxt = torch.tensor([[row.tokens[-1]] for row in rows], device=device)
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                positions = positions[:, -1:] + 1
                out = self.lm.model(input_ids=nxt, attention_mask=mask, position_ids=positions, use_cache=True, **{passing: cache})
                logits = out.logits[:, -1]  # the cache was updated in place

    def _step(self, rows: list[_Row], logits: Tensor) -> set[int]:
        """Choose each row's next token, emit its text; the indices of rows that are now finished."""
        done: set[int] = set()
        for i, row in enumerate(rows):
            request = row.request
            if request.cancelled.is_set():
                request.send("", "cancelled")
                done.add(i)
                continue
            token = _choose(logits[i], request, row.generator)
            finished = token in self.eos
            if not finished:
                row.tokens.append(token)
                request.generated = len(row.tokens)
            text = str(self.lm.tokenizer.decode(row.tokens, skip_special_tokens=True))
            cut = _stop_at(text, request.stop)
            if cut is not None:
                text, finished = text[:cut], True
            reason = "stop" if finished else ("length" if len(row.tokens) >= request.max_tokens else None)
            # a trailing broken character (half of a multi-byte one), or the start of a stop string, waits
            ready = len(text) if reason else _safe_end(text, request.stop)
            piece = text[row.sent : ready]
            row.sent = max(row.sent, ready)
            if piece or reason:
                request.send(piece, reason)
            if reason:
                done.add(i)
        return done


def _choose(logits: Tensor, request: Request, generator: torch.Generator | None) -> int:
    if request.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / request.temperature, dim=-1)
    if request.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < request.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _generator(request: Request) -> torch.Generator | None:
    if request.temperature <= 0:
        return None
    generator = torch.Generator()
    if request.seed is not None:
        generator.manual_seed(request.seed)
    else:
        generator.seed()
    return generator


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be sent now: not a trailing U+FFFD, nor an end that may begin a stop string."""
    end = len(text.rstrip("\ufffd"))
    held = max((k for stop in stops for k in range(1, len(stop)) if text[:end].endswith(stop[:k])), default=0)
    return end - held


def _stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def _eos_ids(lm: LoadedModel) -> set[int]:
    ids = {lm.tokenizer.eos_token_id}
    configured = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {int(i) for i in ids if i is not None}


def _vectors_by_layer(requests: list[Request], d_model: int, device: torch.device) -> dict[int, Tensor]:
    """One ``(B, d)`` matrix per steered layer: row b holds request b's vector there, zeros elsewhere."""
    out: dict[int, Tensor] = {}
    for row, request in enumerate(requests):
        if request.vector is None:
            continue
        matrix = out.setdefault(request.layer, torch.zeros(len(requests), d_model, device=device))
        matrix[row] = request.vector.to(device=device, dtype=matrix.dtype)
    return out


@contextlib.contextmanager
def _steer(lm: LoadedModel, vectors: dict[int, Tensor]) -> Iterator[Callable[[Tensor], None]]:
    """Each layer's per-row vectors added after its block; yields a function that keeps only some rows (as
    requests leave the batch). The hooks remove themselves on exit, also on errors."""
    current = dict(vectors)

    def keep(index: Tensor) -> None:
        for layer in current:
            current[layer] = current[layer][index]

    with contextlib.ExitStack() as stack:
        for layer in current:
            stack.enter_context(add_to_residual(lm.model, layer, functools.partial(current.__getitem__, layer)))
        yield keep
