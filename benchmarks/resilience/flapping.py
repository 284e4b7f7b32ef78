"""A backend that flaps: up for a second, down for a second, with and without a fallback.

What a route does when every candidate's circuit is open. Before, the default breaker kept a
flapping backend's circuit open nearly all the time (its cool-down doubles on each failed
probe), so a route without a fallback refused ~99.7% of requests although the backend was up
half the time. Now the backend that reopens soonest takes a probe at once (within its probe
slots): served requests should track the time it is up. With a healthy fallback nothing
changes: requests go there while the circuit is open.

    .venv/bin/python benchmarks/resilience/flapping.py [--seconds 20] [--concurrency 32]

Prints a table and writes it to results.md beside this file.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import orjson
import uvicorn
from aiohttp import web

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from benchmarks.common import free_port, git_commit  # noqa: E402
from gateway.config import parse_config  # noqa: E402
from gateway.server import create_app  # noqa: E402
from gateway.settings import Settings  # noqa: E402

REPLY = orjson.dumps(
    {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
)


class Upstream:
    """An OpenAI-compatible upstream on loopback; ``flap_s`` > 0 alternates up and down (HTTP 500)."""

    def __init__(self, flap_s: float) -> None:
        self.flap_s, self.port = flap_s, free_port()
        self.started = time.monotonic()
        self.served = 0

    def up(self) -> bool:
        return self.flap_s <= 0 or int((time.monotonic() - self.started) / self.flap_s) % 2 == 0

    async def _chat(self, _: web.Request) -> web.Response:
        if not self.up():
            return web.json_response({"error": {"message": "down", "type": "server_error"}}, status=500)
        self.served += 1
        return web.Response(body=REPLY, content_type="application/json")

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._chat)
            app.router.add_get("/v1/models", lambda _: web.json_response({"data": []}))
            runner = web.AppRunner(app)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            ready.set()
            loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait(5)


def serve_gateway(config: dict[str, object]) -> tuple[str, uvicorn.Server]:
    port = free_port()
    uv = uvicorn.Config(
        app=None,
        host="127.0.0.1",
        port=port,
        lifespan="on",  # type: ignore[arg-type]
        log_level="error",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )
    server = uvicorn.Server(uv)
    uv.app = create_app(parse_config(config, "<flapping>"), Settings(port=port), server)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{port}", server


async def load(url: str, seconds: float, concurrency: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            response = await http.post("/v1/chat/completions", json=body)
            if response.status_code == 200:
                seen["served by " + response.headers["x-interlock-backend"]] += 1
            else:
                seen[f"HTTP {response.status_code}"] += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return seen


def scenario(fallback: bool, seconds: float, concurrency: int) -> tuple[str, Counter[str]]:
    flapping, spare = Upstream(flap_s=1.0), Upstream(flap_s=0)
    flapping.start()
    spare.start()
    backends = {
        "flapping": {"kind": "openai", "base_url": f"http://127.0.0.1:{flapping.port}/v1"},
        "spare": {"kind": "openai", "base_url": f"http://127.0.0.1:{spare.port}/v1"},
    }
    route: dict[str, object] = {"targets": ["flapping"]}
    if fallback:
        route["fallback"] = ["spare"]
    url, server = serve_gateway({"backends": backends, "models": {"m": route}})
    try:
        seen = asyncio.run(load(url, seconds, concurrency))
    finally:
        server.should_exit = True
    return ("with a healthy fallback" if fallback else "no fallback"), seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rows = [scenario(fallback, args.seconds, args.concurrency) for fallback in (False, True)]
    commit = git_commit(short=True)
    lines = [
        "# A flapping backend (1 s up, 1 s down: HTTP 500), default breaker and retries",
        "",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, commit {commit}, {args.seconds:g} s per "
        f"scenario, {args.concurrency} concurrent clients",
        f"- command: `.venv/bin/python benchmarks/resilience/flapping.py --seconds {args.seconds:g} "
        f"--concurrency {args.concurrency}`",
        "",
        "| scenario | requests | served by the flapping backend | served by the fallback "
        "| refused or failed |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, seen in rows:
        total = sum(seen.values())
        flap, spare = seen["served by flapping"], seen["served by spare"]
        failed = total - flap - spare
        lines.append(
            f"| {name} | {total:,} | {flap / total:.1%} | {spare / total:.1%} | {failed / total:.1%} |"
        )
    lines += [
        "",
        "Failures by status: "
        + "; ".join(
            f"{name}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(seen.items()) if k.startswith("HTTP"))
            for name, seen in rows
        ),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / "results.md").write_text(text)


if __name__ == "__main__":
    main()
