"""The upstream's secrets never reach a client: error bodies and in-stream error events are
redacted for the key in any case and for the base URL and its host; ordinary reply text is not."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from backends.base import Resources
from backends.http import HttpClient
from backends.http_limits import ErrorEvents, Redactor
from backends.ollama import OllamaBackend, OllamaConfig
from tests.conftest import run_gateway
from tests.fakes import UPSTREAM_KEY, chat_completion, chunk, free_port, openai_backend, serve_app

CHAT = {"messages": [{"role": "user", "content": "Say hello."}]}


class Echoing:
    """An upstream that quotes its own key and address back, by model name."""

    def __init__(self) -> None:
        self.port = free_port()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def leak(self) -> str:
        return f"key {UPSTREAM_KEY.upper()} refused at {self.base_url.upper()} (host 127.0.0.1)"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body["model"]
        if model == "upper500":
            return web.json_response(
                {
                    "error": {
                        "message": self.leak(),
                        "type": "server_error",
                        "code": f"at {UPSTREAM_KEY.lower()}",
                    }
                },
                status=500,
            )
        if not body.get("stream"):  # "echo": a reply that quotes the same strings as content
            return web.json_response(chat_completion(model, self.leak()))
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk(model, {"role": "assistant", "content": ""}))
        await response.write(chunk(model, {"content": self.leak()}))
        if model == "stream_error":
            event = (
                b"data: "
                + orjson.dumps(
                    {"error": {"message": self.leak(), "type": "server_error", "param": None, "code": None}}
                )
                + b"\n\n"
            )
            cut = event.index(UPSTREAM_KEY.upper().encode()) + 4  # split inside the key
            await response.write(event[:cut])
            await asyncio.sleep(0.05)  # two reads on the gateway's side, most likely
            await response.write(event[cut:])
        await response.write(chunk(model, {}, "stop"))
        await response.write(b"data: [DONE]\n\n")
        return response


@pytest.fixture(scope="module")
def echoing() -> Iterator[Echoing]:
    upstream = Echoing()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.handle)
    stop = serve_app(app, upstream.port, shutdown_timeout=1)
    yield upstream
    stop()


@pytest.fixture(scope="module")
def gateway(echoing: Echoing) -> Iterator[str]:
    names = ("upper500", "stream_error", "echo")
    config: dict[str, Any] = {
        "backends": {n: openai_backend(echoing.base_url, n) for n in names},
        "models": {n: {"targets": [n]} for n in names},
        "resilience": {"health_check": {"interval_s": 0}, "retry": {"attempts": 1}},
    }
    with run_gateway(config) as url:
        yield url


def assert_clean(text: str, echoing: Echoing) -> None:
    lowered = text.lower()
    for secret in (UPSTREAM_KEY, echoing.base_url, f"127.0.0.1:{echoing.port}", "127.0.0.1"):
        assert secret.lower() not in lowered, secret


def test_a_5xx_body_with_the_key_upper_cased_is_redacted(gateway: str, echoing: Echoing) -> None:
    response = httpx.post(gateway + "/v1/chat/completions", json={**CHAT, "model": "upper500"}, timeout=10)
    assert response.status_code == 502
    assert "[redacted]" in response.json()["error"]["message"]
    assert_clean(response.text, echoing)


def test_an_in_stream_error_event_is_redacted(gateway: str, echoing: Echoing) -> None:
    body = {**CHAT, "model": "stream_error", "stream": True}
    with httpx.stream("POST", gateway + "/v1/chat/completions", json=body, timeout=10) as response:
        text = response.read().decode()
    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: {")]
    errors = [orjson.loads(e)["error"] for e in events if e.startswith('{"error"')]
    assert len(errors) == 1 and "[redacted]" in errors[0]["message"]
    assert_clean(orjson.dumps(errors).decode(), echoing)
    # the model's own text before it is passed as it came
    assert echoing.leak() in orjson.loads(events[1])["choices"][0]["delta"]["content"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_normal_completion_quoting_the_same_strings_is_untouched(
    gateway: str, echoing: Echoing, stream: bool
) -> None:
    body = {**CHAT, "model": "echo", "stream": stream}
    response = httpx.post(gateway + "/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 200
    assert echoing.leak() in (response.text if not stream else response.text.replace('\\"', '"'))
    assert "[redacted]" not in response.text


def test_the_redactor_matches_any_case_and_the_host_alone() -> None:
    redact = Redactor(["sk-Secret", "http://gpu:8000/v1"], ["gpu"])
    assert redact("SK-SECRET at HTTP://GPU:8000/V1, gpu down") == "[redacted] at [redacted], [redacted] down"
    assert redact("gpus and gpu-less") == "gpus and gpu-less"  # not a host standing alone
    assert Redactor([])("untouched") == "untouched"


def _events(chunks: list[bytes]) -> bytes:
    events = ErrorEvents(lambda error: {"message": Redactor(["sk-Secret"])(str(error["message"]))})
    return b"".join(events.feed(c) for c in chunks) + events.end()


def test_error_events_are_redacted_wherever_the_chunks_split() -> None:
    stream = (
        b'data: {"choices": [{"delta": {"content": "sk-Secret data: {\\"error\\": 1}"}}]}\n\n'
        b'data: {"error": {"message": "bad SK-SECRET"}}\r\n\r\n'
        b'data:{"error":"sk-secret again"}\n\ndata: [DONE]\n\n'
    )
    expected = (
        b'data: {"choices": [{"delta": {"content": "sk-Secret data: {\\"error\\": 1}"}}]}\n\n'
        b'data: {"error":{"message":"bad [redacted]"}}\r\n\r\n'
        b'data: {"error":{"message":"[redacted] again"}}\n\ndata: [DONE]\n\n'
    )
    assert _events([stream]) == expected
    for cut in range(1, len(stream)):
        assert _events([stream[:cut], stream[cut:]]) == expected, cut
    assert _events([bytes([b]) for b in stream]) == expected


def test_a_stream_without_error_events_passes_byte_for_byte_in_its_chunks() -> None:
    stream = b"".join(chunk("m", {"content": f"piece {i} sk-Secret"}) for i in range(20))
    stream += b"data: [DONE]\n\n"
    for size in (1, 7, 100, len(stream)):
        pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
        events = ErrorEvents(lambda error: error)
        out = []
        for piece in pieces:
            out.append(events.feed(piece))
            assert len(events._held) < 16  # only a line start that may be an error event waits
        assert b"".join(out) + events.end() == stream


def test_ollama_error_text_is_redacted_in_any_case() -> None:
    config = OllamaConfig.model_validate(
        {
            "kind": "ollama",
            "url": "http://ollama-box:11434",
            "model": "m",
            "headers": {"x-api-key": "Key-0123456789"},
        }
    )
    backend = OllamaBackend("o", config, Resources(http=HttpClient()))
    text = backend._redact("KEY-0123456789 at HTTP://OLLAMA-BOX:11434 (ollama-box)")
    assert text == "[redacted] at [redacted] ([redacted])"
