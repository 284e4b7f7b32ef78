"""The cache's two tiers: a bounded in-process LRU, in front of Redis.

Redis is an optimisation, never a dependency: every call runs under a short timeout (20 ms by
default) and behind a circuit breaker on Redis itself, and any failure (slow, gone, refusing,
garbage) is a miss or a no-op within that timeout, never an error. The LRU keeps working
meanwhile. Every Redis key is written with a TTL.

URLs: ``redis://`` / ``rediss://`` / ``unix://`` is one standalone server (``redis.asyncio.Redis``);
``redis+cluster://host:port`` (or ``rediss+cluster://``) is a Redis Cluster reached through that
node (``redis.asyncio.RedisCluster``). Keys of one tenant share one hash tag (``gateway.cache_key``),
and every multi-key script here names keys of one tag only, so no command crosses slots.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.breaker import BreakerConfig, CircuitBreaker

DEFAULT_MEMORY_BYTES = 64 * 1024 * 1024
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")

#: the breaker on Redis: a few failures in a row open it, and probes come back soon (Redis
#: restarts in seconds); while it is open, calls cost nothing
REDIS_BREAKER = BreakerConfig(consecutive_failures=3, cooldown_s=1.0, max_cooldown_s=30.0)

# Lua, so that check-and-act is one atomic command (https://redis.io/docs/latest/develop/interact/programmability/eval-intro/)
_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_REFRESH = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
)
#: an entry if there is one, else whether its lock is still held (both keys carry one hash tag)
_POLL = (
    "local v = redis.call('GET', KEYS[1]) if v then return {1, v} end "
    "return {0, redis.call('EXISTS', KEYS[2])}"
)


class MemoryLRU:
    """Values by key, least recently used out first, bounded by their total size in bytes.

    Each value has an expiry (on ``clock``); an expired one is dropped when next looked at.
    One event loop only: no locks.
    """

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES, clock: Callable[[], float] = time.time) -> None:
        self.max_bytes = max_bytes
        self._clock = clock
        self._items: OrderedDict[str, tuple[Any, int, float]] = OrderedDict()
        self.bytes_used = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Any | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[2] <= self._clock():
            self.pop(key)
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: str, value: Any, size: int, expires_at: float) -> bool:
        """Keep ``value``; False (and nothing kept) if it alone is larger than the whole tier."""
        self.pop(key)
        if size > self.max_bytes or expires_at <= self._clock():
            return False
        while self._items and self.bytes_used + size > self.max_bytes:
            _, (_, old_size, _) = self._items.popitem(last=False)
            self.bytes_used -= old_size
            self.evictions += 1
        self._items[key] = (value, size, expires_at)
        self.bytes_used += size
        return True

    def pop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.bytes_used -= item[1]


class Unavailable(Exception):
    """Redis could not answer (timeout, refused, breaker open): the caller goes on without it."""


def make_client(url: str, connect_timeout_s: float) -> Any:
    """One pooled asyncio client for ``url``; ``redis+cluster://`` gives a Cluster client."""
    from redis.asyncio import Redis, RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    common: dict[str, Any] = {
        "socket_connect_timeout": connect_timeout_s,
        "socket_timeout": connect_timeout_s,  # a backstop: each call has its own, shorter timeout
        "retry": Retry(NoBackoff(), 0),  # no retries inside the client: our timeout is the budget
        "lib_name": None,
        "lib_version": None,  # no CLIENT SETINFO round trips on each new connection
    }
    if url.startswith(CLUSTER_SCHEMES):
        return RedisCluster.from_url(url.replace("+cluster", "", 1), **common)
    return Redis.from_url(url, **common)


#: the buckets of ``RedisTier``'s call latency (``/metrics``): a loopback Redis answers in ~0.1 ms
CALL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class RedisTier:
    """Redis under a timeout and a breaker. Every method either answers or raises ``Unavailable``
    within about ``timeout_s``; none raises anything else."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 0.02,
        connect_timeout_s: float = 0.5,
        breaker: BreakerConfig | None = None,
    ) -> None:
        self.url = url
        self.cluster = url.startswith(CLUSTER_SCHEMES)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.breaker = CircuitBreaker("redis", breaker or REDIS_BREAKER)
        self.client: Any = None
        self.last_error: str | None = None
        self.errors = 0
        #: every command's duration, answered or not, by ``CALL_BUCKETS`` (the last: beyond them)
        self.call_counts = [0] * (len(CALL_BUCKETS) + 1)
        self.call_seconds = 0.0

    async def start(self) -> None:
        """Create the client and try it once, with the longer connect timeout; never raises."""
        if self.client is None:
            try:
                self.client = make_client(self.url, self.connect_timeout_s)
            except Exception as exc:  # a malformed URL: the cache runs from memory and says why
                self._failed(exc)
                return
        try:
            async with asyncio.timeout(self.connect_timeout_s * 2):
                if self.cluster:
                    await self.client.initialize()
                await self.client.ping()
            self.last_error = None
        except Exception as exc:
            self.breaker.on_failure()
            self._failed(exc)

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            try:
                # bounded: a connection whose command was cancelled mid-reply can leave redis-py's
                # close waiting for good, and a shutdown must not hang on Redis
                async with asyncio.timeout(self.connect_timeout_s * 2):
                    await client.aclose()
            except Exception as exc:  # closing a client whose server is gone must not fail a shutdown
                self._failed(exc)

    def status(self) -> str:
        state = self.breaker.state
        if self.client is None:
            return f"degraded: redis unusable ({self.last_error or 'not started'})"
        if state != "closed":
            return f"degraded: redis breaker {state.replace('_', '-')} ({self.last_error or 'recovering'})"
        if self.last_error is not None:
            return f"degraded: {self.last_error}"
        return "ok"

    # -- commands -------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        return await self._call(lambda c: c.get(key))

    async def set(self, key: str, value: bytes, ttl_ms: int) -> None:
        await self._call(lambda c: c.set(key, value, px=max(1, ttl_ms)))

    async def lock(self, key: str, token: str, ttl_ms: int) -> bool:
        """``SET key token NX PX ttl``: True if this caller now holds the lock."""
        return bool(await self._call(lambda c: c.set(key, token, nx=True, px=max(1, ttl_ms))))

    async def refresh(self, key: str, token: str, ttl_ms: int) -> bool:
        """Extend a lock this caller still holds; False if it lost it."""
        return bool(await self._call(lambda c: c.eval(_REFRESH, 1, key, token, max(1, ttl_ms))))

    async def unlock(self, key: str, token: str) -> None:
        await self._call(lambda c: c.eval(_UNLOCK, 1, key, token))

    async def poll(self, key: str, lock: str) -> tuple[bytes | None, bool]:
        """(the entry at ``key`` if any, whether ``lock`` is held), in one round trip."""
        found, value = await self._call(lambda c: c.eval(_POLL, 2, key, lock))
        return (value, True) if found else (None, bool(value))

    @property
    def up(self) -> bool:
        """Started, its breaker closed and its last call answered."""
        return self.client is not None and self.breaker.state == "closed" and self.last_error is None

    async def _call(self, command: Callable[[Any], Awaitable[Any]]) -> Any:
        client = self.client
        if client is None:
            raise Unavailable(self.last_error or "redis not started")
        if not self.breaker.allow():
            raise Unavailable(self.last_error or "redis breaker open")
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await command(client)
        except asyncio.CancelledError:
            self.breaker.release()  # our caller went away: no verdict on Redis
            raise
        except TimeoutError:
            self._took(started)
            self.breaker.on_failure()
            self._failed(f"timeout after {self.timeout_s * 1000:g} ms")
            raise Unavailable(self.last_error) from None
        except Exception as exc:
            self._took(started)
            self.breaker.on_failure()
            self._failed(exc)
            raise Unavailable(self.last_error) from None
        self._took(started)
        self.breaker.on_success()
        self.last_error = None
        return result

    def _took(self, started: float) -> None:
        took = time.perf_counter() - started
        self.call_counts[bisect_left(CALL_BUCKETS, took)] += 1
        self.call_seconds += took

    def _failed(self, why: BaseException | str) -> None:
        self.errors += 1
        text = why if isinstance(why, str) else f"{type(why).__name__}: {why}"
        self.last_error = text[:200]
