"""Reading a vLLM server's ``/metrics`` page: the few load signals the pool routes by.

The page is Prometheus text (``name{label="v",...} value [timestamp]``), about 600 lines
on vLLM 0.26. Only five series matter here, each summed over its label sets (one per
``engine`` with data parallelism, one per ``model_name``); names changed across releases,
so each signal has an alias list, newest first, and a pool may mix versions:

    running          vllm:num_requests_running
    waiting          vllm:num_requests_waiting
    kv_cache_usage   vllm:kv_cache_usage_perc        (<= 0.10: vllm:gpu_cache_usage_perc)
    prefix_queries   vllm:prefix_cache_queries_total (older: vllm:gpu_prefix_cache_queries[_total])
    prefix_hits      vllm:prefix_cache_hits_total    (older: vllm:gpu_prefix_cache_hits[_total])

``kv_cache_usage`` is a fraction (0-1) per engine, so it is averaged over label sets, not
summed. The prefix counters count tokens; their hit rate comes from the deltas between two
scrapes (``PrefixRate``), since lifetime totals say little about the cache's state now.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: signal -> metric names, newest first; the first name present in a page wins
ALIASES: dict[str, tuple[str, ...]] = {
    "running": ("vllm:num_requests_running",),
    "waiting": ("vllm:num_requests_waiting",),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "prefix_queries": (
        "vllm:prefix_cache_queries_total",
        "vllm:gpu_prefix_cache_queries_total",
        "vllm:gpu_prefix_cache_queries",
    ),
    "prefix_hits": (
        "vllm:prefix_cache_hits_total",
        "vllm:gpu_prefix_cache_hits_total",
        "vllm:gpu_prefix_cache_hits",
    ),
}
_AVERAGED = {"kv_cache_usage"}
_WANTED = {name for names in ALIASES.values() for name in names}


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """One scrape's signals; None where the page had no such series."""

    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None
    prefix_queries: float | None = None
    prefix_hits: float | None = None


def parse_metrics(text: str) -> MetricsSnapshot:
    """The load signals of a Prometheus text page (unknown lines and malformed samples are skipped)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):  # comments, blank lines, python_*/process_*/http_*
            continue
        sample = _sample(line)
        if sample is None:
            continue
        name, value = sample
        if name in _WANTED:
            sums[name] = sums.get(name, 0.0) + value
            counts[name] = counts.get(name, 0) + 1
    values: dict[str, float | None] = {}
    for signal, names in ALIASES.items():
        found = next((n for n in names if n in counts), None)
        if found is None:
            values[signal] = None
        elif signal in _AVERAGED:
            values[signal] = sums[found] / counts[found]
        else:
            values[signal] = sums[found]
    return MetricsSnapshot(**values)


def _sample(line: str) -> tuple[str, float] | None:
    """``(name, value)`` of one sample line; labels may hold quoted ``}``, spaces and escapes."""
    brace = line.find("{")
    space = line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        name = line[:brace]
        i, quoted = brace + 1, False
        while i < len(line):
            char = line[i]
            if quoted:
                if char == "\\":
                    i += 1
                elif char == '"':
                    quoted = False
            elif char == '"':
                quoted = True
            elif char == "}":
                break
            i += 1
        else:
            return None  # no closing brace
        rest = line[i + 1 :]
    elif space != -1:
        name, rest = line[:space], line[space:]
    else:
        return None
    fields = rest.split()
    if not fields:
        return None
    try:
        value = float(fields[0])  # accepts NaN, +Inf, -Inf, 1e+09
    except ValueError:
        return None
    if math.isnan(value):
        return None
    return name, value


class PrefixRate:
    """Prefix-cache hit rate (0-1) from the deltas of the hits and queries counters.

    The first scrape gives the lifetime ratio; each later one the ratio over the tokens
    queried since the previous scrape, keeping the last rate while nothing was queried.
    A counter that went down (the server restarted) counts from zero again.
    """

    def __init__(self) -> None:
        self.rate: float | None = None
        self._last: tuple[float, float] | None = None

    def update(self, queries: float | None, hits: float | None) -> float | None:
        if queries is None or hits is None:
            return self.rate
        if self._last is None or queries < self._last[0] or hits < self._last[1]:
            delta_q, delta_h = queries, hits
        else:
            delta_q, delta_h = queries - self._last[0], hits - self._last[1]
        self._last = (queries, hits)
        if delta_q > 0:
            self.rate = min(1.0, max(0.0, delta_h / delta_q))
        return self.rate
