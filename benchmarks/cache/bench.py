"""Response cache benchmark (issue 16, "Benchmark"): the miss path with the cache off and on, the
hit path non-streamed and streamed, and the miss path while Redis is paused, side by side in one run.

nginx plays a static OpenAI-compatible upstream with ``benchmarks/proxy_overhead``'s files (read
by path, never copied into the repository): ``nginx.conf.in``, ``reply.json``, ``reply.sse``,
``post.lua``, ``stream.lua``. The canned replies end with ``"finish_reason":"length"``, which the
cache rightly never stores (a truncated answer), so the upstream serves them with ``"stop"`` in its
place: the one difference, made at run time in the work dir.

Rows, at ``--connections`` (8) connections, medians of ``--rounds`` (3) interleaved rounds (the
order reversed every other round) of ``--duration`` (5) s each, after 1 s of unmeasured warm-up:

1. miss, cache off: route ``chat-nocache`` (no ``cache:``), ``unique.lua`` (a counter in the body)
2. miss, cache on, Redis ``redis://127.0.0.1:6379/14``: route ``chat-unique``, ``unique.lua``;
   nothing hits, so each request is a lookup, a single-flight lock, the upstream call and a store
3. hit, non-streamed: route ``chat``, ``post.lua`` (one deterministic request, temperature 0)
4. hit, streamed: route ``chat-stream``, ``stream.lua``'s body sent by an asyncio client over raw
   sockets (wrk times whole responses): time to the first body byte of ``--ttfb-requests`` (2,000)
   requests, 8 at a time on keep-alive connections
5. Redis paused: row 2's workload against a second gateway whose Redis is a private
   ``redis-server`` on a free port, with ``redis-cli -n 14 CLIENT PAUSE 3000`` issued every 3 s
   through the measured run

Placement on a 2-core box: each gateway on CPU 0 (``taskset -c 0``; the one not measured idles),
nginx, wrk, the TTFB client (this process) and the private Redis on CPU 1. The shared Redis on 6379
belongs to no one here: its CPU time shows as the others' share. Every measured run records what
other processes took of each core (``proxy_overhead/cpu.py``). Run from the repository root::

    .venv/bin/python benchmarks/cache/bench.py [--rounds 3] [--duration 5] [--connections 8]

It prints the tables and writes them to ``results.md`` beside this file. It exits non-zero when a
step fails, a check of the replies fails (a route that does not hit, a miss row that hits), or a
row other than row 5 sees errors; row 5's failed requests are a result, reported, not a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PROXY = REPO / "benchmarks" / "proxy_overhead"
sys.path.insert(0, str(PROXY))

from cpu import CLK_TCK, CoreShare, background_busy, children_ticks, cpu_ticks  # noqa: E402
from proxy_overhead import BenchError, Proc, free_port, nginx_body, started, wait_until  # noqa: E402
from report import WrkResult, command_line, git_state, parse_wrk, scrub, tool_version  # noqa: E402

RESULTS = HERE / "results.md"
WORK_ROOT = REPO / "benchmarks" / ".work"
PYTHON = REPO / ".venv" / "bin" / "python"
#: the console script (gateway/cli.py has no ``__main__`` block, so ``python -m gateway.cli`` does nothing)
INTERLOCK = REPO / ".venv" / "bin" / "interlock"
UNIQUE_LUA = HERE / "unique.lua"
POST_LUA = PROXY / "post.lua"
STREAM_LUA = PROXY / "stream.lua"

GATEWAY_CPU = "0"
LOAD_CPU = "1"
SHARED_REDIS = "redis://127.0.0.1:6379/14"
REDIS_DB = "14"
PAUSE_MS = 3000
PAUSE_EVERY_S = 3.0
WARMUP_S = 1
#: unique misses sent to the row-5 gateway before the run, to count its Redis commands per miss
REDIS_PROBE = 50
#: a row-5 run starts only once the paused gateway's Redis is back to "ok" (breaker closed)
RECOVER_TIMEOUT_S = 90.0

# the targets
TARGET_P50_ADDED_MS = 0.5
TARGET_P99_ADDED_MS = 2.0
TARGET_HIT_RPS_RATIO = 1.5
TARGET_TTFB_P50_MS = 2.0
TARGET_PAUSED_P99_ADDED_MS = 25.0

ROWS = ("nocache", "unique", "hit", "stream_hit", "stream_hit_1", "paused")
#: TTFB rows (an asyncio client, not wrk)
TTFB_ROWS = ("stream_hit", "stream_hit_1")
ROW_TITLES = {
    "nocache": "1. miss, cache off",
    "unique": "2. miss, cache on (loopback Redis)",
    "hit": "3. hit, non-streamed",
    "stream_hit": "4. hit, streamed (TTFB)",
    "stream_hit_1": "4b. context: row 4 at 1 connection",
    "paused": "5. miss, cache on, Redis paused",
}
#: the route each row sends to, and the cache result every one of its replies must carry
ROW_ROUTE = {
    "nocache": "chat-nocache",
    "unique": "chat-unique",
    "hit": "chat",
    "stream_hit": "chat-stream",
    "stream_hit_1": "chat-stream",
    "paused": "chat-unique",
}
ROW_EXPECT = {
    "nocache": None,
    "unique": "miss",
    "hit": "hit",
    "stream_hit": "hit",
    "stream_hit_1": "hit",
    "paused": None,
}


# --- small HTTP and process helpers ------------------------------------------------------------

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(
    method: str, url: str, body: bytes | None = None, extra: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body)."""
    headers = {**({"content-type": "application/json"} if body else {}), **(extra or {})}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with _OPENER.open(request, timeout=10) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def lua_body(script: Path) -> bytes:
    match = re.search(r"wrk\.body\s*=\s*'(.*)'", script.read_text())
    if match is None:
        raise BenchError(f"cannot find wrk.body in {script.name}")
    return match.group(1).encode()


def unique_body(model: str, tag: str) -> bytes:
    """What unique.lua sends, for the checks."""
    return (
        f'{{"model":"{model}","messages":[{{"role":"user","content":"Name three colors. ({tag})"}}],'
        '"max_tokens":24,"temperature":0}'
    ).encode()


def redis_cli(port: int, *args: str, timeout: float = 10.0) -> str:
    done = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), "-n", REDIS_DB, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"redis-cli -p {port} {shlex.join(args)}: {done.stdout}{done.stderr}")
    return done.stdout.strip()


def cache_results(origin: str) -> Counter[tuple[str, str]]:
    """The gateway's ``interlock_cache_results`` counters, by (route, result)."""
    status, _, body = http("GET", origin + "/metrics")
    if status != 200:
        raise BenchError(f"GET {origin}/metrics: HTTP {status}")
    out: Counter[tuple[str, str]] = Counter()
    for m in re.finditer(
        r"^interlock_cache_results(?:_total)?\{([^}]*)\}\s+([\d.e+]+)$", body.decode(), re.MULTILINE
    ):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        out[labels.get("route", ""), labels.get("result", "")] += round(float(m.group(2)))
    return out


def ready_cache(origin: str) -> str:
    status, _, body = http("GET", origin + "/health/ready")
    found = re.search(rb'"cache"\s*:\s*"([^"]*)"', body)
    return f"HTTP {status}, cache {found.group(1).decode() if found else '?'}"


# --- the upstream, Redis and the gateways ------------------------------------------------------


def stop_variant(text: str) -> str:
    """A canned reply with its truncation turned into a normal end, so that the cache stores it."""
    out = text.replace('"finish_reason":"length"', '"finish_reason":"stop"')
    if out.count('"finish_reason":"stop"') != 1:
        raise BenchError('expected one "finish_reason":"length" in a canned reply')
    return out


def render_nginx(work: Path, port: int) -> Path:
    template = (PROXY / "nginx.conf.in").read_text()
    conf = template.replace("@PREFIX@", str(work)).replace("@PORT@", str(port))
    directives = "\n".join(line for line in conf.splitlines() if not line.lstrip().startswith("#"))
    leftover = set(re.findall(r"@[A-Z]+@", directives)) - {"@BODY@"}
    if leftover:
        raise BenchError(f"nginx.conf.in has placeholders this script does not fill: {sorted(leftover)}")
    reply = stop_variant((PROXY / "reply.json").read_text().strip())
    conf = conf.replace("@BODY@", nginx_body(reply))
    (work / "reply.sse").write_text(stop_variant((PROXY / "reply.sse").read_text()))
    path = work / "nginx.conf"
    path.write_text(conf)
    work.chmod(0o755)  # nginx's worker (nobody, when run as root) reads reply.sse
    return path


def write_routing(work: Path, upstream: str) -> Path:
    # JSON-style YAML: no YAML library needed here
    text = f"""\
backends:
  upstream_json:
    kind: openai
    base_url: {upstream}/v1
    model: smollm2
  upstream_stream:
    kind: openai
    base_url: {upstream}/sse/v1
    model: smollm2
models:
  chat-nocache:
    targets: [upstream_json]
  chat-unique:
    targets: [upstream_json]
    cache: {{ttl_s: 30}}
  chat:
    targets: [upstream_json]
    cache: {{ttl_s: 600}}
  chat-stream:
    targets: [upstream_stream]
    cache: {{ttl_s: 600}}
"""
    path = work / "routing.yaml"
    path.write_text(text)
    return path


@dataclass
class Gateway:
    name: str
    redis_url: str
    port: int
    argv: list[str]
    env: dict[str, str]
    proc: Proc | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self) -> str:
        return self.origin + "/v1/chat/completions"

    def shown(self) -> str:
        env = " ".join(
            f"{k}={self.env[k]}"
            for k in ("INTERLOCK_REDIS_URL", "INTERLOCK_SHUTDOWN_DELAY_S", "INTERLOCK_RELOAD_WATCH")
        )
        return f"{env} {shlex.join(self.argv)}"


def gateway(name: str, redis_url: str, routing: Path) -> Gateway:
    port = free_port()
    argv = [
        "taskset",
        "-c",
        GATEWAY_CPU,
        str(INTERLOCK.relative_to(REPO)),
        "serve",
        "--config",
        str(routing),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    env = {
        **os.environ,
        "INTERLOCK_REDIS_URL": redis_url,
        "INTERLOCK_SHUTDOWN_DELAY_S": "0",
        "INTERLOCK_RELOAD_WATCH": "false",
    }
    return Gateway(name, redis_url, port, argv, env)


# --- wrk ---------------------------------------------------------------------------------------


def wrk_argv(
    connections: int | str, duration: int | str, url: str, script: Path, args: Sequence[str] = ()
) -> list[str]:
    return [
        "taskset",
        "-c",
        LOAD_CPU,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
        *(["--", *args] if args else []),
    ]


def run_wrk(argv: list[str], log: Path, duration: int) -> WrkResult:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish: {shlex.join(argv)}") from None
    with log.open("a") as f:
        f.write(f"$ {shlex.join(argv)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        raise BenchError(
            f"wrk exited with status {done.returncode}: {shlex.join(argv)}\n{done.stdout}{done.stderr}"
        )
    try:
        result = parse_wrk(done.stdout)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    if result.requests == 0:
        raise BenchError(f"wrk completed no requests: {shlex.join(argv)}\n{done.stdout}")
    return result


# --- time to first byte ------------------------------------------------------------------------


@dataclass
class TtfbResult:
    ttfb_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    problems: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0

    @property
    def requests(self) -> int:
        return len(self.ttfb_ms)

    @property
    def errors(self) -> int:
        return sum(self.problems.values())


def _chunked(data: bytes) -> tuple[bytes, bool]:
    """The payload decoded so far from a chunked body, and whether the last chunk has come."""
    pos, payload = 0, bytearray()
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return bytes(payload), False
        size = int(data[pos:eol].split(b";")[0], 16)
        start = eol + 2
        if size == 0:
            return bytes(payload), data.find(b"\r\n\r\n", eol) >= 0 or data[start : start + 2] == b"\r\n"
        if len(data) < start + size + 2:
            payload += data[start : start + size]
            return bytes(payload), False
        payload += data[start : start + size]
        pos = start + size + 2


async def _one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, result: TtfbResult | None
) -> None:
    t0 = time.perf_counter()
    writer.write(request)
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("closed before the head")
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    chunked = "chunked" in headers.get("transfer-encoding", "")
    length = int(headers.get("content-length", "-1"))
    first: float | None = None
    while True:
        payload, done = _chunked(body) if chunked else (body, len(body) >= length)
        if payload and first is None:
            first = time.perf_counter()
        if done:
            break
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("closed before the end of the body")
        body += data
    end = time.perf_counter()
    if result is None:
        return
    if status != 200:
        result.problems[f"HTTP {status}"] += 1
    elif headers.get("x-interlock-cache") != "hit":
        result.problems[f"x-interlock-cache: {headers.get('x-interlock-cache')}"] += 1
    elif not payload.endswith(b"data: [DONE]\n\n"):
        result.problems["no [DONE] at the end"] += 1
    result.ttfb_ms.append(((first or end) - t0) * 1e3)
    result.total_ms.append((end - t0) * 1e3)


async def _ttfb(port: int, body: bytes, concurrency: int, requests: int, warmup: int) -> TtfbResult:
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    result = TtfbResult()
    share = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]

    async def worker(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(warmup):
                await _one(reader, writer, request, None)
            await barrier.wait()
            for _ in range(count):
                try:
                    await _one(reader, writer, request, result)
                except (ConnectionError, ValueError, IndexError) as exc:
                    result.problems[type(exc).__name__] += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()

    barrier = asyncio.Barrier(concurrency + 1)
    tasks = [asyncio.create_task(worker(n)) for n in share]
    await barrier.wait()
    t0 = time.perf_counter()
    await asyncio.gather(*tasks)
    result.elapsed_s = time.perf_counter() - t0
    return result


def run_ttfb(port: int, body: bytes, concurrency: int, requests: int, warmup: int = 0) -> TtfbResult:
    """``requests`` timed, after ``warmup`` untimed ones on each connection."""
    return asyncio.run(_ttfb(port, body, concurrency, requests, warmup))


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


# --- Redis paused ------------------------------------------------------------------------------


@contextmanager
def pausing(port: int, log: Path) -> Iterator[list[float]]:
    """``CLIENT PAUSE 3000`` every 3 s for the block (each from its own redis-cli, which blocks while
    a pause is on); yields the offsets at which they were issued."""
    stop = threading.Event()
    issued: list[float] = []
    procs: list[subprocess.Popen[bytes]] = []
    t0 = time.monotonic()

    def loop() -> None:
        k = 0
        while not stop.is_set():
            issued.append(time.monotonic() - t0)
            with log.open("ab") as out:
                procs.append(
                    subprocess.Popen(
                        [
                            "taskset",
                            "-c",
                            LOAD_CPU,
                            "redis-cli",
                            "-h",
                            "127.0.0.1",
                            "-p",
                            str(port),
                            "-n",
                            REDIS_DB,
                            "CLIENT",
                            "PAUSE",
                            str(PAUSE_MS),
                        ],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
            k += 1
            stop.wait(max(0.0, t0 + k * PAUSE_EVERY_S - time.monotonic()))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield issued
    finally:
        stop.set()
        thread.join()
        for p in procs:
            try:
                p.wait(PAUSE_MS / 1000 + 10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        # UNPAUSE is not held back by a pause; a pause issued last may still be on otherwise
        with suppress(BenchError, subprocess.TimeoutExpired):
            redis_cli(port, "CLIENT", "UNPAUSE")


def wait_redis_ok(gw: Gateway, limit_s: float = RECOVER_TIMEOUT_S) -> float:
    """Drives unique requests at ``gw`` until its cache says ``ok`` (the Redis breaker closes only
    on a call); returns how long that took."""
    t0 = time.monotonic()
    n = 0
    while True:
        state = ready_cache(gw.origin)
        if state.endswith("cache ok"):
            return time.monotonic() - t0
        if time.monotonic() - t0 > limit_s:
            raise BenchError(f"{gw.name}: Redis did not recover within {limit_s:g}s ({state})")
        n += 1
        http("POST", gw.url(), unique_body("chat-unique", f"recover-{uuid.uuid4().hex[:8]}-{n}"))
        time.sleep(0.1)


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class Run:
    row: str
    round_: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    #: what other processes took of CPU 0 and CPU 1 meanwhile
    stolen0: float
    stolen1: float
    #: the gateway's CPU time per request, us
    cpu_us: float
    cache: Counter[str]
    note: str = ""


def self_ticks() -> int:
    t = os.times()
    return round((t.user + t.system) * CLK_TCK) + children_ticks()


def measure(
    args: argparse.Namespace, gws: dict[str, Gateway], load_pids: list[int], work: Path, wrk_log: Path
) -> list[Run]:
    runs: list[Run] = []
    a, b = gws["shared"], gws["private"]
    stream_body = lua_body(STREAM_LUA)
    n, d = args.connections, args.duration
    for r in range(args.rounds):
        for row in ROWS if r % 2 == 0 else ROWS[::-1]:
            gw = b if row == "paused" else a
            assert gw.proc is not None
            prefix = f"r{r}-{uuid.uuid4().hex[:8]}"
            script, extra = (POST_LUA, []) if row == "hit" else (UNIQUE_LUA, [ROW_ROUTE[row], prefix])
            note = ""
            if row == "paused":
                recovered = wait_redis_ok(gw)
                note = f"Redis ok again {recovered:.1f}s before"
            conc = 1 if row == "stream_hit_1" else n
            ttfb_requests = args.ttfb_requests // 4 if row == "stream_hit_1" else args.ttfb_requests
            if row in TTFB_ROWS:
                run_ttfb(gw.port, stream_body, conc, conc, warmup=200 // conc)
            else:
                warm = [extra[0], f"{prefix}-warm"] if extra else []
                run_wrk(wrk_argv(n, WARMUP_S, gw.url(), script, warm), wrk_log, WARMUP_S)
            before = cache_results(gw.origin)
            ticks0 = cpu_ticks(gw.proc.popen.pid)
            with ExitStack() as stack:
                core = stack.enter_context(CoreShare(GATEWAY_CPU, [gw.proc.popen.pid]))
                load = stack.enter_context(CoreShare(LOAD_CPU, load_pids, self_ticks))
                if row in TTFB_ROWS:
                    t = run_ttfb(gw.port, stream_body, conc, ttfb_requests)
                else:
                    issued = (
                        stack.enter_context(pausing(args.private_port, work / "pause.log"))
                        if row == "paused"
                        else None
                    )
                    w = run_wrk(wrk_argv(n, d, gw.url(), script, extra), wrk_log, d)
                    if issued is not None:
                        note += f"; pauses issued: {len(issued)}"
            gw_us = (cpu_ticks(gw.proc.popen.pid) - ticks0) / CLK_TCK * 1e6
            delta = cache_results(gw.origin) - before
            cache = Counter({res: c for (route, res), c in delta.items() if route == ROW_ROUTE[row]})
            for g in gws.values():
                assert g.proc is not None
                g.proc.ensure_alive()
            if row in TTFB_ROWS:
                run = Run(
                    row,
                    r,
                    t.requests / t.elapsed_s,
                    percentile(t.ttfb_ms, 50),
                    percentile(t.ttfb_ms, 99),
                    t.requests,
                    t.errors,
                    core.stolen,
                    load.stolen,
                    gw_us / max(1, t.requests),
                    cache,
                    f"whole response p50 {percentile(t.total_ms, 50):.2f} ms"
                    + (f"; problems {dict(t.problems)}" if t.problems else ""),
                )
            else:
                tail = re.search(r"^tail: p99\.9 (\d+) us, max (\d+) us$", w.output, re.MULTILINE)
                if tail:
                    p999, top = (int(v) / 1e3 for v in tail.groups())
                    note += f"; p99.9 {p999:.1f} ms, max {top:.1f} ms"
                run = Run(
                    row,
                    r,
                    w.rps,
                    w.p50_ms,
                    w.p99_ms,
                    w.requests,
                    w.errors,
                    core.stolen,
                    load.stolen,
                    gw_us / max(1, w.requests),
                    cache,
                    note.strip("; "),
                )
            runs.append(run)
            print(
                f"cache bench: round {r + 1} {ROW_TITLES[row]}: {run.rps:,.0f} req/s, "
                f"p50 {run.p50_ms:.2f} ms, p99 {run.p99_ms:.2f} ms, {run.errors} errors, "
                f"cache {dict(run.cache)}, "
                f"others CPU0 {run.stolen0:.0%} CPU1 {run.stolen1:.0%} {run.note}",
                file=sys.stderr,
            )
    return runs


def check_runs(runs: Sequence[Run]) -> list[str]:
    """What makes a run's number mean something else than its row says."""
    problems = []
    for run in runs:
        where = f"round {run.round_ + 1} {ROW_TITLES[run.row]}"
        want = ROW_EXPECT[run.row]
        other = {k: v for k, v in run.cache.items() if k != want}
        if run.row == "nocache" and run.cache:
            problems.append(f"{where}: the cache saw it: {dict(run.cache)}")
        elif want is not None and other:
            problems.append(f"{where}: not all {want}: {dict(run.cache)}")
        if run.row != "paused" and run.errors:
            problems.append(f"{where}: {run.errors} failed requests")
    return problems


def check_replies(a: Gateway, b: Gateway) -> None:
    """Each route once, before measuring: the answers are what nginx holds and say what the cache did."""
    json_reply = stop_variant((PROXY / "reply.json").read_text().strip()).encode()
    for gw in (a, b):
        tag = f"check-{uuid.uuid4().hex[:8]}"
        status, headers, body = http("POST", gw.url(), unique_body("chat-nocache", tag))
        if status != 200 or body != json_reply or "x-interlock-cache" in headers:
            raise BenchError(
                f"{gw.name} chat-nocache: HTTP {status}, cache "
                f"{headers.get('x-interlock-cache')}, {body[:200]!r}"
            )
        for want in ("miss", "hit"):
            status, headers, body = http("POST", gw.url(), unique_body("chat-unique", tag))
            if status != 200 or headers.get("x-interlock-cache") != want:
                raise BenchError(
                    f"{gw.name} chat-unique: HTTP {status}, cache "
                    f"{headers.get('x-interlock-cache')} (want {want}), {body[:200]!r}"
                )
    # The hit rows' requests are fixed (post.lua, stream.lua), so their keys are the same in every
    # run: the first of each goes with no-cache, which stores a fresh entry, else one left in the
    # shared Redis by an earlier run could expire in the middle of this one.
    for want, control in (("miss", {"cache-control": "no-cache"}), ("hit", {}), ("hit", {})):
        status, headers, body = http("POST", a.url(), lua_body(POST_LUA), control)
        if status != 200 or headers.get("x-interlock-cache") != want:
            raise BenchError(
                f"chat: HTTP {status}, cache {headers.get('x-interlock-cache')} (want {want}), {body[:200]!r}"
            )
        status, headers, body = http("POST", a.url(), lua_body(STREAM_LUA), control)
        if (
            status != 200
            or headers.get("x-interlock-cache") != want
            or not body.endswith(b"data: [DONE]\n\n")
        ):
            raise BenchError(
                f"chat-stream: HTTP {status}, cache {headers.get('x-interlock-cache')}, {body[-200:]!r}"
            )
    for gw in (a, b):
        if not ready_cache(gw.origin).endswith("cache ok"):
            raise BenchError(f"{gw.name}: Redis is not ok before the run: {ready_cache(gw.origin)}")


def redis_commands_per_miss(gw: Gateway, port: int) -> str:
    """What one miss asks of Redis, from the private server's command statistics."""
    redis_cli(port, "CONFIG", "RESETSTAT")
    tag = uuid.uuid4().hex[:8]
    for i in range(REDIS_PROBE):
        status, headers, _ = http("POST", gw.url(), unique_body("chat-unique", f"probe-{tag}-{i}"))
        if status != 200 or headers.get("x-interlock-cache") != "miss":
            raise BenchError(
                f"{gw.name}: probe request {i}: HTTP {status}, cache {headers.get('x-interlock-cache')}"
            )
    stats = redis_cli(port, "INFO", "commandstats")
    calls = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^cmdstat_([\w|]+):calls=(\d+)", stats, re.MULTILINE)
    }
    ignored = {"select", "config|resetstat", "info", "ping", "hello", "client|setinfo", "client|setname"}
    per = {k.upper(): v / REDIS_PROBE for k, v in sorted(calls.items()) if k not in ignored}
    return f"{sum(per.values()):g} ({', '.join(f'{v:g} {k}' for k, v in per.items())})"


# --- the report --------------------------------------------------------------------------------


def med(runs: Sequence[Run], row: str, value: Callable[[Run], float]) -> float:
    return statistics.median(value(r) for r in runs if r.row == row)


def paired(runs: Sequence[Run], row: str, base: str, value: Callable[[Run, Run], float]) -> float:
    """The median over the rounds of ``value(row's run, base's run)`` of the same round."""
    by = {(r.row, r.round_): r for r in runs}
    return statistics.median(value(by[row, k], by[base, k]) for k in sorted({r.round_ for r in runs}))


def yes(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def report(
    runs: Sequence[Run], args: argparse.Namespace, redis_per_miss: str
) -> tuple[str, list[tuple[str, bool]]]:
    m = {
        row: (
            med(runs, row, lambda r: r.rps),
            med(runs, row, lambda r: r.p50_ms),
            med(runs, row, lambda r: r.p99_ms),
        )
        for row in ROWS
    }
    added50 = paired(runs, "unique", "nocache", lambda x, y: x.p50_ms - y.p50_ms)
    added99 = paired(runs, "unique", "nocache", lambda x, y: x.p99_ms - y.p99_ms)
    added_cpu = paired(runs, "unique", "nocache", lambda x, y: x.cpu_us - y.cpu_us)
    ratio = paired(runs, "hit", "nocache", lambda x, y: x.rps / y.rps)
    paused99 = paired(runs, "paused", "unique", lambda x, y: x.p99_ms - y.p99_ms)
    failed = sum(r.errors for r in runs if r.row == "paused")
    sent = sum(r.requests for r in runs if r.row == "paused")
    ttfb50 = m["stream_hit"][1]
    targets = [
        (
            f"row 2 adds at most {TARGET_P50_ADDED_MS:g} ms p50 to row 1: {added50:+.2f} ms",
            added50 <= TARGET_P50_ADDED_MS,
        ),
        (
            f"row 2 adds at most {TARGET_P99_ADDED_MS:g} ms p99 to row 1: {added99:+.2f} ms",
            added99 <= TARGET_P99_ADDED_MS,
        ),
        (
            f"row 3 req/s at least {TARGET_HIT_RPS_RATIO:g}x row 1's: {ratio:.2f}x",
            ratio >= TARGET_HIT_RPS_RATIO,
        ),
        (f"row 4 TTFB p50 at most {TARGET_TTFB_P50_MS:g} ms: {ttfb50:.2f} ms", ttfb50 <= TARGET_TTFB_P50_MS),
        (
            f"row 5 p99 at most {TARGET_PAUSED_P99_ADDED_MS:g} ms above row 2's: {paused99:+.2f} ms",
            paused99 <= TARGET_PAUSED_P99_ADDED_MS,
        ),
        (f"row 5 no failed request: {failed} of {sent:,}", failed == 0),
    ]
    compared = {
        "nocache": "the reference",
        "unique": f"{added50:+.2f} ms p50, {added99:+.2f} ms p99, {added_cpu:+.0f} us CPU/req vs row 1",
        "hit": f"{ratio:.2f}x row 1's req/s",
        "stream_hit": "p50 / p99: time to the first body byte",
        "stream_hit_1": "as row 4, one request at a time",
        "paused": f"{paused99:+.2f} ms p99 vs row 2; {failed} failed",
    }
    verdict = {
        "nocache": "",
        "unique": yes(targets[0][1] and targets[1][1]),
        "hit": yes(targets[2][1]),
        "stream_hit": yes(targets[3][1]),
        "stream_hit_1": "(no target)",
        "paused": yes(targets[4][1] and targets[5][1]),
    }
    main = markdown(
        [
            "row",
            "req/s",
            "p50 ms",
            "p99 ms",
            "compared",
            "target",
            "gateway CPU us/req",
            "others' CPU0 / CPU1",
        ],
        [
            [
                ROW_TITLES[row],
                f"{m[row][0]:,.0f}",
                f"{m[row][1]:.2f}",
                f"{m[row][2]:.2f}",
                compared[row],
                verdict[row],
                f"{med(runs, row, lambda r: r.cpu_us):.0f}",
                f"{med(runs, row, lambda r: r.stolen0):.0%} / {med(runs, row, lambda r: r.stolen1):.0%}",
            ]
            for row in ROWS
        ],
    )
    rounds = markdown(
        [
            "row",
            "round",
            "req/s",
            "p50 ms",
            "p99 ms",
            "requests",
            "failed",
            "x-interlock-cache",
            "others' CPU0 / CPU1",
            "note",
        ],
        [
            [
                ROW_TITLES[r.row],
                str(r.round_ + 1),
                f"{r.rps:,.0f}",
                f"{r.p50_ms:.2f}",
                f"{r.p99_ms:.2f}",
                f"{r.requests:,}",
                str(r.errors),
                ", ".join(f"{k} {v:,}" for k, v in sorted(r.cache.items())) or "none",
                f"{r.stolen0:.0%} / {r.stolen1:.0%}",
                r.note or "",
            ]
            for row in ROWS
            for r in runs
            if r.row == row
        ],
    )
    stolen0 = [r.stolen0 for r in runs]
    stolen1 = [r.stolen1 for r in runs]
    text = "\n".join(
        [
            f"Medians of {args.rounds} interleaved rounds of {args.duration} s at {args.connections} "
            f"connections (rows 4 and 4b: {args.ttfb_requests:,} and {args.ttfb_requests // 4:,} requests a "
            "round; their req/s is the Python client's pace). Deltas and ratios are the medians of the "
            "per-round ones (each round runs every row once, back to back).",
            "",
            main,
            "",
            "Targets (issue 16):",
            "",
            *[f"- {t}: {yes(ok)}" for t, ok in targets],
            "",
            f"Other processes' share of each core during the measured runs: CPU 0 (the gateway's) median "
            f"{statistics.median(stolen0):.0%}, max {max(stolen0):.0%}; CPU 1 (the load's) median "
            f"{statistics.median(stolen1):.0%}, max {max(stolen1):.0%}.",
            "",
            f"Redis commands per miss (the row-5 gateway's private Redis, `INFO commandstats` over "
            f"{REDIS_PROBE} unique misses before the run): {redis_per_miss}; per hit: none (the in-process "
            "tier answers).",
        ]
    )
    return text + "\n\nPer round:\n\n" + rounds, targets


def render(text: str, facts: dict[str, str]) -> str:
    return "\n".join(
        [
            "# Response cache benchmark",
            "",
            "What the response cache costs on a miss and saves on a hit, against a static upstream (nginx "
            "with `benchmarks/proxy_overhead`'s canned replies, `finish_reason` made `stop`), "
            "with the gateway pinned to one core. Written by `benchmarks/cache/bench.py`.",
            "",
            f"- Command: `{facts['command']}`",
            f"- Date: {facts['date']}",
            f"- Commit: {facts['commit']}",
            f"- CPU: {facts['cpu']}",
            f"- CPU busy with other work just before the run: {facts['busy']} of both cores; during the "
            "measured runs, the others' share of each core is in the tables (the shared Redis on 6379, used "
            "by rows 2 to 4, counts as the others')",
            f"- Gateway (rows 1-4): `{facts['gateway_a']}`",
            f"- Gateway (row 5): `{facts['gateway_b']}`",
            f"- Private Redis (row 5): `{facts['redis']}`; paused by `{facts['pause']}` every "
            f"{PAUSE_EVERY_S:g} s through the measured run",
            f"- Upstream: `{facts['nginx']}`",
            f"- Load: rows 1, 2, 5 `{facts['wrk_unique']}`; row 3 `{facts['wrk_hit']}`; row 4 an asyncio "
            "client over raw sockets (in bench.py, CPU 1) sending `stream.lua`'s body",
            f"- Tools: {facts['tools']}",
            "",
            text,
            "",
            "Notes:",
            "",
            "- At 8 connections the gateway's core is saturated, so latency is about 8 requests' worth of "
            "its CPU time: a cost added per request shows up in p50 about 8-fold (the CPU column says "
            "where it goes). Row 4b, one stream at a time, is the hit's own time to first byte.",
            "- A hit is answered from the gateway's in-process tier (the entry is also in Redis); row 2's "
            "miss makes the Redis round trips of a lookup, the single-flight lock, the store and the unlock.",
            "- Row 5 runs on a second gateway process with a private Redis (pinned to CPU 1), so its "
            "comparison with row 2 (the shared Redis) also holds the difference of the two Redis servers. "
            "Before each row-5 run the gateway is driven until its readiness says the cache is `ok` again "
            "(the Redis breaker closed), so every round starts from a healthy cache.",
            "- Two cores shared with other agents' work: the ratios and paired deltas are the numbers "
            "to read, not the absolute ones.",
            "- WORK is the run's scratch directory; `<port>`s were free ports of the run. The routing file:",
            "",
            "```yaml",
            facts["routing"].rstrip("\n"),
            "```",
            "",
        ]
    )


# --- main --------------------------------------------------------------------------------------


def preflight() -> None:
    for tool in ("nginx", "wrk", "taskset", "redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not on PATH")
    if not {0, 1} <= os.sched_getaffinity(0):
        raise BenchError("needs CPUs 0 and 1 (the gateway on one, the load on the other)")
    if not INTERLOCK.exists():
        raise BenchError(f"no {INTERLOCK}: run scripts/setup first")
    if redis_cli(6379, "PING") != "PONG":
        raise BenchError("the shared Redis on 127.0.0.1:6379 does not answer PING")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.partition(':')[2].strip()}, {os.cpu_count()} CPUs"
    return f"{os.cpu_count()} CPUs"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=5, help="seconds per measured wrk run (default 5)")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--ttfb-requests", type=int, default=2000, help="row 4's requests a round (default 2000)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.duration < 1 or args.connections < 1 or args.ttfb_requests < args.connections:
        p.error("--rounds, --duration, --connections must be >= 1, --ttfb-requests >= --connections")
    return args


def bench(args: argparse.Namespace) -> bool:
    preflight()
    os.sched_setaffinity(0, {int(LOAD_CPU)})  # the TTFB client, and whatever else this does, on CPU 1
    busy = background_busy()
    if busy > 0.1:
        print(f"cache bench: warning: {busy:.0%} of the CPUs were busy before the run", file=sys.stderr)
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cache-", dir=WORK_ROOT))
    print(f"cache bench: work dir {work}", file=sys.stderr)
    wrk_log = work / "wrk.log"
    nginx_port = free_port()
    upstream = f"http://127.0.0.1:{nginx_port}"
    nginx_cmd = [
        "taskset",
        "-c",
        LOAD_CPU,
        "nginx",
        "-c",
        str(render_nginx(work, nginx_port)),
        "-p",
        str(work),
        "-e",
        str(work / "error.log"),
    ]
    args.private_port = free_port()
    redis_cmd = [
        "taskset",
        "-c",
        LOAD_CPU,
        "redis-server",
        "--port",
        str(args.private_port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(work),
    ]
    routing = write_routing(work, upstream)
    private = f"redis://127.0.0.1:{args.private_port}/{REDIS_DB}"
    gws = {
        "shared": gateway("gateway (rows 1-4)", SHARED_REDIS, routing),
        "private": gateway("gateway (row 5)", private, routing),
    }
    commit = git_state(REPO)  # what the gateways load is what the checkout holds as they start
    with ExitStack() as stack:
        nginx = stack.enter_context(started("nginx", nginx_cmd, work / "nginx.log"))
        wait_until(nginx, f"{upstream}/", None)
        nginx_workers = [
            int(p)
            for p in Path(f"/proc/{nginx.popen.pid}/task/{nginx.popen.pid}/children").read_text().split()
        ]
        redis = stack.enter_context(started("redis", redis_cmd, work / "redis.log"))
        deadline = time.monotonic() + 10
        while True:
            redis.ensure_alive()
            with suppress(BenchError, subprocess.TimeoutExpired):
                if redis_cli(args.private_port, "PING", timeout=2) == "PONG":
                    break
            if time.monotonic() > deadline:
                raise BenchError(f"the private redis-server did not answer; {redis.log_tail()}")
            time.sleep(0.1)
        for gw in gws.values():
            log = work / f"gateway-{gw.port}.log"
            gw.proc = stack.enter_context(started(gw.name, gw.argv, log, REPO, gw.env))
        for gw in gws.values():
            assert gw.proc is not None
            wait_until(gw.proc, f"{gw.origin}/health/ready", 200)
        check_replies(gws["shared"], gws["private"])
        per_miss = redis_commands_per_miss(gws["private"], args.private_port)
        runs = measure(args, gws, [*nginx_workers, redis.popen.pid], work, wrk_log)
    text, targets = report(runs, args, per_miss)
    print(text)
    problems = check_runs(runs)
    if problems:
        print(
            "cache bench: FAILED: " + "; ".join(problems) + f"; results.md left as it was; logs in {work}",
            file=sys.stderr,
        )
        return False
    names = {work: "WORK"}
    url = "<gateway>/v1/chat/completions"
    facts = {
        "command": command_line(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "cpu": cpu_model(),
        "busy": f"{busy:.0%}",
        "gateway_a": gws["shared"].shown(),
        "gateway_b": gws["private"].shown(),
        "redis": shlex.join(redis_cmd),
        "pause": f"redis-cli -p <port> -n {REDIS_DB} CLIENT PAUSE {PAUSE_MS}",
        "nginx": shlex.join(nginx_cmd),
        "wrk_unique": shlex.join(
            wrk_argv(args.connections, args.duration, url, UNIQUE_LUA, ["<route>", "<fresh prefix>"])
        ),
        "wrk_hit": shlex.join(wrk_argv(args.connections, args.duration, url, POST_LUA)),
        "tools": "; ".join(
            [
                *(tool_version(a) for a in (["wrk", "-v"], ["nginx", "-v"], ["redis-server", "--version"])),
                f"Python {sys.version.split()[0]}",
            ]
        ),
        "routing": re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:<port>", routing.read_text()),
    }
    markdown_text = scrub(render(text, facts), names)
    markdown_text = re.sub(r"--port \d+", "--port <port>", markdown_text)
    markdown_text = re.sub(r"127\.0\.0\.1:(?!6379)\d+", "127.0.0.1:<port>", markdown_text)
    leaked = [p for p in (REPO, work, Path(tempfile.gettempdir()), Path.home()) if f"{p}/" in markdown_text]
    if leaked:
        raise BenchError(f"results.md would hold paths of this machine: {leaked}; logs in {work}")
    RESULTS.write_text(markdown_text.rstrip("\n") + "\n")
    print(
        f"\ncache bench: wrote {RESULTS.relative_to(REPO)}; targets met: "
        f"{sum(ok for _, ok in targets)} of {len(targets)}",
        file=sys.stderr,
    )
    shutil.rmtree(work, ignore_errors=True)
    return True


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the blocks that stop nginx, Redis, the gateways


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return 0 if bench(args) else 1
    except BenchError as exc:
        print(f"cache bench: FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cache bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
