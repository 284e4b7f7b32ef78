"""``interlock serve --workers N`` side by side: the same gateway with 1, 2, ... workers, one run.

nginx is the static upstream (``nginx.conf.in``, ``reply.json``, ``reply.sse``, as in
``proxy_overhead.py``); each gateway (this checkout, ``python -m gateway.cli serve --workers N``)
is pinned to its first N ``--gateway-cpus``, and nginx and wrk to ``--load-cpus``, so N workers
get N cores and the load generator none of theirs. Rounds are interleaved; the table holds
medians over the rounds and each N's ratio to 1 worker.

    python benchmarks/proxy_overhead/workers.py [--workers 1,2] [--gateway-cpus 0,1] \\
        [--load-cpus 2,3] [--workload json,stream] [--connections 8,32] [--rounds 3] [--duration 8]

On a machine with fewer cores than both sets need, the sets overlap and the table says so: the
load generator then takes cores from the workers, and the ratio understates them. It prints a
table (``--out FILE`` writes it too); it asserts nothing. ``results_workers_h200.md`` is a run on a
16-core machine; ``stage_offline.sh`` stages nginx, wrk and the wheels for one without an index.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from statistics import median

from proxy_overhead import (
    WORKLOADS,
    BenchError,
    free_port,
    render_nginx,
    started,
    wait_until,
    write_routing,
)
from report import REPO, WrkResult, git_state, parse_wrk


def cpu_list(value: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {value!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--workers", type=cpu_list, default=[1, 2])
    p.add_argument("--gateway-cpus", type=cpu_list, default=list(range(min(2, cores))))
    p.add_argument("--load-cpus", type=cpu_list, default=list(range(2, min(4, cores))) or [cores - 1])
    p.add_argument("--workload", default="json,stream")
    p.add_argument("--connections", type=cpu_list, default=[8, 32])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=8)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if max(args.workers) > len(args.gateway_cpus):
        p.error("each worker needs a core of --gateway-cpus")
    return args


def pinned(cpus: list[int], argv: list[str]) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cpus)), *argv]


def run_wrk(args: argparse.Namespace, connections: int, url: str, script: Path, seconds: int) -> WrkResult:
    threads = max(1, min(len(args.load_cpus), connections))
    argv = pinned(
        args.load_cpus,
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise BenchError(f"wrk failed: {shlex.join(argv)}\n{done.stdout}{done.stderr}")
    return parse_wrk(done.stdout)


def bench(args: argparse.Namespace) -> str:
    workloads = [WORKLOADS[name] for name in args.workload.split(",")]
    results: dict[tuple[str, int, int], list[WrkResult]] = {}
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="workers-bench-")))
        nginx_port = free_port()
        conf = render_nginx(work, nginx_port, WORKLOADS["json"].reply.read_text())
        nginx = stack.enter_context(
            started(
                "nginx",
                pinned(
                    args.load_cpus, ["nginx", "-c", str(conf), "-p", str(work), "-e", str(work / "error.log")]
                ),
                work / "nginx.log",
            )
        )
        wait_until(nginx, f"http://127.0.0.1:{nginx_port}/v1/chat/completions", None)
        routing = write_routing(work, f"http://127.0.0.1:{nginx_port}")
        for round_ in range(args.rounds):
            order = args.workers if round_ % 2 == 0 else list(reversed(args.workers))
            for count in order:
                port = free_port()
                serve = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(routing)]
                serve += ["--port", str(port), "--workers", str(count), "--log-level", "warning"]
                path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
                env = {**os.environ, "PYTHONPATH": path, "INTERLOCK_SHUTDOWN_DELAY_S": "0"}
                with started(
                    f"gateway-{count}",
                    pinned(args.gateway_cpus[:count], serve),
                    work / f"gw{count}.log",
                    env=env,
                ) as gateway:
                    wait_until(gateway, f"http://127.0.0.1:{port}/health/ready", 200)
                    for w in workloads:
                        url = f"http://127.0.0.1:{port}/v1/chat/completions"
                        for connections in args.connections:
                            run_wrk(args, connections, url, w.script, 2)  # warm-up
                            found = run_wrk(args, connections, url, w.script, args.duration)
                            results.setdefault((w.name, connections, count), []).append(found)
                            gateway.ensure_alive()
    return _report(args, results)


def _report(args: argparse.Namespace, results: dict[tuple[str, int, int], list[WrkResult]]) -> str:
    overlap = sorted(set(args.gateway_cpus) & set(args.load_cpus))
    lines = [
        "# `interlock serve --workers N`",
        "",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores "
        f"({platform.processor() or platform.machine()})",
        f"- command: `python benchmarks/proxy_overhead/workers.py {shlex.join(sys.argv[1:])}`",
        f"- gateway: {git_state(REPO)}",
        f"- gateway with N workers on CPUs {args.gateway_cpus[: max(args.workers)]} (the first N); "
        f"nginx and wrk on CPUs {args.load_cpus}"
        + (f" (shared with the gateway: {overlap}; the ratios understate the workers)" if overlap else ""),
        f"- {args.rounds} interleaved round(s) of {args.duration} s each after a 2 s warm-up; medians",
        "",
        "| workload | conn | workers | req/s | vs 1 worker | p50 | p99 | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (workload, connections, count), runs in sorted(results.items()):
        rps = median(r.rps for r in runs)
        one = results.get((workload, connections, 1))
        ratio = f"{rps / median(r.rps for r in one):.2f}x" if one else "-"
        lines.append(
            f"| {workload} | {connections} | {count} | {rps:,.0f} | {ratio} | "
            f"{median(r.p50_ms for r in runs):.2f} ms | {median(r.p99_ms for r in runs):.2f} ms | "
            f"{sum(r.errors for r in runs)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        text = bench(args)
    except BenchError as exc:
        print(f"workers: {exc}", file=sys.stderr)
        return 1
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
