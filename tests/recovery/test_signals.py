"""SIGTERM / SIGINT to the driver: the first asks for a stop within the grace period, a second aborts at once."""

from __future__ import annotations

import os
import signal
import time

import pytest

from lopt_dist.recovery import StopSignals


def test_first_signal_requests_a_stop_the_second_aborts_and_the_old_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop = StopSignals(grace_s=30)
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # Python runs the handler at the next bytecode of the main thread
        assert stop.requested and stop.received == "SIGTERM" and not stop.aborting
        assert 29 < stop.remaining_s() <= 30
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert stop.aborting
    finally:
        stop.uninstall()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_signal_while_starting_interrupts_at_once():
    stop = StopSignals(grace_s=30)
    stop.install()
    try:
        with pytest.raises(KeyboardInterrupt), stop.interruptible():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted at once
        assert stop.requested and not stop.aborting
        with pytest.raises(KeyboardInterrupt), stop.interruptible():  # stopping already: no new start
            pass
    finally:
        stop.uninstall()
