"""The access log's writer and line, without a gateway: what is queued, dropped and written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway import access_log
from gateway.access_log import AccessLog, Entry, line


def entry(request_id: str, tail: bytes = b"") -> Entry:
    fields = dict.fromkeys(Entry._fields)
    return Entry(
        **{
            **fields,
            "time": 0.0,
            "request_id": request_id,
            "route": "chat",
            "backend": "a",
            "attempts": 1,
            "status": 200,
            "stream": False,
            "stream_error": False,
            "duration_s": 0.0123456,
            "cost_usd": 1.23456789e-9,
            "disconnect": "none",
            "tail": tail,
        }
    )


def test_lines_past_the_pending_bound_are_dropped_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(access_log, "MAX_PENDING", 3)
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    for n in range(5):  # the writer is not running: nothing is taken off the queue
        log.write(entry(f"req-{n}"))
    assert log.dropped == 2
    log.start()
    log.stop()  # writes what is queued
    lines = [json.loads(text) for text in path.read_text().splitlines()]
    assert [line["request_id"] for line in lines] == ["req-0", "req-1", "req-2"]
    assert lines[0]["duration_ms"] == 12.345 and lines[0]["cost_usd"] == 0.0
    assert lines[0]["time"] == "1970-01-01T00:00:00.000Z"


def test_an_entry_that_cannot_be_formatted_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.start()
    log.write(entry("bad")._replace(time="not a time"))  # type: ignore[arg-type]
    log.write(entry("good"))
    log.stop()
    assert "an entry could not be written" in caplog.text
    assert [json.loads(text)["request_id"] for text in path.read_text().splitlines()] == ["good"]


def test_cached_tokens_are_the_last_count_of_the_last_usage() -> None:
    usage = b'"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":%d}}}\n\n'
    stream = b"data: {" + usage % 3 + b"data: {" + usage % 8 + b"data: [DONE]\n\n"
    assert json.loads(line(entry("s", stream)))["cached_tokens"] == 8
    # no "usage" key in what was kept (the tail began inside it): the count is still found
    assert json.loads(line(entry("t", b'"cached_tokens": 5}}}')))["cached_tokens"] == 5
    assert json.loads(line(entry("u", b'{"usage":{"prompt_tokens":9}}')))["cached_tokens"] is None
