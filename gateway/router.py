"""Model name → route → candidate backends, tried in order until one answers.

This is the seam later work extends: a policy ranks the candidates, breakers
skip open circuits, retries and hedging wrap the attempt. A failure is only
retried elsewhere while nothing has reached the client: for streams, until the
first bytes are in hand.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from backends.base import Backend, BackendRequest, BackendResponse
from backends.errors import BackendUnavailable, InterlockError
from gateway.errors import ModelNotFound

log = logging.getLogger("interlock.router")


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    targets: tuple[Backend, ...]
    fallback: tuple[Backend, ...]
    policy: str = "ordered"

    def candidates(self) -> tuple[Backend, ...]:
        return self.targets + self.fallback


@dataclass(slots=True)
class Opened:
    """A stream whose first bytes have arrived: from here on nothing can be retried."""

    backend: Backend
    first: bytes
    rest: AsyncIterator[bytes]


class Router:
    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes

    def route(self, model: str) -> Route:
        route = self.routes.get(model)
        if route is None:
            raise ModelNotFound(model)
        return route

    async def _ready(self, route: Route) -> list[Backend]:
        ready = []
        for backend in route.candidates():
            health = await backend.health()
            if health.ok:
                ready.append(backend)
        if not ready:
            raise BackendUnavailable(f"no backend of model {route.name!r} is ready", status=503,
                                     retry_after=1)
        return ready

    async def complete(self, route: Route, request: BackendRequest) -> tuple[Backend, BackendResponse]:
        last: InterlockError | None = None
        for backend in await self._ready(route):
            try:
                return backend, await backend.complete(request)
            except InterlockError as exc:
                if not exc.retryable:
                    raise
                log.warning("backend %s failed for %s: %s", backend.name, request.request_id, exc.message)
                last = exc
        assert last is not None
        raise last

    async def stream(self, route: Route, request: BackendRequest) -> Opened:
        last: InterlockError | None = None
        for backend in await self._ready(route):
            try:
                chunks = await backend.stream(request)
            except InterlockError as exc:
                if not exc.retryable:
                    raise
                log.warning("backend %s failed for %s: %s", backend.name, request.request_id, exc.message)
                last = exc
                continue
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                last = BackendUnavailable(f"backend {backend.name!r} sent an empty stream")
                continue
            except InterlockError as exc:
                await chunks.aclose()  # type: ignore[attr-defined]
                if not exc.retryable:
                    raise
                last = exc
                continue
            return Opened(backend, first, chunks)
        assert last is not None
        raise last
