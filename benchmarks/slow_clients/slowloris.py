"""Slow clients against the real gateway, with healthy clients beside them: a load check, not a test.

Starts a canned OpenAI-compatible upstream and ``interlock serve`` (each a process of its own),
then runs phases: a baseline of healthy clients alone; then N slow connections of one kind at a
time (sending nothing, half a request line, headers without their end, a body a byte a second);
then N of every kind at once. Healthy clients (half on keep-alive connections, half on a new
connection per request) run through each phase until every slow connection has been closed. The
table: healthy success and p50/p99 latency against the baseline, and how many slow connections
the gateway closed by their deadline (the 408 came, and the close came no later than the deadline
plus ``--grace``).

Run from the repository root (raises RLIMIT_NOFILE, which may need root for N past ~4,000)::

    .venv/bin/python benchmarks/slow_clients/slowloris.py [--n 5000] [--header-timeout 10]

Each phase's slow connections come from a loopback address of their own (127.0.0.2, ...), so the
20,000 connections of the last phase do not run out of ephemeral ports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import free_port, percentile, process_cpu  # noqa: E402

PY = sys.executable

#: what each kind sends first, and then once a second until the gateway closes it
KINDS: dict[str, tuple[bytes, bytes | None]] = {
    "nothing": (b"", None),
    "half request line": (b"POST /v1/chat/comp", b"l"),
    "headers without end": (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-slow: ", b"a"),
    "body at a byte a second": (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
        b"application/json\r\ncontent-length: 100000\r\n\r\n{",
        b" ",
    ),
}
REPLY = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hello there."}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }
).encode()
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Say hello."}]}).encode()


def cpu_list(spec: str) -> set[int]:
    """``0-3,6`` as a set of CPU numbers."""
    cpus: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def raise_fd_limit(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
    except (ValueError, OSError):  # not root: as far as the hard limit goes
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- the upstream and the healthy clients (each run as a process of this script) ---------------


def serve_upstream(port: int) -> None:
    from aiohttp import web

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=REPLY, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def run_healthy(url: str, rate: float) -> None:
    """``rate`` requests a second, open loop, until stdin closes; then prints the latencies (ms,
    from each request's scheduled time, so a stall counts for every request it delayed) and
    the failures as JSON. Even requests use a keep-alive pool, odd ones a new connection each."""
    import aiohttp

    async def main() -> None:
        latencies: list[float] = []
        failures: dict[str, int] = {}
        stop = asyncio.Event()
        asyncio.get_running_loop().add_reader(sys.stdin.fileno(), stop.set)
        timeout = aiohttp.ClientTimeout(total=30)
        keep = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)
        fresh = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True), timeout=timeout
        )

        async def one(session: aiohttp.ClientSession, due: float) -> None:
            try:
                async with session.post(
                    url + "/v1/chat/completions", data=CHAT, headers={"content-type": "application/json"}
                ) as r:
                    await r.read()
                    status = r.status
            except Exception as exc:  # a failure to count, whatever it is
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                return
            if status == 200:
                latencies.append((time.monotonic() - due) * 1000)
            else:
                failures[f"HTTP {status}"] = failures.get(f"HTTP {status}", 0) + 1

        tasks: set[asyncio.Task[None]] = set()
        print("ready", flush=True)
        start, i = time.monotonic(), 0
        while not stop.is_set():
            due = start + i / rate
            if due > time.monotonic():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), due - time.monotonic())
                continue
            task = asyncio.create_task(one(keep if i % 2 == 0 else fresh, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        await asyncio.gather(*tasks)
        await keep.close()
        await fresh.close()
        print(json.dumps({"latencies": latencies, "failures": failures}))

    uvloop.run(main())


# --- slow connections ---------------------------------------------------------------------------


@dataclass
class Slow:
    kind: str
    #: before the connect, and once connected: the gateway's clock starts in between
    started: float = 0.0
    opened: float = 0.0
    #: from ``opened``: the latest the gateway's clock can have started
    closed_after: float | None = None
    #: from ``started``: what a close cannot come before, if the gateway keeps its deadline
    closed_after_start: float | None = None
    answer: bytes = b""
    error: str | None = None


async def slow_connection(
    conn: Slow, source: str, port: int, writers: list[tuple[asyncio.StreamWriter, bytes]]
) -> None:
    first, piece = KINDS[conn.kind]
    conn.started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0), limit=4096)
    except OSError as exc:
        conn.error = f"connect: {exc.strerror or exc}"
        return
    conn.opened = time.monotonic()
    writer.write(first)
    if piece is not None:
        writers.append((writer, piece))
    try:
        while data := await reader.read(4096):
            conn.answer += data
    except ConnectionError as exc:
        conn.error = type(exc).__name__
    now = time.monotonic()
    conn.closed_after, conn.closed_after_start = now - conn.opened, now - conn.started
    writer.close()


async def slow_phase(
    kinds: list[str], n: int, source: str, port: int, until: float, ramp: float = 1000
) -> list[Slow]:
    """Opens ``n`` connections of each kind, trickles their pieces once a second, and returns
    once the gateway closed them all (or at ``until``)."""
    conns = [Slow(kind) for kind in kinds for _ in range(n)]
    writers: list[tuple[asyncio.StreamWriter, bytes]] = []

    async def trickle() -> None:
        while True:
            await asyncio.sleep(1.0)
            for writer, piece in writers:
                if not writer.is_closing():
                    writer.write(piece)

    trickler = asyncio.create_task(trickle())
    tasks = []
    step = max(1, int(ramp / 20))  # ``ramp`` connects a second, in 20 steps a second
    for i in range(0, len(conns), step):
        tasks += [asyncio.create_task(slow_connection(c, source, port, writers)) for c in conns[i : i + step]]
        await asyncio.sleep(0.05)
    _, pending = await asyncio.wait(tasks, timeout=max(1.0, until - time.monotonic()))
    trickler.cancel()
    for task in pending:
        task.cancel()
    return conns


# --- orchestration ------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    latencies: list[float]
    failures: dict[str, int]
    slow: list[Slow] = field(default_factory=list)
    rss_mib: float = 0.0
    #: the gateway's CPU seconds, and the phase's wall seconds
    cpu_s: float = 0.0
    wall_s: float = 0.0


def pct(values: list[float], q: float) -> float:
    """The nearest-rank percentile, NaN for a phase with no healthy replies."""
    value = percentile(values, q, method="nearest")
    return float("nan") if value is None else value


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"a process exited early (rc {proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on port {port}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5000, help="slow connections of each kind")
    p.add_argument("--header-timeout", type=float, default=10.0)
    p.add_argument("--body-timeout", type=float, default=10.0)
    p.add_argument("--baseline-s", type=float, default=4.0, help="each baseline window")
    p.add_argument("--rate", type=float, default=100, help="healthy requests a second")
    p.add_argument("--ramp", type=float, default=1000, help="slow connections opened a second")
    p.add_argument("--grace", type=float, default=2.0, help="how late a close may be and count")
    p.add_argument("--no-all", action="store_true", help="skip the phase with every kind at once")
    p.add_argument("--kinds", default=",".join(KINDS), help="the one-kind phases to run, comma-separated")
    p.add_argument("--gateway-cpus", help="pin the gateway to these CPUs (e.g. 0), the rest to --load-cpus")
    p.add_argument("--load-cpus", help="CPUs for this script, the upstream and the healthy clients")
    p.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    p.add_argument("--healthy", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_upstream:
        return serve_upstream(args.serve_upstream)
    if args.healthy:
        return run_healthy(args.healthy, args.rate)

    limit = raise_fd_limit(args.n * len(KINDS) + 10_000)
    if limit < args.n + 1000:
        raise SystemExit(
            f"RLIMIT_NOFILE is {limit}: too low for {args.n} connections (run as root, or lower --n)"
        )
    # every kind at once: as many of each as the gateway's descriptors allow
    args.n_all = 0 if args.no_all else min(args.n, (limit - 1500) // len(KINDS))
    total = max(args.n, args.n_all * len(KINDS))
    if args.load_cpus:
        os.sched_setaffinity(0, cpu_list(args.load_cpus))  # inherited by every process but the gateway
    up_port, gw_port = free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="slowloris-"))
    config = work / "gateway.yaml"
    config.write_text(
        f"backends:\n  up: {{kind: openai, base_url: 'http://127.0.0.1:{up_port}/v1'}}\n"
        "models:\n  m: {targets: [up]}\nresilience:\n  health_check: {interval_s: 0}\n"
    )
    env = {
        **os.environ,
        "INTERLOCK_HEADER_TIMEOUT_S": str(args.header_timeout),
        "INTERLOCK_BODY_TIMEOUT_S": str(args.body_timeout),
        "INTERLOCK_MAX_CONNECTIONS": str(total + 1000),
        "INTERLOCK_LOG_LEVEL": "warning",
    }
    procs = [subprocess.Popen([PY, __file__, "--serve-upstream", str(up_port)], cwd=REPO)]
    wait_port(up_port, procs[0])
    gateway_log = (work / "gateway.log").open("wb")
    serve = [
        PY,
        "-c",
        "from gateway.cli import main; main()",
        "serve",
        "--config",
        str(config),
        "--port",
        str(gw_port),
    ]
    pin = cpu_list(args.gateway_cpus) if args.gateway_cpus else None
    procs.append(
        subprocess.Popen(
            serve,
            cwd=REPO,
            env=env,
            stderr=gateway_log,
            preexec_fn=(lambda: os.sched_setaffinity(0, pin)) if pin else None,
        )
    )
    url = f"http://127.0.0.1:{gw_port}"
    try:
        wait_port(gw_port, procs[1])
        phases = run_phases(args, url, gw_port, procs[1].pid)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(report(args, phases))


def run_phases(args: argparse.Namespace, url: str, port: int, gateway_pid: int) -> list[Phase]:
    """A baseline window before each slow phase: on a shared machine the background load drifts,
    and the pooled windows make a fairer baseline than one taken at the start."""
    deadline = max(args.header_timeout, args.body_timeout)
    slow_plan: list[tuple[str, list[str]]] = [(kind, [kind]) for kind in args.kinds.split(",") if kind]
    if not args.no_all:
        slow_plan.append((f"all four kinds at once ({args.n_all} each)", list(KINDS)))
    plan = [step for phase in slow_plan for step in (("baseline", []), phase)]
    phases = [
        Phase(
            f"baseline (no slow clients; {len(slow_plan)} windows of {args.baseline_s:g} s, pooled)", [], {}
        )
    ]
    for i, (name, kinds) in enumerate(plan):
        healthy = subprocess.Popen(
            [PY, __file__, "--healthy", url, "--rate", str(args.rate)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
        )
        assert healthy.stdout is not None and healthy.stdout.readline() == b"ready\n"
        started, cpu = time.monotonic(), process_cpu(gateway_pid)
        slow: list[Slow] = []
        peak = rss_mib(gateway_pid)
        if kinds:
            slow, peak = uvloop.run(
                watched(
                    slow_phase(
                        kinds,
                        args.n if len(kinds) == 1 else args.n_all,
                        f"127.0.0.{2 + i}",
                        port,
                        until=time.monotonic() + deadline + 30 + args.n * len(kinds) / args.ramp,
                        ramp=args.ramp,
                    ),
                    gateway_pid,
                )
            )
        else:
            time.sleep(args.baseline_s)
        out, _ = healthy.communicate(b"stop\n", timeout=60)
        result = json.loads(out.splitlines()[-1])
        cpu, wall = process_cpu(gateway_pid) - cpu, time.monotonic() - started
        if kinds:
            phases.append(Phase(name, result["latencies"], result["failures"], slow, peak, cpu, wall))
        else:
            phases[0].cpu_s += cpu
            phases[0].wall_s += wall
            phases[0].latencies += result["latencies"]
            for what, count in result["failures"].items():
                phases[0].failures[what] = phases[0].failures.get(what, 0) + count
            phases[0].rss_mib = max(phases[0].rss_mib, peak)
        print(
            f"{name}: {len(result['latencies'])} ok, {sum(result['failures'].values())} failed, "
            f"{time.monotonic() - started:.0f}s",
            file=sys.stderr,
        )
    return phases


async def watched(work: Coroutine[Any, Any, list[Slow]], pid: int) -> tuple[list[Slow], float]:
    """``work``'s result and the gateway's peak RSS (MiB) while it ran."""
    peak = 0.0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mib(pid))
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    try:
        return await work, max(peak, rss_mib(pid))
    finally:
        watcher.cancel()


def report(args: argparse.Namespace, phases: list[Phase]) -> str:
    base = phases[0]
    base_p99 = pct(base.latencies, 0.99)
    lines = [
        f"N = {args.n} slow connections per kind, opened at {args.ramp:g} a second; deadlines: head "
        f"{args.header_timeout:g} s, body "
        f"{args.body_timeout:g} s (and 500 B/s); {args.rate:g} healthy requests a second, open loop (half on "
        "keep-alive connections, half on a new connection each; latency from each one's scheduled time); "
        "a close counts as the deadline's when it comes with the 408 no later "
        f"than the deadline + {args.grace:g} s after the connect returned. Earliest close: from before the "
        "connect (a bound a close cannot beat if the deadline holds); latest: from the connect's return.",
        "",
        "| phase | healthy ok | healthy failed | success | p50 ms | p99 ms | p99 / baseline | slow closed "
        "by deadline | 408s | earliest / latest close s | gateway RSS MiB | gateway CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ph in phases:
        ok, failed = len(ph.latencies), sum(ph.failures.values())
        p99 = pct(ph.latencies, 0.99)
        row = [
            ph.name,
            str(ok),
            str(failed) + (f" {ph.failures}" if failed else ""),
            f"{100 * ok / max(1, ok + failed):.2f}%",
            f"{pct(ph.latencies, 0.5):.1f}",
            f"{p99:.1f}",
            f"{p99 / base_p99:.2f}x",
        ]
        if ph.slow:
            deadline = max(args.header_timeout, args.body_timeout)
            closed = [s for s in ph.slow if s.closed_after is not None and s.error is None]
            by_deadline = [
                s
                for s in closed
                if s.closed_after <= deadline + args.grace  # type: ignore[operator]
                and s.answer.startswith(b"HTTP/1.1 408 ")
            ]
            early = [s.closed_after_start for s in closed if s.closed_after_start is not None]
            late = [s.closed_after for s in closed if s.closed_after is not None]
            errors = [s.error for s in ph.slow if s.error]
            note = f" ({len(errors)} errors: {errors[0]})" if errors else ""
            row += [
                f"{len(by_deadline)} / {len(ph.slow)}{note}",
                str(sum(s.answer.startswith(b"HTTP/1.1 408 ") for s in ph.slow)),
                f"{min(early):.1f} / {max(late):.1f}" if late else "-",
            ]
        else:
            row += ["-", "-", "-"]
        row += [f"{ph.rss_mib:.0f}", f"{100 * ph.cpu_s / max(ph.wall_s, 1e-9):.0f}%"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
