"""The HTTP surface: one explicit route table and the middleware list.

The inference endpoints are plain ASGI (``gateway.inference``, over ``gateway.serving``);
models, health and admin are Starlette handlers. Every handler reads the snapshot in
force through the ``Gateway`` (``gateway.state``), never a copy taken at build time, and
renders errors through ``gateway.errors``. Nothing here reads the environment.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import orjson
from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as HttpRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from backends.base import Endpoint
from backends.errors import InterlockError
from gateway.access_log import AccessLog
from gateway.admin import admin_routes
from gateway.errors import (
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    PermissionDenied,
    client_status,
    error_body,
    error_headers,
)
from gateway.inference import HotPaths, Inference
from gateway.metrics import Metrics
from gateway.metrics_workers import WorkerMetrics
from gateway.middleware import CLIENT_KEY, BodyLimit, ClientAuth, RequestContext
from gateway.reload import Reloader
from gateway.reload_http import ConfigHashHeader, admin_config, admin_reload
from gateway.serving import Serving
from gateway.snapshot import may_use
from gateway.state import Gateway
from gateway.status import StatusRecorder, StatusReport
from gateway.status_http import status_endpoints
from gateway.tracing import Tracing

log = logging.getLogger("interlock.app")


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type="application/json")


def _error(exc: InterlockError, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(exc), client_status(exc), {**error_headers(exc), **(headers or {})})


def _models(gateway: Gateway) -> tuple[Callable[[Request], Awaitable[Response]], ...]:
    def entry(name: str) -> dict[str, object]:
        return {"id": name, "object": "model", "created": gateway.started_at, "owned_by": "interlock"}

    async def list_models(request: Request) -> Response:
        key = request.scope.get(CLIENT_KEY)
        data = [entry(name) for name in gateway.snapshot.routes if may_use(key, name)]
        return _json({"object": "list", "data": data})

    async def get_model(request: Request) -> Response:
        name = request.path_params["model"]
        if name not in gateway.snapshot.routes:
            return _error(ModelNotFound(name))
        if not may_use(request.scope.get(CLIENT_KEY), name):
            return _error(PermissionDenied(f"This API key may not use the model `{name}`.", param="model"))
        return _json(entry(name))

    return list_models, get_model


def _health(gateway: Gateway) -> tuple[Callable[[Request], Awaitable[Response]], ...]:
    async def live(_: Request) -> Response:
        # Only what a restart would cure fails liveness: an in-process engine whose thread died.
        dead = {name: fault for name, backend in gateway.backends.items() if (fault := backend.fatal())}
        if dead:
            return _json({"status": "dead", "backends": dead}, 503)
        return Response(b'{"status":"ok"}', 200, media_type="application/json")

    async def ready(_: Request) -> Response:
        if gateway.draining:
            return _json({"status": "shutting down"}, 503)
        ok, models = gateway.health.readiness(gateway.snapshot.routes)
        body: dict[str, object] = {"status": "ready" if ok else "not ready", "models": models}
        if gateway.cache is not None:
            # Redis is an optimisation: a degraded cache is said, never a reason to be unready
            body["cache"] = gateway.cache.status()
        return _json(body, 200 if ok else 503)

    return live, ready


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        # Starlette's exception carries the route's ``Allow`` header, which a 405 must send
        return _error(
            MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}."),
            {k: v for k, v in (exc.headers or {}).items() if k.lower() == "allow"},
        )
    return _error(NotFound(f"Unknown path {request.url.path}. The gateway serves the OpenAI API under /v1/."))


class GatewayApp:
    """The ASGI app uvicorn runs: the edge middleware, the hot paths, then Starlette for the rest."""

    def __init__(self, asgi: ASGIApp, gateway: Gateway) -> None:
        self._asgi = asgi
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._asgi(scope, receive, send)


def build_app(
    gateway: Gateway,
    *,
    max_body_bytes: int,
    lifespan: Callable[[Starlette], AsyncIterator[None]] | None = None,
    reloader: Reloader | None = None,
    metrics: bool = True,
    access_log: AccessLog | None = None,
    tracing: Tracing | None = None,
    status_page: bool = True,
    worker_metrics: WorkerMetrics | None = None,
) -> GatewayApp:
    list_models, get_model = _models(gateway)
    live, ready = _health(gateway)
    serving = Serving(gateway, tracing)
    endpoints: tuple[tuple[str, Endpoint], ...] = (
        ("/v1/chat/completions", "chat"),
        ("/v1/completions", "completions"),
        ("/v1/embeddings", "embeddings"),
    )
    observed = Metrics(gateway, access_log, reloader=reloader) if metrics else None
    hot: dict[tuple[str, str], ASGIApp] = {
        ("POST", path): Inference(serving, endpoint, observed.finish if observed is not None else None)
        for path, endpoint in endpoints
    }
    if observed is not None:
        gateway.router.listeners.append(observed)
        if worker_metrics is not None:
            observed.workers = worker_metrics
            worker_metrics.local = lambda: generate_latest(observed.registry)
    if tracing is not None:
        # outside the metrics: the access log line (written as the request ends) has the trace id
        gateway.router.listeners.append(tracing)
        hot = {key: tracing.trace(app) for key, app in hot.items()}
    routes = [
        # The inference paths are served by ``hot`` before Starlette sees them; these entries
        # only make Starlette answer other methods on them with 405 rather than 404.
        *(HttpRoute(path, _unreachable, methods=[method]) for method, path in hot),
        HttpRoute("/v1/models", list_models, methods=["GET"]),
        HttpRoute("/v1/models/{model:path}", get_model, methods=["GET"]),
        HttpRoute("/health/live", live, methods=["GET"]),
        HttpRoute("/health/ready", ready, methods=["GET"]),
        HttpRoute("/admin/routes", admin_routes(gateway), methods=["GET"]),
    ]
    if observed is not None:
        # /admin/'s rule: an admin key when keys are configured, else loopback clients only
        scrape = observed.endpoint(lambda: gateway.snapshot.keys)
        routes.append(HttpRoute("/metrics", scrape, methods=["GET"]))
    if status_page:
        # GET /status and /status.json, under /admin/'s rule; fed by one more attempt listener
        # and, when metrics observe the edge, a request listener
        recorder = StatusRecorder()
        gateway.router.listeners.append(recorder)
        if observed is not None:
            observed.request_listeners.append(recorder)
        report = StatusReport(gateway, recorder, reloader=reloader, metrics=observed is not None)
        page, data = status_endpoints(report, lambda: gateway.snapshot.keys)
        routes.append(HttpRoute("/status", page, methods=["GET"]))
        routes.append(HttpRoute("/status.json", data, methods=["GET"]))
    if reloader is not None:
        routes += [
            HttpRoute("/admin/reload", admin_reload(reloader), methods=["POST"]),
            HttpRoute("/admin/config", admin_config(reloader), methods=["GET"]),
        ]
    rest = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error, InterlockError: _interlock_error},
        lifespan=asynccontextmanager(lifespan) if lifespan else None,
    )
    # Plain ASGI layers, outermost first: request id (and last-resort 500), client keys, body limit.
    asgi: ASGIApp = HotPaths(hot, ConfigHashHeader(rest, gateway))
    asgi = BodyLimit(asgi, max_bytes=max_body_bytes)
    asgi = ClientAuth(asgi, keys=lambda: gateway.snapshot.keys)
    asgi = RequestContext(asgi)
    return GatewayApp(asgi, gateway)


async def _unreachable(_: Request) -> Response:
    raise AssertionError("the hot paths answer these routes")


async def _interlock_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, InterlockError)
    return _error(exc)
