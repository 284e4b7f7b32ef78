"""Replicas see each other's config hash through the fleet's heartbeats on the real Redis on
loopback, so a diverging one is seen in ``/admin/config`` and ``/metrics``."""

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
from gateway.fleet import Fleet
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
        common = {"redis_url": REDIS, "reload_watch": False}
        with run_gateway(path_a, replica=first, **common) as a:
            with run_gateway(path_b, replica=second, **common) as b:
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
            # a replica that stops leaves the fleet, and the view, at once
            wait_for(lambda: second not in admin_config(a)["peers"]["replicas"], timeout=10)


async def test_redis_gone_keeps_serving_and_says_so() -> None:
    with FakeUpstream() as up:
        gateway = build_gateway(parse_config(routing(up), "<test>"), Resources())
        gateway.fleet = Fleet(
            lambda: gateway.snapshot.targets.values(),
            gateway.health,
            redis_url=f"redis://127.0.0.1:{free_port()}/0",
            replica="r3",
        )
        await gateway.fleet.start()  # bounded: a Redis that cannot be reached is no error
        try:
            view = ConfigPeers(gateway).view()
            assert view["error"] is not None and view["replicas"] == {"r3": gateway.snapshot.hash}
            assert view["diverging"] == []
        finally:
            await gateway.fleet.close()
