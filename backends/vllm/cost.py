"""The expected time to first token of a new request at one vLLM endpoint, and its online fit.

vLLM's scheduler runs one engine step at a time: every running sequence decodes a token, and
the prefills waiting their turn fill the rest of the step's token budget, first come first
served. A request sent now gets its first token after the prefill already queued ahead of it,
its own uncached prefill, and steps that grow longer with each running sequence; when the server
is full (as many sequences running as it runs at once, KV cache used up) it also waits for
running decodes to end and free room. In seconds::

    ttft = base_s
         + prefill_s_per_token * (prefill_ahead + uncached)
         + step_s_per_seq      * running
         + full_s_per_token    * full_wait_tokens

``uncached`` is the prompt minus the prefix the endpoint probably holds, so the cache's worth
is ``prefill_s_per_token * cached``, in the same seconds as the queue's cost: an endpoint whose
queue costs more than its cache saves loses the request, whatever the tokens say.

``EndpointLoad`` is one endpoint's state as features; ``expected_ttft`` is the pure model. ``TtftFit``
fits the four coefficients per endpoint from the TTFTs the pool observes: recursive least
squares on scaled features, starting from ``DEFAULTS`` (an 8B model on one data-centre GPU) as a
prior, forgetting old samples, with residuals clipped at three robust deviations (one stalled
stream must not rewrite the model), the covariance bounded (no wind-up while the load is steady)
and each coefficient kept within ``BOUNDS``. Its clock is injected.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: KV-cache use from which an endpoint counts as filling up (0.9 -> 0, 1.0 -> 1)
KV_FULL_FROM = 0.9


@dataclass(frozen=True, slots=True)
class Coefficients:
    """Seconds per unit of each feature."""

    #: a request's fixed cost: the API server, tokenising, one step
    base_s: float
    #: per token of prefill that must run before the first token
    prefill_s_per_token: float
    #: per sequence running there (longer steps)
    step_s_per_seq: float
    #: per decode step a full server must run before it admits the request (its step time)
    full_s_per_token: float

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.base_s, self.prefill_s_per_token, self.step_s_per_seq, self.full_s_per_token)


#: before any sample: ~20k prefill tokens/s, +0.5 ms per running sequence, 20 ms decode steps when full
DEFAULTS = Coefficients(base_s=0.02, prefill_s_per_token=5e-5, step_s_per_seq=5e-4, full_s_per_token=0.02)
#: what a fit may reach: the cache always saves something, nothing is negative, nothing absurd
BOUNDS = (
    Coefficients(base_s=0.0, prefill_s_per_token=1e-7, step_s_per_seq=0.0, full_s_per_token=0.001),
    Coefficients(base_s=10.0, prefill_s_per_token=0.01, step_s_per_seq=0.5, full_s_per_token=1.0),
)


@dataclass(frozen=True, slots=True)
class EndpointLoad:
    """What is queued and running at one endpoint, as the choice sees it."""

    #: prefill tokens ahead of a new request: this gateway's requests without a first token yet,
    #: plus other clients' waiting requests (from the scrape) at a typical size
    prefill_ahead: float = 0.0
    #: sequences running there: ours in flight plus other clients' running (scrape)
    running: float = 0.0
    #: the scrape's ``num_requests_waiting`` (the server's own queue)
    waiting: float = 0.0
    #: the scrape's KV-cache use, 0-1 (None: unknown)
    kv_usage: float | None = None
    #: decode tokens each running sequence still has to generate, on average
    decode_left_per_seq: float = 0.0
    #: sequences the server runs at once (its ``max_num_seqs``, as last seen from a scrape that
    #: showed requests waiting while these ran); None: not seen full yet
    capacity: float | None = None

    @property
    def slots_short(self) -> float:
        """Running sequences that must end before a new request is admitted: those past the
        capacity, and a share of one as the KV cache fills."""
        # Not the scrape's waiting count alone: requests arriving mid-step wait for its end
        # whether or not there is room, so it is rarely zero on a busy server.
        short = self.running + 1 - self.capacity if self.capacity else 0.0
        if self.kv_usage is not None:
            short = max(short, (self.kv_usage - KV_FULL_FROM) / (1 - KV_FULL_FROM))
        return max(0.0, short)

    @property
    def full_wait_tokens(self) -> float:
        """Decode steps until those end: running sequences' remaining decodes spread evenly over
        twice their mean, the k-th of R ends after about 2 k / R of a mean remaining decode."""
        return 2.0 * self.slots_short / max(1.0, self.running) * self.decode_left_per_seq


def features(load: EndpointLoad, uncached_tokens: float) -> tuple[float, float, float, float]:
    """The model's inputs, in the units of ``Coefficients``."""
    return (
        1.0,
        load.prefill_ahead + max(0.0, uncached_tokens),
        load.running,
        load.full_wait_tokens,
    )


@dataclass(frozen=True, slots=True)
class Estimate:
    """One endpoint's expected TTFT for one request, and its parts (seconds)."""

    ttft_s: float
    #: waiting behind others: the queued prefill, the running sequences, a full server
    wait_s: float
    #: the request's own uncached prefill
    prefill_s: float
    #: the prefill the cached prefix saves
    saved_s: float
    features: tuple[float, float, float, float]
    cached_tokens: float = 0.0
    uncached_tokens: float = 0.0


def expected_ttft(
    coefficients: Coefficients, load: EndpointLoad, uncached_tokens: float, cached_tokens: float
) -> Estimate:
    x = features(load, uncached_tokens)
    c = coefficients
    ttft = sum(w * v for w, v in zip(c.as_tuple(), x, strict=True))
    own = c.prefill_s_per_token * max(0.0, uncached_tokens)
    return Estimate(
        ttft_s=ttft,
        wait_s=ttft - c.base_s - own,
        prefill_s=own,
        saved_s=c.prefill_s_per_token * max(0.0, cached_tokens),
        features=x,
        cached_tokens=max(0.0, cached_tokens),
        uncached_tokens=max(0.0, uncached_tokens),
    )


# --- the fit ------------------------------------------------------------------------------------

#: typical magnitudes of the fitted features (1, prefill tokens, running sequences): the fit works
#: on features divided by these, so its covariance compares like with like
_SCALE = (1.0, 1000.0, 10.0)
#: the residual spread assumed before any sample, and the least assumed after (seconds)
_NOISE_S = 0.01
_MIN_NOISE_S = 0.001
#: TTFTs outside this are not evidence of the load (a timed-out or clock-broken sample)
_MAX_SAMPLE_S = 120.0


@dataclass(frozen=True, slots=True)
class Pending:
    """A request whose first token (and end) the fit waits for."""

    started: float
    features: tuple[float, float, float, float]
    first_at: float | None = None


class TtftFit:
    """Per endpoint: the coefficients of ``expected_ttft``, from what the pool observes there.

    ``begin(x)`` when a request is sent, ``first_token(pending)`` when its first bytes arrive,
    ``finished(pending, tokens)`` when a stream ends. ``base_s``, ``prefill_s_per_token`` and
    ``step_s_per_seq`` are recursive least squares of the TTFTs (scaled features, the defaults
    as a prior): an old sample weighs 1/e less every ``forget`` samples; residuals past three
    robust deviations count as three (one stalled stream must not rewrite the model); no
    coefficient's variance may grow past the prior's (no wind-up while the load is steady);
    ``BOUNDS`` hold. ``full_s_per_token`` is not fit from TTFTs (a full server is rare, and its
    wait would be blamed on the other terms): it is the decode step time measured directly,
    a moving average of streams' (end - first token) / tokens. After ``relearn_after_s``
    without samples the covariance goes back to the prior's, so a restarted or retuned server
    is learnt again at full speed.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        prior: Coefficients = DEFAULTS,
        forget: float = 100.0,
        relearn_after_s: float = 300.0,
    ) -> None:
        self._clock = clock
        self._lambda = math.exp(-1.0 / forget)
        self._relearn_after_s = relearn_after_s
        self._lo = [b * s for b, s in zip(BOUNDS[0].as_tuple(), _SCALE, strict=False)]
        self._hi = [b * s for b, s in zip(BOUNDS[1].as_tuple(), _SCALE, strict=False)]
        self._theta = [c * s for c, s in zip(prior.as_tuple(), _SCALE, strict=False)]
        # the prior's spread: each coefficient may well be twice or half its default
        n = len(self._theta)
        self._p0 = [
            [max(t, 1e-6) ** 2 if i == j else 0.0 for j in range(n)] for i, t in enumerate(self._theta)
        ]
        self._p = [row[:] for row in self._p0]
        self._step_s = prior.full_s_per_token
        #: a robust scale of the residuals (seconds), for clipping outliers; it starts small, so
        #: that a first sample that is an outlier cannot set it (it grows ~10% a sample if need be)
        self._spread = _NOISE_S
        self.samples = 0
        self.clipped = 0
        self.decode_samples = 0
        self._last_at: float | None = None

    @property
    def coefficients(self) -> Coefficients:
        base, prefill, step = (t / s for t, s in zip(self._theta, _SCALE, strict=True))
        return Coefficients(base, prefill, step, self._step_s)

    def begin(self, x: Sequence[float]) -> Pending:
        return Pending(self._clock(), (x[0], x[1], x[2], x[3]))

    def first_token(self, pending: Pending) -> Pending:
        """Learn from its TTFT; the returned ``Pending`` remembers when the first token came."""
        now = self._clock()
        self.observe(pending.features, now - pending.started)
        return Pending(pending.started, pending.features, now)

    def finished(self, pending: Pending, tokens: float) -> None:
        """A stream ended after ``tokens`` decode steps: its decode step time."""
        if pending.first_at is None or tokens < 4:
            return
        step = (self._clock() - pending.first_at) / (tokens - 1)
        lo, hi = BOUNDS[0].full_s_per_token, BOUNDS[1].full_s_per_token
        self._step_s = 0.9 * self._step_s + 0.1 * min(hi, max(lo, step))
        self.decode_samples += 1

    def observe(self, x: Sequence[float], ttft_s: float) -> None:
        """One sample: the features a request was sent with and the TTFT it got."""
        if not 0.0 < ttft_s < _MAX_SAMPLE_S or not all(math.isfinite(v) and v >= 0 for v in x):
            return
        now = self._clock()
        if self._last_at is not None and now - self._last_at > self._relearn_after_s:
            self._p = [row[:] for row in self._p0]
        self._last_at = now
        n = len(self._theta)
        z = [v / s for v, s in zip(x, _SCALE, strict=False)]
        # the full server's wait is the measured step time's part; the rest is fit
        target = ttft_s - self._step_s * x[3]
        residual = target - sum(t * v for t, v in zip(self._theta, z, strict=True))
        if abs(residual) > 3 * self._spread:
            residual = math.copysign(3 * self._spread, residual)
            self.clipped += 1
        # the noise's variance in the covariance's units (seconds squared): how far one sample
        # may move the coefficients against the prior
        noise = max(self._spread, _MIN_NOISE_S) ** 2
        self._spread = 0.95 * self._spread + 0.05 * max(abs(residual), 1e-4)
        pz = [sum(self._p[i][j] * z[j] for j in range(n)) for i in range(n)]
        gain = [v / (self._lambda * noise + sum(z[i] * pz[i] for i in range(n))) for v in pz]
        self._theta = [
            min(hi, max(lo, t + g * residual))
            for t, g, lo, hi in zip(self._theta, gain, self._lo, self._hi, strict=True)
        ]
        p = [[(self._p[i][j] - gain[i] * pz[j]) / self._lambda for j in range(n)] for i in range(n)]
        # bounded covariance: forgetting inflates the directions the load never varies in (wind-up);
        # no coefficient may become less certain than the prior made it (D P D keeps P positive)
        d = [min(1.0, math.sqrt(self._p0[i][i] / p[i][i])) if p[i][i] > 0 else 1.0 for i in range(n)]
        self._p = [[p[i][j] * d[i] * d[j] for j in range(n)] for i in range(n)]
        self.samples += 1

    def snapshot(self) -> dict[str, object]:
        """The fit for operators (``/admin/routes``)."""
        c = self.coefficients
        return {
            "base_ms": round(c.base_s * 1000, 3),
            "prefill_ms_per_1k_tokens": round(c.prefill_s_per_token * 1_000_000, 3),
            "step_ms_per_seq": round(c.step_s_per_seq * 1000, 4),
            "decode_step_ms": round(c.full_s_per_token * 1000, 3),
            "samples": self.samples,
            "decode_samples": self.decode_samples,
            "clipped": self.clipped,
            "residual_ms": round(self._spread * 1000, 2) if self.samples else None,
            "last_sample_age_s": None if self._last_at is None else round(self._clock() - self._last_at, 3),
        }


__all__ = [
    "BOUNDS",
    "DEFAULTS",
    "Coefficients",
    "EndpointLoad",
    "Estimate",
    "Pending",
    "TtftFit",
    "expected_ttft",
    "features",
]
