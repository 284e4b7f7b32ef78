"""Client keys (``auth.keys``) through the real gateway, and the refusal to serve open beyond loopback."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway.config import LoadedConfig, parse_config
from gateway.server import UnsafeBind, check_bind, is_loopback
from gateway.settings import Settings
from tests.conftest import run_gateway
from tests.fakes import FakeUpstream, openai_backend

FULL_KEY = "sk-client-full-0001"
LIMITED_KEY = "sk-client-only-a-0002"
MESSAGES = [{"role": "user", "content": "hi"}]


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def config(backend: dict[str, Any], keys: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "auth": {"keys": keys},
        "backends": {"up": backend},
        "models": {"a": {"targets": ["up"]}, "b": {"targets": ["up"]}},
    }


KEYS = [
    {"name": "full", "sha256": sha256(FULL_KEY)},
    {"name": "only-a", "sha256": sha256(LIMITED_KEY).upper(), "models": ["a"]},
]


@pytest.fixture(scope="module")
def gateway(fake: FakeUpstream) -> Iterator[str]:
    with run_gateway(config(openai_backend(fake.base_url, "ok"), KEYS)) as url:
        yield url


def sdk(gateway: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway + "/v1", api_key=key, max_retries=0, timeout=10)


def chat_status(gateway: str, headers: dict[str, str], model: str = "a") -> tuple[int, dict[str, Any]]:
    response = httpx.post(
        gateway + "/v1/chat/completions",
        headers=headers,
        timeout=10,
        json={"model": model, "messages": MESSAGES},
    )
    return response.status_code, response.json()


def test_no_key_is_401(gateway: str, fake: FakeUpstream) -> None:
    before = len(fake.requests)
    status, body = chat_status(gateway, {})
    assert status == 401
    assert body["error"] == {
        "message": "Missing API key: send 'Authorization: Bearer <key>'.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    assert len(fake.requests) == before


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer sk-wrong",
        f"Bearer {FULL_KEY}x",
        f"Bearer {FULL_KEY[:-1]}",
        f"Bearer {sha256(FULL_KEY)}",  # the stored hash is not a key
        "Basic xyz",
        f"Basic {FULL_KEY}",
        f"Token {FULL_KEY}",
        FULL_KEY,
        "Bearer",
        "",
    ],
)
def test_wrong_credentials_are_401(gateway: str, authorization: str) -> None:
    status, body = chat_status(gateway, {"authorization": authorization})
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "invalid_request_error"
    assert FULL_KEY not in body["error"]["message"]


def test_sdk_wrong_key_is_authentication_error(gateway: str) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(gateway, "sk-wrong").chat.completions.create(model="a", messages=MESSAGES)
    assert caught.value.status_code == 401
    assert caught.value.body["message"] == "Incorrect API key provided."  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        sdk(gateway, "sk-wrong").models.list()


@pytest.mark.parametrize("key", [FULL_KEY, LIMITED_KEY])
def test_right_key_is_served(gateway: str, key: str) -> None:
    reply = sdk(gateway, key).chat.completions.create(model="a", messages=MESSAGES)
    assert reply.choices[0].message.content == "Hello there."


@pytest.mark.parametrize("scheme", ["bearer", "BEARER"])
def test_scheme_is_case_insensitive(gateway: str, scheme: str) -> None:
    status, _ = chat_status(gateway, {"authorization": f"{scheme} {FULL_KEY}"})
    assert status == 200


def test_key_is_not_forwarded_upstream(gateway: str, fake: FakeUpstream) -> None:
    status, _ = chat_status(gateway, {"authorization": f"Bearer {FULL_KEY}"}, "b")
    assert status == 200
    assert FULL_KEY not in repr(fake.headers[-1])


def test_restricted_key_other_model_is_403(gateway: str, fake: FakeUpstream) -> None:
    before = len(fake.requests)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        sdk(gateway, LIMITED_KEY).chat.completions.create(model="b", messages=MESSAGES)
    assert caught.value.status_code == 403
    assert caught.value.body == {  # type: ignore[comparison-overlap]
        "message": "This API key may not use the model `b`.",
        "type": "permission_error",
        "param": "model",
        "code": "model_not_allowed",
    }
    with pytest.raises(openai.PermissionDeniedError):
        sdk(gateway, LIMITED_KEY).chat.completions.create(model="b", messages=MESSAGES, stream=True)
    with pytest.raises(openai.PermissionDeniedError):
        sdk(gateway, LIMITED_KEY).models.retrieve("b")
    assert len(fake.requests) == before
    # the full key may use it
    assert sdk(gateway, FULL_KEY).chat.completions.create(model="b", messages=MESSAGES).choices


def test_models_listing_follows_the_key(gateway: str) -> None:
    assert [m.id for m in sdk(gateway, FULL_KEY).models.list()] == ["a", "b"]
    assert [m.id for m in sdk(gateway, LIMITED_KEY).models.list()] == ["a"]
    assert sdk(gateway, LIMITED_KEY).models.retrieve("a").id == "a"


@pytest.mark.parametrize("path", ["/health/live", "/health/ready"])
def test_health_needs_no_key(gateway: str, path: str) -> None:
    response = httpx.get(gateway + path, timeout=5)
    assert response.status_code == 200


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/a", "/v1/models/", "/v1/nowhere"])
def test_every_v1_path_needs_a_key(gateway: str, path: str) -> None:
    response = httpx.get(gateway + path, timeout=5)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers["x-request-id"].startswith("req_")


# --- check_bind / is_loopback -------------------------------------------------------


def loaded(keys: list[dict[str, Any]]) -> LoadedConfig:
    return parse_config(config(openai_backend("http://127.0.0.1:9/v1"), keys), "<test>", env={})


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.0.0.1", False),
        ("192.168.1.10", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def resolver(answers: dict[str, list[str]]) -> Any:
    def getaddrinfo(host: str, *_: Any, **__: Any) -> list[tuple[Any, ...]]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "unknown host")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 0)) for ip in answers[host]]

    return getaddrinfo


def test_is_loopback_resolves_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        resolver(
            {
                "me.internal": ["127.0.0.1", "127.0.1.1"],
                "mixed.internal": ["127.0.0.1", "10.1.2.3"],
                "lan.internal": ["10.1.2.3"],
            }
        ),
    )
    assert is_loopback("me.internal") is True
    assert is_loopback("mixed.internal") is False  # one reachable address is enough to expose it
    assert is_loopback("lan.internal") is False
    assert is_loopback("nowhere.internal") is False


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.1"])
def test_no_keys_beyond_loopback_is_refused(host: str) -> None:
    with pytest.raises(UnsafeBind, match="without client keys"):
        check_bind(loaded([]), Settings(host=host, allow_unauthenticated=False))


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_no_keys_beyond_loopback_allowed_explicitly(host: str) -> None:
    check_bind(loaded([]), Settings(host=host, allow_unauthenticated=True))


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_no_keys_on_loopback_is_fine(host: str) -> None:
    check_bind(loaded([]), Settings(host=host, allow_unauthenticated=False))


def test_keys_beyond_loopback_are_fine() -> None:
    check_bind(loaded(KEYS), Settings(host="0.0.0.0", allow_unauthenticated=False))


def test_allow_unauthenticated_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERLOCK_ALLOW_UNAUTHENTICATED", "1")
    monkeypatch.setenv("INTERLOCK_HOST", "0.0.0.0")
    check_bind(loaded([]), Settings())
    monkeypatch.setenv("INTERLOCK_ALLOW_UNAUTHENTICATED", "0")
    with pytest.raises(UnsafeBind):
        check_bind(loaded([]), Settings())
