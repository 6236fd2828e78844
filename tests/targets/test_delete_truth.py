"""Delete-time truth: what reaper sends and records when the target changes or misreports.

Every scenario runs against the project's simulators over real HTTP on 127.0.0.1, on SQLite and
on PostgreSQL. The expected values come from the target's documented behaviour (TARGETS.md) and
the simulator's own record of what it did, never from reaper's code:

* A. no id is sent whose task the target would report live or no longer eligible at send time;
* B. a deletion the target acknowledged but did not carry out is noticed and corrected;
* C. each id gets its own outcome; a delete carried out then answered 5xx is ``deleted``;
* D. a synchronous server's batch is not sent again while it may still be running.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from conftest import NOW, make_policy, sim_task
from sqlalchemy import select

from reaper.audit import AuditStore, audit_table, runs_table
from reaper.policy import LoadedPolicy
from reaper.runner import PolicyRun, RunStatus, reconcile_policy, run_policy
from reaper.simulators import DataPipelineSimulator, Faults, HuaweiDcsSimulator
from reaper.simulators.base import Response
from reaper.simulators.data_pipeline import SimTask

Start = Callable[..., tuple[DataPipelineSimulator, str]]
Sim = Callable[..., tuple[Any, str]]
Policy = Callable[..., LoadedPolicy]
PROJECT = "0123456789abcdef0123456789abcdef"


def run(loaded: LoadedPolicy, store: AuditStore, **kwargs: Any) -> PolicyRun:
    return asyncio.run(run_policy(loaded, store, now=NOW, **kwargs))


def rows(store: AuditStore, run_id: str | None = None) -> list[dict[str, Any]]:
    query = select(audit_table).order_by(audit_table.c.id)
    if run_id is not None:
        query = query.where(audit_table.c.run_id == run_id)
    with store.engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(query)]


def runs(store: AuditStore) -> list[dict[str, Any]]:
    with store.engine.connect() as connection:
        query = select(runs_table).order_by(runs_table.c.started_at)
        return [dict(row._mapping) for row in connection.execute(query)]


def latest_outcomes(store: AuditStore) -> dict[str, str]:
    """Each task's latest final outcome across runs (corrections included)."""
    latest: dict[str, str] = {}
    for row in rows(store):
        latest[row["task_id"]] = row["outcome"]
    return latest


def deleted_per_audit(store: AuditStore) -> set[str]:
    return {task for task, outcome in latest_outcomes(store).items() if outcome == "deleted"}


def old_tasks(count: int, status: str = "completed", day: int = 1) -> list[SimTask]:
    return [
        sim_task(f"task_202609{day:02d}_{i:06d}", status=status, age=timedelta(days=40, minutes=i))
        for i in range(count)
    ]


def dp_policy(url: str, **target: Any) -> LoadedPolicy:
    settings = {"type": "data_pipeline", "base_url": url, "timestamps_timezone": "UTC", **target}
    settings.setdefault("retries", {"attempts": 3, "backoff": "0s", "max_backoff": "0s"})
    return make_policy(url, target=settings)


# --- A. live or no longer eligible at send time -------------------------------------------------


class TestLiveAtDeleteTime:
    def test_tasks_re_executed_after_the_listing_are_not_deleted(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """Finished tasks re-executed right after a listing showed them are dropped, not deleted
        while running; the others are deleted; the audit equals the server's record."""
        sim, url = data_pipeline(old_tasks(60), faults=Faults(reexecute_rate=0.25))
        result = run(dp_policy(url), store)
        assert sim.reexecuted  # the fault happened
        assert sim.live_deleted == []
        changed = {r["task_id"] for r in rows(store) if r["outcome"] == "skipped_changed"}
        assert changed == set(sim.reexecuted)
        assert set(sim.deleted_ids) == {t.task_id for t in old_tasks(60)} - changed
        assert deleted_per_audit(store) == set(sim.deleted_ids)
        assert result.summary.skipped_changed == len(changed)
        assert result.status is RunStatus.SUCCEEDED, result.error
        for row in rows(store):
            if row["outcome"] == "skipped_changed":
                assert "status in_progress" in row["note"]
                assert "re-checked at" in row["note"]
                assert row["task_status"] == "completed"  # as listed
        [run_row] = runs(store)
        assert run_row["skipped_changed"] == len(changed)

    def test_a_task_moved_to_an_unselected_status_is_not_deleted(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """Selected: completed only. A task executed again after the listing, and failed by the
        time its batch leaves, is not deleted (the server set its completed_at anew)."""
        tasks = old_tasks(5)
        sim, url = data_pipeline(tasks)
        loaded = make_policy(
            url,
            target={"type": "data_pipeline", "base_url": url, "timestamps_timezone": "UTC"},
            select={"status": ["completed"], "older_than": "30d"},
        )

        def fail_one(plan: Any) -> None:
            sim.reexecute(tasks[2].task_id)
            sim.finish(tasks[2].task_id, "failed")

        result = run(loaded, store, on_plan=fail_one)
        assert tasks[2].task_id not in sim.deleted_ids
        assert len(sim.deleted_ids) == 4
        [row] = [r for r in rows(store) if r["outcome"] == "skipped_changed"]
        assert row["task_id"] == tasks[2].task_id
        assert "status failed not selected" in row["note"]
        assert result.status is RunStatus.SUCCEEDED, result.error

    def test_a_task_that_ran_again_and_completed_is_judged_on_its_new_age(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """Aged on completed_at: a task re-executed and completed again after the listing is
        young now (the server set completed_at anew), so it is not deleted."""
        tasks = old_tasks(4)
        sim, url = data_pipeline(tasks)
        loaded = make_policy(
            url,
            target={"type": "data_pipeline", "base_url": url, "timestamps_timezone": "UTC"},
            select={"status": ["completed"], "older_than": "30d", "age_field": "completed_at"},
        )

        def run_again(plan: Any) -> None:
            sim.reexecute(tasks[1].task_id)
            sim.finish(tasks[1].task_id, "completed")

        # Planned at the real time (the simulator's clock): the new completed_at is moments old.
        result = asyncio.run(run_policy(loaded, store, on_plan=run_again))
        assert tasks[1].task_id not in sim.deleted_ids
        assert len(sim.deleted_ids) == 3
        [row] = [r for r in rows(store) if r["outcome"] == "skipped_changed"]
        assert "kept: younger than" in row["note"]
        assert result.status is RunStatus.SUCCEEDED, result.error

    def test_without_the_query_endpoint_every_excluded_status_is_listed_again(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """verify_total: false (no query endpoint): the re-check lists every status the
        policy does not delete, so a task now failed is seen even without a new completed_at."""
        tasks = old_tasks(5)
        sim, url = data_pipeline(tasks)
        loaded = make_policy(
            url,
            target={
                "type": "data_pipeline",
                "base_url": url,
                "timestamps_timezone": "UTC",
                "verify_total": False,
            },
            select={"status": ["completed"], "older_than": "30d"},
        )

        def flip(plan: Any) -> None:
            task = sim.task(tasks[0].task_id)
            assert task is not None
            task.status = "failed"
            sim.reindex()

        run(loaded, store, on_plan=flip)
        assert tasks[0].task_id not in sim.deleted_ids
        assert len(sim.deleted_ids) == 4

    def test_few_ids_and_many_live_tasks_are_checked_one_by_one(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """Re-listing 400 in_progress tasks (5 pages) costs more than 3 GETs: each of the 3
        tasks is fetched (GET .../tasks/{task_id}) and the one now running is not sent."""
        running = [
            sim_task(f"task_20260902_{i:06d}", status="in_progress", age=timedelta(days=40))
            for i in range(400)
        ]
        eligible = old_tasks(3)
        sim, url = data_pipeline([*running, *eligible])
        result = run(
            dp_policy(url),
            store,
            on_plan=lambda plan: sim.reexecute(eligible[0].task_id),
        )
        assert sim.stats["get_requests"] == 3
        assert sim.live_deleted == []
        assert set(sim.deleted_ids) == {eligible[1].task_id, eligible[2].task_id}
        assert result.summary.skipped_changed == 1

    def test_the_recheck_shares_the_rate_limit(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """Listing, re-check and deletion at the server's own limit: no 429."""
        sim, url = data_pipeline(old_tasks(40), faults=Faults(rate_limit=40))
        loaded = make_policy(
            url,
            target={"type": "data_pipeline", "base_url": url, "timestamps_timezone": "UTC"},
            delete={"batch_size": 5, "rate": "40/s"},
        )
        result = run(loaded, store)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert sim.stats["status_429"] == 0
        assert len(sim.deleted_ids) == 40

    def test_iotda_needs_no_recheck_because_its_server_refuses_unfinished_tasks(
        self, iotda_sim: Sim, iotda_policy: Policy, make_iotda_task: Any, store: AuditStore
    ) -> None:
        """IoTDA itself refuses to delete an unfinished batch task (400): reaper makes no
        re-check request, and a task that started again is refused by the server, recorded
        failed with the server's code, never deleted."""
        tasks = [make_iotda_task() for _ in range(3)]
        sim, url = iotda_sim(tasks)
        lists_before: list[int] = []

        def restart(plan: Any) -> None:
            lists_before.append(sim.stats["list_requests"])
            sim.set_status(tasks[0].task_id, "Processing")

        result = run(iotda_policy(url), store, on_plan=restart)
        assert sim.stats["list_requests"] == lists_before[0]  # no re-check listing
        assert sim.refused_unfinished == [tasks[0].task_id]
        assert set(sim.deleted_ids) == {tasks[1].task_id, tasks[2].task_id}
        outcome = {r["task_id"]: r for r in rows(store)}
        assert outcome[tasks[0].task_id]["outcome"] == "failed"
        assert outcome[tasks[0].task_id]["error_code"] == "IOTDA.014111"
        assert result.status is RunStatus.PARTIAL

    def test_dcs_rechecks_the_creation_window_of_the_ids_due(
        self, dcs_sim: Sim, dcs_policy: Policy, make_dcs_task: Any, store: AuditStore
    ) -> None:
        """A DCS task deleted by someone else after the listing is not sent (already_gone), and
        one back to EXECUTING is dropped; one request covers the window."""
        tasks = [make_dcs_task(f"t{i}", "SUCCESS", timedelta(days=40, minutes=i)) for i in range(5)]
        sim, url = dcs_sim(tasks)

        def change(plan: Any) -> None:
            with sim.lock:
                sim._tasks["t1"].status = "EXECUTING"
                del sim._tasks["t3"]
                sim._order = None

        result = run(dcs_policy(url), store, on_plan=change)
        assert set(sim.deleted_ids) == {"t0", "t2", "t4"}
        outcome = {r["task_id"]: r["outcome"] for r in rows(store)}
        assert outcome == {
            "t0": "deleted",
            "t1": "skipped_changed",
            "t2": "deleted",
            "t3": "already_gone",
            "t4": "deleted",
        }
        assert result.status is RunStatus.SUCCEEDED, result.error


# --- B. acknowledged, not done -------------------------------------------------------------------


class TestAcknowledgedNotDone:
    def test_a_failed_database_update_is_noticed_corrected_and_deleted_again(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """The real server reports the id deleted although its row update failed: the next
        run's listing still shows the task, records a correction naming the first run, deletes
        it again, and the audit ends equal to the server's record; the chains verify."""
        tasks = old_tasks(6)
        sim, url = data_pipeline(tasks, faults=Faults(db_update_failure_rate=1.0))
        loaded = dp_policy(url)
        first = run(loaded, store)
        assert first.summary.deleted == 6
        assert sorted(sim.db_update_failed) == sorted(t.task_id for t in tasks)
        sim.set_faults(Faults())

        second = run(loaded, store)
        assert second.summary.acknowledged_not_deleted == 6
        assert second.summary.deleted == 6
        correction = [r for r in runs(store) if r["mode"] == "correction"]
        assert len(correction) == 1
        assert correction[0]["acknowledged_not_deleted"] == 6
        fixes = rows(store, correction[0]["id"])
        assert {r["outcome"] for r in fixes} == {"not_deleted"}
        assert all(first.run_id in r["note"] for r in fixes)
        # Every task is now deleted on the server's own record, and in the audit.
        assert all(not t.directory_exists for t in sim.tasks)
        assert deleted_per_audit(store) == {t.task_id for t in tasks}
        [second_row] = [r for r in runs(store) if r["id"] == second.run_id]
        assert second_row["acknowledged_not_deleted"] == 6
        assert store.verify() == []
        # Nothing is flagged twice.
        third = run(loaded, store)
        assert third.summary.acknowledged_not_deleted == 0

    def test_acknowledged_without_effect_is_deleted_again(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """Acknowledged, nothing done: corrected, eligible again, deleted for real."""
        tasks = old_tasks(8)
        sim, url = data_pipeline(tasks, faults=Faults(ack_without_effect_rate=0.5))
        loaded = dp_policy(url)
        run(loaded, store)
        not_done = set(sim.acknowledged_not_done)
        assert not_done
        sim.set_faults(Faults())
        second = run(loaded, store)
        assert second.summary.acknowledged_not_deleted == len(not_done)
        assert set(sim.deleted_ids) == {t.task_id for t in tasks}
        assert deleted_per_audit(store) == set(sim.deleted_ids)

    def test_reaper_reconcile_notices_too(self, data_pipeline: Start, store: AuditStore) -> None:
        """`reaper reconcile`'s listing notices acknowledged deletions that did not happen."""
        tasks = old_tasks(4)
        _, url = data_pipeline(tasks, faults=Faults(ack_without_effect_rate=1.0))
        loaded = dp_policy(url)
        run(loaded, store)
        report = asyncio.run(reconcile_policy(loaded, store))
        assert report.acknowledged_not_deleted == 4
        assert report.correction_run is not None
        assert {r["task_id"] for r in rows(store, report.correction_run)} == {
            t.task_id for t in tasks
        }
        # The correction run remembers how far it checked: a second reconcile flags nothing.
        again = asyncio.run(reconcile_policy(loaded, store))
        assert again.acknowledged_not_deleted == 0

    def test_a_cheap_verification_listing_right_after_deleting(
        self, dcs_sim: Sim, dcs_policy: Policy, make_dcs_task: Any, store: AuditStore
    ) -> None:
        """DCS deletes one id per request and lists 1000 per page: a listing after the
        deletions is cheap, and it notices at once what the server did not delete."""
        tasks = [
            make_dcs_task(f"t{i:02d}", "SUCCESS", timedelta(days=40, minutes=i)) for i in range(20)
        ]
        sim, url = dcs_sim(tasks, faults=Faults(ack_without_effect_rate=0.3))
        result = run(dcs_policy(url), store)
        not_done = set(sim.acknowledged_not_done)
        assert not_done
        assert result.summary.acknowledged_not_deleted == len(not_done)
        corrected = {r["task_id"] for r in rows(store) if r["outcome"] == "not_deleted"}
        assert corrected == not_done
        assert store.verify() == []


# --- C. exact per-id outcomes --------------------------------------------------------------------


class TestPerIdOutcomes:
    @pytest.mark.parametrize("kind", ["huawei_dcs", "huawei_iotda"])
    def test_acted_then_504_is_recorded_deleted(
        self,
        kind: str,
        dcs_sim: Sim,
        dcs_policy: Policy,
        make_dcs_task: Any,
        iotda_sim: Sim,
        iotda_policy: Policy,
        make_iotda_task: Any,
        store: AuditStore,
    ) -> None:
        """The service deleted the task, then answered 504; the retry's 404 confirms our own
        deletion: deleted (never already_gone), noted, and equal to the server's record."""
        if kind == "huawei_dcs":
            sim, url = dcs_sim(
                [make_dcs_task(f"t{i}") for i in range(8)], faults=Faults(act_then_504_rate=1.0)
            )
            loaded = dcs_policy(url)
        else:
            sim, url = iotda_sim(
                [make_iotda_task() for _ in range(8)], faults=Faults(act_then_504_rate=1.0)
            )
            loaded = iotda_policy(url)
        result = run(loaded, store)
        outcomes = Counter(r["outcome"] for r in rows(store))
        assert outcomes == {"deleted": 8}
        assert deleted_per_audit(store) == set(sim.deleted_ids)
        assert all("HTTP 504" in r["note"] for r in rows(store))
        assert result.status is RunStatus.SUCCEEDED, result.error

    def test_retries_that_end_in_5xx_are_unknown_then_reconciled(
        self, creds: Any, dcs_policy: Policy, make_dcs_task: Any, store: AuditStore
    ) -> None:
        """Every delete attempt answered 503: the server may have acted, so unknown, never
        failed; reconciliation then settles each one from a listing (still there)."""

        class Unavailable(HuaweiDcsSimulator):
            def _delete(self, request: Any) -> Response:
                self.record_delete_request(request.params["task_id"])
                return self.error(503, "DCS.5030", "service unavailable")

        sim = Unavailable(
            [make_dcs_task(f"t{i}") for i in range(3)],
            project_id=PROJECT,
            credentials={creds.ak: creds.sk},
        )
        with sim.serve() as url:
            loaded = dcs_policy(url, target={"retries": {"attempts": 2, "backoff": "0s"}})
            result = run(loaded, store)
            assert Counter(r["outcome"] for r in rows(store)) == {"unknown": 3}
            assert result.status is RunStatus.PARTIAL
            assert sum(sim.delete_requests_by_id.values()) == 6  # 2 attempts each
            report = asyncio.run(reconcile_policy(loaded, store))
        assert report.not_deleted == 3  # still present: the 503s did nothing
        assert sim.deleted_ids == []

    def test_data_pipeline_database_rows_are_recorded_as_the_server_reports(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """delete_database_records: true, and the server says it deleted the rows: noted."""
        tasks = old_tasks(2)
        sim, url = data_pipeline(tasks)
        loaded = make_policy(
            url,
            target={"type": "data_pipeline", "base_url": url, "timestamps_timezone": "UTC"},
            delete={
                "batch_size": 10,
                "rate": "200/s",
                "options": {"delete_database_records": True},
            },
        )
        run(loaded, store)
        notes = [r["note"] for r in rows(store)]
        assert all("database rows deleted (database_records_deleted: true)" in n for n in notes)
        assert sim.tasks == []

    def test_a_delete_answer_of_the_wrong_shape_is_unknown(self, store: AuditStore) -> None:
        """A task_id that is a list in deleted_tasks: the batch's ids are unknown, with the
        parse error; the run ends normally (no exception)."""

        class ListIds(DataPipelineSimulator):
            def _delete(self, request: Any) -> Response:
                response = super()._delete(request)
                body = json.loads(response.body)
                for entry in body["data"]["deleted_tasks"]:
                    entry["task_id"] = [entry["task_id"]]
                return Response.json(body)

        sim = ListIds(old_tasks(3), timezone="UTC")
        with sim.serve() as url:
            result = run(dp_policy(url), store)
        assert Counter(r["outcome"] for r in rows(store)) == {"unknown": 3}
        assert all("not an object with a string task_id" in r["error_message"] for r in rows(store))
        assert result.status is RunStatus.PARTIAL


# --- D. a synchronous server ------------------------------------------------------------------


class TestSynchronousServer:
    def test_a_timed_out_batch_is_not_sent_again(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """The server needs 2 s for a batch of 5; the request times out after 1 s: its ids are
        unknown, the batch is not sent again while the server is still working, and
        reconciliation finds them deleted."""
        tasks = old_tasks(5)
        sim, url = data_pipeline(tasks, faults=Faults(delete_ms_per_id=400))
        loaded = make_policy(
            url,
            target={
                "type": "data_pipeline",
                "base_url": url,
                "timestamps_timezone": "UTC",
                "timeout": "1s",
                "delete_timeout_per_id": "0s",
                "retries": {"attempts": 5, "backoff": "0s", "max_backoff": "0s"},
            },
        )
        result = run(loaded, store)
        assert sim.stats["delete_requests"] == 1
        assert sim.overlapping_deletes == 0
        assert Counter(r["outcome"] for r in rows(store)) == {"unknown": 5}
        assert result.status is RunStatus.PARTIAL
        sim.set_faults(Faults())
        # Wait for the server to finish the batch the client gave up on.
        for _ in range(100):
            if len(sim.deleted_ids) == 5:
                break
            asyncio.run(asyncio.sleep(0.05))
        report = asyncio.run(reconcile_policy(loaded, store))
        assert report.deleted == 5
        assert deleted_per_audit(store) == set(sim.deleted_ids)

    def test_a_run_while_the_server_still_works_does_not_send_again(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """The next run, started while the server still works on the timed-out batch, keeps
        those tasks out (protected: the earlier request may still be running) and leaves their
        rows unknown; once the server is done, a run settles them deleted."""
        tasks = old_tasks(4)
        sim, url = data_pipeline(tasks, faults=Faults(delete_ms_per_id=500))
        target = {
            "type": "data_pipeline",
            "base_url": url,
            "timestamps_timezone": "UTC",
            "timeout": "1s",
            "delete_timeout_per_id": "0s",
            "retries": {"attempts": 3, "backoff": "0s", "max_backoff": "0s"},
        }
        loaded = make_policy(url, target=target, delete={"batch_size": 10, "rate": "200/s"})
        first = run(loaded, store)
        assert first.summary.unknown == 4
        second = run(loaded, store)  # the server is still deleting (4 x 500 ms)
        assert second.plan is not None
        held = [
            reason
            for (verdict, reason), n in second.plan.counts.items()
            if "may still be running" in reason
        ]
        assert held, second.plan.counts
        assert sim.stats["delete_requests"] == 1
        assert sim.overlapping_deletes == 0
        # Those the server had finished are settled deleted; the others wait (never not_deleted).
        settled = {r["task_id"]: r["outcome"] for r in rows(store)}
        assert set(settled.values()) <= {"unknown", "deleted"}
        assert {t for t, o in settled.items() if o == "deleted"} <= set(sim.deleted_ids)
        for _ in range(100):
            if len(sim.deleted_ids) == 4:
                break
            asyncio.run(asyncio.sleep(0.05))
        run(loaded, store)
        assert deleted_per_audit(store) == {t.task_id for t in tasks} == set(sim.deleted_ids)

    def test_after_settle_after_a_task_still_there_is_eligible_again(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """Past target.settle_after, a task still listed was not deleted: not_deleted, and the
        run deletes it again."""
        tasks = old_tasks(2)
        sim, url = data_pipeline(tasks, faults=Faults(act_then_504_rate=1.0))
        target = {
            "type": "data_pipeline",
            "base_url": url,
            "timestamps_timezone": "UTC",
            "settle_after": "1s",
        }
        loaded = make_policy(url, target=target)
        # The gateway answers 504 without the service acting: turn the 504 on, the work off.
        sim.set_faults(Faults(act_then_504_rate=1.0, ack_without_effect_rate=1.0))
        first = run(loaded, store)
        assert first.summary.unknown == 2
        sim.set_faults(Faults())
        asyncio.run(asyncio.sleep(1.1))
        second = run(loaded, store)
        assert second.summary.deleted == 2
        outcomes = [r["outcome"] for r in rows(store)]
        assert outcomes.count("not_deleted") == 2
        assert set(sim.deleted_ids) == {t.task_id for t in tasks}

    def test_the_timeout_grows_with_the_batch(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """With the per-id budget (default 1 s an id), the same slow batch completes."""
        _, url = data_pipeline(old_tasks(5), faults=Faults(delete_ms_per_id=400))
        loaded = make_policy(
            url,
            target={
                "type": "data_pipeline",
                "base_url": url,
                "timestamps_timezone": "UTC",
                "timeout": "1s",
            },
        )
        result = run(loaded, store)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert Counter(r["outcome"] for r in rows(store)) == {"deleted": 5}

    def test_default_batch_is_at_most_100(self) -> None:
        """The data_pipeline default batch size is at most 100 ids (50)."""
        loaded = make_policy("http://sim.invalid", delete={"rate": "5/s"})
        assert loaded.policy.batch_size <= 100
        assert loaded.policy.batch_size == 50
