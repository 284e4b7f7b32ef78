"""Proxy overhead: what the gateway adds on top of an upstream that costs (almost) nothing.

nginx plays a static OpenAI-compatible server (``nginx.conf.in``), so every microsecond
measured beyond the direct run is the gateway's own: parsing, validation, routing, the
aiohttp hop and the response. wrk drives both, at a few concurrency levels, and the
script prints a markdown table and writes it to ``results.md`` beside this file.

Placement on a 2-core box: the gateway alone on CPU 0 (its one core, which is what the
RPS target is about), nginx and wrk share CPU 1. nginx answers a canned body in a few
microseconds, so sharing a core with wrk barely moves the direct numbers.

Run from the repository root::

    .venv/bin/python benchmarks/proxy_overhead/proxy_overhead.py [--duration 10] [--connections 1,8,32]

This is a benchmark, not a test: it only reports, except that it exits non-zero when a
step fails or wrk sees errors, so that a broken number never lands in ``results.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
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
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORK_ROOT = REPO / "benchmarks" / ".work"
RESULTS = HERE / "results.md"
VENV_BIN = REPO / ".venv" / "bin"

# nginx, and wrk with it, on one core; the gateway alone on the other.
GATEWAY_CPU = "0"
LOAD_CPU = "1"

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


class BenchError(Exception):
    """A step that failed; the message says which and points at the logs."""


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
            raise BenchError(f"{self.name} exited with status {self.popen.returncode}; "
                             f"last lines of {self.log}:\n{self.log_tail()}")


@contextmanager
def started(name: str, argv: Sequence[str], log: Path) -> Iterator[Proc]:
    """Runs ``argv`` for the duration of the block and always stops it, whatever ends the block."""
    with log.open("wb") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=REPO)
    proc = Proc(name, popen, log)
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: Proc) -> None:
    if proc.popen.poll() is not None:
        return
    # SIGTERM is a clean stop for both: nginx's fast shutdown, uvicorn's graceful one (no requests
    # are in flight by now, so it does not wait out its drain period).
    proc.popen.send_signal(signal.SIGTERM)
    try:
        proc.popen.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"proxy_overhead: {proc.name} ignored SIGTERM for {STOP_TIMEOUT_S:g}s; killing it",
              file=sys.stderr)
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


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"content-type": "application/json"} if body else {})
    try:
        with _OPENER.open(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(proc: Proc, url: str, want_status: int | None) -> None:
    """Polls ``url`` until it answers (with ``want_status``, if given), failing fast if ``proc`` dies."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        proc.ensure_alive()
        try:
            status, body = http("GET", url)
        except OSError as exc:
            last = str(exc)
        else:
            if want_status is None or status == want_status:
                return
            last = f"HTTP {status}: {body[:200]!r}"
        time.sleep(0.1)
    raise BenchError(f"{proc.name} was not ready at {url} within {STARTUP_TIMEOUT_S:g}s ({last}); "
                     f"last lines of {proc.log}:\n{proc.log_tail()}")


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid``, in clock ticks."""
    # Fields after the ")" that closes the command name, which may itself hold spaces or ")".
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def core_ticks(cpu: str) -> tuple[int, int]:
    """(busy, total) clock ticks of one CPU since boot, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            values = [int(v) for v in line.split()[1:9]]  # guest time is already inside user
            return sum(values) - values[3] - values[4], sum(values)
    raise BenchError(f"no cpu{cpu} line in /proc/stat")


@dataclass
class CoreShare:
    """What one process used of the core it is pinned to over a span, and what everything else used."""

    pid: int
    cpu: str
    proc0: int = 0
    busy0: int = 0
    total0: int = 0
    proc_ticks: int = 0
    stolen: float = 0.0

    def __enter__(self) -> CoreShare:
        self.proc0 = cpu_ticks(self.pid)
        self.busy0, self.total0 = core_ticks(self.cpu)
        return self

    def __exit__(self, *_: object) -> None:
        busy1, total1 = core_ticks(self.cpu)
        self.proc_ticks = cpu_ticks(self.pid) - self.proc0
        # The process is pinned, so whatever else kept this core busy was someone else's work.
        self.stolen = max(0, busy1 - self.busy0 - self.proc_ticks) / max(1, total1 - self.total0)


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid``, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    if "VmRSS" not in out:
        raise BenchError(f"no VmRSS in /proc/{pid}/status")
    return out


# --- nginx and the gateway ---------------------------------------------------


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
    return path


def write_routing(work: Path, upstream_port: int) -> Path:
    # JSON is YAML; writing it this way needs no YAML library in whatever Python runs this.
    path = work / "routing.yaml"
    path.write_text(
        "backends:\n"
        "  upstream:\n"
        "    kind: openai\n"
        f"    base_url: http://127.0.0.1:{upstream_port}/v1\n"
        "    model: smollm2\n"
        "models:\n"
        "  chat:\n"
        "    targets: [upstream]\n"
    )
    return path


def gateway_argv(config: Path, port: int) -> list[str]:
    args = ["serve", "--config", str(config), "--port", str(port), "--log-level", "warning"]
    script = VENV_BIN / "interlock"
    if script.exists():
        return [str(script), *args]
    # An un-installed checkout has no console script; this is exactly what it would run.
    python = VENV_BIN / "python"
    if not python.exists():
        raise BenchError(f"no {script} and no {python}: run scripts/setup first")
    return [str(python), "-c", "import sys; from gateway.cli import main; main(sys.argv[1:])", *args]


# --- wrk -----------------------------------------------------------------------


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: dict[str, int]
    output: str

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _latency_ms(output: str, percentile: str) -> float:
    match = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.MULTILINE)
    if match is None:
        raise BenchError(f"no {percentile}% latency line in wrk's output:\n{output}")
    return float(match.group(1)) * _UNIT_MS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    total = re.search(r"^\s*(\d+) requests in ", output, re.MULTILINE)
    if rps is None or total is None:
        raise BenchError(f"cannot parse wrk's output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    socket_errors = dict(zip(("connect", "read", "write", "timeout"),
                             (int(g) for g in sock.groups()) if sock else (0, 0, 0, 0), strict=True))
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=_latency_ms(output, "50"),
        p99_ms=_latency_ms(output, "99"),
        requests=int(total.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=socket_errors,
        output=output,
    )


def wrk_argv(connections: int, duration: int, url: str) -> list[str]:
    return ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency",
            "-s", str(HERE / "post.lua"), url]


def run_wrk(connections: int, duration: int, url: str, log: Path) -> WrkResult:
    argv = wrk_argv(connections, duration, url)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish: {shlex.join(argv)}") from None
    with log.open("a") as f:
        f.write(f"$ {shlex.join(argv)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        raise BenchError(f"wrk exited with status {done.returncode}: {shlex.join(argv)}\n"
                         f"{done.stdout}{done.stderr}")
    result = parse_wrk(done.stdout)
    if result.requests == 0:
        raise BenchError(f"wrk completed no requests: {shlex.join(argv)}\n{done.stdout}")
    return result


# --- report --------------------------------------------------------------------


@dataclass
class Row:
    connections: int
    direct: WrkResult
    thin: WrkResult
    gateway: WrkResult
    #: the gateway process's CPU time per request during its measured run, in microseconds
    gateway_cpu_us: float
    #: share of the gateway's core that other processes took during that run
    stolen: float


def table(rows: Sequence[Row]) -> str:
    header = ["connections", "direct RPS", "direct p50", "thin RPS", "thin p50", "gateway RPS",
              "gateway p50", "gateway p99", "added p50 (ms)", "gateway / thin", "errors"]
    body = [
        [
            str(r.connections),
            f"{r.direct.rps:,.0f}",
            f"{r.direct.p50_ms:.3f} ms",
            f"{r.thin.rps:,.0f}",
            f"{r.thin.p50_ms:.3f} ms",
            f"{r.gateway.rps:,.0f}",
            f"{r.gateway.p50_ms:.3f} ms",
            f"{r.gateway.p99_ms:.3f} ms",
            f"{r.gateway.p50_ms - r.direct.p50_ms:+.3f}",
            f"{r.gateway.rps / r.thin.rps:.2f}" if r.thin.rps else "-",
            str(r.direct.errors + r.thin.errors + r.gateway.errors),
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(cells: Sequence[str]) -> str:
        # Numbers right-aligned (and the separator says so) so columns read at a glance in a terminal.
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":"
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(header), rule, *(fmt(b) for b in body)])


def rss_line(before: dict[str, int], after: dict[str, int]) -> str:
    return (f"Gateway idle RSS: {before['VmRSS'] / 1024:.1f} MiB before load, "
            f"{after['VmRSS'] / 1024:.1f} MiB after (peak {after.get('VmHWM', 0) / 1024:.1f} MiB)")


def cpu_line(rows: Sequence[Row]) -> str:
    per_level = "; ".join(f"{r.connections} conn: {r.gateway_cpu_us:.0f} us "
                          f"({r.stolen:.0%} of the core taken by other processes)" for r in rows)
    return f"Gateway CPU time per request: {per_level}"


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{sha} (with uncommitted changes)" if dirty else sha


def command_line() -> str:
    # /proc/self/cmdline is what was actually typed (interpreter path included), unlike sys.argv.
    try:
        argv = Path("/proc/self/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        return shlex.join(a.decode(errors="replace") for a in argv)
    except OSError:
        return shlex.join([sys.executable, *sys.argv])


def tool_version(argv: Sequence[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return ((done.stdout or done.stderr).strip().splitlines() or ["unknown"])[0]


def background_busy(seconds: float = 2.0) -> float:
    """Share (0-1) of all CPUs that something else kept busy just before the run."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, total without guest time

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return "unknown"


def write_results(text: str, notes: str, gateway_cmd: Sequence[str], args: argparse.Namespace,
                  busy: float) -> None:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = shlex.join(wrk_argv(0, args.duration, "<url>/v1/chat/completions")).replace("-c0", "-c<N>")
    RESULTS.write_text(
        "# Proxy overhead\n\n"
        "Requests/s and latency of a small non-streaming chat completion, straight to a static nginx\n"
        "upstream and through the gateway (one gateway core), measured by "
        "`benchmarks/proxy_overhead/proxy_overhead.py`.\n\n"
        f"- date: {now}\n"
        f"- nproc: {os.cpu_count()} ({cpu_model()}); CPU busy with other work just before the run: "
        f"{busy:.0%}\n"
        f"- command: `{command_line()}`\n"
        f"- git commit: {git_commit()}\n"
        f"- gateway: `taskset -c {GATEWAY_CPU} {shlex.join(gateway_cmd)}`\n"
        f"- load: `{load}`"
        f" for N in {','.join(map(str, args.connections))}, each after a {args.warmup}s warm-up run, "
        f"nginx and wrk on CPU {LOAD_CPU}\n"
        f"- versions: {tool_version(['wrk', '-v'])}; {tool_version(['nginx', '-v'])}; "
        f"Python {sys.version.split()[0]}\n\n"
        f"{text}\n\n{notes}\n"
    )


# --- main ----------------------------------------------------------------------


def connection_list(value: str) -> list[int]:
    try:
        counts = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {value!r}") from None
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError("connection counts must be positive")
    return counts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run (default 10)")
    p.add_argument("--connections", type=connection_list, default=[1, 8, 32],
                   help="comma-separated wrk connection counts (default 1,8,32)")
    p.add_argument("--warmup", type=int, default=2,
                   help="seconds of unmeasured load before each measured run (default 2)")
    args = p.parse_args(argv)
    if args.duration < 1 or args.warmup < 0:
        p.error("--duration must be >= 1 and --warmup >= 0")
    return args


def preflight() -> None:
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not on PATH")
    # Pinning to CPU 1 on a 1-core box would fail late, inside taskset, with a cryptic message.
    if not {0, 1} <= os.sched_getaffinity(0):
        raise BenchError("needs CPUs 0 and 1 (the gateway on one, nginx and wrk on the other)")


def bench(args: argparse.Namespace) -> bool:
    """Runs everything; returns False when wrk reported errors (the table is still printed)."""
    preflight()
    # The numbers are only as good as the machine is quiet: say so up front, and in results.md.
    busy = background_busy()
    if busy > 0.1:
        print(f"proxy_overhead: warning: {busy:.0%} of the CPUs were busy with other work just before "
              "the run; expect noisy numbers", file=sys.stderr)
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="proxy_overhead-", dir=WORK_ROOT))
    reply = (HERE / "reply.json").read_text().strip()
    wrk_log = work / "wrk.log"
    print(f"proxy_overhead: work dir {work}", file=sys.stderr)

    nginx_port, gateway_port = free_port(), free_port()
    nginx_conf = render_nginx(work, nginx_port, reply)
    direct_url = f"http://127.0.0.1:{nginx_port}/v1/chat/completions"
    gateway_base = f"http://127.0.0.1:{gateway_port}"
    gateway_url = f"{gateway_base}/v1/chat/completions"
    request_body = re.search(r"wrk\.body\s*=\s*'(.*)'", (HERE / "post.lua").read_text())
    if request_body is None:
        raise BenchError("cannot find wrk.body in post.lua")

    nginx_cmd = ["taskset", "-c", LOAD_CPU, "nginx", "-c", str(nginx_conf), "-p", str(work),
                 "-e", str(work / "error.log")]  # -e: else nginx first tries /var/log/nginx
    gateway_cmd = gateway_argv(write_routing(work, nginx_port), gateway_port)

    with started("nginx", nginx_cmd, work / "nginx.log") as nginx:
        wait_until(nginx, f"http://127.0.0.1:{nginx_port}/", None)
        # Both sanity checks compare bodies: a typo in the route or escaping would otherwise show
        # up only as suspiciously good numbers for the wrong response.
        status, body = http("POST", direct_url, request_body.group(1).encode())
        if status != 200 or body != reply.encode():
            raise BenchError(f"nginx did not serve reply.json: HTTP {status}, {body[:200]!r}")

        thin_port = free_port()
        thin_url = f"http://127.0.0.1:{thin_port}/v1/chat/completions"
        thin_cmd = ["taskset", "-c", GATEWAY_CPU, str(VENV_BIN / "python"), str(HERE / "thin_proxy.py"),
                    direct_url, str(thin_port)]
        with started("thin", thin_cmd, work / "thin.log") as thin_proc, \
                started("gateway", ["taskset", "-c", GATEWAY_CPU, *gateway_cmd], work / "gateway.log") as gw:
            wait_until(thin_proc, f"http://127.0.0.1:{thin_port}/", None)
            wait_until(gw, f"{gateway_base}/health/ready", 200)
            status, body = http("POST", gateway_url, request_body.group(1).encode())
            if status != 200 or body != reply.encode():
                raise BenchError(f"the gateway did not relay reply.json: HTTP {status}, {body[:300]!r}")
            rss_before = rss_kib(gw.popen.pid)

            rows: list[Row] = []
            for n in args.connections:
                # Direct and gateway back to back per level, so that the pair being subtracted
                # shares whatever the machine was doing at the time.
                if args.warmup:
                    run_wrk(n, args.warmup, direct_url, wrk_log)
                direct = run_wrk(n, args.duration, direct_url, wrk_log)
                nginx.ensure_alive()
                # The yardstick: the thinnest starlette+aiohttp relay on the same core, same load.
                if args.warmup:
                    run_wrk(n, args.warmup, thin_url, wrk_log)
                thin = run_wrk(n, args.duration, thin_url, wrk_log)
                thin_proc.ensure_alive()
                if args.warmup:
                    run_wrk(n, args.warmup, gateway_url, wrk_log)
                # CPU time per request holds up under a noisy neighbour far better than RPS does,
                # and the stolen share says how noisy the neighbour was.
                with CoreShare(gw.popen.pid, GATEWAY_CPU) as share:
                    gateway = run_wrk(n, args.duration, gateway_url, wrk_log)
                gw.ensure_alive()
                nginx.ensure_alive()
                cpu_us = share.proc_ticks / os.sysconf("SC_CLK_TCK") * 1e6 / gateway.requests
                rows.append(Row(n, direct, thin, gateway, cpu_us, share.stolen))
                print(f"proxy_overhead: {n} connection(s): direct {direct.rps:,.0f} rps, "
                      f"gateway {gateway.rps:,.0f} rps ({cpu_us:.0f} us CPU/request, "
                      f"{share.stolen:.0%} of CPU {GATEWAY_CPU} taken by other work)", file=sys.stderr)

            time.sleep(1)  # let the last requests' buffers go before calling it idle
            rss_after = rss_kib(gw.popen.pid)

    text = table(rows)
    notes = "\n\n".join([rss_line(rss_before, rss_after), cpu_line(rows)])
    print(text)
    print()
    print(notes)
    if any(r.stolen > 0.05 for r in rows):
        print(f"proxy_overhead: warning: other processes used CPU {GATEWAY_CPU} during the gateway runs; "
              "RPS and latency understate the gateway", file=sys.stderr)
    bad = [(r.connections, name, res) for r in rows
           for name, res in (("direct", r.direct), ("thin", r.thin), ("gateway", r.gateway)) if res.errors]
    if bad:
        for n, name, res in bad:
            print(f"proxy_overhead: {name} at {n} connection(s): {res.non_2xx} non-2xx responses, "
                  f"socket errors {res.socket_errors}", file=sys.stderr)
        print(f"proxy_overhead: FAILED: wrk reported errors; results.md left as it was; logs in {work}",
              file=sys.stderr)
        return False
    write_results(text, notes, gateway_cmd, args, busy)
    print(f"\nproxy_overhead: wrote {RESULTS.relative_to(REPO)}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)  # kept on failure only: its logs are the evidence
    return True


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    # SystemExit unwinds through the ``finally`` blocks that stop nginx and the gateway; the default
    # SIGTERM action would leave both running.
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
