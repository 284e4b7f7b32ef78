"""The thinnest useful pass-through, as a yardstick for the gateway: Starlette + uvicorn
(uvloop, httptools) + one shared aiohttp session, no validation, no routing.

DESIGN.md's bar ("the thinnest possible starlette+aiohttp pass-through does ~5,700 RPS")
was measured with a program like this one; running it beside the gateway in the same
benchmark run turns an absolute target on a noisy machine into a ratio.

A POST to ``/v1/chat/completions`` or ``/sse/v1/chat/completions`` goes to the same path on
UPSTREAM (``http://host:port``). A JSON reply is read whole and sent on; an SSE reply
(``text/event-stream``) is relayed as bytes, each read from upstream written as it comes,
without parsing its events.

    python thin_proxy.py UPSTREAM PORT
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

UPSTREAM = sys.argv[1].rstrip("/")
session: aiohttp.ClientSession | None = None


async def relay(request: Request) -> Response:
    assert session is not None
    upstream = await session.post(
        UPSTREAM + request.scope["path"],
        data=await request.body(),
        headers={"content-type": "application/json"},
    )
    if upstream.content_type == "text/event-stream":
        return StreamingResponse(relay_bytes(upstream), upstream.status, media_type="text/event-stream")
    async with upstream:
        body = await upstream.read()
    return Response(body, upstream.status, media_type="application/json")


async def relay_bytes(upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    async with upstream:
        async for data in upstream.content.iter_any():
            yield data


@asynccontextmanager
async def lifespan(_: Starlette) -> AsyncIterator[None]:
    global session
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await session.close()


app = Starlette(
    routes=[
        Route(path, relay, methods=["POST"]) for path in ("/v1/chat/completions", "/sse/v1/chat/completions")
    ],
    lifespan=lifespan,
)

if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[2]),
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )
