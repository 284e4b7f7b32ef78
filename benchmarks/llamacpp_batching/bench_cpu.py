"""What other processes cost the benchmark: CPU accounting from /proc on a shared machine.

bench.py waits for the machine to go quiet before each run and measures a run again when
others loaded it meanwhile; these are its meters.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import process_cpu  # bench.py puts the repository root on sys.path

TICK = os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """Seconds of CPU all processes used since boot (/proc/stat, idle and iowait excluded)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = f
    return (user + nice + system + irq + softirq + steal) / TICK


class CpuMeter:
    """How much CPU others used while we measured: machine busy time minus ours and the
    server's. The lock in the module docstring only keeps out other *benchmarks*; tests and
    builds that ignore it show up here instead of silently skewing a row."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = pids

    def own(self) -> float:
        t = os.times()
        # children_*: the direct worker, counted once it has been waited for
        return (
            t.user + t.system + t.children_user + t.children_system + sum(process_cpu(p) for p in self.pids)
        )

    def __enter__(self) -> CpuMeter:
        self.t0, self.busy0, self.own0 = time.monotonic(), machine_busy(), self.own()
        return self

    def __exit__(self, *_: object) -> None:
        wall = time.monotonic() - self.t0
        foreign = (machine_busy() - self.busy0) - (self.own() - self.own0)
        self.cores = max(0.0, foreign / wall) if wall else 0.0


def wait_quiet(pids: Sequence[int], limit_s: float) -> float:
    """Wait (up to ``limit_s``) until others use < 0.1 core for 3 s running; returns their load.

    Our servers sit idle here, so whatever is busy is someone else's process."""
    deadline = time.monotonic() + limit_s
    calm = 0
    while True:
        with CpuMeter(pids) as meter:
            time.sleep(1.0)
        calm = calm + 1 if meter.cores < 0.1 else 0
        if calm >= 3 or time.monotonic() > deadline:
            return meter.cores
