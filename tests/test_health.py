"""Active health checks: what they tell the router, the breaker and readiness."""

from __future__ import annotations

from backends.base import Health
from gateway.breaker import BreakerConfig, CircuitBreaker
from gateway.health import HealthMonitor
from gateway.snapshot import Route, Target
from gateway.stats import BackendStats
from tests.fakes import FakeBackend, ok_handler


def target(health: Health) -> Target:
    backend = FakeBackend("b", ok_handler, health=health)
    return Target(
        backend=backend,
        stats=BackendStats("b"),
        breaker=CircuitBreaker("b", BreakerConfig(consecutive_failures=3)),
    )


async def test_failed_checks_open_the_circuit() -> None:
    t = target(Health(False, "connection refused"))
    monitor = HealthMonitor(lambda: [t], interval_s=1, timeout_s=1)
    for _ in range(3):
        assert await monitor.check(t) is False
    assert t.healthy is False and t.health_reason == "connection refused"
    assert t.breaker.state == "open"


async def test_a_misconfigured_backend_is_not_ready_but_not_an_outage() -> None:
    t = target(Health(False, "model llama3.2 is not pulled", misconfigured=True))
    monitor = HealthMonitor(lambda: [t], interval_s=1, timeout_s=1)
    await monitor.started(t)
    for _ in range(10):
        assert await monitor.check(t) is False
    assert t.breaker.state == "closed"
    assert monitor.readiness({"m": Route("m", (t,))}) == (False, {"m": "b: model llama3.2 is not pulled"})


async def test_passing_checks_are_weighed_with_the_failing_ones() -> None:
    # a backend that fails one check in three is flaky, not dead: the passes in between count, so
    # neither 3 failures in a row (consecutive_failures=3) nor half of the window ever happen
    t = target(Health(True))
    monitor = HealthMonitor(lambda: [t], interval_s=1, timeout_s=1)
    for i in range(20):
        t.backend.health_result = Health(i % 3 != 0, "flap")  # type: ignore[attr-defined]
        await monitor.check(t)
    assert t.breaker.state == "closed"
    assert t.breaker.snapshot()["calls_in_window"] == 20


async def test_a_passing_check_never_closes_a_circuit_that_requests_opened() -> None:
    clock = [0.0]
    t = target(Health(True))
    t.breaker = CircuitBreaker(
        "b", BreakerConfig(consecutive_failures=1, cooldown_s=5), clock=lambda: clock[0]
    )
    t.breaker.on_failure()  # real requests hang and time out: open
    monitor = HealthMonitor(lambda: [t], interval_s=1, timeout_s=1)
    for _ in range(5):
        assert await monitor.check(t) is True  # while /models answers fine
    assert t.breaker.state == "open"
    clock[0] = 6
    for _ in range(5):
        await monitor.check(t)
    assert t.breaker.state == "half_open", "a check took the place of a real probe"
    assert t.breaker.snapshot()["probes_in_flight"] == 0


async def test_readiness_answers_from_state_without_calling_any_backend() -> None:
    t, other = target(Health(False, "loading model")), target(Health(True))
    other.backend.name = other.name = "o"  # type: ignore[misc]
    monitor = HealthMonitor(lambda: [t, other], interval_s=1, timeout_s=1)
    routes = {"m": Route("m", (t,)), "n": Route("n", (other,))}
    assert monitor.readiness(routes) == (False, {"m": "b: starting", "n": "o: starting"})
    await monitor.started(other)
    assert monitor.readiness(routes) == (False, {"m": "b: starting", "n": "ready"})
    await monitor.started(t)
    calls = t.backend.health_calls + other.backend.health_calls  # type: ignore[attr-defined]
    for _ in range(100):
        # one model's backend still loading does not make the replica unready for the other
        assert monitor.readiness(routes) == (True, {"m": "b: loading model", "n": "ready"})
    assert t.backend.health_calls + other.backend.health_calls == calls  # type: ignore[attr-defined]
    assert t.breaker.state == "closed"


async def test_liveness_fails_when_an_in_process_engine_died_and_says_why() -> None:
    import httpx

    from gateway.app import build_app
    from gateway.config import parse_config
    from gateway.router import Router
    from gateway.snapshot import build_snapshot
    from gateway.state import Gateway

    config = parse_config(
        {
            "backends": {"b": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
            "models": {"m": {"targets": ["b"]}},
        }
    )
    backend = FakeBackend("b")
    snapshot = build_snapshot(config, {"b": backend})
    gateway = Gateway(
        snapshot=snapshot,
        router=Router(),
        health=HealthMonitor(lambda: snapshot.targets.values(), interval_s=0, timeout_s=1),
    )
    app = build_app(gateway, max_body_bytes=1 << 20)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        assert (await client.get("/health/live")).status_code == 200
        backend.fatal_reason = "engine thread died: RuntimeError('boom')"
        response = await client.get("/health/live")
        assert response.status_code == 503
        assert response.json() == {
            "status": "dead",
            "backends": {"b": "engine thread died: RuntimeError('boom')"},
        }


async def test_a_source_gives_the_verdicts_and_none_keeps_the_last() -> None:
    t = target(Health(True))
    monitor = HealthMonitor(lambda: [t], interval_s=1, timeout_s=1)
    verdicts: list[Health | None] = [Health(False, "read from another replica"), None]

    async def source(_: Target) -> Health | None:
        return verdicts.pop(0)

    monitor.source = source
    assert await monitor.check(t) is False
    assert (t.healthy, t.health_reason) == (False, "read from another replica")
    assert await monitor.check(t) is None  # no new verdict: the last one stands
    assert t.healthy is False
    assert t.backend.health_calls == 0  # type: ignore[attr-defined]  # the backend was never asked
    assert await monitor.probe(t) == Health(True)
