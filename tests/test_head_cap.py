"""The request head cap (``INTERLOCK_MAX_HEADER_BYTES``): raw sockets against the real gateway."""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import orjson
import pytest

from tests.conftest import run_gateway
from tests.fakes import closed_url, openai_backend

CAP = 64 * 1024


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    config = {
        "backends": {"up": openai_backend(closed_url(), "ok")},
        "models": {"m": {"targets": ["up"]}},
        "resilience": {"health_check": {"interval_s": 0}},
    }
    with run_gateway(config) as url:
        yield url


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes its side (raises on a timeout: it must close)."""
    received = b""
    while piece := sock.recv(65536):
        received += piece
    return received


def test_a_100_kib_header_gets_431_and_the_connection_closes(gateway: str) -> None:
    with connect(gateway) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 100 * 1024 + b"\r\n\r\n")
        reply = read_all(sock)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ")
    assert b"connection: close" in head.lower()
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "request_header_fields_too_large"


def test_many_headers_adding_up_past_the_cap_get_431(gateway: str) -> None:
    headers = {f"x-h{i}": "v" * 1000 for i in range(80)}  # 80 KB, each header small
    response = httpx.get(gateway + "/health/live", headers=headers, timeout=10)
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "request_header_fields_too_large"


def test_a_trickled_header_is_cut_at_the_cap_before_it_ends(gateway: str) -> None:
    """The header never ends: the server must answer and close once the cap is passed."""
    with connect(gateway) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nhost: x\r\nx-endless: ")
        sent, piece, reply = 0, b"a" * 4096, b""
        while sent < 16 * 1024 * 1024:
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
            if select.select([sock], [], [], 0)[0]:
                reply = read_all(sock)
                break
        assert sent < 16 * 1024 * 1024, "the server kept reading an endless header"
    assert reply.startswith(b"HTTP/1.1 431 ")


def test_heads_under_the_cap_pass_and_each_request_counts_afresh(gateway: str) -> None:
    with httpx.Client(base_url=gateway, timeout=10) as http:
        for _ in range(3):  # one keep-alive connection, 3 x 40 KiB of headers
            response = http.get("/health/live", headers={"x-big": "a" * 40 * 1024})
            assert response.status_code == 200
        # a body is not part of the head
        big = {"model": "nope", "messages": [{"role": "user", "content": "a" * 1024 * 1024}]}
        response = http.post(
            "/v1/chat/completions", content=orjson.dumps(big), headers={"content-type": "application/json"}
        )
        assert response.status_code == 404


def test_the_cap_is_a_setting() -> None:
    config = {
        "backends": {"up": openai_backend(closed_url(), "ok")},
        "models": {"m": {"targets": ["up"]}},
        "resilience": {"health_check": {"interval_s": 0}},
    }
    with run_gateway(config, max_header_bytes=8 * 1024) as url:
        assert httpx.get(url + "/health/live", headers={"x-big": "a" * 4096}).status_code == 200
        assert httpx.get(url + "/health/live", headers={"x-big": "a" * 10000}).status_code == 431
