"""Slow clients: deadlines for the request head and body, keep-alive idle, the connection bound.

Raw sockets on loopback against the real gateway with short deadlines. Each test waits for the
server to close the connection, with a generous bound, never for a guessed duration.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import orjson
import pytest

from tests.conftest import run_gateway
from tests.fakes import FakeUpstream, openai_backend

HEAD_S = 1.0
BODY_S = 1.0
MIN_RATE = 200.0
#: how late a close may come on a loaded machine and still count as the deadline's
SLACK_S = 10.0
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Say hello."}]}

#: what each kind sends first, then again and again until the server closes
KINDS: dict[str, tuple[bytes, bytes | None]] = {
    "nothing": (b"", None),
    "half_request_line": (b"GET /health/li", b"v"),
    "headers_without_end": (b"GET /health/live HTTP/1.1\r\nhost: x\r\n", b"x-a: b\r\n"),
    "body_byte_by_byte": (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
        b"content-type: application/json\r\ncontent-length: 100000\r\n\r\n{",
        b" ",
    ),
}
#: a trickle every this long: under the body's gap deadline, far under its minimum rate
EVERY_S = 0.3


def config(upstream: FakeUpstream) -> dict[str, object]:
    return {
        "backends": {"up": openai_backend(upstream.base_url, "ok")},
        "models": {"m": {"targets": ["up"]}},
        "resilience": {"health_check": {"interval_s": 0}},
    }


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def gateway(upstream: FakeUpstream) -> Iterator[str]:
    with run_gateway(
        config(upstream), header_timeout_s=HEAD_S, body_timeout_s=BODY_S, body_min_bytes_per_s=MIN_RATE
    ) as url:
        yield url


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


@dataclass
class Slow:
    sock: socket.socket
    piece: bytes | None
    opened: float = field(default_factory=time.monotonic)
    received: bytes = b""
    closed_after: float | None = None


class SlowClients:
    """Slow connections driven from one thread: each trickles its piece every ``EVERY_S`` and
    records when the server closed it and what it answered."""

    def __init__(self, url: str, kinds: dict[str, int]) -> None:
        self.conns: list[tuple[str, Slow]] = []
        for kind, n in kinds.items():
            first, piece = KINDS[kind]
            for _ in range(n):
                sock = connect(url)
                sock.sendall(first)
                sock.setblocking(False)
                self.conns.append((kind, Slow(sock, piece)))
        self._thread = threading.Thread(target=self._drive, daemon=True)
        self._thread.start()

    def _drive(self) -> None:
        deadline = time.monotonic() + HEAD_S + BODY_S + 2 * SLACK_S
        next_send = time.monotonic() + EVERY_S
        while time.monotonic() < deadline:
            live = {c.sock: c for _, c in self.conns if c.closed_after is None}
            if not live:
                return
            readable, _, _ = select.select(list(live), [], [], max(0.0, next_send - time.monotonic()))
            for sock in readable:
                self._read(live[sock])
            if time.monotonic() >= next_send:
                next_send += EVERY_S
                for conn in live.values():
                    if conn.piece is not None and conn.closed_after is None:
                        try:
                            conn.sock.send(conn.piece)
                        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                            pass  # the close shows up as a read

    @staticmethod
    def _read(conn: Slow) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except ConnectionResetError:
            data = b""
        conn.received += data
        if not data:
            conn.closed_after = time.monotonic() - conn.opened
            conn.sock.close()

    def wait(self) -> list[tuple[str, Slow]]:
        self._thread.join(HEAD_S + BODY_S + 3 * SLACK_S)
        return self.conns


def check_closed_by_deadline(kind: str, conn: Slow) -> None:
    assert conn.closed_after is not None, f"{kind}: still open"
    assert conn.closed_after >= 0.9 * min(HEAD_S, BODY_S), f"{kind}: closed before its deadline"
    assert conn.closed_after < max(HEAD_S, BODY_S) + SLACK_S, f"{kind}: closed {conn.closed_after:.1f}s late"
    head, _, body = conn.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), (kind, conn.received[:200])
    assert b"connection: close" in head.lower()
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "request_timeout"


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_of_slow_connection_gets_408_and_is_closed_by_its_deadline(gateway: str, kind: str) -> None:
    [(_, conn)] = SlowClients(gateway, {kind: 1}).wait()
    check_closed_by_deadline(kind, conn)


def test_healthy_clients_are_served_while_slow_connections_wait_out_their_deadlines(gateway: str) -> None:
    slow = SlowClients(gateway, dict.fromkeys(KINDS, 25))
    statuses: list[int] = []
    with httpx.Client(base_url=gateway, timeout=10) as http:
        while any(c.closed_after is None for _, c in slow.conns) and len(statuses) < 10_000:
            statuses.append(http.get("/health/live").status_code)
            statuses.append(http.post("/v1/chat/completions", json=CHAT).status_code)
    for kind, conn in slow.wait():
        check_closed_by_deadline(kind, conn)
    assert len(statuses) >= 2 and set(statuses) == {200}


def test_a_slow_body_above_the_minimum_rate_is_not_cut(gateway: str) -> None:
    """3 KB in 300-byte pieces every 0.2 s: longer than the body deadline, but never stalled."""
    body = orjson.dumps({**CHAT, "messages": [{"role": "user", "content": "a" * 3000}]})
    with connect(gateway) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        started = time.monotonic()
        for at in range(0, len(body), 300):
            sock.sendall(body[at : at + 300])
            time.sleep(0.2)  # the pace under test, not a wait for a condition
        assert time.monotonic() - started > BODY_S
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]


def test_the_head_deadline_runs_from_the_end_of_the_previous_response(gateway: str) -> None:
    with connect(gateway) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.endswith(b"}"):
            reply += sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /health/live HTTP/1.1\r\nhost: x\r\n")  # the next head, never ended
        ended = time.monotonic()
        rest = b""
        while piece := sock.recv(65536):
            rest += piece
        waited = time.monotonic() - ended
    assert rest.startswith(b"HTTP/1.1 408 ")
    assert 0.9 * HEAD_S <= waited < HEAD_S + SLACK_S


def test_an_idle_keep_alive_connection_is_closed_quietly(upstream: FakeUpstream) -> None:
    with (
        run_gateway(config(upstream), keepalive_timeout_s=0.3, header_timeout_s=30) as url,
        connect(url) as sock,
    ):
        sock.sendall(b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n")
        received = b""
        while piece := sock.recv(65536):
            received += piece
    assert received.startswith(b"HTTP/1.1 200 ")
    assert received.count(b"HTTP/1.1") == 1  # nothing after the response: no 408 on an idle close


def test_connections_past_the_limit_get_503_and_are_closed(upstream: FakeUpstream) -> None:
    with run_gateway(config(upstream), max_connections=4, header_timeout_s=30) as url:
        held = [connect(url) for _ in range(4)]
        with connect(url) as extra:
            refused = b""
            while piece := extra.recv(65536):
                refused += piece
        head, _, body = refused.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ")
        assert b"connection: close" in head.lower() and b"retry-after: 1" in head.lower()
        assert orjson.loads(body)["error"]["code"] == "too_many_connections"
        held.pop().close()
        deadline = time.monotonic() + SLACK_S
        while True:  # the server sees the close a moment later
            response = httpx.get(url + "/health/live", timeout=10)
            if response.status_code == 200 or time.monotonic() > deadline:
                break
        assert response.status_code == 200
        for sock in held:
            sock.close()


def test_a_client_waiting_for_100_continue_gets_it_and_is_served(gateway: str) -> None:
    """The app is started before the body only for such a client: it sends the 100 Continue."""
    body = orjson.dumps(CHAT)
    with connect(gateway) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"expect: 100-continue\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 "), interim[:100]
        sock.sendall(body)
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]


def test_pipelined_requests_with_bodies_are_answered_in_order(gateway: str) -> None:
    body = orjson.dumps(CHAT)
    one = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    with connect(gateway) as sock:
        sock.sendall(one + one[: len(one) - 5])  # the second body not all there yet
        last = b"GET /health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        sock.sendall(one[len(one) - 5 :] + last)
        replies = b""
        while piece := sock.recv(65536):
            replies += piece
    assert replies.count(b"HTTP/1.1 200 ") == 3
