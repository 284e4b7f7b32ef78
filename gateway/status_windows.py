"""Rolling 1- and 5-minute figures for the status page, kept so that recording costs next to nothing.

Each backend and each route has plain cumulative counters and a histogram of latencies in
log-spaced bins. An event (an attempt ending, a request ending) is a few additions and, at most
once per ``SLOT_S`` per figure set, a *mark*: a copy of the counters taken at the first event of
a slot, before that event counts. Nothing happens between the previous event and a mark, so a
mark is the exact state at its slot's start, and the state stays that of the next mark from the
end of a slot until that next mark. A figure over the last W seconds is then the live counters
minus the state W seconds ago, read from the marks at request time: exact counts over a span of
W (up to W + ``SLOT_S`` where W ago falls inside a slot that had events), in O(bins) per read.

Latencies land in bins a sixth of an octave wide (0.1 ms to about 3.5 min), so a quantile read
from them is within one bin, about 12%, of the true one. Everything runs on the event loop's
thread: no locks.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from itertools import accumulate
from operator import sub
from typing import ClassVar

#: upper bounds of the latency bins, in seconds; a last bin holds everything above
BIN_BOUNDS: tuple[float, ...] = tuple(1e-4 * 2 ** (i / 6) for i in range(127))
_BINS = len(BIN_BOUNDS) + 1
SLOT_S = 5.0
#: the windows the page shows, by label
WINDOWS: dict[str, float] = {"1m": 60.0, "5m": 300.0}
#: enough marks of distinct slots to span the longest window and one slot more
_MARKS = int(max(WINDOWS.values()) / SLOT_S) + 2

Mark = tuple[float, tuple[int, ...], list[int]]


def quantiles(bins: list[int], qs: tuple[float, ...]) -> list[float | None]:
    """The ``qs`` quantiles (0..1) of the values counted in ``bins``, each interpolated within its
    bin; None for each when there are none."""
    cumulative = list(accumulate(bins))
    total = cumulative[-1]
    if total == 0:
        return [None] * len(qs)
    found: list[float | None] = []
    for q in qs:
        rank = q * total
        index = bisect_left(cumulative, rank) if rank > 0 else next(i for i, c in enumerate(bins) if c)
        count = bins[index]
        seen = cumulative[index] - count
        low = BIN_BOUNDS[index - 1] if index else 0.0
        high = BIN_BOUNDS[index] if index < len(BIN_BOUNDS) else low
        found.append(low + (high - low) * max(0.0, rank - seen) / count)
    return found


class Figures:
    """Cumulative counters (the class's ``FIELDS``), one latency histogram, and their marks."""

    __slots__ = ("bins", "marks", "next_mark")
    FIELDS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, since: float) -> None:
        """``since``: when recording began; nothing of this figure set happened before it."""
        self.bins = [0] * _BINS
        self.marks: deque[Mark] = deque(maxlen=_MARKS)
        self.marks.append((since, (0,) * len(self.FIELDS), [0] * _BINS))
        self.next_mark = 0.0  # the first event marks

    def mark(self, now: float) -> None:
        """Called before an event counts, once ``now`` has passed ``next_mark``."""
        start = max(now - now % SLOT_S, self.marks[-1][0])
        self.marks.append((start, self.counters(), self.bins[:]))
        self.next_mark = now - now % SLOT_S + SLOT_S

    def counters(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in self.FIELDS)

    def window(self, now: float, seconds: float) -> tuple[float, dict[str, int], list[int]]:
        """(span in seconds, counter deltas by name, histogram deltas) over the last ``seconds``."""
        start, counters, bins = self._state_at(now - seconds)
        live = self.counters()
        deltas = {name: live[i] - counters[i] for i, name in enumerate(self.FIELDS)}
        return max(now - start, 1e-9), deltas, list(map(sub, self.bins, bins))

    def _state_at(self, t: float) -> Mark:
        later: Mark | None = None
        for mark in reversed(self.marks):
            if mark[0] <= t:
                if t < mark[0] + SLOT_S:
                    return mark  # inside a slot that had events: start the window at its start
                # past that slot nothing happened until the next mark (or until now)
                if later is None:
                    return (t, self.counters(), self.bins)
                return (t, later[1], later[2])
            later = mark
        return self.marks[0]  # recording began less than ``seconds`` ago


class BackendFigures(Figures):
    """One backend's attempts (retries and hedges included): ended ok or failed, completion
    tokens of the ok ones, and time to first token in the histogram."""

    __slots__ = ("failed", "last_error", "last_error_at", "ok", "tokens")
    FIELDS = ("ok", "failed", "tokens")

    def __init__(self, since: float) -> None:
        self.ok = self.failed = self.tokens = 0
        #: the last failure (or busy refusal) it gave, and when (wall clock)
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        super().__init__(since)

    def read(self, now: float, seconds: float) -> dict[str, float | None]:
        span, d, bins = self.window(now, seconds)
        ended = d["ok"] + d["failed"]
        p50, p95 = quantiles(bins, (0.5, 0.95))
        return {
            "rps": ended / span,
            "error_rate": d["failed"] / ended if ended else None,
            "ttft_p50_ms": p50 * 1000 if p50 is not None else None,
            "ttft_p95_ms": p95 * 1000 if p95 is not None else None,
            "tokens_per_s": d["tokens"] / span,
            "span_s": span,
        }


class RouteFigures(Figures):
    """One route's requests: all of them, errors (5xx, streams ended by an error event), 429s,
    cache hits, answers from a fallback; the histogram holds answered requests' durations."""

    __slots__ = ("cache_hits", "errors", "fallbacks", "limited", "requests")
    FIELDS = ("requests", "errors", "limited", "cache_hits", "fallbacks")

    def __init__(self, since: float) -> None:
        self.requests = self.errors = self.limited = self.cache_hits = self.fallbacks = 0
        super().__init__(since)

    def read(self, now: float, seconds: float) -> dict[str, float | None]:
        span, d, bins = self.window(now, seconds)
        n = d["requests"]
        (p95,) = quantiles(bins, (0.95,))
        return {
            "rps": n / span,
            "p95_ms": p95 * 1000 if p95 is not None else None,
            "error_rate": d["errors"] / n if n else None,
            "cache_hit_rate": d["cache_hits"] / n if n else None,
            "rate_limited_rate": d["limited"] / n if n else None,
            "fallbacks": d["fallbacks"],
            "span_s": span,
        }


class Windows:
    """Every backend's and route's figures, by name (a reload that keeps a name keeps its figures)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.since = clock()
        self.backends: dict[str, BackendFigures] = {}
        self.routes: dict[str, RouteFigures] = {}

    def backend(self, name: str) -> BackendFigures:
        found = self.backends.get(name)
        if found is None:
            found = self.backends[name] = BackendFigures(self.since)
        return found

    def route(self, name: str) -> RouteFigures:
        found = self.routes.get(name)
        if found is None:
            found = self.routes[name] = RouteFigures(self.since)
        return found
