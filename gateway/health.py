"""Active health checks and the readiness verdict.

Every ``interval_s`` each backend's ``health()`` runs (bounded by ``timeout_s``); the
verdict is kept on its ``Target`` for the router (unhealthy targets are tried last) and
fed to its circuit breaker, so an upstream that died between requests is found by the
checker rather than by the next unlucky client.

Readiness: the process is ready when it is not draining and every route has at least
one candidate whose circuit is not open and whose health is good. A cached good verdict
is trusted (probes stay cheap); a missing or bad one is checked live, so readiness
turns green as soon as a model finishes loading rather than at the next interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from backends.base import Health
from gateway.router import Route, Target

log = logging.getLogger("interlock.health")


class HealthMonitor:
    def __init__(self, targets: Iterable[Target], *, interval_s: float, timeout_s: float) -> None:
        self.targets = list(targets)
        self.interval_s = interval_s
        self.timeout_s = timeout_s

    async def check(self, target: Target, *, feed_breaker: bool = True) -> bool:
        """Ask the backend now and record the answer (for the breaker too, unless a probe asks:
        readiness probes come often and during model loads, and must not trip circuits)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                health = await target.backend.health()
        except TimeoutError:
            health = Health(False, f"health check timed out after {self.timeout_s:g}s")
        except Exception as exc:  # a health() that raises is an unhealthy backend, not a dead monitor
            health = Health(False, f"health check failed: {type(exc).__name__}")
        was = target.healthy
        target.healthy, target.health_reason = health.ok, health.reason
        if not feed_breaker:
            return health.ok
        if health.ok:
            if was is False:
                log.info("backend %s is healthy again", target.name)
            if target.breaker.state == "half_open" and target.breaker.allow():
                target.breaker.on_success()  # a good check is as good a probe as a request
        else:
            if was is not False:
                log.warning("backend %s failed its health check: %s", target.name, health.reason)
            if not health.misconfigured:
                target.breaker.on_failure()
        return health.ok

    async def run(self) -> None:
        """Check every backend every interval, until cancelled."""
        if self.interval_s <= 0:
            return
        while True:
            await asyncio.gather(*(self.check(t) for t in self.targets))
            await asyncio.sleep(self.interval_s)

    async def problems(self, routes: dict[str, Route]) -> dict[str, str]:
        """Routes with no usable candidate, each with the reason per candidate."""
        problems: dict[str, str] = {}
        for name, route in routes.items():
            reasons = []
            for target in route.candidates():
                if target.breaker.state == "open":
                    reasons.append(f"{target.name}: circuit open for {target.breaker.retry_in():.0f}s more")
                    continue
                if target.healthy or await self.check(target, feed_breaker=False):
                    break
                reasons.append(f"{target.name}: {target.health_reason or 'not ready'}")
            else:
                problems[name] = "; ".join(reasons)
        return problems
