"""The limit arithmetic, and the tier that keeps it in this process's memory.

Three kinds of check, each a pure function of its state and the time (``gcra``, ``take``,
``leases``): the Redis script (``gateway.limits_redis``) does the same sums in Lua, and
``MemoryTier`` runs them here, for a gateway without Redis and for a replica that lost it (each
replica then enforces its share, ``scale``: 1 / the live replicas). Times are seconds on an
injected clock.

GCRA (the generic cell rate algorithm, https://en.wikipedia.org/wiki/Generic_cell_rate_algorithm):
one number per scope, the theoretical arrival time ``tat``; a request at ``now`` is admitted if
``max(tat, now) + interval - burst * interval <= now``. No window, hence no burst at a window's
edge, and the refusal knows exactly when the next request would pass.

Token buckets (tokens per minute, dollars per period) hold a level that refills at
``capacity / period`` up to ``capacity``; admission takes the reservation, settling gives the
surplus back or takes the deficit (the level may go below zero: the next requests wait it out).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

CheckKind = Literal["rpm", "tpm", "usd", "parallel"]


@dataclass(frozen=True, slots=True)
class Check:
    """One limit one request must pass: a kind, where its state lives, its figures."""

    kind: CheckKind
    #: the state's key (in Redis: under the tenant's hash tag)
    key: str
    #: what a refusal names: ``key team-a`` or ``key team-a, model chat``
    scope: str
    #: requests, tokens or dollars per ``period_s``; for ``parallel``, leases at once
    limit: float
    #: the refill period (rpm, tpm: 60; usd: its period); for ``parallel``, the lease TTL
    period_s: float
    #: rpm only: requests that may come at once
    burst: float = 1.0
    #: tokens or dollars this request reserves
    cost: float = 1.0
    on_failure: str = "local"


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    #: requests, tokens or dollars left (leases free) after this request
    remaining: float
    #: seconds until the scope is back to its full limit
    reset_s: float
    #: seconds until this request would pass (0: it did)
    retry_s: float


#: a spent bucket refuses even a request that reserves nothing
_EMPTY = 1e-9


def gcra(tat: float, now: float, interval: float, burst: float) -> tuple[bool, float, Verdict]:
    """(admitted, the new tat, the verdict) for one request."""
    tat = max(tat, now)
    new = tat + interval
    allow_at = new - burst * interval
    if allow_at > now + 1e-9:
        remaining = max(0, math.floor((now + burst * interval - tat) / interval + 1e-9))
        return False, tat, Verdict(False, remaining, tat - now, allow_at - now)
    remaining = max(0, math.floor((now + burst * interval - new) / interval + 1e-9))
    return True, new, Verdict(True, remaining, new - now, 0.0)


def refill(level: float | None, at: float, now: float, capacity: float, rate: float) -> float:
    """The level of a bucket last seen at ``level`` (None: never used, so full) at ``at``."""
    if level is None:
        return capacity
    return min(capacity, level + max(0.0, now - at) * rate)


def take(level: float, capacity: float, rate: float, cost: float) -> tuple[bool, float, Verdict]:
    """(admitted, the new level, the verdict) for a reservation of ``cost`` from a bucket at ``level``."""
    need = max(cost, _EMPTY)
    if cost > capacity:
        return False, level, Verdict(False, max(0.0, level), (capacity - level) / rate, capacity / rate)
    if level < need:
        return False, level, Verdict(False, max(0.0, level), (capacity - level) / rate, (need - level) / rate)
    level -= cost
    return True, level, Verdict(True, level, (capacity - level) / rate, 0.0)


def leases(held: dict[str, float], now: float, limit: float, lease: str, ttl: float) -> tuple[bool, Verdict]:
    """Admit ``lease`` into ``held`` (lease -> expiry, expired ones dropped) if under ``limit``."""
    for name in [n for n, expiry in held.items() if expiry <= now]:
        del held[name]
    if len(held) >= limit:
        soonest = min(held.values()) - now
        return False, Verdict(False, 0, soonest, min(1.0, soonest))
    held[lease] = now + ttl
    return True, Verdict(True, limit - len(held), 0.0, 0.0)


@dataclass(slots=True)
class _Bucket:
    level: float
    at: float


@dataclass
class MemoryTier:
    """Every check's state in a dict; one event loop, so each ``admit`` is atomic already."""

    clock: Callable[[], float] = time.time
    _tats: dict[str, float] = field(default_factory=dict)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _leases: dict[str, dict[str, float]] = field(default_factory=dict)
    #: key -> (the share of its limit left, when Redis last said so): where a fallback starts
    seeds: dict[str, float] = field(default_factory=dict)

    def admit(self, checks: list[Check], lease: str, scale: float = 1.0) -> tuple[bool, list[Verdict]]:
        """All of ``checks`` or none: a refusal by one takes nothing from the others."""
        now = self.clock()
        verdicts: list[Verdict] = []
        tats: list[tuple[str, float]] = []
        levels: list[tuple[str, float]] = []
        held_by: list[dict[str, float]] = []
        for check in checks:
            limit = check.limit * scale
            if check.kind == "rpm":
                interval = check.period_s / limit
                burst = max(1.0, check.burst * scale)
                tat = self._tats.get(check.key)
                if tat is None:
                    left = self.seeds.get(check.key, 1.0)  # Redis's last word, else a full burst
                    tat = now + (1.0 - left) * burst * interval
                ok, new_tat, verdict = gcra(tat, now, interval, burst)
                if ok:
                    tats.append((check.key, new_tat))
            elif check.kind == "parallel":
                held = self._leases.setdefault(check.key, {})
                ok, verdict = leases(held, now, max(1.0, math.floor(limit)), lease, check.period_s)
                if ok:
                    held_by.append(held)
            else:
                rate = limit / check.period_s
                bucket = self._buckets.get(check.key)
                if bucket is None:
                    level = limit * self.seeds.get(check.key, 1.0)
                else:
                    level = refill(bucket.level, bucket.at, now, limit, rate)
                ok, new_level, verdict = take(level, limit, rate, check.cost)
                if ok:
                    levels.append((check.key, new_level))
            verdicts.append(verdict)
        admitted = all(v.ok for v in verdicts)
        if admitted:
            self._tats.update(tats)
            for key, level in levels:
                self._put(key, level, now)
        else:
            for held in held_by:  # ``leases`` took a slot: give it back
                held.pop(lease, None)
        return admitted, verdicts

    def settle(self, check: Check, delta: float, scale: float = 1.0) -> None:
        """Give ``delta`` back to a bucket (negative: take the deficit)."""
        now = self.clock()
        limit = check.limit * scale
        bucket = self._buckets.get(check.key)
        level = refill(
            bucket.level if bucket else None, bucket.at if bucket else now, now, limit, limit / check.period_s
        )
        self._put(check.key, min(limit, level + delta), now)

    def hold(self, check: Check, lease: str) -> None:
        """Count ``lease`` as holding one of ``check``'s slots (one admitted elsewhere), for its TTL."""
        self._leases.setdefault(check.key, {})[lease] = self.clock() + check.period_s

    def release(self, check: Check, lease: str) -> None:
        self._leases.get(check.key, {}).pop(lease, None)

    def renew(self, check: Check, lease: str) -> None:
        held = self._leases.get(check.key)
        if held is not None and lease in held:
            held[lease] = self.clock() + check.period_s

    def forget(self) -> None:
        """Drop every state (after Redis came back, a later outage starts from its new word)."""
        self._tats.clear()
        self._buckets.clear()
        self._leases.clear()

    def _put(self, key: str, level: float, now: float) -> None:
        self._buckets[key] = _Bucket(level, now)
