"""A scheduler's stop (SIGTERM, what `kill`, Slurm or Kubernetes send) handled as Ctrl-C is: the study stops at once,
every finished step and block stays in its folder, and ``--resume`` continues it."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C's KeyboardInterrupt would be."""


@contextlib.contextmanager
def sigterm_as_interrupt(received: list[int]) -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread (instead of Ray's handler, which dumps a
    stack) and is noted in ``received``: Ray turns any KeyboardInterrupt raised inside its waits into a plain one."""

    def stop(signum: int, frame: object) -> None:
        received.append(signum)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
