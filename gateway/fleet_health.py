"""Active health checks across replicas: one replica checks a backend, the others read its verdict.

The replica whose ``SET {fleet}:health-lead:<backend> <replica> NX PX`` holds leads that backend's
checks; it runs them at the monitor's pace (``gateway.health``), extends its lead with each, and
writes each verdict to ``{fleet}:health:<backend>``. The others, at the same pace, read it: a
verdict they have not seen yet is recorded as if they had checked (their readiness and their
breaker's window hear of it); none yet, and the previous one stands. A lead lives
two intervals and a timeout, so when the leader stops (or dies) another replica takes over
within that. Different backends may have different leaders. Redis gone: each checks itself.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

import orjson

from backends.base import Health
from gateway.cache_store import Unavailable
from gateway.fleet import shared
from gateway.health import HealthMonitor
from gateway.snapshot import Target

if TYPE_CHECKING:
    from gateway.fleet import Fleet

log = logging.getLogger("interlock.fleet")

#: {1, nil}: this replica leads (it just took or extended the lead); {0, verdict or nil}: another does
_LEAD_OR_READ = """
local leader = redis.call('GET', KEYS[1])
if leader == ARGV[1] or not leader then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1, false}
end
return {0, redis.call('GET', KEYS[2])}
"""
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class SharedHealth:
    """This replica's side of the shared checks; ``source`` is the monitor's verdict source."""

    def __init__(self, fleet: Fleet, monitor: HealthMonitor) -> None:
        self.fleet = fleet
        self.monitor = monitor
        #: backends whose checks this replica ran at its last round for them
        self.leading: set[str] = set()
        self._seen: dict[str, str] = {}

    def lead_ttl_ms(self) -> int:
        return max(1000, int((2 * self.monitor.interval_s + self.monitor.timeout_s) * 1000))

    async def source(self, target: Target) -> Health | None:
        fleet, name = self.fleet, target.name
        assert fleet.redis is not None
        if not shared(target):
            return await self.monitor.probe(target)  # this process's own engine
        ttl_ms = self.lead_ttl_ms()
        keys = [fleet.keys.health_lead(name), fleet.keys.health(name)]
        try:
            lead, raw = await fleet.redis.script(_LEAD_OR_READ, keys, [fleet.id, ttl_ms])
        except Unavailable:
            fleet.failed()
            self.leading.discard(name)
            return await self.monitor.probe(target)  # alone: check it ourselves
        fleet.answered()
        if lead:
            if name not in self.leading:
                log.info("fleet: this replica runs the health checks of %s", name)
                self.leading.add(name)
            health = await self.monitor.probe(target)
            verdict = orjson.dumps(
                {
                    "id": uuid.uuid4().hex,
                    "by": fleet.id,
                    "ok": health.ok,
                    "reason": health.reason,
                    "misconfigured": health.misconfigured,
                }
            )
            try:
                await fleet.redis.set(keys[1], verdict, ttl_ms)
            except Unavailable:
                fleet.failed()
            return health
        self.leading.discard(name)
        if raw is None:
            return None  # the leader has not written one yet
        try:
            verdict = orjson.loads(raw)
            verdict_id = str(verdict["id"])
            health = Health(bool(verdict["ok"]), str(verdict["reason"]), bool(verdict["misconfigured"]))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return await self.monitor.probe(target)
        if self._seen.get(name) == verdict_id:
            return None  # read before: once is one outcome
        self._seen[name] = verdict_id
        return health

    async def release_all(self) -> None:
        fleet = self.fleet
        assert fleet.redis is not None
        for name in list(self.leading):
            await fleet.redis.script(_RELEASE, [fleet.keys.health_lead(name)], [fleet.id])
        self.leading.clear()
