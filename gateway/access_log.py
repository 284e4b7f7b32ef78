"""One JSON line per inference request, formatted and written by a process of its own.

A request that ends only appends its ``Entry`` (a plain tuple of figures it already had) to a
deque. A thread of the log's own wakes every 100 ms and hands what has queued up, as one
``marshal`` dump, to a writer process (``gateway.access_log_writer``) through a pipe; that
process turns each entry into its JSON line (``line``, orjson) and writes the batch with one
call, to stderr or a file. Formatting a line costs about ten times as much as queueing it: on
the event loop it was most of the access log's cost per request, and in a thread, formatting a
100 ms batch held the GIL for milliseconds and stalled the loop a whole switch interval behind
it. The thread holds the GIL only for the dump (C, about a microsecond an entry); the pipe write
releases it. A writer that falls behind fills the pipe and then the queue, whose overflow is
dropped and counted: the loop never waits for the log.

The line never holds prompt or completion text, nor a client key (only its name). The reply's
tail that the finish reason and error code are read from goes to the writer and is dropped there.
"""

from __future__ import annotations

import logging
import marshal
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any, NamedTuple

import orjson

log = logging.getLogger("interlock.access")

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: entries waiting for the writer at most; beyond, new ones are dropped and counted, never blocking
MAX_PENDING = 10_000
#: entries sent to the writer per batch at most
_BATCH = 512
#: how often the writer wakes to write what has queued up
_INTERVAL_S = 0.1
_FINISH = re.compile(rb'"finish_reason"\s*:\s*"([a-z_]{1,32})"')
_CACHED = re.compile(rb'"cached_tokens"\s*:\s*(\d{1,12})')
_REASON = re.compile(rb"[a-z_]{1,32}")
#: the last bytes of a reply searched first for its finish reason and usage
_NEAR_END = 1024


class Entry(NamedTuple):
    """The figures of one request, in the order of the tuple the metrics queue (a plain tuple:
    ``marshal`` takes no named tuples, and building one costs a call on the hot path)."""

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
    """The JSON line of ``entry`` (in the writer process): one unpacking rather than two dozen
    attribute reads, milliseconds inlined rather than called."""
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
#: formatted by the writer's one thread), the milliseconds looked up, as formatting either
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
        #: what the writer is given: the path made absolute, as the writer runs elsewhere
        self._target = destination if destination == "stderr" else os.path.abspath(destination)
        if destination != "stderr":
            open(destination, "ab").close()  # a path that cannot be written fails start-up
        #: entries waiting for the writer (appends and pops of a deque need no lock)
        self._pending: deque[tuple[Any, ...]] = deque()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._writer: subprocess.Popen[bytes] | None = None
        #: entries dropped: the writer fell ``MAX_PENDING`` behind, or a batch could not be sent
        self.dropped = 0

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="interlock-access-log", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Sends what is queued, then ends the thread and lets the writer finish."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(10)
            self._thread = None
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                assert writer.stdin is not None
                writer.stdin.close()  # its end of input: it writes what it has and exits
                writer.wait(10)
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.error("access log: the writer did not finish: %s", exc)
                writer.kill()

    def write(self, entry: tuple[Any, ...]) -> None:
        """Queues ``entry`` (an ``Entry``'s fields as a plain tuple) for the writer."""
        pending = self._pending
        if len(pending) >= MAX_PENDING:
            self.dropped += 1
        else:
            pending.append(entry)

    def _spawn(self) -> subprocess.Popen[bytes]:
        # its own session: a Ctrl-C to the gateway's process group must not end it before the
        # gateway has sent what is queued; it ends at end of input, when the gateway closes the
        # pipe or dies. It runs from the folder holding this package, so it imports this same
        # code whatever the gateway's working directory holds (so the path is made absolute).
        return subprocess.Popen(
            [sys.executable, "-m", "gateway.access_log_writer", self._target],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            cwd=_PACKAGE_ROOT,
            start_new_session=True,
        )

    def _run(self) -> None:
        # Woken every _INTERVAL_S, not per entry: at hundreds of requests a second a wake-up and
        # a write per entry cost more than the entries (and take the GIL from the loop each time).
        while True:
            stopping = self._stop.wait(_INTERVAL_S)
            self._drain()
            if stopping:
                return

    def _drain(self) -> None:
        pending = self._pending
        while pending:
            batch = [pending.popleft() for _ in range(min(_BATCH, len(pending)))]
            try:
                data = marshal.dumps(batch)
            except ValueError:  # an Entry itself, or an entry holding what marshal cannot take
                kept = [tuple(entry) for entry in batch]
                kept = [entry for entry in kept if _marshallable(entry)]
                if len(kept) < len(batch):
                    log.error("access log: %d entries could not be written", len(batch) - len(kept))
                self.dropped += len(batch) - len(kept)
                data, batch = marshal.dumps(kept), kept
            try:
                if self._writer is None or self._writer.poll() is not None:
                    self._writer = self._spawn()
                assert self._writer.stdin is not None
                self._writer.stdin.write(len(data).to_bytes(4, "big") + data)
                self._writer.stdin.flush()
            except OSError as exc:  # the writer died (it is started anew) or could not start
                self.dropped += len(batch)
                log.error("access log: the writer for %s failed: %s", self.destination, exc)


def _marshallable(entry: tuple[Any, ...]) -> bool:
    try:
        marshal.dumps(entry)
    except ValueError:
        return False
    return True


def access_log_from(setting: str) -> AccessLog | None:
    """``INTERLOCK_ACCESS_LOG``: ``off`` (None), ``stderr``, or a file path."""
    return None if setting == "off" else AccessLog(setting)
