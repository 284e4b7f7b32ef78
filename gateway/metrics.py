"""Prometheus metrics (``GET /metrics``), and the hand-off of each request to the access log.

Two sources, both cheap on the hot path:

- the edge: each inference endpoint fills in an ``Exchange`` (``gateway.metrics_edge``) as it
  serves a request; a request's labels and figures are settled once, when it is over
  (``finish``): one histogram observation (its count is the request counter), plus tokens,
  cost, TTFT and overhead where they apply, and the access log's entry (``gateway.access_entry``);
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
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector
from starlette.types import ASGIApp, Receive, Scope, Send

from backends.errors import InterlockError
from gateway.access_entry import access_entry
from gateway.access_log import AccessLog
from gateway.attempts import Attempt
from gateway.errors import client_status
from gateway.inference import CLIENT_REQUEST_KEY
from gateway.metrics_edge import CACHE_BACKEND, CURRENT, AsAdmin, Exchange, ended_by
from gateway.metrics_state import CounterFamily, Families, HistogramFamily, StateCollector
from gateway.metrics_workers import WorkerMetrics
from gateway.middleware import ClientAuth
from gateway.snapshot import KeyTable
from gateway.state import Gateway

log = logging.getLogger("interlock.metrics")

OTHER = "other"
NONE = "none"
CACHE = CACHE_BACKEND
CACHE_RESULTS = frozenset({"hit", "miss", "bypass", "stale"})
#: OpenTelemetry GenAI advisory buckets (gen_ai.server.request.duration, .time_to_first_token,
#: .time_per_output_token)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
#: the gateway's own time per request: tens of microseconds to milliseconds
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_CLASSES = ("", "1xx", "2xx", "3xx", "4xx", "5xx")
#: a stream's last bytes searched for an error event: a whole reply can come as one chunk, and
#: a search through 13 kB of JSON cost ~15 us, more than all the rest of the metrics of a request
_ERROR_WINDOW = 4096
_ERROR_EVENT = b'data: {"error"'


class RequestListener(Protocol):
    """Told of every observed inference request once it is over, with what ``finish`` settled."""

    def request_ended(
        self,
        ex: Exchange,
        scope: Scope,
        route: str,
        backend: str,
        status: int,
        errored: bool,
        duration_s: float,
        cached: str | None,
        reason: str | None,
    ) -> None: ...


class _Series:
    """What one (route, backend, status class, stream) tuple observes (its request count is its
    duration histogram's count); its (route, backend) pair's figures only once needed, so a
    404's series has no empty token counters."""

    __slots__ = ("duration", "pair")

    def __init__(self, m: Metrics, key: tuple[str, str, str, str]) -> None:
        self.duration = m.duration.child(key)
        self.pair: _Pair | None = None


class _Pair:
    __slots__ = ("cost", "tokens_in", "tokens_out", "tpot", "ttft")

    def __init__(self, m: Metrics, key: tuple[str, str]) -> None:
        self.tokens_in = self.tokens_out = 0
        self.cost = 0.0
        self.ttft = m.ttft.child(key)
        self.tpot = m.tpot.child(key)


class Metrics:
    """The metrics of one app, its registry, and its access log (if any)."""

    def __init__(
        self, gateway: Gateway, access_log: AccessLog | None = None, reloader: object | None = None
    ) -> None:
        """``reloader``: anything with ``results`` (a Counter of reload results), read at scrape."""
        self._gateway = gateway
        self._access = access_log
        by_request = ["route", "backend", "status_class", "stream"]
        route_backend = ["route", "backend"]
        self.requests = CounterFamily(
            "interlock_requests",
            "Inference requests by outcome",
            by_request,
            lambda: ((k, h.count) for k, h in self.duration.children.items()),
        )
        self.duration = HistogramFamily(
            "interlock_request_duration_seconds",
            "Inference request duration, from the request to its last byte (gen_ai.server.request.duration)",
            by_request,
            DURATION_BUCKETS,
        )
        self.ttft = HistogramFamily(
            "interlock_time_to_first_token_seconds",
            "Streams: time from the request to its first byte sent (gen_ai.server.time_to_first_token)",
            route_backend,
            TTFT_BUCKETS,
        )
        self.tpot = HistogramFamily(
            "interlock_time_per_output_token_seconds",
            "Streams: time per output token after the first (gen_ai.server.time_per_output_token)",
            route_backend,
            TPOT_BUCKETS,
        )
        self.tokens = CounterFamily(
            "interlock_tokens",
            "Tokens by type, as the backend reported them",
            [*route_backend, "type"],
            self._tokens,
        )
        self.cost = CounterFamily(
            "interlock_cost_usd",
            "Cost in USD at the backends' configured prices",
            route_backend,
            lambda: ((k, p.cost) for k, p in self._pairs.items()),
        )
        self.attempts = CounterFamily(
            "interlock_attempts",
            "Backend calls (retries and hedges included) "
            "by outcome: ok, failed (counted by its breaker), abandoned (no "
            "verdict)",
            ["backend", "outcome"],
        )
        self.retries = CounterFamily(
            "interlock_retries",
            "Calls after a failed or busy one within a "
            "request (the next candidate or the same again), by why the "
            "previous one ended",
            ["route", "reason"],
        )
        self.fallbacks = CounterFamily(
            "interlock_fallbacks", "Requests answered by a backend of the route's fallback list", ["route"]
        )
        self.hedges = CounterFamily(
            "interlock_hedges", "Hedge calls sent, by whether the hedge won", ["route", "result"]
        )
        self.overhead = HistogramFamily(
            "interlock_gateway_overhead_seconds",
            "Answered non-streamed requests: total time minus the upstream calls' time",
            [],
            OVERHEAD_BUCKETS,
        )
        self.cache_results = CounterFamily(
            "interlock_cache_results",
            "Response cache lookups by result (hit, miss, bypass, stale), from x-interlock-cache",
            ["route", "result"],
        )
        self._overhead = self.overhead.child(())
        self.registry = CollectorRegistry()
        self.registry.register(
            Families(
                [
                    self.requests,
                    self.duration,
                    self.ttft,
                    self.tpot,
                    self.tokens,
                    self.cost,
                    self.attempts,
                    self.retries,
                    self.fallbacks,
                    self.hedges,
                    self.overhead,
                    self.cache_results,
                ]
            )
        )
        self.registry.register(StateCollector(gateway, access_log, reloader))
        ProcessCollector(registry=self.registry)
        self._series: dict[tuple[str, str, str, str], _Series] = {}
        self._pairs: dict[tuple[str, str], _Pair] = {}
        #: more observers of each request (the status page's rolling figures)
        self.request_listeners: list[RequestListener] = []
        #: with several workers: the others' figures, added to each scrape
        self.workers: WorkerMetrics | None = None

    # -- the edge -------------------------------------------------------------------------------

    def endpoint(self, keys: Callable[[], KeyTable]) -> ASGIApp:
        """``GET /metrics``, under ``/admin/``'s rule (``ClientAuth``): an admin key when keys are
        configured, else loopback clients only."""
        return AsAdmin(ClientAuth(self._scrape, keys))

    async def _scrape(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = generate_latest(self.registry)
        if self.workers is not None:
            body = await self.workers.exposition(body)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def finish(self, ex: Exchange, scope: Scope) -> None:
        """An inference request is over (the endpoints' ``Observer``): its figures, settled once."""
        end = time.perf_counter()
        duration = end - ex.started
        snapshot = self._gateway.snapshot
        request = scope.get(CLIENT_REQUEST_KEY)
        model = request.body.get("model") if request is not None else None
        route = model if isinstance(model, str) and model in snapshot.routes else OTHER
        stream = request is not None and request.endpoint != "embeddings" and bool(request.body.get("stream"))
        answered, reason, cached = ex.backend, ex.reason, ex.cache
        if answered is None and ex.last_target is not None:
            answered = ex.last_target.name  # an error after trying: the last backend tried
        if answered is None or (answered not in snapshot.targets and answered != CACHE):
            answered = NONE
        backend: str = answered
        if cached is not None and cached in CACHE_RESULTS:
            self.cache_results.values[route, cached] += 1
        status = ex.status or 499  # nothing sent: the client left first (nginx's 499)
        status_class = _CLASSES[status // 100] if 100 <= status < 600 else OTHER
        last = ex.last
        errored = stream and ex.done and last.rfind(_ERROR_EVENT, max(0, len(last) - _ERROR_WINDOW)) >= 0
        if errored:  # the HTTP status was 200, but the stream ended with an error event
            status_class = "5xx"
            if ex.broke and isinstance(ex.error, InterlockError) and 100 <= client_status(ex.error) < 600:
                status_class = _CLASSES[client_status(ex.error) // 100]
        key = (route, backend, status_class, "true" if stream else "false")
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(self, key)
        histogram = series.duration
        histogram.counts[bisect_left(histogram.bounds, duration)] += 1
        histogram.sum += duration
        usage, cost = ex.usage, 0.0
        if usage is not None and ex.target is not None:
            pair = series.pair or self._pair(series, route, backend)
            pair.tokens_in += usage.prompt_tokens
            pair.tokens_out += usage.completion_tokens
            price = ex.target.price
            if price.input_per_mtok or price.output_per_mtok:  # self-hosted: 0 unless set
                cost = ex.target.cost_usd(usage)
                pair.cost += cost
        ttft = overhead = None
        if stream and ex.first_byte is not None:
            ttft = ex.first_byte - ex.started
            if not errored:
                pair = series.pair or self._pair(series, route, backend)
                pair.ttft.observe(ttft)
                if usage is not None and usage.completion_tokens > 1 and ex.done:
                    pair.tpot.observe((end - ex.first_byte) / (usage.completion_tokens - 1))
        elif not stream and ex.attempts and status < 400:
            overhead = duration - ex.upstream_s
            if overhead < 0:
                overhead = 0.0
            if not ex.hedges:  # overlapping calls: their times do not add up
                self._overhead.observe(overhead)
        if ex.attempts > 1:
            self._routed(ex, route, reason)
        elif reason is not None and reason.startswith("fallback "):
            self.fallbacks.values[route,] += 1
        for listener in self.request_listeners:
            listener.request_ended(ex, scope, route, backend, status, errored, duration, cached, reason)
        if self._access is not None:
            self._access.write(
                access_entry(
                    ex,
                    scope,
                    request,
                    model,
                    route,
                    backend,
                    reason,
                    cached,
                    status,
                    stream,
                    errored,
                    duration,
                    ttft,
                    overhead,
                    cost,
                )
            )

    def _pair(self, series: _Series, route: str, backend: str) -> _Pair:
        pair = self._pairs.get((route, backend))
        if pair is None:
            pair = self._pairs[route, backend] = _Pair(self, (route, backend))
        series.pair = pair
        return pair

    def _tokens(self) -> Iterator[tuple[tuple[str, ...], float]]:
        for (route, backend), pair in self._pairs.items():
            yield (route, backend, "input"), pair.tokens_in
            yield (route, backend, "output"), pair.tokens_out

    def _routed(self, ex: Exchange, route: str, reason: str | None) -> None:
        for why in ex.retries:
            self.retries.values[route, why] += 1
        if ex.hedges:
            won = reason is not None and reason.startswith("hedge won")
            self.hedges.values[route, "won" if won else "lost"] += ex.hedges
        if reason is not None and reason.startswith("fallback "):
            self.fallbacks.values[route,] += 1

    # -- the router (AttemptListener) -----------------------------------------------------------

    def attempt_started(self, attempt: Attempt) -> None:
        ex = CURRENT.get()
        if ex is None:
            return
        if ex.running:
            ex.hedges += 1  # another call of this request is still out: a hedge
        elif ex.attempts:
            ex.retries += (ended_by(ex.error),)
        ex.attempts += 1
        ex.running += 1
        ex.last_target = attempt.target

    def attempt_answered(self, attempt: Attempt) -> None:
        return None

    def attempt_ended(self, attempt: Attempt) -> None:
        self.attempts.values[attempt.target.name, attempt.outcome or "ok"] += 1
        ex = CURRENT.get()
        if ex is None:
            return
        ex.running -= 1
        ex.upstream_s += attempt.total_s or 0.0
        if attempt.outcome == "ok":
            ex.usage, ex.target = attempt.usage, attempt.target
        elif attempt.error is not None:
            ex.error = attempt.error
            ex.failures += (f"{attempt.target.name}: {ended_by(attempt.error)}",)
            if attempt.answered and attempt.outcome == "failed":
                ex.broke = True  # failed after its first byte: the upstream went away mid-stream
