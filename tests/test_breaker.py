"""Every transition of gateway.breaker.CircuitBreaker, driven by a fake clock (no sleeps)."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from backends.errors import (
    BackendError,
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    ContextLengthExceeded,
    InvalidRequest,
    UnsupportedEndpoint,
    UpstreamHTTPError,
)
from gateway.breaker import MAX_RETRY_AFTER_S, BreakerConfig, CircuitBreaker, counts_as_failure
from tests.fakes import Clock


def make(**overrides: object) -> tuple[CircuitBreaker, Clock, list[tuple[str, str, str]]]:
    clock = Clock()
    breaker = CircuitBreaker("b1", BreakerConfig(**overrides), clock=clock)  # type: ignore[arg-type]
    seen: list[tuple[str, str, str]] = []
    breaker.listeners.append(lambda name, old, new: seen.append((name, old, new)))
    return breaker, clock, seen


def trip(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.config.consecutive_failures):
        breaker.on_failure()
    assert breaker.state == "open"


def test_defaults() -> None:
    cfg = BreakerConfig()
    assert (cfg.window, cfg.min_calls, cfg.failure_rate, cfg.consecutive_failures) == (20, 5, 0.5, 5)
    assert (cfg.cooldown_s, cfg.max_cooldown_s, cfg.half_open_probes, cfg.successes_to_close) == (
        10,
        120,
        2,
        2,
    )


@pytest.mark.parametrize(
    "bad",
    [{"nope": 1}, {"failure_rate": 1.5}, {"min_calls": 30}, {"cooldown_s": 50, "max_cooldown_s": 10}],
)
def test_config_rejects(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        BreakerConfig(**bad)  # type: ignore[arg-type]


def test_new_breaker_is_closed() -> None:
    breaker, _, seen = make()
    assert breaker.state == "closed"
    assert breaker.allow()
    assert breaker.retry_in() == 0
    assert seen == []


def test_failure_rate_applies_only_after_min_calls() -> None:
    breaker, _, seen = make(consecutive_failures=100)
    # 2 of 4 failed: 50%, but only 4 calls < min_calls 5
    for ok in (False, True, False, True):
        if ok:
            breaker.on_success()
        else:
            breaker.on_failure()
    assert breaker.state == "closed"
    breaker.on_failure()  # 3 of 5: 60% >= 50% with enough calls
    assert breaker.state == "open"
    assert seen == [("b1", "closed", "open")]


def test_failure_rate_below_threshold_stays_closed() -> None:
    breaker, _, _ = make(consecutive_failures=100)
    for _ in range(10):  # 1 in 3 fail: 33% < 50%, over many calls
        breaker.on_success()
        breaker.on_success()
        breaker.on_failure()
    assert breaker.state == "closed"


def test_failure_rate_exact_threshold_trips() -> None:
    # 3 of 10 is exactly 30%; 0.3 * 10 != 3 in floats, so a multiplication would miss it
    breaker, _, _ = make(window=10, min_calls=10, failure_rate=0.3, consecutive_failures=100)
    for _ in range(7):
        breaker.on_success()
    breaker.on_failure()
    breaker.on_failure()
    assert breaker.state == "closed"
    breaker.on_failure()
    assert breaker.state == "open"


def test_window_slides_old_failures_out() -> None:
    breaker, _, _ = make(window=4, min_calls=4, failure_rate=0.75, consecutive_failures=100)
    breaker.on_failure()
    breaker.on_failure()
    breaker.on_success()
    breaker.on_success()  # window F F S S: 50%
    breaker.on_failure()  # F S S F: first F fell out, still 50%
    assert breaker.state == "closed"
    assert breaker.snapshot()["failures_in_window"] == 2
    breaker.on_failure()  # S S F F: 50%
    assert breaker.state == "closed"
    breaker.on_failure()  # S F F F: 75%
    assert breaker.state == "open"


def test_opens_on_consecutive_failures() -> None:
    # a huge window with min_calls far off: only the consecutive rule can fire
    breaker, _, seen = make(window=100, min_calls=100, consecutive_failures=3)
    for _ in range(50):
        breaker.on_success()
    breaker.on_failure()
    breaker.on_failure()
    breaker.on_success()  # the run is broken
    breaker.on_failure()
    breaker.on_failure()
    assert breaker.state == "closed"
    breaker.on_failure()
    assert breaker.state == "open"
    assert seen == [("b1", "closed", "open")]


def test_refuses_while_open_and_retry_in_counts_down() -> None:
    breaker, clock, _ = make(cooldown_s=10)
    trip(breaker)
    assert not breaker.allow()
    assert breaker.retry_in() == pytest.approx(10)
    clock.advance(4)
    assert not breaker.allow()
    assert breaker.retry_in() == pytest.approx(6)
    clock.advance(5.9)
    assert not breaker.allow()
    assert breaker.retry_in() == pytest.approx(0.1)
    clock.advance(0.1)
    assert breaker.retry_in() == 0
    assert breaker.state == "half_open"


def test_outcomes_while_open_do_not_change_state() -> None:
    breaker, _, _ = make(cooldown_s=10)
    trip(breaker)
    breaker.on_success()  # a request admitted before the trip, ending late
    breaker.on_failure()
    assert breaker.state == "open"
    assert breaker.retry_in() == pytest.approx(10)


def test_half_open_admits_exactly_the_probes() -> None:
    breaker, clock, seen = make(half_open_probes=2)
    trip(breaker)
    clock.advance(10)
    assert breaker.allow()
    assert breaker.allow()
    assert not breaker.allow()
    assert not breaker.allow()
    assert breaker.state == "half_open"
    assert breaker.snapshot()["probes_in_flight"] == 2
    assert seen == [("b1", "closed", "open"), ("b1", "open", "half_open")]


def test_release_frees_a_probe_slot() -> None:
    breaker, clock, _ = make(half_open_probes=1)
    trip(breaker)
    clock.advance(10)
    assert breaker.allow()
    assert not breaker.allow()
    breaker.release()  # the probe's client went away: no verdict
    assert breaker.state == "half_open"
    assert breaker.allow()
    assert not breaker.allow()


def test_release_when_closed_is_harmless() -> None:
    breaker, _, _ = make()
    breaker.release()
    assert breaker.state == "closed" and breaker.allow()


def test_successes_close_and_clear_the_window() -> None:
    breaker, clock, seen = make(successes_to_close=2, half_open_probes=2)
    trip(breaker)
    clock.advance(10)
    assert breaker.allow() and breaker.allow()
    breaker.on_success()
    assert breaker.state == "half_open"
    breaker.on_success()
    assert breaker.state == "closed"
    assert seen == [("b1", "closed", "open"), ("b1", "open", "half_open"), ("b1", "half_open", "closed")]
    snap = breaker.snapshot()
    assert snap["calls_in_window"] == 0 and snap["consecutive_failures"] == 0
    # the failures that tripped it are gone: one more failure does not re-trip it
    breaker.on_failure()
    assert breaker.state == "closed"


def test_success_frees_a_slot_for_the_next_probe() -> None:
    breaker, clock, _ = make(successes_to_close=3, half_open_probes=1)
    trip(breaker)
    clock.advance(10)
    for _ in range(2):
        assert breaker.allow()
        assert not breaker.allow()
        breaker.on_success()
        assert breaker.state == "half_open"
    assert breaker.allow()
    breaker.on_success()
    assert breaker.state == "closed"


def test_half_open_failure_reopens_with_doubled_cooldown_capped() -> None:
    breaker, clock, seen = make(cooldown_s=10, max_cooldown_s=35)
    trip(breaker)
    expected = [20, 35, 35]  # 10 -> 20 -> 40 capped to 35 -> stays 35
    clock.advance(10)
    for cooldown in expected:
        assert breaker.allow()
        breaker.on_failure()
        assert breaker.state == "open"
        assert breaker.retry_in() == pytest.approx(cooldown)
        assert breaker.snapshot()["cooldown_s"] == cooldown
        clock.advance(cooldown - 0.01)
        assert breaker.state == "open"
        clock.advance(0.01)
        assert breaker.state == "half_open"
    assert seen.count(("b1", "half_open", "open")) == 3


def test_close_resets_the_doubling() -> None:
    breaker, clock, _ = make(cooldown_s=10, successes_to_close=1)
    trip(breaker)
    clock.advance(10)
    breaker.allow()
    breaker.on_failure()  # cool-down 20
    clock.advance(20)
    breaker.allow()
    breaker.on_success()
    assert breaker.state == "closed"
    trip(breaker)
    assert breaker.retry_in() == pytest.approx(10)


def test_retry_after_longer_than_cooldown_is_respected() -> None:
    breaker, clock, _ = make(cooldown_s=10, max_cooldown_s=120, consecutive_failures=1)
    breaker.on_failure(retry_after=300)  # over our own cap: the upstream said so
    assert breaker.retry_in() == pytest.approx(300)
    clock.advance(299)
    assert not breaker.allow()
    clock.advance(1)
    assert breaker.allow()


def test_retry_after_shorter_than_cooldown_does_not_shorten_it() -> None:
    breaker, _, _ = make(cooldown_s=10, consecutive_failures=1)
    breaker.on_failure(retry_after=2)
    assert breaker.retry_in() == pytest.approx(10)


def test_retry_after_is_bounded() -> None:
    breaker, _, _ = make(consecutive_failures=1)
    breaker.on_failure(retry_after=10 * 24 * 3600)
    assert breaker.retry_in() == pytest.approx(MAX_RETRY_AFTER_S)


def test_retry_after_on_half_open_failure() -> None:
    breaker, clock, _ = make(cooldown_s=10, consecutive_failures=1)
    breaker.on_failure()
    clock.advance(10)
    assert breaker.allow()
    breaker.on_failure(retry_after=60)
    assert breaker.retry_in() == pytest.approx(60)


def test_retry_after_while_open_extends_the_wait() -> None:
    breaker, clock, _ = make(cooldown_s=10, consecutive_failures=1)
    breaker.on_failure()
    clock.advance(5)
    breaker.on_failure(retry_after=30)  # a late reply from before the trip, with a longer hint
    assert breaker.retry_in() == pytest.approx(30)


def test_listeners_see_each_transition_once() -> None:
    breaker, clock, seen = make(consecutive_failures=1, successes_to_close=1, half_open_probes=1)
    breaker.on_failure()
    for _ in range(3):  # repeated looks at an open breaker are not transitions
        breaker.allow()
        _ = breaker.state
    clock.advance(10)
    for _ in range(3):  # nor repeated looks at a half-open one
        _ = breaker.state
        breaker.retry_in()
    breaker.allow()
    breaker.on_success()
    breaker.on_success()
    assert seen == [("b1", "closed", "open"), ("b1", "open", "half_open"), ("b1", "half_open", "closed")]


def test_a_failing_listener_does_not_break_the_breaker() -> None:
    breaker, _, seen = make(consecutive_failures=1)

    def boom(name: str, old: str, new: str) -> None:
        raise RuntimeError("metrics down")

    breaker.listeners.insert(0, boom)
    breaker.on_failure()
    assert breaker.state == "open"
    assert seen == [("b1", "closed", "open")]


def test_snapshot_fields() -> None:
    breaker, _, _ = make(consecutive_failures=100)
    breaker.on_success()
    breaker.on_failure()
    snap = breaker.snapshot()
    assert snap["name"] == "b1" and snap["state"] == "closed"
    assert snap["calls_in_window"] == 2 and snap["failures_in_window"] == 1
    assert snap["failure_rate"] == 0.5 and snap["trips"] == 0


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (BackendUnavailable("connect refused"), True),
        (BackendTimeout("first token"), True),
        (BackendOverloaded("queue full", retry_after=3), False),
        (BackendError("generic"), True),
        (UpstreamHTTPError(500, {"message": "boom"}), True),
        (UpstreamHTTPError(503, {}), False),
        (UpstreamHTTPError(429, {}, retry_after=5), False),
        (UpstreamHTTPError(408, {}), True),
        (UpstreamHTTPError(400, {"message": "bad"}), False),
        (UpstreamHTTPError(401, {}), False),
        (UpstreamHTTPError(404, {}), False),
        (UpstreamHTTPError(422, {}), False),
        (InvalidRequest("bad"), False),
        (ContextLengthExceeded("too long"), False),
        (UnsupportedEndpoint("no embeddings"), False),
        (asyncio.CancelledError(), False),
        (KeyboardInterrupt(), False),
        (RuntimeError("a bug of the gateway escaped its error mapping"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_counts_as_failure(exc: BaseException, expected: bool) -> None:
    assert counts_as_failure(exc) is expected


# -- what the fleet uses (gateway.fleet_breakers) ---------------------------------------------


def test_open_for_trips_a_closed_circuit_for_that_long() -> None:
    breaker, clock, seen = make(cooldown_s=10)
    breaker.open_for(3.5)
    assert breaker.state == "open" and breaker.retry_in() == 3.5
    assert seen == [("b1", "closed", "open")]
    clock.advance(3.5)
    assert breaker.state == "half_open"


def test_open_for_only_lengthens_an_open_wait() -> None:
    breaker, _, seen = make(cooldown_s=10)
    trip(breaker)
    breaker.open_for(2)
    assert breaker.retry_in() == 10
    breaker.open_for(30)
    assert breaker.retry_in() == 30
    assert seen == [("b1", "closed", "open")]  # no second transition
    breaker.open_for(MAX_RETRY_AFTER_S * 10)
    assert breaker.retry_in() == MAX_RETRY_AFTER_S


def test_open_for_from_half_open_counts_as_a_failed_probe() -> None:
    breaker, clock, _ = make(cooldown_s=10, max_cooldown_s=100)
    trip(breaker)
    clock.advance(10)
    assert breaker.state == "half_open"
    breaker.open_for(20)  # another replica's probe failed
    assert breaker.state == "open" and breaker.retry_in() == 20
    clock.advance(20)
    assert breaker.allow()
    breaker.on_failure()  # our own probe fails next: the cool-down has doubled twice
    assert breaker.retry_in() == 40


def test_reset_closes_with_a_clean_window() -> None:
    breaker, _, seen = make(consecutive_failures=2, cooldown_s=10)
    trip(breaker)
    breaker.reset()
    assert breaker.state == "closed"
    assert seen[-1] == ("b1", "open", "closed")
    breaker.on_failure()
    assert breaker.state == "closed"  # the failures that tripped it are forgotten
    breaker.reset()  # closed already: nothing happens
    assert len(seen) == 2


def test_the_probe_gate_holds_half_open_probes_back() -> None:
    breaker, clock, _ = make(cooldown_s=10, half_open_probes=2)
    answers = [False, True]
    breaker.probe_gate = lambda: answers.pop(0)
    assert breaker.allow()  # closed: the gate is not asked
    trip(breaker)
    clock.advance(10)
    assert not breaker.allow()  # half-open, the gate says no: no slot taken
    assert breaker.snapshot()["probes_in_flight"] == 0
    assert breaker.allow()
    assert breaker.snapshot()["probes_in_flight"] == 1
    breaker.probe_gate = None
    breaker.on_success()
    breaker.allow()
    breaker.on_success()
    assert breaker.state == "closed"
