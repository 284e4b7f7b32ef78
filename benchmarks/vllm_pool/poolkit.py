"""What bench.py and sdk_checks.py share: a gateway subprocess in front of a vLLM pool, and probes.

The gateway runs as its own process (``gateway.cli serve``), as in production: the client's event
loop and the gateway's never compete for one interpreter, and what is measured is what a
deployment would see. Everything here is stdlib + aiohttp + PyYAML, so that it runs on the GPU
machine with nothing but the staged wheels (``PYTHONPATH=/tmp/site:.``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_ENDPOINTS = "http://127.0.0.1:8001,http://127.0.0.1:8002"
READY_TIMEOUT_S = 60.0
if str(REPO) not in sys.path:  # the scripts run by path; the gateway's packages live at the repo root
    sys.path.append(str(REPO))

from benchmarks.common import free_port  # noqa: E402


def out_dir() -> Path | None:
    """``$OUT`` on the device machine (what is written there comes back); None elsewhere."""
    value = os.environ.get("OUT")
    if not value:
        return None
    path = Path(value)
    path.mkdir(parents=True, exist_ok=True)
    return path


def endpoint_list(value: str) -> list[str]:
    return [e.strip().rstrip("/") for e in value.split(",") if e.strip()]


def pool_config(endpoints: list[str], model: str, routing: str, **extra: Any) -> dict[str, Any]:
    """A routing file with one ``kind: vllm`` backend; every other knob keeps the product's default,
    since the defaults are what is being measured."""
    return {
        "backends": {
            "pool": {"kind": "vllm", "endpoints": endpoints, "model": model, "routing": routing, **extra}
        },
        "models": {model: {"targets": ["pool"]}},
    }


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A GET that reports the status rather than raising: 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


class Gateway:
    """``python -m gateway.cli serve`` on a free loopback port, its log in a file."""

    def __init__(self, config: dict[str, Any], name: str, log_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"gateway-{name}.log"
        self._config_path = log_dir / f"gateway-{name}.yaml"
        self._config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ)
        # the repo first, then whatever the caller set (on the device: /tmp/site with the wheels)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from gateway.cli import main; main()",
                    "serve",
                    "--config",
                    str(self._config_path),
                    "--port",
                    str(self.port),
                    "--log-level",
                    "warning",
                ],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Block until GET /health/ready is 200: the pool has checked every endpoint once."""
        deadline = time.monotonic() + timeout
        assert self._proc is not None
        while True:
            status, body = http_get(self.url + "/health/ready", timeout=2)
            if status == 200:
                return
            if self._proc.poll() is not None:
                raise RuntimeError(f"gateway {self.name} exited ({self._proc.returncode}): {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"gateway {self.name} not ready after {timeout:.0f}s "
                    f"({status} {body[:300]!r}): {self.log_tail()}"
                )
            time.sleep(0.1)

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # uvicorn drains and closes the pool's tasks
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def pool_endpoints(self) -> list[dict[str, Any]]:
        """The pool's per-endpoint figures (``/admin/routes``: loopback needs no admin key)."""
        status, body = http_get(self.url + "/admin/routes", timeout=5)
        if status != 200:
            return []
        report = json.loads(body)
        for route in report.get("routes", {}).values():
            for entry in route.get("order", ()):
                if "endpoints" in entry:
                    endpoints: list[dict[str, Any]] = entry["endpoints"]
                    return endpoints
        return []


@contextlib.contextmanager
def gateways(configs: dict[str, dict[str, Any]], log_dir: Path | None = None) -> Iterator[dict[str, Gateway]]:
    """Several gateways started together (their imports overlap), each ready before this yields."""
    directory = log_dir or Path(tempfile.mkdtemp(prefix="vllm-pool-"))
    started = {name: Gateway(config, name, directory) for name, config in configs.items()}
    try:
        for gateway in started.values():
            gateway.start()
        for gateway in started.values():
            gateway.wait_ready()
        yield started
    finally:
        for gateway in started.values():
            gateway.stop()


def prefix_counters(endpoint: str) -> tuple[float, float] | None:
    """(prefix-cache queries, hits) in tokens, summed over the server's engines; None if unreadable."""
    from backends.vllm.metrics import parse_metrics  # the pool's own parser: one reading of the page

    status, body = http_get(endpoint + "/metrics", timeout=5)
    if status != 200:
        return None
    snapshot = parse_metrics(body.decode("utf-8", errors="replace"))
    if snapshot.prefix_queries is None or snapshot.prefix_hits is None:
        return None
    return snapshot.prefix_queries, snapshot.prefix_hits
