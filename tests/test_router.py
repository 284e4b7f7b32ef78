"""gateway.router.Router with in-process FakeBackends and an injected clock: no sockets.

Routes and targets are built by hand as gateway/server.py builds them. The fake clock drives
breakers, stats and the retry budget; real time is only used where the router itself waits on
the event loop (hedging's p95 timer), with wide margins.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from backends.base import Backend, BackendRequest, BackendResponse, Health, Price
from backends.errors import (
    BackendOverloaded,
    BackendUnavailable,
    InterlockError,
    InvalidRequest,
    UpstreamHTTPError,
)
from gateway.breaker import BreakerConfig, CircuitBreaker
from gateway.health import HealthMonitor
from gateway.retry_budget import RetryBudget
from gateway.router import Router
from gateway.snapshot import Route, Target
from gateway.stats import BackendStats
from policies.base import MIN_SAMPLES, RequestFacts
from tests.fakes import Clock, CompleteHandler, FakeBackend, failing, ok_handler, reply, stream_of

FACTS = RequestFacts(prompt_tokens=10, max_tokens=16)
#: breakers that never open: for tests about retries, not circuits
NEVER_OPEN = BreakerConfig(window=1000, min_calls=1000, consecutive_failures=1000)
Transition = tuple[str, str, str]


def request(stream: bool = False) -> BackendRequest:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
    return BackendRequest(endpoint="chat", body=body, request_id="req-test", stream=stream)


def target(
    backend: FakeBackend,
    clock: Clock,
    breaker: BreakerConfig | None = None,
    *,
    price: Price | None = None,
    max_in_flight: int | None = None,
) -> Target:
    return Target(
        backend=backend,
        stats=BackendStats(backend.name, clock=clock),
        breaker=CircuitBreaker(backend.name, breaker, clock=clock),
        price=price or Price(),
        max_in_flight=max_in_flight,
    )


def router(clock: Clock, *, budget: RetryBudget | None = None, backoff_s: float = 0.0) -> Router:
    return Router(
        budget=budget or RetryBudget(min_per_s=1000, clock=clock), backoff_initial_s=backoff_s, clock=clock
    )


def record(t: Target) -> list[Transition]:
    seen: list[Transition] = []
    t.breaker.listeners.append(lambda name, old, new: seen.append((name, old, new)))
    return seen


def unavailable() -> BackendUnavailable:
    return BackendUnavailable("connection refused")


def warm(t: Target, ttft_s: float = 0.05, n: int = MIN_SAMPLES) -> None:
    """Give a target enough completed samples for policies and hedging to trust its figures."""
    for _ in range(n):
        t.stats.started()
        t.stats.first_token(FACTS.prompt_tokens, ttft_s)
        t.stats.finished(True, 3, total_s=ttft_s, ttft_s=ttft_s)


async def settle(condition: Callable[[], bool]) -> None:
    """Let other tasks run until ``condition()`` holds (a few loop turns, no real waiting)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never came true")


async def text_of(chunks: AsyncIterator[bytes]) -> str:
    out = ""
    async for piece in chunks:
        for line in piece.split(b"\n"):
            if line.startswith(b"data: {"):
                out += orjson.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    return out


def test_fake_backend_satisfies_the_protocol() -> None:
    backend = FakeBackend("x", health=Health(False, "loading"), capacity=4)
    assert isinstance(backend, Backend)
    assert backend.kind == "fake"
    assert backend.load().capacity == 4


# --- circuit breakers ------------------------------------------------------------------------------


async def test_breaker_opens_then_skips_then_half_open_probe_closes_it() -> None:
    clock = Clock()
    config = BreakerConfig(consecutive_failures=3, cooldown_s=10, half_open_probes=1, successes_to_close=1)
    sick, healthy = FakeBackend("sick", failing(unavailable)), FakeBackend("healthy")
    a, b = target(sick, clock, config), target(healthy, clock, config)
    seen = record(a)
    route = Route("m", (a, b))
    r = router(clock)

    for _ in range(3):
        served = await r.complete(route, request(), FACTS)
        assert served.target is b
        assert served.reason == "ordered: position 2 in targets; after sick: backend_unavailable"
    assert sick.calls == 3
    assert a.breaker.state == "open"
    assert seen == [("sick", "closed", "open")]

    for _ in range(10):  # open: skipped without a call
        served = await r.complete(route, request(), FACTS)
        assert served.target is b
        assert served.reason == "ordered: position 2 in targets"
    assert sick.calls == 3
    assert healthy.calls == 13

    clock.advance(9.9)
    await r.complete(route, request(), FACTS)
    assert sick.calls == 3, "a probe went out before the cool-down ended"

    clock.advance(0.1)
    sick.handler = ok_handler
    served = await r.complete(route, request(), FACTS)
    assert served.target is a
    assert sick.calls == 4
    assert seen == [
        ("sick", "closed", "open"),
        ("sick", "open", "half_open"),
        ("sick", "half_open", "closed"),
    ]
    assert a.breaker.snapshot()["trips"] == 1


async def test_failed_probe_reopens_with_a_doubled_cool_down() -> None:
    clock = Clock()
    config = BreakerConfig(consecutive_failures=2, cooldown_s=10, half_open_probes=1)
    sick = FakeBackend("sick", failing(unavailable))
    a, b = target(sick, clock, config), target(FakeBackend("healthy"), clock, config)
    seen = record(a)
    route = Route("m", (a, b))
    r = router(clock)
    for _ in range(2):
        await r.complete(route, request(), FACTS)
    clock.advance(10)
    served = await r.complete(route, request(), FACTS)  # the probe fails; b still serves the client
    assert served.target is b
    assert sick.calls == 3
    assert seen == [("sick", "closed", "open"), ("sick", "open", "half_open"), ("sick", "half_open", "open")]
    assert a.breaker.retry_in() == pytest.approx(20)


@pytest.mark.parametrize(
    "error",
    [
        InvalidRequest("messages must not be empty", param="messages"),
        UpstreamHTTPError(400, {"message": "bad request", "type": "invalid_request_error"}),
    ],
    ids=["InvalidRequest", "upstream-400"],
)
async def test_client_errors_are_not_retried_and_not_held_against_the_backend(error: Exception) -> None:
    clock = Clock()
    config = BreakerConfig(consecutive_failures=1)
    first, second = FakeBackend("first", failing(lambda: error)), FakeBackend("second")
    a, b = target(first, clock, config), target(second, clock, config)
    r = router(clock)
    for _ in range(3):
        with pytest.raises(type(error)) as caught:
            await r.complete(Route("m", (a, b), attempts=3), request(), FACTS)
        assert caught.value is error
    assert (first.calls, second.calls) == (3, 0)
    assert a.breaker.state == "closed"
    snapshot = a.breaker.snapshot()
    assert (snapshot["calls_in_window"], snapshot["consecutive_failures"]) == (0, 0)
    assert (a.stats.in_flight, a.stats.samples, a.stats.error_rate) == (0, 0, 0.0)
    assert r.budget.snapshot()["retries_in_window"] == 0


async def test_a_client_error_gives_back_the_half_open_probe_slot() -> None:
    clock = Clock()
    config = BreakerConfig(consecutive_failures=1, cooldown_s=5, half_open_probes=1, successes_to_close=1)
    backend = FakeBackend("only", failing(unavailable))
    t = target(backend, clock, config)
    route = Route("m", (t,), attempts=1)
    r = router(clock)
    with pytest.raises(BackendUnavailable):
        await r.complete(route, request(), FACTS)
    clock.advance(5)
    backend.handler = failing(lambda: InvalidRequest("bad"))
    with pytest.raises(InvalidRequest):
        await r.complete(route, request(), FACTS)
    assert t.breaker.state == "half_open"
    backend.handler = ok_handler
    served = await r.complete(route, request(), FACTS)  # the slot is free again: a probe goes out
    assert served.target is t
    assert t.breaker.state == "closed"


# --- retries: budget, attempts, backoff ------------------------------------------------------------


async def test_retry_budget_caps_the_extra_load_when_everything_fails() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_s=1.0, window_s=10.0, clock=clock)
    first, second = FakeBackend("a", failing(unavailable)), FakeBackend("b", failing(unavailable))
    route = Route("m", (target(first, clock, NEVER_OPEN), target(second, clock, NEVER_OPEN)), attempts=3)
    r = router(clock, budget=budget)
    n = 100
    for _ in range(n):
        with pytest.raises(BackendUnavailable):
            await r.complete(route, request(), FACTS)
    total = first.calls + second.calls
    # every request tries each candidate once (moving on is not a retry); going back to one that
    # already failed is, and those add at most ratio * n + min_per_s * window
    assert total <= 2 * n + 0.2 * n + 1.0 * 10
    assert total == 230  # and the budget is spent, not hoarded: 30 retries
    assert (first.calls, second.calls) == (130, 100)
    assert budget.available() == 0


async def test_attempts_limit_counts_every_call() -> None:
    clock = Clock()
    backends = [FakeBackend(name) for name in "abcd"]
    for backend in backends:
        backend.handler = failing(lambda b=backend: BackendUnavailable(f"{b.name} is down"))
    route = Route("m", tuple(target(b, clock, NEVER_OPEN) for b in backends), attempts=2)
    r = router(clock)
    with pytest.raises(BackendUnavailable) as caught:
        await r.complete(route, request(), FACTS)
    assert [b.calls for b in backends] == [1, 1, 0, 0]
    assert caught.value.message == "b is down"  # the last failure is what the client sees

    only = FakeBackend("only", failing(unavailable))
    with pytest.raises(BackendUnavailable):
        await r.complete(Route("one", (target(only, clock, NEVER_OPEN),), attempts=3), request(), FACTS)
    assert only.calls == 3


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every asyncio.sleep the code under test asks for; none of them actually waits."""
    asked: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(delay: float, result: Any = None) -> Any:
        asked.append(delay)
        return await real_sleep(0, result)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    return asked


async def test_backoff_only_when_coming_back_to_a_backend_that_failed(sleeps: list[float]) -> None:
    clock = Clock()
    first, second = FakeBackend("a", failing(unavailable)), FakeBackend("b", failing(unavailable))
    pair = (target(first, clock, NEVER_OPEN), target(second, clock, NEVER_OPEN))
    r = router(clock, backoff_s=0.01)

    with pytest.raises(BackendUnavailable):  # a then b: two different backends, no wait
        await r.complete(Route("m", pair, attempts=2), request(), FACTS)
    assert (first.calls, second.calls) == (1, 1)
    assert sleeps == []

    with pytest.raises(BackendUnavailable):  # a, b, then a and b again: each return waits
        await r.complete(Route("m", pair, attempts=4), request(), FACTS)
    assert (first.calls, second.calls) == (3, 3)
    assert len(sleeps) == 2
    # wait_exponential_jitter: initial * 2**(n-1) plus up to `initial` of jitter, n = attempts so far
    assert 0.02 <= sleeps[0] <= 0.03
    assert 0.04 <= sleeps[1] <= 0.05


# --- streams ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "before_first",
    [
        BackendUnavailable("refused"),
        None,  # an empty stream: it ends before its first byte
    ],
    ids=["refused", "empty"],
)
async def test_stream_failing_before_its_first_chunk_falls_back(before_first: Exception | None) -> None:
    clock = Clock()

    async def empty(_: BackendRequest) -> AsyncIterator[bytes]:
        return
        yield b""  # pragma: no cover  (makes this an async generator)

    broken = FakeBackend(
        "broken", stream_handler=stream_of(before_first=before_first) if before_first else empty
    )
    good = FakeBackend("good")
    a, b = target(broken, clock), target(good, clock)
    opened = await router(clock).stream(Route("m", (a, b)), request(stream=True), FACTS)
    assert opened.target is b
    assert opened.reason == "ordered: position 2 in targets; after broken: backend_unavailable"
    text = await text_of(_prepend(opened.first, opened.rest))
    assert text == "Hello there."
    assert (broken.stream_calls, good.stream_calls) == (1, 1)
    assert a.breaker.snapshot()["consecutive_failures"] == 1
    assert (a.stats.samples, a.stats.error_rate, a.stats.in_flight) == (1, 1.0, 0)
    assert (b.stats.samples, b.stats.error_rate, b.stats.in_flight) == (1, 0.0, 0)


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for piece in rest:
        yield piece


async def test_stream_failing_after_its_first_chunk_is_not_retried() -> None:
    clock = Clock()
    cut = FakeBackend("cut", stream_handler=stream_of(["Hel"], then=BackendUnavailable("connection reset")))
    spare = FakeBackend("spare")
    a, b = target(cut, clock), target(spare, clock)
    opened = await router(clock).stream(Route("m", (a, b), attempts=3), request(stream=True), FACTS)
    assert opened.target is a
    received = [opened.first]
    with pytest.raises(BackendUnavailable, match="connection reset"):
        async for piece in opened.rest:
            received.append(piece)
    assert len(received) == 2  # the role chunk, then "Hel"
    assert b"Hel" in received[1]
    assert spare.stream_calls == 0
    assert cut.stream_calls == 1
    # the failure is the backend's: its stats and breaker hear of it
    assert (a.stats.samples, a.stats.error_rate, a.stats.in_flight) == (1, 1.0, 0)
    assert a.breaker.snapshot()["failures_in_window"] == 1


async def test_a_stream_the_client_leaves_is_not_a_failure() -> None:
    clock = Clock()
    backend = FakeBackend("b", stream_handler=stream_of(["x"] * 10))
    t = target(backend, clock)
    opened = await router(clock).stream(Route("m", (t,)), request(stream=True), FACTS)
    await anext(opened.rest)  # type: ignore[call-overload]
    await opened.rest.aclose()  # type: ignore[attr-defined]
    assert (t.stats.in_flight, t.stats.samples, t.stats.error_rate) == (0, 0, 0.0)
    assert backend.in_flight == 0
    assert t.breaker.snapshot()["failures_in_window"] == 0


async def test_a_stream_closed_after_its_done_event_is_a_complete_answer() -> None:
    # a client may hang up as soon as it has read [DONE], before the upstream's stream ends
    clock = Clock()
    backend = FakeBackend("b", stream_handler=stream_of(["x"] * 3))
    t = target(backend, clock)
    opened = await router(clock).stream(Route("m", (t,)), request(stream=True), FACTS)
    chunks = [opened.first]
    while not chunks[-1].endswith(b"data: [DONE]\n\n"):
        chunks.append(await anext(opened.rest))  # type: ignore[call-overload]
    await opened.rest.aclose()  # type: ignore[attr-defined]
    assert (t.stats.in_flight, t.stats.samples, t.stats.error_rate) == (0, 1, 0.0)


# --- load shedding and nothing to try --------------------------------------------------------------


async def test_load_shedding_skips_full_targets_then_refuses_with_503() -> None:
    clock = Clock()
    gate = asyncio.Event()

    async def held(_: BackendRequest) -> BackendResponse:
        await gate.wait()
        return reply()

    first, second = FakeBackend("a", held), FakeBackend("b", held)
    a, b = target(first, clock, max_in_flight=1), target(second, clock, max_in_flight=1)
    route = Route("m", (a, b))
    r = router(clock)

    one = asyncio.create_task(r.complete(route, request(), FACTS))
    await settle(lambda: first.in_flight == 1)
    two = asyncio.create_task(r.complete(route, request(), FACTS))
    await settle(lambda: second.in_flight == 1)
    assert (first.calls, second.calls) == (1, 1)

    with pytest.raises(BackendOverloaded) as caught:
        await r.complete(route, request(), FACTS)
    assert caught.value.status == 503
    assert caught.value.retry_after == 1.0
    assert (first.calls, second.calls) == (1, 1), "a saturated target was called anyway"

    gate.set()
    served_one, served_two = await one, await two
    assert served_one.target is a
    assert served_two.target is b
    assert served_two.reason == "ordered: position 2 in targets"
    # shedding is no verdict on the backends
    assert a.breaker.snapshot()["failures_in_window"] == 0
    assert (a.stats.error_rate, b.stats.error_rate) == (0.0, 0.0)


async def test_every_circuit_open_probes_the_soonest_within_its_slots_and_refuses_the_rest() -> None:
    clock = Clock()
    config = BreakerConfig(consecutive_failures=1, cooldown_s=10, half_open_probes=1)
    first, second = FakeBackend("a", failing(unavailable)), FakeBackend("b", failing(unavailable))
    a, b = target(first, clock, config), target(second, clock, config)
    route = Route("m", (a, b), attempts=1)
    r = router(clock)
    with pytest.raises(BackendUnavailable):
        await r.complete(route, request(), FACTS)  # a opens at t=0
    clock.advance(3)
    with pytest.raises(BackendUnavailable):
        await r.complete(route, request(), FACTS)  # a skipped; b opens at t=3
    assert (a.breaker.state, b.breaker.state) == ("open", "open")
    clock.advance(1)

    # every candidate open: a, which reopens soonest, takes a probe now rather than in 6 s
    gate = asyncio.Event()

    async def held(_: BackendRequest) -> BackendResponse:
        await gate.wait()
        return reply("a is back")

    first.handler = held
    probe = asyncio.create_task(r.complete(route, request(), FACTS))
    await settle(lambda: first.in_flight == 1)
    assert a.breaker.state == "half_open"
    # its one probe slot is taken: the rest are refused at once, told the shortest wait (a's
    # probe may end any moment: the floor of 1 s)
    with pytest.raises(BackendUnavailable) as caught:
        await r.complete(route, request(), FACTS)
    assert caught.value.status == 503 and "circuits open" in caught.value.message
    assert caught.value.retry_after == 1.0
    with pytest.raises(BackendUnavailable):  # streams are refused the same way, without a call
        await r.stream(route, request(stream=True), FACTS)
    assert (first.calls, second.calls, first.stream_calls, second.stream_calls) == (2, 1, 0, 0)
    gate.set()
    served = await probe
    assert served.target is a and served.reason == "every circuit open: probe"


# --- hedging ---------------------------------------------------------------------------------------


class Primary:
    """A handler that is fast (50 ms on the fake clock, no real wait) until ``slow`` is set,
    then takes ``slow_s`` of real time, or fails after it when ``fail`` is set."""

    def __init__(self, clock: Clock, fast_s: float = 0.05, slow_s: float = 1.0) -> None:
        self.clock = clock
        self.fast_s = fast_s
        self.slow_s = slow_s
        self.slow = False
        self.fail = False

    async def __call__(self, _: BackendRequest) -> BackendResponse:
        if not self.slow:
            self.clock.advance(self.fast_s)
            return reply("primary")
        await asyncio.sleep(self.slow_s)
        if self.fail:
            raise BackendUnavailable("primary gave up")
        return reply("primary")


async def hedged_pair(
    clock: Clock, primary: Primary, backup: CompleteHandler = ok_handler, attempts: int = 3
) -> tuple[Router, Route, FakeBackend, FakeBackend]:
    """A hedging route [primary, backup] whose primary has a p95 TTFT of ``primary.fast_s``."""
    first, second = FakeBackend("primary", primary), FakeBackend("backup", backup)
    route = Route(
        "m",
        (target(first, clock, NEVER_OPEN), target(second, clock, NEVER_OPEN)),
        hedge=True,
        attempts=attempts,
    )
    r = router(clock)
    for _ in range(5):  # primary's p95 TTFT becomes fast_s
        assert (await r.complete(route, request(), FACTS)).target.name == "primary"
    assert route.targets[0].stats.ttft.quantile(0.95) == pytest.approx(primary.fast_s * 1000)
    assert second.calls == 0
    return r, route, first, second


async def test_hedge_sends_a_slow_request_to_the_backup_and_cancels_the_primary() -> None:
    clock = Clock()
    primary = Primary(clock, fast_s=0.05, slow_s=1.0)
    r, route, first, _ = await hedged_pair(clock, primary)
    primary.slow = True
    started = time.perf_counter()
    served = await r.complete(route, request(), FACTS)
    elapsed = time.perf_counter() - started
    assert served.target is route.targets[1]
    assert served.reason == "hedge won: backup"
    assert orjson.loads(served.reply.body)["choices"][0]["message"]["content"] == "Hello there."
    assert elapsed < 0.5, f"the backup's answer took {elapsed:.2f}s: no hedge"
    assert first.cancelled == 1, "the losing primary was left running"
    assert first.in_flight == 0
    a = route.targets[0]
    # losing a hedge is no verdict on the primary
    assert (a.stats.samples, a.stats.in_flight, a.stats.error_rate) == (5, 0, 0.0)
    assert a.breaker.snapshot()["failures_in_window"] == 0
    assert r.budget.snapshot()["retries_in_window"] == 1  # the hedge is paid from the retry budget


async def test_no_hedge_while_the_primary_has_too_few_samples() -> None:
    clock = Clock()
    primary = Primary(clock, slow_s=0.1)
    primary.slow = True
    first, second = FakeBackend("primary", primary), FakeBackend("backup")
    route = Route("m", (target(first, clock), target(second, clock)), hedge=True)
    served = await router(clock).complete(route, request(), FACTS)
    assert served.target.name == "primary"
    assert served.reason == "ordered: position 1 in targets"
    assert second.calls == 0


async def test_client_leaving_during_the_hedge_wait_cancels_the_primary() -> None:
    clock = Clock()
    primary = Primary(clock, fast_s=0.5, slow_s=2.0)  # p95 500 ms: the client leaves well before
    r, route, first, second = await hedged_pair(clock, primary)
    primary.slow = True
    task = asyncio.create_task(r.complete(route, request(), FACTS))
    await settle(lambda: first.in_flight == 1)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(5):
        await asyncio.sleep(0)
    assert first.cancelled == 1, "the primary ran on after its client left"
    assert first.in_flight == 0
    assert second.calls == 0
    assert route.targets[0].stats.in_flight == 0


async def test_a_hedge_that_fails_on_both_sides_counts_both_attempts() -> None:
    clock = Clock()
    primary = Primary(clock, fast_s=0.05, slow_s=0.2)
    r, route, first, second = await hedged_pair(clock, primary, failing(unavailable), attempts=2)
    primary.slow = primary.fail = True
    with pytest.raises(BackendUnavailable):
        await r.complete(route, request(), FACTS)
    # primary (attempt 1) and the hedge to the backup (attempt 2): the limit is reached
    assert first.calls == 6
    assert second.calls == 1, "the backup was called again right after failing as the hedge"


# --- policies and health ---------------------------------------------------------------------------


async def test_cost_policy_puts_the_cheaper_target_first() -> None:
    clock = Clock()
    pricey, cheap = FakeBackend("pricey"), FakeBackend("cheap")
    a = target(pricey, clock, price=Price(input_per_mtok=10, output_per_mtok=30))
    b = target(cheap, clock, price=Price(input_per_mtok=0.1, output_per_mtok=0.3))
    warm(a)
    warm(b)
    route = Route("m", (a, b), policy="cost")
    r = router(clock)
    for _ in range(3):
        served = await r.complete(route, request(), FACTS)
        assert served.target is b
        assert served.reason.startswith("cost: cheapest healthy")
    assert (pricey.calls, cheap.calls) == (0, 3)
    # the ordered policy on the same targets keeps the written order
    served = await r.complete(Route("m", (a, b)), request(), FACTS)
    assert served.target is a


async def test_a_backend_failing_its_health_check_is_tried_last() -> None:
    clock = Clock()
    sick = FakeBackend("sick", health=Health(False, "model not loaded"))
    fine = FakeBackend("fine")
    a, b = target(sick, clock, BreakerConfig(consecutive_failures=1)), target(fine, clock)
    monitor = HealthMonitor(lambda: [a, b], interval_s=0, timeout_s=1)
    assert await monitor.check(a) is False
    assert await monitor.check(b) is True
    assert (sick.health_calls, fine.health_calls) == (1, 1)
    assert (a.healthy, a.health_reason) == (False, "model not loaded")
    assert a.breaker.state == "open"  # a failed check counts against the breaker
    r = router(clock)
    plan = r.plan(Route("m", (a, b)), FACTS)
    assert [c.target.name for c in plan] == ["fine", "sick"]
    served = await r.complete(Route("m", (a, b)), request(), FACTS)
    assert served.target is b
    assert sick.calls == 0


# --- busy is not broken; fallbacks are not retries; bugs are not the backend's ---------------------


def busy() -> BackendOverloaded:
    return BackendOverloaded("queue full", retry_after=2.0)


@pytest.mark.parametrize("refusal", [busy, lambda: BackendOverloaded("rate limited", status=429)])
async def test_a_busy_backend_hands_the_request_on_and_keeps_its_circuit_closed(
    refusal: Callable[[], BackendOverloaded],
) -> None:
    clock = Clock()
    full, spare = FakeBackend("full", failing(refusal)), FakeBackend("spare")
    a, b = target(full, clock, BreakerConfig(consecutive_failures=1)), target(spare, clock)
    route = Route("m", (a,), fallback=(b,))
    r = router(clock, budget=RetryBudget(ratio=0, min_per_s=0, clock=clock))
    for _ in range(20):
        served = await r.complete(route, request(), FACTS)
        assert served.target is b
    assert full.calls == 20
    assert a.breaker.state == "closed" and a.breaker.snapshot()["failures_in_window"] == 0
    assert a.stats.error_rate == 0.0 and a.stats.in_flight == 0


async def test_when_every_backend_is_busy_the_client_is_told_when_to_come_back() -> None:
    clock = Clock()
    one = FakeBackend("one", failing(busy))
    other = FakeBackend("other", failing(lambda: BackendOverloaded("upstream 503")))  # no Retry-After
    a, b = target(one, clock, BreakerConfig(consecutive_failures=1)), target(other, clock)
    r = router(clock)
    with pytest.raises(BackendOverloaded) as caught:
        await r.complete(Route("m", (a, b), attempts=2), request(), FACTS)
    assert caught.value.status == 503 and caught.value.retry_after == 1.0
    with pytest.raises(BackendOverloaded) as caught:
        await r.complete(Route("m", (b, a), attempts=2), request(), FACTS)
    assert caught.value.retry_after == 2.0
    assert (a.breaker.state, b.breaker.state) == ("closed", "closed")


async def test_a_full_backend_is_skipped_without_taking_its_half_open_probe() -> None:
    clock = Clock()
    local = FakeBackend("local", failing(unavailable))
    a = target(local, clock, BreakerConfig(consecutive_failures=1, cooldown_s=5, half_open_probes=1))
    r = router(clock)
    route = Route("m", (a,), attempts=1)
    with pytest.raises(BackendUnavailable):
        await r.complete(route, request(), FACTS)
    clock.advance(5)
    assert a.breaker.state == "half_open"
    local.full = True  # its queue filled up meanwhile
    with pytest.raises(BackendOverloaded):
        await r.complete(route, request(), FACTS)
    assert local.calls == 1, "a full backend was called"
    assert a.breaker.snapshot()["probes_in_flight"] == 0
    local.full, local.handler = False, ok_handler
    assert (await r.complete(route, request(), FACTS)).target is a  # the probe slot was still free


@pytest.mark.parametrize(
    "primary_error",
    [
        unavailable,
        lambda: UpstreamHTTPError(500, {"message": "boom"}),
        busy,
        lambda: BackendOverloaded("slow down", status=429),
    ],
)
async def test_fallbacks_are_not_charged_to_the_retry_budget(primary_error: Callable[[], Exception]) -> None:
    clock = Clock()
    failing_primary, healthy = FakeBackend("primary", failing(primary_error)), FakeBackend("fallback")
    route = Route("m", (target(failing_primary, clock, NEVER_OPEN),), fallback=(target(healthy, clock),))
    # an empty budget: not a single retry may be spent
    r = router(clock, budget=RetryBudget(ratio=0, min_per_s=0, clock=clock))
    results = await asyncio.gather(
        *(r.complete(route, request(), FACTS) for _ in range(200)), return_exceptions=True
    )
    lost = [x for x in results if isinstance(x, BaseException)]
    assert not lost, f"{len(lost)} of 200 requests lost: {lost[0]!r}"
    assert healthy.calls == 200


class _Unserializable(Exception):
    pass


async def test_a_bug_of_the_gateway_is_a_500_and_never_opens_a_circuit() -> None:
    clock = Clock()

    async def broken(_: BackendRequest) -> BackendResponse:
        raise _Unserializable("maximum recursion depth exceeded while encoding")

    backend = FakeBackend("b", broken)
    t = target(backend, clock, BreakerConfig(consecutive_failures=1))
    r = router(clock)
    for _ in range(3):
        with pytest.raises(InterlockError) as caught:
            await r.complete(Route("m", (t,)), request(), FACTS)
        assert caught.value.status == 500 and caught.value.code == "internal_error"
        assert "req-test" in caught.value.message
    assert backend.calls == 3, "an internal error was retried"
    assert t.breaker.state == "closed" and t.stats.error_rate == 0.0
