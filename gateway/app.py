"""The HTTP surface: one explicit route table, handlers that parse, call the router, reply.

Handlers never know which backend kind answers; they pick JSON or SSE and render
errors through ``gateway.errors``. ``build_app`` takes a loaded config and built
backends: nothing here reads the environment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route as HttpRoute

from backends.base import Backend, BackendRequest, Endpoint
from backends.errors import InterlockError, InvalidRequest
from gateway.admin import admin_routes
from gateway.config import ClientKey, LoadedConfig
from gateway.errors import (
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    PermissionDenied,
    client_status,
    error_body,
    error_headers,
    sse_error_event,
)
from gateway.health import HealthMonitor
from gateway.middleware import CLIENT_KEY, REQUEST_ID_KEY, BodyLimit, ClientAuth, RequestContext
from gateway.protocol import parse_body
from gateway.router import Route, Router, Target
from policies.base import RequestFacts

log = logging.getLogger("interlock.app")

_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@dataclass
class Gateway:
    """Everything a request handler needs, built once per config."""

    config: LoadedConfig
    router: Router
    backends: dict[str, Backend]
    targets: dict[str, Target]
    health: HealthMonitor
    started_at: int = field(default_factory=lambda: int(time.time()))
    #: set when start-up of a backend failed; the server exits with it
    fatal: BaseException | None = None
    #: set once shutdown begins: readiness answers 503 while in-flight streams finish
    draining: bool = False


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type="application/json")


def _error(exc: InterlockError, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(exc), client_status(exc), {**error_headers(exc), **(headers or {})})


def _allowed(key: ClientKey | None, model: str) -> bool:
    return key is None or key.models is None or model in key.models


#: a rough tokens-per-byte for JSON bodies, good enough to rank backends by prompt size
_BYTES_PER_TOKEN = 4
#: the reply budget assumed for ranking when a request sets no max_tokens
_DEFAULT_MAX_TOKENS = 256


def _facts(request: Request, raw: bytes, body: dict[str, Any], route: Route) -> RequestFacts:
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or _DEFAULT_MAX_TOKENS
    budget = route.ttft_slo_ms
    header = request.headers.get("x-interlock-max-ttft-ms")
    if header is not None:
        try:
            budget = float(header)
        except ValueError:
            budget = -1.0
        if not 0 < budget < 3_600_000:
            raise InvalidRequest("x-interlock-max-ttft-ms must be a positive number of milliseconds",
                                 param="x-interlock-max-ttft-ms")
    return RequestFacts(prompt_tokens=len(raw) // _BYTES_PER_TOKEN, max_tokens=int(max_tokens),
                        ttft_budget_ms=budget)


def _inference(gateway: Gateway, endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
    router = gateway.router

    async def handle(request: Request) -> Response:
        try:
            raw = await request.body()
            body = parse_body(endpoint, raw)
            model = body["model"]
            route = router.route(model)
            if not _allowed(request.scope.get(CLIENT_KEY), model):
                raise PermissionDenied(f"This API key may not use the model `{model}`.", param="model")
            facts = _facts(request, raw, body, route)
            backend_request = BackendRequest(
                endpoint=endpoint,
                body=body,
                request_id=request.scope[REQUEST_ID_KEY],
                stream=bool(body.get("stream")) and endpoint != "embeddings",
                session=request.headers.get("x-interlock-session"),
            )
            if backend_request.stream:
                opened = await router.stream(route, backend_request, facts)
                return StreamingResponse(
                    _relay(opened.first, opened.rest, backend_request.request_id),
                    media_type="text/event-stream",
                    headers={**_SSE_HEADERS, **_route_headers(opened.target, opened.reason)},
                )
            served = await router.complete(route, backend_request, facts)
        except InterlockError as exc:
            return _error(exc)
        headers = _route_headers(served.target, served.reason)
        if served.reply.usage is not None:
            headers["x-interlock-cost-usd"] = f"{served.target.cost_usd(served.reply.usage):.8f}"
        return Response(served.reply.body, 200, headers, "application/json")

    return handle


def _route_headers(target: Target, reason: str) -> dict[str, str]:
    return {"x-interlock-backend": target.name, "x-interlock-route-reason": _header_safe(reason)}


def _header_safe(text: str) -> str:
    return text.encode("ascii", "replace").decode().replace("\r", " ").replace("\n", " ")[:300]


async def _relay(first: bytes, rest: AsyncIterator[bytes], request_id: str) -> AsyncIterator[bytes]:
    """Pass SSE bytes through untouched; a failure after the first byte becomes an error event,
    never a quiet end that a client would take for a finished answer."""
    tail = first
    try:
        yield first
        async for chunk in rest:
            tail = chunk
            yield chunk
    except InterlockError as exc:
        log.warning("stream %s broke after its first byte: %s", request_id, exc.message)
        yield (b"" if tail.endswith(b"\n\n") else b"\n\n") + sse_error_event(exc)
    except Exception:
        log.exception("stream %s failed", request_id)
        yield (b"" if tail.endswith(b"\n\n") else b"\n\n") + sse_error_event(
            InterlockError(f"The gateway hit an internal error; quote request id {request_id}.")
        )
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


def _models(gateway: Gateway) -> tuple[Callable[[Request], Awaitable[Response]], ...]:
    def entry(name: str) -> dict[str, object]:
        return {"id": name, "object": "model", "created": gateway.started_at, "owned_by": "interlock"}

    async def list_models(request: Request) -> Response:
        key = request.scope.get(CLIENT_KEY)
        data = [entry(name) for name in gateway.config.models if _allowed(key, name)]
        return _json({"object": "list", "data": data})

    async def get_model(request: Request) -> Response:
        name = request.path_params["model"]
        if name not in gateway.config.models:
            return _error(ModelNotFound(name))
        if not _allowed(request.scope.get(CLIENT_KEY), name):
            return _error(PermissionDenied(f"This API key may not use the model `{name}`.", param="model"))
        return _json(entry(name))

    return list_models, get_model


def _health(gateway: Gateway) -> tuple[Callable[[Request], Awaitable[Response]], ...]:
    async def live(_: Request) -> Response:
        return Response(b'{"status":"ok"}', 200, media_type="application/json")

    async def ready(_: Request) -> Response:
        if gateway.draining:
            return _json({"status": "shutting down"}, 503)
        problems = await gateway.health.problems(gateway.router.routes)
        if problems:
            return _json({"status": "not ready", "routes": problems}, 503)
        return _json({"status": "ready"})

    return live, ready


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        # Starlette's exception carries the route's ``Allow`` header, which a 405 must send
        return _error(MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}."),
                      {k: v for k, v in (exc.headers or {}).items() if k.lower() == "allow"})
    return _error(NotFound(f"Unknown path {request.url.path}. The gateway serves the OpenAI API under /v1/."))


def build_app(
    gateway: Gateway,
    *,
    max_body_bytes: int,
    lifespan: Callable[[Starlette], AsyncIterator[None]] | None = None,
) -> Starlette:
    list_models, get_model = _models(gateway)
    live, ready = _health(gateway)
    routes = [
        HttpRoute("/v1/chat/completions", _inference(gateway, "chat"), methods=["POST"]),
        HttpRoute("/v1/completions", _inference(gateway, "completions"), methods=["POST"]),
        HttpRoute("/v1/embeddings", _inference(gateway, "embeddings"), methods=["POST"]),
        HttpRoute("/v1/models", list_models, methods=["GET"]),
        HttpRoute("/v1/models/{model:path}", get_model, methods=["GET"]),
        HttpRoute("/health/live", live, methods=["GET"]),
        HttpRoute("/health/ready", ready, methods=["GET"]),
        HttpRoute("/admin/routes", admin_routes(gateway.router), methods=["GET"]),
    ]
    middleware = [
        Middleware(RequestContext),
        Middleware(ClientAuth, keys=gateway.config.auth.keys),
        Middleware(BodyLimit, max_bytes=max_body_bytes),
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_error, InterlockError: _interlock_error},
        lifespan=asynccontextmanager(lifespan) if lifespan else None,
    )
    app.state.gateway = gateway
    return app


async def _interlock_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, InterlockError)
    return _error(exc)
