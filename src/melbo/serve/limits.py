"""What one request to ``melbo serve`` may ask and how requests are batched: the one set of defaults the API and the
command line read (no FastAPI here, so the command line can show them without the serve extra)."""

from __future__ import annotations

from dataclasses import dataclass

from melbo.setting import setting


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask (over a limit: 400, 413 or 429) and how requests are batched."""

    max_tokens: int = setting(256, "Most tokens one completion may ask for.", minimum=1)
    max_prompt_tokens: int = 2048
    max_body_bytes: int = 64 * 1024
    max_queue: int = setting(64, "Requests allowed to wait for a batch; more are answered 429.", minimum=1)
    max_batch: int = setting(16, "Requests decoded together.", minimum=1)
    window: float = 0.02  # seconds the batcher waits for more requests after the first
    # uvicorn's 5 s equals httpx's (so the openai client's) pool expiry: a client could reuse a connection just as the
    # server closes it and get a ReadError. Longer than its clients' expiry, the server never closes first.
    keep_alive: int = setting(75, "Seconds an idle connection stays open; keep it longer than your clients' (and any proxy's) pool keeps theirs.", minimum=1)
