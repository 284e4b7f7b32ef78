"""Replicas publish their config hash through the real Redis on loopback, so a diverging one is
seen in ``/admin/config`` and ``/metrics``."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from backends.base import Resources
from gateway.config import parse_config
from gateway.config_peers import ConfigPeers
from gateway.server import build_gateway
from tests.conftest import run_gateway
from tests.fakes import FakeUpstream, free_port, openai_backend

#: a db of this module's own on the shared Redis
REDIS = "redis://127.0.0.1:6379/12"

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


def _redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def routing(up: FakeUpstream, model: str = "ok") -> dict[str, Any]:
    return {
        "backends": {"a": openai_backend(up.base_url, model)},
        "models": {"chat": {"targets": ["a"]}},
        "resilience": {"health_check": {"interval_s": 0}},
    }


def admin_config(url: str) -> dict[str, Any]:
    reply = httpx.get(url + "/admin/config", timeout=10)
    assert reply.status_code == 200
    return reply.json()


def gauge(url: str, name: str) -> str:
    text = httpx.get(url + "/metrics", timeout=10).text
    return "\n".join(line for line in text.splitlines() if line.startswith(name))


def test_a_replica_serving_another_config_is_seen(tmp_path: Path) -> None:
    if not _redis_up():
        pytest.skip("no Redis on 127.0.0.1:6379")
    run = uuid.uuid4().hex[:8]
    first, second = f"one-{run}", f"two-{run}"
    with FakeUpstream() as up:
        path_a, path_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
        path_a.write_text(json.dumps(routing(up)))
        path_b.write_text(json.dumps(routing(up)))
        common = {"redis_url": REDIS, "config_publish_s": 0.2, "reload_watch": False}
        with (
            run_gateway(path_a, replica_id=first, **common) as a,
            run_gateway(path_b, replica_id=second, **common) as b,
        ):
            wait_for(lambda: {first, second} <= set(admin_config(a)["peers"]["replicas"]))
            view = admin_config(a)["peers"]
            assert view["replica_id"] == first and view["error"] is None
            assert view["replicas"][first] == view["replicas"][second] == admin_config(a)["hash"]
            assert view["diverging"] == [] or set(view["diverging"]).isdisjoint({first, second})

            # b is reloaded with another file; a sees it diverge, and so does b see a
            path_b.write_text(json.dumps(routing(up, model="other")))
            assert httpx.post(b + "/admin/reload", timeout=10).status_code == 200
            wait_for(lambda: second in admin_config(a)["peers"]["diverging"])
            wait_for(lambda: first in admin_config(b)["peers"]["diverging"])
            assert admin_config(a)["peers"]["replicas"][second] == admin_config(b)["hash"]
            assert "interlock_config_diverging_replicas" in gauge(a, "interlock_config_diverging")
            assert float(gauge(a, "interlock_config_diverging_replicas ").split()[-1]) >= 1
            assert f'interlock_config_replicas{{hash="{admin_config(b)["hash"]}"}}' in gauge(
                a, "interlock_config_replicas"
            )
        # a replica that stops takes its key with it (or its TTL does, a second later)
        keys = redis.Redis.from_url(REDIS)
        wait_for(lambda: keys.keys(f"interlock:{{config-peers}}:*{run}") == [], timeout=5)


async def test_redis_gone_keeps_serving_and_says_so() -> None:
    if not _redis_up():
        pytest.skip("no Redis on 127.0.0.1:6379")
    with FakeUpstream() as up:
        gateway = build_gateway(parse_config(routing(up), "<test>"), Resources())
        prefix = f"interlock-test-{uuid.uuid4().hex[:8]}:"
        peers = ConfigPeers(gateway, REDIS, "r1", prefix=prefix, interval_s=60)
        other = ConfigPeers(gateway, REDIS, "r2", prefix=prefix, interval_s=60)
        await peers.start()
        await other.start()
        try:
            await other.tick()
            await peers.tick()
            assert set(peers.view()["replicas"]) == {"r1", "r2"}  # type: ignore[arg-type]
            ttl = redis.Redis.from_url(REDIS).ttl(prefix + "r1")
            assert 0 < ttl <= 180
            # a Redis that cannot be reached: the error is shown and the last view kept
            dead = ConfigPeers(gateway, f"redis://127.0.0.1:{free_port()}/0", "r3", prefix=prefix)
            await dead.start()
            await dead.tick()
            assert dead.view()["error"] is not None and dead.view()["replicas"] == {
                "r3": gateway.snapshot.hash
            }
            await dead.close()
        finally:
            await peers.close()
            await other.close()
        assert redis.Redis.from_url(REDIS).keys(prefix + "*") == []
