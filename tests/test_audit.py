"""The audit database: migrations, UTC round trips, batched writes, queries (SQLite and PG)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import EMPTY_POLICY_HASH
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect

from reaper.audit import (
    AuditEntry,
    AuditStore,
    RunRecord,
    RunSummary,
    metadata,
    runs_table,
    sqlite_datetime,
)
from reaper.db import (
    UTCDateTime,
    current_revision,
    head_revision,
    make_engine,
    require_current_schema,
    upgrade,
)
from reaper.errors import AuditError
from reaper.inventory import inventory_table
from reaper.leases import leases_table, replicas_table
from reaper.reconcile import Reconciler
from reaper.targets.base import DeleteResult, Outcome, Task

RECORD = RunRecord("p", EMPTY_POLICY_HASH, "{}", "data_pipeline", "http://t", "run")


class TestMigrations:
    def test_upgrade_is_idempotent(self, database_url: str) -> None:
        """`db upgrade` from empty reaches head; a second one changes nothing."""
        engine = make_engine(database_url)
        assert current_revision(engine) is None
        assert upgrade(engine) == (None, head_revision())
        assert upgrade(engine) == (head_revision(), head_revision())
        engine.dispose()

    def test_migrations_match_the_models(self, database_url: str) -> None:
        """The migrated schema is exactly the declared tables (no drift between the two)."""
        engine = make_engine(database_url)
        upgrade(engine)
        # The inventory's and the leases' tables are declared there too.
        assert inventory_table.metadata is leases_table.metadata is metadata
        assert replicas_table.metadata is metadata
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), metadata) == []
        engine.dispose()

    def test_unmigrated_database_is_refused(self, database_url: str) -> None:
        """A database that is not at head is an AuditError telling what to run."""
        engine = make_engine(database_url)
        with pytest.raises(AuditError, match="reaper db upgrade"):
            require_current_schema(engine)
        engine.dispose()

    def test_unreachable_database(self) -> None:
        """An unreachable PostgreSQL is an AuditError without the password in it."""
        engine = make_engine("postgresql://reaper:s3cret-pw@127.0.0.1:9/reaper")
        with pytest.raises(AuditError) as info:
            require_current_schema(engine)
        assert "s3cret-pw" not in str(info.value)
        assert "***" in str(info.value)


class TestWrites:
    def test_intent_then_outcome(self, store: AuditStore) -> None:
        """Pending rows become their outcomes; only pending rows of this run are updated."""
        run_id = store.start_run(RECORD)
        stamp = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
        store.record(
            run_id,
            [AuditEntry(f"task_{i}", "old", "completed", stamp) for i in range(3)],
        )
        store.resolve(
            run_id,
            [
                DeleteResult("task_0", Outcome.DELETED, 200, reclaimed_bytes=10, files_count=2),
                DeleteResult("task_1", Outcome.FAILED, 200, "DELETE_FAILED", "disk busy"),
                DeleteResult("task_2", Outcome.ALREADY_GONE, 200, note="directory_deleted: false"),
            ],
        )
        rows = {row.task_id: row for row in store.rows(run_id=run_id)}
        assert rows["task_0"].outcome == "deleted"
        assert rows["task_0"].reclaimed_bytes == 10
        assert rows["task_1"].error_code == "DELETE_FAILED"
        assert rows["task_1"].error_message == "disk busy"
        assert rows["task_2"].outcome == "already_gone"
        assert [rows[f"task_{i}"].seq for i in range(3)] == [1, 2, 3]
        assert all(row.decided_at is not None for row in rows.values())

    def test_timestamps_round_trip_as_aware_utc(self, store: AuditStore) -> None:
        """Aware datetimes in any zone come back as the same instant in UTC."""
        from zoneinfo import ZoneInfo

        run_id = store.start_run(RECORD)
        stamp = datetime(2026, 3, 29, 2, 30, tzinfo=ZoneInfo("Asia/Shanghai"))
        store.record(run_id, [AuditEntry("t", "r", "completed", stamp, Outcome.DRY_RUN)])
        [row] = store.rows(run_id=run_id)
        assert row.task_timestamp == stamp
        assert row.task_timestamp is not None and row.task_timestamp.tzinfo is UTC
        assert row.recorded_at.tzinfo is UTC

    def test_naive_datetimes_are_refused(self, store: AuditStore) -> None:
        """A naive datetime never reaches the audit database."""
        run_id = store.start_run(RECORD)
        with pytest.raises((AuditError, ValueError)):
            store.record(run_id, [AuditEntry("t", "r", None, datetime(2026, 1, 1))])  # noqa: DTZ001

    def test_finish_run_stores_counts(self, store: AuditStore) -> None:
        """A finished run carries its status, counts and error."""
        run_id = store.start_run(RECORD)
        summary = RunSummary(listed=10, eligible=4, deleted=3, failed=1, reclaimed_bytes=99)
        store.finish_run(run_id, "partial", summary, "one failed")
        with store.engine.connect() as connection:
            row = connection.execute(select(runs_table)).mappings().one()
        assert (row["status"], row["listed"], row["deleted"], row["failed"]) == (
            "partial",
            10,
            3,
            1,
        )
        assert row["reclaimed_bytes"] == 99
        assert row["error"] == "one failed"
        assert row["finished_at"] >= row["started_at"]

    def test_a_task_is_recorded_once_per_run(self, store: AuditStore) -> None:
        """The same task twice in one run is refused by the database (and is an AuditError)."""
        run_id = store.start_run(RECORD)
        store.record(run_id, [AuditEntry("t", "r", None, None)])
        with pytest.raises(AuditError):
            store.record(run_id, [AuditEntry("t", "r", None, None)])


class TestQueries:
    def test_filters(self, store: AuditStore) -> None:
        """rows() filters by policy, task, outcome and time, newest first."""
        run_id = store.start_run(RECORD)
        store.record(
            run_id,
            [AuditEntry(f"t{i}", "r", None, None, Outcome.DRY_RUN) for i in range(5)],
        )
        assert [r.task_id for r in store.rows()] == ["t4", "t3", "t2", "t1", "t0"]
        assert [r.task_id for r in store.rows(task_id="t2")] == ["t2"]
        assert store.rows(policy="other") == []
        assert len(store.rows(outcome="dry_run", limit=2)) == 2
        future = datetime.now(UTC) + timedelta(hours=1)
        assert store.rows(since=future) == []

    def test_contradicted_deletions(self, store: AuditStore) -> None:
        """A correction of an acknowledged deletion, and an unknown row (a 504) a listing then
        settled not_deleted, are deletions of ours that may have been carried out; a pending row
        settled so (perhaps never sent) is not, nor one deleted again since."""
        run_id = store.start_run(RECORD)
        store.record(run_id, [AuditEntry(t, "r", "completed", None) for t in "abcd"])
        store.resolve(
            run_id,
            [
                DeleteResult("a", Outcome.DELETED, 200),
                DeleteResult("b", Outcome.UNKNOWN, 504, error_message="HTTP 504"),
                DeleteResult("d", Outcome.DELETED, 200),
            ],
        )
        listing = [Task(t, "completed", None) for t in "abc"]  # d is gone
        reconciler = Reconciler("p", store.unresolved("p"), store.acknowledged("p"))
        for task in listing:
            reconciler.observe(task)
        report = reconciler.apply(store, RECORD)
        assert (report.not_deleted, report.acknowledged_not_deleted) == (2, 1)
        rows = {r.task_id: r for r in store.rows(run_id=run_id)}
        assert (rows["b"].outcome, rows["b"].http_status) == ("not_deleted", 504)
        assert store.contradicted("p") == {"a", "b"}
        later = store.start_run(RECORD)
        store.record(later, [AuditEntry("a", "r", "completed", None)])
        store.resolve(later, [DeleteResult("a", Outcome.DELETED, 200)])
        assert store.contradicted("p") == {"b"}
        assert store.contradicted("other") == set()


_AWARE_DATETIMES = st.datetimes(
    min_value=datetime(1, 1, 2),  # noqa: DTZ001 - hypothesis bounds are naive
    max_value=datetime(9999, 12, 30),  # noqa: DTZ001
    timezones=st.sampled_from([UTC, ZoneInfo("Europe/Berlin"), ZoneInfo("Asia/Tokyo")]),
)


class TestSqliteFastPath:
    """The JSON fast path writes exactly what SQLAlchemy's column type would."""

    @given(_AWARE_DATETIMES)
    def test_datetimes_are_stored_as_sqlalchemy_stores_them(self, value: datetime) -> None:
        dialect = sqlite_dialect()
        column_type = UTCDateTime()
        process = column_type.dialect_impl(dialect).bind_processor(dialect)
        assert process is not None
        assert sqlite_datetime(value) == process(value)

    def test_naive_datetimes_are_refused(self) -> None:
        with pytest.raises(ValueError, match="naive"):
            sqlite_datetime(datetime(2026, 1, 1))  # noqa: DTZ001 - the point
        assert sqlite_datetime(None) is None

    @given(_AWARE_DATETIMES)
    def test_task_times_are_converted_in_sql_as_sqlalchemy_stores_them(
        self, module_store: AuditStore, value: datetime
    ) -> None:
        """The JSON encoder's ISO text becomes SQLite's stored form in the INSERT itself."""
        run_id = module_store.start_run(RECORD)
        module_store.record(run_id, [AuditEntry("t", "old", "done", value)])
        with module_store.engine.connect() as connection:
            stored = connection.exec_driver_sql(
                "SELECT task_timestamp FROM reaper_audit WHERE run_id = ?", (run_id,)
            ).scalar_one()
        assert stored == sqlite_datetime(value)


@pytest.mark.parametrize(
    "stamp",
    [
        datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC),  # no microseconds: the encoder omits them
        datetime(2026, 3, 1, 12, 0, 0, 1, tzinfo=UTC),
        datetime(2026, 3, 1, 13, 30, 5, 250000, tzinfo=ZoneInfo("Europe/Berlin")),
        datetime(5, 1, 2, tzinfo=UTC),
    ],
)
def test_entry_rows_keep_their_times_and_order(store: AuditStore, stamp: datetime) -> None:
    """What a write binds once (run, policy, times) and what each row carries land as written."""
    clock = [datetime(2026, 4, 1, tzinfo=UTC)]
    store = AuditStore(store.engine, clock=lambda: clock[0])
    run_id = store.start_run(RECORD)
    store.record(run_id, [AuditEntry("a", "old", "done", stamp), AuditEntry("b", "r", None, None)])
    store.record(run_id, [AuditEntry("c", "r", "s", stamp, Outcome.DRY_RUN, "why")])
    rows = {row.task_id: row for row in store.rows(run_id=run_id)}
    assert [rows[t].seq for t in "abc"] == [1, 2, 3]
    assert rows["a"].task_timestamp == stamp
    assert rows["a"].task_age_seconds == int((clock[0] - stamp).total_seconds())
    assert (rows["b"].task_timestamp, rows["b"].task_age_seconds) == (None, None)
    assert {row.recorded_at for row in rows.values()} == {clock[0]}
    assert (rows["a"].decided_at, rows["c"].decided_at) == (None, clock[0])
    assert (rows["a"].outcome, rows["c"].outcome, rows["c"].error_message) == (
        "pending",
        "dry_run",
        "why",
    )
    assert (rows["a"].policy, rows["a"].target) == (RECORD.policy, RECORD.target)
    assert rows["c"].chain_seq == 1 and rows["a"].chain_seq is None
    assert store.verify() == []


def test_outcomes_are_looked_up_by_run_and_task_not_by_walking_the_run(store: AuditStore) -> None:
    """Resolving a write's outcomes looks each id up in (run_id, task_id): its cost does not grow
    with the rows the run already has (the plan is read from the database, not timed)."""
    from reaper.audit import _PG_RESOLVE, _SQLITE_RESOLVE, _json_rows

    run_id = store.start_run(RECORD)
    stamp = datetime(2026, 1, 1, tzinfo=UTC)
    for start in range(0, 3000, 500):
        store.record(
            run_id, [AuditEntry(f"t{i}", "old", "done", stamp) for i in range(start, start + 500)]
        )
    values = _json_rows([["t1", "deleted", 200, None, None, None, None, None, 1, "h"]])
    with store.engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            params = {"run_id": run_id, "decided_at": stamp, "rows": values}
            plan = "\n".join(
                row[0] for row in connection.exec_driver_sql("EXPLAIN " + _PG_RESOLVE, params)
            )
            # Each id through an index on its task id (with or without the run), never a walk
            # over the run's rows.
            conditions = [line for line in plan.splitlines() if "Index Cond" in line]
            assert any("(task_id)::text = (v.e ->> 0)" in line for line in conditions), plan
            assert "Bitmap Heap Scan" not in plan and "Seq Scan on reaper_audit" not in plan
        else:
            plan = "\n".join(
                row[3]
                for row in connection.exec_driver_sql(
                    "EXPLAIN QUERY PLAN " + _SQLITE_RESOLVE, ("x", values, run_id)
                )
            )
            assert "(run_id=? AND task_id=?)" in plan
            assert "SCAN reaper_audit" not in plan


class TestSqliteVersion:
    def test_an_older_sqlite_is_refused_before_anything_is_written(self) -> None:
        from reaper.db import require_sqlite

        with pytest.raises(AuditError, match=r"3\.31\.1; reaper's audit needs 3\.38\.0 or newer"):
            require_sqlite((3, 31, 1))
        require_sqlite((3, 38, 0))
        require_sqlite((3, 45, 2))
