"""How many CPUs this process may really use: the fewest of its affinity mask and its cgroup's
CPU quota. A container started with ``--cpus 2`` on a 64-core host still sees 64 cores; 64
llama.cpp threads there spin against a 2-CPU quota and get throttled in every step.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"


def available_cpus(
    cgroup_root: str | os.PathLike[str] = CGROUP_ROOT,
    proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup",
) -> int:
    """The CPUs this process can keep busy: affinity, cgroup v2 ``cpu.max`` or v1 CFS quota; >= 1."""
    counts = [_affinity()]
    quota = cgroup_quota(Path(cgroup_root), Path(proc_cgroup))
    if quota is not None:
        # rounded down: a thread beyond the quota only makes every step wait for throttled ones
        counts.append(math.floor(quota))
    return max(1, min(counts))


def cgroup_quota(root: Path, proc_cgroup: Path) -> float | None:
    """CPUs' worth of time per period the cgroups allow (the tightest limit), or None for no limit."""
    quotas = [q for q in (_v2(d / "cpu.max") for d in _v2_dirs(root, proc_cgroup)) if q is not None]
    for v1 in (root / "cpu", root / "cpu,cpuacct"):
        quota = _v1(v1 / "cpu.cfs_quota_us", v1 / "cpu.cfs_period_us")
        if quota is not None:
            quotas.append(quota)
            break
    return min(quotas, default=None)


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _v2_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """The mount root (a container's own cgroup) and, outside a cgroup namespace, the process's
    cgroup and its ancestors: a limit set on a parent (a systemd slice) applies too."""
    dirs = [root]
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return dirs
    for line in lines:
        if line.startswith("0::/"):
            here = root / line[4:].strip()
            while here != root and root in here.parents:
                dirs.append(here)
                here = here.parent
    return dirs


def _v2(path: Path) -> float | None:
    """``cpu.max``: ``"<quota> <period>"`` in µs, or ``"max <period>"`` for no limit."""
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" or int(period) <= 0 else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1(quota_path: Path, period_path: Path) -> float | None:
    """cgroup v1: ``cpu.cfs_quota_us`` (-1 for no limit) over ``cpu.cfs_period_us``."""
    try:
        quota, period = int(quota_path.read_text()), int(period_path.read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
