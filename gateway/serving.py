"""Serving one inference request, with no HTTP in sight.

The edge (``gateway.inference``) reads, parses and hands over a ``ClientRequest``; ``Serving``
answers it with a complete reply (``Served``) or an opened stream (``Opened``), and the edge
writes that out as JSON or SSE. In between, in this order: the snapshot in force (read once,
kept for the whole request), the route the model names, the key's model allowlist, the facts
policies rank by, the response cache (``gateway.cache_step``: a hit never routes), then the
router. Admission limits (``gateway.limits_step``) sit after the allowlist, before the cache and
the router: a refusal never routes, and whatever answers settles what the request reserved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backends.base import BackendRequest, Endpoint
from backends.errors import InvalidRequest
from gateway.cache_step import CacheStep, Replayed
from gateway.config import ClientKey
from gateway.errors import PermissionDenied
from gateway.limits_step import admit
from gateway.router import Opened, Router, Served
from gateway.snapshot import Route, may_use
from gateway.state import Gateway
from policies.base import RequestFacts

if TYPE_CHECKING:
    from gateway.tracing import Tracing

#: a rough tokens-per-byte for JSON bodies, good enough to rank backends by prompt size
BYTES_PER_TOKEN = 4
#: the reply budget assumed for ranking when a request sets no max_tokens
DEFAULT_MAX_TOKENS = 256


@dataclass(slots=True)
class ClientRequest:
    """A request as the edge parsed it: the validated body and the few headers that matter."""

    endpoint: Endpoint
    #: the client's JSON object, validated by ``gateway.protocol``
    body: dict[str, Any]
    #: the body's size in bytes (the prompt-size estimate comes from it)
    size: int
    request_id: str
    #: the client key that authenticated it; None when no keys are configured
    key: ClientKey | None = None
    #: ``x-interlock-max-ttft-ms``: this request's first-token budget, overriding the route's SLO
    max_ttft_ms: str | None = None
    #: ``x-interlock-session``: a conversation key pools may keep together
    session: str | None = None
    #: ``Cache-Control``: the client's say over the response cache
    cache_control: str | None = None
    #: ``x-ratelimit-*`` for every response to this request, the refusal and the stream included
    rate_headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class Serving:
    def __init__(self, gateway: Gateway, tracing: Tracing | None = None) -> None:
        self._gateway = gateway
        self._cache = CacheStep(gateway.cache) if gateway.cache is not None else None
        if self._cache is not None and tracing is not None:
            self._cache = tracing.traced_cache(self._cache)  # the lookup as a span

    @property
    def router(self) -> Router:
        return self._gateway.router

    async def serve(self, request: ClientRequest) -> Served | Opened | Replayed:
        snapshot = self._gateway.snapshot
        model: str = request.body["model"]
        route = snapshot.route(model)
        if not may_use(request.key, model):
            raise PermissionDenied(f"This API key may not use the model `{model}`.", param="model")
        facts = request_facts(request, route)
        limits, admission = self._gateway.limits, None
        if limits is not None and (section := snapshot.config.limits).keys:
            name = request.key.name if request.key else None
            embeddings = request.endpoint == "embeddings"
            tokens = facts.prompt_tokens
            admission = await admit(limits, section, name, route, request.body, tokens, embeddings)
            if admission is not None:
                request.rate_headers = admission.headers
                if refused := admission.refused():
                    raise refused
        upstream = BackendRequest(
            endpoint=request.endpoint,
            body=admission.body if admission else request.body,
            request_id=request.request_id,
            stream=bool(request.body.get("stream")) and request.endpoint != "embeddings",
            session=request.session,
        )
        router = self._gateway.router
        if admission is None and (route.cache is None or self._cache is None):
            # the common case, with no closure and no coroutine of its own
            if upstream.stream:
                return await router.stream(route, upstream, facts)
            return await router.complete(route, upstream, facts)

        async def call() -> Served | Opened:
            if upstream.stream:
                result: Served | Opened = await router.stream(route, upstream, facts)
            else:
                result = await router.complete(route, upstream, facts)
            return admission.follow(result) if admission is not None else result

        if route.cache is None or self._cache is None:
            assert admission is not None
            try:
                return await call()
            except BaseException:
                admission.release()
                raise
        tenant = request.key.name if request.key else None
        try:
            reply = await self._cache.serve(
                route, request.endpoint, request.body, tenant, request.cache_control, call
            )
        finally:
            if admission is not None:
                admission.release()  # a no-op once followed: a cache hit or a failure gives it all back
        return reply


def request_facts(request: ClientRequest, route: Route) -> RequestFacts:
    body = request.body
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
    budget = route.ttft_slo_ms
    if request.max_ttft_ms is not None:
        try:
            budget = float(request.max_ttft_ms)
        except ValueError:
            budget = -1.0
        if not 0 < budget < 3_600_000:
            raise InvalidRequest(
                "x-interlock-max-ttft-ms must be a positive number of milliseconds",
                param="x-interlock-max-ttft-ms",
            )
    return RequestFacts(
        prompt_tokens=request.size // BYTES_PER_TOKEN, max_tokens=int(max_tokens), ttft_budget_ms=budget
    )
