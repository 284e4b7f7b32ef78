"""``kind: vllm`` through the real gateway, against simulated vLLM 0.26.0 servers (``tests/vllm_sim``).

The official ``openai`` SDK is the client (no retries), so what is checked is what an
application sees: vLLM's replies and SSE relayed untouched, its errors mapped to OpenAI's
shapes and statuses, its rough edges (a reset on ``messages: []``, a 500 on a JSON array)
never reaching a client. The /metrics parser is checked on the captured page itself.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import orjson
import pytest
import uvicorn
from openai.types.chat import ChatCompletionMessageParam

from backends.base import BackendRequest, Resources
from backends.errors import InvalidRequest
from backends.vllm import VllmBackend, VllmConfig, endpoint_root
from backends.vllm.metrics import MetricsSnapshot, PrefixRate, parse_metrics
from gateway.app import Gateway
from gateway.config import ConfigError, parse_config
from gateway.server import create_app
from gateway.settings import Settings
from tests.fakes import closed_url, free_port
from tests.vllm_sim import CHAT_TOKENS, VllmSim, fixture

UPSTREAM_KEY = "sk-vllm-upstream-0123456789"
QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name three colors."}]
LONG_PROMPT = "Our store sells bicycles, helmets, lights and locks; staff answer politely. " * 60


@contextmanager
def serve(config: dict[str, Any]) -> Iterator[tuple[str, Gateway]]:
    """The real app under uvicorn in a thread, like ``tests.conftest.run_gateway``, also giving the
    ``Gateway`` so that tests can read the pool's own figures."""
    port = free_port()
    uv = uvicorn.Config(
        app=None,
        host="127.0.0.1",
        port=port,
        lifespan="on",  # type: ignore[arg-type]
        log_level="warning",
        access_log=False,
        loop="asyncio",
        http="httptools",
    )
    server = uvicorn.Server(uv)
    app = create_app(parse_config(config, "<test>"), Settings(port=port), server)
    uv.app = app
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while not (server.started and httpx.get(url + "/health/ready").status_code == 200):
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("gateway did not start")
        time.sleep(0.02)
    try:
        yield url, app.gateway
    finally:
        server.should_exit = True
        thread.join(10)


def vllm_block(urls: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "kind": "vllm",
        "endpoints": urls,
        "model": "smollm2",
        "api_key": UPSTREAM_KEY,
        "scrape_interval_s": 0.05,
        "health_interval_s": 0.1,
        "timeouts": {"connect": 1.0, "first_token": 5.0, "total": 10.0},
        **extra,
    }


@pytest.fixture(scope="module")
def sims() -> Iterator[list[VllmSim]]:
    with VllmSim() as one, VllmSim() as two:
        yield [one, two]


@pytest.fixture(scope="module")
def gateway(sims: list[VllmSim]) -> Iterator[tuple[str, Gateway]]:
    urls = [s.base_url for s in sims]
    config = {
        "backends": {
            "pool": vllm_block(urls),
            "misnamed": vllm_block(urls, model="nope"),
            "half-dead": vllm_block([urls[0], closed_url()]),
        },
        "models": {
            "smollm2": {"targets": ["pool"]},
            "misnamed": {"targets": ["misnamed"]},
            "half-dead": {"targets": ["half-dead"]},
        },
        # one attempt per request and circuits that stay closed: each test sees the pool's own answer
        "resilience": {
            "retry": {"attempts": 1},
            "breaker": {"consecutive_failures": 1000, "window": 1000, "min_calls": 1000},
        },
    }
    with serve(config) as served:
        yield served


@pytest.fixture
def url(gateway: tuple[str, Gateway], sims: list[VllmSim]) -> str:
    for sim in sims:
        sim.reset()
    return gateway[0]


@pytest.fixture
def pool(gateway: tuple[str, Gateway]) -> VllmBackend:
    backend = gateway[1].backends["pool"]
    assert isinstance(backend, VllmBackend)
    return backend


@pytest.fixture
def client(url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=url + "/v1", api_key="client-key", max_retries=0, timeout=10) as c:
        yield c


def until(condition: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def normalised(raw: str) -> str:
    """A reply with what differs between two runs (ids, times, token counts) blanked."""
    raw = re.sub(r'"id":"(chatcmpl|cmpl)-[0-9a-f]+"', '"id":"ID"', raw)
    raw = re.sub(r'"created":\d+', '"created":0', raw)
    return re.sub(r'"(prompt_tokens|total_tokens)":\d+', r'"\1":0', raw)


# --- replies ----------------------------------------------------------------------------------


def test_chat_reply(client: openai.OpenAI, sims: list[VllmSim]) -> None:
    reply = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=QUESTION, max_tokens=24, temperature=0
    )
    assert reply.headers["x-interlock-backend"] == "pool"
    completion = reply.parse()
    assert completion.choices[0].message.content == "".join(CHAT_TOKENS)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 24
    assert completion.system_fingerprint == "vllm-0.26.0-fad12e9d"
    seen = [r for s in sims for r in s.requests]
    assert len(seen) == 1
    assert seen[0]["body"]["model"] == "smollm2"
    assert seen[0]["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_chat_stream_bytes_are_relayed_untouched(url: str, sims: list[VllmSim]) -> None:
    body = {"model": "smollm2", "messages": QUESTION, "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.Client(timeout=10) as http:
        through = http.post(url + "/v1/chat/completions", json=body)
        direct = http.post(sims[0].base_url + "/chat/completions", json=body)
    assert through.headers["content-type"].startswith("text/event-stream")
    assert normalised(through.text) == normalised(direct.text)
    assert through.text.endswith('"system_fingerprint":"vllm-0.26.0-fad12e9d"}\n\ndata: [DONE]\n\n')


def test_chat_stream_with_the_sdk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(CHAT_TOKENS[:8])
    assert chunks[-1].choices[0].finish_reason == "length"


def test_include_usage_ends_with_a_chunk_without_choices(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smollm2",
        messages=QUESTION,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24
    assert all(c.usage is None for c in chunks[:-1])


def test_completions(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="smollm2", prompt="The sky is", max_tokens=8, temperature=0)
    assert completion.choices[0].text == " a canvas of colors, a canvas of"
    assert completion.usage is not None and completion.usage.prompt_tokens == 3
    stream = client.completions.create(
        model="smollm2",
        prompt="The sky is",
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == " a canvas of colors, a"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


# --- errors -----------------------------------------------------------------------------------


def test_embeddings_on_a_generative_pool_is_a_clear_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="smollm2", input="hello")
    assert caught.value.code == "unsupported_endpoint"
    assert "does not serve embeddings" in caught.value.message


def test_a_prompt_over_the_context_is_a_400_with_the_numbers(client: openai.OpenAI) -> None:
    words: list[ChatCompletionMessageParam] = [{"role": "user", "content": "word " * 6000}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="smollm2", messages=words, max_tokens=8, stream=stream)
        assert caught.value.code == "context_length_exceeded"
        assert caught.value.param == "messages"
        assert "maximum context length is 4096 tokens" in caught.value.message
        assert "at least 4089 input tokens" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=100_000)
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "max_tokens"
    assert "max_tokens=100000 cannot be greater than max_model_len" in caught.value.message


def test_vllms_own_400s_keep_their_message(client: openai.OpenAI) -> None:
    function = {"name": "f", "parameters": {"type": "object", "properties": {}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="smollm2",
            messages=QUESTION,
            extra_body={"tools": [{"type": "function", "function": function}], "tool_choice": "auto"},
        )
    assert "--enable-auto-tool-choice" in caught.value.message
    assert caught.value.type == "invalid_request_error"


def test_an_upstream_model_the_pool_lacks_is_a_502_not_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="misnamed", messages=QUESTION)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_model_not_found"
    assert "The model `nope` does not exist." in caught.value.message


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b'{"model": "smollm2", "messages": []}', "messages"),
        (b"[1,2]", "JSON object"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
    ],
)
def test_rough_edges_of_vllm_never_reach_a_client(
    url: str, sims: list[VllmSim], raw: bytes, says: str
) -> None:
    response = httpx.post(
        url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=10
    )
    assert response.status_code == 400
    assert says in response.json()["error"]["message"]
    assert all(s.served == 0 for s in sims)


async def test_the_backend_itself_never_sends_shapes_vllm_mishandles() -> None:
    """The gateway validates first; the pool checks again (it may be used behind other callers)."""
    backend = VllmBackend("pool", VllmConfig(kind="vllm", endpoints=[closed_url()]), Resources())
    for body in (
        {"model": "m", "messages": []},
        {"model": "m", "messages": "hi"},
        {"messages": [{"role": "user", "content": "hi"}]},
    ):
        with pytest.raises(InvalidRequest):
            await backend.complete(BackendRequest("chat", body, "r"))
    with pytest.raises(InvalidRequest):
        await backend.stream(BackendRequest("completions", {"model": "m"}, "r", stream=True))


def test_the_simulator_has_vllms_rough_edges(sims: list[VllmSim]) -> None:
    base = sims[0].base_url
    with pytest.raises(httpx.TransportError):
        httpx.post(base + "/chat/completions", json={"model": "smollm2", "messages": []}, timeout=5)
    array = httpx.post(base + "/chat/completions", content=b"[1,2]", timeout=5)
    assert array.status_code == 500
    assert array.json()["error"]["message"] == "'list' object has no attribute 'get'"
    unnamed = httpx.post(base + "/chat/completions", json={"messages": QUESTION, "max_tokens": 4}, timeout=5)
    assert unnamed.status_code == 200 and unnamed.json()["model"] == "smollm2"


# --- cancellation and live figures ------------------------------------------------------------


def test_a_client_that_leaves_cancels_the_upstream(url: str, sims: list[VllmSim], pool: VllmBackend) -> None:
    for sim in sims:
        sim.decode_s_per_token = 0.005
    try:
        body = {"model": "smollm2", "messages": QUESTION, "max_tokens": 2000, "stream": True}
        with (
            httpx.Client(timeout=10) as http,
            http.stream("POST", url + "/v1/chat/completions", json=body) as response,
        ):
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            assert sum(e["in_flight"] for e in pool.endpoints()) == 1
        until(lambda: any(s.disconnected.is_set() for s in sims))
        until(lambda: sum(e["in_flight"] for e in pool.endpoints()) == 0)
        until(lambda: all(s.running == 0 for s in sims))
        assert sum(s.cancelled for s in sims) == 1
    finally:
        for sim in sims:
            sim.decode_s_per_token = VllmSim.decode_s_per_token


def test_scraped_metrics_are_visible_per_endpoint(
    client: openai.OpenAI, sims: list[VllmSim], pool: VllmBackend
) -> None:
    for i in range(3):
        client.chat.completions.create(
            model="smollm2",
            max_tokens=2,
            messages=[
                {"role": "system", "content": LONG_PROMPT},
                {"role": "user", "content": f"question {i}"},
            ],
        )
    home = next(i for i, s in enumerate(sims) if s.served)
    assert sims[home].served == 3, "the shared prompt keeps them on one server"
    sims[home].extra_running, sims[home].extra_waiting = 2, 7

    def row() -> dict[str, Any]:
        return next(e for e in pool.endpoints() if e["url"] == endpoint_root(sims[home].base_url))

    until(lambda: row()["waiting"] == 7 and row()["running"] == 2)
    figures = row()
    assert figures["healthy"] and figures["in_flight"] == 0 and figures["served"] >= 3
    assert figures["kv_cache_usage"] == 0.0
    assert 0.5 < figures["prefix_hit_rate"] <= 1.0
    assert figures["index_blocks"] > 0
    assert pool.load().queued == 7


def test_a_dead_endpoint_is_listed_and_skipped(client: openai.OpenAI, gateway: tuple[str, Gateway]) -> None:
    backend = gateway[1].backends["half-dead"]
    assert isinstance(backend, VllmBackend)
    rows = backend.endpoints()
    assert [r["healthy"] for r in rows] == [True, False]
    assert rows[1]["reason"] == "cannot connect"
    for i in range(4):
        client.chat.completions.create(
            model="half-dead", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=2
        )
    ready = httpx.get(gateway[0] + "/health/ready", timeout=5)
    assert ready.status_code == 200


# --- /metrics parsing -------------------------------------------------------------------------


def captured_page(name: str) -> str:
    body: str = fixture(name)["body"]
    return body


def test_the_captured_metrics_page_parses() -> None:
    idle = parse_metrics(captured_page("metrics_idle"))
    assert idle == MetricsSnapshot(
        running=0.0, waiting=0.0, kv_cache_usage=0.0, prefix_queries=0.0, prefix_hits=0.0
    )
    snapshot = parse_metrics(captured_page("metrics_after"))
    assert (snapshot.prefix_queries, snapshot.prefix_hits) == (314.0, 240.0)
    rate = PrefixRate()
    rate.update(idle.prefix_queries, idle.prefix_hits)
    assert rate.update(snapshot.prefix_queries, snapshot.prefix_hits) == pytest.approx(240 / 314)


def test_older_metric_names_are_aliases() -> None:
    old = (
        captured_page("metrics_idle")
        .replace("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
        .replace(
            'vllm:prefix_cache_queries_total{engine="0",model_name="smollm2"} 0.0',
            'vllm:gpu_prefix_cache_queries_total{engine="0",model_name="smollm2"} 50.0',
        )
        .replace(
            'vllm:prefix_cache_hits_total{engine="0",model_name="smollm2"} 0.0',
            'vllm:gpu_prefix_cache_hits_total{engine="0",model_name="smollm2"} 20.0',
        )
        .replace("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
    )
    old = old.replace(
        'vllm:gpu_cache_usage_perc{engine="0",model_name="smollm2"} 0.0',
        'vllm:gpu_cache_usage_perc{engine="0",model_name="smollm2"} 0.25',
    )
    snapshot = parse_metrics(old)
    assert snapshot.kv_cache_usage == 0.25
    assert (snapshot.prefix_queries, snapshot.prefix_hits) == (50.0, 20.0)
    bare = (
        "vllm:gpu_prefix_cache_queries 10\nvllm:gpu_prefix_cache_hits 4\n"
        "vllm:gpu_prefix_cache_hits_created 9e9\n"
    )
    assert (parse_metrics(bare).prefix_queries, parse_metrics(bare).prefix_hits) == (10.0, 4.0)


def test_series_are_summed_over_label_sets() -> None:
    page = "\n".join(
        [
            "# TYPE vllm:num_requests_running gauge",
            'vllm:num_requests_running{engine="0",model_name="a"} 3.0',
            'vllm:num_requests_running{engine="1",model_name="a"} 4.0',
            'vllm:num_requests_waiting{engine="0",model_name="we}ird \\"x\\" name"} 2.0 1700000000000',
            'vllm:num_requests_waiting{engine="1",model_name="a"} NaN',
            'vllm:kv_cache_usage_perc{engine="0"} 0.5',
            'vllm:kv_cache_usage_perc{engine="1"} 0.7',
            "vllm:prefix_cache_queries_total 100",
            "vllm:prefix_cache_hits_total not-a-number",
            'vllm:num_requests_running{engine="2" 9.0',  # malformed: skipped
            'vllm:num_requests_waiting_by_reason{reason="capacity"} 99.0',
        ]
    )
    snapshot = parse_metrics(page)
    assert snapshot.running == 7.0
    assert snapshot.waiting == 2.0
    assert snapshot.kv_cache_usage == pytest.approx(0.6)  # a share per engine: averaged
    assert snapshot.prefix_queries == 100.0 and snapshot.prefix_hits is None


def test_the_hit_rate_comes_from_counter_deltas() -> None:
    rate = PrefixRate()
    assert rate.update(1000, 900) == 0.9  # the first scrape: lifetime
    assert rate.update(1100, 900) == 0.0  # the last 100 tokens queried all missed
    assert rate.update(1100, 900) == 0.0  # nothing queried: kept
    assert rate.update(50, 25) == 0.5  # the server restarted
    assert rate.update(None, None) == 0.5


# --- configuration ----------------------------------------------------------------------------


def test_endpoint_urls_are_normalised() -> None:
    assert endpoint_root("http://10.0.0.5:8000/v1/") == "http://10.0.0.5:8000"
    assert endpoint_root("http://10.0.0.5:8000") == "http://10.0.0.5:8000"
    assert endpoint_root("https://gpu.example/vllm/v1") == "https://gpu.example/vllm"


@pytest.mark.parametrize(
    ("block", "says"),
    [
        ({"endpoints": ["http://a:8000"], "dns": "vllm:8000"}, "exactly one of endpoints"),
        ({}, "exactly one of endpoints"),
        ({"endpoints": []}, "at least one URL"),
        ({"endpoints": ["ftp://a:8000"]}, "not an http"),
        ({"endpoints": ["http://a:8000", "http://a:8000/v1"]}, "twice"),
        ({"dns": "vllm"}, "host:port"),
        ({"dns": "vllm:http"}, "host:port"),
        ({"endpoints": ["http://a:8000"], "routing": "fastest"}, "routing"),
    ],
)
def test_bad_pool_configs_are_refused(block: dict[str, Any], says: str) -> None:
    config = {"backends": {"pool": {"kind": "vllm", **block}}, "models": {"m": {"targets": ["pool"]}}}
    with pytest.raises(ConfigError) as caught:
        parse_config(config, "<test>", env={})
    assert says in str(caught.value)


def test_a_good_config_loads_with_documented_defaults() -> None:
    loaded = parse_config(
        {
            "backends": {"pool": {"kind": "vllm", "dns": "vllm.internal:8000"}},
            "models": {"m": {"targets": ["pool"]}},
        },
        "<test>",
        env={},
    )
    config = loaded.backends["pool"]
    assert isinstance(config, VllmConfig)
    assert (config.routing, config.load_guard, config.prefix_block_chars, config.prefix_ttl_s) == (
        "auto",
        None,
        256,
        600.0,
    )
    assert (config.scrape_interval_s, config.health_interval_s, config.dns_refresh_s) == (2.0, 5.0, 30.0)


# --- the simulator against the captured fixtures ----------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "chat",
        "chat_stream",
        "chat_stream_usage",
        "chat_stop_seq",
        "completions",
        "completions_stream",
        "err_unknown_model",
        "err_wrong_type",
        "err_malformed_json",
        "err_json_array",
        "err_max_tokens_over_context",
        "err_prompt_over_context",
        "chat_tools_auto_not_enabled",
        "embeddings_on_generative",
        "err_wrong_path",
        "health",
        "version",
    ],
)
def test_the_simulator_reproduces_the_fixture(sims: list[VllmSim], name: str) -> None:
    captured = fixture(name)
    root = endpoint_root(sims[0].base_url)
    request = captured["request"]
    if captured["method"] == "GET":
        response = httpx.get(root + captured["path"], timeout=5)
    else:
        content = request.encode() if isinstance(request, str) else orjson.dumps(request)
        response = httpx.post(
            root + captured["path"], content=content, timeout=5, headers={"content-type": "application/json"}
        )
    assert response.status_code == captured["status"]
    assert response.headers.get("content-type") == captured["headers"].get("Content-Type")
    assert normalised(response.text) == normalised(captured["body"])
