"""Prometheus metrics (``GET /metrics``) and the per-request access log entry.

Two sources, both cheap on the hot path:

- the edge: ``Metrics.observe(app)`` wraps each inference endpoint's ASGI app and watches what it
  sends (status, first body byte, last chunk, end); a request's labels and figures are settled
  once, when it is over (``_finish``): one counter and one histogram observation, plus tokens,
  cost and TTFT where they apply;
- the router: ``Metrics`` is an ``AttemptListener`` (``gateway.attempts``); each attempt is
  counted by backend and outcome, and noted on the request it belongs to (found through a
  context variable the edge sets, which hedge tasks inherit): attempts, retries and why, hedges,
  upstream time, usage.

Counting is plain additions into dicts keyed by label tuples (``gateway.metrics_state``: no
lock, one thread), a few times cheaper than prometheus-client's own metric objects. Labels are
bounded by construction: ``route`` is a model of the snapshot in force or ``other``; ``backend``
a configured backend name, ``cache`` or ``none``; no key or user label. State (breakers, load,
pools, config) is read from the snapshot at scrape time. One registry per app (tests run many);
one process per replica, so no multiprocess mode.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backends.base import Usage
from backends.errors import (
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    InterlockError,
    UpstreamHTTPError,
)
from gateway.access_log import TAIL, AccessLog
from gateway.attempts import Attempt
from gateway.errors import client_status
from gateway.inference import CLIENT_REQUEST_KEY
from gateway.metrics_state import CounterFamily, Families, HistogramFamily, StateCollector
from gateway.middleware import CLIENT_KEY, REQUEST_ID_KEY, ClientAuth
from gateway.snapshot import KeyTable, Target
from gateway.state import Gateway

log = logging.getLogger("interlock.metrics")

OTHER = "other"
NONE = "none"
#: the ``backend`` of an answer replayed by the response cache
CACHE = "cache"
CACHE_RESULTS = frozenset({"hit", "miss", "bypass", "stale"})
#: OpenTelemetry GenAI advisory buckets (gen_ai.server.request.duration, .time_to_first_token,
#: .time_per_output_token)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
#: the gateway's own time per request: tens of microseconds to milliseconds
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
#: kept from a JSON reply for the access log's finish reason (it sits near the end)
_TAIL_BYTES = 2048

_CURRENT: ContextVar[_Exchange | None] = ContextVar("interlock_exchange", default=None)


class _Exchange:
    """One request as the edge and the router saw it."""

    __slots__ = ("attempts", "broke", "done", "error", "failures", "first_byte", "headers", "hedges",
                 "last", "last_target", "p2", "prev", "retries", "running", "started", "status",
                 "target", "upstream_s", "usage")

    def __init__(self, started: float) -> None:
        self.started = started
        self.status: int | None = None
        self.headers: Any = ()
        self.first_byte: float | None = None
        self.done = False
        self.p2 = self.prev = self.last = b""
        self.attempts = self.running = self.hedges = 0
        self.retries: list[str] = []
        self.failures: list[str] = []
        self.upstream_s = 0.0
        self.usage: Usage | None = None
        self.target: Target | None = None
        self.last_target: Target | None = None
        self.error: BaseException | None = None
        self.broke = False


class _Series:
    """What one (route, backend, status class, stream) tuple observes; its (route, backend)
    pair's figures only once needed, so a 404's series has no empty token counters."""

    __slots__ = ("duration", "key", "pair")

    def __init__(self, m: Metrics, key: tuple[str, str, str, str]) -> None:
        self.key = key
        self.duration = m.duration.child(key)
        self.pair: _Pair | None = None


class _Pair:
    __slots__ = ("input", "key", "output", "tpot", "ttft")

    def __init__(self, m: Metrics, route: str, backend: str) -> None:
        self.key = (route, backend)
        self.input, self.output = (route, backend, "input"), (route, backend, "output")
        self.ttft = m.ttft.child(self.key)
        self.tpot = m.tpot.child(self.key)


class Metrics:
    """The metrics of one app, its registry, and its access log (if any)."""

    def __init__(self, gateway: Gateway, access_log: AccessLog | None = None,
                 reloader: object | None = None) -> None:
        """``reloader``: anything with ``results`` (a Counter of reload results), read at scrape."""
        self._gateway = gateway
        self._access = access_log
        by_request = ["route", "backend", "status_class", "stream"]
        route_backend = ["route", "backend"]
        self.requests = CounterFamily("interlock_requests", "Inference requests by outcome", by_request)
        self.duration = HistogramFamily("interlock_request_duration_seconds", "Inference request duration, "
                                        "from the request to its last byte (gen_ai.server.request.duration)",
                                        by_request, DURATION_BUCKETS)
        self.ttft = HistogramFamily("interlock_time_to_first_token_seconds", "Streams: time from the "
                                    "request to its first byte sent (gen_ai.server.time_to_first_token)",
                                    route_backend, TTFT_BUCKETS)
        self.tpot = HistogramFamily("interlock_time_per_output_token_seconds", "Streams: time per output "
                                    "token after the first (gen_ai.server.time_per_output_token)",
                                    route_backend, TPOT_BUCKETS)
        self.tokens = CounterFamily("interlock_tokens", "Tokens by type, as the backend reported them",
                                    [*route_backend, "type"])
        self.cost = CounterFamily("interlock_cost_usd", "Cost in USD at the backends' configured prices",
                                  route_backend)
        self.attempts = CounterFamily("interlock_attempts", "Backend calls (retries and hedges included) "
                                      "by outcome: ok, failed (counted by its breaker), abandoned (no "
                                      "verdict)", ["backend", "outcome"])
        self.retries = CounterFamily("interlock_retries", "Calls after a failed or busy one within a "
                                     "request (the next candidate or the same again), by why the "
                                     "previous one ended", ["route", "reason"])
        self.fallbacks = CounterFamily("interlock_fallbacks", "Requests answered by a backend of the "
                                       "route's fallback list", ["route"])
        self.hedges = CounterFamily("interlock_hedges", "Hedge calls sent, by whether the hedge won",
                                    ["route", "result"])
        self.overhead = HistogramFamily("interlock_gateway_overhead_seconds", "Answered non-streamed "
                                        "requests: total time minus the upstream calls' time", [],
                                        OVERHEAD_BUCKETS)
        self.cache_results = CounterFamily("interlock_cache_results", "Response cache lookups by result "
                                           "(hit, miss, bypass, stale), from x-interlock-cache",
                                           ["route", "result"])
        self._overhead = self.overhead.child(())
        self.registry = CollectorRegistry()
        self.registry.register(Families([self.requests, self.duration, self.ttft, self.tpot, self.tokens,
                                         self.cost, self.attempts, self.retries, self.fallbacks,
                                         self.hedges, self.overhead, self.cache_results]))
        self.registry.register(StateCollector(gateway, access_log, reloader))
        ProcessCollector(registry=self.registry)
        self._series: dict[tuple[str, str, str, str], _Series] = {}
        self._pairs: dict[tuple[str, str], _Pair] = {}

    # -- the edge -------------------------------------------------------------------------------

    def observe(self, app: ASGIApp) -> ASGIApp:
        """``app`` (an inference endpoint), observed."""
        return _Observed(app, self)

    def endpoint(self, keys: Callable[[], KeyTable]) -> ASGIApp:
        """``GET /metrics``, under ``/admin/``'s rule (``ClientAuth``): an admin key when keys are
        configured, else loopback clients only."""
        return _AsAdmin(ClientAuth(self._scrape, keys))

    async def _scrape(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = generate_latest(self.registry)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode())]})
        await send({"type": "http.response.body", "body": body})

    def _finish(self, ex: _Exchange, scope: Scope) -> None:
        end = time.perf_counter()
        duration = end - ex.started
        snapshot = self._gateway.snapshot
        request = scope.get(CLIENT_REQUEST_KEY)
        model = request.body.get("model") if request is not None else None
        route = model if isinstance(model, str) and model in snapshot.routes else OTHER
        stream = request is not None and request.endpoint != "embeddings" and bool(request.body.get("stream"))
        backend = reason = cached = None
        for name, value in ex.headers:
            if name == b"x-interlock-backend":
                backend = value.decode()
            elif name == b"x-interlock-route-reason":
                reason = value.decode()
            elif name == b"x-interlock-cache":
                cached = value.decode()
        if backend is None and ex.last_target is not None:
            backend = ex.last_target.name  # an error after trying: the last backend tried
        if backend not in snapshot.targets and backend != CACHE:
            backend = NONE
        if cached is not None and cached in CACHE_RESULTS:
            self.cache_results.values[route, cached] += 1
        status = ex.status or 499  # nothing sent: the client left first (nginx's 499)
        status_class = _CLASSES.get(status // 100, OTHER)
        errored = stream and ex.done and b'data: {"error"' in ex.last
        if errored:  # the HTTP status was 200, but the stream ended with an error event
            status_class = _CLASSES.get(client_status(ex.error) // 100, "5xx") \
                if ex.broke and isinstance(ex.error, InterlockError) else "5xx"
        key = (route, backend, status_class, "true" if stream else "false")
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(self, key)
        self.requests.values[key] += 1
        series.duration.observe(duration)
        usage, cost = ex.usage, 0.0
        if usage is not None and ex.target is not None:
            pair = series.pair or self._pair(series, route, backend)
            tokens = self.tokens.values
            tokens[pair.input] += usage.prompt_tokens
            tokens[pair.output] += usage.completion_tokens
            cost = ex.target.cost_usd(usage)
            if cost:
                self.cost.values[pair.key] += cost
        ttft = overhead = None
        if stream and ex.first_byte is not None:
            ttft = ex.first_byte - ex.started
            if not errored:
                pair = series.pair or self._pair(series, route, backend)
                pair.ttft.observe(ttft)
                if usage is not None and usage.completion_tokens > 1 and ex.done:
                    pair.tpot.observe((end - ex.first_byte) / (usage.completion_tokens - 1))
        elif not stream and ex.attempts and status < 400:
            overhead = max(0.0, duration - ex.upstream_s)
            if not ex.hedges:  # overlapping calls: their times do not add up
                self._overhead.observe(overhead)
        if ex.attempts > 1:
            self._routed(ex, route, reason)
        elif reason is not None and reason.startswith("fallback "):
            self.fallbacks.values[route,] += 1
        if self._access is not None:
            self._log(ex, scope, request, model, route, backend, reason, cached, status, stream,
                      errored, duration, ttft, overhead, cost)

    def _pair(self, series: _Series, route: str, backend: str) -> _Pair:
        pair = self._pairs.get((route, backend))
        if pair is None:
            pair = self._pairs[route, backend] = _Pair(self, route, backend)
        series.pair = pair
        return pair

    def _routed(self, ex: _Exchange, route: str, reason: str | None) -> None:
        for why in ex.retries:
            self.retries.values[route, why] += 1
        if ex.hedges:
            won = reason is not None and reason.startswith("hedge won")
            self.hedges.values[route, "won" if won else "lost"] += ex.hedges
        if reason is not None and reason.startswith("fallback "):
            self.fallbacks.values[route,] += 1

    def _log(self, ex: _Exchange, scope: Scope, request: Any, model: object, route: str, backend: str,
             reason: str | None, cached: str | None, status: int, stream: bool, errored: bool,
             duration: float, ttft: float | None, overhead: float | None, cost: float) -> None:
        assert self._access is not None
        if ex.status is None or (stream and not ex.done):
            disconnect = "client"
        elif ex.broke:
            disconnect = "upstream"
        else:
            disconnect = NONE
        if stream:
            tail = ex.p2 + ex.prev + ex.last
        elif status >= 400 or (request is not None and request.endpoint != "embeddings"):
            tail = ex.last[-_TAIL_BYTES:]
        else:
            tail = b""
        key = scope.get(CLIENT_KEY)
        usage = ex.usage
        self._access.write({
            "time": time.time() - duration,
            "request_id": scope.get(REQUEST_ID_KEY),
            "endpoint": request.endpoint if request is not None else None,
            "route": route,
            "model": model[:128] if isinstance(model, str) else None,
            "backend": backend,
            "attempts": ex.attempts,
            "reason": reason if reason is not None else ("; ".join(ex.failures) or None),
            "status": status,
            "stream": stream,
            "stream_error": errored,
            "ttft_ms": _ms(ttft),
            "duration_ms": _ms(duration),
            "upstream_ms": _ms(ex.upstream_s) if ex.attempts else None,
            "overhead_ms": _ms(overhead),
            "tokens_in": usage.prompt_tokens if usage is not None else None,
            "tokens_out": usage.completion_tokens if usage is not None else None,
            "cost_usd": round(cost, 8),
            "cache": cached,
            "disconnect": disconnect,
            "key": key.name if key is not None else None,
            TAIL: tail,
        })

    # -- the router (AttemptListener) -----------------------------------------------------------

    def attempt_started(self, attempt: Attempt) -> None:
        ex = _CURRENT.get()
        if ex is None:
            return
        if ex.running:
            ex.hedges += 1  # another call of this request is still out: a hedge
        elif ex.attempts:
            ex.retries.append(_why(ex.error))
        ex.attempts += 1
        ex.running += 1
        ex.last_target = attempt.target

    def attempt_answered(self, attempt: Attempt) -> None:
        return None

    def attempt_ended(self, attempt: Attempt) -> None:
        self.attempts.values[attempt.target.name, attempt.outcome or "ok"] += 1
        ex = _CURRENT.get()
        if ex is None:
            return
        ex.running -= 1
        ex.upstream_s += attempt.total_s or 0.0
        if attempt.outcome == "ok":
            ex.usage, ex.target = attempt.usage, attempt.target
        elif attempt.error is not None:
            ex.error = attempt.error
            ex.failures.append(f"{attempt.target.name}: {_why(attempt.error)}")
            if attempt.answered and attempt.outcome == "failed":
                ex.broke = True  # failed after its first byte: the upstream went away mid-stream


class _AsAdmin:
    """An ASGI app (an object, so Starlette's ``Route`` does not take it for a request handler)
    that ``ClientAuth`` judges as it judges ``/admin/``: one rule, not a copy of it."""

    def __init__(self, guarded: ASGIApp) -> None:
        self._guarded = guarded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._guarded({**scope, "path": "/admin/metrics"}, receive, send)


class _Observed:
    """An inference endpoint whose every request is measured when it is over."""

    __slots__ = ("_app", "_metrics")

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        clock = time.perf_counter
        ex = _Exchange(clock())
        token = _CURRENT.set(ex)

        async def observing(message: Message) -> None:
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                if message.get("more_body"):
                    if ex.first_byte is None:
                        ex.first_byte = clock()
                else:
                    ex.done = True
                if body:
                    ex.p2, ex.prev, ex.last = ex.prev, ex.last, body
            else:
                ex.status = message["status"]
                ex.headers = message.get("headers", ())
            await send(message)

        try:
            await self._app(scope, receive, observing)
        except BaseException:
            if ex.status is None:
                ex.status = 500
            raise
        finally:
            _CURRENT.reset(token)
            try:
                self._metrics._finish(ex, scope)
            except Exception:  # a metrics bug must never fail a request
                log.exception("metrics: observing request %s failed", scope.get(REQUEST_ID_KEY))


def _why(exc: BaseException | None) -> str:
    """A bounded name for how a call ended (retry reasons; the access log's failures)."""
    if isinstance(exc, BackendTimeout):
        return "timeout"
    if isinstance(exc, BackendOverloaded):
        return "busy"
    if isinstance(exc, UpstreamHTTPError):
        return "upstream_4xx" if exc.status < 500 else "upstream_5xx"
    if isinstance(exc, BackendUnavailable):
        return "unavailable"
    return "other"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
