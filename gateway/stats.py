"""Live per-backend figures (latency, pace, errors, load) that the routing policies read.

Each attempt (``gateway.attempts``) reports here: ``started()``, ``first_token()`` once when
its first token arrives (a non-streamed reply's is the whole reply), then ``finished()`` or
``abandoned()``. ``view()`` turns the
figures into the frozen ``policies.base.BackendView`` a policy ranks. No I/O; the
clock is injected so the ageing of old outcomes is testable. One event loop, no locks.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from policies.base import BackendView

#: outcomes older than this no longer say anything about the backend's health now
DEFAULT_MAX_AGE_S = 120.0


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on a sorted list."""
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class _Series:
    """An EWMA (reacts fast, for ranking) plus the last ``window`` values (for quantiles)."""

    def __init__(self, alpha: float, window: int) -> None:
        self.alpha = alpha
        self.ewma: float | None = None
        self.recent: deque[float] = deque(maxlen=window)
        self._sorted: list[float] | None = None  # cached: views are read far more often than written

    def add(self, value: float) -> None:
        self.ewma = value if self.ewma is None else self.ewma + self.alpha * (value - self.ewma)
        self.recent.append(value)
        self._sorted = None

    def quantile(self, q: float) -> float | None:
        if not self.recent:
            return None
        if self._sorted is None:
            self._sorted = sorted(self.recent)
        return _quantile(self._sorted, q)


class _LinearFit:
    """Exponentially weighted least squares of y on x: y ≈ base + slope * x.

    Keeping EW means of x, y, xy and xx makes each update O(1) and lets the fit
    follow a backend whose speed drifts (a warming cache, a neighbour's load).
    """

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.n = 0
        self.mx = self.my = self.mxy = self.mxx = 0.0

    def add(self, x: float, y: float) -> None:
        if self.n == 0:
            self.mx, self.my, self.mxy, self.mxx = x, y, x * y, x * x
        else:
            a = self.alpha
            self.mx += a * (x - self.mx)
            self.my += a * (y - self.my)
            self.mxy += a * (x * y - self.mxy)
            self.mxx += a * (x * x - self.mxx)
        self.n += 1

    def solve(self, fallback_base: float) -> tuple[float, float]:
        """(base, slope), both ≥ 0; (fallback_base, 0) while the x values barely differ."""
        var = self.mxx - self.mx * self.mx
        # prompts of (nearly) one size carry no slope information, only noise: std under ~1% of the mean
        # (one point gives var == 0 exactly)
        if var <= 1.0 + 1e-4 * self.mx * self.mx:
            return max(0.0, fallback_base), 0.0
        slope = (self.mxy - self.mx * self.my) / var
        base = self.my - slope * self.mx
        # constrained refits rather than plain clamps, so the line still passes through the data
        if slope < 0:  # longer prompts are not faster: a flat line at the mean
            return max(0.0, self.my), 0.0
        if base < 0:  # no negative fixed cost: the best line through the origin
            return 0.0, max(0.0, self.mxy / self.mxx)
        return base, slope


class BackendStats:
    def __init__(
        self,
        name: str,
        clock: Callable[[], float] = time.monotonic,
        alpha: float = 0.2,
        window: int = 200,
        max_age_s: float = DEFAULT_MAX_AGE_S,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        if window < 1:
            raise ValueError("window must be at least 1")
        self.name = name
        self._clock = clock
        self._window = window
        self._max_age_s = max_age_s
        self.in_flight = 0
        #: completed requests, successes and failures
        self.samples = 0
        self.ttft = _Series(alpha, window)  # ms
        self.tpot = _Series(alpha, window)  # ms per output token after the first
        self.latency = _Series(alpha, window)  # ms, whole successful requests
        self._fit = _LinearFit(alpha)  # ttft_ms against prompt tokens
        # (time, ok) of recent outcomes, and the failures among them as a running count
        self._outcomes: deque[tuple[float, bool]] = deque()
        self._failures = 0

    # -- reports from the router ----------------------------------------------------------------

    def started(self) -> None:
        self.in_flight += 1

    def first_token(self, prompt_tokens: int, ttft_s: float) -> None:
        """An attempt's first token came ``ttft_s`` after it started; ``prompt_tokens`` is the
        estimate policies predict from."""
        ttft_ms = ttft_s * 1000
        self.ttft.add(ttft_ms)
        self._fit.add(float(prompt_tokens), ttft_ms)

    def finished(
        self,
        ok: bool,
        completion_tokens: int = 0,
        total_s: float | None = None,
        ttft_s: float | None = None,
    ) -> None:
        """One attempt ended; with ``total_s`` and its ``ttft_s`` it gives the pace of the tokens
        after the first."""
        self.in_flight = max(0, self.in_flight - 1)
        self.samples += 1
        self._record_outcome(ok)
        if not ok or total_s is None:
            return  # a failed request's duration is a timeout or an error, not the backend's speed
        self.latency.add(total_s * 1000)
        if ttft_s is not None and completion_tokens > 1 and total_s > ttft_s:
            # total == ttft means the reply came in one piece (not streamed): no pace to learn
            self.tpot.add((total_s - ttft_s) * 1000 / (completion_tokens - 1))

    def abandoned(self) -> None:
        """An attempt ended with no verdict on the backend (the client left, a hedge lost, the
        client's own bad request): it leaves the in-flight count and nothing else."""
        self.in_flight = max(0, self.in_flight - 1)

    # -- figures ---------------------------------------------------------------------------------

    @property
    def recent_samples(self) -> int:
        self._expire()
        return len(self._outcomes)

    @property
    def error_rate(self) -> float:
        self._expire()
        return self._failures / len(self._outcomes) if self._outcomes else 0.0

    def ttft_model(self) -> tuple[float | None, float]:
        """(base ms, ms per prompt token); (None, 0) before any TTFT sample."""
        if self.ttft.ewma is None:
            return None, 0.0
        return self._fit.solve(self.ttft.ewma)

    def view(
        self,
        price_in: float,
        price_out: float,
        capacity: int | None,
        in_flight: int | None = None,
    ) -> BackendView:
        """The snapshot a policy ranks; ``in_flight`` from the backend's own load() is fresher when given."""
        base, per_token = self.ttft_model()
        return BackendView(
            name=self.name,
            # recent samples only: a backend nobody has used for max_age_s is cold again, so the
            # policies explore it rather than judge it forever on figures from long ago
            samples=self.recent_samples,
            ttft_ms=self.ttft.ewma,
            ttft_p50_ms=self.ttft.quantile(0.5),
            ttft_p95_ms=self.ttft.quantile(0.95),
            tpot_ms=self.tpot.ewma,
            ttft_base_ms=base,
            ttft_per_token_ms=per_token,
            error_rate=self.error_rate,
            in_flight=self.in_flight if in_flight is None else in_flight,
            capacity=capacity,
            input_per_mtok=price_in,
            output_per_mtok=price_out,
        )

    def snapshot(self) -> dict[str, object]:
        """The figures for an admin endpoint, rounded for reading."""

        def r(value: float | None, digits: int = 2) -> float | None:
            return None if value is None else round(value, digits)

        base, per_token = self.ttft_model()
        return {
            "name": self.name,
            "in_flight": self.in_flight,
            "samples": self.samples,
            "recent_samples": self.recent_samples,
            "recent_outcomes": len(self._outcomes),
            "error_rate": round(self.error_rate, 4),
            "ttft_ms": r(self.ttft.ewma),
            "ttft_p50_ms": r(self.ttft.quantile(0.5)),
            "ttft_p95_ms": r(self.ttft.quantile(0.95)),
            "ttft_base_ms": r(base),
            "ttft_per_token_ms": r(per_token, 4),
            "tpot_ms": r(self.tpot.ewma, 3),
            "latency_ms": r(self.latency.ewma),
            "latency_p50_ms": r(self.latency.quantile(0.5)),
            "latency_p95_ms": r(self.latency.quantile(0.95)),
        }

    # -- internals -------------------------------------------------------------------------------

    def _record_outcome(self, ok: bool) -> None:
        if len(self._outcomes) >= self._window and not self._outcomes.popleft()[1]:
            self._failures -= 1
        self._outcomes.append((self._clock(), ok))
        self._failures += not ok
        self._expire()

    def _expire(self) -> None:
        # a backend that failed ten minutes ago and has been idle since is not 100% broken now
        horizon = self._clock() - self._max_age_s
        while self._outcomes and self._outcomes[0][0] < horizon:
            if not self._outcomes.popleft()[1]:
                self._failures -= 1
