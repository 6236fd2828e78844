"""Notice before deletion: tasks first found eligible wait ``delete.notice`` before a later run
deletes them, if still eligible; `reaper plan` shows due and waiting apart (SQLite and PG)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from conftest import NOW, make_policy, policy_doc, sim_task
from jsonschema import Draft202012Validator
from test_cli import reaper

from reaper.audit import AuditStore
from reaper.http import TargetHttp
from reaper.notices import NoticeStore
from reaper.plan import Planner, Verdict
from reaper.policy import LoadedPolicy, load_policy_text
from reaper.runner import Mode, PolicyRun, RunStatus, run_policy
from reaper.simulators import DataPipelineSimulator
from reaper.simulators.data_pipeline import SimTask
from reaper.targets.base import Task
from reaper.targets.data_pipeline import DataPipelineTarget

Start = Callable[..., tuple[DataPipelineSimulator, str]]
URL = "http://127.0.0.1:8084"
DAY = timedelta(days=1)
NOTICE = {"notice": "3d"}
SCHEMA = Path(__file__).parent.parent / "reaper" / "schema" / "policy.schema.json"


def tid(n: int) -> str:
    return f"task_20250101_{n:06d}"


def planned(count: int, **sections: Any) -> Any:
    loaded = make_policy(URL, **sections)
    planner = Planner(
        loaded, DataPipelineTarget(loaded.policy.target_config, cast(TargetHttp, None)), NOW
    )
    for n in range(count):
        planner.add(Task(tid(n), "completed", NOW - timedelta(days=40, minutes=n)))
    return planner.finish()


class TestGiveNotice:
    def test_due_waiting_and_new(self) -> None:
        """A task noticed at least `notice` ago is due; one noticed later waits until its
        first sighting + notice; one never noticed is noticed now; a noticed task that is not
        eligible any more is forgotten."""
        plan = planned(4)
        notice = 3 * DAY
        seen = {
            tid(0): NOW - notice,  # due exactly now
            tid(1): NOW - notice - DAY,
            tid(2): NOW - DAY,  # due in two days
            tid(9): NOW - 5 * DAY,  # no longer listed
        }
        due = plan.give_notice(seen, NOW, notice)
        assert [c.task_id for c in due.candidates()] == [tid(1), tid(0)]  # oldest first
        state = due.notice
        assert state is not None
        assert state.waiting == {tid(2): NOW + 2 * DAY}
        assert (state.new, state.new_due, state.forgotten, state.due) == (
            [tid(3)],
            NOW + notice,
            [tid(9)],
            2,
        )
        assert state.next_due == NOW + 2 * DAY
        assert due.counts[(Verdict.KEEP, "kept: noticed, not due yet (delete.notice 3d)")] == 1
        assert (
            due.counts[(Verdict.KEEP, f"kept: noticed now, due {(NOW + notice).isoformat()}")] == 1
        )
        assert sum(n for (v, _), n in due.counts.items() if v is Verdict.DELETE) == 2


def old(n: int, start: int = 0) -> list[SimTask]:
    return [
        sim_task(f"task_20260901_{i:06d}", age=timedelta(days=40, minutes=i))
        for i in range(start, start + n)
    ]


def ids(*numbers: int) -> list[str]:
    return [f"task_20260901_{i:06d}" for i in numbers]


def run(loaded: LoadedPolicy, store: AuditStore, at: timedelta, **kwargs: Any) -> PolicyRun:
    return asyncio.run(run_policy(loaded, store, now=NOW + at, **kwargs))


class TestRuns:
    def test_a_task_is_deleted_only_after_its_notice(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """The first run deletes nothing and notices every eligible task; a run before the
        notice has passed deletes nothing; a run after it deletes the tasks still eligible, and
        tasks that became eligible meanwhile wait for their own notice."""
        sim, url = data_pipeline(old(4))
        loaded = make_policy(url, delete=NOTICE)
        first = run(loaded, store, timedelta(0))
        assert first.status is RunStatus.SUCCEEDED, first.error
        assert sim.deleted_ids == [] and first.plan is not None
        assert first.plan.notice is not None and len(first.plan.notice.new) == 4
        assert set(NoticeStore(store).first_seen(loaded.name)) == set(ids(0, 1, 2, 3))
        sim.add_tasks(old(1, start=10))
        sim.reexecute(ids(3)[0])  # no longer eligible: its notice is forgotten
        early = run(loaded, store, 2 * DAY)
        assert sim.deleted_ids == []
        assert early.plan is not None and early.plan.notice is not None
        assert early.plan.notice.new == ids(10)
        assert early.plan.notice.forgotten == ids(3)
        assert set(early.plan.notice.waiting) == set(ids(0, 1, 2))
        due = run(loaded, store, 3 * DAY)
        assert due.status is RunStatus.SUCCEEDED, due.error
        assert sorted(sim.deleted_ids) == ids(0, 1, 2)
        assert set(NoticeStore(store).first_seen(loaded.name)) >= set(ids(10))
        assert ids(3)[0] not in NoticeStore(store).first_seen(loaded.name)

    def test_a_dry_run_notices_nothing(self, data_pipeline: Start, store: AuditStore) -> None:
        """A dry run shows the split but records no notice."""
        _, url = data_pipeline(old(3))
        result = run(make_policy(url, delete=NOTICE), store, timedelta(0), mode=Mode.DRY_RUN)
        assert result.summary.dry_run == 0
        assert NoticeStore(store).first_seen("test-policy") == {}

    def test_guards_count_what_is_due(self, data_pipeline: Start, store: AuditStore) -> None:
        """The guards look at the tasks due now, not at every eligible one: noticing many tasks
        trips nothing."""
        _, url = data_pipeline(old(5))
        loaded = make_policy(url, delete={**NOTICE, "max_deletions": 3})
        assert run(loaded, store, timedelta(0)).status is RunStatus.SUCCEEDED
        assert run(loaded, store, 3 * DAY).status is RunStatus.REFUSED


class TestPolicy:
    def test_policies_without_new_settings_keep_their_hash(self) -> None:
        """A policy that sets none of the optional settings added since (delete.notice,
        delete.max_run_time, schedule_jitter) hashes as it did before they existed: this digest
        is the sha256 of its canonical JSON without those keys (delete.settle_after, whose
        default is part of what the policy does, is in), so its saved and held plans stay valid;
        setting one changes the hash."""
        assert (
            make_policy(URL).digest
            == "312e2cdc89af3b9eaa23ad7835f776ce691f715d670effc6c2606ae61fdfcac8"
        )
        assert make_policy(URL, delete=NOTICE).digest != make_policy(URL).digest
        assert make_policy(URL, delete={"max_run_time": "1h"}).digest != make_policy(URL).digest
        assert make_policy(URL, schedule_jitter="5m").digest != make_policy(URL).digest

    @pytest.mark.parametrize(
        ("value", "accepted"),
        [("3d", True), ("1w2d", True), (None, True), ("3", False), (3, False)],
    )
    def test_loader_and_schema_agree(self, value: Any, accepted: bool) -> None:
        """delete.notice takes a duration, as the published schema says."""
        doc = policy_doc(URL, delete={"notice": value})
        validator = Draft202012Validator(json.loads(SCHEMA.read_text()))
        assert validator.is_valid(doc) is accepted
        try:
            load_policy_text(yaml.safe_dump(doc))
            loaded = True
        except Exception:
            loaded = False
        assert loaded is accepted


class TestPlanCommand:
    def test_plan_shows_due_and_waiting_apart(
        self, data_pipeline: Start, tmp_path: Path, database_url: str
    ) -> None:
        """`reaper plan` reads the notices a run recorded: it shows none due yet and every
        task noticed and waiting, and a saved plan holds only what is due."""
        _, url = data_pipeline(old(3))
        (tmp_path / "policies").mkdir()
        (tmp_path / "policies" / "p.yaml").write_text(
            yaml.safe_dump(policy_doc(url, delete=NOTICE)), encoding="utf-8"
        )
        env = {"REAPER_DATABASE_URL": database_url, "REAPER_POLICIES": str(tmp_path / "policies")}
        planned = reaper("plan", "--output", "json", env=env)
        assert planned.returncode == 0, planned.stderr
        before = json.loads(planned.stdout)[0]
        assert before["to_delete"] == 0
        assert (before["notice"]["noticed_now"], before["notice"]["waiting"]) == (3, 0)
        assert reaper("run", env=env).returncode == 0
        after = json.loads(reaper("plan", "--output", "json", env=env).stdout)[0]
        assert (after["to_delete"], after["notice"]["waiting"], after["notice"]["noticed_now"]) == (
            0,
            3,
            0,
        )
        # all noticed by the same run: due together, listed by id
        assert [e["task_id"] for e in after["notice"]["waiting_examples"]] == ids(0, 1, 2)
        saved = tmp_path / "plan.json"
        assert reaper("plan", "--save", str(saved), env=env).returncode == 0
        assert json.loads(saved.read_text())["plans"][0]["items"] == []
        table = reaper("plan", env=env).stdout
        assert "notice 3d: 0 due now, 3 noticed and waiting" in table
