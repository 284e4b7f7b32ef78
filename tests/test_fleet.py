"""The fleet's pieces in one process: several ``Fleet`` objects (one per would-be replica) on a
private redis-server, each with breakers and a health monitor of its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backends.base import Health
from gateway.breaker import BreakerConfig, CircuitBreaker
from gateway.fleet import Fleet, replica_id
from gateway.health import HealthMonitor
from gateway.snapshot import Target
from gateway.stats import BackendStats
from tests.fakes import FakeBackend, ok_handler
from tests.redis_servers import REDIS_SERVER, RedisServer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed"),
]

BREAKER = BreakerConfig(consecutive_failures=2, cooldown_s=0.6, max_cooldown_s=5, half_open_probes=1)


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = RedisServer(tmp_path).start()
    try:
        yield server.url
    finally:
        server.stop()


class Replica:
    """What one gateway process has: a target per backend and a fleet."""

    def __init__(self, name: str, redis_url: str | None, health: Health | None = None) -> None:
        self.checks = 0

        async def health_of() -> Health:
            self.checks += 1
            return health or Health(True)

        backend = FakeBackend("up", ok_handler)
        backend.health = health_of  # type: ignore[method-assign]
        self.target = Target(backend=backend, stats=BackendStats("up"), breaker=CircuitBreaker("up", BREAKER))
        self.monitor = HealthMonitor(lambda: [self.target], interval_s=0.3, timeout_s=0.2, recheck_s=0.1)
        self.fleet = Fleet(
            lambda: [self.target], self.monitor, redis_url=redis_url, replica=name, tick_s=0.05
        )

    @property
    def breaker(self) -> CircuitBreaker:
        return self.target.breaker


async def until(condition: Callable[[], bool], within: float = 10.0, what: str = "condition") -> float:
    """Seconds until ``condition`` held (polled each 5 ms); fails after ``within`` seconds."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def started(replicas: list[Replica]) -> None:
    await asyncio.gather(*(r.fleet.start() for r in replicas))


async def stopped(replicas: list[Replica]) -> None:
    await asyncio.gather(*(r.fleet.close() for r in replicas))


def trip(breaker: CircuitBreaker) -> None:
    for _ in range(BREAKER.consecutive_failures):
        breaker.on_failure()
    assert breaker.state == "open"


async def test_an_open_on_one_replica_opens_the_others_for_what_is_left(redis_url: str) -> None:
    replicas = [Replica(f"r{i}", redis_url) for i in range(3)]
    await started(replicas)
    try:
        trip(replicas[0].breaker)
        took = await until(
            lambda: all(r.breaker.state == "open" for r in replicas), what="the open to reach every replica"
        )
        assert took < 1.0
        for r in replicas[1:]:
            assert 0 < r.breaker.retry_in() <= BREAKER.cooldown_s
            assert r.fleet.breakers.taken["open"] == 1
        assert replicas[0].fleet.breakers.taken["open"] == 0  # its own record is not taken again
    finally:
        await stopped(replicas)


async def test_one_replica_probes_and_its_close_reaches_the_others(redis_url: str) -> None:
    replicas = [Replica(f"r{i}", redis_url) for i in range(3)]
    await started(replicas)
    try:
        trip(replicas[0].breaker)
        await until(lambda: all(r.breaker.state == "open" for r in replicas), what="every replica open")
        await until(lambda: all(r.breaker.state == "half_open" for r in replicas), what="cool-downs to end")
        admitted: list[str] = []
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not admitted:  # requests keep coming to every replica
            admitted += [r.fleet.id for r in replicas if r.breaker.allow()]
            await asyncio.sleep(0.01)
        for _ in range(20):  # and later ones too: still only the lease holder probes
            admitted += [r.fleet.id for r in replicas if r.breaker.allow()]
            await asyncio.sleep(0.01)
        assert len(admitted) == 1, admitted  # one probe slot, on one replica
        prober = next(r for r in replicas if r.fleet.id == admitted[0])
        for _ in range(BREAKER.successes_to_close):
            prober.breaker.allow()
            prober.breaker.on_success()
        assert prober.breaker.state == "closed"
        await until(lambda: all(r.breaker.state == "closed" for r in replicas), what="the close to spread")
    finally:
        await stopped(replicas)


async def test_a_failed_probe_keeps_the_lease_for_the_next_cool_down(redis_url: str) -> None:
    replicas = [Replica(f"r{i}", redis_url) for i in range(2)]
    await started(replicas)
    try:
        trip(replicas[0].breaker)
        await until(lambda: all(r.breaker.state == "half_open" for r in replicas), what="cool-downs to end")

        def one_admitted() -> list[Replica]:
            return [r for r in replicas if r.breaker.allow()]

        probers: list[Replica] = []
        await until(lambda: bool(probers.extend(one_admitted()) or probers), what="a probe")
        prober, other = probers[0], next(r for r in replicas if r is not probers[0])
        prober.breaker.on_failure()  # still sick: reopens with a doubled cool-down
        await until(lambda: other.fleet.breakers.taken["open"] >= 1 and other.breaker.state == "open")
        assert other.breaker.retry_in() > BREAKER.cooldown_s  # the doubled one, taken as it is
        # a route whose every circuit is open asks for a probe at once (probe_early): within this
        # cool-down only the replica whose probe failed may send one
        for _ in range(30):
            assert not other.breaker.probe_early()
            await asyncio.sleep(0.01)
        assert prober.breaker.probe_early()
    finally:
        await stopped(replicas)


async def test_without_redis_every_replica_decides_alone_at_once(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    replicas = [Replica(f"r{i}", server.url) for i in range(2)]
    await started(replicas)
    try:
        assert all(r.fleet.status() == "ok" for r in replicas)
        server.stop()
        await until(lambda: all(r.fleet.status() != "ok" for r in replicas), what="redis to be missed")
        trip(replicas[0].breaker)
        await asyncio.sleep(0.3)  # several ticks: nothing can reach the other replica
        assert replicas[1].breaker.state == "closed"
        await until(lambda: replicas[0].breaker.state == "half_open")
        started_at = time.monotonic()
        assert replicas[0].breaker.allow()  # no lease to ask for: it probes on its own, now
        assert time.monotonic() - started_at < 0.01
        replicas[0].breaker.on_success()
        replicas[0].breaker.allow()
        replicas[0].breaker.on_success()
        assert replicas[0].breaker.state == "closed"
    finally:
        await asyncio.wait_for(stopped(replicas), 5)  # leaving without Redis does not hang


async def test_a_fleet_that_never_reaches_redis_starts_without_waiting_long() -> None:
    replica = Replica("alone", "redis://127.0.0.1:9/0")
    began = time.monotonic()
    await replica.fleet.start()
    try:
        assert time.monotonic() - began < 3
        trip(replica.breaker)
        assert replica.fleet.live_replicas()[0].id == "alone"
    finally:
        await replica.fleet.close()


async def test_live_replicas_come_and_go(redis_url: str) -> None:
    replicas = [Replica(f"r{i}", redis_url) for i in range(3)]
    for r in replicas:
        r.fleet.heartbeat_s = 0.1
        r.fleet.replica_ttl_s = 1.0
    await started(replicas)
    try:

        def ids(r: Replica) -> set[str]:
            return {seen.id for seen in r.fleet.live_replicas()}

        await until(lambda: ids(replicas[0]) == {"r0", "r1", "r2"}, what="all three to be listed")
        await replicas[2].fleet.close()  # leaves at once
        await until(lambda: ids(replicas[0]) == {"r0", "r1"}, what="r2 to leave")
        # one that stops heartbeating without a goodbye (a kill -9) drops out after the TTL
        task = replicas[1].fleet._task
        assert task is not None
        task.cancel()
        gone_in = await until(lambda: ids(replicas[0]) == {"r0"}, what="r1 to time out")
        assert gone_in < replicas[0].fleet.replica_ttl_s + 1
        assert all(seen.seen_s_ago < 1.0 for seen in replicas[0].fleet.live_replicas())
    finally:
        await asyncio.gather(replicas[0].fleet.close(), replicas[1].fleet.close())


def test_replica_ids() -> None:
    assert replica_id("interlock-7d9f-abcde") == "interlock-7d9f-abcde"
    assert replica_id(None).endswith(f"-{__import__('os').getpid()}")


def test_without_redis_the_fleet_is_this_replica_alone() -> None:
    replica = Replica("solo", None)
    assert replica.fleet.status() == "solo"
    assert [r.id for r in replica.fleet.live_replicas()] == ["solo"]


async def test_one_replica_runs_the_health_checks_and_the_others_read_them(redis_url: str) -> None:
    sick = Health(False, "upstream answered 502")
    replicas = [Replica(f"r{i}", redis_url, health=sick) for i in range(3)]
    await started(replicas)
    runs = [asyncio.create_task(r.monitor.run()) for r in replicas]
    try:
        await until(lambda: all(r.target.healthy is False for r in replicas), what="every replica's verdict")
        assert all(r.target.health_reason == "upstream answered 502" for r in replicas)
        await asyncio.sleep(1.0)  # several rounds
        checked = [r for r in replicas if r.checks]
        assert len(checked) == 1, [r.checks for r in replicas]
        assert checked[0].fleet.health.leading == {"up"}
        # the leader goes: another takes the checks over within a lead's life
        leader = checked[0]
        runs[replicas.index(leader)].cancel()
        await leader.fleet.close()
        others = [r for r in replicas if r is not leader]
        before = [r.checks for r in others]
        took = await until(
            lambda: any(r.checks > b for r, b in zip(others, before, strict=True)), what="a new leader"
        )
        assert took < others[0].fleet.health.lead_ttl_ms() / 1000 + 1
    finally:
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        await stopped(replicas)


async def test_health_checks_without_redis_are_each_replicas_own(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    replicas = [Replica(f"r{i}", server.url) for i in range(2)]
    await started(replicas)
    server.stop()
    runs = [asyncio.create_task(r.monitor.run()) for r in replicas]
    try:
        await until(lambda: all(r.checks >= 2 for r in replicas), what="both to check on their own")
        assert all(r.target.healthy for r in replicas)
    finally:
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        await stopped(replicas)


async def test_a_lease_holder_without_requests_lets_another_replica_probe(redis_url: str) -> None:
    replicas = [Replica(f"r{i}", redis_url) for i in range(2)]
    await started(replicas)
    try:
        trip(replicas[0].breaker)
        await until(lambda: all(r.breaker.state == "half_open" for r in replicas), what="cool-downs to end")
        first = replicas[0]
        # r0 asks (its request goes elsewhere meanwhile), wins the lease, and then gets no request
        assert not first.breaker.allow()
        await until(lambda: first.fleet.breakers.holds_lease("up"), what="r0 to hold the lease")
        other = replicas[1]
        took = await until(other.breaker.allow, what="r1 to probe once r0's lease lapsed")
        assert took < first.fleet.breakers.lease_ttl_s + 1
    finally:
        await stopped(replicas)


async def test_the_fleet_on_a_redis_cluster(tmp_path: Path) -> None:
    from tests.redis_servers import REDIS_CLI, create_cluster

    if REDIS_CLI is None:
        pytest.skip("redis-cli is not installed")
    nodes = [RedisServer(tmp_path, cluster=True).start() for _ in range(3)]
    try:
        create_cluster(nodes)
        url = f"redis+cluster://127.0.0.1:{nodes[0].port}"
        replicas = [Replica(f"r{i}", url) for i in range(2)]
        await started(replicas)
        runs = [asyncio.create_task(r.monitor.run()) for r in replicas]
        try:
            trip(replicas[0].breaker)
            await until(lambda: replicas[1].breaker.state == "open", what="the open to cross the cluster")
            await until(lambda: len(replicas[1].fleet.live_replicas()) == 2, what="both heartbeats")
            await until(lambda: all(r.target.healthy for r in replicas), what="health verdicts")
            assert sum(1 for r in replicas if r.checks) == 1
            assert all(r.fleet.status() == "ok" for r in replicas)  # no CROSSSLOT, no error at all
            assert all(r.fleet.redis is not None and r.fleet.redis.errors == 0 for r in replicas)
        finally:
            for run in runs:
                run.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
            await stopped(replicas)
    finally:
        for node in nodes:
            node.stop()


async def test_a_target_a_reload_brings_is_shared_from_the_next_tick(redis_url: str) -> None:
    replicas = [Replica(f"r{i}", redis_url) for i in range(2)]
    await started(replicas)
    try:
        old = replicas[1].target
        replicas[1].target = Target(
            backend=old.backend, stats=BackendStats("up"), breaker=CircuitBreaker("up", BREAKER)
        )  # what build_snapshot makes for a changed backend
        await until(
            lambda: replicas[1].target.breaker.probe_gate is not None, what="the new breaker attached"
        )
        trip(replicas[0].breaker)
        await until(lambda: replicas[1].target.breaker.state == "open", what="the open to reach it")
        assert old.breaker.state == "closed"  # the retired one is left alone
    finally:
        await stopped(replicas)


async def test_an_in_process_engine_stays_each_replicas_own(redis_url: str) -> None:
    replicas = [Replica(f"r{i}", redis_url) for i in range(2)]
    for r in replicas:
        r.target.backend.kind = "llamacpp"  # type: ignore[misc]  # llama.cpp inside each process
    await started(replicas)
    runs = [asyncio.create_task(r.monitor.run()) for r in replicas]
    try:
        trip(replicas[0].breaker)
        await until(lambda: all(r.checks >= 2 for r in replicas), what="both to check their own engine")
        assert replicas[1].breaker.state == "closed"  # r0's engine failing says nothing of r1's
        assert (
            replicas[0].fleet.breakers.taken == replicas[1].fleet.breakers.taken == {"open": 0, "closed": 0}
        )
    finally:
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        await stopped(replicas)


def test_live_replicas_of_a_gateway() -> None:
    from gateway.fleet import live_replicas
    from gateway.router import Router
    from gateway.state import Gateway

    replica = Replica("solo", None)
    gateway = Gateway(snapshot=None, router=Router(), health=replica.monitor)  # type: ignore[arg-type]
    assert len(live_replicas(gateway)) == 1  # before the app built its fleet: this process alone
    gateway.fleet = replica.fleet
    assert [r.id for r in live_replicas(gateway)] == ["solo"]
