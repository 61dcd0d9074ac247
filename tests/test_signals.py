"""SIGTERM (a scheduler's stop) is handled as Ctrl-C is, and still reported as SIGTERM when a library in between
(Ray's waits) turns the interrupt it raised into a plain KeyboardInterrupt."""

from __future__ import annotations

import os
import signal
import time

import pytest

from melbo.study.signals import Terminated, by_sigterm, sigterm_as_interrupt, stopping_on_signals


def test_sigterm_raises_terminated_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    received: list[int] = []
    with pytest.raises(Terminated), sigterm_as_interrupt(received):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert received == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is before


def test_sigterm_is_noted_when_a_library_turns_it_into_a_plain_interrupt():
    received: list[int] = []
    with pytest.raises(KeyboardInterrupt) as caught, sigterm_as_interrupt(received):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt:
            raise KeyboardInterrupt from None  # what ray.wait does with any interrupt raised while it waits
    assert type(caught.value) is KeyboardInterrupt and received == [signal.SIGTERM]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped interrupt, on purpose
def test_an_interrupt_lost_in_a_finaliser_is_raised_at_the_next_progress_event():
    """Python runs a signal handler at the next bytecode, which can be inside a ``__del__``: the KeyboardInterrupt is
    then printed and dropped and the study would go on. The study's progress callback raises it again."""

    class Finalised:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, inside the finaliser

    received: list[int] = []
    seen: list[str] = []
    on_event = stopping_on_signals(seen.append, received)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a foreground job (a CI job may ignore it)
    with sigterm_as_interrupt(received):
        on_event("block 1")
        Finalised()  # dropped at once: its KeyboardInterrupt is "ignored"
        assert received == [signal.SIGINT]
        with pytest.raises(KeyboardInterrupt) as caught:
            on_event("block 2")
    assert seen == ["block 1"] and not by_sigterm(caught.value, received)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored on the way out
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with sigterm_as_interrupt(received):
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # an ignored Ctrl-C stays ignored
    signal.signal(signal.SIGINT, before)
    with pytest.raises(Terminated) as stopped, sigterm_as_interrupt(received := []):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the handler runs at the next bytecode
            pass
    assert by_sigterm(stopped.value, received)
