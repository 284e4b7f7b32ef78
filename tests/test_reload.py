"""Hot reload of the routing file on a real gateway (real sockets, fake upstreams): POST
/admin/reload, the watched file, SIGHUP; what is kept, what drains, what is refused."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import gateway.reload as reload_module
from backends.base import Resources
from backends.openai import OpenAIBackend
from gateway.config import load_config
from gateway.reload import Reloader, ReloadInProgress
from gateway.server import build_gateway
from gateway.snapshot import config_hash
from tests.conftest import run_gateway, wait_ready
from tests.fakes import ChaosUpstream, FakeUpstream, free_port, openai_backend

ROOT = Path(__file__).resolve().parent.parent
QUIET = {"health_check": {"interval_s": 0}}  # no active checks: only the tests' requests move breakers


def routing(backends: dict[str, Any], models: dict[str, list[str]], **extra: Any) -> dict[str, Any]:
    return {
        "backends": backends,
        "models": {m: {"targets": t} for m, t in models.items()},
        "resilience": QUIET,
        **extra,
    }


def write(path: Path, config: dict[str, Any] | str) -> None:
    """Replace the file atomically, as an editor's write-and-rename does."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(config if isinstance(config, str) else json.dumps(config))
    os.replace(tmp, path)


def wait_for(condition: Callable[[], Any], timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
    return value


def models(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}


def chat(url: str, model: str) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        timeout=10,
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
    )


def admin_config(url: str) -> dict[str, Any]:
    return httpx.get(url + "/admin/config").json()


def reload(url: str, query: str = "") -> httpx.Response:
    return httpx.post(url + "/admin/reload" + query, timeout=30)


class Stream(threading.Thread):
    """One SSE stream in the background: its lines, what httpx raised, the backend that served it."""

    def __init__(self, url: str, model: str) -> None:
        super().__init__(daemon=True)
        self.url, self.model = url, model
        self.lines: list[str] = []
        self.error: BaseException | None = None
        self.backend: str | None = None
        self.started = threading.Event()
        self.start()

    def run(self) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=30) as response:
                self.backend = response.headers.get("x-interlock-backend")
                for line in response.iter_lines():
                    if line:
                        self.lines.append(line)
                        self.started.set()
        except httpx.HTTPError as exc:
            self.error = exc

    def finished_whole(self) -> bool:
        self.join(30)
        return (
            self.error is None
            and self.lines[-1] == "data: [DONE]"
            and sum(" more" in line for line in self.lines) == 40
            and not any('"error"' in line for line in self.lines)
        )


def test_valid_change_is_served_and_an_open_stream_finishes(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    long = openai_backend("", "long", first_token=5, total=30)
    with FakeUpstream() as fake:
        long["base_url"] = fake.base_url
        write(path, routing({"a": long}, {"m": ["a"]}))
        with run_gateway(path, reload_watch=False) as url:
            stream = Stream(url, "m")
            assert stream.started.wait(10)
            write(
                path,
                routing({"a": long, "b": openai_backend(fake.base_url, "ok")}, {"m": ["b"], "m2": ["b"]}),
            )
            response = reload(url)
            assert response.status_code == 200, response.text
            result = response.json()
            assert result["status"] == "ok"
            assert result["diff"]["models_added"] == ["m2"] and result["diff"]["models_changed"] == ["m"]
            assert result["diff"]["backends_added"] == ["b"] and result["diff"]["backends_kept"] == ["a"]
            assert models(url) == {"m", "m2"}
            # the route's new target serves new requests; the stream keeps the backend it started on
            assert chat(url, "m").headers["x-interlock-backend"] == "b"
            assert chat(url, "m2").status_code == 200
            assert stream.finished_whole() and stream.backend == "a"


def test_invalid_file_is_rejected_with_its_problems_and_the_old_config_serves(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    with FakeUpstream() as fake:
        good = routing({"a": openai_backend(fake.base_url, "ok")}, {"m": ["a"]})
        write(path, good)
        with run_gateway(path, reload_watch=False) as url:
            before = admin_config(url)["hash"]
            write(path, "backends: {a: [unclosed\n")
            response = reload(url)
            assert response.status_code == 400
            body = response.json()
            assert body["error"]["code"] == "invalid_config" and "not valid YAML" in body["error"]["message"]
            assert body["reload"]["problems"][0]["path"].startswith("line ")

            write(path, routing({"a": openai_backend(fake.base_url, "ok")}, {"m": ["a"], "x": ["nope"]}))
            response = reload(url)
            assert response.status_code == 400
            assert {"path": "models.x.targets[0]", "message": "unknown backend 'nope'"} in response.json()[
                "reload"
            ]["problems"]

            assert models(url) == {"m"} and chat(url, "m").status_code == 200
            state = admin_config(url)
            assert state["hash"] == before and state["results"] == {"invalid": 2}
            assert "unknown backend 'nope'" in state["last_error"]
            assert state["last_reload"]["status"] == "invalid"


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    with FakeUpstream() as fake:
        write(path, routing({"a": openai_backend(fake.base_url, "ok")}, {"m": ["a"]}))
        with run_gateway(path, reload_watch=False) as url:
            before = admin_config(url)["hash"]
            write(path, routing({"a": openai_backend(fake.base_url, "ok")}, {"m": ["a"], "m2": ["a"]}))
            response = reload(url, "?dry_run=1")
            assert response.status_code == 200
            result = response.json()
            assert result["dry_run"] and result["status"] == "ok" and result["diff"]["models_added"] == ["m2"]
            assert result["hash"] != before

            write(path, routing({"a": openai_backend(fake.base_url, "ok")}, {"m": ["b"]}))
            response = reload(url, "?dry_run=1")
            assert response.status_code == 400
            assert response.json()["reload"]["problems"] == [
                {"path": "models.m.targets[0]", "message": "unknown backend 'b'"}
            ]

            assert models(url) == {"m"}
            state = admin_config(url)
            assert state["hash"] == before and state["results"] == {} and state["last_reload"] is None


def test_an_unchanged_backend_keeps_its_open_circuit_and_stats(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    breaker = {"consecutive_failures": 2, "cooldown_s": 60, "max_cooldown_s": 60}
    with ChaosUpstream(mode="error500") as chaos, FakeUpstream() as fake:
        flaky = openai_backend(chaos.base_url)
        config = routing({"flaky": flaky}, {"m": ["flaky"]})
        config["resilience"] = {**QUIET, "breaker": breaker, "retry": {"attempts": 1}}
        write(path, config)
        with run_gateway(path, reload_watch=False) as url:

            def figures() -> tuple[dict[str, Any], dict[str, Any]]:
                entry = httpx.get(url + "/admin/routes").json()["routes"]["m"]["order"][0]
                return entry["breaker"], entry["stats"]

            for _ in range(2):
                assert chat(url, "m").status_code == 502
            opened, stats = figures()
            assert opened["state"] == "open" and opened["trips"] == 1

            config["backends"]["other"] = openai_backend(fake.base_url, "ok")
            config["models"]["m2"] = {"targets": ["other"]}
            write(path, config)
            assert reload(url).json()["diff"]["backends_kept"] == ["flaky"]
            after, stats_after = figures()
            assert after["state"] == "open" and after["trips"] == 1 and after["retry_in_s"] > 50
            assert stats_after == stats
            assert chat(url, "m2").status_code == 200


def test_a_removed_backend_is_closed_after_its_stream_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[tuple[str, bool]] = []  # (backend, whether the stream had finished by then)
    original = OpenAIBackend.close
    stream: Stream | None = None

    async def recording_close(self: OpenAIBackend) -> None:
        closed.append((self.name, stream is not None and not stream.is_alive()))
        await original(self)

    monkeypatch.setattr(OpenAIBackend, "close", recording_close)
    path = tmp_path / "routing.yaml"
    with FakeUpstream() as fake:
        old = openai_backend(fake.base_url, "long", first_token=5, total=30)
        write(path, routing({"old": old}, {"m": ["old"]}))
        with run_gateway(path, reload_watch=False, reload_drain_s=30) as url:
            stream = Stream(url, "m")
            assert stream.started.wait(10)
            write(path, routing({"new": openai_backend(fake.base_url, "ok")}, {"m": ["new"]}))
            assert reload(url).json()["diff"]["backends_removed"] == ["old"]
            assert admin_config(url)["draining"] == ["old"] and closed == []
            assert chat(url, "m").headers["x-interlock-backend"] == "new"
            assert stream.finished_whole()
            wait_for(lambda: admin_config(url)["draining"] == [])
            assert closed == [("old", True)]


def test_a_backend_that_cannot_start_fails_the_reload_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)  # passes the check (the magic), fails to load
    with FakeUpstream() as fake:
        write(path, routing({"a": openai_backend(fake.base_url, "ok")}, {"m": ["a"]}))
        with run_gateway(path, reload_watch=False) as url:
            before = admin_config(url)["hash"]
            write(
                path,
                routing(
                    {
                        "a": openai_backend(fake.base_url, "ok"),
                        "local": {"kind": "llamacpp", "model_path": str(broken)},
                    },
                    {"m": ["a"], "l": ["local"]},
                ),
            )
            response = reload(url)
            assert response.status_code == 500
            body = response.json()
            assert body["error"]["code"] == "reload_failed"
            assert body["error"]["message"].startswith("backends.local: failed to start")
            assert models(url) == {"m"} and admin_config(url)["hash"] == before
            assert admin_config(url)["results"] == {"failed": 1}


def test_a_changed_in_process_model_loads_beside_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backends.llamacpp import LlamaCppBackend
    from tests.tiny_gguf import write_tiny_bert

    closed: list[str] = []
    original = LlamaCppBackend.close

    async def recording_close(self: LlamaCppBackend) -> None:
        closed.append(self.name)
        await original(self)

    monkeypatch.setattr(LlamaCppBackend, "close", recording_close)
    model = write_tiny_bert(tmp_path / "tiny-bert.gguf")
    path = tmp_path / "routing.yaml"
    embed = {"kind": "llamacpp", "model_path": str(model), "parallel": 4, "n_batch": 64, "n_ctx": 512}
    write(path, routing({"embed": embed}, {"e": ["embed"]}))

    def embedding() -> int:
        return httpx.post(url + "/v1/embeddings", json={"model": "e", "input": "w4"}, timeout=10).status_code

    with run_gateway(path, reload_watch=False) as url:
        wait_ready(url)
        assert embedding() == 200
        write(path, routing({"embed": {**embed, "parallel": 2}}, {"e": ["embed"]}))
        result = reload(url).json()
        assert result["status"] == "ok" and result["diff"]["backends_changed"] == ["embed"]
        # the new model was loaded and checked before the swap: ready at once, serving at once
        assert httpx.get(url + "/health/ready").status_code == 200
        assert embedding() == 200
        wait_for(lambda: closed == ["embed"])  # the old one, once idle
        assert embedding() == 200


def test_the_watched_file_is_served_after_an_atomic_rename(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    with FakeUpstream() as fake:
        write(path, routing({"a": openai_backend(fake.base_url, "ok")}, {"m": ["a"]}))
        with run_gateway(path) as url:
            assert admin_config(url)["watching"]
            write(path, routing({"a": openai_backend(fake.base_url, "ok")}, {"m": ["a"], "m2": ["a"]}))
            wait_for(lambda: "m2" in models(url))
            state = admin_config(url)
            assert state["results"] == {"ok": 1} and state["last_reload"]["trigger"] == "watch"
            assert state["hash"] == config_hash(load_config(path))


def test_a_half_written_file_is_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    with FakeUpstream() as fake:
        write(path, routing({"a": openai_backend(fake.base_url, "ok")}, {"m": ["a"]}))
        with run_gateway(path) as url:
            before = admin_config(url)["hash"]
            text = json.dumps(routing({"a": openai_backend(fake.base_url, "ok")}, {"m": ["a"], "m2": ["a"]}))
            with path.open("w") as f:  # in place, as a slow writer does
                f.write(text[: len(text) // 2])
                f.flush()
                polls = admin_config(url)["polls"]
                # two whole poll periods with the half file: seen stable, tried, refused
                wait_for(lambda: admin_config(url)["polls"] >= polls + 3)
                state = admin_config(url)
                assert state["hash"] == before and models(url) == {"m"}
                assert state["results"] == {"invalid": 1}
                f.write(text[len(text) // 2 :])
            wait_for(lambda: "m2" in models(url))
            state = admin_config(url)
            assert state["results"] == {"invalid": 1, "ok": 1}
            assert state["hash"] == config_hash(load_config(path))


def test_admin_config_shows_the_hash_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    with FakeUpstream() as fake:
        write(path, routing({"a": openai_backend(fake.base_url, "ok")}, {"m": ["a"]}))
        with run_gateway(path, reload_watch=False) as url:
            response = httpx.get(url + "/admin/config")
            state = response.json()
            routes = httpx.get(url + "/admin/routes")
            assert state["hash"] == routes.json()["config"]["hash"] == config_hash(load_config(path))
            assert response.headers["x-interlock-config-hash"] == state["hash"]
            assert routes.headers["x-interlock-config-hash"] == state["hash"]
            assert "x-interlock-config-hash" not in httpx.get(url + "/v1/models").headers
            assert state["source"] == str(path) and state["results"] == {} and not state["watching"]

            assert reload(url).json()["status"] == "unchanged"
            write(path, routing({"a": openai_backend(fake.base_url, "ok")}, {"m": ["a"], "m2": ["a"]}))
            response = reload(url)
            assert response.headers["x-interlock-config-hash"] == response.json()["hash"] != state["hash"]
            after = admin_config(url)
            assert after["results"] == {"unchanged": 1, "ok": 1} and after["last_error"] is None
            assert after["last_reload"]["previous_hash"] == state["hash"]
            assert after["loaded_at"] > state["loaded_at"]
            assert after["last_attempt_at"] == after["last_reload"]["at"]


def test_reload_is_refused_without_a_routing_file() -> None:
    with (
        FakeUpstream() as fake,
        run_gateway(routing({"a": openai_backend(fake.base_url, "ok")}, {"m": ["a"]})) as url,
    ):
        response = reload(url)
        assert response.status_code == 400 and response.json()["error"]["code"] == "reload_unavailable"


def test_one_reload_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    write(path, routing({"a": openai_backend("http://127.0.0.1:9/v1", "ok")}, {"m": ["a"]}))

    async def scenario() -> None:
        reloader = Reloader(build_gateway(load_config(path), Resources()), str(path), Resources())
        async with reloader._lock:  # a reload in progress
            with pytest.raises(ReloadInProgress) as raised:
                await reloader.reload()
            assert raised.value.status == 409
            assert (await reloader.reload(dry_run=True)).status == "unchanged"  # dry runs need no lock
        assert (await reloader.reload()).status == "unchanged"

    asyncio.run(scenario())


def test_sighup_reloads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    with FakeUpstream() as fake:
        write(path, routing({"a": openai_backend(fake.base_url, "ok")}, {"m": ["a"]}))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from gateway.cli import main; main(sys.argv[1:])",
                "serve",
                "--config",
                str(path),
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "INTERLOCK_RELOAD_WATCH": "0",
                "INTERLOCK_SHUTDOWN_DELAY_S": "0",
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:

            def up() -> bool:
                assert proc.poll() is None, "gateway exited"
                try:
                    wait_ready(url, timeout=5)
                    return True
                except httpx.TransportError:
                    return False

            wait_for(up, timeout=30)
            write(path, routing({"a": openai_backend(fake.base_url, "ok")}, {"m": ["a"], "m2": ["a"]}))
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "m2" in models(url))
            state = admin_config(url)
            assert state["results"] == {"ok": 1} and state["last_reload"]["trigger"] == "SIGHUP"
            assert not state["watching"]
        finally:
            proc.terminate()
            proc.wait(20)


@pytest.mark.parametrize("inline_max_bytes", [4096, 0], ids=["on the loop", "in a thread"])
def test_a_small_file_loads_on_the_loop_and_a_large_one_in_a_thread_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inline_max_bytes: int
) -> None:
    """Which way the file is loaded (by its size) changes no result: diff, hash, digest, problems."""
    monkeypatch.setattr(reload_module, "INLINE_MAX_BYTES", inline_max_bytes)
    threads: list[object] = []
    real_to_thread = asyncio.to_thread

    async def counted(func: Callable[..., Any], /, *args: Any) -> Any:
        threads.append(func)
        return await real_to_thread(func, *args)

    monkeypatch.setattr(reload_module.asyncio, "to_thread", counted)
    path = tmp_path / "routing.yaml"
    backend = openai_backend("http://127.0.0.1:9/v1", "ok")
    write(path, routing({"a": backend}, {"m": ["a"]}))

    async def scenario() -> None:
        reloader = Reloader(build_gateway(load_config(path), Resources()), str(path), Resources())
        write(path, routing({"a": backend}, {"m": ["a"], "m2": ["a"]}))
        result = await reloader.reload()
        assert result.status == "ok" and result.diff["models_added"] == ["m2"]
        assert result.hash == config_hash(load_config(path)) == reloader.gateway.snapshot.hash
        assert reloader._attempted == hashlib.sha256(path.read_bytes()).hexdigest()

        path.write_bytes(b"backends: {a: \xff}\n")
        result = await reloader.reload()
        assert result.status == "invalid"
        [(where, message)] = result.problems
        assert where == "" and message.startswith("the file is not UTF-8 text: ")
        assert "m2" in reloader.gateway.snapshot.routes

    asyncio.run(scenario())
    assert len(threads) == (0 if inline_max_bytes else 2)
