"""Three gateway processes sharing one private redis-server, in front of one fake OpenAI-speaking
upstream. Each replica reaches the upstream under a path of its own (``/r0/v1``, ``/r1/v1``, ...;
the backend is called ``up`` everywhere), so the upstream can tell which replica sent a request;
a ``spare`` backend (shared path) is every route's fallback, so clients get answers throughout."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from tests.fakes import chat_completion, free_port, serve_app, wait_for
from tests.redis_servers import REDIS_SERVER, RedisServer

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
ROOT = Path(__file__).resolve().parents[1]
REPLICAS = 3
COOLDOWN_S = 1.0


@dataclass
class Upstream:
    """Chat completions and ``GET /models`` under ``/<replica>/v1``; ``failing`` turns the replicas'
    chat paths into 500s (``spare`` always answers), ``models_failing`` their /models into 502s."""

    port: int = field(default_factory=free_port)
    failing: bool = False
    models_failing: bool = False
    #: (replica path, monotonic time) of each chat request and each /models request
    chats: list[tuple[str, float]] = field(default_factory=list)
    checks: list[tuple[str, float]] = field(default_factory=list)

    def url(self, who: str) -> str:
        return f"http://127.0.0.1:{self.port}/{who}/v1"

    async def chat(self, request: web.Request) -> web.Response:
        who = request.match_info["who"]
        await request.read()
        self.chats.append((who, time.monotonic()))
        if self.failing and who != "spare":
            return web.json_response(
                {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}},
                status=500,
            )
        return web.json_response(chat_completion("m"))

    async def models(self, request: web.Request) -> web.Response:
        who = request.match_info["who"]
        self.checks.append((who, time.monotonic()))
        if self.models_failing and who != "spare":
            return web.json_response({"error": {"message": "down", "type": "server_error"}}, status=502)
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    def __enter__(self) -> Upstream:
        app = web.Application()
        app.router.add_post("/{who}/v1/chat/completions", self.chat)
        app.router.add_get("/{who}/v1/models", self.models)
        self._stop = serve_app(app, self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def chats_since(self, since: float) -> list[tuple[str, float]]:
        return [(who, t) for who, t in list(self.chats) if t >= since and who != "spare"]


def routing(upstream: Upstream, who: str, health_interval_s: float) -> str:
    return f"""
backends:
  up: {{kind: openai, base_url: "{upstream.url(who)}", model: m, timeouts: {{first_token: 5, total: 10}}}}
  spare: {{kind: openai, base_url: "{upstream.url("spare")}", model: m}}
models:
  m: {{targets: [up], fallback: [spare]}}
resilience:
  breaker: {{consecutive_failures: 2, min_calls: 2, cooldown_s: {COOLDOWN_S}, max_cooldown_s: 2,
            half_open_probes: 1, successes_to_close: 1}}
  health_check: {{interval_s: {health_interval_s}, timeout_s: 1}}
"""


@dataclass
class Replica:
    name: str
    proc: subprocess.Popen[bytes]
    url: str

    def breaker_state(self) -> float:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        found = re.search(r'^interlock_breaker_state\{backend="up"\} (\S+)$', text, re.M)
        assert found, "no breaker gauge for backend up"
        return float(found.group(1))

    def up(self) -> dict[str, object]:
        report = httpx.get(self.url + "/admin/routes", timeout=5).json()
        return next(c for c in report["routes"]["m"]["order"] if c["backend"] == "up")


def start(tmp_path: Path, upstream: Upstream, redis_url: str, health_interval_s: float) -> list[Replica]:
    replicas = []
    for i in range(REPLICAS):
        name = f"r{i}"
        config = tmp_path / f"{name}.yaml"
        config.write_text(routing(upstream, name, health_interval_s))
        port = free_port()
        env = {
            **os.environ,
            "INTERLOCK_REDIS_URL": redis_url,
            "INTERLOCK_REPLICA": name,
            "INTERLOCK_SHUTDOWN_DELAY_S": "0",
            "INTERLOCK_RELOAD_WATCH": "false",
        }
        args = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port", str(port)]
        proc = subprocess.Popen(
            [*args, "--log-level", "warning"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        replicas.append(Replica(name, proc, f"http://127.0.0.1:{port}"))
    for replica in replicas:

        def ready(r: Replica = replica) -> bool:
            assert r.proc.poll() is None, f"gateway {r.name} exited"
            try:
                return httpx.get(r.url + "/health/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=60, what=f"gateway {replica.name} to be ready")
    return replicas


def stop(replicas: list[Replica]) -> None:
    for replica in replicas:
        if replica.proc.poll() is None:
            replica.proc.terminate()
    for replica in replicas:
        replica.proc.wait(20)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Upstream, RedisServer, list[Replica]]]:
    redis = RedisServer(tmp_path).start()
    with Upstream() as upstream:
        replicas = start(tmp_path, upstream, redis.url, health_interval_s=0)
        try:
            yield upstream, redis, replicas
        finally:
            stop(replicas)
            redis.stop()


def ask(replica: Replica) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(replica.url + "/v1/chat/completions", json=body, timeout=30)


async def traffic(replicas: list[Replica], seconds: float, gap_s: float = 0.03) -> list[tuple[int, float]]:
    """Each replica gets a request every ``gap_s`` for ``seconds``: (status, latency) of each."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    results: list[tuple[int, float]] = []

    async def one_replica(client: httpx.AsyncClient, replica: Replica) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            began = time.monotonic()
            try:
                response = await client.post(replica.url + "/v1/chat/completions", json=body)
                results.append((response.status_code, time.monotonic() - began))
            except httpx.TransportError:
                results.append((0, time.monotonic() - began))
            await asyncio.sleep(gap_s)

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(one_replica(client, r) for r in replicas))
    return results


def test_an_open_reaches_the_others_within_a_second_and_one_replica_probes(
    fleet: tuple[Upstream, RedisServer, list[Replica]],
) -> None:
    upstream, _, replicas = fleet
    upstream.failing = True
    for _ in range(2):  # two failures in a row on r0 alone
        assert ask(replicas[0]).status_code == 200  # the spare answered
    opened = time.monotonic()
    assert replicas[0].breaker_state() == 2
    for replica in replicas[1:]:
        wait_for(lambda r=replica: r.breaker_state() == 2, timeout=5, what=f"{replica.name} to open")
        took = time.monotonic() - opened
        assert took < 1.0, f"{replica.name} opened {took:.2f} s after r0"
    assert not upstream.chats_since(opened)  # opened without one request of their own

    # Traffic to all three while the upstream stays down: each cool-down ends on every replica at
    # about the same moment, and one replica probes (one probe slot); its failure doubles the
    # cool-down everywhere.
    results = asyncio.run(traffic(replicas, seconds=5.5))
    assert {status for status, _ in results} == {200}
    probes = upstream.chats_since(opened)
    assert len(probes) >= 2, probes
    gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(probes)]
    assert min(gaps) > 0.8 * COOLDOWN_S, probes  # one probe per cool-down, for the whole fleet

    # The upstream recovers: the next probe closes its replica's circuit, and the others follow.
    upstream.failing = False
    recovered = time.monotonic()
    results = asyncio.run(traffic(replicas, seconds=4))
    assert {status for status, _ in results} == {200}
    assert all(r.breaker_state() == 0 for r in replicas)
    first_probe = min(t for _, t in upstream.chats_since(recovered))
    # after that probe, every replica sends its own traffic to its own path again
    assert {who for who, t in upstream.chats_since(first_probe + 1.0)} == {"r0", "r1", "r2"}


def test_redis_killed_mid_run_each_replica_falls_back_to_its_own_breaker_and_no_5xx(
    fleet: tuple[Upstream, RedisServer, list[Replica]],
) -> None:
    upstream, redis, replicas = fleet

    async def scenario() -> list[tuple[int, float]]:
        async def chaos() -> None:
            await asyncio.sleep(1.0)
            redis.stop()  # kill -9: no goodbye to the clients
            await asyncio.sleep(1.0)
            upstream.failing = True  # each replica must now open on its own
            await asyncio.sleep(2.0)
            upstream.failing = False  # and probe and close on its own

        load = asyncio.create_task(traffic(replicas, seconds=8))
        await chaos()
        return await load

    results = asyncio.run(scenario())
    assert len(results) > 100
    assert {status for status, _ in results} == {200}  # no 5xx, no refused connection
    assert max(latency for _, latency in results) < 2.0  # nobody waited on a dead Redis
    assert all(r.proc.poll() is None for r in replicas)
    assert all(r.breaker_state() == 0 for r in replicas)
    for replica in replicas:  # each tripped and recovered by itself
        assert int(replica.up()["breaker"]["trips"]) >= 1  # type: ignore[index]
    recent = {who for who, _ in upstream.chats_since(time.monotonic() - 1.0)}
    assert recent == {"r0", "r1", "r2"}


def test_one_replica_runs_the_health_checks_and_the_others_read_its_verdict(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path).start()
    with Upstream() as upstream:
        replicas = start(tmp_path, upstream, redis.url, health_interval_s=0.5)
        try:
            settled = time.monotonic() + 1.0
            wait_for(lambda: time.monotonic() > settled + 2.0, what="a few check rounds")
            checkers = {who for who, t in upstream.checks if t > settled and who != "spare"}
            assert len(checkers) == 1, upstream.checks
            (leader,) = checkers
            spare_checks = [t for who, t in upstream.checks if t > settled and who == "spare"]
            assert len(spare_checks) <= 6  # one replica's pace (every 0.5 s), not three

            upstream.models_failing = True
            wait_for(
                lambda: all(r.up()["healthy"] is False for r in replicas),
                timeout=10,
                what="every replica to see the leader's failed check",
            )
            assert {who for who, t in upstream.checks if t > settled and who != "spare"} == {leader}

            # the leader dies without a goodbye: another replica takes the checks over
            dead = next(r for r in replicas if r.name == leader)
            dead.proc.send_signal(signal.SIGKILL)
            dead.proc.wait(10)
            killed = time.monotonic()
            wait_for(
                lambda: any(who not in ("spare", leader) and t > killed for who, t in upstream.checks),
                timeout=15,
                what="another replica to lead the checks",
            )
            taken_over = min(t for who, t in upstream.checks if who not in ("spare", leader) and t > killed)
            took = taken_over - killed
            assert took < 2 * 0.5 + 1 + 1.5  # a lead lives two intervals and a timeout
        finally:
            stop(replicas)
            redis.stop()
