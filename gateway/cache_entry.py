"""Cache entries: what a good answer is, how it is recorded, and how it is replayed (pure: no I/O).

An entry keeps an answer the way it came: a stream's SSE ``data:`` events with their original
boundaries (the usage-only chunk kept apart, so it is replayed only to clients that asked for it),
or a JSON body. Either can be served either way: ``as_json`` assembles a stream's deltas into one
reply, ``as_sse`` cuts a JSON reply into chunks. Replayed usage reports every prompt token as
cached (``prompt_tokens_details.cached_tokens``).

Only good answers become entries: at least one choice, each finished with ``stop`` or
``tool_calls`` (whose arguments parse as JSON), a stream's ``[DONE]`` seen with no error event
before it, and nothing over the size cap. Everything else records ``None`` and says why through
``on_skip`` (``"oversize"``, ``"cut"``, ``"error"``, ``"no_choices"``, ``"finish"``,
``"tool_args"``, ``"garbage"``).

Turning one shape into the other is ``gateway.reply_shapes``. SSE framing follows
https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.reply_shapes import assemble, event, sse_events

FORMAT = 1
DEFAULT_MAX_BYTES = 1024 * 1024
GOOD_FINISH = frozenset({"stop", "tool_calls"})
DONE = b"data: [DONE]\n\n"

SkipHook = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class CachedReply:
    endpoint: str  # "chat" or "completions"
    model: str
    #: wall-clock time it was recorded, for ``Age``
    created: float
    #: a streamed answer: its ``data: {...}\n\n`` events in order, ``[DONE]`` and the usage chunk excluded
    events: tuple[bytes, ...] | None = None
    #: a streamed answer's usage-only chunk (its JSON), if the stream had one
    usage_chunk: bytes | None = None
    #: a JSON answer: the body as it came
    body: bytes | None = None

    @property
    def size(self) -> int:
        return sum(map(len, self.events or ())) + len(self.usage_chunk or b"") + len(self.body or b"")

    def as_json(self) -> bytes:
        """The reply as a JSON body, whichever way it was recorded."""
        if self.body is not None:
            reply = orjson.loads(self.body)
        else:
            chunks = [orjson.loads(e[6:]) for e in self.events or ()]  # e[6:]: after b"data: "
            usage = orjson.loads(self.usage_chunk).get("usage") if self.usage_chunk else None
            reply = assemble(self.endpoint, chunks, usage)
        if isinstance(reply.get("usage"), dict):
            reply["usage"] = _cached_usage(reply["usage"])
        return orjson.dumps(reply)

    def as_sse(self, include_usage: bool) -> list[bytes]:
        """The reply as SSE events, ``[DONE]`` last; the usage chunk only when ``include_usage``."""
        if self.events is not None:
            out = list(self.events)
            if include_usage and self.usage_chunk:
                chunk = orjson.loads(self.usage_chunk)
                chunk["usage"] = _cached_usage(chunk["usage"])
                out.append(event(chunk))
        else:
            reply = orjson.loads(self.body or b"{}")
            if isinstance(reply.get("usage"), dict):
                reply["usage"] = _cached_usage(reply["usage"])
            out = sse_events(self.endpoint, reply, include_usage)
        out.append(DONE)
        return out

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "f": FORMAT,
                "endpoint": self.endpoint,
                "model": self.model,
                "created": self.created,
                "events": None if self.events is None else [e.decode() for e in self.events],
                "usage_chunk": None if self.usage_chunk is None else self.usage_chunk.decode(),
                "body": None if self.body is None else self.body.decode(),
            }
        )

    @staticmethod
    def decode(raw: bytes) -> CachedReply | None:
        """The entry ``encode`` wrote, or None for anything else (another format, garbage)."""
        try:
            d = orjson.loads(raw)
            if d["f"] != FORMAT or d["endpoint"] not in ("chat", "completions"):
                return None
            events = d["events"]
            reply = CachedReply(
                endpoint=d["endpoint"],
                model=str(d["model"]),
                created=float(d["created"]),
                events=None if events is None else tuple(e.encode() for e in events),
                usage_chunk=None if d["usage_chunk"] is None else d["usage_chunk"].encode(),
                body=None if d["body"] is None else d["body"].encode(),
            )
        except Exception:  # garbage in Redis is a miss, never an error
            return None
        return reply if (reply.events is None) != (reply.body is None) else None


# --- recording ---------------------------------------------------------------------------------


class StreamRecorder:
    """Watches the relayed SSE bytes of one answer (split anywhere) and makes an entry of them.

    ``feed`` only buffers and cuts events apart; the JSON is parsed once, in ``result``, after
    the client has its last byte. Past ``max_bytes`` it stops keeping anything.
    """

    def __init__(
        self,
        endpoint: str,
        max_bytes: int = DEFAULT_MAX_BYTES,
        on_skip: SkipHook | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.endpoint, self.max_bytes, self._on_skip, self._clock = endpoint, max_bytes, on_skip, clock
        self._buf = bytearray()
        self._cr = False  # the last chunk ended in "\r"
        self._size, self._done = 0, False
        self._fault: str | None = None
        self._payloads: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        if self._fault is not None or self._done:
            return
        self._size += len(chunk)
        if self._size > self.max_bytes:
            self._fail("oversize")
            return
        # "\r\n" split across two chunks: the "\r" already ended the line, so drop the "\n"
        data = chunk[1:] if self._cr and chunk.startswith(b"\n") else chunk
        self._cr = data.endswith(b"\r")
        self._buf += data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        while not self._done and self._fault is None:
            end = self._buf.find(b"\n\n")
            if end < 0:
                break
            block = bytes(self._buf[:end])
            del self._buf[: end + 2]
            self._block(block)

    def result(self, now: float | None = None) -> CachedReply | None:
        """The entry, or None (and ``on_skip`` told why) if this was not a good, whole answer."""
        if self._fault is None and not self._done:
            self._fail("cut")
        if self._fault is not None:
            return None
        try:
            chunks = [orjson.loads(p) for p in self._payloads]
        except orjson.JSONDecodeError:
            self._fail("garbage")
            return None
        events: list[bytes] = []
        usage_chunk: bytes | None = None
        body_chunks: list[dict[str, Any]] = []
        for payload, chunk in zip(self._payloads, chunks, strict=True):
            if not isinstance(chunk, dict):
                self._fail("garbage")
                return None
            if "error" in chunk:
                self._fail("error")
                return None
            if not chunk.get("choices") and isinstance(chunk.get("usage"), dict):
                usage_chunk = payload  # the usage-only chunk: replayed only on request
                continue
            # one line per event on replay, even if the upstream spread its JSON over several
            events.append(event(chunk) if b"\n" in payload else b"data: " + payload + b"\n\n")
            body_chunks.append(chunk)
        try:
            assembled = assemble(self.endpoint, body_chunks, None)
            reason = _fault_of(self.endpoint, assembled)
        except (TypeError, ValueError, AttributeError):  # well-formed JSON of the wrong shape
            reason = "garbage"
        if reason is not None:
            self._fail(reason)
            return None
        return CachedReply(
            endpoint=self.endpoint,
            model=str(assembled.get("model", "")),
            created=self._clock() if now is None else now,
            events=tuple(events),
            usage_chunk=usage_chunk,
        )

    def _block(self, block: bytes) -> None:
        data: list[bytes] = []
        kind = b""
        for line in block.split(b"\n"):
            if not line or line.startswith(b":"):
                continue  # a comment (keep-alive)
            name, _, value = line.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if name == b"data":
                data.append(value)
            elif name == b"event":
                kind = value
        if kind == b"error":
            self._fail("error")
        elif data:
            payload = b"\n".join(data)
            if payload.strip() == b"[DONE]":
                self._done = True
            else:
                self._payloads.append(payload)

    def _fail(self, reason: str) -> None:
        self._fault = reason
        self._payloads.clear()
        self._buf.clear()
        if self._on_skip is not None:
            self._on_skip(reason)


def reply_from_json(
    endpoint: str,
    body: bytes,
    max_bytes: int = DEFAULT_MAX_BYTES,
    on_skip: SkipHook | None = None,
    now: float | None = None,
) -> CachedReply | None:
    """An entry of a complete JSON answer (a 200's body), or None if it is not a good one."""

    def skip(reason: str) -> None:
        if on_skip is not None:
            on_skip(reason)

    if len(body) > max_bytes:
        skip("oversize")
        return None
    try:
        reply = orjson.loads(body)
    except orjson.JSONDecodeError:
        skip("garbage")
        return None
    if not isinstance(reply, dict) or "error" in reply:
        skip("error" if isinstance(reply, dict) else "garbage")
        return None
    try:
        reason = _fault_of(endpoint, reply)
    except (TypeError, ValueError, AttributeError):
        reason = "garbage"
    if reason is not None:
        skip(reason)
        return None
    return CachedReply(
        endpoint=endpoint,
        model=str(reply.get("model", "")),
        created=time.time() if now is None else now,
        body=body,
    )


def _fault_of(endpoint: str, reply: dict[str, Any]) -> str | None:
    """Why a (possibly assembled) reply must not be cached, or None if it may."""
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices:
        return "no_choices"
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("finish_reason") not in GOOD_FINISH:
            return "finish"
        message = choice.get("message") if endpoint == "chat" else None
        for call in (message or {}).get("tool_calls") or ():
            try:
                orjson.loads(call["function"]["arguments"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                return "tool_args"
    return None


def _cached_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Usage as a cache hit reports it: every prompt token came from the cache."""
    out = dict(usage)
    prompt = out.get("prompt_tokens")
    if isinstance(prompt, int):
        details = out.get("prompt_tokens_details")
        details = details if isinstance(details, dict) else {}
        out["prompt_tokens_details"] = {**details, "cached_tokens": prompt}
    return out
