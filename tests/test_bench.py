"""``interlock bench`` against ``interlock mock-upstream``, through a real gateway and directly.

The mock runs as its own process (the CLI a user runs), the gateway on a loopback port in this
one, and the bench as a process of its own, so the three do not share an interpreter. The mock's
pace (200 ms to the first token, 50 tokens/s) is slow enough that a loaded 2-core machine keeps it;
the bench must find it within 10%.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from gateway.loadgen.mock import FAULTS
from tests.conftest import run_gateway, wait_ready
from tests.fakes import free_port

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs" / "bench.schema.json").read_text())
TTFT_MS, TOKENS_PER_S = 200.0, 50.0


def _interlock(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", *args]


class Mock:
    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc = subprocess.Popen(
            _interlock("mock-upstream", "--port", str(self.port), *args),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self.url + "/models", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("mock-upstream did not start: " + self.proc.stderr.read().decode()[-2000:])
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def mock() -> Iterator[Mock]:
    m = Mock("--ttft-ms", str(TTFT_MS), "--tokens-per-s", str(TOKENS_PER_S), "--model", "mock")
    yield m
    m.stop()


def _gateway_config(base_url: str, cache: bool = False) -> dict[str, Any]:
    route: dict[str, Any] = {"targets": ["mock"]}
    if cache:
        route["cache"] = {"ttl_s": 60}
    return {
        "backends": {
            "mock": {
                "kind": "openai",
                "base_url": base_url,
                "model": "mock",
                "timeouts": {"connect": 2.0, "first_token": 10.0, "total": 60.0},
            }
        },
        "models": {"chat": route},
        "resilience": {"health_check": {"interval_s": 0}},
    }


def bench(tmp_path: Path, *args: str) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    out, per_request = tmp_path / "bench.json", tmp_path / "requests.jsonl"
    done = subprocess.run(
        _interlock("bench", *args, "--json", str(out), "--per-request", str(per_request), "--no-progress"),
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, SCHEMA)
    lines = [json.loads(line) for line in per_request.read_text().splitlines()]
    return doc, lines, done.stdout + done.stderr


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, after checking its signature and its header chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_the_bench_through_the_gateway_finds_the_mocks_pace(mock: Mock, tmp_path: Path) -> None:
    plot = tmp_path / "cliff.png"
    with run_gateway(_gateway_config(mock.url)) as url:
        wait_ready(url)
        doc, lines, output = bench(
            tmp_path,
            "--url", url, "--model", "chat", "--direct", mock.url, "--direct-model", "mock",
            "--concurrency", "1,3", "--requests", "6", "--max-tokens", "20", "--prompt-tokens", "32",
            "--slo", "ttft_ms=400,tpot_ms=30", "--plot", str(plot),
        )  # fmt: skip
    assert len(doc["points"]) == len(doc["direct_points"]) == len(doc["overhead"]) == 2
    for point in doc["points"] + doc["direct_points"]:
        assert (point["completed"], point["failed"], point["errors"]) == (6, 0, {})
        assert point["median_ttft_ms"] == pytest.approx(TTFT_MS, rel=0.1)
        assert point["mean_user_output_throughput"] == pytest.approx(TOKENS_PER_S, rel=0.1)
        assert point["median_tpot_ms"] == pytest.approx(1000 / TOKENS_PER_S, rel=0.1)
        assert point["median_itl_ms"] == pytest.approx(1000 / TOKENS_PER_S, rel=0.1)
        assert point["total_output_tokens"] == 6 * 20  # the mock's usage
        assert point["request_goodput"] == pytest.approx(point["request_throughput"])
        assert point["client"]["sse_events"] == 6 * 23  # role, 20 tokens, usage, [DONE]
    assert [p["max_concurrency"] for p in doc["points"]] == [1, 3]
    # three users at once get three times the output of one
    one, three = (p["output_throughput"] for p in doc["points"])
    assert three / one == pytest.approx(3, rel=0.25)
    assert {line["target"] for line in lines} == {"gateway", "direct"} and len(lines) == 24
    assert all(line["ok"] and line["cache"] is None for line in lines)
    assert "gateway overhead at 1 users" in output
    width, height = _png_size(plot)
    assert width > 300 and height > 200


def test_repeats_are_cache_hits_through_the_gateway(tmp_path: Path) -> None:
    # the cache keeps finished answers only ("stop"), not ones cut at max_tokens
    mock = Mock("--ttft-ms", str(TTFT_MS), "--tokens-per-s", "200", "--natural-tokens", "5")
    try:
        with run_gateway(_gateway_config(mock.url, cache=True)) as url:
            wait_ready(url)
            doc, lines, _ = bench(
                tmp_path, "--url", url, "--model", "chat", "--concurrency", "1", "--requests", "12",
                "--repeat", "0.5", "--max-tokens", "20", "--seed", "7",
            )  # fmt: skip
    finally:
        mock.stop()
    (point,) = doc["points"]
    hits = [line for line in lines if line["cache"] == "hit"]
    assert point["cache_hits"] == len(hits) > 0 and point["completed"] == 12
    assert all(line["cache"] == "miss" for line in lines if line not in hits)
    assert all(line["ttft_s"] < TTFT_MS / 2000 for line in hits)  # replayed, not generated


def _expected_faults(probabilities: dict[str, float], n: int, seed: int = 0) -> dict[str, int]:
    """What the mock's seeded draws give n requests."""
    rng, counts = random.Random(seed), dict.fromkeys(FAULTS, 0)
    for _ in range(n):
        draw, edge = rng.random(), 0.0
        for name in FAULTS:
            edge += probabilities.get(name, 0.0)
            if draw < edge:
                counts[name] += 1
                break
    return counts


def test_faults_show_up_as_errors_by_class(tmp_path: Path) -> None:
    probabilities = {"5xx": 0.15, "429": 0.15, "cut": 0.15, "stall": 0.15}
    faulty = Mock(
        "--ttft-ms", "20", "--tokens-per-s", "500", "--stall-s", "30", "--retry-after", "3",
        "--faults", ",".join(f"{k}={v}" for k, v in probabilities.items()),
    )  # fmt: skip
    try:
        doc, lines, _ = bench(
            tmp_path, "--url", faulty.url, "--model", "mock", "--concurrency", "4", "--requests", "40",
            "--max-tokens", "10", "--timeout", "1",
        )  # fmt: skip
    finally:
        faulty.stop()
    expected = _expected_faults(probabilities, 40)
    assert all(expected.values()), expected  # the seed gives every fault at least once
    (point,) = doc["points"]
    classes = {"5xx": "http_500", "429": "http_429", "cut": "stream_cut", "stall": "timeout"}
    assert point["errors"] == {classes[k]: v for k, v in expected.items()}
    assert point["rate_limited"] == expected["429"]
    assert point["completed"] == 40 - sum(expected.values())
    assert {line["retry_after"] for line in lines if line["error"] == "http_429"} == {"3"}


def test_a_reply_cut_before_it_starts_and_a_closed_port(tmp_path: Path) -> None:
    faulty = Mock("--ttft-ms", "20", "--faults", "cut=0.5")
    try:
        doc, _, _ = bench(
            tmp_path, "--url", faulty.url, "--model", "mock", "--no-stream", "--concurrency", "2",
            "--requests", "10", "--max-tokens", "3",
        )  # fmt: skip
    finally:
        faulty.stop()
    assert doc["points"][0]["errors"] == {"disconnected": _expected_faults({"cut": 0.5}, 10)["cut"]}
    doc, _, _ = bench(tmp_path, "--url", f"http://127.0.0.1:{free_port()}", "--model", "m", "--requests", "3")
    assert doc["points"][0]["errors"] == {"connect": 3}


def test_faults_through_the_gateway_are_errors_too(tmp_path: Path) -> None:
    faulty = Mock("--ttft-ms", "20", "--tokens-per-s", "500", "--faults", "cut=0.5", "--seed", "2")
    try:
        with run_gateway(_gateway_config(faulty.url)) as url:
            wait_ready(url)
            doc, lines, _ = bench(
                tmp_path, "--url", url, "--model", "chat", "--concurrency", "2", "--requests", "16",
                "--max-tokens", "10",
            )  # fmt: skip
    finally:
        faulty.stop()
    (point,) = doc["points"]
    # a stream cut after its first byte cannot be retried: the gateway ends it with an error event
    assert point["errors"].get("stream_error", 0) + point["errors"].get("stream_cut", 0) > 0, point["errors"]
    assert point["failed"] == sum(point["errors"].values()) and point["completed"] > 0
    assert all(line["error"] is None or line["message"] for line in lines)


def test_non_streaming_and_completions(mock: Mock, tmp_path: Path) -> None:
    doc, _, _ = bench(
        tmp_path, "--url", mock.url, "--model", "mock", "--endpoint", "completions", "--no-stream",
        "--rate", "20", "--arrivals", "constant", "--requests", "4", "--max-tokens", "10",
    )  # fmt: skip
    (point,) = doc["points"]
    assert doc["mode"] == "open" and point["request_rate"] == 20 and point["completed"] == 4
    assert point["total_output_tokens"] == 40 and point["median_ttft_ms"] is None
    # the whole reply: the first token's wait and nine more at 50/s
    assert point["median_e2el_ms"] == pytest.approx(TTFT_MS + 9 * 1000 / TOKENS_PER_S, rel=0.1)


def test_bad_flags_are_named(tmp_path: Path) -> None:
    bad_trace = tmp_path / "bad.jsonl"
    bad_trace.write_text("{oops\n")
    for args, problem in (
        (["--concurrency", "0"], "above 0"),
        (["--concurrency", "2", "--rate", "1"], "not both"),
        (["--slo", "fast=1"], "not one of"),
        (["--prompt-tokens", "lots"], "not a length"),
        (["--url", "ftp://x"], "http"),
        (["--trace", str(tmp_path / "none.jsonl")], "no file"),
        (["--trace", str(bad_trace)], "bad.jsonl:1: not JSON"),
        (["--plot", "x.png", "--workers", "0"], "at least 1"),
    ):
        done = subprocess.run(
            _interlock("bench", "--model", "m", "--requests", "1", *args),
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert done.returncode == 2 and problem in done.stderr, (args, done.stderr)


def test_workers_sessions_and_an_open_loop(mock: Mock, tmp_path: Path) -> None:
    doc, lines, _ = bench(
        tmp_path, "--url", mock.url, "--model", "mock", "--rate", "8", "--requests", "12", "--workers", "2",
        "--rounds", "3", "--max-tokens", "4", "--prompt-tokens", "10-20", "--shared-prefix", "0.5",
    )  # fmt: skip
    (point,) = doc["points"]
    assert point["completed"] == 12 and point["client"]["workers"] == 2
    assert {line["session"].split("-")[0] for line in lines} == {"w0", "w1"}
    by_session: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_session.setdefault(line["session"], []).append(line)
    for rounds in by_session.values():
        # a session's rounds follow each other, each prompt carrying the history before it
        rounds.sort(key=lambda line: line["round"])
        assert [r["round"] for r in rounds] == list(range(len(rounds)))
        for earlier, later in itertools.pairwise(rounds):
            assert later["start_s"] >= earlier["start_s"] + earlier["e2e_s"] - 0.01
            assert later["prompt_tokens"] > earlier["prompt_tokens"] + 4


def test_a_trace_is_replayed_at_its_timestamps(mock: Mock, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        "\n".join(
            json.dumps({"prompt": f"request {i}", "max_tokens": 2, "timestamp": 0.4 * i}) for i in range(4)
        )
    )
    doc, lines, _ = bench(
        tmp_path, "--url", mock.url, "--model", "mock", "--trace", str(trace), "--arrivals", "trace"
    )  # fmt: skip
    assert doc["mode"] == "open" and doc["points"][0]["completed"] == 4
    starts = sorted(line["start_s"] for line in lines)
    assert all(abs(start - 0.4 * i) < 0.15 for i, start in enumerate(starts)), starts


def test_the_mock_names_a_port_it_cannot_take(mock: Mock) -> None:
    done = subprocess.run(
        _interlock("mock-upstream", "--port", str(mock.port)),
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{mock.port}" in done.stderr


def test_the_serving_path_does_not_load_the_bench() -> None:
    code = (
        "import sys, gateway.server, gateway.app, gateway.cli; gateway.cli.parser(); "
        "print(sorted(m for m in sys.modules if m.startswith('gateway.loadgen')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    # the CLI's flags only: no runner, client, report, plot or mock (nor rich and matplotlib)
    assert done.stdout.strip() == "['gateway.loadgen', 'gateway.loadgen.cli']"


def test_one_process_reads_well_over_20000_sse_events_per_cpu_second(tmp_path: Path) -> None:
    # CPU time, not wall time, so a loaded machine slows it without failing it: the margin is
    # about 6x on the shared 2-core machine (benchmarks/loadgen/sse_rate.py prints the figures)
    fast = Mock("--ttft-ms", "0", "--tokens-per-s", "0")
    try:
        doc, _, _ = bench(
            tmp_path, "--url", fast.url, "--model", "mock", "--concurrency", "8", "--requests", "24",
            "--max-tokens", "1000", "--prompt-tokens", "8",
        )  # fmt: skip
    finally:
        fast.stop()
    (point,) = doc["points"]
    assert point["completed"] == 24 and point["client"]["sse_events"] == 24 * 1003
    assert point["client"]["sse_events_per_cpu_s"] > 20_000


#: fields vLLM adds to the OpenAI shapes (tests/vllm_sim.py's captures); the mock need not send them
_VLLM_EXTRAS = {
    "prompt_token_ids", "prompt_text", "token_ids", "stop_reason", "system_fingerprint", "routed_experts",
    "service_tier", "prompt_logprobs", "kv_transfer_params", "ec_transfer_params", "metrics", "refusal",
    "annotations", "audio", "function_call", "reasoning", "prompt_tokens_details",
}  # fmt: skip


def _shape(value: Any) -> Any:
    """The keys of a reply or event, recursively, without vLLM's extras and without the values."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in sorted(value.items()) if k not in _VLLM_EXTRAS}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return "null" if value is None else type(value).__name__


def _events_shape(body: str) -> list[Any]:
    shapes: list[Any] = []
    for event in body.strip().split("\n\n"):
        data = event.removeprefix("data: ")
        shape = "[DONE]" if data == "[DONE]" else _shape(json.loads(data))
        if not shapes or shapes[-1] != shape:  # a run of text chunks is one shape
            shapes.append(shape)
    return shapes


@pytest.mark.parametrize("name", ["chat", "chat_stream_usage", "completions", "completions_stream"])
def test_the_mock_frames_replies_as_vllm_does(mock: Mock, name: str) -> None:
    captured = json.loads((ROOT / "tests" / "fixtures" / "vllm-0.26.0" / f"{name}.json").read_text())
    request = {**captured["request"], "model": "mock"}
    path = captured["path"].removeprefix("/v1")
    response = httpx.post(mock.url + path, json=request, timeout=30)
    assert response.status_code == captured["status"] == 200
    if request.get("stream"):
        assert response.headers["content-type"].startswith("text/event-stream")
        assert _events_shape(response.text) == _events_shape(captured["body"])
    else:
        body = captured["body"] if isinstance(captured["body"], dict) else json.loads(captured["body"])
        assert _shape(response.json()) == _shape(body)
        assert response.json()["usage"]["completion_tokens"] == request["max_tokens"]


def test_the_openai_sdk_reads_the_mock_and_its_429(tmp_path: Path, mock: Mock) -> None:
    import openai

    client = openai.OpenAI(base_url=mock.url, api_key="unused", max_retries=0, timeout=30)
    chunks = list(
        client.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) != ""
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    limited = Mock("--faults", "429=1", "--retry-after", "5")
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            openai.OpenAI(base_url=limited.url, api_key="unused", max_retries=0).completions.create(
                model="mock", prompt="hi", max_tokens=2
            )
    finally:
        limited.stop()
    assert caught.value.response.headers["retry-after"] == "5"
    assert caught.value.code == "rate_limit_exceeded"


def test_the_bench_reads_llama_cpp_pythons_own_server(llama_server: str, tmp_path: Path) -> None:
    # a real OpenAI-compatible server (sse-starlette frames its events with \r\n)
    doc, lines, _ = bench(
        tmp_path, "--url", llama_server, "--model", "smollm2", "--concurrency", "2", "--requests", "4",
        "--max-tokens", "8", "--prompt-tokens", "12", "--timeout", "120",
    )  # fmt: skip
    (point,) = doc["points"]
    assert (point["completed"], point["errors"]) == (4, {})
    assert all(line["ttft_s"] is not None and 1 <= line["output_tokens"] <= 8 for line in lines), lines
    assert point["median_ttft_ms"] is not None and point["total_output_tokens"] > 0
