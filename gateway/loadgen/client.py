"""One request on the wire, measured.

SSE is parsed cheaply: events are split on the blank line, and an event is looked into as bytes
(does it carry text? is it ``[DONE]``? an error?); only the usage chunk and error events are
decoded as JSON. Several events arriving in one read share its arrival time, as a client sees them.

Errors by class: ``http_<status>`` (429 among them, with its Retry-After kept), ``connect`` (no
connection), ``disconnected`` (the connection closed before a reply), ``timeout`` (no byte within
the read timeout: a stall), ``stream_cut`` (the stream ended or broke without ``[DONE]``),
``stream_error`` (an error event inside a 200 stream), ``bad_reply`` (a body that is not the JSON
it should be).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import orjson

from gateway.loadgen.workload import Planned

CACHE_HEADER = "x-interlock-cache"  # hit | miss | bypass | stale (gateway/cache_step.py)
_TEXT_KEYS = (b'"content":', b'"text":')


@dataclass(slots=True)
class Record:
    """What one request did; a line of the per-request JSONL."""

    session: str
    round: int
    start_s: float  # from the start of the run
    ok: bool = False
    status: int | None = None
    error: str | None = None  # the class (module docstring)
    message: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    events: int = 0
    cache: str | None = None
    retry_after: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (vLLM's TPOT)."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["tpot_s"] = self.tpot_s
        return out


async def send(
    http: aiohttp.ClientSession,
    url: str,
    planned: Planned,
    headers: dict[str, str],
    read_timeout_s: float,
    started: float,
) -> Record:
    t0 = time.perf_counter()
    record = Record(planned.session, planned.round, t0 - started)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=read_timeout_s, sock_read=read_timeout_s)
    streaming = False
    try:
        async with http.post(
            url,
            data=planned.body,
            headers={**headers, "x-interlock-session": planned.session},
            timeout=timeout,
        ) as response:
            record.status = response.status
            record.cache = response.headers.get(CACHE_HEADER)
            if response.status != 200:
                body = await response.read()
                record.error = f"http_{response.status}"
                record.retry_after = response.headers.get("retry-after")
                record.message = _message(body)
            elif response.content_type == "text/event-stream":
                streaming = True
                await _read_stream(response, record, t0)
            else:
                _read_json(await response.read(), record)
    except TimeoutError:
        record.error, record.message = "timeout", f"no byte for {read_timeout_s:g} s"
    except aiohttp.ClientConnectorError as exc:
        record.error, record.message = "connect", str(exc)
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        record.error = "stream_cut" if streaming else "disconnected"
        record.message = str(exc) or type(exc).__name__
    except asyncio.CancelledError:
        raise
    record.e2e_s = time.perf_counter() - t0
    record.ok = record.error is None
    return record


async def _read_stream(response: aiohttp.ClientResponse, record: Record, t0: float) -> None:
    buffer = b""
    done = False
    last = 0.0
    tokens = 0
    usage: dict[str, Any] | None = None
    crlf: bool | None = None  # sse-starlette (llama-cpp-python's server) ends lines with \r\n
    async for chunk in response.content.iter_any():
        now = time.perf_counter()
        buffer += chunk
        if crlf is None and b"\n" in buffer:
            crlf = b"\r\n" in buffer
        if crlf:
            buffer = buffer.replace(b"\r\n", b"\n")
        while (end := buffer.find(b"\n\n")) >= 0:
            event, buffer = buffer[:end], buffer[end + 2 :]
            if event.startswith(b"data: "):
                payload = event[6:]
            elif event.startswith(b"data:"):
                payload = event[5:].lstrip()
            else:
                continue  # a comment (keep-alive) or a field we do not use
            record.events += 1
            if payload == b"[DONE]":
                done = True
                continue
            if payload.startswith(b'{"error"'):
                record.error, record.message = "stream_error", _message(payload)
                continue
            if _has_text(payload):
                tokens += 1
                if record.ttft_s is None:
                    record.ttft_s = now - t0
                else:
                    record.itl_s.append(now - last)
                last = now
            if b'"usage"' in payload and b'"usage":null' not in payload and b'"usage": null' not in payload:
                usage = _usage(payload) or usage
    record.output_tokens = tokens
    if usage:
        record.output_tokens = int(usage.get("completion_tokens") or tokens)
        record.prompt_tokens = usage.get("prompt_tokens")
    if record.error is None and not done:
        record.error, record.message = "stream_cut", "the stream ended without [DONE]"


def _has_text(payload: bytes) -> bool:
    """Whether an event carries output text: a non-empty ``content`` (chat) or ``text`` string."""
    for key in _TEXT_KEYS:
        at = payload.find(key)
        if at >= 0:
            at += len(key)
            if payload[at : at + 1] == b" ":  # json.dumps' default separators
                at += 1
            return payload[at : at + 1] == b'"' and payload[at + 1 : at + 2] != b'"'
    return False


def _read_json(body: bytes, record: Record) -> None:
    try:
        reply = orjson.loads(body)
        usage = reply.get("usage") or {}
        choices = reply["choices"]
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
        record.error, record.message = "bad_reply", body[:200].decode(errors="replace")
        return
    record.prompt_tokens = usage.get("prompt_tokens")
    record.output_tokens = int(usage.get("completion_tokens") or len(choices))


def _usage(payload: bytes) -> dict[str, Any] | None:
    try:
        usage = orjson.loads(payload).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


def _message(body: bytes) -> str:
    try:
        error = orjson.loads(body)["error"]
        return str(error.get("message") if isinstance(error, dict) else error)[:300]
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return body[:300].decode(errors="replace")
