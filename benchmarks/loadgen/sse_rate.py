"""How many SSE events ``interlock bench`` reads per CPU-second of its own (the issue asks for at
least 20,000 per core), against ``interlock mock-upstream`` started as a process of its own.

Two shapes of stream: ``burst`` (the mock writes as fast as the socket takes, so one read holds
many events) and ``paced`` (each stream at a set pace, one event per write: a read holds about one
event, the costly case for a client). For each, one worker process and two.

    .venv/bin/python benchmarks/loadgen/sse_rate.py [--requests 200] [--tokens 1000]

Pins the mock to the last CPU and the bench to the others where ``os.sched_setaffinity`` can.
Figures are the client's CPU time (``time.process_time`` per worker); on a shared machine the
wall-clock rate also depends on the mock's share of a core.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import free_port, git_commit  # noqa: E402
from gateway.loadgen.report import point_figures  # noqa: E402
from gateway.loadgen.runner import Plan, run  # noqa: E402
from gateway.loadgen.workload import Length, Workload  # noqa: E402


def start_mock(port: int, tokens_per_s: float) -> subprocess.Popen[bytes]:
    cpus = sorted(os.sched_getaffinity(0))
    pin = ["taskset", "-c", str(cpus[-1])] if len(cpus) > 1 else []
    proc = subprocess.Popen(
        [
            *pin,
            sys.executable,
            "-m",
            "gateway.cli",
            "mock-upstream",
            "--port",
            str(port),
            "--ttft-ms",
            "0",
            "--tokens-per-s",
            str(tokens_per_s),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("mock-upstream did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--tokens", type=int, default=1000, help="events per stream")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--paced-tokens-per-s", type=float, default=2000, help="per stream, in the paced shape")
    args = p.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        os.sched_setaffinity(0, cpus[:-1])  # the workers inherit it
    print(f"commit {git_commit()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"{'shape':7} {'workers':>7} {'events':>9} {'wall s':>7} {'cpu s':>7} {'events/s':>10} "
          f"{'events/cpu-s':>13} {'busiest core':>12}")  # fmt: skip
    for shape, pace in (("burst", 0.0), ("paced", args.paced_tokens_per_s)):
        port = free_port()
        mock = start_mock(port, pace)
        try:
            for workers in (1, 2):
                workload = Workload(
                    model="mock", prompt_len=Length(8, 8), reply_len=Length(args.tokens, args.tokens)
                )
                plan = Plan(f"http://127.0.0.1:{port}/v1", workload, concurrency=args.concurrency,
                            requests=args.requests, workers=workers)  # fmt: skip
                figures = point_figures(run(plan), {})
                client = figures["client"]
                print(
                    f"{shape:7} {workers:>7} {client['sse_events']:>9,} {figures['duration']:>7.2f} "
                    f"{client['cpu_s']:>7.2f} {client['sse_events'] / figures['duration']:>10,.0f} "
                    f"{client['sse_events_per_cpu_s']:>13,.0f} {100 * client['cpu_share']:>11.0f}%"
                )
                assert figures["failed"] == 0, figures["errors"]
        finally:
            mock.terminate()
            mock.wait(10)


if __name__ == "__main__":
    main()
