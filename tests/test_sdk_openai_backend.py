"""The official openai SDK, sync and async, through Interlock to a real OpenAI-compatible server
(llama-cpp-python's own server with SmolLM2), over real loopback sockets."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.conftest import run_gateway

MESSAGES = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def gateway(llama_server: str) -> Iterator[str]:
    config = {
        "backends": {"lcs": {"kind": "openai", "base_url": llama_server, "model": "smollm2"}},
        "models": {"chat": {"targets": ["lcs"]}},
    }
    with run_gateway(config) as url:
        yield url + "/v1"


@pytest.fixture(scope="module")
def direct(llama_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=llama_server, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def expected(direct: openai.OpenAI) -> str:
    reply = direct.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=16, temperature=0)
    assert reply.choices[0].message.content
    return reply.choices[0].message.content


def test_sync_chat_matches_the_upstream(gateway: str, expected: str) -> None:
    client = openai.OpenAI(base_url=gateway, api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="chat",
        messages=MESSAGES,
        max_tokens=16,
        temperature=0,
        extra_headers={"x-request-id": "trace-42"},
    )
    assert raw.headers["x-request-id"] == "trace-42"
    assert raw.headers["x-interlock-backend"] == "lcs"
    reply = raw.parse()
    assert reply.choices[0].message.content == expected
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    assert reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def _collect(stream: openai.Stream) -> tuple[str, str | None, object]:
    text, finish, usage = "", None, None
    for event in stream:
        if event.choices:
            text += event.choices[0].delta.content or ""
            finish = event.choices[0].finish_reason or finish
        if event.usage:
            usage = event.usage
    return text, finish, usage


def test_sync_stream_relays_the_upstream(gateway: str, direct: openai.OpenAI, expected: str) -> None:
    client = openai.OpenAI(base_url=gateway, api_key="unused", max_retries=0)
    args = {
        "messages": MESSAGES,
        "max_tokens": 16,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, finish, usage = _collect(client.chat.completions.create(model="chat", **args))
    want_text, want_finish, want_usage = _collect(direct.chat.completions.create(model="smollm2", **args))
    assert text == expected == want_text
    assert finish == want_finish and finish in ("stop", "length")
    # llama-cpp-python's server ignores include_usage; the gateway relays, it does not invent counts
    assert usage == want_usage


async def test_async_chat_and_stream(gateway: str, expected: str) -> None:
    client = openai.AsyncOpenAI(base_url=gateway, api_key="unused", max_retries=0)
    reply = await client.chat.completions.create(
        model="chat", messages=MESSAGES, max_tokens=16, temperature=0
    )
    assert reply.choices[0].message.content == expected
    text = ""
    async for event in await client.chat.completions.create(
        model="chat", messages=MESSAGES, max_tokens=16, temperature=0, stream=True
    ):
        if event.choices:
            text += event.choices[0].delta.content or ""
    assert text == expected
    await client.close()


def test_text_completions(gateway: str, direct: openai.OpenAI) -> None:
    client = openai.OpenAI(base_url=gateway, api_key="unused", max_retries=0)
    want = direct.completions.create(model="smollm2", prompt="The sky is", max_tokens=8, temperature=0)
    got = client.completions.create(model="chat", prompt="The sky is", max_tokens=8, temperature=0)
    assert got.choices[0].text == want.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="chat", prompt="The sky is", max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == want.choices[0].text


def test_models_listing(gateway: str) -> None:
    client = openai.OpenAI(base_url=gateway, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["chat"]
    assert client.models.retrieve("chat").id == "chat"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")


def test_sdk_exception_classes(gateway: str) -> None:
    client = openai.OpenAI(base_url=gateway, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert not_found.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="chat", messages=MESSAGES, temperature="hot")  # type: ignore[arg-type]
    assert bad.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="chat", messages=[])
    with pytest.raises(openai.APIStatusError) as too_big:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x" * 5_000_000}])
    assert too_big.value.status_code == 413
