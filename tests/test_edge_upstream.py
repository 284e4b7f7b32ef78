"""Edge cases of an OpenAI-compatible upstream, through the real gateway on loopback sockets.

``FakeUpstream`` picks its behaviour from the ``model`` it receives, and each backend's ``model:``
sets that name, so every gateway model below maps to one behaviour of the fake.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import run_gateway
from tests.fakes import UPSTREAM_KEY, ChaosUpstream, ClosingUpstream, FakeUpstream, closed_url, openai_backend

MESSAGES = [{"role": "user", "content": "Say hello."}]
BEHAVIOURS = ("ok", "slow", "cut", "error500", "garbage", "ratelimited", "leaky", "leakyfields", "endless")
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream(slow_s=1.0) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def gateway(fake: FakeUpstream) -> Iterator[str]:
    backends: dict[str, Any] = {
        f"up-{b}": openai_backend(fake.base_url, b, first_token=0.3) for b in BEHAVIOURS
    }
    backends["broken"] = openai_backend(closed_url(), "ok", first_token=0.3)
    models: dict[str, Any] = {b: {"targets": [f"up-{b}"]} for b in BEHAVIOURS}
    models["fallback"] = {"targets": ["broken", "up-ok"], "attempts": 2}
    models["fallback-list"] = {"targets": ["broken"], "fallback": ["up-ok"], "attempts": 2}
    # These tests are about how one upstream's answers map to the client, request by request:
    # one attempt each, and circuits that never open (tests/test_resilience.py covers those).
    resilience = {
        "retry": {"attempts": 1},
        "health_check": {"interval_s": 0},
        "breaker": {
            "consecutive_failures": 1000,
            "window": 1000,
            "min_calls": 1000,
            "open_on_retry_after": False,
        },
    }
    with run_gateway({"backends": backends, "models": models, "resilience": resilience}) as url:
        yield url


def chat(http: httpx.Client, model: str, **fields: Any) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES, **fields})


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_KEYS
    return body["error"]


def sse_events(raw: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [line[len(b"data: ") :].decode() for line in raw.split(b"\n") if line.startswith(b"data: ")]


# --- timeouts -----------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_slow_first_byte_is_a_504_timeout(http: httpx.Client, stream: bool) -> None:
    started = time.monotonic()
    response = chat(http, "slow", stream=stream)
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    error = error_of(response)
    assert error["type"] == "timeout_error"
    assert error["code"] == "backend_timeout"
    assert "0.3s" in error["message"]
    assert elapsed < 0.9, "the gateway waited for the upstream instead of its first_token timeout"


@pytest.mark.parametrize("stream", [False, True])
def test_slow_first_byte_sdk_class(client: openai.OpenAI, stream: bool) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="slow", messages=MESSAGES, stream=stream)  # type: ignore[call-overload]
    assert isinstance(caught.value, openai.APIStatusError)
    assert caught.value.status_code == 504
    assert caught.value.body["type"] == "timeout_error"  # type: ignore[index]


# --- broken streams -------------------------------------------------------------


def test_mid_stream_cut_raises_in_the_sdk_after_the_text_so_far(client: openai.OpenAI) -> None:
    text = ""
    stream = client.chat.completions.create(model="cut", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError) as caught:
        for event in stream:
            if event.choices:
                text += event.choices[0].delta.content or ""
    assert text == "Hello"
    assert not isinstance(caught.value, openai.APIStatusError)  # raised from the stream, status 200
    assert caught.value.body["code"] == "backend_unavailable"  # type: ignore[index]


def test_mid_stream_cut_wire_format(http: httpx.Client) -> None:
    response = chat(http, "cut", stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.content)
    assert events[-1] == "[DONE]"
    error = orjson.loads(events[-2])["error"]
    assert set(error) == ERROR_KEYS
    assert error["type"] == "upstream_error"
    contents = [orjson.loads(e)["choices"][0]["delta"].get("content") for e in events[:-2]]
    assert contents == ["", "Hello"]
    assert response.content.count(b"[DONE]") == 1
    assert b"\n\n\n" not in response.content  # every event is framed exactly once


# --- upstream error statuses ------------------------------------------------------


def test_upstream_500_is_a_502(http: httpx.Client, client: openai.OpenAI) -> None:
    response = chat(http, "error500")
    assert response.status_code == 502
    error = error_of(response)
    assert error["message"] == "boom"
    assert error["type"] == "server_error"
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="error500", messages=MESSAGES)
    assert caught.value.status_code == 502


def test_upstream_500_on_a_stream_is_a_502_before_any_byte(http: httpx.Client) -> None:
    response = chat(http, "error500", stream=True)
    assert response.status_code == 502
    assert error_of(response)["message"] == "boom"


def test_garbage_json_200_is_a_502(http: httpx.Client, client: openai.OpenAI) -> None:
    response = chat(http, "garbage")
    assert response.status_code == 502
    error = error_of(response)
    assert error["type"] == "upstream_error"
    assert error["code"] == "backend_unavailable"
    assert "<html>" not in response.text
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="garbage", messages=MESSAGES)


def test_garbage_reply_to_a_stream_is_never_a_quiet_success(client: openai.OpenAI) -> None:
    """A non-SSE 200 to a stream request: the SDK must raise, not end as if the answer were complete."""
    with pytest.raises(openai.APIError) as caught:
        for _ in client.chat.completions.create(model="garbage", messages=MESSAGES, stream=True):
            pass
    assert caught.value.body["code"] == "backend_unavailable"  # type: ignore[index]


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_429_keeps_retry_after(http: httpx.Client, client: openai.OpenAI, stream: bool) -> None:
    response = chat(http, "ratelimited", stream=stream)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    error = error_of(response)
    assert error["message"] == "slow down"
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="ratelimited", messages=MESSAGES)
    assert caught.value.response.headers["retry-after"] == "7"


def secrets_of(fake: FakeUpstream) -> tuple[str, ...]:
    return UPSTREAM_KEY, fake.base_url, f"127.0.0.1:{fake.port}"


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_secrets_never_leak(http: httpx.Client, fake: FakeUpstream, stream: bool) -> None:
    response = chat(http, "leaky", stream=stream)
    assert response.status_code == 400
    error = error_of(response)
    assert error["message"] == "bad key [redacted] at [redacted]"
    assert error["type"] == "x"
    exposed = response.text + repr(response.headers.multi_items())
    for secret in secrets_of(fake):
        assert secret not in exposed


def test_upstream_secrets_never_leak_through_other_fields(http: httpx.Client, fake: FakeUpstream) -> None:
    response = chat(http, "leakyfields")
    assert response.status_code == 422
    error = error_of(response)
    assert error == {"message": "no", "type": "[redacted]", "param": "key=[redacted]", "code": "[redacted]"}
    for secret in secrets_of(fake):
        assert secret not in response.text


def test_leaky_upstream_is_a_bad_request_in_the_sdk(client: openai.OpenAI, fake: FakeUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="leaky", messages=MESSAGES)
    assert UPSTREAM_KEY not in str(caught.value)
    assert f":{fake.port}" not in str(caught.value)


# --- fallback -----------------------------------------------------------------------


@pytest.mark.parametrize("model", ["fallback", "fallback-list"])
def test_fallback_past_a_closed_port(http: httpx.Client, client: openai.OpenAI, model: str) -> None:
    response = chat(http, model)
    assert response.status_code == 200
    assert response.headers["x-interlock-backend"] == "up-ok"
    assert response.json()["choices"][0]["message"]["content"] == "Hello there."

    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, stream=True)
    assert raw.headers["x-interlock-backend"] == "up-ok"
    text = "".join(e.choices[0].delta.content or "" for e in raw.parse() if e.choices)
    assert text == "Hello there."


def test_no_fallback_left_is_a_502() -> None:
    config = {
        "backends": {"broken": openai_backend(closed_url(), "ok")},
        "models": {"m": {"targets": ["broken"]}},
        "resilience": {"health_check": {"interval_s": 0}},  # only the requests feed its breaker
    }
    with run_gateway(config) as url:
        for stream in (False, True):
            response = httpx.post(
                url + "/v1/chat/completions",
                timeout=5,
                json={"model": "m", "messages": MESSAGES, "stream": stream},
            )
            assert response.status_code == 502
            error = error_of(response)
            assert error["code"] == "backend_unavailable"
            assert error["message"] == "cannot connect to the upstream"


# --- client disconnect ----------------------------------------------------------------


def test_client_disconnect_cancels_the_upstream() -> None:
    with FakeUpstream() as fake:  # its own fake: no other test's stream can set `disconnected`
        config = {
            "backends": {"up": openai_backend(fake.base_url, "endless", total=30)},
            "models": {"endless": {"targets": ["up"]}},
        }
        with run_gateway(config) as url, httpx.Client(base_url=url, timeout=5) as http:
            with http.stream(
                "POST",
                "/v1/chat/completions",
                json={"model": "endless", "messages": MESSAGES, "stream": True},
            ) as response:
                assert response.status_code == 200
                received = b""
                for piece in response.iter_raw():
                    received += piece
                    if received.count(b" more") >= 3:
                        break
            assert not fake.disconnected.is_set()
            # leaving the block closed the connection mid-stream
            assert fake.disconnected.wait(2.0), "the upstream kept generating for a client who left"


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_before_the_reply_cancels_the_upstream_call_and_retries(stream: bool) -> None:
    with ChaosUpstream(mode="timeout") as held:
        config = {
            # two candidates: a retry would show as a second request to the same upstream
            "backends": {
                "one": openai_backend(held.base_url, first_token=20.0),
                "two": openai_backend(held.base_url, first_token=20.0),
            },
            "models": {"m": {"targets": ["one", "two"]}},
            "resilience": {"health_check": {"interval_s": 0}},
        }
        with run_gateway(config) as url:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up long before the upstream
                httpx.post(
                    url + "/v1/chat/completions",
                    timeout=httpx.Timeout(5, read=0.5),
                    json={"model": "m", "messages": MESSAGES, "stream": stream},
                )
            deadline = time.monotonic() + 10
            while held.client_gone < 1:
                assert time.monotonic() < deadline, "the upstream call outlived its client"
                time.sleep(0.02)
            assert held.received == 1, "a retry started for a client that had gone"
            order = httpx.get(url + "/admin/routes", timeout=5).json()["routes"]["m"]["order"]
            assert [e["stats"]["in_flight"] for e in order] == [0, 0]
            assert [e["breaker"]["failures_in_window"] for e in order] == [0, 0]


# --- keep-alive ---------------------------------------------------------------------------


def test_stale_keep_alive_connections_are_retried() -> None:
    with ClosingUpstream() as upstream:
        config = {
            "backends": {"up": openai_backend(f"http://127.0.0.1:{upstream.port}/v1", "ok")},
            "models": {"m": {"targets": ["up"], "attempts": 1}},  # the transparent resend, not a retry
            "resilience": {"health_check": {"interval_s": 0}},  # it counts connections: no GET /models
        }
        with run_gateway(config) as url, httpx.Client(base_url=url, timeout=5) as http:
            # Back to back: each request after the first goes out on the pooled socket, which the
            # upstream then closes without answering; the gateway must resend it on a fresh one.
            for i in range(5):
                response = chat(http, "m")
                assert response.status_code == 200, (i, response.text)
                assert response.json()["choices"][0]["message"]["content"] == "Hello there."
        assert upstream.requests == 5
        assert upstream.connections == 5


# --- what the upstream receives ---------------------------------------------------------


def test_upstream_gets_its_model_key_and_unknown_fields(http: httpx.Client, fake: FakeUpstream) -> None:
    body = {
        "model": "ok",
        "messages": MESSAGES,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {}}},
        "seed": 7,
        "logprobs": True,
        "top_logprobs": 2,
        "n": 2,
        "user": "u-1",
        "future_field": {"nested": [1, 2.5, None, "x"]},
    }
    before = len(fake.requests)
    response = http.post(
        "/v1/chat/completions",
        json={**body, "model": "fallback"},
        headers={"x-request-id": "trace-upstream-1", "authorization": "Bearer client-key"},
    )
    assert response.status_code == 200
    assert len(fake.requests) == before + 1
    sent, headers = fake.requests[-1], {k.lower(): v for k, v in fake.headers[-1].items()}
    assert sent == {**body, "model": "ok"}
    assert list(sent) == list(body)  # order kept too
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert headers["x-interlock-request-id"] == "trace-upstream-1"
    assert "client-key" not in repr(headers)


def test_no_configured_model_passes_the_clients(fake: FakeUpstream) -> None:
    config = {
        "backends": {"up": openai_backend(fake.base_url, None, api_key=None)},
        "models": {"ok": {"targets": ["up"]}},
    }
    with run_gateway(config) as url:
        response = httpx.post(url + "/v1/chat/completions", json={"model": "ok", "messages": MESSAGES})
    assert response.status_code == 200
    assert fake.requests[-1]["model"] == "ok"
    assert "authorization" not in {k.lower() for k in fake.headers[-1]}


# --- request ids ----------------------------------------------------------------------------


def test_request_id_echoed(http: httpx.Client, client: openai.OpenAI) -> None:
    for stream in (False, True):
        response = http.post(
            "/v1/chat/completions",
            headers={"x-request-id": "abc-123.X:y_z"},
            json={"model": "ok", "messages": MESSAGES, "stream": stream},
        )
        assert response.status_code == 200
        assert response.headers.get_list("x-request-id") == ["abc-123.X:y_z"]
    raw = client.chat.completions.with_raw_response.create(
        model="ok", messages=MESSAGES, extra_headers={"x-request-id": "sdk-7"}
    )
    assert raw.headers["x-request-id"] == "sdk-7"


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/chat/completions", {"model": "ok", "messages": MESSAGES}, 200),
        ("/v1/chat/completions", {"model": "nope", "messages": MESSAGES}, 404),
        ("/v1/chat/completions", {"model": "ok"}, 400),
        ("/v1/chat/completions", {"model": "error500", "messages": MESSAGES}, 502),
        ("/v1/chat/completions", {"model": "slow", "messages": MESSAGES}, 504),
        ("/v1/nowhere", {}, 404),
    ],
)
def test_request_id_generated(http: httpx.Client, path: str, body: dict[str, Any], status: int) -> None:
    first = http.post(path, json=body)
    second = http.post(path, json=body)
    assert first.status_code == second.status_code == status
    ids = [first.headers.get_list("x-request-id"), second.headers.get_list("x-request-id")]
    assert all(len(i) == 1 and i[0].startswith("req_") and len(i[0]) > 8 for i in ids)
    assert ids[0] != ids[1]


@pytest.mark.parametrize("bad", ["has space", "x" * 129, "semi;colon", "é"])
def test_unsafe_request_id_is_replaced(http: httpx.Client, bad: str) -> None:
    response = http.post(
        "/v1/chat/completions",
        json={"model": "ok", "messages": MESSAGES},
        headers={"x-request-id": bad.encode()},
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"].startswith("req_")


def test_request_id_on_errors_is_the_clients(http: httpx.Client) -> None:
    for model, status in (("nope", 404), ("error500", 502), ("ratelimited", 429)):
        response = http.post(
            "/v1/chat/completions",
            headers={"x-request-id": f"err-{status}"},
            json={"model": model, "messages": MESSAGES},
        )
        assert response.status_code == status
        assert response.headers.get_list("x-request-id") == [f"err-{status}"]
