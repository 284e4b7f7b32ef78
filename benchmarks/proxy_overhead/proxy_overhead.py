"""Proxy overhead: what the gateway adds on top of an upstream that costs (almost) nothing.

nginx plays a static OpenAI-compatible server (``nginx.conf.in``), so every microsecond
measured beyond the direct run is the relay's own: parsing, validation, routing, the
aiohttp hop and the response. wrk drives nginx directly, the thinnest starlette+aiohttp
relay (``thin_proxy.py``), the gateway of this checkout and, with ``--baseline``, the
gateway of a second checkout, for two workloads: ``json`` (a non-streamed chat completion)
and ``stream`` (the same request with ``"stream": true``; nginx answers ``reply.sse``, 64
chat.completion.chunk events and ``data: [DONE]``). Each round runs every server once per
workload and connection count, in an order reversed every other round; the tables are the
medians over the rounds, and the gateway / baseline ratios. It prints them and writes them
to ``results.md`` beside this file (``report.py`` writes it).

Placement on a 2-core box: the relays on CPU 0 (one core each, idle while another is
measured), nginx and wrk share CPU 1. nginx answers a canned body in a few microseconds, so
sharing a core with wrk barely moves the direct numbers.

The baseline is a second checkout of this repository, made beforehand (this script only
reads it), e.g. of the commit before a change::

    git worktree add /tmp/interlock-baseline <commit>

Both gateways run with this checkout's ``.venv/bin/python``, each through ``run_checkout.py``
from its own checkout (cwd and PYTHONPATH too), which proves which files they loaded. Run
from the repository root::

    .venv/bin/python benchmarks/proxy_overhead/proxy_overhead.py [--baseline DIR] \\
        [--workload json,stream] [--connections 1,8,32] [--rounds 3] [--duration 10]

and afterwards ``git worktree remove --force /tmp/interlock-baseline``.

This is a benchmark, not a test: it only reports, except that it exits non-zero when a
step fails or wrk sees errors, so that a broken number never lands in ``results.md``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import ops
from cpu import CLK_TCK, CoreShare, background_busy, children_ticks, rss_kib
from report import REPO, Facts, Sample, Samples, WrkResult, git_state, parse_wrk, render, report_text, scrub
from run_checkout import check_loaded, launch

HERE = Path(__file__).resolve().parent
WORK_ROOT = REPO / "benchmarks" / ".work"
RESULTS = HERE / "results.md"
VENV_BIN = REPO / ".venv" / "bin"

# nginx, and wrk with it, on one core; the relays on the other.
GATEWAY_CPU = "0"
LOAD_CPU = "1"

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
#: the path the gateways serve; direct and thin serve each workload's own
GATEWAY_PATH = "/v1/chat/completions"


class BenchError(Exception):
    """A step that failed; the message says which and points at the logs."""


@dataclass(frozen=True)
class Workload:
    name: str
    #: the wrk script: its body is the request (model chat or chat-stream)
    script: Path
    #: nginx's location for it (the gateway's backend for the model has it as base_url)
    path: str
    #: what nginx answers
    reply: Path


WORKLOADS = {
    "json": Workload("json", HERE / "post.lua", "/v1/chat/completions", HERE / "reply.json"),
    "stream": Workload("stream", HERE / "stream.lua", "/sse/v1/chat/completions", HERE / "reply.sse"),
}
SSE_EVENTS = 64


# --- processes -----------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def ensure_alive(self) -> None:
        if not self.alive():
            raise BenchError(
                f"{self.name} exited with status {self.popen.returncode}; "
                f"last lines of {self.log}:\n{self.log_tail()}"
            )


@contextmanager
def started(
    name: str, argv: Sequence[str], log: Path, cwd: Path = REPO, env: dict[str, str] | None = None
) -> Iterator[Proc]:
    """Runs ``argv`` for the duration of the block and always stops it, whatever ends the block."""
    with log.open("wb") as out:
        popen = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, env=env
        )
    proc = Proc(name, popen, log)
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: Proc) -> None:
    if proc.popen.poll() is not None:
        return
    # SIGTERM is a clean stop for all: nginx's fast shutdown, uvicorn's graceful one (no requests
    # are in flight by now, and INTERLOCK_SHUTDOWN_DELAY_S=0 skips the gateway's 503 period).
    proc.popen.send_signal(signal.SIGTERM)
    try:
        proc.popen.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(
            f"proxy_overhead: {proc.name} ignored SIGTERM for {STOP_TIMEOUT_S:g}s; killing it",
            file=sys.stderr,
        )
        proc.popen.kill()
        proc.popen.wait()


def free_port() -> int:
    # Racy in principle (another process could take it before our server binds), harmless in
    # practice on a benchmark box, and it saves parsing each server's log for its port.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Loopback only: an http_proxy in the environment must not intercept the readiness probes.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, str, bytes]:
    """(status, content-type, body)."""
    request = urllib.request.Request(
        url, data=body, method=method, headers={"content-type": "application/json"} if body else {}
    )
    try:
        with _OPENER.open(request, timeout=5) as response:
            return response.status, response.headers.get("content-type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("content-type", ""), exc.read()


def wait_until(proc: Proc, url: str, want_status: int | None) -> None:
    """Polls ``url`` until it answers (with ``want_status``, if given), failing fast if ``proc`` dies."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        proc.ensure_alive()
        try:
            status, _, body = http("GET", url)
        except OSError as exc:
            last = str(exc)
        else:
            if want_status is None or status == want_status:
                return
            last = f"HTTP {status}: {body[:200]!r}"
        time.sleep(0.1)
    raise BenchError(
        f"{proc.name} was not ready at {url} within {STARTUP_TIMEOUT_S:g}s ({last}); "
        f"last lines of {proc.log}:\n{proc.log_tail()}"
    )


# --- nginx and the gateways ----------------------------------------------------


def nginx_body(reply: str) -> str:
    """``reply.json`` as the inside of an nginx single-quoted string."""
    # nginx unescapes \\ and \' (and turns \n, \t, \r into control characters, which would corrupt
    # JSON escapes), so backslashes go first. ``$`` has no escape at all in a ``return`` text:
    # nginx would read it as a variable, so refuse rather than serve a different body.
    if "$" in reply:
        raise BenchError("reply.json contains '$', which nginx would expand as a variable")
    return reply.replace("\\", "\\\\").replace("'", "\\'")


def render_nginx(work: Path, port: int, reply: str) -> Path:
    template = (HERE / "nginx.conf.in").read_text()
    conf = template.replace("@PREFIX@", str(work)).replace("@PORT@", str(port))
    # Comments are skipped: the template's header talks about "@NAME@ placeholders" in prose.
    directives = "\n".join(line for line in conf.splitlines() if not line.lstrip().startswith("#"))
    leftover = set(re.findall(r"@[A-Z]+@", directives)) - {"@BODY@"}
    if leftover:
        raise BenchError(f"nginx.conf.in has placeholders this script does not fill: {sorted(leftover)}")
    # BODY last: a reply that happened to contain "@PORT@" must reach clients as written.
    conf = conf.replace("@BODY@", nginx_body(reply))
    path = work / "nginx.conf"
    path.write_text(conf)
    # The stream is a file nginx's worker reads; run as root, the worker is nobody, so the work
    # dir (mkdtemp: 0700) must let it in.
    shutil.copyfile(WORKLOADS["stream"].reply, work / "reply.sse")
    work.chmod(0o755)
    return path


def write_routing(work: Path, upstream: str) -> Path:
    # JSON is YAML; writing it this way needs no YAML library in whatever Python runs this.
    lines = ["backends:"]
    for w in WORKLOADS.values():
        lines += [
            f"  upstream_{w.name}:",
            "    kind: openai",
            f"    base_url: {upstream}{w.path.removesuffix('/chat/completions')}",
            "    model: smollm2",
        ]
    lines += [
        "models:",
        "  chat:",
        "    targets: [upstream_json]",
        "  chat-stream:",
        "    targets: [upstream_stream]",
    ]
    path = work / "routing.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- wrk -----------------------------------------------------------------------


def wrk_argv(connections: int | str, duration: int, url: str, script: Path) -> list[str]:
    return [
        "taskset",
        "-c",
        LOAD_CPU,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]


def run_wrk(connections: int, duration: int, url: str, script: Path, log: Path) -> WrkResult:
    argv = wrk_argv(connections, duration, url, script)
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


# --- the servers and their replies -----------------------------------------------


@dataclass
class Server:
    name: str
    proc: Proc
    origin: str
    #: direct and thin serve each workload's nginx path; the gateways one path for both
    own_paths: bool
    #: the processes whose CPU time is the server's (none for nginx, measured from wrk's core)
    pids: list[int] = field(default_factory=list)

    def url(self, w: Workload) -> str:
        return self.origin + (w.path if self.own_paths else GATEWAY_PATH)


def sse_events(body: bytes) -> list[bytes]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [line[5:].strip() for line in body.split(b"\n") if line.startswith(b"data:")]


def check_reply(server: Server, w: Workload, request: bytes) -> None:
    """Sends the workload's request once: the answer must be what nginx holds, byte for byte (the
    gateways relay both as they come). A typo in a route or an escape would otherwise show up only
    as suspiciously good numbers for the wrong response."""
    status, ctype, body = http("POST", server.url(w), request)
    want = w.reply.read_bytes().strip() if w.name == "json" else w.reply.read_bytes()
    kind = "application/json" if w.name == "json" else "text/event-stream"
    if status != 200 or body != want or not ctype.startswith(kind):
        raise BenchError(
            f"{server.name} did not relay {w.reply.name}: HTTP {status}, {ctype}, {body[:300]!r}"
        )


# --- main ----------------------------------------------------------------------


def int_list(value: str) -> list[int]:
    try:
        counts = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {value!r}") from None
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError("connection counts must be positive")
    return counts


def workload_list(value: str) -> list[Workload]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names or set(names) - WORKLOADS.keys():
        raise argparse.ArgumentTypeError(f"workloads are a comma-separated subset of {','.join(WORKLOADS)}")
    return [WORKLOADS[n] for n in dict.fromkeys(names)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run (default 10)")
    p.add_argument(
        "--connections",
        type=int_list,
        default=[1, 8, 32],
        help="comma-separated wrk connection counts (default 1,8,32)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="seconds of unmeasured load before each measured run (default 2)",
    )
    p.add_argument("--rounds", type=int, default=3, help="runs of each server, interleaved (default 3)")
    p.add_argument(
        "--workload",
        type=workload_list,
        default=list(WORKLOADS.values()),
        help="comma-separated: json (non-streamed), stream (SSE) (default json,stream)",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="a second checkout (git worktree add DIR <commit>), its gateway run beside",
    )
    p.add_argument(
        "--ops",
        action="store_true",
        help="also run this checkout's gateway without metrics, with the access log, with traces at "
        "1%% and under reloads (ops.py); writes results_ops.md instead of results.md",
    )
    args = p.parse_args(argv)
    if args.duration < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--duration and --rounds must be >= 1 and --warmup >= 0")
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if not (args.baseline / "gateway" / "cli.py").is_file():
            p.error(
                f"--baseline {args.baseline}: no gateway/cli.py there; make it with "
                "`git worktree add DIR <commit>`"
            )
    return args


def preflight() -> None:
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not on PATH")
    # Pinning to CPU 1 on a 1-core box would fail late, inside taskset, with a cryptic message.
    if not {0, 1} <= os.sched_getaffinity(0):
        raise BenchError("needs CPUs 0 and 1 (the relays on one, nginx and wrk on the other)")
    events = sse_events(WORKLOADS["stream"].reply.read_bytes())
    if len(events) != SSE_EVENTS + 1 or events[-1] != b"[DONE]":
        raise BenchError(f"reply.sse should hold {SSE_EVENTS} chunks and [DONE], not {len(events)} events")


def measure(
    args: argparse.Namespace, servers: Sequence[Server], nginx_workers: Sequence[int], wrk_log: Path
) -> Samples:
    samples = Samples()
    for w in args.workload:
        for n in args.connections:
            for r in range(args.rounds):
                # Every server once per round, back and forth, so that a drift in the machine's
                # load falls on each alike; the medians and the per-round ratios do the rest.
                for server in servers if r % 2 == 0 else servers[::-1]:
                    url = server.url(w)
                    if args.warmup:
                        run_wrk(n, args.warmup, url, w.script, wrk_log)
                    # CPU time per request holds up under a noisy neighbour far better than RPS
                    # does, and the stolen shares say how noisy the neighbours were.
                    with (
                        ops.reloads(server.name, server.origin, getattr(args, "reloaded", None)) as reloads,
                        CoreShare(GATEWAY_CPU, server.pids) as core,
                        CoreShare(LOAD_CPU, nginx_workers, children_ticks) as load,
                    ):
                        result = run_wrk(n, args.duration, url, w.script, wrk_log)
                    if any(status != 200 for status in reloads):
                        raise BenchError(f"a reload under load failed: HTTP {reloads}")
                    for s in servers:
                        s.proc.ensure_alive()
                    # nginx is measured from wrk's core, and CPU 0, idle then, is anyone's
                    cpu_us = core.ours / CLK_TCK * 1e6 / result.requests if server.pids else None
                    samples.runs.append(
                        Sample(
                            w.name,
                            n,
                            server.name,
                            r,
                            result,
                            cpu_us,
                            core.stolen if server.pids else None,
                            load.stolen,
                        )
                    )
                    print(
                        f"proxy_overhead: {w.name} {n} conn round {r + 1}: {server.name} "
                        f"{result.rps:,.0f} req/s"
                        + (f", {cpu_us:.0f} us CPU/req" if cpu_us else "")
                        + f" (others: CPU {GATEWAY_CPU} {core.stolen:.0%}, CPU {LOAD_CPU} "
                        f"{load.stolen:.0%})",
                        file=sys.stderr,
                    )
    return samples


def bench(args: argparse.Namespace) -> bool:
    """Runs everything; returns False when wrk reported errors (the tables are still printed)."""
    preflight()
    # The numbers are only as good as the machine is quiet: say so up front, and in results.md.
    busy = background_busy()
    if busy > 0.1:
        print(
            f"proxy_overhead: warning: {busy:.0%} of the CPUs were busy with other work just before "
            "the run; expect noisy numbers",
            file=sys.stderr,
        )
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="proxy_overhead-", dir=WORK_ROOT))
    wrk_log = work / "wrk.log"
    print(f"proxy_overhead: work dir {work}", file=sys.stderr)
    requests = {}
    for w in args.workload:
        body = re.search(r"wrk\.body\s*=\s*'(.*)'", w.script.read_text())
        if body is None:
            raise BenchError(f"cannot find wrk.body in {w.script.name}")
        requests[w.name] = body.group(1).encode()

    nginx_port, thin_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{nginx_port}"
    nginx_conf = render_nginx(work, nginx_port, WORKLOADS["json"].reply.read_text().strip())
    nginx_cmd = [
        "taskset",
        "-c",
        LOAD_CPU,
        "nginx",
        "-c",
        str(nginx_conf),
        "-p",
        str(work),
        "-e",
        str(work / "error.log"),
    ]  # -e: else nginx first tries /var/log/nginx
    thin_cmd = [
        "taskset",
        "-c",
        GATEWAY_CPU,
        str(VENV_BIN / "python"),
        str(HERE / "thin_proxy.py"),
        upstream,
        str(thin_port),
    ]
    routing = write_routing(work, upstream)
    python = VENV_BIN / "python"
    if not python.exists():
        raise BenchError(f"no {python}: run scripts/setup first")
    gateways = [
        launch(name, checkout, python, GATEWAY_CPU, routing, free_port(), work)
        for name, checkout in (("baseline", args.baseline), ("gateway", REPO))
        if checkout
    ]
    if args.ops:
        gateways += ops.variants(next(g for g in gateways if g.name == "gateway"), work, routing)
        args.reloaded = work / "routing-reloaded.yaml"

    with ExitStack() as stack:
        nginx = stack.enter_context(started("nginx", nginx_cmd, work / "nginx.log"))
        wait_until(nginx, f"{upstream}/", None)
        nginx_workers = [
            int(p)
            for p in Path(f"/proc/{nginx.popen.pid}/task/{nginx.popen.pid}/children").read_text().split()
        ]
        thin = stack.enter_context(started("thin", thin_cmd, work / "thin.log"))
        servers = [
            Server("direct", nginx, upstream, True),
            Server("thin", thin, f"http://127.0.0.1:{thin_port}", True, [thin.popen.pid]),
        ]
        for g in gateways:
            proc = stack.enter_context(started(g.name, g.argv, work / f"{g.name}.log", g.checkout, g.env))
            servers.append(Server(g.name, proc, f"http://127.0.0.1:{g.port}", False, [proc.popen.pid]))
        wait_until(thin, f"{servers[1].origin}/", None)
        for server in servers[2:]:
            wait_until(server.proc, f"{server.origin}/health/ready", 200)
        # The code the gateway runs is what its checkout held when it started (others may edit it).
        commits = {g.name: git_state(g.checkout) for g in gateways}
        for server in servers:
            for w in args.workload:
                check_reply(server, w, requests[w.name])
        rss_before = {s.name: rss_kib(s.proc.popen.pid) for s in servers[2:]}
        samples = measure(args, servers, nginx_workers, wrk_log)
        time.sleep(1)  # let the last requests' buffers go before calling it idle
        rss = {s.name: (rss_before[s.name], rss_kib(s.proc.popen.pid)) for s in servers[2:]}
    loaded = {}
    for g in gateways:  # after the stop: run_checkout.py writes the record at exit
        try:
            loaded[g.name] = check_loaded(g.record, g.checkout)
        except ValueError as exc:
            raise BenchError(f"{g.name}: {exc}; logs in {work}") from None

    text = report_text(
        samples,
        [w.name for w in args.workload],
        args.connections,
        [s.name for s in servers],
        args.rounds,
        rss,
        loaded,
    )
    if args.ops:
        text += (
            "\n\n## Operations features (--ops)\n\nRatios of the medians, each variant over the "
            "gateway it differs from by one thing (ops.py says what each runs).\n\n"
            + ops.ops_table(samples, [w.name for w in args.workload], args.connections)
        )
    print(text)
    bad = [s for s in samples.runs if s.result.errors]
    if bad:
        for s in bad:
            print(
                f"proxy_overhead: {s.server} {s.workload} at {s.connections} connection(s): "
                f"{s.result.non_2xx} non-2xx responses, socket errors {s.result.socket_errors}",
                file=sys.stderr,
            )
        print(
            f"proxy_overhead: FAILED: wrk reported errors; results.md left as it was; logs in {work}",
            file=sys.stderr,
        )
        return False
    paths = {work: "WORK", **({args.baseline: "BASELINE"} if args.baseline else {})}
    facts = Facts(
        busy_before=busy,
        rounds=args.rounds,
        warmup=args.warmup,
        connections=args.connections,
        workloads=[w.name for w in args.workload],
        servers={
            "direct": shlex.join(nginx_cmd),
            "thin": shlex.join(thin_cmd),
            **{g.name: g.shown() for g in gateways},
        },
        loads={
            w.name: shlex.join(wrk_argv("<N>", args.duration, f"<url>{w.path}", w.script))
            for w in args.workload
        },
        gateway_commit=commits["gateway"],
        baseline=args.baseline,
        baseline_commit=commits.get("baseline", ""),
    )
    markdown = scrub(render(facts, text), paths)
    leaked = [
        p for p in (REPO, work, args.baseline, Path(tempfile.gettempdir())) if p and f"{p}/" in markdown
    ]
    if leaked:
        raise BenchError(f"results.md would hold paths of this machine: {leaked}; logs in {work}")
    results = HERE / "results_ops.md" if args.ops else RESULTS
    results.write_text(markdown.rstrip("\n") + "\n")
    print(f"\nproxy_overhead: wrote {results.relative_to(REPO)}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)  # kept on failure only: its logs are the evidence
    return True


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    # SystemExit unwinds through the ``finally`` blocks that stop nginx and the gateways; the
    # default SIGTERM action would leave them running.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return 0 if bench(args) else 1
    except BenchError as exc:
        print(f"proxy_overhead: FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("proxy_overhead: interrupted", file=sys.stderr)
        return 130
    finally:
        with suppress(Exception):
            sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
