"""proxy_overhead.py's CPU and memory accounting from /proc, for a shared machine: what our
processes used of the core they are pinned to, what other processes took of it meanwhile, and
a process's RSS."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid``, in clock ticks."""
    # Fields after the ")" that closes the command name, which may itself hold spaces or ")".
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def children_ticks() -> int:
    """CPU time of this process's waited-for children (wrk, once ``run_wrk`` returns), in ticks."""
    t = os.times()
    return round((t.children_user + t.children_system) * CLK_TCK)


def core_ticks(cpu: str) -> tuple[int, int]:
    """(busy, total) clock ticks of one CPU since boot, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            values = [int(v) for v in line.split()[1:9]]  # guest time is already inside user
            return sum(values) - values[3] - values[4], sum(values)
    raise LookupError(f"no cpu{cpu} line in /proc/stat")


@dataclass
class CoreShare:
    """What our processes (``pids``, and ``extra`` ticks) used of the core they are pinned to
    over a span, and what everything else used."""

    cpu: str
    pids: Sequence[int]
    extra: Callable[[], int] = lambda: 0
    ours0: int = 0
    busy0: int = 0
    total0: int = 0
    ours: int = 0
    stolen: float = 0.0

    def _ours(self) -> int:
        return sum(cpu_ticks(p) for p in self.pids) + self.extra()

    def __enter__(self) -> CoreShare:
        self.ours0 = self._ours()
        self.busy0, self.total0 = core_ticks(self.cpu)
        return self

    def __exit__(self, *_: object) -> None:
        busy1, total1 = core_ticks(self.cpu)
        self.ours = self._ours() - self.ours0
        # Ours are pinned, so whatever else kept this core busy was someone else's work.
        self.stolen = max(0, busy1 - self.busy0 - self.ours) / max(1, total1 - self.total0)


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid``, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    if "VmRSS" not in out:
        raise LookupError(f"no VmRSS in /proc/{pid}/status")
    return out


def background_busy(seconds: float = 2.0) -> float:
    """Share (0-1) of all CPUs that something else kept busy just before the run."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, total without guest time

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)
