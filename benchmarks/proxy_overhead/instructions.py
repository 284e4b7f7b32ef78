"""Instructions per request: the gateway's own CPU cost, counted by callgrind instead of timed.

Timed runs on a shared 2-core machine swing by ±20% between rounds of the same commit; the
number of instructions a process executes per request does not depend on what else runs.
This starts nginx as the static upstream (as ``proxy_overhead.py`` does), then each gateway
(this checkout and, with ``--baseline DIR``, another checkout, both through ``run_checkout.py``)
under ``valgrind --tool=callgrind``, sends ``--warmup`` requests one at a time, zeroes the
counters (``callgrind_control -z``), sends ``--requests`` more, dumps the counters and divides.
One request at a time: this measures the cost of a request, not of batching under load.

    .venv/bin/python benchmarks/proxy_overhead/instructions.py [--baseline DIR] [--ops] \\
        [--workload json,stream] [--requests 500] [--warmup 50] [--env KEY=VAL ...]

``--ops`` also measures this checkout as proxy_overhead.py --ops' ``bare`` (no metrics, no access
log) and ``observed`` (metrics and the access log to a file) gateways, as ``ops.py`` launches them.

Needs valgrind (``apt-get install valgrind``) and nginx. It prints a table; it asserts nothing.
"""

from __future__ import annotations

import argparse
import http.client
import re
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from ops import variants
from proxy_overhead import (
    VENV_BIN,
    WORK_ROOT,
    WORKLOADS,
    BenchError,
    free_port,
    render_nginx,
    started,
    wait_until,
    write_routing,
)
from report import REPO, git_state
from run_checkout import Launch, check_loaded, launch

#: callgrind's start-up under valgrind (imports of starlette, pydantic, aiohttp) takes a while
READY_TIMEOUT_S = 600.0


def request_body(workload: str) -> bytes:
    body = re.search(r"wrk\.body\s*=\s*'(.*)'", WORKLOADS[workload].script.read_text())
    if body is None:
        raise BenchError(f"cannot find wrk.body in {WORKLOADS[workload].script.name}")
    return body.group(1).encode()


def send(conn: http.client.HTTPConnection, body: bytes) -> None:
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise BenchError(f"HTTP {response.status}: {data[:300]!r}")


def totals(dump: Path) -> int:
    """The instruction count of a callgrind dump (its ``totals:`` or ``summary:`` line)."""
    for line in dump.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise BenchError(f"no totals in {dump}")


def wait_ready(port: int, proc_alive: object) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        proc_alive.ensure_alive()  # type: ignore[attr-defined]
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/health/ready")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise BenchError(f"the gateway on port {port} was not ready within {READY_TIMEOUT_S:g}s")


def measure(g: Launch, work: Path, args: argparse.Namespace) -> dict[str, float]:
    name, port = g.name, g.port
    out = work / f"{name}.callgrind"
    # taskset -c CPU python ... → taskset -c CPU valgrind ... python ...
    argv = [*g.argv[:3], "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", *g.argv[3:]]
    per_request: dict[str, float] = {}
    env = {**g.env, **args.env}
    with started(name, argv, work / f"{name}.log", g.checkout, env) as proc:
        wait_ready(port, proc)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        pid = proc.popen.pid
        for workload in args.workload:
            body = request_body(workload)
            for _ in range(args.warmup):
                send(conn, body)
            subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
            for _ in range(args.requests):
                send(conn, body)
            before = set(work.glob(f"{name}.callgrind.*"))
            subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
            dumps = sorted(set(work.glob(f"{name}.callgrind.*")) - before, key=lambda p: p.stat().st_mtime)
            if not dumps:
                raise BenchError(f"callgrind wrote no dump for {name}")
            per_request[workload] = totals(dumps[-1]) / args.requests
        conn.close()
    check_loaded(g.record, g.checkout)
    return per_request


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--baseline", type=Path, help="a second checkout to measure beside this one")
    p.add_argument(
        "--ops", action="store_true", help="also this checkout without metrics and with the access log"
    )
    p.add_argument("--workload", default="json,stream", help="json, stream or both (default both)")
    p.add_argument("--requests", type=int, default=500, help="measured requests per workload")
    p.add_argument("--warmup", type=int, default=50, help="requests before the counters are zeroed")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VAL",
        help="an environment variable for the gateways measured (repeatable)",
    )
    args = p.parse_args()
    if not all("=" in item for item in args.env):
        p.error("--env takes KEY=VAL")
    args.env = dict(item.split("=", 1) for item in args.env)
    args.workload = [w for w in args.workload.split(",") if w]
    if not set(args.workload) <= set(WORKLOADS):
        p.error(f"workloads are a subset of {','.join(WORKLOADS)}")
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="instructions-", dir=WORK_ROOT))
    nginx_port = free_port()
    upstream = f"http://127.0.0.1:{nginx_port}"
    nginx_conf = render_nginx(work, nginx_port, WORKLOADS["json"].reply.read_text().strip())
    routing = write_routing(work, upstream)
    checkouts = [("gateway", REPO)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    launches = [launch(n, c, VENV_BIN / "python", "0", routing, free_port(), work) for n, c in checkouts]
    if args.ops:
        launches += [v for v in variants(launches[0], work, routing) if v.name in ("bare", "observed")]
    results: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        nginx = stack.enter_context(
            started(
                "nginx",
                [
                    "taskset",
                    "-c",
                    "1",
                    "nginx",
                    "-c",
                    str(nginx_conf),
                    "-p",
                    str(work),
                    "-e",
                    str(work / "e.log"),
                ],
                work / "nginx.log",
            )
        )
        wait_until(nginx, f"{upstream}/", None)
        for g in launches:
            results[g.name] = measure(g, work, args)
            print(f"instructions: {g.name} done: {results[g.name]}", file=sys.stderr)
    print(
        f"\nInstructions per request (callgrind, {args.requests} requests after {args.warmup}, "
        "one at a time)\n"
    )
    header = "| gateway | commit | " + " | ".join(args.workload) + " |"
    print(header)
    print("|---|---|" + "---:|" * len(args.workload))
    for g in launches:
        cells = " | ".join(f"{results[g.name][w] / 1e6:.3f} M" for w in args.workload)
        print(f"| {g.name} | {git_state(g.checkout)} | {cells} |")
    pairs = [("gateway", "baseline")] if args.baseline else []
    pairs += [("gateway", "bare"), ("observed", "bare")] if args.ops else []
    for a, b in pairs:
        ratios = " | ".join(f"{results[a][w] / results[b][w]:.3f}x" for w in args.workload)
        print(f"| {a} / {b} | | {ratios} |")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"instructions: {exc}", file=sys.stderr)
        sys.exit(1)
