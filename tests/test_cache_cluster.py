"""The cache on a 3-node Redis Cluster started here from redis-server: store, lookup and single
flight for many tenants (spread over every node), with 0 CROSSSLOT errors, or any other."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from redis.cluster import RedisCluster, key_slot

from gateway.cache import CacheConfig, CacheSection, ResponseCache
from gateway.cache_entry import CachedReply, reply_from_json
from gateway.cache_key import cache_key, lock_key
from tests.redis_servers import REDIS_CLI, REDIS_SERVER, RedisServer, create_cluster

# about 3 s here (three servers, the cluster's creation): not marked slow
pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None or REDIS_CLI is None, reason="redis-server/redis-cli not installed"
)

CFG = CacheConfig(ttl_s=60, stale_if_error_s=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    workdir = tmp_path_factory.mktemp("redis-cluster")
    nodes = [RedisServer(workdir, cluster=True) for _ in range(3)]
    try:
        for node in nodes:
            node.start()
        create_cluster(nodes)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def _reply(text: str) -> CachedReply:
    body = (
        b'{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"' + text.encode() + b'"},"finish_reason":"stop"}]}'
    )
    entry = reply_from_json("chat", body, now=time.time())
    assert entry is not None
    return entry


async def test_many_tenants_on_a_cluster_without_crossslot(cluster: list[RedisServer]) -> None:
    url = f"redis+cluster://127.0.0.1:{cluster[0].port}"
    section = CacheSection(redis_timeout_ms=1000)  # generous: a loaded machine; this is about slots
    replicas = [ResponseCache(section, url) for _ in range(2)]
    for replica in replicas:
        await replica.start()
    direct = RedisCluster(host="127.0.0.1", port=cluster[0].port)
    try:
        assert all(r.status() == "ok" for r in replicas), [r.status() for r in replicas]
        tenants = [f"tenant-{i}" for i in range(12)]
        keys = {
            t: cache_key("chat", t, "m", {"messages": [{"role": "user", "content": "hi"}], "seed": 1})
            for t in tenants
        }
        # the tenants really are spread over the nodes, and each one's keys share one slot
        owners = {direct.get_node_from_key(k).port for k in keys.values()}
        assert len(owners) >= 2
        assert all(key_slot(k.encode()) == key_slot(lock_key(k).encode()) for k in keys.values())

        for tenant, key in keys.items():
            await replicas[0].store(key, _reply(tenant), CFG)
            found = await replicas[1].lookup(key)
            assert found and found.fresh and tenant.encode() in found.entry.as_json()
            assert 0 < direct.pttl(key) <= 70_000

        async def flight(tenant: str) -> int:
            key = keys[tenant] + "-sf"  # same tag: a fresh key of this tenant
            joins = [asyncio.create_task(replicas[i % 2].join(key, CFG)) for i in range(6)]
            leaders = 0
            for next_one in asyncio.as_completed(joins):
                f = await next_one
                if f.leader:
                    leaders += 1
                    await f.cache.store(key, _reply(tenant), CFG)
                    await f.done()
                else:
                    assert f.entry is not None
            return leaders

        assert await asyncio.gather(*(flight(t) for t in tenants)) == [1] * len(tenants)
        served = [r.counters["followers_served"] for r in replicas]
        assert sum(served) == 5 * len(tenants) and min(served) > 0  # remote followers polled too
        errors = [(r._redis.errors, r._redis.last_error) for r in replicas]  # CROSSSLOT would be one
        assert errors == [(0, None), (0, None)]
    finally:
        direct.close()
        for replica in replicas:
            await replica.close()
