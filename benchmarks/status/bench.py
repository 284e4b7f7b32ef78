"""The status page's costs, in process (no sockets): rendering, the hot path, and refreshing.

``render``: a gateway of 100 backends (``tests.fakes.FakeBackend``) and 100 routes (3 targets
each by the ``balanced`` policy, one fallback), with five minutes of traffic recorded into every
window (a fake clock), then ``StatusReport.data()``, ``render_html`` and the JSON body, timed.

``hot-path``: the whole app (``gateway.app.build_app``: middleware, parsing, routing, the edge,
metrics) called as ASGI with an in-process backend, CPU per request without the status page's
listeners and with them (one app, the listeners switched between rounds). Variants are
interleaved over rounds and the fastest round of each counts (on a shared machine other
processes only ever add time).

``refresh``: requests per CPU second of the same app driven by ``--concurrency`` request loops,
with and without a browser's refresh (``GET /status.json`` every 2 s, through the app) beside
them, interleaved rounds; and the CPU one refresh costs, as a share of a core every 2 s.

Run from the repository root::

    .venv/bin/python benchmarks/status/bench.py [render|hot-path|refresh|all] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import orjson

from backends.base import Usage
from gateway.app import build_app
from gateway.attempts import Attempt
from gateway.config import parse_config
from gateway.health import HealthMonitor
from gateway.metrics import Metrics
from gateway.router import Router
from gateway.snapshot import build_snapshot
from gateway.state import Gateway
from gateway.status import StatusRecorder, StatusReport
from gateway.status_page import REFRESH_MS, render_html
from tests.fakes import Clock, FakeBackend

MESSAGES = [{"role": "user", "content": "Say hello."}]


def gateway_of(backends: int, routes: int, clock: Any = time.monotonic) -> Gateway:
    names = [f"backend-{i:03d}" for i in range(backends)]
    config = parse_config(
        {
            "backends": {n: {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"} for n in names},
            "models": {
                f"route-{r:03d}": {
                    "policy": "balanced" if backends > 1 else "ordered",
                    "targets": [names[(r + k) % backends] for k in range(min(3, backends))],
                    **({"fallback": [names[(r + 3) % backends]]} if backends > 3 else {}),
                }
                for r in range(routes)
            },
            "resilience": {"health_check": {"interval_s": 0}},
        },
        "<bench>",
    )
    snapshot = build_snapshot(config, {n: FakeBackend(n) for n in names})
    return Gateway(
        snapshot=snapshot,
        router=Router(clock=clock),
        health=HealthMonitor(lambda: snapshot.targets.values(), interval_s=0, timeout_s=1, clock=clock),
    )


class _Ex:
    """The few fields of an ``Exchange`` the recorder reads."""

    failures: tuple[str, ...] = ()
    last = prev = b""
    error = None


def render(rounds: int) -> None:
    clock = Clock()
    gateway = gateway_of(100, 100, clock)
    recorder = StatusRecorder(clock)
    rng = random.Random(1)
    targets = list(gateway.snapshot.targets.values())
    routes = list(gateway.snapshot.routes)
    # five minutes of traffic: 20 requests a second over 100 backends, one in 50 failing
    for _ in range(300 * 20):
        clock.advance(0.05)
        target = rng.choice(targets)
        attempt = Attempt(target, 100, clock, [recorder])
        clock.advance(rng.uniform(0.01, 0.2))
        attempt.first_token()
        if rng.random() < 0.02:
            attempt.fail(type("Boom", (Exception,), {})())
        else:
            attempt.finish(Usage(100, rng.randint(1, 200)))
        failed = rng.random() < 0.02
        recorder.request_ended(
            _Ex(),  # type: ignore[arg-type]
            {"interlock.request_id": f"req_{rng.getrandbits(48):012x}"},
            rng.choice(routes),
            target.name,
            502 if failed else 200,
            False,
            rng.uniform(0.01, 0.5),
            None,
            None,
        )
    report = StatusReport(gateway, recorder, replica_id="bench")
    for target in targets:  # every backend started and checked, as a running gateway's are
        gateway.health._started.add(target.name)
    timings: dict[str, list[float]] = {"data()": [], "render_html": [], "page (both)": [], "json body": []}
    for _ in range(rounds):
        start = time.perf_counter()
        data = report.data()
        mid = time.perf_counter()
        page = render_html(data)
        end = time.perf_counter()
        body = orjson.dumps(report.data())
        done = time.perf_counter()
        timings["data()"].append(mid - start)
        timings["render_html"].append(end - mid)
        timings["page (both)"].append(end - start)
        timings["json body"].append(done - end)
    kib = f"page {len(page) / 1024:.0f} KiB, JSON {len(body) / 1024:.0f} KiB"
    print(f"\nrender: 100 backends, 100 routes; {kib}")
    print(f"  {'':14s} {'best':>9s} {'median':>9s}  ({rounds} rounds)")
    for name, values in timings.items():
        print(f"  {name:14s} {min(values) * 1000:7.2f}ms {statistics.median(values) * 1000:7.2f}ms")


def small_app(status: bool) -> Any:
    gateway = gateway_of(1, 1)
    return build_app(gateway, max_body_bytes=1 << 20, status_page=status)


def _scope(method: str, path: str, body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": b"",
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "scheme": "http",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "asgi": {"spec_version": "2.3"},
    }


async def call(app: Any, method: str, path: str, body: bytes = b"") -> int:
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    read = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal read
        if read:  # the client stays: whoever listens for a disconnect waits until cancelled
            await never
        read = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(_scope(method, path, body), receive, send)
    return status


def _body(stream: bool) -> bytes:
    return orjson.dumps({"model": "route-000", "messages": MESSAGES, "stream": stream})


async def cpu_per_request(app: Any, body: bytes, n: int) -> float:
    for _ in range(200):  # warm: label children, caches
        await call(app, "POST", "/v1/chat/completions", body)
    start = time.process_time()
    for _ in range(n):
        await call(app, "POST", "/v1/chat/completions", body)
    return (time.process_time() - start) / n


def hooks_alone(n: int, rounds: int) -> None:
    """CPU per call of what the recorder adds: an attempt told to its listeners with and without
    it, and the request listener's call alone."""
    gateway = gateway_of(1, 1)
    target = next(iter(gateway.snapshot.targets.values()))
    recorder = StatusRecorder()
    usage = Usage(5, 3)
    base_listeners = tuple(gateway.router.listeners)
    with_recorder = (*base_listeners, recorder)
    ex, scope = _Ex(), {"interlock.request_id": "r"}

    def attempts(listeners: tuple[Any, ...]) -> float:
        start = time.process_time()
        for _ in range(n):
            Attempt(target, 15, time.monotonic, listeners).finish(usage)
        return (time.process_time() - start) / n

    def requests_ended() -> float:
        start = time.process_time()
        for _ in range(n):
            recorder.request_ended(ex, scope, "route-000", "backend-000", 200, False, 0.01, None, None)  # type: ignore[arg-type]
        return (time.process_time() - start) / n

    without, with_it, request = [], [], []
    for _ in range(rounds):
        without.append(attempts(base_listeners))
        with_it.append(attempts(with_recorder))
        request.append(requests_ended())
    attempt_cost = (min(with_it) - min(without)) * 1e6
    print(f"\nthe hooks alone: CPU per call, best of {rounds} rounds of {n}")
    print(f"  an attempt, stats and breaker listening   {min(without) * 1e6:6.2f} us")
    print(
        f"  the same with the status recorder too     {min(with_it) * 1e6:6.2f} us  (+{attempt_cost:.2f} us)"
    )
    print(f"  the request listener's call               {min(request) * 1e6:6.2f} us")


def hot_path(requests: int, rounds: int) -> None:
    # One app, the recorder switched in and out of its listeners between rounds: two apps built
    # apart differ by more than the recorder costs (where their objects lie, what the first warmed)
    app = small_app(True)
    listeners = app.gateway.router.listeners
    recorder = next(x for x in listeners if isinstance(x, StatusRecorder))
    metrics = next(x for x in listeners if isinstance(x, Metrics))

    def switch(on: bool) -> None:
        listeners[:] = [x for x in listeners if x is not recorder] + ([recorder] if on else [])
        metrics.request_listeners[:] = [recorder] if on else []

    for workload, stream in (("json", False), ("stream", True)):
        results: dict[bool, list[float]] = {False: [], True: []}
        for round_ in range(rounds):
            for on in (False, True) if round_ % 2 == 0 else (True, False):
                switch(on)
                results[on].append(asyncio.run(cpu_per_request(app, _body(stream), requests)))
        switch(True)
        base, with_it = min(results[False]) * 1e6, min(results[True]) * 1e6
        print(f"\nhot path, {workload}: CPU per request, best of {rounds} rounds of {requests}")
        print(f"  {'without the status listeners':30s} {base:7.1f} us")
        print(
            f"  {'with them':30s} {with_it:7.1f} us  (+{with_it - base:5.2f} us, {with_it / base - 1:+.2%})"
        )


async def throughput(app: Any, seconds: float, concurrency: int, refresh: bool) -> tuple[float, int]:
    """Requests per CPU second of this process (what one saturated core would serve; other
    processes on a shared machine take wall time, not this process's CPU) over ``seconds``, and
    how many refreshes ran beside them."""
    body = _body(False)
    done = 0
    refreshes = 0
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call(app, "POST", "/v1/chat/completions", body)
            done += 1

    async def refresher() -> None:
        nonlocal refreshes
        while time.perf_counter() < deadline:
            assert await call(app, "GET", "/status.json") == 200
            refreshes += 1
            await asyncio.sleep(REFRESH_MS / 1000)

    start = time.process_time()
    await asyncio.gather(*(loop() for _ in range(concurrency)), *([refresher()] if refresh else []))
    return done / (time.process_time() - start), refreshes


async def refresh_cpu(app: Any, n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        await call(app, "GET", "/status.json")
    return (time.process_time() - start) / n


def refresh(seconds: float, rounds: int, concurrency: int) -> None:
    app = small_app(True)
    asyncio.run(cpu_per_request(app, _body(False), 2000))  # warm, and fills the windows a little
    results: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(rounds):
        for on in (False, True) if round_ % 2 == 0 else (True, False):
            rps, _ = asyncio.run(throughput(app, seconds, concurrency, on))
            results[on].append(rps)
    per_refresh = asyncio.run(refresh_cpu(app, 200))
    off, on = statistics.median(results[False]), statistics.median(results[True])
    print(f"\nrefresh: {concurrency} request loops, {rounds} interleaved rounds of {seconds:g}s each")
    print(
        f"  without the page   {off:8.0f} req per CPU-s (median; rounds {[round(x) for x in results[False]]})"
    )
    print(
        f"  refreshing /2 s    {on:8.0f} req per CPU-s (median; rounds {[round(x) for x in results[True]]})"
    )
    print(f"  difference         {on / off - 1:+.2%} (noise on a shared machine is larger than this)")
    share = per_refresh / (REFRESH_MS / 1000)
    print(f"  one /status.json   {per_refresh * 1e3:.2f} ms CPU: {share:.3%} of a core at one per 2 s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", nargs="?", default="all", choices=["render", "hot-path", "refresh", "all"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20000, help="per hot-path round")
    parser.add_argument("--seconds", type=float, default=6.0, help="per refresh round")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    if args.what in ("render", "all"):
        render(max(args.rounds, 5))
    if args.what in ("hot-path", "all"):
        hooks_alone(args.requests * 10, args.rounds)
        hot_path(args.requests, args.rounds)
    if args.what in ("refresh", "all"):
        refresh(args.seconds, args.rounds, args.concurrency)


if __name__ == "__main__":
    main()
