"""A policy run end to end: simulator over real HTTP → plan → executor → audit (SQLite and PG)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from conftest import NOW, fast_retries, make_policy, sim_task
from sqlalchemy import select
from structlog.testing import capture_logs

from reaper.audit import AuditStore, audit_table, runs_table
from reaper.execute import auto_concurrency
from reaper.policy import LoadedPolicy
from reaper.runner import Mode, PolicyRun, RunStatus, run_policy
from reaper.simulators import DataPipelineSimulator, Faults
from reaper.simulators.data_pipeline import SimTask

Start = Callable[..., tuple[DataPipelineSimulator, str]]


def run(loaded: LoadedPolicy, store: AuditStore, **kwargs: Any) -> PolicyRun:
    return asyncio.run(run_policy(loaded, store, now=NOW, **kwargs))


def audit_rows(store: AuditStore, run_id: str | None = None) -> list[dict[str, Any]]:
    query = select(audit_table).order_by(audit_table.c.seq)
    if run_id is not None:
        query = query.where(audit_table.c.run_id == run_id)
    with store.engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(query)]


def outcomes(store: AuditStore) -> Counter[str]:
    return Counter(row["outcome"] for row in audit_rows(store))


def deleted_in_audit(store: AuditStore) -> set[str]:
    return {row["task_id"] for row in audit_rows(store) if row["outcome"] == "deleted"}


def old_tasks(count: int, status: str = "completed", start_day: int = 1) -> list[SimTask]:
    """`count` tasks between 40 and ~60 days old, ids unique."""
    return [
        sim_task(
            f"task_202609{start_day:02d}_{i:06d}", status=status, age=timedelta(days=40, minutes=i)
        )
        for i in range(count)
    ]


class TestAutoConcurrency:
    """Without ``delete.concurrency``, workers are sized from the rate and the observed latency."""

    def test_littles_law_with_headroom(self) -> None:
        assert auto_concurrency(20, 0.5) == 16  # 20/s x 0.5 s x 1.5, plus one
        assert auto_concurrency(100, 0.3) == 46

    def test_a_fast_target_still_covers_the_audit_commit_in_each_cycle(self) -> None:
        """At 1 ms a worker's cycle is its wait for the next batch's intents, not the request."""
        assert auto_concurrency(200, 0.001) == 31  # sized for a 100 ms cycle
        assert auto_concurrency(1, 0.001) == 2

    def test_unknown_latency_is_assumed_slow_and_the_count_is_capped(self) -> None:
        assert auto_concurrency(20, None) == 9
        assert auto_concurrency(10_000, 2.0) == 64


class TestEndToEnd:
    def test_audit_equals_the_servers_record(self, data_pipeline: Start, store: AuditStore) -> None:
        """Every eligible task is deleted once, over several pages; audit == simulator."""
        tasks = [
            *old_tasks(230),
            sim_task("task_20261030_000001", age=timedelta(days=2)),  # too young
            sim_task("task_20260902_000001", status="in_progress"),  # live: protected
            sim_task("task_20260902_000002", status="pending"),  # live: protected
        ]
        sim, url = data_pipeline(tasks)
        result = run(make_policy(url), store)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert result.summary.listed == 233
        assert result.summary.deleted == 230
        assert deleted_in_audit(store) == set(sim.deleted_ids)
        assert len(sim.deleted_ids) == 230
        assert max(sim.delete_requests_by_id.values()) == 1
        assert outcomes(store) == {"deleted": 230}
        # three pages, plus the true total counted before and after, plus the send-time
        # re-check: a page for each status that excludes a task and can be entered without a
        # new completed_at (pending, in_progress, partial_completed), and one query for the
        # tasks completed since the listing began
        assert sim.stats["list_requests"] == 5 + 3 + 1

    def test_concurrent_batches_share_audit_commits(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """Workers' intents and outcomes are grouped: fewer commits than two per batch, and the
        audit still equals the server's record, each row in the run's hash chain."""
        sim, url = data_pipeline(old_tasks(300), faults=Faults(latency_ms=20))
        loaded = make_policy(url, delete={"batch_size": 5, "rate": "1000/s", "concurrency": 8})
        with capture_logs() as logs:
            result = run(loaded, store)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert deleted_in_audit(store) == set(sim.deleted_ids)
        assert len(sim.deleted_ids) == 300
        (stats,) = [entry for entry in logs if entry["event"] == "group_commit"]
        assert stats["intents"] == stats["outcomes"] == 300
        # 60 batches: one commit per batch and its outcomes would be 120; grouped, fewer than 60.
        assert stats["commits"] < 60
        assert sorted(row["chain_seq"] for row in audit_rows(store)) == list(range(1, 301))
        assert store.verify() == []

    def test_audit_rows_carry_the_facts(self, data_pipeline: Start, store: AuditStore) -> None:
        """A row names policy, target, reason, listed status and age, HTTP status and space."""
        task = sim_task("task_20260901_120000", age=timedelta(days=45), size_bytes=5 * 1024**2)
        _, url = data_pipeline([task])
        result = run(make_policy(url), store)
        [row] = audit_rows(store)
        assert row["run_id"] == result.run_id
        assert row["policy"] == "test-policy"
        assert row["target"] == url
        assert row["task_id"] == "task_20260901_120000"
        assert row["outcome"] == "deleted"
        assert row["reason"] == "older than 30d and status completed"
        assert row["task_status"] == "completed"
        assert row["task_timestamp"] == task.created_at
        assert row["task_age_seconds"] > 45 * 86400 - 60
        assert row["http_status"] == 200
        assert row["reclaimed_bytes"] == 5 * 1024**2
        assert row["decided_at"] >= row["recorded_at"]
        with store.engine.connect() as connection:
            [run_row] = connection.execute(select(runs_table)).mappings().all()
        assert run_row["status"] == "succeeded"
        assert run_row["deleted"] == 1
        assert run_row["reclaimed_bytes"] == 5 * 1024**2
        assert run_row["policy_hash"] == make_policy(url).digest

    def test_nothing_to_delete_succeeds(self, data_pipeline: Start, store: AuditStore) -> None:
        """An empty target is a successful run with zero deletions."""
        sim, url = data_pipeline([])
        result = run(make_policy(url), store)
        assert result.status is RunStatus.SUCCEEDED
        assert sim.stats["delete_requests"] == 0

    def test_dry_run_deletes_nothing(self, data_pipeline: Start, store: AuditStore) -> None:
        """A dry run records dry_run rows and sends no delete request."""
        sim, url = data_pipeline(old_tasks(25))
        result = run(make_policy(url), store, mode=Mode.DRY_RUN)
        assert result.status is RunStatus.SUCCEEDED
        assert sim.stats["delete_requests"] == 0
        assert sim.deleted_ids == []
        assert outcomes(store) == {"dry_run": 25}

    def test_already_deleted_tasks_are_not_selected(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """A second run finds the directories gone and deletes nothing more."""
        sim, url = data_pipeline(old_tasks(12))
        run(make_policy(url), store)
        second = run(make_policy(url), store)
        assert second.status is RunStatus.SUCCEEDED
        assert second.summary.deleted == 0
        assert len(sim.deleted_ids) == 12
        assert max(sim.delete_requests_by_id.values()) == 1

    def test_keep_newest_and_oldest_first(self, data_pipeline: Start, store: AuditStore) -> None:
        """keep.newest spares the newest matching tasks; deletion goes oldest first."""
        tasks = old_tasks(20)
        sim, url = data_pipeline(tasks)
        loaded = make_policy(
            url, keep={"newest": 5}, delete={"batch_size": 4, "rate": "200/s", "concurrency": 1}
        )
        result = run(loaded, store)
        by_age = sorted(tasks, key=lambda t: t.created_at)
        assert sim.deleted_ids == [t.task_id for t in by_age[:15]]
        assert result.status is RunStatus.SUCCEEDED


class TestFailures:
    def test_partial_batch_failure_continues(self, data_pipeline: Start, store: AuditStore) -> None:
        """With continue_on_error, failed ids are recorded with the reason and the rest go on."""
        sim, url = data_pipeline(old_tasks(60), faults=Faults(partial_failure_rate=0.2))
        result = run(make_policy(url), store)
        rows = audit_rows(store)
        failed = [r for r in rows if r["outcome"] == "failed"]
        assert failed, "the fault profile should fail some ids"
        assert all(r["error_code"] == "DELETE_FAILED" and r["error_message"] for r in failed)
        assert result.summary.deleted + result.summary.failed == 60
        assert deleted_in_audit(store) == set(sim.deleted_ids)
        assert result.status is RunStatus.PARTIAL

    def test_stop_on_error(self, data_pipeline: Start, store: AuditStore) -> None:
        """With continue_on_error false, no batch is sent after the first failure.

        The next batch's intents were already written (while the first was in flight): they are
        recorded ``not_deleted``, never sent, not left ``pending``."""
        sim, url = data_pipeline(old_tasks(50), faults=Faults(partial_failure_rate=1.0))
        loaded = make_policy(
            url,
            delete={"batch_size": 5, "rate": "200/s", "concurrency": 1, "continue_on_error": False},
        )
        result = run(loaded, store)
        assert result.status is RunStatus.ABORTED
        assert "stop-on-error" in (result.error or "")
        assert sim.stats["delete_requests"] == 1
        assert outcomes(store) == {"failed": 5, "not_deleted": 5}
        never_sent = [row for row in audit_rows(store) if row["outcome"] == "not_deleted"]
        assert all(
            row["note"].startswith("never sent: the run stopped first") for row in never_sent
        )
        assert not {row["task_id"] for row in never_sent} & set(sim.delete_requests_by_id)
        assert store.verify() == []

    def test_retries_429_with_retry_after(self, data_pipeline: Start, store: AuditStore) -> None:
        """A server-side rate limit below ours yields 429s; Retry-After is honoured, all deleted."""
        sim, url = data_pipeline(old_tasks(12), faults=Faults(rate_limit=5, rate_limit_burst=1))
        loaded = make_policy(
            url,
            target={"type": "data_pipeline", "base_url": url, "retries": fast_retries()},
            # Every finished status: the send-time re-check then re-lists only the live ones,
            # and the requests this test throws at the 5/s server stay what it was written for.
            select={"status": ["completed", "failed", "partial_completed"], "older_than": "30d"},
            delete={"batch_size": 1, "rate": "50/s", "burst": 5, "concurrency": 4},
        )
        result = run(loaded, store)
        assert sim.stats["status_429"] > 0
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert len(sim.deleted_ids) == 12
        assert deleted_in_audit(store) == set(sim.deleted_ids)

    def test_retries_5xx(self, data_pipeline: Start, store: AuditStore) -> None:
        """Transient 5xx answers are retried until the deletions go through."""
        sim, url = data_pipeline(old_tasks(40), faults=Faults(error_rate=0.3))
        loaded = make_policy(
            url,
            target={
                "type": "data_pipeline",
                "base_url": url,
                "retries": {"attempts": 10, "backoff": "0s", "max_backoff": "0s"},
            },
        )
        result = run(loaded, store)
        assert sim.stats["status_5xx"] > 0
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert deleted_in_audit(store) == set(sim.deleted_ids)
        assert len(sim.deleted_ids) == 40

    def test_lost_answers_are_recorded_truthfully(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """A connection dropped after the server acted: the retry's 'already gone' is our delete."""
        sim, url = data_pipeline(old_tasks(30), faults=Faults(drop_after_rate=0.3))
        loaded = make_policy(
            url,
            target={
                "type": "data_pipeline",
                "base_url": url,
                "retries": {"attempts": 10, "backoff": "0s", "max_backoff": "0s"},
            },
        )
        result = run(loaded, store)
        assert sim.stats["dropped"] > 0
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert deleted_in_audit(store) == set(sim.deleted_ids)
        assert len(sim.deleted_ids) == 30

    def test_unknown_outcome_when_retries_run_out(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """If every attempt's answer is lost, the ids are 'unknown', never 'deleted' or 'failed'."""
        sim, url = data_pipeline(old_tasks(3), faults=Faults(drop_after_rate=1.0))
        loaded = make_policy(
            url,
            target={
                "type": "data_pipeline",
                "base_url": url,
                "retries": {"attempts": 2, "backoff": "0s", "max_backoff": "0s"},
            },
        )
        result = run(loaded, store)
        assert outcomes(store) == {"unknown": 3}
        assert result.status is RunStatus.PARTIAL
        assert len(sim.deleted_ids) == 3

    def test_listing_failure_deletes_nothing(self, data_pipeline: Start, store: AuditStore) -> None:
        """A listing that fails after retries aborts the policy before any deletion."""
        sim, url = data_pipeline(old_tasks(150), faults=Faults(malformed_rate=1.0))
        result = run(make_policy(url), store)
        assert result.status is RunStatus.ABORTED
        assert "listing failed, nothing deleted" in (result.error or "")
        assert sim.stats["delete_requests"] == 0
        assert audit_rows(store) == []

    def test_invalid_ids_are_recorded_never_sent(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """An eligible id failing the path guard gets a skipped_invalid_id row and is never sent."""
        tasks = [
            *old_tasks(3),
            sim_task("task_20260902_000000/../../etc"),
            sim_task("task_20260902_000009\n"),
        ]
        sim, url = data_pipeline(tasks)
        result = run(make_policy(url), store)
        assert sim.traversal_attempts == []
        assert outcomes(store) == {"deleted": 3, "skipped_invalid_id": 2}
        assert all("\n" not in i and "/" not in i for i in sim.delete_requests_by_id)
        assert result.status is RunStatus.PARTIAL

    def test_target_down(self, store: AuditStore) -> None:
        """An unreachable target aborts the policy; nothing is recorded as deleted."""
        loaded = make_policy(
            "http://127.0.0.1:9",
            target={
                "type": "data_pipeline",
                "base_url": "http://127.0.0.1:9",
                "retries": {"attempts": 2, "backoff": "0s", "max_backoff": "0s"},
            },
        )
        result = run(loaded, store)
        assert result.status is RunStatus.ABORTED
        assert audit_rows(store) == []


class TestFailClosed:
    def test_no_audit_no_delete(self, data_pipeline: Start, tmp_path: Any) -> None:
        """If the audit database cannot be written, nothing is listed or deleted."""
        from reaper.db import make_engine

        sim, url = data_pipeline(old_tasks(10))
        engine = make_engine(f"sqlite:///{tmp_path / 'never-migrated.db'}")
        result = run(make_policy(url), AuditStore(engine))
        assert result.status is RunStatus.FAILED
        assert "audit database" in (result.error or "")
        assert sim.stats["requests"] == 0

    def test_audit_lost_mid_run_stops_deleting(
        self, data_pipeline: Start, private_pg_server: Any
    ) -> None:
        """PostgreSQL stopping mid-run stops deletions; every deletion made is in the audit."""
        from reaper.db import make_engine, upgrade

        url_db = private_pg_server.create_database()
        engine = make_engine(url_db)
        upgrade(engine)
        store = AuditStore(engine)
        sim, url = data_pipeline(old_tasks(200), faults=Faults(latency_ms=5))
        loaded = make_policy(url, delete={"batch_size": 5, "rate": "100/s", "concurrency": 1})
        from reaper.execute import BatchEvent

        def on_batch(event: BatchEvent) -> None:
            if event.batch_no == 3:
                private_pg_server.stop_server()

        result = run(loaded, store, on_batch=on_batch)
        assert result.status is RunStatus.FAILED, result.error
        assert "audit" in (result.error or "")
        deleted = set(sim.deleted_ids)
        assert 0 < len(deleted) < 200
        # At most the batch whose outcome write failed is missing its final outcome; its ids
        # were recorded as pending before the request left.
        private_pg_server.start_server()
        engine.dispose()
        reader = make_engine(url_db)
        rows = audit_rows(AuditStore(reader))
        reader.dispose()
        recorded = {r["task_id"] for r in rows}
        assert deleted <= recorded
        assert {r["task_id"] for r in rows if r["outcome"] == "deleted"} <= deleted
