"""gateway.retry_budget.RetryBudget under simulated load, with a fake clock (no sleeps)."""

from __future__ import annotations

from bisect import bisect_right

import pytest

from gateway.retry_budget import RetryBudget
from tests.fakes import Clock


def make(**kwargs: float) -> tuple[RetryBudget, Clock]:
    clock = Clock()
    return RetryBudget(clock=clock, **kwargs), clock


def outage(budget: RetryBudget, clock: Clock, seconds: int, rps: int) -> tuple[list[float], list[float]]:
    """Every request fails and asks for a retry; returns the times of requests and of granted retries."""
    requests: list[float] = []
    grants: list[float] = []
    for _ in range(seconds * rps):
        budget.record_request()
        requests.append(clock.now)
        if budget.try_spend():
            grants.append(clock.now)
        snap = budget.snapshot()
        assert snap["retries_in_window"] <= snap["limit"]  # type: ignore[operator]
        clock.advance(1 / rps)
    return requests, grants


def count(times: list[float], start: float, end: float) -> int:
    """Events in (start, end]."""
    return bisect_right(times, end) - bisect_right(times, start)


def test_steady_outage_adds_at_most_the_ratio_plus_floor() -> None:
    budget, clock = make(ratio=0.2, min_per_s=1.0, window_s=10.0)
    requests, grants = outage(budget, clock, seconds=60, rps=100)
    # over any 10 s, retries stay within 20% of the requests plus the 10-retry floor;
    # one 1-second bucket (~21 retries) of slack for the window's bucket granularity
    for end in grants:
        start = end - 10
        assert count(grants, start, end) <= 0.2 * count(requests, start, end) + 10 + 21
    # and over the whole outage the extra load is about 20% plus the floor of 1/s, not 100%
    extra = len(grants) / len(requests)
    assert 0.19 <= extra <= 0.2 + 1 / 100 + 0.02


def test_retries_do_not_grow_their_own_budget() -> None:
    budget, _ = make(ratio=0.2, min_per_s=0.0, window_s=10.0)
    for _ in range(100):
        budget.record_request()
    granted = sum(budget.try_spend() for _ in range(1000))
    assert granted == 20


def test_quiet_gateway_can_still_retry() -> None:
    budget, _ = make(ratio=0.2, min_per_s=1.0, window_s=10.0)
    assert budget.try_spend()  # no requests at all: the floor pays
    assert budget.available() == 9


def test_floor_is_bounded_without_traffic() -> None:
    budget, _ = make(ratio=0.2, min_per_s=1.0, window_s=10.0)
    granted = sum(budget.try_spend() for _ in range(100))
    assert granted == 10
    assert not budget.try_spend()
    assert budget.available() == 0


def test_budget_recovers_as_the_window_slides() -> None:
    budget, clock = make(ratio=0.2, min_per_s=1.0, window_s=10.0)
    assert sum(budget.try_spend() for _ in range(20)) == 10
    clock.advance(5)
    assert not budget.try_spend()  # the spent retries are still in the window
    clock.advance(4.99)
    assert not budget.try_spend()
    clock.advance(0.01)  # their bucket has left the window
    assert budget.available() == 10
    assert budget.try_spend()


def test_recovery_under_load_after_a_burst() -> None:
    budget, clock = make(ratio=0.2, min_per_s=0.0, window_s=10.0)
    for _ in range(1000):  # 1000 requests in the first second
        budget.record_request()
    assert sum(budget.try_spend() for _ in range(500)) == 200
    clock.advance(5)
    assert not budget.try_spend()
    clock.advance(5)  # the burst's bucket (requests and retries) is gone
    snap = budget.snapshot()
    assert snap["requests_in_window"] == 0 and snap["retries_in_window"] == 0
    assert not budget.try_spend()  # no floor, no requests: no retries
    for _ in range(50):
        budget.record_request()
    assert sum(budget.try_spend() for _ in range(50)) == 10


def test_long_idle_clears_the_ring() -> None:
    budget, clock = make(ratio=0.5, min_per_s=0.0, window_s=10.0)
    for second in range(10):  # a request per bucket, all slots of the ring used
        clock.now = 1000.0 + second
        budget.record_request()
    assert budget.snapshot()["requests_in_window"] == 10
    clock.advance(25)  # more than two windows: every bucket is stale, including wrapped ones
    assert budget.snapshot()["requests_in_window"] == 0
    budget.record_request()
    budget.record_request()
    assert budget.snapshot()["requests_in_window"] == 2
    assert budget.try_spend()
    assert not budget.try_spend()


def test_partial_slide_keeps_the_recent_buckets() -> None:
    budget, clock = make(ratio=1.0, min_per_s=0.0, window_s=10.0)
    for _ in range(10):
        budget.record_request()  # t = 1000
        clock.advance(1)
    # now t = 1010: the window holds t = 1001..1010, so the first request has left
    assert budget.snapshot()["requests_in_window"] == 9
    clock.advance(3)
    assert budget.snapshot()["requests_in_window"] == 6


def test_memory_is_fixed() -> None:
    budget, clock = make(window_s=10.0)
    outage(budget, clock, seconds=30, rps=50)
    assert len(budget._requests) == len(budget._retries) == 10


def test_fractional_window() -> None:
    budget, clock = make(ratio=0.0, min_per_s=4.0, window_s=0.5)  # floor: 2 retries per 0.5 s
    assert budget.try_spend() and budget.try_spend()
    assert not budget.try_spend()
    clock.advance(0.5)
    assert budget.try_spend()


@pytest.mark.parametrize("kwargs", [{"ratio": -0.1}, {"min_per_s": -1.0}, {"window_s": 0.0}])
def test_rejects_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryBudget(**kwargs)
