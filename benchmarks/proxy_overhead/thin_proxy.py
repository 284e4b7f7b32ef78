"""The thinnest useful pass-through, as a yardstick for the gateway: Starlette + uvicorn
(uvloop, httptools) + one shared aiohttp session, one route, no validation, no routing.

DESIGN.md's bar ("the thinnest possible starlette+aiohttp pass-through does ~5,700 RPS")
was measured with a program like this one; running it beside the gateway in the same
benchmark run turns an absolute target on a noisy machine into a ratio.

    python thin_proxy.py UPSTREAM_URL PORT
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

UPSTREAM = sys.argv[1]
session: aiohttp.ClientSession | None = None


async def relay(request: Request) -> Response:
    assert session is not None
    async with session.post(UPSTREAM, data=await request.body(),
                            headers={"content-type": "application/json"}) as upstream:
        body = await upstream.read()
    return Response(body, upstream.status, media_type="application/json")


@asynccontextmanager
async def lifespan(_: Starlette) -> AsyncIterator[None]:
    global session
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await session.close()


app = Starlette(routes=[Route("/v1/chat/completions", relay, methods=["POST"])], lifespan=lifespan)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), loop="uvloop", http="httptools",
                access_log=False, log_level="warning")
