"""Acceptance of issue 15 (delete-time truth) against a server reaper has not seen.

The server is :mod:`acceptance.independent_server`, written from TARGETS.md section 1 and the real
service's code, not from reaper's simulator. Every verdict comes from that server's own record of
what it did, never from reaper's code:

1. no live task deleted (the server notes each id it worked on while the task was pending or in
   progress), and nothing sent that was no longer eligible when its request left;
2. every acknowledged-but-not-done id noticed (a ``not_deleted`` row in a ``correction`` run);
3. acted-then-504 ids recorded ``deleted`` (never ``already_gone``, never ``failed``);
4. the audit equal to the server's record: an id's last outcome is ``deleted`` exactly when one of
   reaper's requests removed its directory, with the files the server counted.

The multi-step story drives the real command line (``python -m reaper run``, ``reconcile``,
``audit --output json``, ``explain --output json``, ``audit verify``) on SQLite and PostgreSQL; the
single-run scenarios call ``reaper.runner.run_policy`` in-process to keep the suite fast.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from pgserver import PostgresServer
from reliability.harness import Result, audit_state, reaper

from reaper.audit import AuditStore
from reaper.db import make_engine, upgrade
from reaper.policy import load_policy_text
from reaper.runner import run_policy

from .independent_server import Behaviour, IndependentServer

pytestmark = pytest.mark.slow


OLD = timedelta(days=40)
ZONE = "America/Los_Angeles"  # behind UTC: a naive time read as UTC would be hours off


def task_id(n: int) -> str:
    return f"task_20250101_{n:06d}"


def policy_doc(url: str, **sections: Any) -> dict[str, Any]:
    """policies/data_pipeline.yaml's first policy, aimed at the server; guards opened up."""
    doc: dict[str, Any] = {
        "name": "pipeline-finished-30d",
        "target": {
            "type": "data_pipeline",
            "base_url": url,
            "timestamps_timezone": ZONE,
            "retries": {"attempts": 3, "backoff": "0s", "max_backoff": "1s"},
        },
        "select": {"status": ["completed", "partial_completed"], "older_than": "30d"},
        "protect": {"status": ["pending", "in_progress"]},
        "delete": {
            "batch_size": 5,
            "rate": "200/s",
            "concurrency": 2,
            "max_fraction": 1.0,
            "options": {"delete_database_records": False},
        },
    }
    for key, value in sections.items():
        doc[key] = {**doc.get(key, {}), **value}
    return doc


def last_outcomes(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Each task's latest outcome (a settled row counts when it was settled)."""
    latest: dict[str, tuple[str, int, str]] = {}
    for row in rows:
        key = (row["decided_at"] or row["recorded_at"], row["id"], row["outcome"])
        if row["task_id"] not in latest or key > latest[row["task_id"]]:
            latest[row["task_id"]] = key
    return {task: key[2] for task, key in latest.items()}


def files_in_deleted_rows(rows: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in rows:
        if row["outcome"] == "deleted" and row["files_count"]:
            out[row["task_id"]] = out.get(row["task_id"], 0) + row["files_count"]
    return out


# --- the story: run, reconcile, run, on the real command line ------------------------------------

LIVE = [task_id(n) for n in (90, 91, 92)]  # live from the start
RERUN = [task_id(n) for n in (3, 11, 17)]  # re-executed right after a listing shows them
ROW_UPDATE_FAILS = [task_id(n) for n in (2, 8, 14)]
NO_EFFECT = [task_id(n) for n in (5, 19)]
ACT_THEN_504 = task_id(12)  # its whole batch is carried out, then answered 504
BOTH = task_id(10)  # in the 504 batch, and its row update fails too


@dataclass
class Story:
    """What one database's story left behind."""

    server: IndependentServer
    database: str
    results: dict[str, Result] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    chain_problems: list[str] = field(default_factory=list)


def _database(kind: str, tmp: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'audit.db'}"
        return
    server: PostgresServer = request.getfixturevalue("pg_server")
    url = server.create_database()
    try:
        yield url
    finally:
        server.drop_database(sa.make_url(url).database or "")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def story(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Story]:
    tmp = tmp_path_factory.mktemp("story")
    behaviour = Behaviour(
        rerun_on_list=dict.fromkeys(RERUN),
        row_update_fails=dict.fromkeys([*ROW_UPDATE_FAILS, BOTH], 1),
        ack_without_effect=dict.fromkeys(NO_EFFECT, 1),
        act_then_504={ACT_THEN_504},
    )
    server = IndependentServer(ZONE, behaviour)
    for n in range(24):
        # Files and sizes differ per task, so the audit's figures can be told apart.
        server.add(
            task_id(n), "completed", OLD + timedelta(hours=n), files=n + 1, size=1024 * (n + 1)
        )
    for n, status in zip((90, 91, 92), ("in_progress", "in_progress", "pending"), strict=True):
        server.add(task_id(n), status, OLD + timedelta(days=5, hours=n))
    server.add(task_id(95), "failed", OLD + timedelta(days=5))  # not selected
    url = server.start()
    policies = tmp / "policies.yaml"
    policies.write_text(yaml.safe_dump([policy_doc(url)]))
    databases = _database(request.param, tmp, request)
    database = next(databases)
    env = {"REAPER_DATABASE_URL": database, "REAPER_POLICIES": str(policies)}
    out = Story(server, database)
    try:
        for name, args in (
            ("run1", ("run", "--output", "json")),
            ("reconcile", ("reconcile", "--output", "json")),
            ("run2", ("run", "--output", "json")),
            ("audit", ("audit", "--output", "json")),
            ("explain", ("explain", "--output", "json", ROW_UPDATE_FAILS[0])),
        ):
            out.results[name] = reaper(*args, env=env, timeout=60)
        out.rows = json.loads(out.results["audit"].stdout)
        out.runs = audit_state(database).runs
        # What `reaper audit verify` checks (a process less: the suite stays fast).
        engine = make_engine(database)
        try:
            out.chain_problems = [p.message for p in AuditStore(engine).verify()]
        finally:
            engine.dispose()
        yield out
    finally:
        server.stop()
        next(databases, None)


class TestStory:
    """Run, reconcile, run again: the audit against the server's own record."""

    def test_the_commands_ran(self, story: Story) -> None:
        """Each command finished; the first run reports the 504 batch as partial (exit 1)."""
        codes = {name: r.code for name, r in story.results.items()}
        assert codes == {"run1": 1, "reconcile": 0, "run2": 0, "audit": 0, "explain": 0}, {
            n: r.output()[-2000:] for n, r in story.results.items() if r.code
        }

    def test_no_live_task_deleted(self, story: Story) -> None:
        """No id was worked on while live: neither those live all along nor those re-executed
        after the listing; none of them was even sent."""
        record = story.server.record
        assert record.deleted_while_live() == set()
        assert record.sent() & {*LIVE, *RERUN} == set()
        assert {r["task_id"] for r in story.rows if r["outcome"] == "skipped_changed"} == set(RERUN)

    def test_every_acknowledged_not_done_id_is_noticed(self, story: Story) -> None:
        """Each id the server acknowledged without doing it got a correction row, and only those."""
        record = story.server.record
        not_done = record.acknowledged_not_done()
        assert not_done == {*ROW_UPDATE_FAILS, *NO_EFFECT, BOTH}  # the server did as told
        corrections = {r["id"] for r in story.runs if r["mode"] == "correction"}
        corrected = {
            r["task_id"]
            for r in story.rows
            if r["run_id"] in corrections and r["outcome"] == "not_deleted"
        }
        # BOTH's batch was answered 504: its acknowledgement never reached reaper, whose
        # reconciliation then found the task present (not_deleted, not a correction).
        assert corrected == not_done - {BOTH}
        [settled] = [
            r
            for r in story.rows
            if r["task_id"] == BOTH
            and r["outcome"] == "not_deleted"
            and r["run_id"] not in corrections
        ]
        assert settled["http_status"] == 504  # what its request was answered stays recorded

    def test_acted_then_504_ids_are_recorded_deleted(self, story: Story) -> None:
        """The ids of the batch the server carried out and answered 504 end up ``deleted``,
        never ``already_gone`` or ``failed``."""
        acted = story.server.record.acted_then_5xx()
        assert {ACT_THEN_504, BOTH} <= acted
        outcomes = last_outcomes(story.rows)
        assert {t: outcomes.get(t) for t in acted} == dict.fromkeys(acted, "deleted")
        ever = {r["outcome"] for r in story.rows if r["task_id"] in acted}
        assert ever & {"already_gone", "failed"} == set()

    def test_audit_equals_the_servers_record(self, story: Story) -> None:
        """An id's last outcome is ``deleted`` exactly when reaper's requests removed its
        directory, with the files the server counted; the server ends with every selected
        task's directory gone."""
        removed = story.server.record.directories_removed()
        outcomes = last_outcomes(story.rows)
        recorded = {t for t, outcome in outcomes.items() if outcome == "deleted"}
        assert recorded == set(removed)
        # The files the server counted, where its answer reached reaper and told the truth (a
        # 504 carries no counts; an acknowledgement without effect counts files it kept).
        record = story.server.record
        told = set(removed) - record.acted_then_5xx() - record.acknowledged_not_done()
        counted = files_in_deleted_rows(story.rows)
        assert {t: counted.get(t) for t in told} == {t: removed[t] for t in told}
        expected = {task_id(n) for n in range(24)} - set(RERUN)
        assert set(removed) == expected
        assert {t for t, row in story.server.rows.items() if row.directory_exists is False} == (
            expected
        )
        # Every id the server was sent has a row saying what became of it.
        assert story.server.record.sent() <= set(outcomes)
        assert "pending" not in outcomes.values() and "unknown" not in outcomes.values()

    def test_audit_verify_stays_green(self, story: Story) -> None:
        """Corrections and settlements are new rows or first links: every chain verifies."""
        assert story.chain_problems == []

    def test_explain_tells_the_whole_story(self, story: Story) -> None:
        """explain shows the acknowledgement, the correction naming that run, and the deletion."""
        steps = json.loads(story.results["explain"].stdout)
        assert [(s["mode"], s["outcome"]) for s in steps] == [
            ("run", "deleted"),
            ("correction", "not_deleted"),
            ("run", "deleted"),
        ]
        assert steps[0]["run_id"] in steps[1]["note"]


# --- single runs, in-process -----------------------------------------------------------------


def one_run(server: IndependentServer, database_url: str, **sections: Any) -> Any:
    """One run of the policy in-process (the server is started if it is not serving yet)."""
    url = server.url or server.start()
    [loaded] = load_policy_text(yaml.safe_dump(policy_doc(url, **sections)))
    engine = make_engine(database_url)
    upgrade(engine)
    try:
        store = AuditStore(engine)
        result = asyncio.run(run_policy(loaded, store))
        rows = [row.as_dict() for row in store.rows(limit=None)]
    finally:
        engine.dispose()
    return result, rows


#: Finished tasks re-executed right after the listing shows them, and how each re-run ends.
CHANGES = {
    task_id(7): None,  # still running
    task_id(8): "completed",  # finished again: completed_at is now, too young
    task_id(9): "failed",  # finished as failed: a status the policy does not select
    task_id(10): "partial_completed",  # resumed step by step: not selected, not timestamped
    task_id(11): "zombie",  # the zombie check marked it failed: not selected, not timestamped
}


class TestNoLongerEligibleAtSendTime:
    """A task re-executed after the listing is not sent if, when its request leaves, it is live
    or no longer what the policy deletes. Policy: completed tasks whose completed_at is older
    than 30 days."""

    @pytest.mark.parametrize(
        "verify_total",
        # Without the query endpoint, a fresh completed_at must still be seen.
        [True, False],
        ids=["query-endpoint", "verify_total-false"],
    )
    def test_rerun_tasks_are_not_sent(self, verify_total: bool, database_url: str) -> None:
        """Each re-executed task gets a skipped_changed row and never reaches the server; the
        others are deleted."""
        server = IndependentServer(ZONE, Behaviour(rerun_on_list=dict(CHANGES)))
        for n in range(16):
            server.add(task_id(n), "completed", OLD + timedelta(hours=n))
        try:
            result, rows = one_run(
                server,
                database_url,
                select={"status": ["completed"], "age_field": "completed_at"},
                target={"verify_total": verify_total},
            )
        finally:
            server.stop()
        assert result.error is None
        assert {r[0] for r in server.record.reruns} == set(CHANGES)
        assert server.record.sent() & set(CHANGES) == set()
        assert server.record.deleted_while_live() == set()
        outcomes = {r["task_id"]: r["outcome"] for r in rows}
        assert {t: outcomes[t] for t in CHANGES} == dict.fromkeys(CHANGES, "skipped_changed")
        assert set(server.record.directories_removed()) == {task_id(n) for n in range(16)} - set(
            CHANGES
        )


class TestVerificationListing:
    """delete.verify: always lists again right after deleting."""

    def test_noticed_at_once_and_deleted_again_as_ours(self, database_url: str) -> None:
        """The failed row updates are corrected by the first run's own verification listing; the
        next run deletes those tasks again and, the server finding nothing left to delete,
        records them ``deleted``: reaper's first request removed their directories."""
        not_done = [task_id(2), task_id(5)]
        server = IndependentServer(ZONE, Behaviour(row_update_fails=dict.fromkeys(not_done, 1)))
        for n in range(8):
            server.add(task_id(n), "completed", OLD + timedelta(hours=n))
        try:
            first, _ = one_run(server, database_url, delete={"verify": "always"})
            second, rows = one_run(server, database_url, delete={"verify": "always"})
        finally:
            server.stop()
        assert first.summary.acknowledged_not_deleted == 2
        assert second.summary.acknowledged_not_deleted == 0
        assert server.record.acknowledged_not_done() == set(not_done)
        outcomes = last_outcomes(rows)
        assert {t: outcomes[t] for t in not_done} == dict.fromkeys(not_done, "deleted")
        assert {t for t, o in outcomes.items() if o == "deleted"} == set(
            server.record.directories_removed()
        )


class TestStalenessBound:
    """With target.recheck.max_staleness: 1s, a task re-executed while an earlier slow batch is
    deleted is not sent: its batch leaves more than a second after the change (the server takes
    1.2 s over the batch before), so the check that cleared it was made after the change."""

    def test_change_during_the_run_is_seen(self, database_url: str) -> None:
        """Re-executed when the first delete request arrives; due in the next batch: not sent."""
        changed = task_id(1)  # in the second batch (oldest first: ids 5..3, then 2..0)
        behaviour = Behaviour(rerun_on_delete={changed: (1, None)}, per_id_seconds=0.4)
        server = IndependentServer(ZONE, behaviour)
        for n in range(6):
            server.add(task_id(n), "completed", OLD + timedelta(hours=n))
        try:
            result, rows = one_run(
                server,
                database_url,
                target={"recheck": {"max_staleness": "1s"}},
                delete={"batch_size": 3, "concurrency": 1},
            )
        finally:
            server.stop()
        assert result.error is None
        first = server.record.deletes[0]
        assert changed not in first.task_ids
        assert changed not in server.record.sent()
        assert server.record.deleted_while_live() == set()
        assert {r["task_id"]: r["outcome"] for r in rows}[changed] == "skipped_changed"


class TestGatewayTimeout:
    """A slow synchronous batch: the gateway answers 504 while the server keeps deleting."""

    def test_no_overlap_and_the_audit_catches_up(self, database_url: str) -> None:
        """The batch's ids are ``unknown``; a run started while the server is still working on
        them (a Job retried after exit 1, say) does not send them again, and once the server is
        done the audit equals its record."""
        behaviour = Behaviour(gateway_timeout=0.2, gate=threading.Event())
        server = IndependentServer(ZONE, behaviour)
        for n in range(4):
            server.add(task_id(n), "completed", OLD + timedelta(hours=n))
        sections: dict[str, Any] = {"delete": {"batch_size": 4, "concurrency": 1}}
        try:
            first, _ = one_run(server, database_url, **sections)
            one_run(server, database_url, **sections)  # while the server is still busy
            server.finish_work()
            _, rows = one_run(server, database_url, **sections)
        finally:
            server.stop()
        assert first.summary.unknown == 4
        assert server.record.overlapping() == []
        assert len(server.record.deletes) == 1
        removed = server.record.directories_removed()
        assert set(removed) == {task_id(n) for n in range(4)}
        recorded = {t for t, o in last_outcomes(rows).items() if o == "deleted"}
        assert recorded == set(removed)
