"""Graceful shutdown of a real ``interlock serve`` process: SIGTERM lets in-flight streams finish."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import wait_ready
from tests.fakes import FakeUpstream, free_port, openai_backend

ROOT = Path(__file__).resolve().parent.parent


def test_sigterm_finishes_in_flight_streams_then_exits(tmp_path: Path) -> None:
    with FakeUpstream() as fake:
        config = tmp_path / "routing.yaml"
        config.write_text(json.dumps({
            "backends": {"up": openai_backend(fake.base_url, "long", first_token=5, total=30)},
            "models": {"m": {"targets": ["up"]}},
            "resilience": {"health_check": {"interval_s": 0}},
        }))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from gateway.cli import main; main(sys.argv[1:])",
             "serve", "--config", str(config), "--port", str(port), "--log-level", "warning"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "INTERLOCK_GRACEFUL_SHUTDOWN_S": "10"},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    wait_ready(url, timeout=30)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline and proc.poll() is None, "gateway did not start"
                    time.sleep(0.1)
            lines: list[str] = []
            started = threading.Event()

            def stream() -> None:
                body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
                with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
                    for line in response.iter_lines():
                        if line:
                            lines.append(line)
                            started.set()

            reader = threading.Thread(target=stream)
            reader.start()
            assert started.wait(10)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            # no new work once the stop began: the port no longer takes connections
            try:
                refused = httpx.get(url + "/health/ready", timeout=2).status_code == 503
            except httpx.TransportError:
                refused = True
            assert refused
            reader.join(20)
            # uvicorn re-raises the SIGTERM once it has drained, so a supervisor sees why it stopped
            assert proc.wait(20) in (0, -signal.SIGTERM)
        finally:
            if proc.poll() is None:
                proc.kill()
    # the stream that was running when the stop came finished whole, not cut
    assert lines[-1] == "data: [DONE]"
    assert sum(" more" in line for line in lines) == 40
    assert not any('"error"' in line for line in lines)
