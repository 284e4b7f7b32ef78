"""The response cache as a fleet uses it: separate gateway processes sharing one Redis, and a
gateway on a Redis Cluster (every key of a tenant under one hash tag: no CROSSSLOT)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import run_gateway
from tests.fakes import FakeUpstream, free_port
from tests.redis_servers import REDIS_CLI, REDIS_SERVER, RedisServer, create_cluster

pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None or REDIS_CLI is None, reason="redis-server and redis-cli are not installed"
)
ROOT = Path(__file__).resolve().parents[1]


def routing(upstream: str, model: str) -> str:
    return f"""
backends:
  up: {{kind: openai, base_url: "{upstream}", model: {model}, timeouts: {{first_token: 20, total: 30}}}}
models:
  m: {{targets: [up], cache: {{ttl_s: 60}}}}
resilience: {{health_check: {{interval_s: 0}}}}
cache: {{redis_timeout_ms: 1000}}
"""


def start_gateway(config: Path, redis_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "INTERLOCK_REDIS_URL": redis_url,
        "INTERLOCK_SHUTDOWN_DELAY_S": "0",
        "INTERLOCK_RELOAD_WATCH": "false",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen[bytes], url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, "a gateway process exited"
        try:
            if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "a gateway process never became ready"
        time.sleep(0.1)


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[tuple[FakeUpstream, list[str]]]:
    with FakeUpstream(slow_s=1.5) as fake:
        config = tmp_path / "routing.yaml"
        config.write_text(routing(fake.base_url, "slow"))
        started = [start_gateway(config, "redis://127.0.0.1:6379/13") for _ in range(3)]
        try:
            for proc, url in started:
                wait_ready(proc, url)
            yield fake, [url for _, url in started]
        finally:
            for proc, _ in started:
                proc.terminate()
            for proc, _ in started:
                proc.wait(20)


async def burst(urls: list[str], n: int, content: str) -> list[httpx.Response]:
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "temperature": 0}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as client:
        return await asyncio.gather(
            *(client.post(urls[i % len(urls)] + "/v1/chat/completions", json=body) for i in range(n))
        )


def test_100_identical_requests_over_3_gateway_processes_make_one_upstream_call(
    gateways: tuple[FakeUpstream, list[str]],
) -> None:
    fake, urls = gateways
    content = f"Say hello. ({uuid.uuid4().hex})"
    responses = asyncio.run(burst(urls, 100, content))
    assert [r.status_code for r in responses] == [200] * 100
    assert {r.json()["choices"][0]["message"]["content"] for r in responses} == {"Hello there."}
    assert sum(1 for r in fake.requests if content in str(r.get("messages"))) == 1


@pytest.mark.slow
def test_a_gateway_on_a_redis_cluster(tmp_path: Path) -> None:
    nodes = [RedisServer(tmp_path, cluster=True) for _ in range(3)]
    for node in nodes:
        node.start()
    try:
        create_cluster(nodes)
        url = f"redis+cluster://127.0.0.1:{nodes[0].port}"
        with (
            FakeUpstream() as fake,
            run_gateway(
                {
                    "backends": {"up": {"kind": "openai", "base_url": fake.base_url, "model": "ok"}},
                    "models": {"m": {"targets": ["up"], "cache": {"ttl_s": 60}}},
                    "resilience": {"health_check": {"interval_s": 0}},
                    "cache": {"redis_timeout_ms": 1000},
                },
                redis_url=url,
            ) as gateway,
        ):
            client = openai.OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
            for i in range(12):  # tenants share no slot, requests of one tenant one slot
                messages = [{"role": "user", "content": f"hello {i} {uuid.uuid4().hex}"}]
                first = client.chat.completions.with_raw_response.create(
                    model="m", messages=messages, temperature=0
                )
                again = client.chat.completions.with_raw_response.create(
                    model="m", messages=messages, temperature=0
                )
                seen = (first.headers["x-interlock-cache"], again.headers["x-interlock-cache"])
                assert seen == ("miss", "hit")
            ready = httpx.get(gateway + "/health/ready", timeout=5).json()
            assert ready["cache"] == "ok", ready  # no CROSSSLOT or any other Redis error on the way
    finally:
        for node in nodes:
            node.stop()
