"""Active health checks: what they tell the router, the breaker and readiness."""

from __future__ import annotations

from backends.base import Health
from gateway.breaker import BreakerConfig, CircuitBreaker
from gateway.health import HealthMonitor
from gateway.router import Route, Target
from gateway.stats import BackendStats
from tests.fakes import FakeBackend, ok_handler


def target(health: Health) -> Target:
    backend = FakeBackend("b", ok_handler, health=health)
    return Target(backend=backend, stats=BackendStats("b"),
                  breaker=CircuitBreaker("b", BreakerConfig(consecutive_failures=3)))


async def test_failed_checks_open_the_circuit() -> None:
    t = target(Health(False, "connection refused"))
    monitor = HealthMonitor([t], interval_s=1, timeout_s=1)
    for _ in range(3):
        assert await monitor.check(t) is False
    assert t.healthy is False and t.health_reason == "connection refused"
    assert t.breaker.state == "open"


async def test_a_misconfigured_backend_is_not_ready_but_not_an_outage() -> None:
    t = target(Health(False, "model llama3.2 is not pulled", misconfigured=True))
    monitor = HealthMonitor([t], interval_s=1, timeout_s=1)
    for _ in range(10):
        assert await monitor.check(t) is False
    assert t.breaker.state == "closed"
    problems = await monitor.problems({"m": Route("m", (t,))})
    assert problems == {"m": "b: model llama3.2 is not pulled"}


async def test_readiness_probes_do_not_trip_circuits() -> None:
    t = target(Health(False, "loading model"))
    monitor = HealthMonitor([t], interval_s=1, timeout_s=1)
    for _ in range(10):
        assert await monitor.problems({"m": Route("m", (t,))}) == {"m": "b: loading model"}
    assert t.breaker.state == "closed"
    t.backend.health_result = Health(True)  # type: ignore[attr-defined]
    assert await monitor.problems({"m": Route("m", (t,))}) == {}
