"""Plain ASGI middleware: request ids, body limits and client keys.

Plain ASGI (not ``BaseHTTPMiddleware``) so streamed bytes pass through untouched
and each layer costs one call per message.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import re
from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import (
    AuthenticationFailed,
    InterlockError,
    PermissionDenied,
    RequestTooLarge,
    client_status,
    error_body,
    error_headers,
)
from gateway.snapshot import KeyTable

log = logging.getLogger("interlock.http")

_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
REQUEST_ID_KEY = "interlock.request_id"
CLIENT_KEY = "interlock.client_key"
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)  # a forked worker must not repeat its parent's ids


async def send_error(send: Send, exc: InterlockError, request_id: bytes | None = None) -> None:
    headers = [(k.encode(), v.encode()) for k, v in error_headers(exc).items()]
    if request_id:
        headers.append((b"x-request-id", request_id))
    await send({"type": "http.response.start", "status": client_status(exc), "headers": headers})
    await send({"type": "http.response.body", "body": error_body(exc)})


class RequestContext:
    """Gives every request an id (the client's, if it sent a sane one), echoes it on the response,
    and turns anything unexpected into a 500 that shows no stack trace."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                if _REQUEST_ID.match(value):
                    request_id = value
                break
        if request_id is None:
            # an identifier, not a secret: the process's seeded PRNG, no system call per request
            request_id = b"req_%024x" % _ids.getrandbits(96)
        scope[REQUEST_ID_KEY] = request_id.decode()
        started = False

        # A plain function handing back send's awaitable: no coroutine of its own per message,
        # which a stream of many chunks would pay for each one.
        def send_with_id(message: Message) -> Awaitable[None]:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            return send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in request %s", request_id.decode())
            if not started:
                await send_error(
                    send,
                    InterlockError(
                        f"The gateway hit an internal error; quote request id {request_id.decode()}."
                    ),
                    request_id,
                )


class BodyLimit:
    """Refuses bodies over ``max_bytes`` with 413, by Content-Length up front or by counting."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if value.isdigit():
                    if int(value) > self.max_bytes:
                        await send_error(send, self._too_large())
                        return
                    # the parser delivers no more than Content-Length says: nothing to count
                    await self.app(scope, receive, send)
                    return
                break
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, counting_receive, send)

    def _too_large(self) -> RequestTooLarge:
        return RequestTooLarge(
            f"The request body is larger than the gateway's limit of {self.max_bytes} bytes."
        )


class ClientAuth:
    """Checks ``Authorization: Bearer <key>`` on ``/v1/`` against the snapshot's keys (SHA-256,
    constant time); ``keys`` returns the table in force, so a reload changes keys at once.

    With no keys configured it lets everything through; the server refuses to bind
    anywhere but loopback in that case unless told otherwise.
    """

    def __init__(self, app: ASGIApp, keys: Callable[[], KeyTable]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        keys = self.keys()
        admin = scope["path"].startswith("/admin/")
        if admin and not keys:
            # No keys: the admin view is for this machine only, even when --allow-unauthenticated
            # opened the API to the network.
            client = scope.get("client")
            if not (client and _loopback(client[0])):
                await send_error(
                    send,
                    PermissionDenied(
                        "/admin/ answers loopback clients only when no client keys are configured.",
                        code="admin_only",
                    ),
                )
                return
        if not keys or not (admin or scope["path"].startswith("/v1/")):
            await self.app(scope, receive, send)
            return
        token = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    token = b""
                break
        key = keys.match(token.strip())
        if key is None:
            message = (
                "Missing API key: send 'Authorization: Bearer <key>'."
                if not token
                else "Incorrect API key provided."
            )
            await send_error(send, AuthenticationFailed(message))
            return
        if admin and not key.admin:
            await send_error(
                send,
                PermissionDenied(
                    "This API key may not read /admin/; set admin: true on it in auth.keys.",
                    code="admin_only",
                ),
            )
            return
        scope[CLIENT_KEY] = key
        await self.app(scope, receive, send)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
