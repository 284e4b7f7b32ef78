"""A retry budget: retries may add at most ``ratio`` of the recent first-attempt load.

Per-request retry limits do not stop a retry storm: when an upstream is down,
every request retries and the load multiplies exactly when capacity is lowest.
A budget shared by the whole gateway caps retries at ``ratio`` times the first
attempts of the last ``window_s`` seconds, plus a small floor (``min_per_s``)
so a quiet gateway can still retry its occasional failure.

Counts live in per-second buckets on a ring (not one entry per event), so each
call is O(1) amortised and the memory is fixed. No I/O; injected clock; one event loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class RetryBudget:
    def __init__(
        self,
        ratio: float = 0.2,
        min_per_s: float = 1.0,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ratio < 0 or min_per_s < 0:
            raise ValueError("ratio and min_per_s must be ≥ 0")
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.window_s = window_s
        self._clock = clock
        # about one bucket per second; the window is then exact to within one bucket
        self._n = max(1, math.ceil(window_s))
        self._width = window_s / self._n
        self._requests = [0] * self._n
        self._retries = [0] * self._n
        self._total_requests = 0
        self._total_retries = 0
        self._slot: int | None = None  # absolute bucket index of the newest bucket

    def record_request(self) -> None:
        """A first attempt was made (retries are not requests: they must not grow their own budget)."""
        i = self._advance()
        self._requests[i] += 1
        self._total_requests += 1

    def try_spend(self) -> bool:
        """Take one retry from the budget if there is one left; False means do not retry."""
        i = self._advance()
        if self._total_retries + 1 > self._limit():
            return False
        self._retries[i] += 1
        self._total_retries += 1
        return True

    def available(self) -> int:
        """Retries that would be granted right now."""
        self._advance()
        return max(0, math.floor(self._limit() - self._total_retries))

    def snapshot(self) -> dict[str, object]:
        self._advance()
        return {
            "requests_in_window": self._total_requests,
            "retries_in_window": self._total_retries,
            "limit": round(self._limit(), 2),
            "available": self.available(),
        }

    def _limit(self) -> float:
        return self.ratio * self._total_requests + self.min_per_s * self.window_s

    def _advance(self) -> int:
        """Move the ring to now, emptying the buckets that fell out of the window; return now's bucket."""
        slot = math.floor(self._clock() / self._width)
        if self._slot is None:
            self._slot = slot
        elif slot > self._slot:
            # after a quiet spell longer than the window every bucket is stale: clear at most n of them
            for s in range(max(self._slot + 1, slot - self._n + 1), slot + 1):
                j = s % self._n
                self._total_requests -= self._requests[j]
                self._total_retries -= self._retries[j]
                self._requests[j] = self._retries[j] = 0
            self._slot = slot
        # a clock that steps back (it should not: monotonic) just keeps counting into the newest bucket
        return self._slot % self._n
