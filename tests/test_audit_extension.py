"""The audit rows' approval and snapshot: covered by the hash chain, and rows written before they
existed verify as they always did (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from conftest import migrate_to
from sqlalchemy import insert, select, update

from reaper.audit import (
    AuditEntry,
    AuditStore,
    RunRecord,
    audit_table,
    row_hash,
    runs_table,
)
from reaper.db import make_engine, upgrade
from reaper.targets.base import DeleteResult, Outcome

POLICY_HASH = hashlib.sha256(b"{}").hexdigest()  # the version of the policy text "{}"
STAMP = datetime(2026, 9, 1, 12, 0, tzinfo=UTC)


def record(approval_id: str | None = None, mode: str = "run") -> RunRecord:
    return RunRecord("p", POLICY_HASH, "{}", "data_pipeline", "http://t", mode, approval_id)


def previous_release_hash(previous: str, row: dict[str, Any]) -> str:
    """A row's chain hash as the release before snapshots and approvals computed it, spelled
    out from its documented content: sha256(previous hash + compact JSON of eleven values)."""
    content = [
        row["run_id"],
        row["chain_seq"],
        row["task_id"],
        row["outcome"],
        POLICY_HASH,
        row["http_status"],
        row["error_code"],
        row["error_message"],
        row["reclaimed_bytes"],
        row["note"],
        row["decided_at"].astimezone(UTC).isoformat(),
    ]
    encoded = json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(previous.encode() + encoded).hexdigest()


def rows_of(store: AuditStore, run_id: str) -> dict[str, Any]:
    with store.engine.connect() as connection:
        return {
            row.task_id: row
            for row in connection.execute(select(audit_table).where(audit_table.c.run_id == run_id))
        }


class TestOlderDatabases:
    def test_rows_written_before_the_upgrade_still_verify(self, database_url: str) -> None:
        """An audit database at revision 0008, its rows hashed as that release did, verifies
        unchanged after the upgrade; editing one of its rows is still found."""
        migrate_to(database_url, "0008")
        engine = make_engine(database_url)
        run_id, head = "00000000-0000-0000-0000-000000000006", "0" * 64
        decided = datetime(2026, 10, 1, 8, 30, 15, 123456, tzinfo=UTC)
        rows = [
            {
                "run_id": run_id,
                "seq": n,
                "policy": "p",
                "target": "http://t",
                "task_id": f"task_{n}",
                "outcome": outcome,
                "reason": "older than 30d",
                "http_status": status,
                "error_code": None,
                "error_message": message,
                "reclaimed_bytes": reclaimed,
                "note": note,
                "recorded_at": decided,
                "decided_at": decided,
                "chain_seq": n,
            }
            for n, (outcome, status, message, reclaimed, note) in enumerate(
                [
                    ("deleted", 200, None, 2048, None),
                    ("failed", 500, "boom — ünïcode", None, None),
                    ("already_gone", 404, None, None, "gone before"),
                ],
                start=1,
            )
        ]
        for row in rows:
            head = row["row_hash"] = previous_release_hash(head, row)
        with engine.begin() as connection:
            connection.execute(
                insert(runs_table).values(
                    id=run_id,
                    policy="p",
                    policy_hash=POLICY_HASH,
                    policy_json="{}",
                    target_kind="data_pipeline",
                    target="http://t",
                    mode="run",
                    status="partial",
                    started_at=decided,
                    finished_at=decided,
                    host="h",
                    pid=1,
                    chain_head=head,
                    chain_length=len(rows),
                )
            )
            for row in rows:
                connection.execute(insert(audit_table).values(**row))
        upgrade(engine)
        store = AuditStore(engine)
        assert store.verify() == []
        with engine.begin() as connection:
            connection.execute(
                update(audit_table)
                .where(audit_table.c.task_id == "task_2")
                .values(error_message="edited")
            )
        [problem] = store.verify()
        assert problem.task_id == "task_2"
        engine.dispose()


class TestCoverage:
    def test_an_approval_and_a_snapshot_verify_and_edits_are_found(self, store: AuditStore) -> None:
        """A deletion row that names an approval and keeps a snapshot verifies; changing either
        one, or dropping it, breaks the chain at that row."""
        run_id = store.start_run(record("approval-1"))
        snapshot = json.dumps({"task_id": "task_1", "status": "completed", "size": 10})
        store.record(
            run_id,
            [
                AuditEntry("task_1", "r", "completed", STAMP, snapshot=snapshot),
                AuditEntry("task_2", "r", "completed", STAMP),
            ],
        )
        store.resolve(
            run_id,
            [DeleteResult("task_1", Outcome.DELETED, 200), DeleteResult("task_2", Outcome.FAILED)],
        )
        rows = rows_of(store, run_id)
        assert rows["task_1"].snapshot == snapshot
        assert {row.approval_id for row in rows.values()} == {"approval-1"}
        assert store.verify() == []
        for column, value in (
            ("snapshot", snapshot.replace("10", "11")),
            ("snapshot", None),
            ("approval_id", "approval-2"),
            ("approval_id", None),
        ):
            original = getattr(rows["task_1"], column)
            with store.engine.begin() as connection:
                connection.execute(
                    update(audit_table)
                    .where(audit_table.c.id == rows["task_1"].id)
                    .values({column: value})
                )
            [problem] = store.verify()
            assert (problem.run_id, problem.task_id) == (run_id, "task_1"), column
            with store.engine.begin() as connection:
                connection.execute(
                    update(audit_table)
                    .where(audit_table.c.id == rows["task_1"].id)
                    .values({column: original})
                )
            assert store.verify() == []

    def test_rows_final_when_written_are_covered_too(self, store: AuditStore) -> None:
        """Rows inserted final (dry run, refused ids) carry the approval and snapshot into the
        chain as well."""
        run_id = store.start_run(record("approval-9", "dry_run"))
        store.record(
            run_id,
            [
                AuditEntry("task_1", "r", "completed", STAMP, Outcome.DRY_RUN, snapshot='{"a":1}'),
                AuditEntry("task_2", "r", "completed", STAMP, Outcome.SKIPPED_INVALID_ID),
            ],
        )
        assert store.verify() == []
        with store.engine.begin() as connection:
            connection.execute(
                update(audit_table)
                .where(audit_table.c.task_id == "task_2")
                .values(approval_id="other")
            )
        [problem] = store.verify()
        assert problem.task_id == "task_2"

    def test_outcomes_written_by_another_process_are_covered(self, database_url: str) -> None:
        """A pending row with a snapshot, resolved later by another process (reconciliation
        after a crash), is chained with its snapshot read back from the database."""
        engine = make_engine(database_url)
        upgrade(engine)
        first = AuditStore(engine)
        run_id = first.start_run(record())
        snapshot = '{"task_id":"task_1","note":"naïve \\u2028"}'
        first.record(run_id, [AuditEntry("task_1", "r", "completed", STAMP, snapshot=snapshot)])
        later = AuditStore(engine, clock=lambda: STAMP + timedelta(days=1))
        later.resolve(run_id, [DeleteResult("task_1", Outcome.DELETED)], note="reconciled")
        row = rows_of(later, run_id)["task_1"]
        assert (row.outcome, row.snapshot, row.chain_seq) == ("deleted", snapshot, 1)
        assert later.verify() == []
        engine.dispose()

    def test_an_unknown_outcome_resolved_again_keeps_its_snapshot_covered(
        self, store: AuditStore
    ) -> None:
        """A row first resolved unknown, then resolved again in the same process, still has
        its snapshot in its new hash."""
        run_id = store.start_run(record())
        store.record(run_id, [AuditEntry("task_1", "r", "completed", STAMP, snapshot='{"x":1}')])
        store.resolve(run_id, [DeleteResult("task_1", Outcome.UNKNOWN)])
        before = store.run(run_id)
        assert before is not None
        store.resolve(run_id, [DeleteResult("task_1", Outcome.DELETED)])
        row = dict(rows_of(store, run_id)["task_1"]._mapping)
        assert row["outcome"] == "deleted"
        assert row["row_hash"] == row_hash(before["chain_head"], POLICY_HASH, row)
        assert row["row_hash"] != row_hash(
            before["chain_head"], POLICY_HASH, row | {"snapshot": '{"x":2}'}
        )
