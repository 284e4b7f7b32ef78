"""One JSON line per inference request, formatted as the request ends, written off the hot path.

A request's ``Entry`` (a tuple of figures it already had) is turned into its JSON line (orjson)
on the event loop as the request ends, and the line is put on a deque; a writer thread of the
log's own wakes every 100 ms and writes what has queued up with one call, to stderr or a file.
Formatting on the loop costs the same CPU as in the thread, but a thread that formats a 100 ms
batch holds the GIL for milliseconds at a time, and the loop, waiting for it, stalls a whole
switch interval (5 ms) behind it: latency spikes for every request in flight then. The thread
now holds the GIL only to join the lines; the write itself releases it. Batching matters under
load: a wake-up, a write and a ``logging`` record per line cost more than the lines.
A file that logrotate moved away is reopened, as ``logging.handlers.WatchedFileHandler`` does.

The line never holds prompt or completion text, nor a client key (only its name). The reply's
tail that the finish reason and error code are read from stays in memory and is dropped here.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections import deque
from typing import Any, BinaryIO, NamedTuple

import orjson

log = logging.getLogger("interlock.access")

#: lines waiting to be written at most; beyond, new ones are dropped and counted, never blocking
MAX_PENDING = 10_000
#: lines written per write at most
_BATCH = 512
#: how often the writer wakes to write what has queued up
_INTERVAL_S = 0.1
_FINISH = re.compile(rb'"finish_reason"\s*:\s*"([a-z_]{1,32})"')
_CACHED = re.compile(rb'"cached_tokens"\s*:\s*(\d{1,12})')
_REASON = re.compile(rb"[a-z_]{1,32}")
#: the last bytes of a reply searched first for its finish reason and usage
_NEAR_END = 1024


class Entry(NamedTuple):
    time: float
    request_id: str | None
    #: the OpenTelemetry trace id (tracing on), else None
    trace_id: str | None
    endpoint: str | None
    route: str
    #: the model the client asked for, truncated (``route`` is ``other`` when it is not configured)
    model: str | None
    backend: str
    attempts: int
    #: why this backend: the router's reason, else the attempts' failures
    reason: str | None
    cache: str | None
    status: int
    stream: bool
    stream_error: bool
    ttft_s: float | None
    duration_s: float
    upstream_s: float | None
    overhead_s: float | None
    tokens_in: int | None
    tokens_out: int | None
    cost_usd: float
    #: client | upstream | none
    disconnect: str
    #: the client key's name (never the key)
    key: str | None
    #: the reply's last bytes: read for the finish reason and error code, never written
    tail: bytes


def line(entry: Entry) -> bytes:
    """The JSON line of ``entry``. It runs on the event loop for every request: one unpacking
    rather than two dozen attribute reads, milliseconds inlined rather than called."""
    (
        at,
        request_id,
        trace_id,
        endpoint,
        route,
        model,
        backend,
        attempts,
        reason,
        cache,
        status,
        stream,
        stream_error,
        ttft_s,
        duration_s,
        upstream_s,
        overhead_s,
        tokens_in,
        tokens_out,
        cost_usd,
        disconnect,
        key,
        tail,
    ) = entry
    second = int(at)
    if _second[0] != second:
        _second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))]
    finish = cached = error = None
    if tail:
        # The finish reason and the usage sit at the end of a reply or stream: the last bytes are
        # searched first (each search's cost is its length), all of the tail only where they miss.
        near = len(tail) - _NEAR_END if len(tail) > _NEAR_END else 0
        found = tail.rfind(b'"finish_reason"', near)
        if found < 0 and near:
            found = tail.rfind(b'"finish_reason"')
        if found >= 0:
            finish = _finish_reason(tail, found)
        found = tail.rfind(b'"cached_tokens"', near)
        if found < 0 and near:
            found = tail.rfind(b'"cached_tokens"')
        if found >= 0:
            count = _CACHED.match(tail, found)
            cached = int(count.group(1)) if count else None
        if stream_error or (status or 0) >= 400:  # a 2xx reply that was not an error event has no error
            error = _error_code(tail)
    return orjson.dumps(
        {
            "time": _second[1] + _MILLIS[int((at - second) * 1000)],
            "request_id": request_id,
            "trace_id": trace_id,
            "endpoint": endpoint,
            "route": route,
            "model": model,
            "backend": backend,
            "attempts": attempts,
            "reason": reason,
            "cache": cache,
            "status": status,
            "stream": stream,
            "stream_error": stream_error,
            "ttft_ms": None if ttft_s is None else int(ttft_s * 1_000_000) / 1000,
            "duration_ms": int(duration_s * 1_000_000) / 1000,
            "upstream_ms": None if upstream_s is None else int(upstream_s * 1_000_000) / 1000,
            "overhead_ms": None if overhead_s is None else int(overhead_s * 1_000_000) / 1000,
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            # the upstream's (or a cache hit's) usage.prompt_tokens_details.cached_tokens
            "cached_tokens": cached,
            "cost_usd": round(cost_usd, 8) if cost_usd else cost_usd,
            "finish_reason": finish,
            "error": error,
            "disconnect": disconnect,
            "key": key,
        },
        option=orjson.OPT_APPEND_NEWLINE,
    )


def _finish_reason(tail: bytes, at: int) -> str | None:
    """The finish reason whose key starts at ``at``: sliced where it is written without spaces
    (as servers write JSON), matched by the regular expression otherwise."""
    start = at + 17  # len('"finish_reason":"')
    if tail.startswith(b'":"', at + 14):
        end = tail.find(b'"', start, start + 33)
        if end > start:
            reason = tail[start:end]
            return reason.decode() if _REASON.fullmatch(reason) else None
    found = _FINISH.match(tail, at)
    return found.group(1).decode() if found else None


#: UTC ISO 8601 with milliseconds: the seconds part is formatted once per second (lines are
#: formatted on the one event-loop thread), the milliseconds looked up, as formatting either
#: costs more than the rest of the line
_second: list[Any] = [None, ""]
_MILLIS = tuple(f"{ms:03d}Z" for ms in range(1000))


def _error_code(tail: bytes) -> str | None:
    """The code (else the type) of the error body or in-stream error event the reply ended with."""
    at = tail.rfind(b'{"error"')
    if at < 0:
        return None
    end = tail.find(b"\n", at)
    try:
        error = orjson.loads(tail[at : end if end >= 0 else None])["error"]
        found = error.get("code") or error.get("type")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None
    return found[:64] if isinstance(found, str) else None


class AccessLog:
    """The access log of one app: ``start`` it with the app, ``stop`` it when the app ends."""

    def __init__(self, destination: str) -> None:
        """``destination``: ``stderr``, or a file path (appended to; reopened if moved away)."""
        self.destination = destination
        self._path = None if destination == "stderr" else destination
        self._out: BinaryIO | None = None
        self._inode: int | None = None
        #: JSON lines waiting for the writer (appends and pops of a deque need no lock)
        self._pending: deque[bytes] = deque()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        #: entries dropped because the writer fell ``MAX_PENDING`` behind
        self.dropped = 0
        self._open()  # a path that cannot be written fails start-up, not the first request

    def start(self) -> None:
        if self._out is None:
            self._open()
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="interlock-access-log", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Writes what is queued, then ends the thread."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(10)
            self._thread = None
        if self._path is not None and self._out is not None:
            self._out.close()
            self._out = None

    def write(self, entry: Entry) -> None:
        """Queues ``entry``'s line; the writer writes it within ``_INTERVAL_S``."""
        pending = self._pending
        if len(pending) >= MAX_PENDING:
            self.dropped += 1
            return
        try:
            pending.append(line(entry))
        except Exception:  # an entry that cannot be written must not fail its request
            log.exception("access log: an entry could not be written")

    def _open(self) -> None:
        if self._path is None:
            self._out = sys.stderr.buffer
            return
        self._out = open(self._path, "ab")  # kept open for the app's life
        self._inode = os.fstat(self._out.fileno()).st_ino

    def _reopen_if_moved(self) -> None:
        if self._path is None:
            return
        try:
            moved = os.stat(self._path).st_ino != self._inode
        except FileNotFoundError:
            moved = True
        if moved:
            assert self._out is not None
            self._out.close()
            self._open()

    def _run(self) -> None:
        # Woken every _INTERVAL_S, not per entry: at hundreds of requests a second a wake-up and
        # a write per line cost more than the lines (and take the GIL from the loop each time).
        while True:
            stopping = self._stop.wait(_INTERVAL_S)
            self._drain()
            if stopping:
                return

    def _drain(self) -> None:
        pending = self._pending
        while pending:
            lines = [pending.popleft() for _ in range(min(_BATCH, len(pending)))]
            try:
                self._reopen_if_moved()
                assert self._out is not None
                self._out.write(b"".join(lines))
                self._out.flush()
            except OSError as exc:
                log.error("access log: writing to %s failed: %s", self.destination, exc)


def access_log_from(setting: str) -> AccessLog | None:
    """``INTERLOCK_ACCESS_LOG``: ``off`` (None), ``stderr``, or a file path."""
    return None if setting == "off" else AccessLog(setting)
