"""Snapshots: each deletion's audit row keeps the task's record as the target listed it (JSON,
bounded), covered by the hash chain and shown by `reaper explain` (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import structlog
import structlog.testing
import yaml
from conftest import NOW, make_policy, policy_doc, sim_task
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select, update
from test_cli import reaper

from reaper import snapshots as spool_module
from reaper.audit import AuditStore, audit_table
from reaper.http import TargetHttp
from reaper.plan import OMITTED, Planner, snapshot_of
from reaper.runner import Mode, RunStatus, run_policy
from reaper.simulators import DataPipelineSimulator
from reaper.snapshots import Snapshots
from reaper.targets.base import Task
from reaper.targets.data_pipeline import DataPipelineTarget

Start = Callable[..., tuple[DataPipelineSimulator, str]]
URL = "http://127.0.0.1:8084"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def compact(value: Any) -> bytes:
    """The reference encoding: the standard library's compact JSON, ASCII (its default)."""
    return json.dumps(value, separators=(",", ":")).encode()


class TestSnapshotOf:
    @given(st.dictionaries(st.text(max_size=10), json_values, max_size=8))
    def test_a_record_that_fits_is_kept_as_compact_json(self, record: dict[str, Any]) -> None:
        """A record within the bound is its compact ASCII JSON, as the standard library writes
        it (other characters escaped: one byte each wherever the snapshot is held)."""
        expected = compact(record)
        if len(expected) <= 4096:
            assert snapshot_of(record) == expected

    def test_a_large_record_leaves_out_its_largest_fields(self) -> None:
        """Over the bound, the largest fields go first, and are named; the rest stay whole."""
        record = {"task_id": "t1", "status": "completed", "log": "x" * 5000, "args": "y" * 3000}
        snapshot = snapshot_of(record)
        assert snapshot is not None and len(snapshot) <= 4096
        assert json.loads(snapshot) == {
            "task_id": "t1",
            "status": "completed",
            "args": "y" * 3000,
            OMITTED: ["log"],
        }
        both = snapshot_of(record | {"args": "y" * 4090})
        assert both is not None
        assert json.loads(both) == {
            "task_id": "t1",
            "status": "completed",
            OMITTED: ["log", "args"],
        }

    def test_what_cannot_fit_is_named_by_its_size(self) -> None:
        """A record that does not fit even without its largest fields (or is not an object) is
        replaced by its size."""
        many = {f"f{i:04d}": i for i in range(1000)}
        assert json.loads(snapshot_of(many, limit=64) or b"") == {
            OMITTED: True,
            "bytes": len(compact(many)),
        }
        assert json.loads(snapshot_of(["z" * 5000]) or b"") == {OMITTED: True, "bytes": 5004}
        assert snapshot_of(None) is None

    def test_integers_beyond_64_bits_are_kept(self) -> None:
        """JSON allows any integer; the record keeps it as listed."""
        assert snapshot_of({"size": 2**70}) == compact({"size": 2**70})


def planner(snapshots: bool, **sections: Any) -> Planner:
    loaded = make_policy(URL, **sections)
    target = DataPipelineTarget(loaded.policy.target_config, cast(TargetHttp, None))
    return Planner(loaded, target, NOW, snapshots=snapshots)


def tid(n: int) -> str:
    return f"task_20250101_{n:06d}"


class TestPlanKeepsSnapshots:
    def test_only_eligible_tasks_in_deletion_order(self) -> None:
        """With snapshots, each candidate carries its own record (kept through the oldest-first
        order, keep-newest-N and restriction); kept tasks' records are not held."""
        plan = planner(True, keep={"newest": 1})
        for n, age in enumerate([40, 50, 45, 60, 35]):  # the newest (4) is kept
            raw = {"task_id": tid(n), "n": n}
            plan.add(Task(tid(n), "completed", NOW - timedelta(days=age), raw=raw))
        result = plan.finish()
        candidates = list(result.candidates())
        assert [c.task_id for c in candidates] == [tid(3), tid(1), tid(2), tid(0)]
        assert [json.loads(c.snapshot or "")["n"] for c in candidates] == [3, 1, 2, 0]
        restricted = result.restrict({tid(1)})
        assert [json.loads(c.snapshot or "") for c in restricted.candidates()] == [
            {"task_id": tid(1), "n": 1}
        ]

    def test_a_plan_for_review_keeps_none(self) -> None:
        """Without snapshots (plan, dry run) no record is kept."""
        plan = planner(False)
        plan.add(Task(tid(1), "completed", NOW - timedelta(days=40), raw={"a": 1}))
        assert [c.snapshot for c in plan.finish().candidates()] == [None]


def old(n: int) -> list[Any]:
    return [sim_task(f"task_20260901_{i:06d}", age=timedelta(days=40, minutes=i)) for i in range(n)]


def listed_records(url: str) -> dict[str, Any]:
    """The records as the simulator serves them, read over HTTP independently of reaper."""
    response = httpx.get(f"{url}/api/v0/data_pipeline/tasks", params={"limit": 1000})
    return {record["task_id"]: record for record in response.json()["data"]["tasks"]}


class TestRuns:
    def test_each_deletion_row_keeps_the_listed_record(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """Every deleted row's snapshot is the record the target served for that task; the chain
        covers it; a dry run keeps none."""
        _, url = data_pipeline(old(12))
        served = listed_records(url)
        dry = asyncio.run(run_policy(make_policy(url), store, now=NOW, mode=Mode.DRY_RUN))
        result = asyncio.run(run_policy(make_policy(url), store, now=NOW))
        assert result.status is RunStatus.SUCCEEDED, result.error
        with store.engine.connect() as connection:
            rows = list(connection.execute(select(audit_table)))
        deleted = [row for row in rows if row.run_id == result.run_id]
        assert len(deleted) == 12 and {row.outcome for row in deleted} == {"deleted"}
        for row in deleted:
            assert json.loads(row.snapshot) == served[row.task_id]
        assert {row.snapshot for row in rows if row.run_id == dry.run_id} == {None}
        assert store.verify() == []
        with store.engine.begin() as connection:
            edited = json.loads(deleted[3].snapshot) | {"status": "in_progress"}
            connection.execute(
                update(audit_table)
                .where(audit_table.c.id == deleted[3].id)
                .values(snapshot=json.dumps(edited))
            )
        [problem] = store.verify()
        assert problem.task_id == deleted[3].task_id

    def test_explain_shows_the_snapshot(
        self, data_pipeline: Start, tmp_path: Path, database_url: str
    ) -> None:
        """`reaper explain` prints the record as listed, and returns it as JSON data."""
        sim, url = data_pipeline(old(2))
        served = listed_records(url)
        (tmp_path / "policies").mkdir()
        (tmp_path / "policies" / "p.yaml").write_text(
            yaml.safe_dump(policy_doc(url)), encoding="utf-8"
        )
        env = {"REAPER_DATABASE_URL": database_url, "REAPER_POLICIES": str(tmp_path / "policies")}
        assert reaper("run", env=env).returncode == 0
        task_id = sorted(sim.deleted_ids)[0]
        [entry] = json.loads(reaper("explain", task_id, "--output", "json", env=env).stdout)
        assert entry["snapshot"] == served[task_id]
        text = reaper("explain", task_id, env=env).stdout
        assert "record as listed: {" in text and f'"task_id": "{task_id}"' in text


class TestSpool:
    """reaper.snapshots: a plan's records by position, in a temporary file past a bound."""

    def records(self, n: int) -> list[bytes | None]:
        return [
            None if i % 7 == 3 else json.dumps({"task_id": f"t{i}", "名": "x" * i}).encode()
            for i in range(n)
        ]

    def test_records_read_back_in_memory_and_on_disk(self) -> None:
        """Every record (and every absent one) reads back as appended, before and after the
        column moves to a temporary file; a taken column picks and orders without copying."""
        records = self.records(200)
        column = Snapshots(in_memory=1024)
        for record in records[:5]:
            column.append(record)
        assert not column.on_disk and [column[i] for i in range(5)] == records[:5]
        for record in records[5:]:
            column.append(record)
        assert column.on_disk and len(column) == 200
        assert [column[i] for i in range(200)] == records
        order = [199, 3, 0, 150, 150]
        taken = column.take(order)
        assert [taken[i] for i in range(len(order))] == [records[i] for i in order]
        assert [taken.take([1, 0])[i] for i in range(2)] == [records[3], records[199]]

    def test_without_a_temporary_file_the_records_stay_in_memory(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A read-only filesystem: one warning, and the records are kept in memory."""

        def refuse() -> Any:
            raise OSError(30, "Read-only file system")

        monkeypatch.setattr(spool_module.tempfile, "TemporaryFile", refuse)
        records = self.records(100)
        column = Snapshots(in_memory=256)
        with structlog.testing.capture_logs() as logged:
            for record in records:
                column.append(record)
        assert not column.on_disk
        assert [column[i] for i in range(100)] == records
        assert [entry["event"] for entry in logged] == ["snapshots_in_memory"]

    def test_reads_from_threads_while_appending(self) -> None:
        """The audit's worker thread reads while the event loop's plan appends."""
        records = self.records(400)
        column = Snapshots(in_memory=512)
        for record in records[:200]:
            column.append(record)
        seen: list[bool] = []

        def read() -> None:
            seen.append(all(column[i] == records[i] for i in range(200)))

        threads = [threading.Thread(target=read) for _ in range(4)]
        for thread in threads:
            thread.start()
        for record in records[200:]:
            column.append(record)
        for thread in threads:
            thread.join()
        assert seen == [True] * 4
        assert [column[i] for i in range(400)] == records
