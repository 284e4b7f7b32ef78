"""A circuit breaker per backend: stop sending traffic to an upstream that is failing.

    closed ──(failure rate over the window, N failures in a row, or a Retry-After)──▶ open
    open ──(cool-down elapsed; noticed lazily by allow()/state)──▶ half_open
    half_open ──(successes_to_close probe successes)──▶ closed (window cleared)
    half_open ──(any failure)──▶ open, with the cool-down doubled (capped)
    open ──(probe_early(): every candidate of a route is open)──▶ half_open at once
    any ──(open_for(s): another replica saw it fail)──▶ open; any ──(reset(): one's probe passed)──▶ closed

No I/O and no tasks: time comes from an injected monotonic clock, so every
transition is a table test. It is meant for one event loop (no locks). Only
failures of the upstream count (see ``counts_as_failure``): a client's bad
request says nothing about the backend's health.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from backends.errors import InterlockError

log = logging.getLogger(__name__)

State = Literal["closed", "open", "half_open"]
Listener = Callable[[str, State, State], None]

#: an upstream's Retry-After is obeyed above our own cap (it knows its outage), but not beyond this
MAX_RETRY_AFTER_S = 3600.0


class BreakerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: calls kept in the sliding window for the failure-rate rule
    window: int = Field(default=20, ge=1)
    #: the failure-rate rule applies only once the window holds this many (one early failure is not 100%)
    min_calls: int = Field(default=5, ge=1)
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    consecutive_failures: int = Field(default=5, ge=1)
    cooldown_s: float = Field(default=10.0, gt=0)
    #: the cool-down doubles each time a half-open probe fails, up to this
    max_cooldown_s: float = Field(default=120.0, gt=0)
    #: probe requests admitted at once while half-open
    half_open_probes: int = Field(default=2, ge=1)
    successes_to_close: int = Field(default=2, ge=1)
    #: open at once, for that long, when a failure carries a Retry-After (a 502/504 that says when
    #: to come back); a busy upstream's 429/503 is not a failure and opens nothing
    open_on_retry_after: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.min_calls > self.window:
            raise ValueError("min_calls must not exceed window (the failure-rate rule would never apply)")
        if self.max_cooldown_s < self.cooldown_s:
            raise ValueError("max_cooldown_s must be at least cooldown_s")
        return self


def counts_as_failure(exc: BaseException) -> bool:
    """Whether an attempt's exception says the backend is unhealthy.

    Upstream faults (connect errors, timeouts, 5xx, 408) count. These do not: a
    client's mistake (InvalidRequest, an upstream 4xx), a client going away
    (CancelledError), a backend that is busy rather than broken (queue full, an
    upstream 429/503: ``busy``), and any other exception, which is a bug of the
    gateway's own code and must not shut a healthy backend off for everyone.
    """
    return isinstance(exc, InterlockError) and exc.retryable and not exc.busy


class CircuitBreaker:
    def __init__(
        self, name: str, config: BreakerConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.name = name
        self.config = config or BreakerConfig()
        self._clock = clock
        #: called as (name, old_state, new_state) on every transition; for logs and metrics
        self.listeners: list[Listener] = []
        #: asked before a half-open probe is admitted; False keeps the probe slots shut for now
        #: (across replicas: another one holds this backend's probe lease). None: always admit
        self.probe_gate: Callable[[], bool] | None = None
        self._state: State = "closed"
        # closed: outcomes of the last `window` calls (True = failure), failures kept as a running count
        self._window: deque[bool] = deque(maxlen=self.config.window)
        self._failures = 0
        self._consecutive = 0
        # open: when a probe may go, and how long the last cool-down was
        self._open_until = 0.0
        self._cooldown = 0.0
        # how many times half-open probes failed since the last close: the cool-down doubles per reopen
        self._reopens = 0
        self._trips = 0
        # half-open
        self._probes = 0
        self._probe_successes = 0

    # -- queries ------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        self._maybe_half_open()
        return self._state

    def retry_in(self) -> float:
        """Seconds until a probe would be admitted: 0 when closed or half-open.

        Half-open with every probe slot taken also answers 0: the slot frees when
        a probe ends, which has no date; a caller rendering Retry-After should floor it.
        """
        if self.state != "open":
            return 0.0
        return max(0.0, self._open_until - self._clock())

    def allow(self) -> bool:
        """Whether a request may go to this backend now; in half-open this reserves a probe slot,
        which ``on_success``/``on_failure``/``release`` gives back."""
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            return False
        if self._probes >= self.config.half_open_probes:
            return False
        if self.probe_gate is not None and not self.probe_gate():
            return False
        self._probes += 1
        return True

    def probe_early(self) -> bool:
        """Admit a probe now although the cool-down has not ended, within ``half_open_probes``
        probes at once (the circuit turns half-open early). For a route whose every candidate
        is open: a backend that flaps is found up by the next request, not after a cool-down
        that may have doubled to minutes, and the trickle stays bounded by the probe slots."""
        if self.state == "open":
            self._open_until = self._clock()
            self._maybe_half_open()
        return self.allow()

    def open_for(self, seconds: float) -> None:
        """Open now for ``seconds``: another replica's breaker opened on this backend. From
        half-open it counts as a failed probe of ours (the next cool-down of ours doubles);
        already open, the wait can only lengthen."""
        seconds = min(max(0.0, seconds), MAX_RETRY_AFTER_S)
        state = self.state
        if state == "open":
            self._open_until = max(self._open_until, self._clock() + seconds)
            return
        if state == "half_open":
            self._reopens += 1
        self._cooldown = seconds
        self._open_until = self._clock() + seconds
        self._probes = 0
        self._probe_successes = 0
        self._trips += 1
        self._transition("open")

    def reset(self) -> None:
        """Close now, the window cleared: another replica's probes found the backend well."""
        if self.state != "closed":
            self._close()

    def reconfigure(self, config: BreakerConfig) -> None:
        """New settings, the state kept (a reload): the window keeps its newest outcomes."""
        if self.config == config:
            return
        self.config = config
        if self._window.maxlen != config.window:
            # a deque's length is fixed when it is made: the newest outcomes go into a new one
            self._window = deque(self._window, maxlen=config.window)
            self._failures = sum(self._window)

    def snapshot(self) -> dict[str, object]:
        state = self.state
        calls = len(self._window)
        return {
            "name": self.name,
            "state": state,
            "retry_in_s": round(self.retry_in(), 3),
            "calls_in_window": calls,
            "failures_in_window": self._failures,
            "failure_rate": round(self._failures / calls, 4) if calls else 0.0,
            "consecutive_failures": self._consecutive,
            "cooldown_s": round(self._cooldown, 3),
            "trips": self._trips,
            "probes_in_flight": self._probes,
            "probe_successes": self._probe_successes,
        }

    # -- outcomes -----------------------------------------------------------------------------

    def release(self) -> None:
        """A request ended without a verdict on the backend (client cancelled, client 4xx)."""
        if self.state == "half_open":
            self._probes = max(0, self._probes - 1)

    def on_success(self) -> None:
        state = self.state
        if state == "closed":
            self._record(failed=False)
        elif state == "half_open":
            self._probes = max(0, self._probes - 1)
            self._probe_successes += 1
            if self._probe_successes >= self.config.successes_to_close:
                self._close()
        # open: a request admitted before the trip finished late; one success does not undo the trip

    def on_failure(self, retry_after: float | None = None) -> None:
        state = self.state
        if state == "closed":
            self._record(failed=True)
            cfg = self.config
            calls = len(self._window)
            # a division, not failures >= rate * calls: 0.3 * 10 is 3.0000000000000004 in floats
            by_rate = calls >= cfg.min_calls and self._failures / calls >= cfg.failure_rate
            # A failing upstream that said when to come back is believed at once: sending more
            # before then only earns more failures.
            told_to_wait = cfg.open_on_retry_after and retry_after is not None and retry_after > 0
            if by_rate or self._consecutive >= cfg.consecutive_failures or told_to_wait:
                self._open(retry_after)
        elif state == "half_open":
            # the backend is still sick: back off harder so probes do not hammer it
            self._reopens += 1
            self._open(retry_after)
        elif retry_after is not None:
            # already open: a late failure can only lengthen the wait the upstream asked for
            self._open_until = max(self._open_until, self._clock() + min(retry_after, MAX_RETRY_AFTER_S))

    # -- internals ----------------------------------------------------------------------------

    def _record(self, *, failed: bool) -> None:
        if len(self._window) == self._window.maxlen and self._window[0]:
            self._failures -= 1  # the oldest outcome is about to fall out of the window
        self._window.append(failed)
        self._failures += failed
        self._consecutive = self._consecutive + 1 if failed else 0

    def _open(self, retry_after: float | None) -> None:
        cfg = self.config
        cooldown = min(cfg.cooldown_s * 2**self._reopens, cfg.max_cooldown_s)
        if retry_after is not None and retry_after > 0:
            # the upstream said when to come back: obey it even above our cap, within reason
            cooldown = max(cooldown, min(retry_after, MAX_RETRY_AFTER_S))
        self._cooldown = cooldown
        self._open_until = self._clock() + cooldown
        self._probes = 0
        self._probe_successes = 0
        self._trips += 1
        self._transition("open")

    def _close(self) -> None:
        # a fresh start: the failures that tripped it must not trip it again on the next blip
        self._window.clear()
        self._failures = 0
        self._consecutive = 0
        self._reopens = 0
        self._probes = 0
        self._probe_successes = 0
        self._transition("closed")

    def _maybe_half_open(self) -> None:
        # no timers: the cool-down's end is noticed by whoever looks next
        if self._state == "open" and self._clock() >= self._open_until:
            self._probes = 0
            self._probe_successes = 0
            self._transition("half_open")

    def _transition(self, new: State) -> None:
        old, self._state = self._state, new  # callers only ever move to a different state
        log.log(
            logging.INFO if new == "closed" else logging.WARNING,
            "circuit of backend %s: %s -> %s",
            self.name,
            old,
            new,
        )
        for listener in list(self.listeners):
            try:
                listener(self.name, old, new)
            except Exception:  # a broken metrics hook must not break routing
                log.exception("breaker listener failed for %s (%s -> %s)", self.name, old, new)
