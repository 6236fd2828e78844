"""The huawei_iotda target: task types, marker paging, the finished-only rail, whole runs."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml
from conftest import NOW
from sqlalchemy import select

from reaper.audit import AuditStore, audit_table
from reaper.errors import PolicyError
from reaper.policy import LoadedPolicy, load_policy_text
from reaper.runner import PolicyRun, RunStatus, run_policy
from reaper.simulators import Faults, HuaweiIotdaSimulator, IotdaSimTask
from reaper.targets.base import DeleteOptions, ListRequest, Outcome, Target
from reaper.targets.huawei import parse_compact_time
from reaper.targets.huawei_iotda import HuaweiIotdaTarget

Sim = Callable[..., tuple[HuaweiIotdaSimulator, str]]
Policy = Callable[..., LoadedPolicy]
PROJECT = "0123456789abcdef0123456789abcdef"
FINISHED = ["Success", "Fail", "PartialSuccess", "Stopped"]


def run(loaded: LoadedPolicy, store: AuditStore, **kwargs: Any) -> PolicyRun:
    return asyncio.run(run_policy(loaded, store, now=NOW, **kwargs))


def audit_rows(store: AuditStore) -> list[dict[str, Any]]:
    with store.engine.connect() as connection:
        rows = connection.execute(select(audit_table).order_by(audit_table.c.seq))
        return [dict(row._mapping) for row in rows]


def many(make: Callable[..., IotdaSimTask], count: int, **kwargs: Any) -> list[IotdaSimTask]:
    return [make(age=timedelta(days=40, minutes=i), **kwargs) for i in range(count)]


def load(target: dict[str, Any], statuses: list[str] | None = None, **select: Any) -> LoadedPolicy:
    doc = {
        "name": "iotda",
        "target": {
            "type": "huawei_iotda",
            "endpoint": "https://iotda.cn-north-4.myhuaweicloud.com",
            "project_id": PROJECT,
            "auth": {"type": "token", "token_env": "T"},
            "task_types": ["firmwareUpgrade"],
            **target,
        },
        "select": {"status": statuses or ["Success"], "older_than": "30d", **select},
    }
    [loaded] = load_policy_text(yaml.safe_dump(doc))
    return loaded


class TestConfig:
    @pytest.mark.parametrize("status", ["Processing", "Waitting", "Initializing", "Stopping"])
    def test_unfinished_statuses_cannot_be_selected(self, status: str) -> None:
        """A policy naming an unfinished status fails validation, even with allow_live."""
        with pytest.raises(PolicyError, match=f"never deletes tasks in status '{status}'"):
            load({}, ["Success", status], allow_live=True)

    def test_task_types(self) -> None:
        """task_types is required, each a documented type, none twice."""
        with pytest.raises(PolicyError, match="task_types"):
            load({"task_types": []})
        with pytest.raises(PolicyError, match="task_types"):
            load({"task_types": ["rebootDevices"]})
        with pytest.raises(PolicyError, match="listed twice"):
            load({"task_types": ["createDevices", "createDevices"]})

    def test_describe_names_no_secret(self) -> None:
        """describe() is the endpoint, project and instance."""
        loaded = load({"instance_id": "inst-01"})
        assert loaded.policy.target_config.describe() == (
            f"https://iotda.cn-north-4.myhuaweicloud.com project {PROJECT} instance inst-01"
        )

    def test_timestamp_exact(self) -> None:
        """20151212T121212Z is UTC; anything else is refused."""
        assert parse_compact_time("20151212T121212Z") == datetime(
            2015, 12, 12, 12, 12, 12, tzinfo=UTC
        )
        for bad in ("2015-12-12T12:12:12Z", "20151212T121212", "20151312T121212Z", 20151212):
            with pytest.raises(ValueError):
                parse_compact_time(bad)

    @pytest.mark.parametrize(
        "task_id", ["5F8A3C2E1B0D4E6F7A8B9C0D", "5f8a3c2e1b0d4e6f7a8b9c0", "../x"]
    )
    def test_id_guard(self, task_id: str) -> None:
        """Only 24 lowercase hex characters are ever sent."""
        assert HuaweiIotdaTarget.invalid_id_reason(None, task_id) is not None  # type: ignore[arg-type]


class TestListing:
    def test_marker_paging_across_task_types(
        self, iotda_sim: Sim, iotda_policy: Policy, lister: Any, make_iotda_task: Any
    ) -> None:
        """Each covered type is walked by marker; an uncovered type is never listed."""
        firmware = many(make_iotda_task, 23, task_type="firmwareUpgrade")
        commands = many(make_iotda_task, 7, task_type="createCommands")
        other = many(make_iotda_task, 4, task_type="moduleUpgrade")
        sim, url = iotda_sim([*firmware, *commands, *other])
        tasks = lister(iotda_policy(url, target={"page_size": 10}))
        assert sorted(t.id for t in tasks) == sorted(t.task_id for t in [*firmware, *commands])
        queries = sim.list_queries
        assert [q["task_type"] for q in queries] == ["firmwareUpgrade"] * 3 + ["createCommands"]
        descending = sorted((t.task_id for t in firmware), reverse=True)
        assert [q["marker"] for q in queries[:3]] == ["f" * 24, descending[9], descending[19]]

    def test_instance_id_header(
        self, iotda_sim: Sim, iotda_policy: Policy, lister: Any, make_iotda_task: Any
    ) -> None:
        """instance_id is sent as Instance-Id (the simulator insists on it)."""
        _, url = iotda_sim(many(make_iotda_task, 3), instance_id="inst-01")
        assert len(lister(iotda_policy(url, target={"instance_id": "inst-01"}))) == 3

    def test_create_time_and_problems(
        self, iotda_sim: Sim, iotda_policy: Policy, lister: Any, make_iotda_task: Any
    ) -> None:
        """create_time is parsed exactly; a malformed one is reported as a problem."""
        good = make_iotda_task()
        bad = make_iotda_task(raw_create_time="2015-12-12 12:12:12")
        _, url = iotda_sim([good, bad])
        by_id = {t.id: t for t in lister(iotda_policy(url), ListRequest("create_time"))}
        assert by_id[good.task_id].timestamp == good.create_time
        assert by_id[bad.task_id].problem is not None


class TestDelete:
    def test_outcomes_and_the_finished_only_rail(
        self, iotda_sim: Sim, iotda_policy: Policy, with_target: Any, make_iotda_task: Any
    ) -> None:
        """204 deleted, 404 already gone; unfinished or unlisted ids are refused unsent."""
        done, gone, running = make_iotda_task(), make_iotda_task(), make_iotda_task("Processing")
        never_listed = "0" * 24
        sim, url = iotda_sim([done, gone, running])

        async def use(target: Target) -> Any:
            async for _ in target.list_tasks(ListRequest("create_time")):
                pass
            sim.remove(gone.task_id)  # listed, then deleted by someone else
            ids = [done.task_id, gone.task_id, running.task_id, never_listed]
            return (await target.delete(ids, DeleteOptions())).results

        results = with_target(iotda_policy(url), use)
        assert [(r.outcome, r.http_status) for r in results] == [
            (Outcome.DELETED, 204),
            (Outcome.ALREADY_GONE, 404),
            (Outcome.FAILED, None),
            (Outcome.FAILED, None),
        ]
        assert "listed as Processing" in (results[2].error_message or "")
        assert "not in this run's listing" in (results[3].error_message or "")
        assert set(sim.delete_requests_by_id) == {done.task_id, gone.task_id}

    def test_server_refusal_keeps_the_error_body(
        self, iotda_sim: Sim, iotda_policy: Policy, with_target: Any, make_iotda_task: Any
    ) -> None:
        """A task that restarted after listing is refused by IoTDA: error_code and msg kept."""
        task = make_iotda_task()
        sim, url = iotda_sim([task])

        async def use(target: Target) -> Any:
            async for _ in target.list_tasks(ListRequest("create_time")):
                pass
            sim.set_status(task.task_id, "Processing")
            return (await target.delete([task.task_id], DeleteOptions())).results

        [result] = with_target(iotda_policy(url), use)
        assert (result.outcome, result.http_status, result.error_code) == (
            Outcome.FAILED,
            400,
            "IOTDA.014111",
        )
        assert "only finished tasks" in (result.error_message or "")
        assert sim.refused_unfinished == [task.task_id]


class TestEndToEnd:
    def test_run_deletes_finished_tasks_only(
        self, iotda_sim: Sim, iotda_policy: Policy, make_iotda_task: Any, store: AuditStore
    ) -> None:
        """Old finished tasks of the covered types go; unfinished ones are never sent."""
        finished = [
            make_iotda_task(status, timedelta(days=40, minutes=i), task_type)
            for i, (status, task_type) in enumerate(
                (s, t) for s in FINISHED for t in ("firmwareUpgrade", "createCommands") * 8
            )
        ]
        unfinished = [
            make_iotda_task(status, timedelta(days=50))
            for status in ("Initializing", "Waitting", "Processing", "Stopping")
        ]
        sim, url = iotda_sim([*finished, *unfinished, make_iotda_task(age=timedelta(days=1))])
        result = run(iotda_policy(url, target={"page_size": 7}), store)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert sorted(sim.deleted_ids) == sorted(t.task_id for t in finished)
        assert not {t.task_id for t in unfinished} & set(sim.delete_requests_by_id)
        assert sim.refused_unfinished == []
        rows = audit_rows(store)
        assert Counter(r["outcome"] for r in rows) == {"deleted": len(finished)}
        assert {r["http_status"] for r in rows} == {204}

    def test_partial_failures_and_already_gone(
        self, iotda_sim: Sim, iotda_policy: Policy, make_iotda_task: Any, store: AuditStore
    ) -> None:
        """Failures keep the error body and the run goes on; 404 is recorded already_gone."""
        tasks = many(make_iotda_task, 30)
        sim, url = iotda_sim(tasks, faults=Faults(partial_failure_rate=0.3))

        def vanish(plan: Any) -> None:
            sim.remove(tasks[0].task_id)

        result = run(iotda_policy(url), store, on_plan=vanish)
        rows = {r["task_id"]: r for r in audit_rows(store)}
        assert rows[tasks[0].task_id]["outcome"] == "already_gone"
        failed = [r for r in rows.values() if r["outcome"] == "failed"]
        assert failed
        assert all(r["error_code"] == "IOTDA.014112" and r["error_message"] for r in failed)
        deleted = {t for t, r in rows.items() if r["outcome"] == "deleted"}
        assert deleted == set(sim.deleted_ids)
        assert result.status is RunStatus.PARTIAL

    def test_stale_date_is_refused(
        self, iotda_sim: Sim, iotda_policy: Policy, make_iotda_task: Any, store: AuditStore
    ) -> None:
        """A server clock 20 minutes away refuses every signature: the run deletes nothing."""
        sim, url = iotda_sim(many(make_iotda_task, 3))
        sim.auth.clock = lambda: datetime.now(UTC) + timedelta(minutes=20)
        result = run(iotda_policy(url), store)
        assert result.status is RunStatus.ABORTED
        assert "HTTP 401" in (result.error or "")
        assert sim.stats["delete_requests"] == 0

    def test_rate_limit(
        self, iotda_sim: Sim, iotda_policy: Policy, make_iotda_task: Any, store: AuditStore
    ) -> None:
        """A server-side limit below ours gives 429s that are waited out; all are deleted."""
        sim, url = iotda_sim(
            many(make_iotda_task, 12), faults=Faults(rate_limit=10, rate_limit_burst=1)
        )
        retries = {"attempts": 8, "backoff": "0s", "max_backoff": "1s"}
        delete = {"rate": "50/s", "burst": 5, "concurrency": 4, "max_fraction": 1.0}
        result = run(iotda_policy(url, target={"retries": retries}, delete=delete), store)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert sim.stats["status_429"] > 0
        assert len(sim.deleted_ids) == 12
