"""Per-key limits benchmark (issue 17, "Benchmark"): the same gateway with limits off and with
limits on (a private loopback Redis), side by side in one run, at about 1,000 requests a second.

nginx plays a static OpenAI-compatible upstream with ``benchmarks/proxy_overhead``'s
``nginx.conf.in`` and ``reply.json`` (read by path). Two gateway processes serve one route: ``off``
has no ``limits:``; ``on`` has rpm, tpm and max_parallel on every key (``*``), set far above the
offered load so that nothing is refused and each request pays the admission script and the
settling script. wrk drives each in turn with ``paced.lua`` (``--connections`` connections, each
pausing 70% of ``1000 * connections / --rps`` ms between requests, the rest being the request),
``--rounds`` interleaved rounds of ``--duration`` s; the table holds each round's req/s, p50 and
p99, and the gateway process's CPU time per request (user + system, from ``/proc``: steadier
than the latencies on a shared machine), then the median added p99 and CPU, and the limit
scripts Redis ran per limited request.

Placement (when ``taskset`` exists and there are 2+ cores): gateways on CPU 0, nginx, Redis and
wrk on CPU 1. Run from the repository root::

    python benchmarks/limits/bench.py [--rounds 3] [--duration 5] [--rps 1000] [--connections 8]

It prints the table and writes it to ``results.md`` beside this file (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PROXY = REPO / "benchmarks" / "proxy_overhead"
sys.path.insert(0, str(PROXY))

from proxy_overhead import free_port, nginx_body, started  # noqa: E402
from report import parse_wrk  # noqa: E402

LIMITS = """limits:
  keys:
    "*": {rpm: 10000000, tpm: 1000000000, max_parallel: 100000}
"""


def pinned(cpu: str, argv: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", cpu, *argv]
    return argv


def routing(work: Path, upstream: str, limits: bool) -> Path:
    text = f"""backends:
  up: {{kind: openai, base_url: "{upstream}/v1", model: smollm2}}
models:
  chat: {{targets: [up]}}
resilience: {{health_check: {{interval_s: 0}}}}
{LIMITS if limits else ""}"""
    path = work / ("on.yaml" if limits else "off.yaml")
    path.write_text(text)
    return path


def wait_http(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} never answered 200")
        time.sleep(0.1)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (``taskset`` execs: the same pid)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fallback_checks(origin: str) -> int:
    """Limit checks the gateway decided without Redis (a timeout, the breaker open): each one is
    a request that did not pay the round trip, so a run with many does not measure Redis."""
    with urllib.request.urlopen(origin + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("interlock_limit_decisions_total{") and 'tier="redis"' not in line
    )


def one_request(origin: str) -> dict[str, str]:
    body = b'{"model":"chat","messages":[{"role":"user","content":"hi"}],"max_tokens":24}'
    request = urllib.request.Request(
        origin + "/v1/chat/completions", body, {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return dict(reply.headers)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--rps", type=int, default=1000)
    p.add_argument("--connections", type=int, default=12)
    p.add_argument("--out", type=Path, default=HERE / "results.md")
    p.add_argument("--note", default="", help="a line on the machine's state, put in the results")
    args = p.parse_args()
    for tool in ("nginx", "wrk", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    # each connection's cycle is its pause plus a request's latency (a few ms here): pause 70% of it
    delay_ms = max(1, round(0.7 * 1000 * args.connections / args.rps))
    with tempfile.TemporaryDirectory(prefix="limits-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        work.chmod(0o755)
        nginx_port, redis_port = free_port(), free_port()
        conf = (PROXY / "nginx.conf.in").read_text().replace("@PREFIX@", str(work))
        conf = conf.replace("@PORT@", str(nginx_port))
        conf = conf.replace("@BODY@", nginx_body((PROXY / "reply.json").read_text().strip()))
        (work / "reply.sse").write_text((PROXY / "reply.sse").read_text())
        (work / "nginx.conf").write_text(conf)
        stack.enter_context(
            started(
                "nginx",
                pinned("1", ["nginx", "-c", str(work / "nginx.conf"), "-p", str(work)]),
                work / "nginx.log",
            )
        )
        redis_argv = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]
        stack.enter_context(
            started("redis", pinned("1", [*redis_argv, "--dir", str(work)]), work / "redis.log")
        )
        upstream = f"http://127.0.0.1:{nginx_port}"
        origins: dict[str, str] = {}
        pids: dict[str, int] = {}
        for name in ("off", "on"):
            port = free_port()
            env = {
                **os.environ,
                "PYTHONPATH": str(REPO),
                "INTERLOCK_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                "INTERLOCK_SHUTDOWN_DELAY_S": "0",
                "INTERLOCK_RELOAD_WATCH": "false",
            }
            argv = [
                sys.executable,
                "-m",
                "gateway.cli",
                "serve",
                "--config",
                str(routing(work, upstream, name == "on")),
            ]
            argv += ["--port", str(port), "--log-level", "warning"]
            proc = stack.enter_context(
                started(f"gateway-{name}", pinned("0", argv), work / f"{name}.log", env=env)
            )
            pids[name] = proc.popen.pid
            origins[name] = f"http://127.0.0.1:{port}"
        for origin in origins.values():
            wait_http(origin + "/health/ready")
        headers = one_request(origins["on"])
        if "x-ratelimit-limit-requests" not in {k.lower() for k in headers}:
            raise SystemExit("the limits-on gateway sent no x-ratelimit headers: limits are not on")
        rows: dict[str, list[tuple[float, float, float, int, float]]] = {"off": [], "on": []}
        env = {**os.environ, "DELAY_MS": str(delay_ms)}
        for r in range(args.rounds):
            order = ["off", "on"] if r % 2 == 0 else ["on", "off"]
            for name in order:
                wrk = pinned("1", ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency"])
                wrk += ["-s", str(HERE / "paced.lua"), origins[name] + "/v1/chat/completions"]
                before = cpu_s(pids[name])
                done = subprocess.run(
                    wrk, capture_output=True, text=True, env=env, timeout=args.duration + 60
                )
                result = parse_wrk(done.stdout)
                per_request_us = (cpu_s(pids[name]) - before) / max(1, result.rps * args.duration) * 1e6
                rows[name].append((result.rps, result.p50_ms, result.p99_ms, result.errors, per_request_us))
        stats = subprocess.run(
            ["redis-cli", "-p", str(redis_port), "info", "commandstats"], capture_output=True, text=True
        ).stdout
        scripts = sum(
            int(line.split("calls=")[1].split(",")[0])
            for line in stats.splitlines()
            if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:"))
        )
        served = sum(int(rps * args.duration) for rps, *_ in rows["on"])
        fallbacks = fallback_checks(origins["on"])
    pairs = list(zip(rows["on"], rows["off"], strict=True))
    added = statistics.median(on[2] - off[2] for on, off in pairs)
    added_cpu = statistics.median(on[4] - off[4] for on, off in pairs)
    lines = [
        "| limits | round | req/s | p50 ms | p99 ms | errors | gateway CPU us/req |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("off", "on"):
        for i, (rps, p50, p99, errors, cpu) in enumerate(rows[name], start=1):
            lines.append(f"| {name} | {i} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {errors} | {cpu:.0f} |")
    table = "\n".join(lines)
    summary = (
        f"Median added p99 (on - off, paired by round): {added:+.2f} ms (the issue's target: at most +1 ms); "
        f"median added gateway CPU: {added_cpu:+.0f} us a request. "
        f"Redis ran {scripts:,} limit scripts for about {served:,} limited requests "
        f"({scripts / max(1, served):.2f} each: an admission, and the settlements that rode with it); "
        f"{fallbacks:,} limit checks were decided without Redis (timeouts: a run with many is void)."
    )
    print(table)
    print(summary)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    args.out.write_text(
        "# Per-key limits benchmark\n\n"
        f"Written by `benchmarks/limits/bench.py` on {stamp}: `python benchmarks/limits/bench.py "
        f"--rounds {args.rounds} --duration {args.duration} --rps {args.rps} "
        f"--connections {args.connections}`"
        f" ({args.connections} connections, each pausing {delay_ms} ms between requests).\n\n"
        + (f"{args.note}\n\n" if args.note else "")
        + table
        + "\n\n"
        + summary
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
