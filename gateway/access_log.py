"""One JSON line per inference request, written off the hot path.

A request only puts a dict on a queue (``AccessLog.write``: a size check and a ``SimpleQueue.put``,
well under a microsecond); a ``logging.handlers.QueueListener`` thread turns each into a
``LogRecord`` of logger ``interlock.access``, serialises it with orjson and writes it to stderr or
a file. The line never holds prompt or completion text, nor a client key (only its name): the
fields are chosen in ``gateway.metrics``; the reply's tail that a finish reason is read from is
dropped here, before anything is written.
"""

from __future__ import annotations

import datetime
import logging
import logging.handlers
import queue
import re
import sys
from typing import Any

import orjson

LOGGER_NAME = "interlock.access"
#: entries waiting to be written at most; beyond, new ones are dropped and counted, never blocking
MAX_PENDING = 10_000
#: the field holding the bytes a finish reason is read from (popped before writing)
TAIL = "_tail"

_FINISH = re.compile(rb'"finish_reason"\s*:\s*"([a-z_]{1,32})"')


class _Entries(logging.handlers.QueueListener):
    """The writer thread: an entry (a dict) becomes a record for the handler here, not on the loop."""

    def prepare(self, record: Any) -> logging.LogRecord:
        entry: dict[str, Any] = record
        tail = entry.pop(TAIL, None) or b""
        found = _FINISH.findall(tail)
        entry["finish_reason"] = found[-1].decode() if found else None
        entry["error"] = _error_code(tail)
        at = entry["time"]
        entry["time"] = datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat(timespec="milliseconds")
        line = orjson.dumps(entry).decode()
        made = logging.LogRecord(LOGGER_NAME, logging.INFO, __file__, 0, line, None, None)
        made.created = at
        return made


def _error_code(tail: bytes) -> str | None:
    """The code (else the type) of the error body or in-stream error event the reply ended with."""
    at = tail.rfind(b'{"error"')
    if at < 0:
        return None
    end = tail.find(b"\n", at)
    try:
        error = orjson.loads(tail[at:end if end >= 0 else None])["error"]
        found = error.get("code") or error.get("type")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None
    return found[:64] if isinstance(found, str) else None


class AccessLog:
    """The access log of one app: ``start`` it with the app, ``stop`` it when the app ends."""

    def __init__(self, destination: str) -> None:
        """``destination``: ``stderr``, or a file path (appended to; reopened if rotated away)."""
        self.destination = destination
        handler: logging.Handler
        if destination == "stderr":
            handler = logging.StreamHandler(sys.stderr)
        else:
            handler = logging.handlers.WatchedFileHandler(destination, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._handler = handler
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._listener = _Entries(self._queue, handler)  # type: ignore[arg-type]
        self._running = False
        #: entries dropped because the writer fell ``MAX_PENDING`` behind
        self.dropped = 0

    def start(self) -> None:
        if not self._running:
            self._listener.start()
            self._running = True

    def stop(self) -> None:
        """Writes what is queued, then ends the thread."""
        if self._running:
            self._running = False
            self._listener.stop()
            self._handler.close()

    def write(self, entry: dict[str, Any]) -> None:
        if self._queue.qsize() >= MAX_PENDING:
            self.dropped += 1
            return
        self._queue.put(entry)


def access_log_from(setting: str) -> AccessLog | None:
    """``INTERLOCK_ACCESS_LOG``: ``off`` (None), ``stderr``, or a file path."""
    return None if setting == "off" else AccessLog(setting)
