"""CPU per request that metrics and the access log add, measured in process (no sockets).

The real app (``gateway.app.build_app``: middleware, parsing, routing, the edge) is called as
ASGI with an in-process backend (``tests.fakes.FakeBackend``), so what is timed is the gateway's
own Python per request; uvicorn's HTTP parsing and the upstream hop, which a real request adds,
would only make the share smaller. Three variants, interleaved over several rounds (the fastest
round of each counts: on a shared machine other processes only ever add time):
metrics off, metrics on, metrics and access log on (to a file in a temporary folder; the writer
thread's CPU is counted too: ``time.process_time`` covers every thread). Run from the repository
root::

    .venv/bin/python benchmarks/metrics/hot_path.py [--requests 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import orjson  # noqa: E402

from gateway.access_log import AccessLog  # noqa: E402
from gateway.app import build_app  # noqa: E402
from gateway.config import parse_config  # noqa: E402
from gateway.health import HealthMonitor  # noqa: E402
from gateway.router import Router  # noqa: E402
from gateway.snapshot import build_snapshot  # noqa: E402
from gateway.state import Gateway  # noqa: E402
from tests.fakes import FakeBackend  # noqa: E402

MESSAGES = [{"role": "user", "content": "Say hello."}]


def make_app(metrics: bool, access_log: AccessLog | None) -> Any:
    config = parse_config({"backends": {"a": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
                           "models": {"chat": {"targets": ["a"]}},
                           "resilience": {"health_check": {"interval_s": 0}}}, "<bench>")
    snapshot = build_snapshot(config, {"a": FakeBackend("a")})
    gateway = Gateway(snapshot=snapshot, router=Router(),
                      health=HealthMonitor(lambda: snapshot.targets.values(), interval_s=0, timeout_s=1))
    return build_app(gateway, max_body_bytes=1 << 20, metrics=metrics, access_log=access_log)


async def drive(app: Any, body: bytes, n: int) -> float:
    """CPU seconds per request over ``n`` sequential requests."""
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "client": ("127.0.0.1", 1),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "asgi": {"spec_version": "2.3"}}
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        log = AccessLog(str(Path(folder) / "access.log"))
        log.start()
        variants = {"metrics off": make_app(False, None), "metrics on": make_app(True, None),
                    "metrics + access log": make_app(True, log)}
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
                print(f"  {name:22s} {us:7.1f} us  (+{us - base * 1e6:5.1f} us, {us / (base * 1e6) - 1:+.1%})")
        log.stop()


if __name__ == "__main__":
    main()
