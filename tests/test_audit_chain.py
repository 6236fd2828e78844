"""Tamper evidence: every run's finalized rows form a hash chain that `audit verify` checks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from conftest import NOW, make_policy, sim_task
from sqlalchemy import delete, select, update

from reaper.audit import AuditStore, audit_table, runs_table
from reaper.runner import run_policy
from reaper.simulators import DataPipelineSimulator, Faults

Start = Callable[..., tuple[DataPipelineSimulator, str]]


def populated(data_pipeline: Start, store: AuditStore) -> str:
    """A run with 30 deletions, a few failures and an invalid id; returns its run id."""
    tasks = [
        sim_task(f"task_20260901_{i:06d}", age=timedelta(days=40, minutes=i)) for i in range(30)
    ]
    tasks.append(sim_task("../../etc/passwd"))
    _, url = data_pipeline(tasks, faults=Faults(partial_failure_rate=0.1))
    result = asyncio.run(run_policy(make_policy(url), store, now=NOW))
    assert result.run_id is not None
    return result.run_id


class TestChain:
    def test_a_clean_log_verifies(self, data_pipeline: Start, store: AuditStore) -> None:
        """Every finalized row is chained; the run records the head; verify finds nothing."""
        run_id = populated(data_pipeline, store)
        rows = store.rows(run_id=run_id, limit=None)
        assert len(rows) == 31
        assert sorted(r.chain_seq for r in rows if r.chain_seq) == list(range(1, 32))
        assert store.verify() == []
        run = store.run(run_id)
        assert run is not None and run["chain_length"] == 31

    def test_an_edited_row_is_found(self, data_pipeline: Start, store: AuditStore) -> None:
        """Changing one outcome breaks that row's link and names it."""
        run_id = populated(data_pipeline, store)
        with store.engine.begin() as connection:
            target = connection.execute(
                select(audit_table.c.id, audit_table.c.task_id).where(
                    audit_table.c.run_id == run_id, audit_table.c.chain_seq == 7
                )
            ).one()
            connection.execute(
                update(audit_table).where(audit_table.c.id == target.id).values(outcome="failed")
            )
        [problem] = store.verify()
        assert problem.run_id == run_id
        assert problem.chain_seq == 7
        assert problem.task_id == target.task_id
        assert "edited" in problem.message

    def test_an_edited_answer_is_found(self, data_pipeline: Start, store: AuditStore) -> None:
        """The response summary is covered too: an edited error message is detected."""
        populated(data_pipeline, store)
        with store.engine.begin() as connection:
            connection.execute(
                update(audit_table)
                .where(audit_table.c.chain_seq == 3)
                .values(error_message="nothing to see")
            )
        assert len(store.verify()) == 1

    def test_a_deleted_row_is_found(self, data_pipeline: Start, store: AuditStore) -> None:
        """Removing a row from the middle leaves a gap that verify reports."""
        run_id = populated(data_pipeline, store)
        with store.engine.begin() as connection:
            connection.execute(
                delete(audit_table).where(
                    audit_table.c.run_id == run_id, audit_table.c.chain_seq == 12
                )
            )
        [problem] = store.verify()
        assert problem.chain_seq == 12
        assert "deleted" in problem.message

    def test_a_deleted_last_row_is_found(self, data_pipeline: Start, store: AuditStore) -> None:
        """Removing the newest row is caught by the head the run records."""
        run_id = populated(data_pipeline, store)
        with store.engine.begin() as connection:
            connection.execute(
                delete(audit_table).where(
                    audit_table.c.run_id == run_id, audit_table.c.chain_seq == 31
                )
            )
        [problem] = store.verify()
        assert "deleted" in problem.message

    def test_the_policy_version_is_covered(self, data_pipeline: Start, store: AuditStore) -> None:
        """Rewriting which policy version a run used breaks its chain."""
        run_id = populated(data_pipeline, store)
        with store.engine.begin() as connection:
            connection.execute(
                update(runs_table).where(runs_table.c.id == run_id).values(policy_hash="f" * 64)
            )
        assert len(store.verify()) == 1


class TestPrune:
    def test_prune_removes_whole_old_runs_and_says_so(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """Runs finished before the cutoff go with their rows; a retention run records it."""
        old = populated(data_pipeline, store)
        with store.engine.begin() as connection:
            connection.execute(
                update(runs_table)
                .where(runs_table.c.id == old)
                .values(finished_at=datetime.now(UTC) - timedelta(days=400))
            )
        runs, rows = store.prune(datetime.now(UTC) - timedelta(days=365))
        assert (runs, rows) == (1, 31)
        assert store.rows() == []
        [record] = store.runs()
        assert record["policy"] == "<audit-retention>"
        assert record["mode"] == "prune"
        assert record["deleted"] == 31
        assert store.verify() == []

    def test_prune_keeps_recent_runs(self, data_pipeline: Start, store: AuditStore) -> None:
        """A recent run survives pruning untouched."""
        populated(data_pipeline, store)
        assert store.prune(datetime.now(UTC) - timedelta(days=365)) == (0, 0)
        assert len(store.rows(limit=None)) == 31
