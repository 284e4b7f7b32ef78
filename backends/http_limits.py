"""What an upstream may send back: a bounded reply, and text with the gateway's secrets removed.

``read_capped`` reads a non-streamed reply chunk by chunk and gives up at the cap. aiohttp
inflates a compressed body as it is read, a bounded piece per read (``max_decompress_size`` in
``aiohttp.http_parser``), so counting what comes out bounds a gzip bomb as well as a huge body.

``Redactor`` removes the upstream's key, URL and host from error text, in any case.
``ErrorEvents`` applies it to the error events of an SSE stream (``data: {"error": ...}``) and
passes every other byte through as it came: ordinary reply text is the model's, never rewritten.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
import orjson

from backends.errors import BackendUnavailable

DEFAULT_MAX_REPLY_BYTES = 64 * 1024 * 1024
_READ_CHUNK = 256 * 1024
#: an error event's line that is longer than this is not relayed
_MAX_ERROR_EVENT = 1024 * 1024

_ERROR_START = re.compile(rb'data:[ \t]*\{\s*"error"')
#: any beginning of such a line too short to tell yet (whitespace aside, at most 15 bytes)
_ERROR_PREFIX = re.compile(rb'd(a(t(a(:[ \t]*(\{\s*("(e(r(r(or?)?)?)?)?)?)?)?)?)?)?')
_DECIDE = 64
_ERROR_EVENT = re.compile(rb'^data:[ \t]*(\{\s*"error".*?)(\r?)$', re.MULTILINE)


class ReplyTooLarge(BackendUnavailable):
    code = "upstream_reply_too_large"


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole (decompressed) body, or ``ReplyTooLarge`` once more than ``limit`` bytes came."""
    length = response.content_length
    if length is not None and not response.headers.get("content-encoding"):
        if length > limit:
            raise _too_large(limit)
        return await response.read()  # the usual reply: its size is known and within the cap
    parts: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            response.close()  # drop the connection rather than drain the rest
            raise _too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


def _too_large(limit: int) -> ReplyTooLarge:
    return ReplyTooLarge(
        f"the upstream's reply is larger than the gateway's limit of {limit} bytes "
        f"(INTERLOCK_MAX_REPLY_BYTES)"
    )


class Redactor:
    """Replaces each secret, in any case, with ``[redacted]``; a host only where it stands alone
    (``gpu`` is taken out of ``http://gpu:8000`` but not out of ``gpus``)."""

    __slots__ = ("_pattern",)

    def __init__(self, secrets: Iterable[str], hosts: Iterable[str] = ()) -> None:
        # longest first: a URL is taken out whole before its host is
        parts = [re.escape(s) for s in sorted({s for s in secrets if s}, key=len, reverse=True)]
        hosts = sorted({h for h in hosts if h}, key=len, reverse=True)
        parts += [rf"(?<![\w.-]){re.escape(h)}(?![\w-])" for h in hosts]
        self._pattern = re.compile("|".join(parts), re.IGNORECASE) if parts else None

    def __call__(self, text: str) -> str:
        return text if self._pattern is None else self._pattern.sub("[redacted]", text)


class ErrorEvents:
    """Rewrites the error events of an SSE byte stream with ``clean`` (an error dict in, one out).

    Only lines that start ``data: {"error"`` are parsed; a chunk without ``"error"`` costs one
    substring search. A line start that may still become such a line is held until it is
    complete; any other bytes go out in the chunk they came in.
    """

    __slots__ = ("_clean", "_held", "_mid_line")

    def __init__(self, clean: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self._clean = clean
        self._held = b""
        #: inside a line known not to be an error event: it passes until its newline
        self._mid_line = False

    def feed(self, chunk: bytes) -> bytes:
        if self._mid_line:
            nl = chunk.find(b"\n") + 1
            if nl == 0:
                return chunk
            self._mid_line = False
            return chunk if nl == len(chunk) else chunk[:nl] + self._lines(chunk[nl:])
        return self._lines(self._held + chunk if self._held else chunk)

    def end(self) -> bytes:
        """What is still held when the stream ends."""
        held, self._held = self._held, b""
        return _ERROR_EVENT.sub(self._event, held) if held else b""

    def _lines(self, chunk: bytes) -> bytes:
        self._held = b""
        end = chunk.rfind(b"\n") + 1
        rest = len(chunk) - end
        if rest:
            tail = chunk[end:]
            if _ERROR_START.match(tail):
                if rest > _MAX_ERROR_EVENT:
                    raise BackendUnavailable("the upstream sent an error event of over 1 MiB")
                self._held, chunk = tail, chunk[:end]
            elif rest < _DECIDE and _ERROR_PREFIX.fullmatch(tail.rstrip(b" \t\r")):
                self._held, chunk = tail, chunk[:end]
            else:
                self._mid_line = True
        if b'"error"' in chunk:
            chunk = _ERROR_EVENT.sub(self._event, chunk)
        return chunk

    def _event(self, match: re.Match[bytes]) -> bytes:
        try:
            data = orjson.loads(match.group(1))
        except orjson.JSONDecodeError:
            data = None
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, str):
            error = {"message": error}
        if not isinstance(error, dict):
            error = {"message": "the upstream sent a malformed error event", "type": "upstream_error"}
        return b"data: " + orjson.dumps({"error": self._clean(error)}) + match.group(2)
