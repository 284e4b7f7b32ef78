"""Graceful shutdown of a real ``interlock serve`` process: SIGTERM lets in-flight streams finish,
readiness turns 503 while the port still accepts, and streams the grace period cannot wait for
end with an error event rather than a cut."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import wait_ready
from tests.fakes import FakeUpstream, free_port, openai_backend

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def serving(
    tmp_path: Path, upstream_url: str, behaviour: str, **env: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``interlock serve`` in a process of its own, model ``m`` on the fake's ``behaviour``, ready."""
    config = tmp_path / "routing.yaml"
    config.write_text(
        json.dumps(
            {
                "backends": {"up": openai_backend(upstream_url, behaviour, first_token=5, total=30)},
                "models": {"m": {"targets": ["up"]}},
                "resilience": {"health_check": {"interval_s": 0}},
            }
        )
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from gateway.cli import main; main(sys.argv[1:])",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "INTERLOCK_GRACEFUL_SHUTDOWN_S": "10",
            "INTERLOCK_SHUTDOWN_DELAY_S": "0",
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
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
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


class StreamReader(threading.Thread):
    """Reads one SSE stream of model ``m`` in the background: ``lines`` (non-empty), ``error`` (what
    httpx raised, e.g. a broken chunked body), ``started`` once the first line is in."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.lines: list[str] = []
        self.error: BaseException | None = None
        self.started = threading.Event()
        self.start()

    def run(self) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=30) as response:
                for line in response.iter_lines():
                    if line:
                        self.lines.append(line)
                        self.started.set()
        except httpx.HTTPError as exc:
            self.error = exc


def readiness_after_the_signal(url: str, timeout: float = 20) -> list[int | str]:
    """GET /health/ready on a new connection each time until one is refused: the answers in order,
    runs of the same answer collapsed (200s before the signal took effect are dropped)."""
    seen: list[int | str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with httpx.Client(timeout=2) as http:  # a fresh connection: a new client of the port
                answer: int | str = http.get(url + "/health/ready").status_code
        except httpx.TransportError:
            answer = "refused"
        if answer != 200 and (not seen or seen[-1] != answer):
            seen.append(answer)
        if answer == "refused":
            return seen
    raise AssertionError(f"the port still took connections {timeout:g}s after the signal: {seen}")


def test_sigterm_finishes_in_flight_streams_then_exits(tmp_path: Path) -> None:
    with FakeUpstream() as fake, serving(tmp_path, fake.base_url, "long") as (proc, url):
        reader = StreamReader(url)
        assert reader.started.wait(10)
        proc.send_signal(signal.SIGTERM)
        # no new work once the stop began: readiness says so, then the port no longer takes connections
        assert readiness_after_the_signal(url)[-1] == "refused"
        reader.join(20)
        # uvicorn re-raises the SIGTERM once it has drained, so a supervisor sees why it stopped
        assert proc.wait(20) in (0, -signal.SIGTERM)
    # the stream that was running when the stop came finished whole, not cut
    assert reader.error is None
    lines = reader.lines
    assert lines[-1] == "data: [DONE]"
    assert sum(" more" in line for line in lines) == 40
    assert not any('"error"' in line for line in lines)


def test_readiness_turns_503_while_the_port_still_accepts(tmp_path: Path) -> None:
    """A load balancer probing readiness sees 503 (and moves traffic away) before the port closes."""
    with (
        FakeUpstream() as fake,
        serving(tmp_path, fake.base_url, "ok", INTERLOCK_SHUTDOWN_DELAY_S="1.5") as (proc, url),
    ):
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        answers = readiness_after_the_signal(url)
        refused_after = time.monotonic() - signalled
        assert proc.wait(20) in (0, -signal.SIGTERM)
    assert answers == [503, "refused"]
    assert refused_after >= 1.4


def test_a_second_signal_skips_the_shutdown_delay(tmp_path: Path) -> None:
    with (
        FakeUpstream() as fake,
        serving(tmp_path, fake.base_url, "ok", INTERLOCK_SHUTDOWN_DELAY_S="120") as (proc, url),
    ):
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while httpx.get(url + "/health/ready", timeout=2).status_code != 503:
            assert time.monotonic() < deadline, "readiness never turned 503"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) in (0, -signal.SIGTERM)


def test_streams_the_grace_period_cannot_wait_for_end_with_an_error_event(tmp_path: Path) -> None:
    """A 2 s grace and a stream that would run 100 s: it ends with the documented error event and
    [DONE], framed whole, before uvicorn gives up on it."""
    with (
        FakeUpstream() as fake,
        serving(tmp_path, fake.base_url, "endless", INTERLOCK_GRACEFUL_SHUTDOWN_S="2") as (proc, url),
    ):
        reader = StreamReader(url)
        assert reader.started.wait(10)
        proc.send_signal(signal.SIGTERM)
        chunks_at_signal = len(reader.lines)
        reader.join(20)
        assert proc.wait(20) in (0, -signal.SIGTERM)
    assert reader.error is None, f"the stream was cut: {reader.error!r}"
    lines = reader.lines
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: ")) == {
        "error": {
            "message": "the gateway is shutting down",
            "type": "server_error",
            "param": None,
            "code": "shutting_down",
        }
    }
    assert len(lines) - 2 > chunks_at_signal, "the stream did not run on during the grace period"
