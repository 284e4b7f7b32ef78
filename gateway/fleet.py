"""The replicas of one deployment, meeting in Redis: who is alive, and what they share.

Each gateway process is a replica with an id (``INTERLOCK_REPLICA``, else ``hostname-pid``). With
Redis configured (``INTERLOCK_REDIS_URL``, the cache's URL: ``redis://`` or ``redis+cluster://``)
it heartbeats every second into one sorted set scored by Redis's own clock (no skew between
hosts), and reads back the replicas heard from within ``replica_ttl_s``: ``live_replicas()``
answers from that last read, without I/O, so a status page or a limit divided among replicas
may call it per request. Beside the heartbeats the fleet shares breaker openings and probe
leases (``gateway.fleet_breakers``) and active health checks (``gateway.fleet_health``) of the
backends they all reach over the network; an in-process engine (llama.cpp) is each replica's own.

Redis is never a dependency: every call runs under a short timeout behind a breaker on Redis
itself (``gateway.cache_store.RedisTier``), nothing on a request's path waits for Redis, and
while Redis is gone each replica decides alone from its own breakers and checks; the live list
then keeps what it saw last. Every key carries one hash tag, so each script names keys of one
slot and runs on a Redis Cluster too; every key has a TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from gateway.cache_store import RedisTier, Unavailable
from gateway.health import HealthMonitor
from gateway.snapshot import Target

if TYPE_CHECKING:
    from gateway.state import Gateway

log = logging.getLogger("interlock.fleet")

#: Redis is asked in the background only, so a call may take longer than the cache's 20 ms
#: before it counts as a failure; still short: a replica must notice Redis is gone within a tick
FLEET_REDIS_TIMEOUT_S = 0.25

#: heartbeat: ZADD this replica at Redis TIME, forget the silent ones, read who is left
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
  redis.call('HDEL', KEYS[2], unpack(gone))
end
redis.call('PEXPIRE', KEYS[1], ttl * 3)
redis.call('PEXPIRE', KEYS[2], ttl * 3)
local live = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local out = {}
for i = 1, #live, 2 do
  out[#out + 1] = live[i]
  out[#out + 1] = tostring(now - tonumber(live[i + 1]))
  out[#out + 1] = redis.call('HGET', KEYS[2], live[i]) or ''
end
return out
"""
_LEAVE = "redis.call('ZREM', KEYS[1], ARGV[1]) redis.call('HDEL', KEYS[2], ARGV[1]) return 1"


#: backends that run inside each gateway process: one replica's engine failing says nothing about
#: another's, so their breakers and checks stay each replica's own
IN_PROCESS_KINDS = frozenset({"llamacpp"})


def shared(target: Target) -> bool:
    """Whether the replicas share ``target``'s breaker and health checks: the same upstream for all."""
    return target.backend.kind not in IN_PROCESS_KINDS


def replica_id(configured: str | None = None) -> str:
    """``INTERLOCK_REPLICA`` when set (a Kubernetes pod name, say), else ``hostname-pid``."""
    return configured or f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Replica:
    """A gateway process of the fleet, as its last heartbeat told."""

    id: str
    #: seconds since its last heartbeat, by Redis's clock at this replica's last read
    seen_s_ago: float
    #: the routing snapshot's hash it serves: replicas that differ run different routing files
    config_hash: str = ""
    started_at: int = 0


class FleetRedis(RedisTier):
    """The cache's Redis tier (timeout, breaker on Redis, Cluster URLs) with scripts on top."""

    async def script(self, lua: str, keys: list[str], args: list[Any]) -> Any:
        """``EVAL`` under the tier's timeout and breaker; raises ``Unavailable`` and nothing else."""
        return await self._call(lambda c: c.eval(lua, len(keys), *keys, *args))


class Keys:
    """Every fleet key, under one hash tag (one Cluster slot, so scripts may name several)."""

    def __init__(self, fleet: str) -> None:
        self.tag = "{interlock-fleet:" + fleet + "}"

    @property
    def replicas(self) -> str:
        return f"{self.tag}:replicas"

    @property
    def replica_info(self) -> str:
        return f"{self.tag}:replica-info"

    def breaker(self, backend: str) -> str:
        return f"{self.tag}:breaker:{backend}"

    def probe_lease(self, backend: str) -> str:
        return f"{self.tag}:probe:{backend}"

    def health(self, backend: str) -> str:
        return f"{self.tag}:health:{backend}"

    def health_lead(self, backend: str) -> str:
        return f"{self.tag}:health-lead:{backend}"


class Fleet:
    """This replica's membership of the fleet; without Redis, a fleet of one."""

    def __init__(
        self,
        targets: Callable[[], Iterable[Target]],
        health: HealthMonitor,
        *,
        redis_url: str | None,
        replica: str | None = None,
        name: str = "interlock",
        config_hash: Callable[[], str] = lambda: "",
        tick_s: float = 0.25,
        heartbeat_s: float = 1.0,
        replica_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from gateway.fleet_breakers import SharedBreakers
        from gateway.fleet_health import SharedHealth

        self.id = replica_id(replica)
        self.keys = Keys(name)
        self.redis = FleetRedis(redis_url, timeout_s=FLEET_REDIS_TIMEOUT_S) if redis_url else None
        self.tick_s = tick_s
        self.heartbeat_s = heartbeat_s
        self.replica_ttl_s = replica_ttl_s
        self.started_at = int(time.time())
        self._targets = targets
        self._config_hash = config_hash
        self._clock = clock
        self._health = health
        self._live: list[Replica] = [Replica(self.id, 0.0, started_at=self.started_at)]
        self._beat_at = -heartbeat_s
        self._task: asyncio.Task[None] | None = None
        #: whether the last Redis call answered: while it did not, each replica decides alone
        self.redis_ok = False
        self.breakers = SharedBreakers(self)
        self.health = SharedHealth(self, health)

    # -- what others read -----------------------------------------------------------------------

    def live_replicas(self) -> list[Replica]:
        """The replicas heard from within ``replica_ttl_s`` at the last heartbeat (this one always
        among them); no I/O. Without Redis, or while it is gone, what was seen last."""
        return list(self._live)

    def status(self) -> str:
        """ "ok", "solo" (no Redis configured) or why the replicas are deciding alone."""
        if self.redis is None:
            return "solo"
        if self.redis_ok:
            return "ok"
        why = self.redis.status()
        return why if why != "ok" else "degraded: redis has not answered yet"

    def targets(self) -> list[Target]:
        """The targets in force whose state the replicas share (not in-process engines)."""
        return [t for t in self._targets() if shared(t)]

    def now(self) -> float:
        return self._clock()

    # -- life -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Join: connect (bounded; never raises), attach to the breakers and health checks, and
        heartbeat in the background. Without Redis nothing changes: each decides alone."""
        if self.redis is None:
            return
        await self.redis.start()
        self._health.source = self.health.source
        self.breakers.attach()
        await self.tick()
        self._task = asyncio.create_task(self._run(), name="interlock-fleet")

    async def close(self) -> None:
        """Leave at once (the others stop counting this replica) and give the leases back."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # bounded, and cancelled again should a Redis call have swallowed the first cancel
            while not task.done():
                await asyncio.wait({task}, timeout=1.0)
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.redis is None:
            return
        with contextlib.suppress(Unavailable):
            await self.breakers.release_all()
            await self.health.release_all()
            await self.redis.script(_LEAVE, [self.keys.replicas, self.keys.replica_info], [self.id])
        await self.breakers.aclose()
        await self.redis.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                await self.tick()
            except Exception:  # a bug here must not stop the fleet's loop for good
                log.exception("fleet tick failed")

    async def tick(self) -> None:
        """One round: the breakers' shared state every tick, a heartbeat every ``heartbeat_s``."""
        self.breakers.attach()  # targets a reload added
        await self.breakers.sync()
        if self.now() - self._beat_at >= self.heartbeat_s:
            self._beat_at = self.now()
            await self.heartbeat()

    def beat_soon(self) -> None:
        """Heartbeat at the next tick (a reload changed the config hash the others should see)."""
        self._beat_at = -self.heartbeat_s

    async def heartbeat(self) -> None:
        assert self.redis is not None
        info = orjson.dumps({"config_hash": self._config_hash(), "started_at": self.started_at})
        ttl_ms = int(self.replica_ttl_s * 1000)
        try:
            flat = await self.redis.script(
                _HEARTBEAT, [self.keys.replicas, self.keys.replica_info], [self.id, ttl_ms, info]
            )
        except Unavailable:
            self.failed()
            return
        self.answered()
        live = []
        for i in range(0, len(flat), 3):
            member, age, raw = flat[i : i + 3]
            try:
                meta = orjson.loads(raw) if raw else {}
            except orjson.JSONDecodeError:
                meta = {}
            live.append(
                Replica(
                    id=_text(member),
                    seen_s_ago=int(age) / 1000,
                    config_hash=str(meta.get("config_hash", "")),
                    started_at=int(meta.get("started_at", 0)),
                )
            )
        self._live = live

    def answered(self) -> None:
        if not self.redis_ok:
            log.info("fleet: redis answers; sharing breakers and health checks (replica %s)", self.id)
        self.redis_ok = True

    def failed(self) -> None:
        if self.redis_ok:
            log.warning("fleet: redis unavailable, each replica decides alone: %s", self.status())
        self.redis_ok = False


def live_replicas(gateway: Gateway) -> list[Replica]:
    """The replicas of ``gateway``'s fleet heard from within the heartbeat TTL, this one included,
    as of the last heartbeat (no I/O: fine per request). A limit shared by ``n`` replicas while
    Redis is away is ``limit / len(live_replicas(gateway))``."""
    if gateway.fleet is None:
        return [Replica(replica_id(), 0.0)]
    return gateway.fleet.live_replicas()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
