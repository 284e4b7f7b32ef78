"""The reloader over HTTP: ``POST /admin/reload``, ``GET /admin/config``, and the config hash
(``x-interlock-config-hash``) on every ``/admin/`` reply.

``POST /admin/reload`` (``?dry_run=1``: validate only) answers the ``ReloadResult``; a file that
is invalid or could not be put in force is an OpenAI-shaped error with the result beside it.
``GET /admin/config`` shows the config in force, the last reload and the watcher's state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backends.errors import InterlockError
from gateway.errors import client_status, error_body, error_headers
from gateway.reload import Reloader
from gateway.state import Gateway


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status, media_type="application/json")


def admin_reload(reloader: Reloader) -> Callable[[Request], Awaitable[Response]]:
    async def handle(request: Request) -> Response:
        dry_run = request.query_params.get("dry_run", "0").lower() in ("1", "true", "yes")
        try:
            result = await reloader.reload(dry_run=dry_run)
        except InterlockError as exc:
            return Response(error_body(exc), client_status(exc), error_headers(exc))
        error = result.error()
        if error is None:
            return _json(result.to_dict())
        body = {"error": error.to_dict(), "reload": result.to_dict()}
        return Response(orjson.dumps(body), client_status(error), error_headers(error))

    return handle


def admin_config(reloader: Reloader) -> Callable[[Request], Awaitable[Response]]:
    async def handle(_: Request) -> Response:
        snapshot, last = reloader.gateway.snapshot, reloader.last_result
        return _json(
            {
                "hash": snapshot.hash,
                "source": snapshot.config.source,
                "loaded_at": snapshot.loaded_at,
                "last_reload": last.to_dict() if last else None,
                "last_error": reloader.last_error,
                "last_attempt_at": reloader.last_attempt_at,
                "results": dict(reloader.results),
                "watching": reloader.watching,
                "polls": reloader.polls,
                "draining": [target.name for target in reloader.draining],
                "peers": reloader.peers.view() if reloader.peers is not None else None,
            }
        )

    return handle


class ConfigHashHeader:
    """Adds ``x-interlock-config-hash`` (the snapshot in force as the reply starts) to /admin/ replies."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/admin/"):
            await self.app(scope, receive, send)
            return

        async def send_with_hash(message: Message) -> None:
            if message["type"] == "http.response.start":
                header = (b"x-interlock-config-hash", self.gateway.snapshot.hash.encode())
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_hash)
