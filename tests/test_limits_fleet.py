"""Per-key limits held by a fleet: three gateway processes on one private Redis, a replica killed
with its leases held, Redis killed mid-run, and the script on a 3-node Redis Cluster."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio

from gateway.limits import Limits
from gateway.limits_config import LimitsSection
from tests.redis_servers import REDIS_CLI, REDIS_SERVER, RedisServer, create_cluster
from tests.test_cache_fleet import start_gateway, wait_ready
from tests.usage_upstream import UsageUpstream

pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None or REDIS_CLI is None, reason="redis-server and redis-cli are not installed"
)


def routing(upstream: str, limits: str) -> str:
    return f"""
backends:
  up: {{kind: openai, base_url: "{upstream}", model: m, timeouts: {{first_token: 30, total: 90}}}}
  held: {{kind: openai, base_url: "{upstream}", model: hold, timeouts: {{first_token: 30, total: 90}}}}
models:
  chat: {{targets: [up]}}
  hold: {{targets: [held]}}
resilience: {{health_check: {{interval_s: 0}}}}
limits:
  redis_timeout_ms: 500   # a loaded test machine: a slow answer must not look like an outage here
  heartbeat_s: 0.2
  lease_ttl_s: 2
  keys:
    "*": {limits}
"""


class Fleet:
    def __init__(self, tmp_path: Path, limits: str) -> None:
        self.redis = RedisServer(tmp_path).start()
        self.upstream = UsageUpstream().__enter__()
        config = tmp_path / "routing.yaml"
        config.write_text(routing(self.upstream.base_url, limits))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.urls: list[str] = []
        for _ in range(3):
            proc, url = start_gateway(config, self.redis.url)
            self.procs.append(proc)
            self.urls.append(url)
        for proc, url in zip(self.procs, self.urls, strict=True):
            wait_ready(proc, url)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                # once, on a loaded CI machine, a replica took over 20 s to stop (not seen again);
                # this module is about limits: the shutdown has its own tests
                proc.kill()
                proc.wait(10)
        self.upstream.__exit__()
        self.redis.stop()


@pytest.fixture
def fleet(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    f = Fleet(tmp_path, request.param)
    try:
        yield f
    finally:
        f.close()


def chat(**extra: object) -> dict[str, object]:
    return {"model": "chat", "messages": [{"role": "user", "content": "hello"}], **extra}


async def fire(urls: list[str], bodies: list[dict[str, object]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(
            *(client.post(urls[i % len(urls)] + "/v1/chat/completions", json=b) for i, b in enumerate(bodies))
        )


@pytest.mark.parametrize("fleet", ["{rpm: 30}"], indirect=True)
def test_rpm_holds_across_three_gateways(fleet: Fleet) -> None:
    started = time.monotonic()
    responses = asyncio.run(fire(fleet.urls, [chat(max_tokens=1)] * 120))
    elapsed = time.monotonic() - started
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}
    ok = statuses.count(200)
    # GCRA: the burst of 30, then one every 2 s; per replica it would have been 90
    assert 30 <= ok <= 30 + int(elapsed / 2) + 1, (ok, elapsed)
    refused = next(r for r in responses if r.status_code == 429)
    assert (
        int(refused.headers["retry-after"]) >= 1 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    )


@pytest.mark.parametrize("fleet", ["{tpm: 6000}"], indirect=True)
def test_tpm_admits_no_more_real_tokens_than_its_limit(fleet: Fleet) -> None:
    rng = random.Random(7)
    bodies = [chat(stream=True, max_tokens=rng.randint(20, 200)) for _ in range(300)]
    started = time.monotonic()
    responses = asyncio.run(fire(fleet.urls, bodies))
    elapsed = time.monotonic() - started
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and statuses.count(429) > 0
    for r in responses:
        if r.status_code == 200:
            assert r.content.endswith(b"data: [DONE]\n\n") and b'"usage"' not in r.content
    # every token the upstream produced for an admitted stream, against what the bucket can give:
    # its capacity plus its refill (6000 a minute) over the run
    assert fleet.upstream.replies == statuses.count(200)
    assert fleet.upstream.tokens <= 6000 + 100 * elapsed, (fleet.upstream.tokens, elapsed)
    # settled on real usage: the surplus of each reservation came back (without refunds the
    # bucket would be about empty now)
    used = fleet.upstream.tokens
    after = httpx.post(fleet.urls[1] + "/v1/chat/completions", json=chat(max_tokens=1))
    assert after.status_code == 200
    assert int(after.headers["x-ratelimit-remaining-tokens"]) >= 6000 - used - 100, (used, after.headers)


@pytest.mark.parametrize("fleet", ["{max_parallel: 3}"], indirect=True)
def test_a_killed_replica_frees_its_parallel_slots_within_the_lease_ttl(fleet: Fleet) -> None:
    victim, survivor = fleet.urls[0], fleet.urls[1]
    client = httpx.Client(timeout=60)
    held = []
    for _ in range(3):
        request = client.build_request(
            "POST", victim + "/v1/chat/completions", json=chat(model="hold", stream=True)
        )
        response = client.send(request, stream=True)
        assert response.status_code == 200
        chunks = response.iter_bytes()
        next(chunks)  # the stream is open: its lease is held (the iterator kept, or it closes)
        held.append((response, chunks))
    assert httpx.post(survivor + "/v1/chat/completions", json=chat()).status_code == 429
    fleet.procs[0].kill()  # kill -9: no lease is given back
    killed = time.monotonic()
    while httpx.post(survivor + "/v1/chat/completions", json=chat(max_tokens=1)).status_code != 200:
        assert time.monotonic() - killed < 2 + 10, "the dead replica's leases never expired"
        time.sleep(0.1)
    client.close()


@pytest.mark.parametrize("fleet", ["{rpm: 120, on_redis_failure: local}"], indirect=True)
def test_redis_killed_mid_run_no_5xx_and_local_shares_hold(fleet: Fleet) -> None:
    statuses: list[int] = []
    started = time.monotonic()
    for wave in range(12):
        if wave == 4:
            fleet.redis.stop()
        statuses += [r.status_code for r in asyncio.run(fire(fleet.urls, [chat(max_tokens=1)] * 30))]
        time.sleep(0.5)  # a steady offer over seconds, so the pace after the outage shows
    elapsed = time.monotonic() - started
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    allowed = 120 + 2 * elapsed
    # plus one request per replica: each local share starts from Redis's word as of its last
    # heartbeat, and a loaded CI machine once admitted 1.107x without that slack
    assert statuses.count(200) <= 1.1 * allowed + len(fleet.urls), (statuses.count(200), elapsed)
    assert statuses[120:].count(200) >= 1  # the replicas went on alone: local, not closed
    print(f"admitted {statuses.count(200)} of {len(statuses)} in {elapsed:.1f} s; allowed {allowed:.0f}")


def test_the_script_runs_on_a_redis_cluster_without_crossslot(tmp_path: Path) -> None:
    nodes = [RedisServer(tmp_path, cluster=True).start() for _ in range(3)]
    try:
        create_cluster(nodes)
        url = f"redis+cluster://127.0.0.1:{nodes[0].port}"
        section = LimitsSection.model_validate(
            {
                "keys": {
                    "*": {
                        "rpm": 100,
                        "tpm": 10_000,
                        "usd": {"amount": 5},
                        "max_parallel": 5,
                        "models": {"chat": {"rpm": 50, "tpm": 5000, "max_parallel": 2}},
                    }
                }
            }
        )

        async def main() -> None:
            limits = Limits(url, timeout_s=2.0)
            await limits.start()
            assert limits.redis is not None
            try:
                for i in range(30):  # tenants spread over slots; each tenant's keys in one
                    checks = limits.plan(section, f"tenant-{i}", "chat", 100, 0.01, 30)
                    decision = await limits.admit(checks)
                    assert decision.tier == "redis" and decision.admitted, decision
                    held = [(c, decision.lease) for c in checks if c.kind == "parallel"]
                    assert await limits.redis.heartbeat(held, 3.0) >= 1
                    await limits.settle(decision, 40, 0.001)
                assert limits.redis.tier.errors == 0, limits.redis.tier.last_error
            finally:
                await limits.close()

        asyncio.run(main())
        for node in nodes:
            stats = redis.Redis(port=node.port).info("errorstats")
            assert not any("CROSSSLOT" in name for name in stats), stats
    finally:
        for node in nodes:
            node.stop()


def test_a_paused_redis_costs_one_timeout_and_each_scope_takes_its_on_redis_failure(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    section = LimitsSection.model_validate({"keys": {"*": {"rpm": 1000}}})

    def block(mode: str) -> LimitsSection:
        return LimitsSection.model_validate({"keys": {"*": {"rpm": 1000, "on_redis_failure": mode}}})

    async def main() -> None:
        limits = Limits(server.url, timeout_s=0.05, heartbeat_s=0.1)
        await limits.start()
        try:
            assert (await limits.admit(limits.plan(section, "t", "chat", 1, 0.0, 30))).tier == "redis"
            pauser = redis.asyncio.Redis(port=server.port)
            await pauser.client_pause(3000)
            await pauser.aclose()
            for mode, admitted in (("local", True), ("open", True), ("closed", False)):
                started = time.monotonic()
                decision = await limits.admit(limits.plan(block(mode), "t", "chat", 1, 0.0, 30))
                assert time.monotonic() - started < 1.0  # the timeout (or the open breaker), no hang
                assert decision.tier == "fallback" and decision.admitted is admitted, (mode, decision)
            server.stop()  # gone altogether: still no error, still fast
            started = time.monotonic()
            decision = await limits.admit(limits.plan(block("local"), "t", "chat", 1, 0.0, 30))
            assert decision.tier == "fallback" and decision.admitted and time.monotonic() - started < 1.0
            await limits.settle(decision, 1, None)
        finally:
            await limits.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()
