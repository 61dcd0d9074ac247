"""SIGTERM (a scheduler's stop) is handled as Ctrl-C is, and still reported as SIGTERM when a library in between
(Ray's waits) turns the interrupt it raised into a plain KeyboardInterrupt."""

from __future__ import annotations

import os
import signal
import time

import pytest

from melbo.study.signals import Terminated, sigterm_as_interrupt


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
