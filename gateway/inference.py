"""The three inference endpoints as plain ASGI: the hot path.

Every request to ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``
comes through here without Starlette's routing, Request/Response objects or
exception middleware (about a third of the gateway's own CPU per request on the
2-core benchmark machine). Parse, route, call, reply; streams still go out through
Starlette's ``StreamingResponse``, which listens for the client leaving.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from backends.base import BackendRequest, Endpoint
from backends.errors import InterlockError, InvalidRequest
from gateway.config import ClientKey
from gateway.errors import PermissionDenied, sse_error_event
from gateway.middleware import CLIENT_KEY, REQUEST_ID_KEY, send_error
from gateway.protocol import parse_body
from gateway.router import Route, Router, Target
from gateway.shutdown import until_shutdown
from policies.base import RequestFacts

log = logging.getLogger("interlock.app")

#: a rough tokens-per-byte for JSON bodies, good enough to rank backends by prompt size
_BYTES_PER_TOKEN = 4
#: the reply budget assumed for ranking when a request sets no max_tokens
_DEFAULT_MAX_TOKENS = 256
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_JSON = (b"content-type", b"application/json")


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


def allowed(key: ClientKey | None, model: str) -> bool:
    return key is None or key.models is None or model in key.models


class Inference:
    """One inference endpoint (chat, completions or embeddings) as an ASGI app."""

    def __init__(self, router: Router, endpoint: Endpoint) -> None:
        self.router = router
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id: str = scope[REQUEST_ID_KEY]
        router = self.router
        try:
            raw = await _read_body(receive)
            body = parse_body(self.endpoint, raw)
            model = body["model"]
            route = router.route(model)
            if not allowed(scope.get(CLIENT_KEY), model):
                raise PermissionDenied(f"This API key may not use the model `{model}`.", param="model")
            headers = _interesting_headers(scope)
            facts = _facts(raw, body, route, headers.get(b"x-interlock-max-ttft-ms"))
            session = headers.get(b"x-interlock-session")
            request = BackendRequest(
                endpoint=self.endpoint,
                body=body,
                request_id=request_id,
                stream=bool(body.get("stream")) and self.endpoint != "embeddings",
                session=session.decode("latin-1") if session else None,
            )
            if request.stream:
                opened = await router.stream(route, request, facts)
                response = StreamingResponse(
                    relay(opened.first, until_shutdown(opened.rest), request_id),
                    media_type="text/event-stream",
                    headers={**_SSE_HEADERS, **route_headers(opened.target, opened.reason)},
                )
                await response(scope, receive, send)
                return
            served = await router.complete(route, request, facts)
        except ClientGone:
            return
        except InterlockError as exc:
            await send_error(send, exc)
            return
        target, usage = served.target, served.reply.usage
        out = [_JSON, *((k.encode(), v.encode()) for k, v in route_headers(target, served.reason).items())]
        if usage is not None:
            out.append((b"x-interlock-cost-usd", f"{target.cost_usd(usage):.8f}".encode()))
        await send({"type": "http.response.start", "status": 200, "headers": out})
        await send({"type": "http.response.body", "body": served.reply.body})


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body = message.get("body", b"")
    if not message.get("more_body"):
        return body  # the usual case: one message
    parts = [body]
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


_WANTED = (b"x-interlock-max-ttft-ms", b"x-interlock-session")


def _interesting_headers(scope: Scope) -> dict[bytes, bytes]:
    return {name: value for name, value in scope["headers"] if name in _WANTED}


def _facts(raw: bytes, body: dict[str, Any], route: Route, ttft_header: bytes | None) -> RequestFacts:
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or _DEFAULT_MAX_TOKENS
    budget = route.ttft_slo_ms
    if ttft_header is not None:
        try:
            budget = float(ttft_header)
        except ValueError:
            budget = -1.0
        if not 0 < budget < 3_600_000:
            raise InvalidRequest("x-interlock-max-ttft-ms must be a positive number of milliseconds",
                                 param="x-interlock-max-ttft-ms")
    return RequestFacts(prompt_tokens=len(raw) // _BYTES_PER_TOKEN, max_tokens=int(max_tokens),
                        ttft_budget_ms=budget)


def route_headers(target: Target, reason: str) -> dict[str, str]:
    return {"x-interlock-backend": target.name, "x-interlock-route-reason": _header_safe(reason)}


def _header_safe(text: str) -> str:
    return text.encode("ascii", "replace").decode().replace("\r", " ").replace("\n", " ")[:300]


async def relay(first: bytes, rest: AsyncIterator[bytes], request_id: str) -> AsyncIterator[bytes]:
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


class HotPaths:
    """Sends ``(method, path)`` pairs in ``table`` straight to their ASGI app, the rest to ``app``.

    The inference endpoints live here; everything else (models, health, admin, 404/405
    answers) stays with Starlette, where convenience matters more than microseconds.
    """

    def __init__(self, table: dict[tuple[str, str], Any], app: Any) -> None:
        self.table = table
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = self.table.get((scope["method"], scope["path"]))
            if handler is not None:
                await handler(scope, receive, send)
                return
        await self.app(scope, receive, send)
