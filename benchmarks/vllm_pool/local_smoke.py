"""The device scripts' logic, checked here against simulated vLLM servers before it meets the GPU.

    PYTHONPATH=. .venv/bin/python benchmarks/vllm_pool/local_smoke.py

It stands in for start_servers.sh: two simulated vLLM servers serving ``llama8b`` (8,192-token
context, 64 sequences), each ``python -m tests.vllm_sim`` in its own process and session with its
pid in a file, as the real ones are, so that the kill test's SIGKILL to a process group is the
real thing. The simulator is a test fake, kept honest by the fixture checks in tests/test_vllm.py;
it runs here as a process, so nothing in benchmarks/ imports from tests/. Then, as on the device:
bench.py (``--quick``, every workload, 2 runs so the medians and the interleaving are
exercised, ``$OUT`` set to a temporary folder to exercise the files), then sdk_checks.py with the
kill test on the second server (last, since it takes that server away). The simulators' figures
are made up: the numbers say the scripts work, not how routing fares.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import poolkit

from benchmarks.common import free_port  # importable: poolkit adds the root

#: slower than the simulator's defaults (0.02 ms and 1 ms), so that prefill matters and the kill
#: test's requests (128 tokens) are still running when the server dies
PREFILL_S_PER_CHAR = 0.0001
DECODE_S_PER_TOKEN = 0.01


def sim_argv(port: int, pid_file: Path) -> list[str]:
    """One simulated server, until SIGTERM."""
    return [
        sys.executable,
        "-m",
        "tests.vllm_sim",
        "--port",
        str(port),
        "--pid-file",
        str(pid_file),
        "--model",
        "llama8b",
        "--max-model-len",
        "8192",
        "--max-num-seqs",
        "64",
        "--prefill-s-per-char",
        str(PREFILL_S_PER_CHAR),
        "--decode-s-per-token",
        str(DECODE_S_PER_TOKEN),
    ]


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while poolkit.http_get(url + "/health", timeout=1)[0] != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"simulator {url} did not start")
        time.sleep(0.1)


def step(title: str, argv: list[str], env: dict[str, str]) -> int:
    print(f"\n=== {title}: {' '.join(argv[1:])}", flush=True)
    t = time.monotonic()
    code = subprocess.run(argv, cwd=poolkit.REPO, env=env, check=False).returncode
    print(f"=== {title}: exit {code} in {time.monotonic() - t:.1f}s", flush=True)
    return code


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vllm-pool-smoke-"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(poolkit.REPO), env.get("PYTHONPATH", "")) if x)
    sims: list[tuple[subprocess.Popen[bytes], Path]] = []
    urls: list[str] = []
    codes: dict[str, int] = {}
    try:
        for n in (1, 2):
            port, pid_file = free_port(), work / f"v{n}.pid"
            with open(work / f"v{n}.log", "wb") as log:
                proc = subprocess.Popen(
                    sim_argv(port, pid_file),
                    cwd=poolkit.REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # its own group, as setsid gives vLLM
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, proc)
            sims.append((proc, pid_file))
            urls.append(url)
            print(f"simulator {n}: {url}, pid {proc.pid}", flush=True)
        endpoints = ",".join(urls)
        here = Path(__file__).resolve().parent
        codes["bench"] = step(
            "bench",
            [
                sys.executable,
                str(here / "bench.py"),
                "--quick",
                "--runs",
                "2",
                "--endpoints",
                endpoints,
                "--workload",
                "shared-prefix,unique,hot-prefix",
                "--time-limit",
                "200",
            ],
            {**env, "OUT": str(work / "out")},
        )
        for name in sorted(os.listdir(work / "out")) if (work / "out").exists() else ():
            print(f"  $OUT/{name}: {(work / 'out' / name).stat().st_size} bytes")
        codes["sdk_checks"] = step(
            "sdk checks + kill test",
            [
                sys.executable,
                str(here / "sdk_checks.py"),
                "--endpoints",
                endpoints,
                "--kill-pid-file",
                str(sims[1][1]),
            ],
            env,
        )
    finally:
        for proc, _ in sims:  # only the simulators started here, each by its own pid
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print("\nlocal smoke: " + ", ".join(f"{k} exit {v}" for k, v in codes.items()) + f" (files in {work})")
    sys.exit(1 if any(codes.values()) or len(codes) < 2 else 0)


if __name__ == "__main__":
    main()
