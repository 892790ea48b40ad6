"""The datapath's clock, as the programs read it and as userspace reads it.

The programs stamp conntrack and affinity entries with jiffies in
nanoseconds (bpf/lib/common.h, lb_now): bpf_jiffies64 is inlined by the JIT
and costs about 1 ns where bpf_ktime_get_coarse_ns costs 21 (bench/NOTES.md).
Cilium's conntrack uses jiffies the same way (bpf/lib/time.h, bpf_mono_now),
with the kernel's HZ found by bpf/cilium-probe-kernel-hz.c. Whoever ages an
entry from userspace must read the same clock: `now_ns`.
"""

from __future__ import annotations

import gzip
import re
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

NSEC_PER_SEC = 1_000_000_000
# The values Linux offers for CONFIG_HZ (kernel/Kconfig.hz), as Cilium's probe tries them.
HZ_CHOICES = (100, 250, 300, 1000)
TIMER_LIST = Path("/proc/timer_list")
KERNEL_CONFIG = Path("/proc/config.gz")

_HZ_LINE = re.compile(rb"^CONFIG_HZ=(\d+)$", re.M)
_JIFFIES_LINE = re.compile(rb"^jiffies: (\d+)$", re.M)


class ClockError(RuntimeError):
    """The kernel's jiffies or HZ could not be read."""


@dataclass(frozen=True)
class DatapathClock:
    """Jiffies at `hz`, in nanoseconds."""

    hz: int

    @property
    def nsec_per_jiffy(self) -> int:
        return NSEC_PER_SEC // self.hz

    def now_ns(self) -> int:
        """What lb_now() returns at this moment, to within a tick."""
        return jiffies() * self.nsec_per_jiffy

    @classmethod
    def of_kernel(cls) -> DatapathClock:
        return cls(kernel_hz())


def jiffies() -> int:
    """The kernel's jiffies counter (root only: /proc/timer_list is 0400)."""
    try:
        text = TIMER_LIST.read_bytes()
    except OSError as e:
        raise ClockError(f"cannot read {TIMER_LIST} for the kernel's jiffies: {e}") from e
    m = _JIFFIES_LINE.search(text)
    if m is None:
        raise ClockError(f"{TIMER_LIST} has no 'jiffies:' line")
    return int(m.group(1))


@cache
def kernel_hz() -> int:
    """CONFIG_HZ from the kernel's own config when it offers one, else
    measured: jiffies over 200 ms of CLOCK_MONOTONIC, nearest choice. The
    kernel's, so asked once per process: every build reads it."""
    try:
        m = _HZ_LINE.search(gzip.decompress(KERNEL_CONFIG.read_bytes()))
    except OSError:
        m = None
    if m is not None:
        return int(m.group(1))
    return measured_hz()


def measured_hz(interval_s: float = 0.2) -> int:
    j0, t0 = jiffies(), time.monotonic_ns()
    time.sleep(interval_s)
    j1, t1 = jiffies(), time.monotonic_ns()
    rate = (j1 - j0) * NSEC_PER_SEC / (t1 - t0)
    return min(HZ_CHOICES, key=lambda hz: abs(hz - rate))
