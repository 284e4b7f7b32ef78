"""Plumbing shared by every backend that speaks HTTP to an OpenAI-compatible server.

One ``aiohttp.ClientSession`` per process: aiohttp is the hot path's client (a thin relay
built on it served ~9x the requests per second of the same relay on httpx.AsyncClient).
``OpenAICompatibleUpstream`` sends one request and either returns the whole body or relays
SSE bytes as they arrive, mapping aiohttp's failures into ``backends.errors`` right here; its
``send``, ``unavailable``, ``error_dict`` and ``retry_after_s`` serve Ollama's native API too.
How long an upstream may take, and the timers that hold it to that, are
``backends.http_timeouts``; what it may send back (size cap, redaction) ``backends.http_limits``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from yarl import URL

from backends.base import Health, Usage
from backends.errors import (
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    InterlockError,
    UnsupportedEndpoint,
    UpstreamHTTPError,
)
from backends.http_limits import DEFAULT_MAX_REPLY_BYTES, ErrorEvents, Redactor, read_capped
from backends.http_timeouts import Deadline, IdleWatch, Timeouts

log = logging.getLogger("interlock.backends.http")

_MAX_ERROR_BODY = 64 * 1024
_MAX_MESSAGE = 1000
_DONE = b"data: [DONE]"
_STALE_ERRNOS = {errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED}

#: the W3C ``traceparent`` of the attempt this task is making, set by the gateway's tracing when
#: it is on (``gateway.tracing``); None (tracing off): no header, and one lookup is all it costs
TRACEPARENT: ContextVar[str | None] = ContextVar("interlock_traceparent", default=None)


def http_base_url(value: str) -> str:
    """A config's upstream base URL: http(s) with a host; the trailing slash dropped."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http:// or https:// URL")
    return value.rstrip("/")


class HttpClient:
    """Owns the process's one aiohttp session; created in ``start()`` inside the running loop.
    ``max_reply_bytes`` caps every non-streamed reply read through it (after decompression)."""

    def __init__(self, max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES) -> None:
        self._session: aiohttp.ClientSession | None = None
        self.max_reply_bytes = max_reply_bytes

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector,
                json_serialize=lambda o: orjson.dumps(o).decode(),
                skip_auto_headers=("User-Agent",),
                auto_decompress=True,
            )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("HttpClient.start() was not called")
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@dataclass(slots=True)
class OpenAICompatibleUpstream:
    """One OpenAI-compatible base URL with its credentials and timeouts."""

    http: HttpClient
    base_url: str
    headers: dict[str, str]
    timeouts: Timeouts
    #: strings that must never reach a client (the upstream key, its URL)
    secrets: tuple[str, ...] = field(default=())
    # Built once, not per request: parsing a URL and building a timeout cost microseconds that
    # show on the hot path (the gateway's whole budget per request is a few hundred).
    _urls: dict[str, URL] = field(default_factory=dict, init=False, repr=False)
    _client_timeout: aiohttp.ClientTimeout | None = field(default=None, init=False, repr=False)
    _redactor: Redactor | None = field(default=None, init=False, repr=False)

    def redact(self, text: str) -> str:
        """``text`` without the secrets or the base URL's host, in any case."""
        if self._redactor is None:
            self._redactor = Redactor(self.secrets, (urlsplit(self.base_url).hostname or "",))
        return self._redactor(text)

    def _timeout(self) -> aiohttp.ClientTimeout:
        if self._client_timeout is None:
            self._client_timeout = aiohttp.ClientTimeout(
                total=self.timeouts.total, sock_connect=self.timeouts.connect, connect=self.timeouts.connect
            )
        return self._client_timeout

    def _url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.base_url + path)
        return url

    async def send(self, path: str, payload: bytes, request_id: str) -> aiohttp.ClientResponse:
        """POST and wait for the status line, retrying once on a keep-alive the server had closed."""
        headers = dict(self.headers)
        # Not ``x-request-id``: some servers (llama-cpp-python's) reject any value but a UUID there.
        headers["x-interlock-request-id"] = request_id
        traceparent = TRACEPARENT.get()
        if traceparent is not None:
            headers["traceparent"] = traceparent
        url = self._url(path)
        loop = asyncio.get_running_loop()
        # One timer and no context manager: asyncio.timeout would also look up the task and the
        # loop again (a getpid system call each, on Python 3.11) for every request.
        deadline = Deadline(asyncio.current_task(loop))
        timer = loop.call_at(loop.time() + self.timeouts.first_token, deadline.expire)
        try:
            for attempt in (1, 2):
                try:
                    return await self.http.session.post(
                        url, data=payload, headers=headers, timeout=self._timeout()
                    )
                except asyncio.CancelledError:
                    if deadline.expired():
                        raise self._first_token_timeout() from None
                    raise
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                    # llama.cpp's server closes connections after streams; the pool may hand us
                    # one it already closed. Nothing was processed, so one retry is safe.
                    stale = isinstance(exc, aiohttp.ServerDisconnectedError) or exc.errno in _STALE_ERRNOS
                    if attempt == 1 and stale and not isinstance(exc, aiohttp.ClientConnectorError):
                        log.debug("retrying %s after a stale connection: %s", url, exc)
                        continue
                    raise self.unavailable(exc) from None
                except TimeoutError:  # aiohttp's own (total, connect)
                    raise self._first_token_timeout() from None
                except aiohttp.ClientError as exc:
                    raise self.unavailable(exc) from None
        finally:
            timer.cancel()
        raise AssertionError("unreachable")

    def _first_token_timeout(self) -> BackendTimeout:
        return BackendTimeout(f"upstream did not answer within {self.timeouts.first_token:g}s")

    async def probe(self, path: str) -> Health:
        """A cheap GET for health checks; never raises."""
        headers = {k: v for k, v in self.headers.items() if k != "content-type"}
        timeout = aiohttp.ClientTimeout(total=self.timeouts.connect + 2, connect=self.timeouts.connect)
        try:
            async with self.http.session.get(self.base_url + path, headers=headers, timeout=timeout) as r:
                await r.content.read(_MAX_ERROR_BODY)  # what is left unread closes the connection
                if r.status >= 500:
                    return Health(False, f"health check answered HTTP {r.status}")
                return Health(True)
        except TimeoutError:
            return Health(False, "health check timed out")
        except aiohttp.ClientError as exc:
            return Health(False, self.unavailable(exc).message)

    def unavailable(self, exc: BaseException) -> BackendUnavailable:
        if isinstance(exc, aiohttp.ClientConnectorError):
            return BackendUnavailable("cannot connect to the upstream")
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return BackendUnavailable("the upstream closed the connection")
        return BackendUnavailable(f"upstream connection failed ({type(exc).__name__})")

    async def complete(self, path: str, body: dict[str, Any], request_id: str) -> tuple[bytes, Usage | None]:
        response = await self.send(path, orjson.dumps(body), request_id)
        try:
            if response.status >= 400:
                raise await self._error(response, path)
            try:
                data = await read_capped(response, self.http.max_reply_bytes)
            except TimeoutError:
                raise BackendTimeout(f"upstream did not finish within {self.timeouts.total:g}s") from None
            except aiohttp.ClientError as exc:
                raise self.unavailable(exc) from None
            return data, usage_of(data)
        finally:
            response.release()

    async def stream(self, path: str, body: dict[str, Any], request_id: str) -> AsyncIterator[bytes]:
        """Open an SSE stream; returns once the first bytes are in hand (all earlier failures raise)."""
        response = await self.send(path, orjson.dumps(body), request_id)
        try:
            if response.status >= 400:
                raise await self._error(response, path)
            if response.content_type != "text/event-stream":
                # A JSON or HTML page where SSE was asked for is a broken upstream, caught while
                # another backend can still serve the stream.
                raise BackendUnavailable(
                    f"the upstream answered a stream request with "
                    f"{response.content_type or 'no content type'}, not SSE"
                )
            chunks = response.content.iter_any()
            loop = asyncio.get_running_loop()
            deadline = Deadline(asyncio.current_task(loop))
            timer = loop.call_at(loop.time() + self.timeouts.first_token, deadline.expire)
            try:
                first = await anext(chunks, b"")
            except asyncio.CancelledError:
                if deadline.expired():
                    raise TimeoutError from None
                raise
            finally:
                timer.cancel()
        except TimeoutError:
            response.close()
            raise BackendTimeout(
                f"no first token from the upstream within {self.timeouts.first_token:g}s"
            ) from None
        except aiohttp.ClientError as exc:
            response.close()
            raise self.unavailable(exc) from None
        except BaseException:
            response.close()
            raise
        if not first:
            response.close()
            raise BackendUnavailable("the upstream closed the stream before sending anything")
        return self._relay(response, chunks, first)

    async def _relay(
        self, response: aiohttp.ClientResponse, chunks: AsyncIterator[bytes], first: bytes
    ) -> AsyncIterator[bytes]:
        tail = first[-32:]
        watch = IdleWatch(self.timeouts.idle)
        # the upstream's own error events are redacted like its error bodies
        events = ErrorEvents(self._sanitize)
        try:
            if out := events.feed(first):
                yield out
            while True:
                # Around the read only: a client slow to take the bytes is not a stalled upstream.
                watch.start()
                try:
                    chunk = await anext(chunks, b"")
                except asyncio.CancelledError:
                    if watch.fired():
                        raise BackendTimeout(f"no bytes from the upstream for {watch.idle:g}s") from None
                    raise
                finally:
                    watch.stop()
                if not chunk:
                    if out := events.end():
                        yield out
                    break
                tail = (tail + chunk)[-32:]
                if out := events.feed(chunk):
                    yield out
        except TimeoutError:
            raise BackendTimeout("the upstream stream went past its total time limit") from None
        except aiohttp.ClientError as exc:
            raise self.unavailable(exc) from None
        finally:
            watch.close()
            # Closing (not releasing) drops the connection, so an upstream that is still
            # generating for a client who left sees the disconnect and stops.
            response.close()
        if _DONE not in tail:
            raise BackendUnavailable("the upstream ended the stream before it finished")

    async def _error(self, response: aiohttp.ClientResponse, path: str) -> InterlockError:
        try:
            raw = await response.content.read(_MAX_ERROR_BODY)
        except (aiohttp.ClientError, TimeoutError):
            raw = b""
        retry_after = retry_after_s(response.headers.get("retry-after"))
        status = response.status
        error = self._sanitize(error_dict(raw, status))
        if status == 404 and path == "/embeddings" and error.get("message") == "Not Found":
            return UnsupportedEndpoint("this model does not serve embeddings", param="model")
        if status in (401, 403):
            # The gateway's own upstream credentials were refused: not the client's fault.
            return BackendUnavailable("the upstream refused the gateway's credentials", status=502)
        if status == 429:
            return BackendOverloaded(
                str(error.get("message") or "the upstream is rate limiting"),
                status=429,
                retry_after=retry_after,
            )
        if status == 503:
            return BackendOverloaded(
                str(error.get("message") or "the upstream is unavailable"), retry_after=retry_after
            )
        return UpstreamHTTPError(status, error, retry_after=retry_after)

    def _sanitize(self, error: dict[str, Any]) -> dict[str, Any]:
        def redact(value: object) -> str | None:
            return self.redact(value) if isinstance(value, str) else None

        # every field reaches the client, not only the message
        message = redact(str(error.get("message", ""))) or ""
        return {
            "message": message[:_MAX_MESSAGE],
            **{k: redact(error.get(k)) for k in ("type", "param", "code")},
        }


def error_dict(raw: bytes, status: int) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw.decode("utf-8", "replace").strip()[:_MAX_ERROR_BODY]
        return {"message": text or f"upstream returned HTTP {status}"}
    if isinstance(data, dict):
        if isinstance(data.get("error"), dict):
            return data["error"]
        if isinstance(data.get("error"), str):
            return {"message": data["error"]}
        if "detail" in data:  # FastAPI's shape
            return {"message": str(data["detail"])}
        if "message" in data:
            return {"message": str(data["message"])}
    return {"message": f"upstream returned HTTP {status}"}


def retry_after_s(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP-date; rare from LLM servers, and a guess is worse than none


def usage_of(body: bytes) -> Usage | None:
    """Token counts from an OpenAI JSON reply; a reply that is not a JSON object is the upstream's fault.

    A full parse, not a look at the braces: only that tells a truncated or mangled reply (or
    invalid UTF-8) from a good one, and orjson does it in microseconds for a typical reply.
    The client still gets the upstream's bytes as they came.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BackendUnavailable("the upstream sent a reply that is not valid JSON") from None
    if not isinstance(data, dict):
        raise BackendUnavailable("the upstream sent a reply that is not a JSON object")
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    if prompt is None and completion is None:
        return None
    return Usage(prompt or 0, completion or 0)


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
