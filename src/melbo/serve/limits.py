"""What one request to ``melbo serve`` may ask and how requests are batched: the one set of defaults the API and the
command line read (no FastAPI here, so the command line can show them without the serve extra)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask (over a limit: 400, 413 or 429) and how requests are batched."""

    max_tokens: int = 256  # per completion
    max_prompt_tokens: int = 2048
    max_body_bytes: int = 64 * 1024
    max_queue: int = 64  # requests waiting for a batch; more: 429
    max_batch: int = 16  # requests decoded together
    window: float = 0.02  # seconds the batcher waits for more requests after the first
