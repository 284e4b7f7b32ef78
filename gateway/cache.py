"""The response cache: the one object the request pipeline talks to.

Exact (``gateway.cache_key``), tenant-safe (the tenant is in every key), stream-faithful
(``gateway.cache_entry``), two-tier (``gateway.cache_store``), single-flight and stale-if-error
(https://www.rfc-editor.org/rfc/rfc5861#section-4). Routes opt in with ``cache:`` in the routing
YAML; the top-level ``cache:`` section holds their default and the tiers' knobs. Redis is the
process setting ``INTERLOCK_REDIS_URL`` (``redis+cluster://`` for a Cluster); without it the cache
is in-process only ("memory only").

How the pipeline uses it::

    config = cache.config_for(route.cache)                  # None: this route does not cache
    if config and cacheable(body, config) and not cc.no_store:
        key = cache_key(endpoint, tenant, model, body)
        found = None if cc.no_cache else await cache.lookup(key, max_age_s=cc.max_age)
        if found and found.fresh:
            return replay(found)                            # x-interlock-cache: hit, Age: found.age_s
        flight = await cache.join(key, config)              # followers wait here, bounded
        if flight.entry:
            return replay(flight.entry)                     # the leader's answer
        try:
            reply = await call_upstream()                   # into cache.recorder() / reply_from_json()
        except UpstreamFailed:
            if found and not found.fresh:                   # within stale_if_error_s
                return replay(found)                        # x-interlock-cache: stale
            raise
        finally:
            ...  # after the answer: if entry := recorder.result(): await cache.store(key, entry, config)
            await flight.done()                             # after store, also when it failed

A follower whose leader failed, stored nothing, died (its lock expired) or took longer than
``follower_wait_s`` gets ``flight.entry is None`` and calls upstream itself. Across replicas the
leader holds a short Redis lock (``SET NX PX``, under the key's hash tag), extended while it lives;
followers poll the entry and the lock in one round trip (5 ms, doubling to 100 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.breaker import BreakerConfig
from gateway.cache_entry import DEFAULT_MAX_BYTES, CachedReply, StreamRecorder
from gateway.cache_entry import reply_from_json as _reply_from_json
from gateway.cache_key import is_deterministic, lock_key
from gateway.cache_store import DEFAULT_MEMORY_BYTES, REDIS_BREAKER, MemoryLRU, RedisTier, Unavailable


class CacheConfig(BaseModel):
    """A route's ``cache:`` (``cache: {}`` or ``cache: true`` takes the top-level default)."""

    model_config = ConfigDict(extra="forbid")
    #: how long an entry is served as a hit
    ttl_s: float = Field(default=300.0, gt=0)
    #: past the TTL, this long more an entry may answer when every candidate of the route fails
    stale_if_error_s: float = Field(default=0.0, ge=0)
    #: also cache sampled requests (no temperature 0, no seed): repeats then get one sample
    cache_nondeterministic: bool = False
    max_entry_bytes: int = Field(default=DEFAULT_MAX_BYTES, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _bool_form(cls, value: Any) -> Any:
        if value is True:
            return {}
        if value is False:
            raise ValueError("leave cache: out to turn the cache off")
        return value


class CacheSection(BaseModel):
    """The top-level ``cache:``: the routes' default and the tiers' knobs."""

    model_config = ConfigDict(extra="forbid")
    default: CacheConfig = Field(default_factory=CacheConfig)
    #: the in-process tier's bound (entries' encoded size); 0 turns it off
    memory_bytes: int = Field(default=DEFAULT_MEMORY_BYTES, ge=0)
    #: every Redis call gives up after this (then: a miss, or nothing stored)
    redis_timeout_ms: float = Field(default=20.0, gt=0, le=10_000)
    #: a single-flight leader's Redis lock lives this long past its last refresh (it refreshes
    #: every third of it), so a dead leader's followers wait at most this
    lock_ttl_s: float = Field(default=5.0, gt=0)
    #: the longest a follower waits for its leader's answer before calling upstream itself
    follower_wait_s: float = Field(default=30.0, ge=0)
    redis_breaker: BreakerConfig = Field(default_factory=lambda: REDIS_BREAKER.model_copy())


def cacheable(body: dict[str, Any], config: CacheConfig) -> bool:
    """Whether this request's answer may be cached under ``config``."""
    return config.cache_nondeterministic or is_deterministic(body)


@dataclass(frozen=True, slots=True)
class Lookup:
    """An entry found: ``fresh`` (a hit) or not (usable only as stale-if-error)."""

    entry: CachedReply
    age_s: float
    fresh: bool

    @property
    def stale(self) -> bool:
        return not self.fresh


@dataclass(slots=True)
class _Local:
    future: asyncio.Future[Lookup | None]
    deadline: float  # monotonic: past it the flight is presumed dead and a new one may start
    stored: Lookup | None = None
    followers: int = 0  # waiting on ``future`` now


@dataclass(slots=True)
class Flight:
    """One request's part in a single flight; the leader calls ``done()`` in a ``finally``."""

    cache: ResponseCache
    key: str
    leader: bool
    #: a follower's answer from its leader (None: call upstream yourself)
    entry: Lookup | None = None
    _local: _Local | None = None
    _token: str | None = None
    _refresher: asyncio.Task[None] | None = None
    _finished: bool = field(default=False)

    async def done(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._local is not None:
            self.cache._settle(self.key, self._local, self._local.stored)
        if self._refresher is not None:
            self._refresher.cancel()
        if self._token is not None and self.cache._redis is not None:
            with contextlib.suppress(Unavailable):  # then the lock simply expires
                await self.cache._redis.unlock(lock_key(self.key), self._token)


class ResponseCache:
    """The cache of one process: one LRU, one pooled Redis client (if a URL is given)."""

    def __init__(
        self,
        section: CacheSection | None = None,
        redis_url: str | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.section = section or CacheSection()
        self._clock = clock
        self._memory = MemoryLRU(self.section.memory_bytes, clock)
        self._redis = (
            RedisTier(
                redis_url, timeout_s=self.section.redis_timeout_ms / 1000, breaker=self.section.redis_breaker
            )
            if redis_url
            else None
        )
        self._flights: dict[str, _Local] = {}
        self._refreshers: set[asyncio.Task[None]] = set()
        self.counters: Counter[str] = Counter()

    async def start(self) -> None:
        if self._redis is not None:
            await self._redis.start()

    async def close(self) -> None:
        for task in list(self._refreshers):
            task.cancel()
        if self._redis is not None:
            await self._redis.close()

    @property
    def redis(self) -> RedisTier | None:
        """The Redis tier, when one is configured (``/metrics`` reads its figures)."""
        return self._redis

    def status(self) -> str:
        """``ok``, ``degraded: <why>`` (Redis slow or gone; memory still works) or ``memory only``."""
        return "memory only" if self._redis is None else self._redis.status()

    def stats(self) -> dict[str, Any]:
        return {
            "status": self.status(),
            "memory_entries": len(self._memory),
            "memory_bytes": self._memory.bytes_used,
            "memory_evictions": self._memory.evictions,
            "redis_errors": self._redis.errors if self._redis else 0,
            **self.counters,
        }

    def config_for(self, route_cache: CacheConfig | None) -> CacheConfig | None:
        """A route's effective config: what it set over the section's default; None: no cache."""
        if route_cache is None:
            return None
        return self.section.default.model_copy(update=route_cache.model_dump(exclude_unset=True))

    # -- recording (skips are counted as ``skipped_<reason>``) ------------------------------------

    def _skipped(self, reason: str) -> None:
        self.counters[f"skipped_{reason}"] += 1

    def recorder(self, endpoint: str, config: CacheConfig) -> StreamRecorder:
        return StreamRecorder(endpoint, config.max_entry_bytes, on_skip=self._skipped, clock=self._clock)

    def reply_from_json(self, endpoint: str, body: bytes, config: CacheConfig) -> CachedReply | None:
        return _reply_from_json(
            endpoint, body, config.max_entry_bytes, on_skip=self._skipped, now=self._clock()
        )

    # -- reading and writing --------------------------------------------------------------------

    async def lookup(self, key: str, *, max_age_s: float | None = None) -> Lookup | None:
        """The entry at ``key``: fresh, or stale within its ``stale_if_error_s``; else None."""
        now = self._clock()
        best = self._judge(self._memory.get(key), now, max_age_s)
        if (best is None or not best.fresh) and self._redis is not None:
            try:
                raw = await self._redis.get(key)
            except Unavailable:
                raw = None
            held = _unpack(raw) if raw else None
            remote = self._judge(held, now, max_age_s)
            if held is not None and remote is not None:
                self._remember(key, held, len(raw or b""))
                if best is None or remote.fresh or remote.age_s < best.age_s:
                    best = remote
        self.counters["hit" if best and best.fresh else "stale" if best else "miss"] += 1
        return best

    async def store(self, key: str, reply: CachedReply, config: CacheConfig) -> None:
        """Keep ``reply`` in both tiers until its TTL plus stale window; over the cap: skipped."""
        if reply.size > config.max_entry_bytes:
            self._skipped("oversize")
            return
        held = (reply, config.ttl_s, config.stale_if_error_s)
        packed = _pack(*held)
        self._remember(key, held, len(packed))
        self.counters["stores"] += 1
        local = self._flights.get(key)
        if local is not None:
            local.stored = Lookup(reply, max(0.0, self._clock() - reply.created), True)
        ttl_ms = math.ceil((reply.created + config.ttl_s + config.stale_if_error_s - self._clock()) * 1000)
        if self._redis is not None and ttl_ms > 0:
            with contextlib.suppress(Unavailable):
                await self._redis.set(key, packed, ttl_ms)

    def _remember(self, key: str, held: tuple[CachedReply, float, float], size: int) -> None:
        reply, ttl_s, stale_s = held
        self._memory.put(key, held, size, reply.created + ttl_s + stale_s)

    def _judge(
        self, held: tuple[CachedReply, float, float] | None, now: float, max_age_s: float | None
    ) -> Lookup | None:
        if held is None:
            return None
        reply, ttl_s, stale_s = held
        age = max(0.0, now - reply.created)
        if age <= ttl_s and (max_age_s is None or age <= max_age_s):
            return Lookup(reply, age, True)
        if stale_s > 0 and age <= ttl_s + stale_s:
            return Lookup(reply, age, False)
        return None

    # -- single flight --------------------------------------------------------------------------

    async def join(self, key: str, config: CacheConfig) -> Flight:
        """Lead the flight of ``key``, or follow it: a follower returns with the leader's entry,
        or with none once the leader failed, died or ``follower_wait_s`` ran out.

        ``config`` is the route's; the waits and the lock's TTL are the section's today.
        """
        wait_s = self.section.follower_wait_s
        local = self._flights.get(key)
        if local is not None and local.deadline > time.monotonic():
            remaining = local.deadline - time.monotonic()
            local.followers += 1
            try:
                entry = await asyncio.wait_for(asyncio.shield(local.future), remaining)
            except TimeoutError:
                entry = None
            finally:
                local.followers -= 1
            self.counters["followers_served" if entry else "followers_unserved"] += 1
            return Flight(self, key, leader=False, entry=entry)

        local = _Local(asyncio.get_running_loop().create_future(), time.monotonic() + wait_s)
        self._flights[key] = local  # before any await: concurrent joins of this key now follow
        flight = Flight(self, key, leader=True, _local=local)
        if self._redis is None:
            self.counters["leaders"] += 1
            return flight
        try:
            token = uuid.uuid4().hex
            ttl_ms = math.ceil(self.section.lock_ttl_s * 1000)
            try:
                locked = await self._redis.lock(lock_key(key), token, ttl_ms)
            except Unavailable:
                self.counters["leaders"] += 1
                return flight  # no Redis: lead this process's requests at least
            if locked:
                flight._token = token
                flight._refresher = self._keep_lock(key, token, ttl_ms, local.deadline)
                self.counters["leaders"] += 1
                return flight
            entry = await self._follow_remote(key, local.deadline)
        except BaseException:
            self._settle(key, local, None)  # a cancelled joiner must not keep its followers waiting
            raise
        if entry is not None:
            self._settle(key, local, entry)
            self.counters["followers_served"] += 1
            return Flight(self, key, leader=False, entry=entry)
        # the other replica's leader failed, died or is too slow: call upstream, leading this process
        self.counters["leaders"] += 1
        return flight

    def _settle(self, key: str, local: _Local, entry: Lookup | None) -> None:
        if not local.future.done():
            local.future.set_result(entry)
        if self._flights.get(key) is local:
            del self._flights[key]

    def _keep_lock(self, key: str, token: str, ttl_ms: int, until: float) -> asyncio.Task[None]:
        async def refresh() -> None:
            # not past the flight's deadline: a leader that never calls done() must not hold it forever
            while time.monotonic() < until:
                await asyncio.sleep(ttl_ms / 3000)
                try:
                    if not await self._redis.refresh(lock_key(key), token, ttl_ms):  # type: ignore[union-attr]
                        return  # lost it (expired while Redis was away): followers already moved on
                except Unavailable:
                    continue

        task = asyncio.create_task(refresh())
        self._refreshers.add(task)
        task.add_done_callback(self._refreshers.discard)
        return task

    async def _follow_remote(self, key: str, deadline: float) -> Lookup | None:
        """Poll another replica's flight until its entry comes, its lock goes, or ``deadline``."""
        assert self._redis is not None
        delay = 0.005
        while True:
            try:
                raw, locked = await self._redis.poll(key, lock_key(key))
            except Unavailable:
                return None
            held = _unpack(raw) if raw else None
            found = self._judge(held, self._clock(), None)
            if held is not None and found is not None and found.fresh:
                self._remember(key, held, len(raw or b""))
                return found
            if not locked or time.monotonic() + delay > deadline:
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)


def _pack(reply: CachedReply, ttl_s: float, stale_s: float) -> bytes:
    # the route's TTL travels with the entry: any replica judges freshness the same way
    return b"%r %r\n" % (ttl_s, stale_s) + reply.encode()


def _unpack(raw: bytes) -> tuple[CachedReply, float, float] | None:
    try:
        head, _, rest = raw.partition(b"\n")
        ttl, stale = (float(x) for x in head.split(b" "))
    except ValueError:
        return None
    reply = CachedReply.decode(rest)
    return None if reply is None else (reply, ttl, stale)
