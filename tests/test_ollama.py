"""``kind: ollama`` through the real gateway and the official openai SDK, against ``tests.ollama_sim``.

The simulator is written from Ollama's API reference (no Ollama binary here); its fake model is
deterministic (``You said: <text>``, one token per word), so replies and usage are asserted exactly,
and it records the native requests, so the OpenAI → Ollama mapping is asserted on what arrived.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from backends.base import BackendRequest, Resources
from backends.http import HttpClient
from backends.ollama import OllamaBackend, OllamaConfig, normalise_model_name
from gateway.config import ConfigError, parse_config
from tests.conftest import run_gateway, wait_ready
from tests.fakes import free_port
from tests.ollama_sim import BUSY_MESSAGE, OllamaSim, count_tokens, embed_vector

MODEL = "llama3.2:3b"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
#: request-by-request mapping tests: one attempt each, circuits that never open
QUIET = {
    "retry": {"attempts": 1},
    "health_check": {"interval_s": 0},
    "breaker": {"consecutive_failures": 1000, "window": 1000, "min_calls": 1000},
}


def ollama_backend(url: str, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "ollama",
        "url": url,
        "model": model,
        "timeouts": {"connect": 1.0, "first_token": 3.0, "total": 10.0},
        **extra,
    }


def nothing_listens() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def sim() -> Iterator[OllamaSim]:
    with OllamaSim() as s:
        yield s


@pytest.fixture(scope="module")
def gateway(sim: OllamaSim) -> Iterator[str]:
    config = {
        "backends": {
            "ol": ollama_backend(sim.url, keep_alive="10m", num_ctx=2048),
            "ol-embed": ollama_backend(sim.url, "all-minilm"),
            # a 503 with Retry-After opens a circuit at once: its own backends
            "ol-busy": ollama_backend(sim.url),
            "ol-busy-after": ollama_backend(sim.url),
        },
        "models": {
            "chat": {"targets": ["ol"]},
            "embed": {"targets": ["ol-embed"]},
            "busy": {"targets": ["ol-busy"]},
            "busy-after": {"targets": ["ol-busy-after"]},
        },
        "resilience": QUIET,
    }
    with run_gateway(config) as url:
        wait_ready(url, timeout=5)  # the preloads have finished
        yield url


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def sse_events(raw: bytes) -> list[str]:
    return [line[len(b"data: ") :].decode() for line in raw.split(b"\n") if line.startswith(b"data: ")]


# --- chat ---------------------------------------------------------------------------------------


def test_chat_non_stream(client: openai.OpenAI, sim: OllamaSim) -> None:
    reply = client.chat.completions.create(
        model="chat", messages=[{"role": "developer", "content": "Be brief."}, *user("hello big world")]
    )
    assert reply.object == "chat.completion"
    assert reply.model == "chat"
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "You said: hello big world"
    assert choice.finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == count_tokens("Be brief.", "hello big world") == 5
    assert reply.usage.completion_tokens == 5
    assert reply.usage.total_tokens == 10
    sent = sim.last("/api/chat")
    assert sent["model"] == MODEL and sent["stream"] is False
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello big world"},
    ]


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="chat", messages=user("stream this please"), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "You said: stream this please"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (3, 5, 8)
    assert len({c.id for c in chunks}) == 1 and all(c.model == "chat" for c in chunks)


def test_chat_stream_wire_format(http: httpx.Client, sim: OllamaSim) -> None:
    response = http.post(
        "/v1/chat/completions", json={"model": "chat", "messages": user("a b"), "stream": True}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.content.endswith(b"data: [DONE]\n\n")
    events = sse_events(response.content)
    assert events[-1] == "[DONE]"
    bodies = [orjson.loads(e) for e in events[:-1]]
    assert all(b["object"] == "chat.completion.chunk" for b in bodies)
    assert not any("usage" in b for b in bodies), "usage chunk sent without include_usage"
    # one SSE event per Ollama token: the deltas are relayed as they come, not re-chunked
    deltas = [b["choices"][0]["delta"].get("content") for b in bodies]
    assert deltas == ["", "You", " said:", " a", " b", None]
    assert sim.last("/api/chat")["stream"] is True


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_gives_length(client: openai.OpenAI, sim: OllamaSim, stream: bool) -> None:
    if stream:
        chunks = list(
            client.chat.completions.create(
                model="chat",
                messages=user("one two three"),
                max_tokens=2,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
        usage = chunks[-1].usage
    else:
        reply = client.chat.completions.create(model="chat", messages=user("one two three"), max_tokens=2)
        text, finish, usage = reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage
    assert text == "You said:"
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 2
    assert sim.last("/api/chat")["options"]["num_predict"] == 2


# --- options mapping ----------------------------------------------------------------------------


def test_options_mapping(client: openai.OpenAI, sim: OllamaSim) -> None:
    reply = client.chat.completions.create(
        model="chat",
        messages=user("one two STOP three"),
        temperature=0.3,
        top_p=0.9,
        seed=7,
        stop=["STOP", "never"],
        max_tokens=50,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        extra_body={"top_k": 20},
    )
    assert reply.choices[0].message.content == "You said: one two"  # cut at the stop string
    assert reply.choices[0].finish_reason == "stop"
    sent = sim.last("/api/chat")
    assert sent["options"] == {
        "temperature": 0.3,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["STOP", "never"],
        "num_predict": 50,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "top_k": 20,
        "num_ctx": 2048,
    }
    assert sent["keep_alive"] == "10m"
    assert "format" not in sent and "think" not in sent and "tools" not in sent


def test_only_given_options_are_sent(client: openai.OpenAI, sim: OllamaSim) -> None:
    client.chat.completions.create(model="chat", messages=user("x"), stop="END")
    assert sim.last("/api/chat")["options"] == {"stop": ["END"], "num_ctx": 2048}


def test_json_object_format(client: openai.OpenAI, sim: OllamaSim) -> None:
    reply = client.chat.completions.create(
        model="chat", messages=user("hi"), response_format={"type": "json_object"}
    )
    assert orjson.loads(reply.choices[0].message.content or "") == {"you_said": "hi"}
    assert sim.last("/api/chat")["format"] == "json"


def test_json_schema_format(client: openai.OpenAI, sim: OllamaSim) -> None:
    schema = {"type": "object", "properties": {"you_said": {"type": "string"}}, "required": ["you_said"]}
    client.chat.completions.create(
        model="chat",
        messages=user("hi"),
        max_completion_tokens=5,
        response_format={"type": "json_schema", "json_schema": {"name": "echo", "schema": schema}},
    )
    sent = sim.last("/api/chat")
    assert sent["format"] == schema
    assert sent["options"]["num_predict"] == 5


def test_reasoning_effort_maps_to_think(http: httpx.Client, sim: OllamaSim) -> None:
    response = http.post(
        "/v1/chat/completions", json={"model": "chat", "messages": user("why"), "reasoning_effort": "low"}
    )
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert message["reasoning_content"] == "Thinking about it."
    assert message["content"] == "You said: why"
    assert sim.last("/api/chat")["think"] == "low"


# --- tools and images ---------------------------------------------------------------------------


def test_tool_call_round_trip(client: openai.OpenAI, sim: OllamaSim) -> None:
    first = client.chat.completions.create(
        model="chat", messages=user("weather in Tokyo?"), tools=[WEATHER_TOOL]
    )  # type: ignore[list-item]
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1
    call = calls[0]
    assert call.id == "call_sim0001" and call.type == "function"
    assert call.function.name == "get_weather"
    assert orjson.loads(call.function.arguments) == {"text": "weather in Tokyo?"}
    assert sim.last("/api/chat")["tools"] == [WEATHER_TOOL]

    messages: list[Any] = [
        *user("weather in Tokyo?"),
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "11 degrees"},
    ]
    second = client.chat.completions.create(model="chat", messages=messages, tools=[WEATHER_TOOL])  # type: ignore[list-item]
    assert second.choices[0].message.content == "Tool said: 11 degrees"
    sent = sim.last("/api/chat")["messages"]
    assert sent[1]["tool_calls"] == [
        {
            "id": "call_sim0001",
            "function": {"name": "get_weather", "arguments": {"text": "weather in Tokyo?"}},
        }
    ]  # an object, not a string
    assert sent[2] == {
        "role": "tool",
        "content": "11 degrees",
        "tool_call_id": "call_sim0001",
        "tool_name": "get_weather",
    }


def test_tool_call_stream(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="chat", messages=user("call it"), tools=[WEATHER_TOOL], stream=True
        )
    )  # type: ignore[list-item]
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert len(deltas) == 1
    assert deltas[0].index == 0 and deltas[0].id == "call_sim0001"
    assert deltas[0].function is not None and deltas[0].function.name == "get_weather"
    assert orjson.loads(deltas[0].function.arguments or "") == {"text": "call it"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_drops_tools(client: openai.OpenAI, sim: OllamaSim) -> None:
    reply = client.chat.completions.create(
        model="chat",
        messages=user("no tools"),
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="none",
    )
    assert reply.choices[0].message.content == "You said: no tools"
    assert "tools" not in sim.last("/api/chat")


def test_base64_image_parts(client: openai.OpenAI, sim: OllamaSim) -> None:
    image = base64.b64encode(b"\x89PNG fake").decode()
    content = [
        {"type": "text", "text": "what is "},
        {"type": "text", "text": "this"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
    ]
    reply = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": content}])  # type: ignore[misc]
    assert reply.choices[0].message.content == "You said: what is this"
    assert sim.last("/api/chat")["messages"] == [
        {"role": "user", "content": "what is this", "images": [image]}
    ]


# --- text completions ---------------------------------------------------------------------------


def test_completions_non_stream(client: openai.OpenAI, sim: OllamaSim) -> None:
    reply = client.completions.create(model="chat", prompt="Once upon a time", max_tokens=40, seed=1)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "Continued: Once upon a time"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (4, 5)
    sent = sim.last("/api/generate")
    assert sent["prompt"] == "Once upon a time" and sent["raw"] is True and sent["stream"] is False
    assert sent["options"] == {"seed": 1, "num_predict": 40, "num_ctx": 2048}
    assert sent["keep_alive"] == "10m"


def test_completions_stream(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model="chat", prompt=["Hello there"], stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Continued: Hello there"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_completions_suffix_uses_the_template(client: openai.OpenAI, sim: OllamaSim) -> None:
    reply = client.completions.create(model="chat", prompt="def f(", suffix="return 1")
    assert reply.choices[0].text == "Continued: def f( then return 1"
    sent = sim.last("/api/generate")
    assert sent["suffix"] == "return 1" and sent["raw"] is False


# --- embeddings ---------------------------------------------------------------------------------


def test_embeddings_sdk_default_base64(client: openai.OpenAI, sim: OllamaSim) -> None:
    reply = client.embeddings.create(model="embed", input=["red apple", "blue"])
    assert [d.index for d in reply.data] == [0, 1]
    for item, text in zip(reply.data, ["red apple", "blue"], strict=True):
        assert item.embedding == pytest.approx(embed_vector(text), rel=1e-6)  # float32 on the wire
    assert reply.usage.prompt_tokens == 3 and reply.usage.total_tokens == 3
    assert reply.model == "embed"
    sent = sim.last("/api/embed")
    assert sent["model"] == "all-minilm" and sent["input"] == ["red apple", "blue"]


def test_embeddings_float_and_dimensions(http: httpx.Client, sim: OllamaSim) -> None:
    response = http.post(
        "/v1/embeddings",
        json={"model": "embed", "input": "green", "dimensions": 4, "encoding_format": "float"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    assert body["data"] == [{"object": "embedding", "index": 0, "embedding": embed_vector("green", 4)}]
    assert body["usage"] == {"prompt_tokens": 1, "total_tokens": 1}
    assert sim.last("/api/embed")["dimensions"] == 4


def test_embeddings_base64_is_little_endian_float32(http: httpx.Client) -> None:
    response = http.post("/v1/embeddings", json={"model": "embed", "input": "x", "encoding_format": "base64"})
    raw = base64.b64decode(response.json()["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(embed_vector("x"), rel=1e-6)


def test_preloads_used_the_documented_load_requests(sim: OllamaSim) -> None:
    loads = [(p, b) for p, b in sim.requests if not (b.get("messages") or b.get("prompt") or b.get("input"))]
    assert (
        "/api/chat",
        {"model": MODEL, "messages": [], "options": {"num_ctx": 2048}, "keep_alive": "10m"},
    ) in loads
    # all-minilm refuses chat (400 "does not support chat"), so it was loaded through /api/embed
    assert ("/api/chat", {"model": "all-minilm", "messages": []}) in loads
    assert ("/api/embed", {"model": "all-minilm", "input": []}) in loads


# --- requests the backend refuses -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/chat/completions", {"n": 2}, "n"),
        ("/v1/chat/completions", {"logprobs": True}, "logprobs"),
        ("/v1/chat/completions", {"logit_bias": {"50256": -100}}, "logit_bias"),
        ("/v1/chat/completions", {"tool_choice": "required", "tools": [WEATHER_TOOL]}, "tool_choice"),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
                        ],
                    }
                ]
            },
            "messages[0].content",
        ),
        ("/v1/completions", {"prompt": ["one", "two"]}, "prompt"),
        ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt"),
        ("/v1/completions", {"echo": True}, "echo"),
        ("/v1/embeddings", {"model": "embed", "input": [1, 2, 3]}, "input"),
    ],
)
def test_unsupported_parameters_are_a_clear_400(
    http: httpx.Client, sim: OllamaSim, path: str, fields: dict[str, Any], param: str
) -> None:
    before = len(sim.requests)
    base: dict[str, Any] = {"model": "chat"}
    base.update(
        {
            "/v1/chat/completions": {"messages": user("x")},
            "/v1/completions": {"prompt": "x"},
            "/v1/embeddings": {},
        }[path]
    )
    response = http.post(path, json={**base, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert param.split(".")[0].split("[")[0] in error["message"] or "image" in error["message"]
    assert len(sim.requests) == before, "refused requests must not reach Ollama"


def test_n2_through_the_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="chat", messages=user("x"), n=2)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == "n"  # type: ignore[index]
    assert "n > 1" in caught.value.message


# --- upstream failures --------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_busy_is_503(client: openai.OpenAI, sim: OllamaSim, stream: bool) -> None:
    sim.busy = True
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="busy", messages=user("x"), stream=stream)
    finally:
        sim.busy = False
    assert caught.value.status_code == 503
    assert caught.value.body["type"] == "overloaded_error"  # type: ignore[index]
    assert BUSY_MESSAGE in caught.value.message
    # Ollama sends no Retry-After; a client told "busy" is still told when to come back
    assert caught.value.response.headers["retry-after"] == "1"


def test_busy_relays_a_retry_after_it_was_given(http: httpx.Client, sim: OllamaSim) -> None:
    sim.busy, sim.busy_retry_after = True, "3"  # as a proxy in front of Ollama might send
    try:
        response = http.post("/v1/chat/completions", json={"model": "busy-after", "messages": user("x")})
    finally:
        sim.busy, sim.busy_retry_after = False, None
    assert response.status_code == 503
    assert response.headers["retry-after"] == "3"
    assert BUSY_MESSAGE in response.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_500_before_streaming_is_502(http: httpx.Client, stream: bool) -> None:
    response = http.post(
        "/v1/chat/completions", json={"model": "chat", "messages": user("[fail500]"), "stream": stream}
    )
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["type"] == "upstream_error"
    assert "llama runner process has terminated" in error["message"]


def test_mid_stream_cut_is_an_sdk_error(client: openai.OpenAI) -> None:
    text = ""
    stream = client.chat.completions.create(model="chat", messages=user("go on [cut]"), stream=True)
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
    assert text == "You said:"
    assert not isinstance(caught.value, openai.APIStatusError)  # raised in-stream, after a 200
    assert caught.value.body["code"] == "backend_unavailable"  # type: ignore[index]


def test_stream_without_done_line_is_an_sdk_error(client: openai.OpenAI) -> None:
    text = ""
    stream = client.chat.completions.create(model="chat", messages=user("go on [nodone]"), stream=True)
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
    assert text == "You said:"
    assert caught.value.body["code"] == "backend_unavailable"  # type: ignore[index]
    assert "no done line" in caught.value.message


def test_error_line_mid_stream_is_an_sdk_error(client: openai.OpenAI) -> None:
    text = ""
    stream = client.completions.create(model="chat", prompt="go on [error]", stream=True)
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
    assert text == "Continued: go"
    assert "simulated runner failure" in caught.value.message


def test_client_disconnect_stops_ollama(gateway: str, sim: OllamaSim) -> None:
    sim.disconnected.clear()
    with httpx.Client(base_url=gateway, timeout=5) as http:
        with http.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": "chat", "messages": user("[endless] 42"), "stream": True},
        ) as response:
            assert response.status_code == 200
            received = b""
            for piece in response.iter_raw():
                received += piece
                if received.count(b" more") >= 3:
                    break
        assert not sim.disconnected.is_set()
        # leaving the block closed the connection mid-stream
        assert sim.disconnected.wait(2.0), "ollama kept generating for a client who left"
        assert "[endless] 42" in sim.disconnects
        deadline = time.monotonic() + 2
        while True:
            order = http.get("/admin/routes").json()["routes"]["chat"]["order"]
            if order[0]["load"]["in_flight"] == 0:
                break
            assert time.monotonic() < deadline, "the backend still counts the abandoned stream"
            time.sleep(0.02)


async def test_closing_the_stream_early_closes_the_connection(sim: OllamaSim) -> None:
    """aclose() before the stream was iterated (a hedge that lost, a client gone between chunks)."""
    http = HttpClient()
    await http.start()
    try:
        config = OllamaConfig.model_validate(ollama_backend(sim.url, preload=False))
        backend = OllamaBackend("direct", config, Resources(http=http))
        sim.disconnected.clear()
        request = BackendRequest(
            "chat", {"model": "direct", "messages": user("[endless] direct")}, "r1", stream=True
        )
        chunks = await backend.stream(request)
        assert backend.load().in_flight == 1
        await chunks.aclose()
        assert backend.load().in_flight == 0
        assert await asyncio.to_thread(sim.disconnected.wait, 2.0), "the upstream connection stayed open"
        assert "[endless] direct" in sim.disconnects
    finally:
        await http.close()


# --- a model that is not pulled, an unreachable server --------------------------------------------


@pytest.fixture(scope="module")
def broken_gateway(sim: OllamaSim) -> Iterator[str]:
    config = {
        "backends": {
            "missing": ollama_backend(sim.url, "mistral:7b"),
            "down": ollama_backend(nothing_listens()),
            "down-control": ollama_backend(nothing_listens()),
            "strict": ollama_backend(sim.url),
        },
        "models": {
            "missing": {"targets": ["missing"]},
            "down": {"targets": ["down"]},
            "down-control": {"targets": ["down-control"]},
            "strict": {"targets": ["strict"]},
        },
        # the default breaker (5 failures in a row open it); no periodic checks, only requests count
        "resilience": {"retry": {"attempts": 1}, "health_check": {"interval_s": 0}},
    }
    with run_gateway(config) as url:
        yield url


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_model_not_pulled_is_a_clear_404(
    broken_gateway: str, sim: OllamaSim, legacy: bool, stream: bool
) -> None:
    sim.legacy_not_found = legacy
    try:
        with openai.OpenAI(base_url=broken_gateway + "/v1", api_key="k", max_retries=0) as client:
            with pytest.raises(openai.NotFoundError) as caught:
                client.chat.completions.create(model="missing", messages=user("x"), stream=stream)
    finally:
        sim.legacy_not_found = False
    assert caught.value.status_code == 404
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "invalid_request_error"
    assert body["code"] == "model_not_pulled"
    assert body["param"] == "model"
    assert "ollama pull mistral:7b" in body["message"]
    assert ("try pulling it first" in body["message"]) is legacy


def test_readiness_names_the_missing_model_and_the_unreachable_host(sim: OllamaSim) -> None:
    config = {
        "backends": {
            "missing": ollama_backend(sim.url, "mistral:7b"),
            "down": ollama_backend(nothing_listens()),
            "fine": ollama_backend(sim.url),
        },
        "models": {
            "missing": {"targets": ["missing"]},
            "down": {"targets": ["down"]},
            "fine": {"targets": ["fine"]},
        },
        "resilience": {"health_check": {"interval_s": 60}},  # the check after start-up is enough
    }
    with run_gateway(config) as url:
        response = httpx.get(url + "/health/ready", timeout=5)
        deadline = time.monotonic() + 10
        while "starting" in response.text:  # the checks right after start-up are still running
            assert time.monotonic() < deadline, response.text
            response = httpx.get(url + "/health/ready", timeout=5)
    # one model's trouble does not take the replica out of service: the body says which
    assert response.status_code == 200
    models = response.json()["models"]
    assert models["missing"] == "missing: model mistral:7b is not pulled (ollama pull mistral:7b)"
    assert models["down"].startswith("down: cannot reach ollama at 127.0.0.1:")
    assert models["fine"] == "ready"


def test_not_pulled_is_not_counted_by_the_breaker(broken_gateway: str) -> None:
    with httpx.Client(base_url=broken_gateway, timeout=5) as http:
        for _ in range(10):
            response = http.post("/v1/chat/completions", json={"model": "missing", "messages": user("x")})
            assert response.status_code == 404
        # the control: an outage (nothing listening) does open the same default breaker
        for _ in range(5):
            response = http.post(
                "/v1/chat/completions", json={"model": "down-control", "messages": user("x")}
            )
            assert response.status_code == 502
        routes = http.get("/admin/routes").json()["routes"]
    breaker = routes["missing"]["order"][0]["breaker"]
    assert breaker["state"] == "closed"
    assert breaker["failures_in_window"] == 0 and breaker["consecutive_failures"] == 0
    assert routes["down-control"]["order"][0]["breaker"]["state"] == "open"


@pytest.mark.parametrize(
    "schema",
    [{"$schema": "http://json-schema.org/draft-07/schema#"}, {"$ref": "https://example.com/order.json"}],
    ids=["empty", "external-ref"],
)
def test_a_schema_ollama_cannot_use_is_a_400_not_an_outage(
    broken_gateway: str, schema: dict[str, Any]
) -> None:
    body = {
        "model": "strict",
        "messages": user("x"),
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    }
    with httpx.Client(base_url=broken_gateway, timeout=5) as http:
        for _ in range(6):  # more than the default breaker's 5 consecutive failures
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 400
            error = response.json()["error"]
            assert error["param"] == "response_format"
            assert "invalid JSON schema in format" in error["message"]
        ok = http.post("/v1/chat/completions", json={"model": "strict", "messages": user("x")})
        assert ok.status_code == 200
        breaker = http.get("/admin/routes").json()["routes"]["strict"]["order"][0]["breaker"]
    assert breaker["state"] == "closed" and breaker["consecutive_failures"] == 0


# --- loading ------------------------------------------------------------------------------------


def test_requests_during_the_preload_get_503_with_retry_after() -> None:
    with OllamaSim(load_s=1.0) as slow:
        # checks on, so readiness knows of the load; the refusal is busy, not a failure: no breaker
        resilience = {**QUIET, "health_check": {"interval_s": 0.1}}
        config = {
            "backends": {"ol": ollama_backend(slow.url, keep_alive=-1)},
            "models": {"chat": {"targets": ["ol"]}},
            "resilience": resilience,
        }
        with run_gateway(config) as url, httpx.Client(base_url=url, timeout=5) as http:
            ready = http.get("/health/ready")
            assert ready.status_code == 503
            assert ready.json()["models"]["chat"] == f"ol: ollama is loading model {MODEL}"
            response = http.post("/v1/chat/completions", json={"model": "chat", "messages": user("early")})
            assert response.status_code == 503
            assert response.headers["retry-after"] == "2"
            error = response.json()["error"]
            assert error["type"] == "overloaded_error"
            assert "still loading" in error["message"] and MODEL in error["message"]
            wait_ready(url, timeout=5)
            response = http.post("/v1/chat/completions", json={"model": "chat", "messages": user("later")})
            assert response.status_code == 200
            assert response.json()["choices"][0]["message"]["content"] == "You said: later"
        assert slow.requests[0] == ("/api/chat", {"model": MODEL, "messages": [], "keep_alive": -1})
        assert [p for p, _ in slow.requests].count("/api/chat") == 2  # the early request never reached it


# --- config -------------------------------------------------------------------------------------


def _config(**backend: Any) -> dict[str, Any]:
    return {"backends": {"ol": {"kind": "ollama", **backend}}, "models": {"m": {"targets": ["ol"]}}}


def test_config_accepts_a_minimal_backend() -> None:
    loaded = parse_config(_config(url="http://gpu-box:11434/", model="llama3.2", keep_alive="1h30m"))
    backend = loaded.backends["ol"]
    assert backend.url == "http://gpu-box:11434"  # type: ignore[attr-defined]
    assert backend.keep_alive == "1h30m"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("fields", "where", "text"),
    [
        ({"url": "ftp://x", "model": "m"}, "backends.ol.url", "http:// or https://"),
        ({"url": "http://x:11434/v1", "model": "m"}, "backends.ol.url", "kind: openai"),
        ({"url": "http://x:11434"}, "backends.ol.model", ""),
        ({"url": "http://x:11434", "model": "m", "keep_alive": "5 minutes"}, "backends.ol.keep_alive", "30s"),
        ({"url": "http://x:11434", "model": "m", "num_ctx": 0}, "backends.ol.num_ctx", ""),
    ],
)
def test_config_rejects(fields: dict[str, Any], where: str, text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_config(**fields))
    assert any(path.startswith(where) and text in message for path, message in caught.value.problems), (
        caught.value.problems
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("llama3.2", "llama3.2:latest"),
        ("Llama3.2:3B", "llama3.2:3b"),
        ("library/qwen3", "qwen3:latest"),
        ("registry.ollama.ai/library/qwen3:8b", "qwen3:8b"),
        ("myhost:5000/ns/model", "myhost:5000/ns/model:latest"),
    ],
)
def test_model_names_are_compared_normalised(a: str, b: str) -> None:
    assert normalise_model_name(a) == normalise_model_name(b)


def test_model_names_differ_by_tag() -> None:
    assert normalise_model_name("llama3.2:3b") != normalise_model_name("llama3.2")
