"""``melbo serve``'s access log: one line per answered request, so a server under nohup or a cluster job shows in
its log what it did (uvicorn's own access log is off: it cannot say which vector steered a completion).

    POST /v1/chat/completions 200 in 2.4 s: run ortho vector 3 ×1, prompt 21 tokens, 48 generated (length), 0.1 s queued
    POST /v1/chat/completions 404 in 0.0 s: run 'orth' is not served here; runs: ortho, discover

Prompts and completions are never written: only their sizes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from melbo.serve.batching import Request

GENERATION = "melbo_generation"  # the ASGI scope's state key under which a handler leaves what it generated
CLIENT_LEFT = 499  # nginx's status for a client that closed the connection before the answer was whole


@dataclass
class Generation:
    """What the access log says of one completion; its request is read when the response ends."""

    request: Request
    steering: str  # "run ortho vector 3 ×1" or "unsteered"
    stream: bool


class AccessLog:
    """ASGI middleware: calls ``write`` (if given) with one line when each HTTP response ends or its client leaves
    first; ``answered`` and ``errors`` count them."""

    def __init__(self, app: Any, write: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.app, self.write, self.clock = app, write, clock
        self.answered = 0
        self.errors = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = self.clock()
        status: int | None = None
        error_body = bytearray()
        ended = False

        async def watch(message: dict) -> None:
            nonlocal status, ended
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                if status is not None and status >= 400 and len(error_body) < 4096:
                    error_body.extend(message.get("body", b""))
                ended = ended or not message.get("more_body", False)
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.answered += 1
            self.errors += status is not None and status >= 400 and status != CLIENT_LEFT
            if self.write is not None:
                self.write(access_line(scope, status if ended else None, self.clock() - start, bytes(error_body)))


def access_line(scope: dict, status: int | None, seconds: float, error_body: bytes = b"") -> str:
    """The log's line for one request: ``status`` None where the response never ended (the client left mid-way;
    499 is what the server answers a client that left before its completion was whole)."""
    left = status is None or status == CLIENT_LEFT
    head = f"{scope.get('method', '?')} {scope.get('path', '?')} {'client left' if left else status} in {seconds:.1f} s"
    if not left and status is not None and status >= 400:
        return f"{head}: {_error_message(error_body) or 'no message'}"
    generation: Generation | None = (scope.get("state") or {}).get(GENERATION)
    if generation is None:
        return head
    request = generation.request
    parts = [generation.steering, f"prompt {len(request.prompt_ids)} tokens",
             f"{request.generated} generated" + (f" ({request.reason})" if request.reason else "")]
    if request.started is not None:
        parts.append(f"{request.started - request.submitted:.1f} s queued")
    if generation.stream:
        parts.append("streamed")
    return f"{head}: {', '.join(parts)}"


def _error_message(body: bytes) -> str | None:
    """The message of an OpenAI-shaped JSON error body."""
    try:
        found = json.loads(body)
    except ValueError:
        return None
    error = found.get("error") if isinstance(found, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return str(message) if message is not None else None
