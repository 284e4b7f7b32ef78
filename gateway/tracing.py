"""OpenTelemetry traces (off by default; the ``otel`` extra): what each request did, as spans.

Per inference request, with ``INTERLOCK_TRACES=otlp`` (or ``console``):

- a SERVER span ``POST /v1/chat/completions`` from the request to its last byte, the child of
  the client's W3C ``traceparent`` when it sent one, with the HTTP status, the route, the
  backend that answered, why, the cache result, and ``gen_ai.request.model`` /
  ``gen_ai.response.model``;
- an INTERNAL span ``interlock.cache`` (routes with ``cache:``) over the lookup and the single
  flight, up to the upstream call or the replay, with the result (hit, miss, bypass, stale);
- a CLIENT span ``{gen_ai.operation.name} {gen_ai.request.model}`` per upstream attempt (retries
  and hedges each get one), with the OpenTelemetry GenAI attributes
  (https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/): operation, provider
  (the backend's kind), request model and parameters, token usage, ``error.type``; its
  ``traceparent`` goes to the upstream (``backends.http.TRACEPARENT``), so a vLLM with tracing
  on continues the trace;
- ``step(name)``: a seam for further pipeline steps (admission limits) to open a child span;
  a no-op context manager when tracing is off.

The access log line carries the trace id of a traced request (``TRACE_ID_KEY`` in the ASGI
scope). Sampling is parent-based with a ratio (``INTERLOCK_TRACE_SAMPLE_RATIO``), as the SDK's
``ParentBased(TraceIdRatioBased)`` would do it, but decided before any OpenTelemetry call: a
client's ``traceparent`` decides by its sampled flag (one flagged unsampled is still passed
upstream, with no span made here); a request without one is sampled with that probability, and
one left out is served as with tracing off (no span, no trace id, no ``traceparent`` upstream):
at 1% that is nearly every request, and the SDK's non-recording spans, context and propagator
would cost each of them tens of microseconds. Spans are exported by the SDK's batch processor
on its own thread (OTLP over HTTP; ``OTEL_EXPORTER_OTLP_ENDPOINT`` and ``OTEL_SERVICE_NAME`` as
the SDK reads them).

opentelemetry is imported only when tracing is on: the gateway runs without the extra, and
with tracing off nothing here runs per request. This module opens and ends the spans; what they
say (the GenAI and HTTP attributes) is ``gateway.tracing_attributes``.
"""

from __future__ import annotations

import contextlib
import random
import re
import time
from collections.abc import Awaitable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backends.http import TRACEPARENT
from gateway.attempts import Attempt
from gateway.inference import CLIENT_REQUEST_KEY
from gateway.tracing_attributes import (
    ServerAddresses,
    attempt_end_attributes,
    request_attributes,
    server_attributes,
)

if TYPE_CHECKING:
    from gateway.cache_step import CacheStep, Call, Replayed
    from gateway.router import Opened, Served
    from gateway.snapshot import Route

#: the ASGI scope key of the request's trace id (32 hex digits), for the access log
TRACE_ID_KEY = "interlock.trace_id"


class _Request:
    """What the attempt spans of one request need from it, found through a context variable
    (hedge tasks inherit it); read from the parsed request at the first attempt. An unsampled
    request has only its trace id (and flags) to pass on."""

    __slots__ = ("flags", "model", "operation", "parameters", "sampled", "scope", "trace_id", "tracing")

    def __init__(
        self, tracing: Tracing, scope: Scope, sampled: bool = True, trace_id: str = "", flags: str = "01"
    ) -> None:
        self.tracing, self.scope = tracing, scope
        self.sampled, self.trace_id, self.flags = sampled, trace_id, flags
        self.operation = ""
        self.model: str | None = None
        self.parameters: dict[str, Any] = {}


_CURRENT: ContextVar[_Request | None] = ContextVar("interlock_traced_request", default=None)
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


class Tracing:
    """The tracer of one app, and the hooks that make its spans."""

    def __init__(self, sample_ratio: float = 1.0, exporter: str = "otlp", span_exporter: Any = None) -> None:
        """``exporter``: ``otlp`` or ``console``; ``span_exporter``: an SDK exporter to use instead,
        its spans exported as they end (tests pass an ``InMemorySpanExporter``)."""
        try:
            from opentelemetry import context, trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
            from opentelemetry.sdk.trace.sampling import ALWAYS_ON
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as exc:
            raise RuntimeError(
                "INTERLOCK_TRACES needs the otel extra: pip install 'interlock[otel]'"
            ) from exc
        self._trace = trace
        self._context = context
        self._kinds = trace.SpanKind
        self._error = trace.Status(trace.StatusCode.ERROR)
        self._propagator = TraceContextTextMapPropagator()
        resource = Resource.create({"service.name": "interlock"})  # OTEL_SERVICE_NAME overrides
        # Sampling is decided here, before any span exists (``_serve``): an unsampled request makes
        # no span object at all, which is most of what tracing would cost it.
        self.sample_ratio = sample_ratio
        self._random = random.Random()
        self.provider = TracerProvider(resource=resource, sampler=ALWAYS_ON)
        if span_exporter is not None:
            self.provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        elif exporter == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            # One compact JSON line a span: the SDK's default (indent=4) takes json's pure-Python
            # encoder, about a third more CPU a sampled request than the C one.
            console = ConsoleSpanExporter(formatter=lambda span: span.to_json(indent=None) + "\n")
            self.provider.add_span_processor(BatchSpanProcessor(console))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = self.provider.get_tracer("interlock")
        #: open attempt spans (``Attempt`` has slots and no room for one)
        self._attempts: dict[Attempt, Any] = {}
        self._servers = ServerAddresses()

    def shutdown(self) -> None:
        """Exports what is pending (the app is ending)."""
        self.provider.shutdown()

    # -- the server span --------------------------------------------------------------------

    def trace(self, app: ASGIApp) -> ASGIApp:
        """``app`` (an inference endpoint) with a server span around each request sampled."""
        ratio = self.sample_ratio
        draw = self._random.random
        incoming = self._serve_incoming
        sampled = self._serve_sampled

        def traced(scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
            # Parent-based ratio sampling, decided before any OpenTelemetry call. A client's
            # traceparent decides by its sampled flag; a request without one is sampled with
            # probability ``ratio``, and one left out (nearly all, at 1%) is served exactly as
            # with tracing off: no span, no context, no traceparent upstream, no trace id logged.
            # The SDK's own ParentBased(TraceIdRatioBased) path cost an unsampled request ~3% of
            # the gateway's instructions; this costs it one scan of the header names and a draw,
            # and no coroutine of its own: it returns the one of the app that serves the request.
            for name, _ in scope["headers"]:
                if name == b"traceparent":
                    return incoming(app, scope, receive, send)
            if draw() < ratio:
                return sampled(app, scope, receive, send, None)
            return app(scope, receive, send)

        return traced

    async def _serve_incoming(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """A request that came with a ``traceparent``: its sampled flag decides; an invalid one is
        ignored (W3C), the request then sampled as one without."""
        carrier = {}
        for name, value in scope["headers"]:
            if name == b"traceparent" or name == b"tracestate":
                carrier[name.decode()] = value.decode("latin-1")
        incoming = _TRACEPARENT.fullmatch(carrier.get("traceparent", "").strip().lower())
        if incoming is None:
            if self._random.random() < self.sample_ratio:
                await self._serve_sampled(app, scope, receive, send, None)
            else:
                await app(scope, receive, send)
        elif int(incoming.group(3), 16) & 1:
            await self._serve_sampled(app, scope, receive, send, carrier)
        else:
            # The client's trace is not recorded here but is passed on, its flag unset, so that a
            # traced upstream does not start a trace of its own for it.
            trace_id = scope[TRACE_ID_KEY] = incoming.group(1)
            token = _CURRENT.set(_Request(self, scope, False, trace_id, incoming.group(3)))
            try:
                await app(scope, receive, send)
            finally:
                _CURRENT.reset(token)

    async def _serve_sampled(
        self, app: ASGIApp, scope: Scope, receive: Receive, send: Send, carrier: dict[str, str] | None
    ) -> None:
        trace = self._trace
        parent = self._propagator.extract(carrier) if carrier else None
        path = scope["path"]
        span = self.tracer.start_span(
            f"{scope['method']} {path}",
            context=parent,
            kind=self._kinds.SERVER,
            attributes={"http.request.method": scope["method"], "http.route": path, "url.path": path},
        )
        scope[TRACE_ID_KEY] = f"{span.get_span_context().trace_id:032x}"
        seen: dict[str, Any] = {}

        def watching(message: Message) -> Awaitable[None]:
            kind = message["type"]
            if kind == "http.response.start":
                seen["status"] = message["status"]
                seen["headers"] = message.get("headers", ())
            elif kind == "http.response.body":
                body = message.get("body", b"")
                if body and "first" not in seen:
                    seen["first"] = body[:1024]
                if body:
                    seen["last"] = body[-2048:]
            return send(message)

        token = _CURRENT.set(_Request(self, scope))
        attached = self._context.attach(trace.set_span_in_context(span, parent))
        try:
            await app(scope, receive, watching)
        except BaseException as exc:
            span.set_status(self._error)
            span.set_attribute("error.type", type(exc).__name__)
            raise
        finally:
            self._context.detach(attached)
            _CURRENT.reset(token)
            self._end_server_span(span, scope, seen)

    def _end_server_span(self, span: Any, scope: Scope, seen: dict[str, Any]) -> None:
        # The attributes go in one ``set_attributes``: each ``set_attribute`` takes the span's
        # lock and cleans its value on its own (about 2 us apiece, a dozen a request).
        attrs, failed = server_attributes(scope.get(CLIENT_REQUEST_KEY), seen)
        if failed:
            span.set_status(self._error)
        span.set_attributes(attrs)
        span.end()

    # -- a span per upstream attempt (an AttemptListener) -----------------------------------

    def attempt_started(self, attempt: Attempt) -> None:
        request = _CURRENT.get()
        if request is None:
            return
        if not request.sampled:  # passed on, with a span id of its own, recorded nowhere
            span_id = self._random.getrandbits(64) or 1
            TRACEPARENT.set(f"00-{request.trace_id}-{span_id:016x}-{request.flags}")
            return
        if not request.operation:
            request.operation, request.model, request.parameters = request_attributes(
                request.scope.get(CLIENT_REQUEST_KEY)
            )
        backend = attempt.target.backend
        upstream_model = getattr(getattr(backend, "config", None), "model", None) or request.model
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": request.operation,
            "gen_ai.provider.name": backend.kind,
            **request.parameters,
            "interlock.backend": attempt.target.name,
            **self._servers.of(backend),
        }
        if upstream_model:
            attrs["gen_ai.request.model"] = upstream_model
        span = self.tracer.start_span(
            f"{request.operation} {upstream_model}" if upstream_model else request.operation,
            kind=self._kinds.CLIENT,
            attributes=attrs,
        )
        context = span.get_span_context()
        # What the backend's HTTP call sends as ``traceparent``: read in this task, which is the
        # one that calls the backend (a hedge runs in a task of its own, with its own copy).
        TRACEPARENT.set(f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}")
        self._attempts[attempt] = span

    def attempt_answered(self, attempt: Attempt) -> None:
        span = self._attempts.get(attempt)
        if span is not None and attempt.ttft_s is not None:
            span.set_attribute("interlock.ttft_s", attempt.ttft_s)

    def attempt_ended(self, attempt: Attempt) -> None:
        span = self._attempts.pop(attempt, None)
        if span is None:
            return
        attrs, failed = attempt_end_attributes(attempt)
        if failed:
            span.set_status(self._error)
        span.set_attributes(attrs)
        span.end()

    # -- the cache step and the seam for others ---------------------------------------------

    def traced_cache(self, step: CacheStep) -> CacheStep:
        return _TracedCacheStep(step, self)  # type: ignore[return-value]

    @contextlib.contextmanager
    def step(self, name: str, **attributes: Any) -> Iterator[Any]:
        """A child span of the current one over a pipeline step (admission limits, say)."""
        with self.tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span


_OFF = contextlib.nullcontext()


def step(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """The seam for a pipeline step (admission limits, say) to show as a child span of the
    request's: ``with tracing.step("interlock.limits"): ...``. With tracing off (or outside a
    traced request) a shared ``nullcontext``: one context-variable read."""
    request = _CURRENT.get()
    if request is None or not request.sampled:
        return _OFF
    return request.tracing.step(name, **attributes)


class _TracedCacheStep:
    """A ``CacheStep`` whose lookup (up to the upstream call or the replay) is a span."""

    def __init__(self, step: CacheStep, tracing: Tracing) -> None:
        self._step = step
        self._tracing = tracing

    @property
    def cache(self) -> Any:
        return self._step.cache

    async def serve(
        self,
        route: Route,
        endpoint: str,
        body: dict[str, object],
        tenant: str | None,
        cache_control: str | None,
        call: Call,
    ) -> Served | Opened | Replayed:
        request = _CURRENT.get()
        if request is None or not request.sampled:  # not recorded: no span (it would be a root)
            return await self._step.serve(route, endpoint, body, tenant, cache_control, call)
        span = self._tracing.tracer.start_span("interlock.cache", attributes={"interlock.route": route.name})
        called_at: list[int] = []

        async def calling() -> Served | Opened:
            called_at.append(time.time_ns())  # the lookup ends where the upstream call begins
            return await call()

        result = "error"
        try:
            reply = await self._step.serve(route, endpoint, body, tenant, cache_control, calling)
            result = getattr(reply, "cache", None) or "none"
            return reply
        finally:
            span.set_attribute("interlock.cache.result", result)
            span.end(end_time=called_at[0] if called_at else None)


def tracing_from(setting: str, sample_ratio: float) -> Tracing | None:
    """``INTERLOCK_TRACES``: ``off`` (None), ``otlp`` or ``console``."""
    return None if setting == "off" else Tracing(sample_ratio, exporter=setting)
