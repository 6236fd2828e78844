"""The terminal during `reaper run`: log lines print above the progress bar, never through it, and
stdout carries only the command's output.

What a person sees is read from pyte, a VT100 terminal emulator fed every byte written to the
terminal (cursor moves and line erasures included), not from the bytes themselves.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyte
import pytest
import structlog
import yaml
from conftest import NOW, policy_doc, sim_task
from rich.console import Console
from test_clocks import policy
from test_plan import target_for

from reaper.audit import RunSummary
from reaper.db import make_engine, upgrade
from reaper.execute import BatchEvent
from reaper.logs import configure_logging
from reaper.plan import Planner
from reaper.progress import BatchReporter
from reaper.simulators import DataPipelineSimulator, Faults
from reaper.targets.base import Task

Start = Callable[..., tuple[DataPipelineSimulator, str]]

COLUMNS, LINES = 400, 60
#: How the console renderer starts a line: an ISO-8601 UTC timestamp, then the level.
LOG_LINE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d+Z \[(info|warning|error)\s*\] ")
BAR = "━"


class Terminal(io.TextIOBase):
    """A terminal on stderr: a pyte screen with scroll-back, fed whatever is written."""

    def __init__(self) -> None:
        self.screen = pyte.HistoryScreen(COLUMNS, LINES, history=10_000)
        self.stream = pyte.Stream(self.screen)

    def write(self, text: str) -> int:
        # A terminal's line discipline turns "\n" into "\r\n" (termios ONLCR).
        self.stream.feed(text.replace("\n", "\r\n"))
        return len(text)

    def isatty(self) -> bool:
        return True

    def lines(self) -> list[str]:
        """Every line shown, scrolled-off ones first, without trailing blanks."""
        return shown(self.screen)


def shown(screen: pyte.HistoryScreen) -> list[str]:
    columns = screen.columns
    rows = [*screen.history.top, *(screen.buffer[y] for y in range(screen.lines))]
    text = ["".join(row[x].data for x in range(columns)).rstrip() for row in rows]
    while text and not text[-1]:
        text.pop()
    return text


def assert_whole(lines: list[str], events: list[str]) -> None:
    """Each event (a pattern: its name, maybe fields) is logged once, on a line of its own that
    starts like a log line; no line mixes the bar with anything else."""
    for event in events:
        found = [line for line in lines if re.search(rf"\] {event}(\s|$)", line)]
        assert len(found) == 1, (event, lines)
        assert LOG_LINE.match(found[0]), found[0]
    for line in lines:
        if BAR in line:
            assert not LOG_LINE.search(line) and "[info" not in line, line


def on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> Terminal:
    """Make sys.stderr a terminal, and set up logging for it as the CLI does (called in the
    test itself: pytest puts its own capture back on sys.stderr when a test starts)."""
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    configure_logging("console", "info")
    return term


class TestLogLinesAboveTheBar:
    """In-process: the CLI's progress reporter on a console that writes to the terminal."""

    def test_a_log_line_during_the_bar_gets_a_line_of_its_own(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Lines logged while the bar is drawn print whole above it; the bar stays one line."""
        terminal = on_a_terminal(monkeypatch)
        planner = Planner(policy("http://127.0.0.1:8084"), target_for(policy("http://x")), NOW)
        for n in range(40):
            planner.add(Task(f"task_20260901_{n:06d}", "completed", NOW - timedelta(days=40)))
        plan = planner.finish()
        console = Console(stderr=True, soft_wrap=True, width=COLUMNS, force_terminal=True)
        reporter = BatchReporter(console)
        reporter.plan(plan)
        assert reporter.bars.progress is not None
        log = structlog.get_logger("reaper.test")
        summary = RunSummary()
        for batch in range(4):
            reporter.batch(BatchEvent(batch + 1, 10, [], summary, 40))
            log.info("batch_logged", batch=batch + 1)
            if batch == 1:
                log.warning("something_odd", detail="while the bar is drawn")
        reporter.bars.progress.refresh()
        during = terminal.lines()
        assert_whole(
            during, [r"batch_logged\s+batch=1", r"batch_logged\s+batch=4", "something_odd"]
        )
        # The bar is drawn once, below the last log line, and whole.
        bars = [line for line in during if BAR in line]
        assert len(bars) == 1
        assert during[-1] == bars[0]
        assert "test-policy" in bars[0] and "40/40" in bars[0]
        reporter.close()
        after = terminal.lines()
        assert not any(BAR in line for line in after)  # transient: gone when done
        assert sum(bool(LOG_LINE.match(line)) for line in after) == 5


# --- the real command on a pseudo-terminal ----------------------------------------------------


def run_on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[str, list[str], int]:
    """Run reaper with stderr on a pseudo-terminal and stdout on a pipe: (stdout, the lines the
    terminal shows at the end, exit code)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
    base = {k: v for k, v in os.environ.items() if not k.startswith("REAPER_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "reaper", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env={**base, "TERM": "xterm-256color", "COLUMNS": str(COLUMNS), **env},
    )
    os.close(slave)
    screen = pyte.HistoryScreen(COLUMNS, LINES, history=10_000)
    stream = pyte.ByteStream(screen)
    stdout = b""
    assert process.stdout is not None
    readers = {master, process.stdout.fileno()}
    while readers:
        ready, _, _ = select.select(list(readers), [], [], 60)
        assert ready, "reaper wrote nothing for 60 s"
        for fd in ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the terminal's other end closed (EIO on Linux)
                chunk = b""
            if not chunk:
                readers.discard(fd)
            elif fd == master:
                stream.feed(chunk)
            else:
                stdout += chunk
    os.close(master)
    process.stdout.close()
    code = process.wait(timeout=60)
    return stdout.decode(), shown(screen), code


class TestTheCommand:
    """`reaper run` as a person runs it: stderr a terminal (the bar), stdout piped (JSON)."""

    def test_log_lines_stay_whole_and_stdout_is_only_json(
        self, data_pipeline: Start, tmp_path: Path
    ) -> None:
        """200 deletions in 20 batches with log lines meanwhile: every line whole, no remnant
        of the bar, stdout one JSON document."""
        now = datetime.now(UTC)  # the command runs at the real time
        tasks = [
            sim_task(f"task_20260901_{i:06d}", age=timedelta(days=40, minutes=i), now=now)
            for i in range(200)
        ]
        sim, url = data_pipeline(tasks, faults=Faults(latency_ms=10))
        doc = policy_doc(url, delete={"batch_size": 10, "rate": "100/s", "concurrency": 2})
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
        database = f"sqlite:///{tmp_path / 'audit.db'}"
        engine = make_engine(database)
        upgrade(engine)  # set up beforehand: Alembic's lines quote migration docstrings
        engine.dispose()
        env = {
            "REAPER_DATABASE_URL": database,
            "REAPER_POLICIES": str(tmp_path / "p.yaml"),
            "REAPER_LOG_FORMAT": "console",
        }
        stdout, lines, code = run_on_a_terminal(["run", "--output", "json"], env)
        assert code == 0, "\n".join(lines)
        [document] = json.loads(stdout)
        assert document["status"] == "succeeded"
        assert document["deleted"] == 200 == len(sim.deleted_ids)
        assert_whole(lines, ["run_started", "plan_ready", "deleting", "run_finished"])
        assert not any(BAR in line for line in lines), lines
        for line in lines:
            assert not line or LOG_LINE.match(line), line
