"""A scheduler's stop (SIGTERM, what `kill`, Slurm or Kubernetes send) handled as Ctrl-C is: the study stops at once,
every finished step and block stays in its folder, and ``--resume`` continues it."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C's KeyboardInterrupt would be."""


@contextlib.contextmanager
def sigterm_as_interrupt(received: list[int]) -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread (instead of Ray's handler, which dumps a
    stack) and SIGINT a KeyboardInterrupt, each noted in ``received``: Ray turns any KeyboardInterrupt raised inside its
    waits into a plain one, and one raised inside a finaliser is lost (:func:`stopping_on_signals` raises it again)."""

    def stop(signum: int, frame: object) -> None:
        received.append(signum)
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    # SIGINT ignored stays ignored: a job a non-interactive shell started in the background is meant to outlive Ctrl-C
    watched = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN else [])
    previous = {signum: signal.signal(signum, stop) for signum in watched}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def by_sigterm(exc: BaseException, received: list[int]) -> bool:
    """Was the interrupt ``exc`` a scheduler's stop (SIGTERM: exit status 143) rather than Ctrl-C (130)?"""
    return isinstance(exc, Terminated) or signal.SIGTERM in received


def stopping_on_signals(callback: Callable[[T], None], received: list[int]) -> Callable[[T], None]:
    """``callback`` (a study's progress), first raising the interrupt of a signal already received: where Python ran the
    handler inside a finaliser (``__del__``), its KeyboardInterrupt was printed and dropped, and the work went on."""

    def checked(event: T) -> None:
        if received:
            raise Terminated if signal.SIGTERM in received else KeyboardInterrupt
        callback(event)

    return checked
