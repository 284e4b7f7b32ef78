"""Active health checks and the readiness verdict.

Every ``interval_s`` each backend's ``health()`` runs (bounded by ``timeout_s``); a backend
that failed its last check, or was never checked, is asked again every ``recheck_s``, so a
model that finished loading or an upstream that came back is noticed within a second or so.
The verdict is kept on its ``Target`` for the router (unhealthy targets are tried last) and
weighed in its circuit breaker beside real traffic: while the circuit is closed a check is
one more outcome in its window, passing or failing. A check never moves an open or half-open
circuit: only real requests, the ones that matter, close it again (an upstream whose
``/models`` answers while its chat requests hang must stay open).

Readiness answers from that state alone, in microseconds, and never calls an upstream (a
probe every few seconds from every load balancer must not become upstream traffic). This
replica is ready when it is not draining, every backend has started (in-process models are
loaded) and at least one model has a usable candidate: one dead model's upstream does not
take the replica out of its load balancer for every other model. The body lists each model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping

from backends.base import Health
from gateway.snapshot import Route, Target

log = logging.getLogger("interlock.health")


class HealthMonitor:
    def __init__(
        self,
        targets: Callable[[], Iterable[Target]],
        *,
        interval_s: float,
        timeout_s: float,
        recheck_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: the targets in force (the current snapshot's), read at every round
        self._targets = targets
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.recheck_s = recheck_s
        self._clock = clock
        #: backends whose start() has finished: the replica is not ready while any other is in force
        self._started: set[str] = set()
        self._checked_at: dict[str, float] = {}
        #: where verdicts come from; None: ``probe`` (this replica asks). A fleet sets one that asks
        #: only where this replica leads a backend's checks and reads the leader's verdict elsewhere
        self.source: Callable[[Target], Awaitable[Health | None]] | None = None

    async def check(self, target: Target) -> bool | None:
        """Get a verdict now (from ``source``, by default the backend itself) and record it;
        None: the source had no new verdict (the previous one stands)."""
        health = await (self.source or self.probe)(target)
        if health is None:
            return None
        self.record(target, health)
        return health.ok

    async def probe(self, target: Target) -> Health:
        """Ask the backend itself, within ``timeout_s``; never raises."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await target.backend.health()
        except TimeoutError:
            return Health(False, f"health check timed out after {self.timeout_s:g}s")
        except Exception as exc:  # a health() that raises is an unhealthy backend, not a dead monitor
            return Health(False, f"health check failed: {type(exc).__name__}")

    def record(self, target: Target, health: Health) -> None:
        """Keep ``health`` as ``target``'s verdict, logging each change once, and weigh it in its
        closed circuit."""
        self._checked_at[target.name] = self._clock()
        was = target.healthy
        target.healthy, target.health_reason = health.ok, health.reason
        if health.ok and was is False:
            log.info("backend %s is healthy again", target.name)
        elif health.ok and was is None:
            log.info("backend %s is healthy", target.name)
        elif not health.ok and was is not False:
            log.warning("backend %s failed its health check: %s", target.name, health.reason)
        breaker = target.breaker
        if breaker.state == "closed":
            if health.ok:
                breaker.on_success()
            elif not health.misconfigured:
                breaker.on_failure()

    async def started(self, target: Target) -> None:
        """``target``'s start() finished: check it at once (unless checks are off), so readiness
        need not wait an interval."""
        if self.interval_s > 0:
            await self.check(target)
        self._started.add(target.name)

    def has_started(self, name: str) -> bool:
        return name in self._started

    def last_checked(self, name: str) -> float | None:
        """When ``name`` was last checked (this monitor's clock); None: never."""
        return self._checked_at.get(name)

    async def run(self) -> None:
        """Check every backend every interval (the unhealthy ones every ``recheck_s``), until cancelled."""
        if self.interval_s <= 0:
            return
        tick = min(self.interval_s, self.recheck_s)
        while True:
            now = self._clock()
            due = [
                t
                for t in self._targets()
                if not t.healthy or now - self._checked_at.get(t.name, -self.interval_s) >= self.interval_s
            ]
            if due:
                await asyncio.gather(*(self.check(t) for t in due))
            await asyncio.sleep(tick)

    def readiness(self, routes: Mapping[str, Route]) -> tuple[bool, dict[str, str]]:
        """(ready, each model's state: "ready" or why not, per candidate), from recorded state only."""
        models: dict[str, str] = {}
        starting = False
        for name, route in routes.items():
            reasons = []
            for target in route.candidates():
                if target.name not in self._started:
                    starting = True
                    reasons.append(f"{target.name}: starting")
                elif target.breaker.state == "open":
                    reasons.append(f"{target.name}: circuit open for {target.breaker.retry_in():.0f}s more")
                elif target.healthy is False:
                    reasons.append(f"{target.name}: {target.health_reason or 'not ready'}")
                else:
                    models[name] = "ready"
                    break
            else:
                models[name] = "; ".join(reasons)
        ready = not starting and any(state == "ready" for state in models.values())
        return ready, models
