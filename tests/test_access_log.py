"""The access log's writer and line, without a gateway: what is queued, dropped and written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway import access_log
from gateway.access_log import AccessLog, Entry, line
from tests.fakes import wait_for


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
        log.write(tuple(entry(f"req-{n}")))
    assert log.dropped == 2
    log.start()
    log.stop()  # writes what is queued
    lines = [json.loads(text) for text in path.read_text().splitlines()]
    assert [line["request_id"] for line in lines] == ["req-0", "req-1", "req-2"]
    assert lines[0]["duration_ms"] == 12.345 and lines[0]["cost_usd"] == 0.0
    assert lines[0]["time"] == "1970-01-01T00:00:00.000Z"


def test_an_entry_that_cannot_be_formatted_is_reported_and_the_rest_are_written(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.start()
    log.write(tuple(entry("bad")._replace(time="not a time")))  # the writer cannot format it
    log.write((object(),))  # nor can it be sent
    log.write(entry("named"))  # a named tuple takes the slow path
    log.write(tuple(entry("good")))
    log.stop()
    assert "an entry could not be written" in capfd.readouterr().err  # the writer's stderr
    assert "1 entries could not be written" in caplog.text and log.dropped == 1
    lines = path.read_text().splitlines()
    assert [json.loads(text)["request_id"] for text in lines] == ["named", "good"]


def test_the_writer_reopens_a_file_that_was_moved_and_is_started_anew_if_it_dies(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.start()
    log.write(tuple(entry("before")))
    wait_for(lambda: path.exists() and path.read_text().count("\n") == 1)
    path.rename(tmp_path / "access.log.1")  # logrotate
    log.write(tuple(entry("after")))
    wait_for(lambda: path.exists() and path.read_text().count("\n") == 1)
    writer = log._writer
    assert writer is not None
    writer.kill()
    writer.wait()
    log.write(tuple(entry("lost-or-written")))  # sent into the dead pipe, or to a new writer
    log.write(tuple(entry("again")))
    wait_for(lambda: '"again"' in path.read_text())
    log.stop()
    assert log._writer is None and writer.returncode is not None
    assert json.loads((tmp_path / "access.log.1").read_text())["request_id"] == "before"
    assert json.loads(path.read_text().splitlines()[0])["request_id"] == "after"


def test_cached_tokens_are_the_last_count_of_the_last_usage() -> None:
    usage = b'"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":%d}}}\n\n'
    stream = b"data: {" + usage % 3 + b"data: {" + usage % 8 + b"data: [DONE]\n\n"
    assert json.loads(line(entry("s", stream)))["cached_tokens"] == 8
    # no "usage" key in what was kept (the tail began inside it): the count is still found
    assert json.loads(line(entry("t", b'"cached_tokens": 5}}}')))["cached_tokens"] == 5
    assert json.loads(line(entry("u", b'{"usage":{"prompt_tokens":9}}')))["cached_tokens"] is None


def test_a_relative_path_is_the_gateways_whatever_its_working_directory_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "gateway").mkdir()  # a package that would shadow this one for ``python -m``
    (tmp_path / "gateway" / "__init__.py").write_text("")
    (tmp_path / "gateway" / "access_log_writer.py").write_text("raise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    log = AccessLog("access.log")
    log.start()
    log.write(tuple(entry("here")))
    log.stop()
    assert json.loads((tmp_path / "access.log").read_text())["request_id"] == "here"
