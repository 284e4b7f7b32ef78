"""Model name → route → ranked candidates → the first one that answers.

Per request: the route's policy ranks its targets from live figures (``gateway.stats``),
the fallback list follows in order, and the attempt loop walks that plan. A candidate
whose circuit is open or that is at its in-flight cap is skipped without a call. A
retryable failure moves on to the next candidate while the route's attempt limit and
the process-wide retry budget allow; coming back to a backend that already failed this
request waits an exponential, jittered backoff first. Nothing is retried once bytes
reached the client: for streams, the attempt ends when the first chunk is in hand.

Hedging (opt-in per route): when the first attempt has not answered by its backend's
observed p95 TTFT, the same request also goes to the next candidate; the first to
answer wins and the other is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, TypeVar

from tenacity import wait_exponential_jitter

from backends.base import Backend, BackendRequest, BackendResponse, Price, Usage
from backends.errors import BackendOverloaded, BackendUnavailable, InterlockError
from gateway.breaker import CircuitBreaker, counts_as_failure
from gateway.errors import ModelNotFound
from gateway.retry_budget import RetryBudget
from gateway.stats import BackendStats
from gateway.streams import StreamTally
from policies import POLICIES
from policies.base import MIN_SAMPLES, BackendView, Policy, PolicyContext, RequestFacts

log = logging.getLogger("interlock.router")

T = TypeVar("T")


@dataclass(slots=True)
class Target:
    """A backend as the router sees it: the backend plus its live state in this process."""

    backend: Backend
    stats: BackendStats
    breaker: CircuitBreaker
    price: Price = field(default_factory=Price)
    max_in_flight: int | None = None
    #: the last active health check's verdict (None: not checked yet)
    healthy: bool | None = None
    health_reason: str = ""

    @property
    def name(self) -> str:
        return self.backend.name

    def saturated(self) -> bool:
        return self.max_in_flight is not None and self.stats.in_flight >= self.max_in_flight

    def cost_usd(self, usage: Usage) -> float:
        return (usage.prompt_tokens * self.price.input_per_mtok
                + usage.completion_tokens * self.price.output_per_mtok) / 1e6


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    targets: tuple[Target, ...]
    fallback: tuple[Target, ...] = ()
    policy: str = "ordered"
    weights: Mapping[str, float] = field(default_factory=dict)
    latency_weight: float = 0.5
    ttft_slo_ms: float | None = None
    attempts: int = 3
    hedge: bool = False

    def candidates(self) -> tuple[Target, ...]:
        return self.targets + self.fallback


@dataclass(frozen=True, slots=True)
class Choice:
    target: Target
    reason: str


@dataclass(slots=True)
class Served:
    """A complete reply and who gave it."""

    target: Target
    reply: BackendResponse
    reason: str


@dataclass(slots=True)
class Opened:
    """A stream whose first bytes have arrived: from here on nothing can be retried."""

    target: Target
    first: bytes
    rest: AsyncIterator[bytes]
    reason: str

    @property
    def backend(self) -> Backend:
        return self.target.backend


class Router:
    def __init__(
        self,
        routes: dict[str, Route],
        *,
        budget: RetryBudget | None = None,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
        policies: Mapping[str, Policy] = POLICIES,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.routes = routes
        self.budget = budget or RetryBudget()
        self._policies = policies
        self._rng = rng or random.Random()
        self._clock = clock
        self._backoff = wait_exponential_jitter(initial=backoff_initial_s, max=backoff_max_s,
                                                jitter=backoff_initial_s)

    def route(self, model: str) -> Route:
        route = self.routes.get(model)
        if route is None:
            raise ModelNotFound(model)
        return route

    # -- planning -------------------------------------------------------------------------------

    def plan(self, route: Route, facts: RequestFacts) -> list[Choice]:
        """The order this request would try: the policy's ranking of the targets, then the fallback."""
        if len(route.targets) == 1:  # the common case needs no policy
            order = [Choice(route.targets[0], "only target")]
        else:
            by_name = {t.name: t for t in route.targets}
            views = [self._view(route, t) for t in route.targets]
            context = PolicyContext(rng=self._rng, latency_weight=route.latency_weight)
            ranked = self._policies[route.policy](views, facts, context)
            order = [Choice(by_name[r.name], f"{route.policy}: {r.reason}") for r in ranked]
        order += [Choice(t, f"fallback {i}") for i, t in enumerate(route.fallback, start=1)]
        # A failed health check sends a backend to the back of the line, not out of it: checks can
        # be wrong, and trying it last beats refusing the request.
        if any(c.target.healthy is False for c in order):
            order.sort(key=lambda c: c.target.healthy is False)
        return order

    @staticmethod
    def _view(route: Route, target: Target) -> BackendView:
        # The backend's own count is fresher than ours and includes its queue (llama.cpp, a pool).
        load = target.backend.load()
        own = load.in_flight + load.queued
        return target.stats.view(target.price.input_per_mtok, target.price.output_per_mtok,
                                 route.weights.get(target.name, 1.0), target.max_in_flight or load.capacity,
                                 max(own, target.stats.in_flight))

    # -- serving --------------------------------------------------------------------------------

    async def complete(self, route: Route, request: BackendRequest, facts: RequestFacts) -> Served:
        async def attempt(target: Target) -> BackendResponse:
            started = self._clock()
            target.stats.started()
            try:
                reply = await target.backend.complete(request)
            except BaseException as exc:
                _attempt_failed(target, exc)
                raise
            elapsed = self._clock() - started
            usage = reply.usage or Usage()
            # The whole reply is the "first token" of a non-streamed request: it is what a client
            # waits for. Prompt size stays the estimate policies predict from, not the upstream's count.
            target.stats.finished(True, facts.prompt_tokens, usage.completion_tokens,
                                  total_s=elapsed, ttft_s=elapsed)
            return reply

        target, reply, reason = await self._serve(route, request, facts, attempt, _drop_nothing)
        return Served(target, reply, reason)

    async def stream(self, route: Route, request: BackendRequest, facts: RequestFacts) -> Opened:
        async def attempt(target: Target) -> tuple[bytes, AsyncIterator[bytes]]:
            started = self._clock()
            target.stats.started()
            try:
                chunks = await target.backend.stream(request)
                try:
                    first = await anext(chunks)  # type: ignore[call-overload]
                except StopAsyncIteration:
                    raise BackendUnavailable(f"backend {target.name!r} sent an empty stream") from None
                except BaseException:
                    await chunks.aclose()  # type: ignore[attr-defined]
                    raise
            except BaseException as exc:
                _attempt_failed(target, exc)
                raise
            ttft = self._clock() - started
            target.stats.first_token(facts.prompt_tokens, ttft)
            return first, StreamTally(target, facts.prompt_tokens, started, ttft, self._clock, first, chunks)

        async def drop(opened: tuple[bytes, AsyncIterator[bytes]]) -> None:
            await opened[1].aclose()  # type: ignore[attr-defined]

        target, (first, rest), reason = await self._serve(route, request, facts, attempt, drop)
        return Opened(target, first, rest, reason)

    async def _serve(
        self,
        route: Route,
        request: BackendRequest,
        facts: RequestFacts,
        attempt: Callable[[Target], Awaitable[T]],
        drop: Callable[[T], Awaitable[None]],
    ) -> tuple[Target, T, str]:
        """The attempt loop; returns the winning target, its result and why it was chosen."""
        self.budget.record_request()
        plan = self.plan(route, facts)
        tried: set[str] = set()
        failures: list[str] = []
        last: InterlockError | None = None
        attempts = 0
        skipped_open: list[Target] = []
        skipped_full = 0
        for round_ in range(route.attempts):
            progressed = False
            for index, choice in enumerate(plan):
                if attempts >= route.attempts:
                    break
                target = choice.target
                if not target.breaker.allow():
                    if round_ == 0:
                        skipped_open.append(target)
                    continue
                if target.saturated():
                    target.breaker.release()
                    skipped_full += round_ == 0
                    continue
                if attempts > 0 and not self.budget.try_spend():
                    target.breaker.release()
                    log.warning("retry budget exhausted for %s", request.request_id)
                    assert last is not None
                    raise last
                if target.name in tried:
                    await asyncio.sleep(self._backoff(SimpleNamespace(attempt_number=attempts)))  # type: ignore[arg-type]
                attempts += 1
                progressed = True
                hedged: list[Target] = []  # the backup a hedge also sent this attempt to, if any
                try:
                    if route.hedge and attempts == 1:
                        won, result = await self._hedged(route, plan, index, attempt, drop, hedged)
                        target = won
                    else:
                        result = await self._one(target, attempt)
                except InterlockError as exc:
                    tried.add(target.name)
                    # a hedge that failed on both sides was two attempts: the backup counts too
                    for extra in hedged:
                        tried.add(extra.name)
                        attempts += 1
                    if not exc.retryable:
                        raise
                    log.warning("backend %s failed for %s: %s", target.name, request.request_id, exc.message)
                    failures.append(f"{target.name}: {exc.code or exc.type}")
                    last = exc
                    continue
                reason = choice.reason if target is choice.target else f"hedge won: {target.name}"
                if failures:
                    reason = f"{reason}; after {', '.join(failures)}"
                return target, result, reason
            if not progressed:
                break
        if last is not None:
            raise last
        raise self._nothing_to_try(route, skipped_open, skipped_full)

    async def _one(self, target: Target, attempt: Callable[[Target], Awaitable[T]]) -> T:
        """One call with the breaker told how it went (a client's own mistake does not count)."""
        try:
            result = await attempt(target)
        except BaseException as exc:
            if counts_as_failure(exc):
                target.breaker.on_failure(getattr(exc, "retry_after", None))
            else:
                target.breaker.release()
            if isinstance(exc, InterlockError) or not isinstance(exc, Exception):
                raise
            log.exception("backend %s broke its contract", target.name)
            raise BackendUnavailable(f"backend {target.name!r} failed unexpectedly") from exc
        target.breaker.on_success()
        return result

    async def _hedged(
        self,
        route: Route,
        plan: list[Choice],
        index: int,
        attempt: Callable[[Target], Awaitable[T]],
        drop: Callable[[T], Awaitable[None]],
        hedged: list[Target],
    ) -> tuple[Target, T]:
        first = plan[index].target
        p95 = first.stats.ttft.quantile(0.95)
        backup = next((c.target for c in plan[index + 1:] if c.target is not first), None)
        if p95 is None or first.stats.samples < MIN_SAMPLES or backup is None:
            return first, await self._one(first, attempt)
        primary = asyncio.ensure_future(self._one(first, attempt))
        try:
            done, _ = await asyncio.wait({primary}, timeout=p95 / 1000)
        except BaseException:
            # the client left while waiting: asyncio.wait does not cancel the attempt it waits on
            primary.cancel()
            with contextlib.suppress(BaseException):
                await drop(await primary)
            raise
        if done:
            return first, primary.result()
        if not backup.breaker.allow():
            return first, await primary
        if backup.saturated() or not self.budget.try_spend():
            backup.breaker.release()
            return first, await primary
        log.info("hedging %s: no answer from %s within its p95 %.0f ms", route.name, first.name, p95)
        second = asyncio.ensure_future(self._one(backup, attempt))
        hedged.append(backup)
        racers = {primary: first, second: backup}
        pending = set(racers)
        error: BaseException | None = None
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                winners = [task for task in done if task.exception() is None]
                if winners:
                    for extra in winners[1:]:  # both answered in the same instant: keep one
                        await drop(extra.result())
                    return racers[winners[0]], winners[0].result()
                error = next(iter(done)).exception()
            assert error is not None
            raise error
        finally:
            for task in pending:
                task.cancel()
            for task in pending:
                try:
                    loser = await task
                except BaseException:  # the loser failing or cancelled no longer matters
                    continue
                await drop(loser)

    def _nothing_to_try(self, route: Route, skipped_open: list[Target], skipped_full: int) -> InterlockError:
        if skipped_open and not skipped_full:
            wait = min(t.breaker.retry_in() for t in skipped_open)
            return BackendUnavailable(
                f"every backend of model {route.name!r} is failing (circuits open); retry later",
                status=503, retry_after=max(1.0, wait))
        return BackendOverloaded(f"every backend of model {route.name!r} is at capacity; retry later",
                                 status=429, retry_after=1.0)


async def _drop_nothing(_: Any) -> None:
    return None


def _attempt_failed(target: Target, exc: BaseException) -> None:
    if counts_as_failure(exc):
        target.stats.finished(False)
    else:  # the client's mistake or departure, or a hedge that lost: no verdict on the backend
        target.stats.abandoned()
