"""The datapath's clock as userspace reads it (loader/clock.py) against the
kernel's own."""

from __future__ import annotations

import time

from loader.clock import HZ_CHOICES, NSEC_PER_SEC, DatapathClock, jiffies, kernel_hz, measured_hz
from tests.conftest import require_root


def test_jiffies_advance_at_the_kernels_hz() -> None:
    require_root()
    hz = kernel_hz()
    assert hz in HZ_CHOICES
    j0, t0 = jiffies(), time.monotonic_ns()
    time.sleep(0.3)
    j1, t1 = jiffies(), time.monotonic_ns()
    rate = (j1 - j0) * NSEC_PER_SEC / (t1 - t0)
    assert abs(rate - hz) < hz * 0.05, (rate, hz)
    assert measured_hz() == hz


def test_the_clock_moves_with_monotonic_time() -> None:
    require_root()
    clock = DatapathClock.of_kernel()
    a, t0 = clock.now_ns(), time.monotonic_ns()
    time.sleep(0.5)
    b, t1 = clock.now_ns(), time.monotonic_ns()
    tick = clock.nsec_per_jiffy
    assert abs((b - a) - (t1 - t0)) <= 2 * tick, (b - a, t1 - t0, tick)
