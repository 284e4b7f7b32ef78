"""proxy_overhead.py's records and report: what each wrk run measured, the medians over the
rounds, the gateway / baseline ratios, and the markdown of results.md (with no path of the
machine that ran it)."""

from __future__ import annotations

import datetime as dt
import os
import re
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "backends", "policies")
#: the rule for the gateway against its baseline: at most 3% slower
WITHIN = 0.97


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
        raise ValueError(f"no {percentile}% latency line in wrk's output:\n{output}")
    return float(match.group(1)) * _UNIT_MS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    total = re.search(r"^\s*(\d+) requests in ", output, re.MULTILINE)
    if rps is None or total is None:
        raise ValueError(f"cannot parse wrk's output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    socket_errors = dict(
        zip(
            ("connect", "read", "write", "timeout"),
            (int(g) for g in sock.groups()) if sock else (0, 0, 0, 0),
            strict=True,
        )
    )
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=_latency_ms(output, "50"),
        p99_ms=_latency_ms(output, "99"),
        requests=int(total.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=socket_errors,
        output=output,
    )


@dataclass
class Sample:
    """One measured wrk run against one server."""

    workload: str
    connections: int
    server: str
    round_: int
    result: WrkResult
    #: the server process's CPU time per request, in microseconds (None: not measured, nginx)
    cpu_us: float | None
    #: share of the servers' core that other processes took during the run (None: not measured)
    stolen: float | None
    #: share of the load core (nginx, wrk) that other processes took during the run
    load_stolen: float


class Samples:
    """Every measured run, looked up by (workload, connections, server)."""

    def __init__(self) -> None:
        self.runs: list[Sample] = []

    def of(self, workload: str, connections: int, server: str) -> list[Sample]:
        return sorted(
            (
                s
                for s in self.runs
                if (s.workload, s.connections, s.server) == (workload, connections, server)
            ),
            key=lambda s: s.round_,
        )

    def median(
        self, workload: str, connections: int, server: str, value: Callable[[Sample], float | None]
    ) -> float | None:
        values = [v for s in self.of(workload, connections, server) if (v := value(s)) is not None]
        return statistics.median(values) if values else None


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} ms"


def _share(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def markdown(header: Sequence[str], body: Sequence[Sequence[str]], left: int = 1) -> str:
    """A markdown table, padded for a terminal; the first ``left`` columns left-aligned, the rest
    (numbers) right-aligned, and the separator says so."""
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i < left else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    rule = (
        "|" + "|".join("-" * (w + 2) if i < left else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    )
    return "\n".join([fmt(header), rule, *(fmt(b) for b in body)])


def medians_table(
    samples: Samples, workloads: Sequence[str], connections: Sequence[int], servers: Sequence[str]
) -> str:
    header = [
        "workload",
        "conn",
        "server",
        "req/s",
        "p50",
        "p99",
        "CPU/req",
        "CPU 0 others",
        "CPU 1 others",
        "errors",
    ]
    body = []
    for w in workloads:
        for n in connections:
            for server in servers:

                def med(
                    value: Callable[[Sample], float | None], w: str = w, n: int = n, server: str = server
                ) -> float | None:
                    return samples.median(w, n, server, value)

                rps = med(lambda s: s.result.rps)
                cpu = med(lambda s: s.cpu_us)
                body.append(
                    [
                        w,
                        str(n),
                        server,
                        f"{rps:,.0f}" if rps is not None else "-",
                        _ms(med(lambda s: s.result.p50_ms)),
                        _ms(med(lambda s: s.result.p99_ms)),
                        "-" if cpu is None else f"{cpu:.0f} us",
                        _share(med(lambda s: s.stolen)),
                        _share(med(lambda s: s.load_stolen)),
                        str(sum(s.result.errors for s in samples.of(w, n, server))),
                    ]
                )
    return markdown(header, body, left=3)


def ratio_table(samples: Samples, workloads: Sequence[str], connections: Sequence[int]) -> str:
    """Gateway against baseline: the ratio of the medians, each round's own ratio, CPU per request."""
    header = [
        "workload",
        "conn",
        "baseline req/s",
        "gateway req/s",
        "gateway / baseline",
        "per round",
        "p50 ratio",
        "CPU/req baseline",
        "CPU/req gateway",
        "CPU ratio",
        "gateway / thin",
        f">= {WITHIN}",
    ]
    body = []
    for w in workloads:
        for n in connections:

            def med(server: str, value: Callable[[Sample], float | None], w: str = w, n: int = n) -> float:
                return samples.median(w, n, server, value) or 0.0

            base, gw, thin = (med(s, lambda s: s.result.rps) for s in ("baseline", "gateway", "thin"))
            rounds = [
                g.result.rps / b.result.rps
                for b, g in zip(samples.of(w, n, "baseline"), samples.of(w, n, "gateway"), strict=True)
            ]
            p50 = med("gateway", lambda s: s.result.p50_ms) / med("baseline", lambda s: s.result.p50_ms)
            cpu_b, cpu_g = med("baseline", lambda s: s.cpu_us), med("gateway", lambda s: s.cpu_us)
            ratio = gw / base
            body.append(
                [
                    w,
                    str(n),
                    f"{base:,.0f}",
                    f"{gw:,.0f}",
                    f"{ratio:.3f}",
                    " ".join(f"{r:.2f}" for r in rounds),
                    f"{p50:.2f}",
                    f"{cpu_b:.0f} us",
                    f"{cpu_g:.0f} us",
                    f"{cpu_g / cpu_b:.2f}" if cpu_b else "-",
                    f"{gw / thin:.2f}" if thin else "-",
                    "yes" if ratio >= WITHIN else "NO",
                ]
            )
    return markdown(header, body, left=2)


def rss_line(name: str, before: dict[str, int], after: dict[str, int]) -> str:
    return (
        f"{name} idle RSS: {before['VmRSS'] / 1024:.1f} MiB before load, "
        f"{after['VmRSS'] / 1024:.1f} MiB after (peak {after.get('VmHWM', 0) / 1024:.1f} MiB)"
    )


def noise_line(samples: Samples) -> str:
    """How much of each core other processes took over the measured runs."""
    parts = []
    for label, values in (
        ("CPU 0 (the relays')", [s.stolen for s in samples.runs if s.stolen is not None]),
        ("CPU 1 (nginx and wrk)", [s.load_stolen for s in samples.runs]),
    ):
        if values:
            parts.append(f"{label}: median {statistics.median(values):.0%}, max {max(values):.0%}")
    return "Other processes' share of each core during the measured runs: " + "; ".join(parts)


def git_state(checkout: Path) -> str:
    """HEAD of ``checkout``, and whether its gateway, backends or policies differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(checkout), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--", *PACKAGES)
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


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return "unknown"


def scrub(text: str, names: dict[Path, str]) -> str:
    """``text`` with each path of ``names`` (and the repository) replaced by its placeholder,
    longest first, so that results.md holds no path of this machine."""
    subs = {str(REPO) + "/": "", str(REPO): "."}
    for path, name in names.items():
        for p in {str(path), str(path.resolve())}:
            subs[p] = name
    for old in sorted(subs, key=len, reverse=True):
        text = text.replace(old, subs[old])
    return text


def report_text(
    samples: Samples,
    workloads: Sequence[str],
    connections: Sequence[int],
    servers: Sequence[str],
    rounds: int,
    rss: dict[str, tuple[dict[str, int], dict[str, int]]],
    loaded: dict[str, int],
) -> str:
    """The tables and the notes under them, as printed and as results.md holds them."""
    parts = [
        f"## Medians over {rounds} round(s)",
        medians_table(samples, workloads, connections, servers),
        "CPU/req: the server process's CPU time per request. CPU 0 / CPU 1 others: the share of "
        "that core other processes (other people's work on a shared machine) used during the run; "
        "CPU 0 holds the relay measured, the bottleneck, so there it is time the relay lost; on "
        "CPU 1 it is mostly time nginx and wrk left idle.",
    ]
    if "baseline" in servers:
        parts += [
            "## Gateway / baseline",
            "req/s (streams/s for stream) and CPU time per request, medians; `per round`: each "
            "round's gateway req/s over that round's baseline req/s.",
            ratio_table(samples, workloads, connections),
        ]
    parts += [rss_line(name, before, after) for name, (before, after) in rss.items()]
    parts += [
        noise_line(samples),
        "Code loaded, checked by run_checkout.py at start and from its record at exit: "
        + "; ".join(
            f"{name}: {n} modules of {'/'.join(PACKAGES)}, all from "
            f"{'BASELINE' if name == 'baseline' else 'this checkout'}"
            for name, n in loaded.items()
        ),
    ]
    return "\n\n".join(parts)


@dataclass
class Facts:
    """What results.md says about the run besides the tables."""

    busy_before: float
    rounds: int
    warmup: int
    connections: Sequence[int]
    workloads: Sequence[str]
    servers: dict[str, str]  # name -> its command line (with cwd and environment)
    loads: dict[str, str]  # workload -> the wrk command line
    gateway_commit: str
    baseline: Path | None
    baseline_commit: str


def render(facts: Facts, text: str) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Proxy overhead",
        "",
        "Requests/s and latency of a small chat completion, non-streamed (json: one JSON body) and",
        "streamed (stream: 64 chat.completion.chunk events and `data: [DONE]`, 13 KB, all sent at once),",
        "straight to a static nginx upstream (direct), through the thinnest starlette+aiohttp relay",
        "(thin), through the gateway of this checkout (gateway) and, side by side, through the gateway of",
        "a baseline checkout (baseline), each on one core, measured by",
        "`benchmarks/proxy_overhead/proxy_overhead.py`. For the stream, req/s is streams/s and the",
        "latency is to the end of the stream.",
        "",
        f"- date: {now}",
        f"- nproc: {os.cpu_count()} ({cpu_model()}); CPU busy with other work just before the run: "
        f"{facts.busy_before:.0%} (during it: see the CPU 0 / CPU 1 others columns and the note below)",
        f"- command: `{command_line()}`",
        f"- gateway: git commit {facts.gateway_commit}",
    ]
    if facts.baseline is not None:
        sha = facts.baseline_commit.split()[0]
        lines.append(
            f"- baseline: git commit {facts.baseline_commit}; BASELINE is a second checkout, "
            f"made with `git worktree add BASELINE {sha[:7]}`"
        )
    lines += [f"- {name}: `{cmd}`" for name, cmd in facts.servers.items()]
    lines += [f"- load ({w}): `{cmd}`" for w, cmd in facts.loads.items()]
    lines += [
        f"- {facts.rounds} round(s) of every server, order reversed every other round, for "
        f"{'/'.join(facts.workloads)} at {','.join(map(str, facts.connections))} connection(s); "
        f"each run after a {facts.warmup}s warm-up run; the tables are medians over the rounds; "
        "nginx and wrk on CPU 1, thin, baseline and gateway on CPU 0 (one at a time under load)",
        f"- versions: {tool_version(['wrk', '-v'])}; {tool_version(['nginx', '-v'])}; "
        f"Python {sys.version.split()[0]}",
        "",
        text,
    ]
    return "\n".join(lines)
