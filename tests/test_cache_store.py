"""The cache's tiers and single flight against real Redis: the shared one on 127.0.0.1:6379 (keys
of a fresh tenant per test, deleted after), and throw-away servers for pauses and kills."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis
import redis.asyncio as aredis

from gateway.cache import CacheConfig, CacheSection, Flight, ResponseCache
from gateway.cache_entry import CachedReply, reply_from_json
from gateway.cache_key import cache_key, lock_key, tenant_tag
from gateway.cache_store import MemoryLRU
from gateway.config import ConfigError, parse_config
from tests.fakes import free_port
from tests.redis_servers import REDIS_SERVER, RedisServer

SHARED = "redis://127.0.0.1:6379/13"
FAST = CacheSection(redis_breaker={"consecutive_failures": 3, "cooldown_s": 0.2, "max_cooldown_s": 1})
CFG = CacheConfig(ttl_s=60, stale_if_error_s=30)


def reply(text: str = "hi", created: float | None = None) -> CachedReply:
    body = orjson.dumps(
        {
            "id": "c1",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    )
    entry = reply_from_json("chat", body, now=time.time() if created is None else created)
    assert entry is not None
    return entry


@pytest.fixture
def tenant() -> Iterator[str]:
    """A tenant of this test alone; its keys (one hash tag) are deleted afterwards."""
    name = f"test-{uuid.uuid4().hex}"
    try:
        redis.Redis.from_url(SHARED, socket_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis on 127.0.0.1:6379 ({exc}); .ci/run starts one")
    yield name
    r = redis.Redis.from_url(SHARED, socket_timeout=5)
    keys = list(r.scan_iter(match=f"interlock:v1:{{{tenant_tag(name)}}}:*"))
    if keys:
        r.delete(*keys)


def key_of(tenant: str, n: int = 0) -> str:
    body = {"messages": [{"role": "user", "content": f"q{n}"}], "temperature": 0}
    return cache_key("chat", tenant, "m", body)


@pytest.fixture
async def shared() -> AsyncIterator[ResponseCache]:
    cache = ResponseCache(CacheSection(redis_timeout_ms=500), SHARED)  # generous: a loaded machine
    await cache.start()
    yield cache
    await cache.close()


@pytest.fixture
def private(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


# --- the in-process tier -------------------------------------------------------------------------


def test_lru_is_bounded_by_bytes() -> None:
    now = [0.0]
    lru = MemoryLRU(1000, clock=lambda: now[0])
    for i in range(10):
        assert lru.put(f"k{i}", i, 300, expires_at=100)
        if i == 2:
            assert lru.get("k0") == 0  # k0 is now the most recent: k1 goes first
    assert lru.bytes_used <= 1000 and len(lru) == 3 and lru.evictions == 7
    assert [lru.get(f"k{i}") for i in (7, 8, 9)] == [7, 8, 9] and lru.get("k0") is None
    assert not lru.put("huge", 0, 1001, expires_at=100) and lru.get("huge") is None
    now[0] = 100.0
    assert lru.get("k9") is None and lru.bytes_used == 600  # expired: dropped when looked at


async def test_memory_only_fresh_stale_expired_and_max_age() -> None:
    now = [1000.0]
    cache = ResponseCache(clock=lambda: now[0])
    assert cache.status() == "memory only"
    await cache.store("k", reply(created=now[0]), CacheConfig(ttl_s=10, stale_if_error_s=5))
    await cache.store("k0", reply(created=now[0]), CacheConfig(ttl_s=10))
    now[0] += 4
    found = await cache.lookup("k")
    assert found and found.fresh and found.age_s == 4
    old = await cache.lookup("k", max_age_s=3)  # older than the client accepts: only stale-if-error
    assert old and old.stale
    now[0] += 7
    assert (s := await cache.lookup("k")) and s.stale and s.age_s == 11
    assert await cache.lookup("k0") is None  # no stale window: gone at its TTL
    now[0] += 5
    assert await cache.lookup("k") is None
    assert cache.stats()["hit"] == 1


def test_route_config_merges_over_the_default() -> None:
    cache = ResponseCache(CacheSection(default={"ttl_s": 30, "stale_if_error_s": 60}))
    assert cache.config_for(None) is None
    assert cache.config_for(CacheConfig.model_validate(True)) == CacheConfig(ttl_s=30, stale_if_error_s=60)
    assert cache.config_for(CacheConfig(ttl_s=5)) == CacheConfig(ttl_s=5, stale_if_error_s=60)


def test_the_routing_yaml_cache_sections() -> None:
    base = {"backends": {"b": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1"}}}
    loaded = parse_config(
        {
            **base,
            "cache": {"default": {"ttl_s": 30}, "memory_bytes": 1024},
            "models": {
                "on": {"targets": ["b"], "cache": True},
                "set": {"targets": ["b"], "cache": {"stale_if_error_s": 9}},
                "off": {"targets": ["b"]},
            },
        },
        env={},
    )
    assert loaded.cache.memory_bytes == 1024 and loaded.models["off"].cache is None
    cache = ResponseCache(loaded.cache)
    assert cache.config_for(loaded.models["on"].cache) == CacheConfig(ttl_s=30)
    assert cache.config_for(loaded.models["set"].cache) == CacheConfig(ttl_s=30, stale_if_error_s=9)
    assert parse_config({**base, "models": {"m": {"targets": ["b"]}}}, env={}).cache == CacheSection()
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                **base,
                "cache": {"memory": 1},
                "models": {
                    "m": {"targets": ["b"], "cache": {"ttl": 1}},
                    "n": {"targets": ["b"], "cache": False},
                },
            },
            env={},
        )
    paths = {path for path, _ in caught.value.problems}
    assert paths == {"cache.memory", "models.m.cache.ttl", "models.n.cache"}


# --- Redis ---------------------------------------------------------------------------------------


async def test_redis_round_trip_between_replicas_with_ttls(shared: ResponseCache, tenant: str) -> None:
    other = ResponseCache(CacheSection(redis_timeout_ms=500), SHARED)
    await other.start()
    try:
        assert shared.status() == other.status() == "ok"
        stored = reply("from a")
        await shared.store(key_of(tenant), stored, CFG)
        found = await other.lookup(key_of(tenant))  # not in its memory: from Redis
        assert found and found.fresh and found.entry == stored
        assert await other.lookup(key_of(tenant, 1)) is None
        flight = await other.join(key_of(tenant, 2), CFG)  # a lock key too
        assert flight.leader
        r = redis.Redis.from_url(SHARED)
        keys = list(r.scan_iter(match=f"interlock:v1:{{{tenant_tag(tenant)}}}:*"))
        assert {k.decode() for k in keys} == {key_of(tenant), lock_key(key_of(tenant, 2))}
        for k in keys:  # every key has a TTL: the entry's is ttl + stale window
            assert 0 < r.pttl(k) <= (CFG.ttl_s + CFG.stale_if_error_s) * 1000
        await flight.done()
        assert not r.exists(lock_key(key_of(tenant, 2)))
    finally:
        await other.close()


async def test_garbage_in_redis_is_a_miss(shared: ResponseCache, tenant: str) -> None:
    redis.Redis.from_url(SHARED).set(key_of(tenant), b"\x00 not an entry", px=60_000)
    assert await shared.lookup(key_of(tenant)) is None


async def eventually(condition: Callable[[], bool], within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while True:
        if condition():
            return
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def _timed(call: object) -> float:
    started = time.perf_counter()
    await call  # type: ignore[misc]
    return time.perf_counter() - started


async def test_paused_redis_is_a_fast_miss_then_the_cache_resumes(private: RedisServer) -> None:
    writer, cache = ResponseCache(FAST, private.url), ResponseCache(FAST, private.url)
    await writer.start()
    await cache.start()
    try:
        await writer.store("only-in-redis", reply("remote"), CFG)
        assert (await cache.lookup("warm-up")) is None and cache.status() == "ok"
        admin = aredis.Redis.from_url(private.url)
        await admin.execute_command("CLIENT", "PAUSE", 2000)
        paused_at = time.monotonic()
        times = [await _timed(cache.lookup(f"absent-{i}")) for i in range(10)]
        assert await cache.lookup("only-in-redis") is None  # a miss, not an error or a wait
        times.append(await _timed(cache.store("new", reply("local"), CFG)))
        assert time.monotonic() - paused_at < 2, "the calls above should not have waited for Redis"
        assert statistics.median(times) < 0.05 and max(times) < 0.5, times
        assert cache._redis.breaker.state == "open" and cache.status().startswith("degraded")
        found = await cache.lookup("new")  # the in-process tier works on
        assert found and found.fresh and found.entry.as_json() == reply("local").as_json()

        deadline = time.monotonic() + 20  # the pause's end, the cool-down, then the probes
        while cache.status() != "ok":  # misses go to Redis, so they are the probes
            assert time.monotonic() < deadline, cache.status()
            await cache.lookup("absent")
            await asyncio.sleep(0.05)
        found = await cache.lookup("only-in-redis")
        assert found and found.entry.as_json() == reply("remote").as_json()
        await admin.aclose()
    finally:
        await writer.close()
        await cache.close()


async def test_killed_redis_then_back(private: RedisServer) -> None:
    cache = ResponseCache(FAST, private.url)
    await cache.start()
    try:
        await cache.store("a", reply(), CFG)
        private.stop()
        times = [await _timed(cache.lookup(f"absent-{i}")) for i in range(10)]
        assert max(times) < 0.5 and cache.status().startswith("degraded")
        assert (await cache.lookup("a")) is not None  # memory
        private.start()  # same port, empty: the cache writes to it again once the breaker lets it
        deadline = time.monotonic() + 20
        while cache.status() != "ok" or not redis.Redis(port=private.port).exists("b"):
            assert time.monotonic() < deadline, cache.status()
            await cache.store("b", reply(), CFG)
            await asyncio.sleep(0.05)
    finally:
        await cache.close()


async def test_nothing_listening_is_memory_only() -> None:
    cache = ResponseCache(FAST, f"redis://127.0.0.1:{free_port()}")
    assert await _timed(cache.start()) < 2
    try:
        assert cache.status().startswith("degraded")
        await cache.store("k", reply(), CFG)
        times = [await _timed(cache.lookup("k")) for _ in range(5)]
        assert (await cache.lookup("k")) is not None and max(times) < 0.5
        flight = await cache.join("k2", CFG)  # single flight still works, in process
        assert flight.leader
        await flight.done()
    finally:
        await cache.close()


# --- single flight -------------------------------------------------------------------------------


async def _leader_and_followers(
    caches: list[ResponseCache], key: str, n: int, entry: CachedReply | None
) -> list[Flight]:
    """``n`` joins spread over ``caches``, each handled as it returns, as the pipeline would: a
    leader stores ``entry`` (or fails, if None) and is done."""
    tasks = [asyncio.create_task(caches[i % len(caches)].join(key, CFG)) for i in range(n)]
    flights = []
    for next_one in asyncio.as_completed(tasks):
        flight = await next_one
        if flight.leader:
            if entry is not None:
                await flight.cache.store(key, entry, CFG)
            await flight.done()
        flights.append(flight)
    return flights


async def test_one_process_100_joins_one_leader() -> None:
    cache = ResponseCache()
    flights = await _leader_and_followers([cache], "k", 100, reply("once"))
    assert sum(f.leader for f in flights) == 1
    assert all(
        f.entry and f.entry.fresh and f.entry.entry == reply("once").__class__.decode(f.entry.entry.encode())
        for f in flights
        if not f.leader
    )
    assert cache.stats()["followers_served"] == 99 and not cache._flights


async def test_three_replicas_one_leader(tenant: str) -> None:
    caches = [ResponseCache(CacheSection(redis_timeout_ms=500), SHARED) for _ in range(3)]
    for c in caches:
        await c.start()
    try:
        flights = await _leader_and_followers(caches, key_of(tenant), 99, reply("shared"))
        assert sum(f.leader for f in flights) == 1
        followers = [f for f in flights if not f.leader]
        assert len(followers) == 98 and all(f.entry and f.entry.entry.model == "m" for f in followers)
        assert sum(c.counters["leaders"] for c in caches) == 1
    finally:
        for c in caches:
            await c.close()


async def test_a_failed_leader_frees_its_followers(tenant: str) -> None:
    caches = [ResponseCache(CacheSection(redis_timeout_ms=500), SHARED) for _ in range(2)]
    for c in caches:
        await c.start()
    try:
        started = time.monotonic()
        flights = await _leader_and_followers(caches, key_of(tenant), 10, None)
        followers = [f for f in flights if not f.leader]
        # the other replica's first joiner leads its own process once it sees the lock gone
        assert all(f.entry is None for f in followers) and sum(f.leader for f in flights) == 2
        assert time.monotonic() - started < 5
    finally:
        for c in caches:
            await c.close()


async def test_a_dead_leader_lets_followers_go_after_the_lock_ttl(tenant: str) -> None:
    section = CacheSection(redis_timeout_ms=500, lock_ttl_s=0.5, follower_wait_s=30)
    dying, alive = ResponseCache(section, SHARED), ResponseCache(section, SHARED)
    await dying.start()
    await alive.start()
    try:
        assert (await dying.join(key_of(tenant), CFG)).leader
        await dying.close()  # the process is gone: no done(), no more lock refreshes
        started = time.monotonic()
        flight = await alive.join(key_of(tenant), CFG)
        assert flight.leader and flight.entry is None  # it calls upstream itself
        assert time.monotonic() - started < 10  # the lock's TTL, not follower_wait_s
        await flight.done()
    finally:
        await alive.close()


async def test_a_stuck_leader_is_waited_for_at_most_follower_wait_s(tenant: str) -> None:
    a = ResponseCache(CacheSection(redis_timeout_ms=500, lock_ttl_s=0.3, follower_wait_s=10), SHARED)
    b = ResponseCache(CacheSection(redis_timeout_ms=500, lock_ttl_s=0.3, follower_wait_s=0.6), SHARED)
    await a.start()
    await b.start()
    try:
        stuck = await a.join(key_of(tenant), CFG)  # alive but slow: it keeps refreshing its lock
        assert stuck.leader
        started = time.monotonic()
        remote = await b.join(key_of(tenant), CFG)
        assert remote.entry is None and remote.leader  # it gave up and calls upstream itself
        assert 0.5 < time.monotonic() - started < 8
        assert redis.Redis.from_url(SHARED).exists(lock_key(key_of(tenant)))  # refreshed past its TTL
        for f in (remote, stuck):
            await f.done()
    finally:
        await a.close()
        await b.close()


async def test_in_process_followers_wait_at_most_follower_wait_s() -> None:
    cache = ResponseCache(CacheSection(follower_wait_s=0.3))
    stuck = await cache.join("k", CFG)
    follower = await cache.join("k", CFG)
    assert stuck.leader and not follower.leader and follower.entry is None
    again = await cache.join("k", CFG)  # past the bound the old flight is presumed dead: a new one
    assert again.leader
    await again.done()
    await stuck.done()  # late: harmless
    assert not cache._flights


async def test_a_cancelled_joiner_does_not_strand_its_followers(tenant: str) -> None:
    # a wide timeout: on a loaded machine a lock call over the default would make b lead at once
    section = CacheSection(redis_timeout_ms=5000)
    a, b = ResponseCache(section, SHARED), ResponseCache(section, SHARED)
    await a.start()
    await b.start()
    try:
        held = await a.join(key_of(tenant), CFG)
        assert held.leader and held._token, a.status()  # it holds the Redis lock
        following = asyncio.create_task(b.join(key_of(tenant), CFG))  # b's leader polls a's lock
        await eventually(lambda: key_of(tenant) in b._flights)
        waiting = asyncio.create_task(b.join(key_of(tenant), CFG))  # and this one waits on it
        await eventually(lambda: b._flights[key_of(tenant)].followers > 0)
        assert not following.done(), following.result()
        following.cancel()  # its client left
        started = time.monotonic()
        done, _ = await asyncio.wait([waiting], timeout=10)
        assert done, f"still waiting; following: {following}, flights: {b._flights}, {b.counters}"
        flight = waiting.result()
        assert flight.entry is None and time.monotonic() - started < 5  # not follower_wait_s
        assert not b._flights
        await held.done()
    finally:
        await a.close()
        await b.close()
