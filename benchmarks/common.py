"""What the benchmark scripts share: a free port, the commit a run measured, percentiles, an SSE
reader for OpenAI-style streams and a process's CPU time from /proc.

Standard library only, so that it runs on the GPU machines with nothing but the staged wheels
(``PYTHONPATH=/tmp/site:.``). The scripts run by path (``.venv/bin/python benchmarks/x/y.py``);
each puts the repository root on ``sys.path`` before ``from benchmarks.common import ...``.
Nothing here comes from ``tests/``: a benchmark that needs a test fake starts it as a process.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (free now; bind it soon)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def git_commit(*, short: bool = False) -> str:
    """The checkout's HEAD, with " (with uncommitted changes)" when tracked files differ from it;
    "unknown (not a git checkout)" where git or the repository is missing (a device's copy)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", *(["--short"] if short else []), "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"{sha} (with uncommitted changes)" if dirty else sha


def percentile(
    values: Sequence[float], q: float, *, method: Literal["linear", "nearest"] = "linear"
) -> float | None:
    """The ``q`` quantile (0..1) of ``values``; None for no values.

    ``linear``: interpolation between the closest ranks (numpy's default). ``nearest``: the
    nearest-rank definition, always an observed value (with 24 samples p95 is the 23rd).
    """
    if not values:
        return None
    ordered = sorted(values)
    if method == "nearest":
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def sse_data(line: bytes) -> bytes | None:
    """The payload of one SSE ``data:`` line, stripped; None for any other line (blank
    separators, ``: ping`` comments, ``event:`` lines)."""
    line = line.strip()
    return line[5:].strip() if line.startswith(b"data:") else None


class SseStream:
    """Reads an OpenAI-style event stream: ``data:`` events as JSON until ``data: [DONE]``.

    ``async for event in stream.events(response.content)`` (aiohttp splits a body on newlines);
    afterwards ``done`` says whether ``[DONE]`` came, and ``first_data_at`` is the
    ``time.perf_counter()`` of the first ``data:`` line of any kind (None if none came). A payload
    that is not JSON raises ``json.JSONDecodeError``; what follows ``[DONE]`` is not read.
    """

    def __init__(self) -> None:
        self.done = False
        self.first_data_at: float | None = None

    async def events(self, lines: AsyncIterable[bytes]) -> AsyncIterator[dict[str, Any]]:
        async for raw in lines:
            data = sse_data(raw)
            if data is None:
                continue
            if self.first_data_at is None:
                self.first_data_at = time.perf_counter()
            if data == b"[DONE]":
                self.done = True
                return
            event: dict[str, Any] = json.loads(data)
            yield event


_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """Seconds of CPU one process (all its threads) has used, user and system; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
