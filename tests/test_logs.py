"""Logging: structlog events and the logging module's records, rendered and redacted alike."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog
from apscheduler.events import EVENT_JOB_ERROR, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler

from reaper import logs
from reaper.logs import configure_logging, register_secret, reset_logging

SECRET = "tok-5f3a9c1e77"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(autouse=True)
def _no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test registers its own secrets."""
    monkeypatch.setattr(logs, "_SECRETS", set())


class TtyStream(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


class TestStandardLoggingRecords:
    def test_scheduler_error_is_json_and_redacted(self) -> None:
        """An APScheduler-style error with the secret as a %-argument is a JSON line, redacted."""
        stream = io.StringIO()
        register_secret(SECRET)
        configure_logging("json", "info", stream)
        logging.getLogger("apscheduler.scheduler").error("Job failed: token=%s", SECRET)
        [line] = json_lines(stream)
        assert line["event"] == "Job failed: token=***"
        assert line["level"] == "error"
        assert line["logger"] == "apscheduler.scheduler"
        assert datetime.fromisoformat(line["timestamp"]).utcoffset() is not None
        assert SECRET not in stream.getvalue()

    def test_same_stream_and_shape_as_structlog(self) -> None:
        """structlog events and Alembic's info lines interleave as JSON lines on one stream."""
        stream = io.StringIO()
        register_secret(SECRET)
        configure_logging("json", "info", stream)
        structlog.get_logger("reaper.runner").info("policy_run_started", token=SECRET)
        logging.getLogger("alembic.runtime.migration").info(
            "Running upgrade %s -> %s, %s", "", "0001", "audit tables"
        )
        logging.getLogger("apscheduler.scheduler").error("Job failed: %s", SECRET)
        structlog.get_logger("reaper.runner").info("policy_run_finished", deleted=3)
        lines = json_lines(stream)
        assert [(line["event"], line["level"]) for line in lines] == [
            ("policy_run_started", "info"),
            ("Running upgrade  -> 0001, audit tables", "info"),
            ("Job failed: ***", "error"),
            ("policy_run_finished", "info"),
        ]
        assert lines[0]["token"] == "***"
        assert lines[1]["logger"] == "alembic.runtime.migration"
        assert lines[3]["deleted"] == 3
        assert all("timestamp" in line for line in lines)
        assert SECRET not in stream.getvalue()

    def test_foreign_traceback_is_redacted(self) -> None:
        """A logged exception's traceback is a field of the JSON line, with secrets redacted."""
        stream = io.StringIO()
        register_secret(SECRET)
        configure_logging("json", "info", stream)
        try:
            raise RuntimeError(f"401 for token {SECRET}")
        except RuntimeError:
            logging.getLogger("apscheduler.executors.default").exception("Job raised")
        [line] = json_lines(stream)
        assert line["event"] == "Job raised"
        assert line["level"] == "error"
        assert line["exception"].startswith("Traceback (most recent call last):")
        assert line["exception"].endswith("RuntimeError: 401 for token ***")
        assert SECRET not in stream.getvalue()

    def test_a_real_scheduler_job_error(self) -> None:
        """A job that raises inside a real APScheduler is logged as one redacted JSON line."""
        stream = io.StringIO()
        register_secret(SECRET)
        configure_logging("json", "info", stream)
        failed = threading.Event()

        def job() -> None:
            raise RuntimeError(f"token {SECRET} refused")

        def on_error(event: JobExecutionEvent) -> None:
            failed.set()

        scheduler = BackgroundScheduler(timezone=UTC)
        scheduler.add_listener(on_error, EVENT_JOB_ERROR)
        scheduler.add_job(job, "date", run_date=datetime.now(UTC), id="boom", name="boom")
        scheduler.start()
        try:
            assert failed.wait(60)
        finally:
            scheduler.shutdown(wait=True)
        lines = json_lines(stream)
        [error] = [line for line in lines if line["level"] == "error"]
        assert error["logger"] == "apscheduler.executors.default"
        assert error["event"].startswith('Job "boom')
        assert error["exception"].endswith("RuntimeError: token *** refused")
        assert SECRET not in stream.getvalue()

    def test_console_on_a_tty(self) -> None:
        """On a terminal both kinds of line are console lines (not JSON), redacted alike."""
        stream = TtyStream()
        register_secret(SECRET)
        configure_logging("auto", "info", stream)
        structlog.get_logger("reaper.runner").info("policy_run_started", token=SECRET)
        logging.getLogger("apscheduler.scheduler").error("Job failed: %s", SECRET)
        text = ANSI.sub("", stream.getvalue())
        first, second = text.splitlines()
        for line in (first, second):
            with pytest.raises(ValueError):
                json.loads(line)
        assert re.fullmatch(r"\S+Z \[info\s*\] policy_run_started\s+token=\*\*\*", first)
        assert re.fullmatch(
            r"\S+Z \[error\s*\] Job failed: \*\*\*\s+\[apscheduler.scheduler\]", second
        )
        assert "\x1b[" in stream.getvalue()  # colours on a terminal
        assert SECRET not in stream.getvalue()

    def test_auto_is_json_off_a_tty(self) -> None:
        """``auto`` writes JSON to a stream that is not a terminal (a pipe, journald)."""
        stream = io.StringIO()
        configure_logging("auto", "info", stream)
        logging.getLogger("alembic.runtime.migration").info("Will assume transactional DDL.")
        assert json_lines(stream)[0]["event"] == "Will assume transactional DDL."


class TestLevels:
    def test_level_applies_to_both(self) -> None:
        """Below the configured level, neither structlog nor logging lines are written."""
        stream = io.StringIO()
        configure_logging("json", "warning", stream)
        structlog.get_logger("reaper.runner").info("quiet")
        logging.getLogger("apscheduler.scheduler").info("quiet too")
        logging.getLogger("apscheduler.scheduler").warning("loud")
        structlog.get_logger("reaper.runner").warning("loud too")
        assert [line["event"] for line in json_lines(stream)] == ["loud", "loud too"]

    def test_http_request_lines_only_when_debugging(self) -> None:
        """httpx's one-line-per-request INFO is left out at info, shown at debug."""
        stream = io.StringIO()
        configure_logging("json", "info", stream)
        logging.getLogger("httpx").info("HTTP Request: GET http://127.0.0.1/ 200 OK")
        logging.getLogger("httpx").warning("something odd")
        assert [line["event"] for line in json_lines(stream)] == ["something odd"]
        stream = io.StringIO()
        configure_logging("json", "debug", stream)
        logging.getLogger("httpx").info("HTTP Request: GET http://127.0.0.1/ 200 OK")
        assert [line["event"] for line in json_lines(stream)] == [
            "HTTP Request: GET http://127.0.0.1/ 200 OK"
        ]


class TestConfiguration:
    def test_reconfiguring_replaces_the_handler(self) -> None:
        """Configuring twice writes each line once, to the newest stream only."""
        old, new = io.StringIO(), io.StringIO()
        configure_logging("json", "info", old)
        configure_logging("json", "info", new)
        logging.getLogger("apscheduler.scheduler").error("once")
        structlog.get_logger("reaper.runner").error("once too")
        assert old.getvalue() == ""
        assert [line["event"] for line in json_lines(new)] == ["once", "once too"]

    def test_reset_removes_the_handler(self) -> None:
        """After reset_logging nothing of ours is left on the root logger."""
        before = list(logging.getLogger().handlers)
        stream = io.StringIO()
        configure_logging("json", "info", stream)
        assert len(logging.getLogger().handlers) == len(before) + 1
        reset_logging()
        assert logging.getLogger().handlers == before
        logging.getLogger("apscheduler.scheduler").error("nowhere")
        assert stream.getvalue() == ""


class TestRedaction:
    def test_nested_fields(self) -> None:
        """Secrets are replaced inside strings, lists, dicts and exceptions alike."""
        stream = io.StringIO()
        register_secret(SECRET)
        configure_logging("json", "info", stream)
        structlog.get_logger("reaper.http").warning(
            "request_failed",
            url=f"http://h/task?token={SECRET}",
            headers={"X-Auth-Token": SECRET},
            ids=[SECRET, "task_1"],
            error=ValueError(f"bad {SECRET}"),
        )
        [line] = json_lines(stream)
        assert line["url"] == "http://h/task?token=***"
        assert line["headers"] == {"X-Auth-Token": "***"}
        assert line["ids"] == ["***", "task_1"]
        assert line["error"] == "bad ***"

    def test_short_values_are_not_registered(self) -> None:
        """Values under four characters would redact ordinary words; they are not registered."""
        stream = io.StringIO()
        register_secret("abc")
        register_secret(None)
        configure_logging("json", "info", stream)
        logging.getLogger("apscheduler.scheduler").error("abc")
        assert json_lines(stream)[0]["event"] == "abc"


class TestAlembicRevisionReads:
    """Reading the revision (every command does) holds back Alembic's two INFO lines; a
    migration's lines show; concurrent reads leave the logger as it was."""

    def test_a_read_is_quiet_and_a_migration_is_not(self, tmp_path: Any) -> None:
        from reaper.db import current_revision, make_engine, upgrade

        stream = io.StringIO()
        configure_logging("json", "info", stream)
        engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
        try:
            assert current_revision(engine) is None
            assert stream.getvalue() == ""
            upgrade(engine)
            events = [line["event"] for line in json_lines(stream)]
            assert any(event.startswith("Running upgrade  -> 0001") for event in events)
            before = len(stream.getvalue())
            current_revision(engine)
            assert len(stream.getvalue()) == before
        finally:
            engine.dispose()

    def test_reads_in_many_threads_leave_the_logger_alone(self, tmp_path: Any) -> None:
        """Policies running at once read revisions in several threads: afterwards the logger's
        level is what it was and its INFO lines show (a level saved and restored per thread
        was once left at WARNING)."""
        from reaper.db import current_revision, make_engine

        logger = logging.getLogger("alembic.runtime.migration")
        level = logger.level
        engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
        barrier = threading.Barrier(8)

        def read() -> None:
            barrier.wait()
            for _ in range(20):
                current_revision(engine)

        threads = [threading.Thread(target=read) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        engine.dispose()
        assert logger.level == level
        stream = io.StringIO()
        configure_logging("json", "info", stream)
        logger.info("Running upgrade %s -> %s, %s", "0008", "0009", "people")
        assert [line["event"] for line in json_lines(stream)] == [
            "Running upgrade 0008 -> 0009, people"
        ]
