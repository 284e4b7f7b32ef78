"""Circuit breakers across replicas: an opening is shared, a probe is a lease.

Each replica's own breaker still decides (``gateway.breaker``); the fleet only tells the others::

    a breaker opens here   ──▶ SET {fleet}:breaker:<backend> {"state": "open", id, by} PX <its cool-down>
    every 250 ms, each     ──▶ reads each backend's record in one script; a new "open" from another
                               replica opens its own breaker for what is left (PTTL: no clock skew)
    a cool-down ends       ──▶ half-open; the probe gate admits a probe only on the replica holding
                               SET {fleet}:probe:<backend> <replica> NX PX: one replica probes
    its probe fails        ──▶ it reopens (cool-down doubled), publishes that, and keeps the lease
                               for the new cool-down: nobody else probes before it ends
    its probes pass        ──▶ it closes, publishes "closed" and drops the lease; the others close

Why a short poll and not pub/sub: the record is state, not an event, so a replica that starts,
restarts or was cut off from Redis catches up at its next read instead of missing a message; a
read is one short command under the tier's timeout and breaker, where a subscription is a
long-lived connection that can die silently; and redis-py's asyncio Cluster client has no
pub/sub, while this script runs on a Cluster unchanged (one hash tag). A read every 250 ms is
4 commands a second per replica, and an opening reaches every replica within ~250-500 ms.

Nothing here blocks a request: the gate answers from what this replica already knows (it asks
Redis for the lease in the background and says no meanwhile), publishing runs in a task, and
while Redis is gone the gate always says yes: every replica then probes on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
import weakref
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import orjson

from gateway.breaker import CircuitBreaker, State
from gateway.cache_store import Unavailable

if TYPE_CHECKING:
    from gateway.fleet import Fleet

log = logging.getLogger("interlock.fleet")

#: a "closed" record stays this long: a replica cut off for a moment still sees it
CLOSED_RECORD_MS = 30_000

# KEYS: record_1, lease_1, record_2, lease_2, ...; ARGV[1]: this replica, ARGV[1+i]: the lease TTL
# to extend for backend i where this replica holds it (0: none). Returns per backend
# {record or nil, its PTTL, 1 if this replica holds the lease}.
_SYNC = """
local out = {}
for i = 1, #KEYS, 2 do
  local record = redis.call('GET', KEYS[i])
  local pttl = -2
  if record then pttl = redis.call('PTTL', KEYS[i]) end
  local ttl = tonumber(ARGV[1 + (i + 1) / 2])
  local mine = 0
  if ttl > 0 and redis.call('GET', KEYS[i + 1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i + 1], ttl)
    mine = 1
  end
  out[#out + 1] = record or false
  out[#out + 1] = pttl
  out[#out + 1] = mine
end
return out
"""
#: -1: the lease is this replica's (now or already); else the PTTL of another's
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return -1 end
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return -1 end
return redis.call('PTTL', KEYS[1])
"""
#: KEYS: record, lease; ARGV: record, its TTL, this replica, the lease's TTL (0: drop it if ours)
_PUBLISH = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then
  if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[4]) else redis.call('DEL', KEYS[2]) end
end
return 1
"""
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def _probes_in_flight(breaker: CircuitBreaker) -> int:
    if breaker.state != "half_open":
        return 0
    probes = breaker.snapshot()["probes_in_flight"]
    return probes if isinstance(probes, int) else 0


class SharedBreakers:
    """This replica's side of the shared breakers; one per ``Fleet``."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._attached: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()
        #: the id of the last record taken (or written) per backend: each is applied once
        self._applied: dict[str, str] = {}
        #: backend -> until when (fleet clock) this replica holds its probe lease
        self._leases: dict[str, float] = {}
        self._asking: set[str] = set()
        self._ask_after: dict[str, float] = {}
        #: set while a peer's record is applied: the transition it causes is not published again
        self._applying = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: how many peers' records were applied, by state (for tests and logs)
        self.taken: dict[str, int] = {"open": 0, "closed": 0}

    @property
    def lease_ttl_s(self) -> float:
        """A held lease outlives a few missed refreshes, no more: a dead prober's lease frees soon."""
        return max(1.0, 4 * self.fleet.tick_s)

    def holds_lease(self, backend: str) -> bool:
        return self._leases.get(backend, 0.0) > self.fleet.now()

    def attach(self) -> None:
        """Listen to, and gate, every breaker in force (a reload brings new ones)."""
        for target in self.fleet.targets():
            breaker = target.breaker
            if breaker in self._attached:
                continue
            self._attached.add(breaker)
            breaker.listeners.append(functools.partial(self._heard, breaker))
            breaker.probe_gate = functools.partial(self._gate, breaker)

    # -- this replica's transitions --------------------------------------------------------------

    def _heard(self, breaker: CircuitBreaker, name: str, old: State, new: State) -> None:
        self._changed(breaker, old, new)

    def _changed(self, breaker: CircuitBreaker, old: State, new: State) -> None:
        if self._applying or new == "half_open":
            return
        name = breaker.name
        record_id = uuid.uuid4().hex
        self._applied[name] = record_id
        record = orjson.dumps({"state": new, "id": record_id, "by": self.fleet.id})
        if new == "open":
            # still the prober if our probe failed: nobody else probes before this cool-down ends
            ttl_ms = max(1, int(breaker.retry_in() * 1000))
            lease_ms = ttl_ms if self.holds_lease(name) else 0
            if lease_ms:
                self._leases[name] = self.fleet.now() + ttl_ms / 1000
        else:
            ttl_ms, lease_ms = CLOSED_RECORD_MS, 0
            self._leases.pop(name, None)
        keys = [self.fleet.keys.breaker(name), self.fleet.keys.probe_lease(name)]
        self._spawn(self._publish(keys, [record, ttl_ms, self.fleet.id, lease_ms], name, new))

    async def _publish(self, keys: list[str], args: list[object], name: str, state: str) -> None:
        assert self.fleet.redis is not None
        try:
            await self.fleet.redis.script(_PUBLISH, keys, args)
        except Unavailable:
            self.fleet.failed()
            return
        self.fleet.answered()
        log.info("fleet: told the replicas that the circuit of %s is %s", name, state)

    # -- the probe lease ------------------------------------------------------------------------

    def _gate(self, breaker: CircuitBreaker) -> bool:
        """May this replica probe ``breaker``'s half-open backend now? Never waits for Redis."""
        fleet, name = self.fleet, breaker.name
        if not fleet.redis_ok:
            return True  # alone: every replica probes on its own
        if self.holds_lease(name):
            return True
        if name not in self._asking and fleet.now() >= self._ask_after.get(name, 0.0):
            self._asking.add(name)
            self._spawn(self._acquire(name))
        return False

    async def _acquire(self, name: str) -> None:
        assert self.fleet.redis is not None
        ttl_s = self.lease_ttl_s
        try:
            pttl = await self.fleet.redis.script(
                _ACQUIRE, [self.fleet.keys.probe_lease(name)], [self.fleet.id, int(ttl_s * 1000)]
            )
        except Unavailable:
            self.fleet.failed()
            return
        finally:
            self._asking.discard(name)
        self.fleet.answered()
        now = self.fleet.now()
        if int(pttl) == -1:
            self._leases[name] = now + ttl_s
            log.info("fleet: this replica probes %s", name)
        else:  # another replica probes: ask again when its lease may have gone, at most a tick away
            self._ask_after[name] = now + min(max(int(pttl), 0) / 1000, self.fleet.tick_s)

    # -- the others' records --------------------------------------------------------------------

    async def sync(self) -> None:
        """Read every backend's record (and extend the leases this replica probes under)."""
        fleet = self.fleet
        assert fleet.redis is not None
        breakers = {t.name: t.breaker for t in fleet.targets()}
        if not breakers:
            return
        keys: list[str] = []
        ttls: list[int] = []
        for name, breaker in breakers.items():
            keys += [fleet.keys.breaker(name), fleet.keys.probe_lease(name)]
            # extended only while a probe is out: a holder that gets no request lets the lease
            # lapse within its TTL, and a replica that does get one probes instead
            probing = self.holds_lease(name) and _probes_in_flight(breaker) > 0
            ttls.append(int(self.lease_ttl_s * 1000) if probing else 0)
        try:
            flat = await fleet.redis.script(_SYNC, keys, [fleet.id, *ttls])
        except Unavailable:
            fleet.failed()
            return
        fleet.answered()
        now = fleet.now()
        for (name, breaker), ttl, i in zip(breakers.items(), ttls, range(0, len(flat), 3), strict=True):
            raw, pttl, mine = flat[i : i + 3]
            if ttl:
                if mine:
                    self._leases[name] = now + self.lease_ttl_s
                else:
                    self._leases.pop(name, None)
            if raw is not None:
                self._take(breaker, raw, int(pttl))

    def _take(self, breaker: CircuitBreaker, raw: bytes, pttl_ms: int) -> None:
        try:
            record = orjson.loads(raw)
            state, record_id, by = record["state"], record["id"], record["by"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        name = breaker.name
        if self._applied.get(name) == record_id:
            return
        self._applied[name] = record_id
        if by == self.fleet.id:
            return
        self._applying = True
        try:
            if state == "open" and pttl_ms > 0:
                breaker.open_for(pttl_ms / 1000)
            elif state == "closed" and breaker.state != "closed":
                breaker.reset()
            else:
                return
        finally:
            self._applying = False
        self.taken[state] += 1
        log.info("fleet: circuit of %s is %s, as replica %s found", name, state, by)

    # -- leaving --------------------------------------------------------------------------------

    async def release_all(self) -> None:
        assert self.fleet.redis is not None
        held = [name for name in self._leases if self.holds_lease(name)]
        self._leases.clear()
        for name in held:
            await self.fleet.redis.script(_RELEASE, [self.fleet.keys.probe_lease(name)], [self.fleet.id])

    async def aclose(self) -> None:
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coroutine)
        except RuntimeError:  # no loop (a breaker moved from a thread or a test): nothing to tell
            coroutine.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
