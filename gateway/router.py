"""Route → ranked candidates → the first one that answers.

Per request: the route's policy ranks its targets from live figures (``gateway.stats``),
the fallback list follows in order, and the attempt loop walks that plan. A candidate
whose circuit is open, that is full (its in-flight cap, its own queue) or that a 429 told
to wait is skipped without a call. A failing candidate hands the request to the next one;
a busy one (queue full, an upstream 429/503) does too, and no breaker hears of it. Moving
on is the route's degraded path, not a retry: the process-wide retry budget pays only for
going back to a backend this request already tried, after an exponential, jittered
backoff. Nothing is retried once bytes reached the client: for streams, the attempt ends
when the first chunk is in hand. Every call is an ``Attempt`` (``gateway.attempts``), whose
listeners keep the stats and the breakers.

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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Generic, TypeVar

from tenacity import wait_exponential_jitter

from backends.base import BackendRequest, BackendResponse
from backends.errors import BackendOverloaded, BackendUnavailable, InterlockError, InternalError
from gateway.attempts import DEFAULT_LISTENERS, Attempt, AttemptListener, AttemptStream
from gateway.retry_budget import RetryBudget
from gateway.snapshot import Route, Target
from policies import POLICIES
from policies.base import MIN_SAMPLES, BackendView, Policy, PolicyContext, RequestFacts

log = logging.getLogger("interlock.router")

T = TypeVar("T")

#: the longest an upstream's 429 Retry-After keeps its backend skipped
MAX_RATE_LIMIT_WAIT_S = 300.0


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
    #: what the response cache did (``x-interlock-cache``); None: the route does not cache
    cache: str | None = None


@dataclass(slots=True)
class Opened:
    """A stream whose first bytes have arrived: from here on nothing can be retried."""

    target: Target
    first: bytes
    rest: AsyncIterator[bytes]
    reason: str
    cache: str | None = None


@dataclass(slots=True)
class _Race(Generic[T]):
    """How a hedged attempt went: the winner and its result, or the last error; every target called."""

    called: tuple[Target, ...]
    winner: Target | None = None
    result: T | None = None
    error: InterlockError | None = None


class Router:
    def __init__(
        self,
        *,
        budget: RetryBudget | None = None,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
        policies: Mapping[str, Policy] = POLICIES,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        listeners: Sequence[AttemptListener] = DEFAULT_LISTENERS,
    ) -> None:
        self.budget = budget or RetryBudget()
        #: told of every attempt: stats and breakers by default; metrics and logs add themselves
        self.listeners = list(listeners)
        self._policies = policies
        self._rng = rng or random.Random()
        self._clock = clock
        self.set_backoff(backoff_initial_s, backoff_max_s)

    def set_backoff(self, initial_s: float, max_s: float) -> None:
        """The wait before a request calls a backend it already tried (a reload may change it)."""
        self._backoff = wait_exponential_jitter(initial=initial_s, max=max_s, jitter=initial_s)

    # -- planning -------------------------------------------------------------------------------

    def plan(self, route: Route, facts: RequestFacts) -> list[Choice]:
        """The order this request would try: the policy's ranking of the targets, then the fallback."""
        if len(route.targets) == 1:  # the common case needs no policy
            order = [Choice(route.targets[0], "only target")]
        else:
            by_name = {t.name: t for t in route.targets}
            views = [self._view(t) for t in route.targets]
            ranked = self._policies[route.policy](views, facts, PolicyContext(self._rng, route.options))
            order = [Choice(by_name[r.name], f"{route.policy}: {r.reason}") for r in ranked]
        order += [Choice(t, f"fallback {i}") for i, t in enumerate(route.fallback, start=1)]
        # A failed health check sends a backend to the back of the line, not out of it: checks can
        # be wrong, and trying it last beats refusing the request.
        if any(c.target.healthy is False for c in order):
            order.sort(key=lambda c: c.target.healthy is False)
        return order

    @staticmethod
    def _view(target: Target) -> BackendView:
        # The backend's own count is fresher than ours and includes its queue (llama.cpp, a pool).
        load = target.backend.load()
        own = load.in_flight + load.queued
        return target.stats.view(
            target.price.input_per_mtok,
            target.price.output_per_mtok,
            target.max_in_flight or load.capacity,
            max(own, target.stats.in_flight),
        )

    # -- serving --------------------------------------------------------------------------------

    async def complete(self, route: Route, request: BackendRequest, facts: RequestFacts) -> Served:
        async def call(target: Target) -> BackendResponse:
            attempt = Attempt(target, facts.prompt_tokens, self._clock, self.listeners)
            try:
                reply = await target.backend.complete(request)
            except BaseException as exc:
                attempt.fail(exc)
                raise
            attempt.finish(reply.usage)  # a reply sent whole: its first token is the whole of it
            return reply

        target, reply, reason = await self._serve(route, request, facts, call, _drop_nothing)
        return Served(target, reply, reason)

    async def stream(self, route: Route, request: BackendRequest, facts: RequestFacts) -> Opened:
        async def call(target: Target) -> tuple[bytes, AsyncIterator[bytes]]:
            attempt = Attempt(target, facts.prompt_tokens, self._clock, self.listeners)
            try:
                chunks = await target.backend.stream(request)
                try:
                    first = await anext(chunks)
                except StopAsyncIteration:
                    raise BackendUnavailable(f"backend {target.name!r} sent an empty stream") from None
                except BaseException:
                    await chunks.aclose()  # type: ignore[attr-defined]
                    raise
            except BaseException as exc:
                attempt.fail(exc)
                raise
            attempt.first_token()
            return first, AttemptStream(attempt, first, chunks)

        async def drop(opened: tuple[bytes, AsyncIterator[bytes]]) -> None:
            await opened[1].aclose()  # type: ignore[attr-defined]

        target, (first, rest), reason = await self._serve(route, request, facts, call, drop)
        return Opened(target, first, rest, reason)

    async def _serve(
        self,
        route: Route,
        request: BackendRequest,
        facts: RequestFacts,
        call: Callable[[Target], Awaitable[T]],
        drop: Callable[[T], Awaitable[None]],
    ) -> tuple[Target, T, str]:
        """The attempt loop; returns the winning target, its result and why it was chosen."""
        self.budget.record_request()
        plan = self.plan(route, facts)
        tried: set[str] = set()
        failures: list[str] = []
        last: InterlockError | None = None
        calls = 0
        skipped_open: list[Target] = []
        skipped_limited: list[Target] = []
        skipped_full = 0
        for round_ in range(route.attempts):
            progressed = False
            for index, choice in enumerate(plan):
                if calls >= route.attempts:
                    break
                target = choice.target
                # Fullness first: a half-open probe is admitted only where there is room to serve it.
                if target.full():
                    skipped_full += round_ == 0
                    continue
                if target.limited_until and target.limited_until > self._clock():
                    if round_ == 0:
                        skipped_limited.append(target)
                    continue
                if not target.breaker.allow():
                    if round_ == 0:
                        skipped_open.append(target)
                    continue
                again = target.name in tried
                if again and not self.budget.try_spend():
                    target.breaker.release()
                    assert last is not None
                    log.log(
                        logging.INFO if last.busy else logging.WARNING,
                        "retry budget exhausted for %s",
                        request.request_id,
                    )
                    raise _told_when(last)
                if again:
                    await asyncio.sleep(self._backoff(SimpleNamespace(attempt_number=calls)))  # type: ignore[arg-type]
                progressed = True
                if route.hedge and calls == 0:
                    race = await self._hedged(route, plan, index, call, drop, request.request_id)
                else:
                    race = await self._one(target, call, request.request_id)
                calls += len(race.called)
                tried.update(t.name for t in race.called)
                if race.winner is not None:
                    reason = choice.reason if race.winner is target else f"hedge won: {race.winner.name}"
                    if failures:
                        reason = f"{reason}; after {', '.join(failures)}"
                    return race.winner, race.result, reason  # type: ignore[return-value]
                exc = race.error
                assert exc is not None
                if not exc.retryable:
                    raise exc
                if exc.status == 429 and exc.retry_after:
                    # a rate limit has a date: asking again before it only earns another 429
                    target.limited_until = self._clock() + min(exc.retry_after, MAX_RATE_LIMIT_WAIT_S)
                    target.limited_by = exc
                log.log(
                    logging.INFO if exc.busy else logging.WARNING,
                    "backend %s %s for %s: %s",
                    target.name,
                    "was busy" if exc.busy else "failed",
                    request.request_id,
                    exc.message,
                )
                failures.append(f"{target.name}: {exc.code or exc.type}")
                last = exc
            if not progressed:
                break
        if last is not None:
            raise _told_when(last)
        if skipped_open and not (skipped_full or skipped_limited):
            # Every candidate's circuit is open: rather than refuse everything until a cool-down
            # ends, the one that reopens soonest takes a probe now, within its probe slots (a
            # bounded trickle, as Envoy's panic threshold routes to unhealthy hosts).
            target = min(skipped_open, key=lambda t: t.breaker.retry_in())
            if target.breaker.probe_early():
                race = await self._one(target, call, request.request_id)
                if race.winner is not None:
                    return race.winner, race.result, "every circuit open: probe"  # type: ignore[return-value]
                assert race.error is not None
                raise race.error
        raise self._nothing_to_try(route, skipped_open, skipped_limited, skipped_full)

    async def _one(self, target: Target, call: Callable[[Target], Awaitable[T]], request_id: str) -> _Race[T]:
        """One call; an error the backends' tree does not know is a bug of the gateway's own."""
        try:
            return _Race((target,), target, await call(target))
        except InterlockError as exc:
            return _Race((target,), error=exc)
        except Exception as exc:
            log.exception("request %s: internal error while calling backend %s", request_id, target.name)
            raise InternalError(f"The gateway hit an internal error; quote request id {request_id}.") from exc

    async def _hedged(
        self,
        route: Route,
        plan: list[Choice],
        index: int,
        call: Callable[[Target], Awaitable[T]],
        drop: Callable[[T], Awaitable[None]],
        request_id: str,
    ) -> _Race[T]:
        first = plan[index].target
        p95 = first.stats.ttft.quantile(0.95)
        backup = next((c.target for c in plan[index + 1 :] if c.target is not first), None)
        if p95 is None or first.stats.samples < MIN_SAMPLES or backup is None:
            return await self._one(first, call, request_id)
        primary = asyncio.ensure_future(self._one(first, call, request_id))
        try:
            done, _ = await asyncio.wait({primary}, timeout=p95 / 1000)
        except BaseException:
            # the client left while waiting: asyncio.wait does not cancel the attempt it waits on
            primary.cancel()
            with contextlib.suppress(BaseException):
                race = await primary
                if race.winner is not None:
                    await drop(race.result)  # type: ignore[arg-type]
            raise
        if done:
            return primary.result()
        if backup.full() or not backup.breaker.allow():
            return await primary
        if not self.budget.try_spend():  # a hedge is duplicate work: the budget pays for it
            backup.breaker.release()
            return await primary
        log.info("hedging %s: no answer from %s within its p95 %.0f ms", route.name, first.name, p95)
        second = asyncio.ensure_future(self._one(backup, call, request_id))
        pending = {primary, second}
        error: InterlockError | None = None
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                races = [task.result() for task in done]
                winners = [race for race in races if race.winner is not None]
                if winners:
                    for extra in winners[1:]:  # both answered in the same instant: keep one
                        await drop(extra.result)  # type: ignore[arg-type]
                    return _Race((first, backup), winners[0].winner, winners[0].result)
                error = races[-1].error
            return _Race((first, backup), error=error)
        finally:
            for task in pending:
                task.cancel()
            for task in pending:
                try:
                    loser = await task
                except BaseException:  # the loser failing or cancelled no longer matters
                    continue
                if loser.winner is not None:
                    await drop(loser.result)  # type: ignore[arg-type]

    def _nothing_to_try(
        self, route: Route, skipped_open: list[Target], skipped_limited: list[Target], skipped_full: int
    ) -> InterlockError:
        if skipped_limited and not skipped_full:
            soonest = min(skipped_limited, key=lambda t: t.limited_until)
            said = soonest.limited_by
            # the upstream's own words (and code), with the wait that is left of its Retry-After
            refusal = BackendOverloaded(
                said.message
                if said
                else f"every backend of model {route.name!r} is rate limiting; retry later",
                status=429,
                retry_after=max(1.0, soonest.limited_until - self._clock()),
            )
            if said is not None:
                refusal.type, refusal.code, refusal.param = said.type, said.code, said.param  # type: ignore[assignment]
            return refusal
        if skipped_open and not skipped_full:
            wait = min(t.breaker.retry_in() for t in skipped_open)
            return BackendUnavailable(
                f"every backend of model {route.name!r} is failing (circuits open); retry later",
                status=503,
                retry_after=max(1.0, wait),
            )
        return BackendOverloaded(
            f"every backend of model {route.name!r} is at capacity; retry later", retry_after=1.0
        )


def _told_when(exc: InterlockError) -> InterlockError:
    if exc.busy and exc.retry_after is None:
        exc.retry_after = 1.0  # a client told "busy" is told when to come back
    return exc


async def _drop_nothing(_: object) -> None:
    return None
