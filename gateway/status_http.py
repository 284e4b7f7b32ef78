"""``GET /status`` (the page, ``gateway.status_page``) and ``GET /status.json`` (its data).

Both answer under ``/admin/``'s rule (``ClientAuth``, as ``/metrics``): an admin key when keys
are configured, else loopback clients only. A browser cannot send a bearer token by itself, so
HTTP Basic credentials are taken too, the password being the key (the user name is ignored),
and a 401 asks the browser for them.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.metrics_edge import AsAdmin
from gateway.middleware import ClientAuth
from gateway.snapshot import KeyTable
from gateway.status import StatusReport
from gateway.status_page import SCRIPT_SHA256, render_html

_PAGE_HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (
        b"content-security-policy",
        f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{SCRIPT_SHA256}'; "
        "connect-src 'self'; frame-ancestors 'none'".encode(),
    ),
]
_JSON_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
_ASK_FOR_KEY = (b"www-authenticate", b'Basic realm="Interlock status (password: an admin key)"')


def status_endpoints(report: StatusReport, keys: Callable[[], KeyTable]) -> tuple[ASGIApp, ASGIApp]:
    """(``GET /status``, ``GET /status.json``), each under ``/admin/``'s rule."""

    async def page(scope: Scope, receive: Receive, send: Send) -> None:
        body = render_html(report.data()).encode()
        await send({"type": "http.response.start", "status": 200, "headers": _PAGE_HEADERS})
        await send({"type": "http.response.body", "body": body})

    async def data(scope: Scope, receive: Receive, send: Send) -> None:
        body = orjson.dumps(report.data())
        await send({"type": "http.response.start", "status": 200, "headers": _JSON_HEADERS})
        await send({"type": "http.response.body", "body": body})

    def guarded(app: ASGIApp) -> ASGIApp:
        return BasicAsBearer(AsAdmin(ClientAuth(app, keys)))

    return guarded(page), guarded(data)


class BasicAsBearer:
    """Takes HTTP Basic credentials as a bearer key (the password; a browser can send those),
    and asks for them on a 401."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = []
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:6].lower() == b"basic ":
                try:
                    _, _, password = base64.b64decode(value[6:].strip(), validate=True).partition(b":")
                except (binascii.Error, ValueError):
                    password = b""
                value = b"Bearer " + password
            headers.append((name, value))

        async def asking(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 401:
                message["headers"] = [*message.get("headers", ()), _ASK_FOR_KEY]
            await send(message)

        await self._app({**scope, "headers": headers}, receive, asking)
