"""`reaper audit` output: json and csv return every matching row unless --limit; the table keeps
a default and says on stderr how many rows it left out. Rows are read as a stream."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from conftest import EMPTY_POLICY_HASH
from test_cli import reaper

from reaper.audit import AuditEntry, AuditStore, RunRecord, audit_table
from reaper.db import make_engine, upgrade
from reaper.targets.base import Outcome

#: More rows than the table's default of 100 and than a pipe's buffer holds as JSON.
ROWS = 250
PER_RUN = 125


def fill(store: AuditStore, policy: str, count: int, *, start: int = 0) -> None:
    """``count`` dry-run rows of ``policy`` in runs of PER_RUN rows."""
    for first in range(start, start + count, PER_RUN):
        run_id = store.start_run(
            RunRecord(policy, EMPTY_POLICY_HASH, "{}", "data_pipeline", "http://t", "dry_run")
        )
        store.record(
            run_id,
            [
                AuditEntry(
                    f"task_{i:06d}",
                    "older than 30d",
                    "completed",
                    datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=i),
                    Outcome.DRY_RUN,
                )
                for i in range(first, min(first + PER_RUN, start + count))
            ],
        )


def count(url: str, policy: str | None = None) -> int:
    """The number of audit rows, asked of the database directly."""
    query = sa.select(sa.func.count()).select_from(audit_table)
    if policy is not None:
        query = query.where(audit_table.c.policy == policy)
    engine = make_engine(url)
    with engine.connect() as connection:
        total = connection.execute(query).scalar_one()
    engine.dispose()
    return int(total)


@pytest.fixture
def filled(database_url: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A database with ROWS rows of policy 'big' and 3 of policy 'small'."""
    engine = make_engine(database_url)
    upgrade(engine)
    store = AuditStore(engine)
    fill(store, "big", ROWS)
    fill(store, "small", 3)
    engine.dispose()
    yield {"url": database_url, "env": {"REAPER_DATABASE_URL": database_url}}


class TestMachineReadableOutput:
    def test_json_returns_every_row(self, filled: dict[str, Any]) -> None:
        """--output json returns all matching rows (not the table's 100), newest first."""
        result = reaper("audit", "--output", "json", env=filled["env"])
        assert result.returncode == 0, result.stderr
        rows = json.loads(result.stdout)
        assert len(rows) == count(filled["url"]) == ROWS + 3
        assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)
        assert result.stderr == ""

    def test_json_with_a_filter(self, filled: dict[str, Any]) -> None:
        """Filters apply to the full stream: every row of one policy, no other."""
        result = reaper("audit", "--policy", "big", "--output", "json", env=filled["env"])
        rows = json.loads(result.stdout)
        assert len(rows) == count(filled["url"], "big") == ROWS
        assert {r["policy"] for r in rows} == {"big"}

    def test_csv_returns_every_row(self, filled: dict[str, Any]) -> None:
        """--output csv returns a header and all matching rows."""
        result = reaper("audit", "--output", "csv", env=filled["env"])
        assert result.returncode == 0, result.stderr
        rows = list(csv.DictReader(io.StringIO(result.stdout)))
        assert len(rows) == ROWS + 3
        assert {r["task_id"] for r in rows if r["policy"] == "big"} == {
            f"task_{i:06d}" for i in range(ROWS)
        }

    @pytest.mark.parametrize("output", ["json", "csv"])
    def test_limit_still_limits(self, output: str, filled: dict[str, Any]) -> None:
        """An explicit --limit returns that many rows, the newest."""
        result = reaper("audit", "--output", output, "--limit", "7", env=filled["env"])
        assert result.returncode == 0, result.stderr
        if output == "json":
            rows = json.loads(result.stdout)
        else:
            rows = list(csv.DictReader(io.StringIO(result.stdout)))
        assert len(rows) == 7
        assert [r["policy"] for r in rows[:3]] == ["small"] * 3

    def test_no_match_is_an_empty_array(self, filled: dict[str, Any]) -> None:
        """No matching row: `[]` for json, only the header for csv."""
        env = filled["env"]
        assert (
            json.loads(reaper("audit", "--policy", "none", "--output", "json", env=env).stdout)
            == []
        )
        header = reaper("audit", "--policy", "none", "--output", "csv", env=env).stdout
        assert header.splitlines() == [",".join(c.name for c in audit_table.columns)]

    def test_an_unknown_outcome_is_a_usage_error(self, filled: dict[str, Any]) -> None:
        """A misspelt --outcome is refused (exit 2, naming the outcomes), not an empty answer
        that reads as "no such rows"."""
        result = reaper("audit", "--outcome", "delted", "--output", "json", env=filled["env"])
        assert result.returncode == 2 and result.stdout == ""
        assert "'deleted'" in result.stderr and "'skipped_changed'" in result.stderr

    def test_a_reader_that_stops_early_gets_no_traceback(self, filled: dict[str, Any]) -> None:
        """`reaper audit --output json | head -c 100`: reaper exits quietly with code 1."""
        with subprocess.Popen(
            [sys.executable, "-m", "reaper", "audit", "--output", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**_base_env(), **filled["env"]},
        ) as process:
            assert process.stdout is not None and process.stderr is not None
            assert process.stdout.read(100).startswith(b"[\n  {")
            process.stdout.close()
            stderr = process.stderr.read().decode()
            assert process.wait(timeout=120) == 1
        assert "Traceback" not in stderr and "BrokenPipe" not in stderr


class TestTable:
    def test_table_says_what_it_left_out(self, filled: dict[str, Any]) -> None:
        """The table shows 100 rows by default and says on stderr how many more matched."""
        result = reaper("audit", env=filled["env"])
        assert result.returncode == 0, result.stderr
        total = count(filled["url"])
        assert f"showing the newest 100 of {total} matching rows" in result.stderr
        assert f"{total - 100} left out" in result.stderr
        assert sum("task_0" in line for line in result.stdout.splitlines()) == 100

    def test_table_says_nothing_when_all_fit(self, filled: dict[str, Any]) -> None:
        """All matching rows shown: no note on stderr."""
        result = reaper("audit", "--policy", "small", env=filled["env"])
        assert result.returncode == 0, result.stderr
        assert "left out" not in result.stderr
        assert sum("task_0" in line for line in result.stdout.splitlines()) == 3


class TestStreamRows:
    def test_stream_is_every_row_newest_first(self, store: AuditStore) -> None:
        """stream_rows yields every matching row, newest first, across many fetch chunks."""
        fill(store, "big", ROWS)
        streamed = list(store.stream_rows(chunk=16))
        assert [r.id for r in streamed] == sorted((r.id for r in streamed), reverse=True)
        assert {r.task_id for r in streamed} == {f"task_{i:06d}" for i in range(ROWS)}
        assert streamed == store.rows(limit=None)

    def test_stream_is_lazy(self, store: AuditStore) -> None:
        """Rows come from the database as they are taken: after the first few, the driver's
        cursor still holds the rest (a server-side cursor on PostgreSQL)."""
        fill(store, "big", ROWS)
        cursors: list[Any] = []
        sa.event.listen(
            store.engine, "before_cursor_execute", lambda _c, cursor, *_: cursors.append(cursor)
        )
        stream = store.stream_rows(chunk=10)
        first = [next(stream) for _ in range(3)]
        assert [r.task_id for r in first] == [f"task_{ROWS - 1 - i:06d}" for i in range(3)]
        [cursor] = cursors
        if store.engine.dialect.name == "postgresql":
            assert isinstance(cursor, psycopg.ServerCursor)
        assert cursor.fetchone() is not None
        stream.close()

    def test_filters_and_counts(self, store: AuditStore) -> None:
        """The filters of stream_rows and count_rows agree."""
        fill(store, "big", ROWS)
        fill(store, "small", 3)
        assert store.count_rows() == ROWS + 3
        assert store.count_rows(policy="small") == 3
        assert len(list(store.stream_rows(policy="big"))) == ROWS
        assert len(list(store.stream_rows(policy="big", limit=5))) == 5
        assert store.count_rows(task_id="task_000001") == 2


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("REAPER_")}
