"""``interlock serve --workers N``: real processes on one port in front of a fake OpenAI upstream.

The supervisor's rules (replace a worker that dies, stop all on a start-up failure) are checked
on ``Supervisor`` itself with tiny worker functions; the rest through ``interlock serve``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from gateway.workers import Supervisor
from tests.fakes import chat_completion, free_port, serve_app, wait_for

ROOT = Path(__file__).resolve().parents[1]
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


# -- the supervisor alone -------------------------------------------------------------------------


def test_a_worker_that_cannot_start_stops_the_others(tmp_path: Path) -> None:
    def run_worker(index: int) -> int:
        if index == 0:
            return 1  # as a gateway whose backend failed to start
        time.sleep(60)  # ended by the supervisor's SIGTERM
        return 0

    began = time.monotonic()
    assert Supervisor(2, run_worker).run() == 1
    assert time.monotonic() - began < 30


def test_a_worker_that_dies_is_replaced(tmp_path: Path) -> None:
    log = tmp_path / "starts"

    def run_worker(index: int) -> int:
        with log.open("a") as f:
            f.write(f"{index}\n")
        if index == 1:
            time.sleep(60)
            return 0
        if log.read_text().split().count("0") == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # the first worker 0 is killed
        return 2  # its replacement fails to start: the supervisor stops, so the test ends

    assert Supervisor(2, run_worker).run() == 2
    assert log.read_text().split().count("0") == 2


# -- interlock serve --workers 2 --------------------------------------------------------------------


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    url: str
    config: Path

    def workers(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [int(pid) for pid in children]

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text


def _total(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def _routing(model_alias: str = "") -> str:
    aliases = f"\n  {model_alias}: {{targets: [up]}}" if model_alias else ""
    return f"""
backends:
  up: {{kind: openai, base_url: "http://127.0.0.1:{{port}}/v1", model: m}}
models:
  m: {{targets: [up]}}{aliases}
"""


@pytest.fixture
def upstream() -> Iterator[int]:
    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(chat_completion("m"))

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    port = free_port()
    stop = serve_app(app, port)
    try:
        yield port
    finally:
        stop()


@pytest.fixture
def extra_yaml() -> str:
    return ""


@pytest.fixture
def gateway(tmp_path: Path, upstream: int, extra_yaml: str) -> Iterator[Gateway]:
    config = tmp_path / "routing.yaml"
    config.write_text(_routing().replace("{port}", str(upstream)) + extra_yaml)
    port = free_port()
    env = {**os.environ, "INTERLOCK_SHUTDOWN_DELAY_S": "0", "INTERLOCK_RELOAD_WATCH": "false"}
    args = ["serve", "--config", str(config), "--port", str(port), "--workers", "2", "--log-level", "warning"]
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", *args], cwd=ROOT, env=env)
    gw = Gateway(proc, f"http://127.0.0.1:{port}", config)

    def ready() -> bool:
        assert proc.poll() is None, "the gateway exited"
        try:
            return "interlock_workers 2.0" in gw.metrics()
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, timeout=60, what="both workers to answer")
        yield gw
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(30)


def _ask_many(gw: Gateway, count: int) -> list[int]:
    def one(_: int) -> int:  # a connection each: the kernel hands each to a worker
        return httpx.post(gw.url + "/v1/chat/completions", json=BODY, timeout=30).status_code

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, range(count)))


def test_every_scrape_counts_each_request_once_whichever_worker_served_it(gateway: Gateway) -> None:
    assert _ask_many(gateway, 200) == [200] * 200
    for _ in range(5):  # each scrape lands on either worker
        text = gateway.metrics()
        assert _total(text, "interlock_requests_total") == 200
        split = [float(v) for v in re.findall(r"^interlock_worker_requests_total\{.*\} (\S+)$", text, re.M)]
        assert len(split) == 2 and sum(split) == 200
    assert min(split) > 0, f"one worker served everything: {split}"


def test_a_killed_worker_is_replaced_and_the_port_keeps_answering(gateway: Gateway) -> None:
    first, second = gateway.workers()
    os.kill(first, signal.SIGKILL)
    assert _ask_many(gateway, 20) == [200] * 20  # the other worker takes the connections
    wait_for(
        lambda: len(gateway.workers()) == 2 and first not in gateway.workers(),
        timeout=30,
        what="a replacement worker",
    )
    wait_for(lambda: "interlock_workers 2.0" in gateway.metrics(), timeout=60, what="it to answer")
    assert second in gateway.workers()


def test_an_admin_reload_reloads_every_worker(gateway: Gateway, upstream: int) -> None:
    before = re.findall(r'^interlock_config_info\{hash="(\w+)"\}', gateway.metrics(), re.M)
    assert len(before) == 1
    gateway.config.write_text(_routing("m2").replace("{port}", str(upstream)))
    reply = httpx.post(gateway.url + "/admin/reload", timeout=30)
    assert reply.status_code == 200 and reply.json()["status"] == "ok"

    def all_reloaded() -> bool:
        hashes = re.findall(r'^interlock_config_info\{hash="(\w+)"\}', gateway.metrics(), re.M)
        return len(hashes) == 1 and hashes != before

    wait_for(all_reloaded, timeout=30, what="both workers on the new config")
    assert set(_ask_many(gateway, 20)) == {200}


def test_a_reload_to_an_in_process_model_is_refused_with_workers(gateway: Gateway) -> None:
    gateway.config.write_text("backends:\n  local: {kind: llamacpp}\nmodels:\n  m: {targets: [local]}\n")
    reply = httpx.post(gateway.url + "/admin/reload?dry_run=1", timeout=30)
    assert reply.status_code == 400, reply.text
    assert "backends.local.kind" in reply.text and "workers" in reply.text


def test_sigterm_stops_every_worker(gateway: Gateway) -> None:
    workers = gateway.workers()
    gateway.proc.send_signal(signal.SIGTERM)
    assert gateway.proc.wait(30) == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.parametrize("extra_yaml", ["limits:\n  keys:\n    '*': {rpm: 10}\n"])
def test_without_redis_each_worker_enforces_its_share_of_a_limit(gateway: Gateway) -> None:
    statuses = _ask_many(gateway, 40)
    assert set(statuses) <= {200, 429}
    assert 1 <= statuses.count(200) <= 10  # 10 a minute for the replica, not 10 per worker


def test_several_workers_refuse_an_in_process_model_at_start() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--workers", "2", "--port", str(free_port())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "backends.local.kind" in done.stderr and "2 workers" in done.stderr
