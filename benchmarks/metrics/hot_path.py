"""CPU per request that metrics and the access log add, measured in process (no sockets).

First the hook alone: a stand-in endpoint doing only what the edge does around metrics (an
``Attempt`` reported to the router's listeners, the reply's two ASGI messages), bare, then wrapped
by ``Metrics.observe`` with the metrics listener added, then with the access log on too (its
writer thread's CPU counted: ``time.process_time`` covers every thread, and the queue is drained
inside the timing). Then the whole app (``gateway.app.build_app``: middleware, parsing, routing,
the edge) called as ASGI with an in-process backend (``CannedBackend``): the gateway's
own Python per request; uvicorn's HTTP parsing and the upstream hop, which a real request adds,
only make the share smaller. Variants are interleaved over rounds and the fastest round of each
counts (on a shared machine other processes only ever add time). Run from the repository root::

    .venv/bin/python benchmarks/metrics/hot_path.py [--requests 20000] [--rounds 5] [--hook-only]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import orjson

from backends.base import BackendRequest, BackendResponse, Health, Load, Usage
from gateway.access_log import AccessLog
from gateway.app import build_app
from gateway.attempts import Attempt
from gateway.config import parse_config
from gateway.health import HealthMonitor
from gateway.inference import CLIENT_REQUEST_KEY
from gateway.metrics import Metrics
from gateway.router import Router
from gateway.serving import ClientRequest
from gateway.snapshot import build_snapshot
from gateway.state import Gateway

MESSAGES = [{"role": "user", "content": "Say hello."}]
_REPLY = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "bench",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hello there."}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }
)


def _chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    event = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "bench"}
    return b"data: " + orjson.dumps({**event, "choices": [choice]}) + b"\n\n"


_EVENTS = (
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": "Hello"}),
    _chunk({"content": " there."}),
    _chunk({}, "stop"),
    b"data: [DONE]\n\n",
)


async def _events() -> AsyncIterator[bytes]:
    for event in _EVENTS:
        yield event


class CannedBackend:
    """A ``backends.base.Backend`` in process that answers every request with one canned reply."""

    kind = "canned"

    def __init__(self, name: str) -> None:
        self.name = name
        self._load = Load()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def complete(self, request: BackendRequest) -> BackendResponse:
        return BackendResponse(_REPLY, Usage(5, 3))

    async def stream(self, request: BackendRequest) -> AsyncIterator[bytes]:
        return _events()

    async def health(self) -> Health:
        return Health(True)

    def load(self) -> Load:
        return self._load

    def fatal(self) -> str | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {}


def make_app(metrics: bool, access_log: AccessLog | None) -> Any:
    config = parse_config(
        {
            "backends": {"a": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
            "models": {"chat": {"targets": ["a"]}},
            "resilience": {"health_check": {"interval_s": 0}},
        },
        "<bench>",
    )
    snapshot = build_snapshot(config, {"a": CannedBackend("a")})
    gateway = Gateway(
        snapshot=snapshot,
        router=Router(),
        health=HealthMonitor(lambda: snapshot.targets.values(), interval_s=0, timeout_s=1),
    )
    return build_app(gateway, max_body_bytes=1 << 20, metrics=metrics, access_log=access_log)


async def drive(app: Any, body: bytes, n: int) -> float:
    """CPU seconds per request over ``n`` sequential requests."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "client": ("127.0.0.1", 1),
        "headers": headers,
        "asgi": {"spec_version": "2.3"},
    }
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def one() -> None:
        read = False

        async def receive() -> dict[str, Any]:
            nonlocal read
            if read:  # the client stays: whoever listens for a disconnect waits until cancelled
                await never
            read = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            return None

        await app(dict(scope), receive, send)

    for _ in range(200):  # warm: label children, caches
        await one()
    start = time.process_time()
    for _ in range(n):
        await one()
    return (time.process_time() - start) / n


def hook_alone(n: int, rounds: int, folder: str) -> None:
    """CPU per request of the stand-in endpoint, bare / observed / observed and logged."""
    variants: dict[str, tuple[Any, Any, AccessLog | None]] = {}
    for name, metrics, logged in (
        ("bare", False, False),
        ("metrics", True, False),
        ("metrics + access log", True, True),
    ):
        access = AccessLog(str(Path(folder) / f"hook-{len(variants)}.log")) if logged else None
        app = make_app(metrics, access)
        gateway = app.gateway
        target = gateway.snapshot.targets["a"]
        listeners = gateway.router.listeners
        request = ClientRequest(
            endpoint="chat", body={"model": "chat", "messages": MESSAGES}, size=60, request_id="r"
        )
        reply = orjson.dumps(
            {
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 5},
            }
        )
        headers = [
            (b"content-type", b"application/json"),
            (b"x-interlock-backend", b"a"),
            (b"x-interlock-route-reason", b"only target"),
        ]

        async def endpoint(
            scope: Any,
            receive: Any,
            send: Any,
            target: Any = target,
            listeners: Any = listeners,
            request: Any = request,
            reply: bytes = reply,
            headers: Any = headers,
        ) -> None:
            scope[CLIENT_REQUEST_KEY] = request
            attempt = Attempt(target, 15, time.monotonic, listeners)
            attempt.finish(Usage(5, 3))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": reply})

        observed = [m for m in listeners if isinstance(m, Metrics)]
        variants[name] = (observed[0].observe(endpoint) if observed else endpoint, request, access)

    async def drive_hook(app: Any, access: AccessLog | None) -> float:
        async def send(_: Any) -> None:
            return None

        start = time.process_time()
        for _ in range(n):
            await app({"interlock.request_id": "r"}, None, send)
        if access is not None:
            access.stop()  # the writer's work is part of the cost
        return (time.process_time() - start) / n

    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (app, _, access) in variants.items():
            if access is not None:
                access.start()
            results[name].append(asyncio.run(drive_hook(app, access)))
    base = min(results["bare"])
    print(f"\nthe hook alone: CPU per request, best of {rounds} rounds of {n}")
    for name, values in results.items():
        us = min(values) * 1e6
        print(f"  {name:22s} {us:7.2f} us  (+{us - base * 1e6:5.2f} us)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hook-only", action="store_true", help="skip the whole-app runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        hook_alone(args.requests, args.rounds, folder)
        if args.hook_only:
            return
        log = AccessLog(str(Path(folder) / "access.log"))
        log.start()
        variants = {
            "metrics off": make_app(False, None),
            "metrics on": make_app(True, None),
            "metrics + access log": make_app(True, log),
        }
        for workload, stream in (("json", False), ("stream", True)):
            body = orjson.dumps({"model": "chat", "messages": MESSAGES, "stream": stream})
            results: dict[str, list[float]] = {name: [] for name in variants}
            for round_ in range(args.rounds):
                order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
                for name in order:
                    results[name].append(asyncio.run(drive(variants[name], body, args.requests)))
            base = min(results["metrics off"])
            print(f"\n{workload}: CPU per request, best of {args.rounds} rounds of {args.requests}")
            for name, values in results.items():
                us = min(values) * 1e6
                share = us / (base * 1e6) - 1
                print(f"  {name:22s} {us:7.1f} us  (+{us - base * 1e6:5.1f} us, {share:+.1%})")
        log.stop()


if __name__ == "__main__":
    main()
