"""Malformed requests: each gets the exact OpenAI error (status, type, param, code), never a 500."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import run_gateway
from tests.fakes import UPSTREAM_KEY, FakeUpstream, openai_backend

LIMIT = 4096
MESSAGES = [{"role": "user", "content": "hi"}]
ERROR_KEYS = {"message", "type", "param", "code"}
INVALID = "invalid_request_error"


@pytest.fixture(scope="module")
def gateway(fake: FakeUpstream) -> Iterator[str]:
    config = {
        "backends": {"private-upstream": openai_backend(fake.base_url, "ok")},
        "models": {
            "alpha-model": {"targets": ["private-upstream"]},
            "beta-model": {"targets": ["private-upstream"]},
        },
    }
    with run_gateway(config, max_body_bytes=LIMIT) as url:
        yield url


@pytest.fixture(scope="module")
def http(gateway: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway, timeout=10) as c:
        yield c


@dataclass(frozen=True)
class Case:
    id: str
    body: Any  # bytes go out as they are, anything else as JSON
    status: int
    param: str | None
    code: str | None
    path: str = "/v1/chat/completions"
    method: str = "POST"
    type: str = INVALID
    #: a fragment the message must contain
    says: str = ""


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "alpha-model", "messages": MESSAGES, **fields}


def without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


MISSING = "missing_required_parameter"
VALUE = "invalid_value"

CASES = [
    Case("not-json", b"{model: alpha-model", 400, None, "invalid_json", says="not valid JSON"),
    Case("empty-body", b"", 400, None, "invalid_json", says="not valid JSON"),
    Case("invalid-utf8", b'{"model": "\xff\xfe"}', 400, None, "invalid_json"),
    Case("nan", b'{"model": "alpha-model", "messages": [], "temperature": NaN}', 400, None, "invalid_json"),
    Case("json-array", b"[]", 400, None, "invalid_json", says="must be a JSON object"),
    Case("json-string", b'"hello"', 400, None, "invalid_json", says="must be a JSON object"),
    Case("json-null", b"null", 400, None, "invalid_json", says="must be a JSON object"),
    Case("deep-nesting", b"[" * 2000 + b"]" * 2000, 400, None, "invalid_json"),
    Case(
        "missing-messages",
        without(chat(), "messages"),
        400,
        "messages",
        MISSING,
        says="Missing required parameter: 'messages'.",
    ),
    Case("messages-empty", chat(messages=[]), 400, "messages", VALUE),
    Case("messages-not-list", chat(messages="hi"), 400, "messages", VALUE),
    Case("messages-object", chat(messages={"role": "user", "content": "hi"}), 400, "messages", VALUE),
    Case("message-not-object", chat(messages=["hi"]), 400, "messages[0]", VALUE),
    Case(
        "role-robot",
        chat(messages=[*MESSAGES, {"role": "robot", "content": "beep"}]),
        400,
        "messages[1].role",
        VALUE,
    ),
    Case("role-missing", chat(messages=[{"content": "hi"}]), 400, "messages[0].role", MISSING),
    Case(
        "content-number", chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content", VALUE
    ),
    Case("temperature-hot", chat(temperature="hot"), 400, "temperature", VALUE),
    Case("temperature-string-number", chat(temperature="0.5"), 400, "temperature", VALUE),
    Case("temperature-3", chat(temperature=3), 400, "temperature", VALUE),
    Case("temperature-negative", chat(temperature=-0.1), 400, "temperature", VALUE),
    Case("top-p-2", chat(top_p=2), 400, "top_p", VALUE),
    Case("max-tokens-0", chat(max_tokens=0), 400, "max_tokens", VALUE),
    Case("max-tokens-string", chat(max_tokens="10"), 400, "max_tokens", VALUE),
    Case("max-tokens-float", chat(max_tokens=10.5), 400, "max_tokens", VALUE),
    Case("max-tokens-bool", chat(max_tokens=True), 400, "max_tokens", VALUE),
    Case("n-0", chat(n=0), 400, "n", VALUE),
    Case("stream-yes", chat(stream="yes"), 400, "stream", VALUE),
    Case(
        "stream-options-without-stream",
        chat(stream_options={"include_usage": True}),
        400,
        "stream_options",
        VALUE,
        says="only allowed when stream is true",
    ),
    Case(
        "stream-options-stream-false",
        chat(stream=False, stream_options={"include_usage": True}),
        400,
        "stream_options",
        VALUE,
    ),
    Case("stop-too-many", chat(stop=[str(i) for i in range(17)]), 400, "stop", VALUE),
    Case("logit-bias-string", chat(logit_bias={"1": "a lot"}), 400, "logit_bias.1", VALUE),
    Case(
        "model-missing",
        without(chat(), "model"),
        400,
        "model",
        MISSING,
        says="Missing required parameter: 'model'.",
    ),
    Case("model-number", chat(model=123), 400, "model", VALUE),
    Case("model-empty", chat(model=""), 400, "model", VALUE),
    Case("model-null", chat(model=None), 400, "model", VALUE),
    Case("unknown-model", chat(model="gpt-7"), 404, "model", "model_not_found", says="`gpt-7`"),
    Case("unknown-model-stream", chat(model="gpt-7", stream=True), 404, "model", "model_not_found"),
    Case(
        "too-large",
        chat(messages=[{"role": "user", "content": "x" * (LIMIT + 1)}]),
        413,
        None,
        "request_too_large",
        says=f"limit of {LIMIT} bytes",
    ),
    Case(
        "embeddings-empty-input",
        {"model": "alpha-model", "input": ""},
        400,
        "input",
        VALUE,
        path="/v1/embeddings",
        says="must not be empty",
    ),
    Case(
        "embeddings-empty-list",
        {"model": "alpha-model", "input": []},
        400,
        "input",
        VALUE,
        path="/v1/embeddings",
    ),
    Case("embeddings-no-input", {"model": "alpha-model"}, 400, "input", MISSING, path="/v1/embeddings"),
    Case(
        "embeddings-bad-format",
        {"model": "alpha-model", "input": "x", "encoding_format": "hex"},
        400,
        "encoding_format",
        VALUE,
        path="/v1/embeddings",
    ),
    Case("completions-no-prompt", {"model": "alpha-model"}, 400, "prompt", MISSING, path="/v1/completions"),
    Case(
        "completions-prompt-number",
        {"model": "alpha-model", "prompt": 5},
        400,
        "prompt",
        VALUE,
        path="/v1/completions",
    ),
    Case("get-chat", None, 405, None, "method_not_allowed", method="GET"),
    Case("put-chat", chat(), 405, None, "method_not_allowed", method="PUT"),
    Case("delete-models", None, 405, None, "method_not_allowed", path="/v1/models", method="DELETE"),
    Case("unknown-path", None, 404, None, "not_found", path="/v1/chat/completion", method="GET"),
    Case("unknown-path-post", chat(), 404, None, "not_found", path="/v2/chat/completions"),
    Case("root", None, 404, None, "not_found", path="/", method="GET"),
]


def send(http: httpx.Client, case: Case) -> httpx.Response:
    if isinstance(case.body, bytes):
        return http.request(
            case.method, case.path, content=case.body, headers={"content-type": "application/json"}
        )
    if case.body is None:
        return http.request(case.method, case.path)
    return http.request(case.method, case.path, json=case.body)


def check_error(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code != 500
    assert "Traceback" not in response.text
    assert response.headers["content-type"] == "application/json"
    body = orjson.loads(response.content)
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == ERROR_KEYS
    assert isinstance(error["message"], str) and error["message"]
    return error


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(http: httpx.Client, fake: FakeUpstream, case: Case) -> None:
    before = len(fake.requests)
    response = send(http, case)
    error = check_error(response)
    assert (response.status_code, error["type"], error["param"], error["code"]) == (
        case.status,
        case.type,
        case.param,
        case.code,
    ), error["message"]
    assert case.says in error["message"]
    assert response.headers["x-request-id"].startswith("req_")
    assert len(fake.requests) == before, "a bad request reached the upstream"


def test_cases_have_unique_ids() -> None:
    assert len({c.id for c in CASES}) == len(CASES)


def test_unknown_model_lists_nothing(http: httpx.Client, fake: FakeUpstream) -> None:
    response = http.post("/v1/chat/completions", json=chat(model="gpt-7"))
    assert response.status_code == 404
    text = response.text + repr(response.headers.multi_items())
    for leak in ("alpha-model", "beta-model", "private-upstream", UPSTREAM_KEY, str(fake.port), "127.0.0.1"):
        assert leak not in text


def test_405_names_the_allowed_method(http: httpx.Client) -> None:
    response = http.get("/v1/chat/completions")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    allowed = http.post("/v1/models").headers["allow"]
    assert set(allowed.split(", ")) == {"GET", "HEAD"}


def test_too_large_without_content_length(http: httpx.Client, fake: FakeUpstream) -> None:
    """A chunked body has no Content-Length up front: the limit is enforced while reading."""
    payload = orjson.dumps(chat(messages=[{"role": "user", "content": "y" * (2 * LIMIT)}]))

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(payload), 1000):
            yield payload[i : i + 1000]

    before = len(fake.requests)
    response = http.post(
        "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    error = check_error(response)
    assert response.status_code == 413
    assert error["code"] == "request_too_large"
    assert len(fake.requests) == before


def test_body_just_under_the_limit_is_served(http: httpx.Client) -> None:
    body = chat()
    pad = LIMIT - len(orjson.dumps({**body, "user": ""}))
    body["user"] = "u" * pad
    assert len(orjson.dumps(body)) == LIMIT
    response = http.post(
        "/v1/chat/completions", content=orjson.dumps(body), headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text


def test_valid_request_still_works(http: httpx.Client) -> None:
    """The table's bodies differ from this one in one field each; this one is fine."""
    response = http.post("/v1/chat/completions", json=chat(temperature=0.5, max_tokens=10, n=1, stream=False))
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "Hello there."


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("depth", [300, 1000])
def test_a_body_nested_too_deep_is_the_clients_400_not_the_backends_failure(
    http: httpx.Client, fake: FakeUpstream, depth: int
) -> None:
    # a pass-through field the gateway does not know, nested deeper than it could write it again
    body = (
        b'{"model": "alpha-model", "messages": [{"role": "user", "content": "hi"}], "metadata": '
        + _nested(depth)
        + b"}"
    )
    sent = len(fake.requests)
    for _ in range(6):  # more than the default breaker's 5 failures in a row
        response = http.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, response.text
        error = check_error(response)
        assert error["code"] == "invalid_json" and "deeper than 128" in error["message"]
    assert len(fake.requests) == sent
    assert http.post("/v1/chat/completions", json=chat()).status_code == 200
    breaker = http.get("/admin/routes").json()["routes"]["alpha-model"]["order"][0]["breaker"]
    assert (breaker["state"], breaker["failures_in_window"]) == ("closed", 0)


def test_a_body_nested_within_the_limit_is_passed_on(http: httpx.Client, fake: FakeUpstream) -> None:
    body = (
        b'{"model": "alpha-model", "messages": [{"role": "user", "content": "hi"}], "metadata": '
        + _nested(120)
        + b"}"
    )
    response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200
    assert fake.requests[-1]["metadata"] == orjson.loads(_nested(120))
