"""Tamper evidence: every run's finalized rows form a hash chain that `audit verify` checks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import EMPTY_POLICY_HASH, NOW, make_policy, sim_task
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import delete, select, update

from reaper.audit import (
    AuditEntry,
    AuditStore,
    RunRecord,
    audit_table,
    canonical_json,
    runs_table,
)
from reaper.db import make_engine
from reaper.runner import run_policy
from reaper.simulators import DataPipelineSimulator, Faults
from reaper.targets.base import DeleteResult, Outcome

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

    def test_the_policy_text_is_covered(self, data_pipeline: Start, store: AuditStore) -> None:
        """Rewriting the policy text a run stored (what `explain --show-policy` prints) is found:
        its SHA-256 no longer matches the policy version the chain covers."""
        run_id = populated(data_pipeline, store)
        assert store.verify() == []
        edited = json.dumps({"select": {"older_than": "1d"}})
        with store.engine.begin() as connection:
            connection.execute(
                update(runs_table).where(runs_table.c.id == run_id).values(policy_json=edited)
            )
        [problem] = store.verify()
        assert problem.run_id == run_id and "policy text" in problem.message

    def test_settling_an_unknown_row_keeps_the_chain(self, store: AuditStore) -> None:
        """An ``unknown`` outcome is not final: reconciliation settles it later, so it joins the
        chain only then, and the chain verifies before and after (issue 15: every 504 is one)."""
        run_id = store.start_run(
            RunRecord("p", EMPTY_POLICY_HASH, "{}", "data_pipeline", "http://t", "run")
        )
        stamp = datetime(2026, 9, 1, tzinfo=UTC)
        store.record(run_id, [AuditEntry(t, "old", "completed", stamp) for t in "abc"])
        store.resolve(
            run_id,
            [
                DeleteResult("a", Outcome.DELETED, 200),
                DeleteResult("b", Outcome.UNKNOWN, 504, error_message="HTTP 504"),
                DeleteResult("c", Outcome.DELETED, 200),
            ],
        )
        assert store.verify() == []
        store.resolve(run_id, [DeleteResult("b", Outcome.DELETED, note="confirmed")])
        assert store.verify() == []
        rows = {r.task_id: r for r in store.rows(run_id=run_id, limit=None)}
        assert sorted(r.chain_seq or 0 for r in rows.values()) == [1, 2, 3]
        assert rows["b"].chain_seq == 3 and rows["b"].outcome == "deleted"


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


class TestCommands:
    def test_explain_verify_and_reconcile_from_the_command_line(
        self, data_pipeline: Start, tmp_path: Any, database_url: str
    ) -> None:
        """explain names policy version, rule and answer; verify passes, then catches an edit."""
        import json
        import os
        import subprocess
        import sys

        import yaml
        from conftest import policy_doc

        now = datetime.now(UTC)
        tasks = [
            sim_task(f"task_20260901_{i:06d}", age=timedelta(days=40, minutes=i), now=now)
            for i in range(3)
        ]
        _, url = data_pipeline(tasks)
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(policy_doc(url)), encoding="utf-8")
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("REAPER_")},
            "REAPER_DATABASE_URL": database_url,
            "REAPER_POLICIES": str(tmp_path / "p.yaml"),
            "REAPER_DB_AUTO_UPGRADE": "true",
            "REAPER_LOG_FORMAT": "json",
        }

        def reaper(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "reaper", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )

        assert reaper("run").returncode == 0
        explained = reaper("explain", "task_20260901_000001", "--output", "json")
        [entry] = json.loads(explained.stdout)
        assert entry["outcome"] == "deleted"
        assert entry["policy"] == "test-policy"
        assert entry["rule"] == "older than 30d and status completed"
        assert entry["http_status"] == 200
        assert len(entry["policy_hash"]) == 64
        assert json.loads(entry["policy_json"])["name"] == "test-policy"
        text = reaper("explain", "task_20260901_000001").stdout
        assert "deleted" in text and "rule: older than 30d" in text
        assert "never acted on it" in reaper("explain", "task_19990101_000000").stdout

        verified = reaper("audit", "verify")
        assert verified.returncode == 0, verified.stderr
        assert "no edited or missing rows" in verified.stdout
        engine = make_engine(database_url)
        with engine.begin() as connection:
            connection.execute(update(audit_table).values(note="edited"))
        engine.dispose()
        broken = reaper("audit", "verify")
        assert broken.returncode == 1
        assert "it was edited" in broken.stdout

        reconciled = reaper("reconcile", "--output", "json")
        assert reconciled.returncode == 0, reconciled.stderr
        assert json.loads(reconciled.stdout)[0]["deleted"] == 0


_JSON_VALUES = st.one_of(
    st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.text(), st.integers()
)


@given(st.lists(_JSON_VALUES, max_size=12))
def test_the_chain_serialises_rows_as_the_standard_library_does(content: list[Any]) -> None:
    """Hashes written before and after the orjson fast path agree, so old chains still verify."""
    text = json.dumps(content, separators=(",", ":"), ensure_ascii=False)
    try:
        expected = text.encode()
    except UnicodeEncodeError:  # a lone surrogate: no row with one could ever be hashed
        with pytest.raises(UnicodeEncodeError):
            canonical_json(content)
        return
    assert canonical_json(content) == expected
