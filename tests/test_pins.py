"""Pins (legal holds): the plan rule, the store, runs that meet pins, and the commands."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from conftest import NOW, make_policy, policy_doc, sim_task
from sqlalchemy import select
from test_cli import reaper

from reaper.audit import AuditStore, audit_table, runs_table
from reaper.http import TargetHttp
from reaper.pins import PinError, PinStore
from reaper.plan import Planner, Verdict
from reaper.planfile import SavedPlan
from reaper.policy import LoadedPolicy
from reaper.runner import Mode, RunStatus, run_policy
from reaper.simulators import DataPipelineSimulator
from reaper.targets.base import Task
from reaper.targets.data_pipeline import DataPipelineTarget

Start = Callable[..., tuple[DataPipelineSimulator, str]]
URL = "http://127.0.0.1:8084"


def tid(n: int) -> str:
    return f"task_20250101_{n:06d}"


def planner(pins: dict[str, str], **sections: Any) -> Planner:
    loaded = make_policy(URL, **sections)
    target = DataPipelineTarget(loaded.policy.target_config, cast(TargetHttp, None))
    return Planner(loaded, target, NOW, pins=pins)


def old(n: int) -> list[Any]:
    return [sim_task(f"task_20260901_{i:06d}", age=timedelta(days=40, minutes=i)) for i in range(n)]


def pin(store: AuditStore, task_id: str, name: str = "test-policy", **kwargs: Any) -> Any:
    options: dict[str, Any] = {"reason": "litigation 42", "by": "legal", "now": datetime.now(UTC)}
    return PinStore(store).pin(task_id, kwargs.pop("scope", "policy"), name, **options | kwargs)


class TestPinRule:
    def test_a_pin_wins_over_every_rule(self) -> None:
        """A pinned task is protected with the pin's reason, even when it is already gone,
        protected by id, or live: the pin is the first rule asked."""
        plan = planner(
            {tid(1): "legal hold", tid(2): "audit", tid(3): "audit", tid(4): "x"},
            protect={"ids": [tid(2)]},
        )
        plan.add(Task(tid(1), "completed", NOW - timedelta(days=40)))
        plan.add(Task(tid(2), "completed", NOW - timedelta(days=40)))
        plan.add(Task(tid(3), "completed", NOW - timedelta(days=40), gone=True))
        plan.add(Task(tid(4), "in_progress", NOW - timedelta(days=40)))
        plan.add(Task(tid(5), "completed", NOW - timedelta(days=40)))
        result = plan.finish()
        assert [c.task_id for c in result.candidates()] == [tid(5)]
        assert result.counts[(Verdict.PROTECTED, "protected: pinned: legal hold")] == 1
        assert result.counts[(Verdict.PROTECTED, "protected: pinned: audit")] == 2
        assert result.counts[(Verdict.PROTECTED, "protected: pinned: x")] == 1

    def test_the_send_time_decision_knows_the_pins(self) -> None:
        """The rules the re-check asks (Plan.decide) protect a pinned task too, also when the
        fresh record carries only its status."""
        plan = planner({tid(1): "hold"}).finish()
        assert plan.decide is not None
        fresh = Task(tid(1), "completed", NOW - timedelta(days=40))
        expected = (Verdict.PROTECTED, "protected: pinned: hold")
        assert plan.decide(fresh) == expected
        assert plan.decide(fresh, fields=False) == expected
        assert plan.decide(fresh._replace(id=tid(2))) is None

    def test_other_tasks_are_decided_as_without_pins(self) -> None:
        """With pins, the tasks not pinned get the same verdicts as in a plan without them."""
        tasks = [
            Task(tid(n), status, NOW - timedelta(days=age))
            for n, (status, age) in enumerate(
                [("completed", 40), ("failed", 2), ("in_progress", 50), ("partial_completed", 45)]
                * 5
            )
        ]
        with_pins, without = planner({tid(0): "hold"}), planner({})
        for item in tasks:
            with_pins.add(item)
            without.add(item)
        pinned, plain = with_pins.finish(), without.finish()
        assert [c.task_id for c in pinned.candidates()] == [
            c.task_id for c in plain.candidates() if c.task_id != tid(0)
        ]
        plain.counts[(Verdict.PROTECTED, "protected: pinned: hold")] += 1
        deleted = next(key for key in plain.counts if key[0] is Verdict.DELETE)
        plain.counts[deleted] -= 1
        assert pinned.counts == plain.counts


class TestPinStore:
    def test_pin_list_unpin(self, store: AuditStore) -> None:
        """A pin is in force until unpinned; the list shows it, and --all shows it lifted."""
        pins = PinStore(store)
        made = pin(store, "task_1")
        now = datetime.now(UTC)
        assert [p.task_id for p in pins.pins(now=now)] == ["task_1"]
        assert pins.active_for("test-policy", "data_pipeline", now) == {"task_1": "litigation 42"}
        lifted = pins.unpin("task_1", "policy", "test-policy", by="legal", now=now)
        assert lifted.id == made.id and lifted.unpinned_by == "legal"
        assert pins.pins(now=now) == []
        assert pins.active_for("test-policy", "data_pipeline", now) == {}
        [old] = pins.pins(now=now, include_inactive=True)
        assert old.unpinned_at is not None and old.unpin_run_id == lifted.unpin_run_id

    def test_scopes(self, store: AuditStore) -> None:
        """A policy pin holds for its policy only; a target pin for every policy of its kind."""
        pin(store, "task_1")
        pin(store, "task_2", "data_pipeline", scope="target", reason="all of them")
        now = datetime.now(UTC)
        pins = PinStore(store)
        assert pins.active_for("test-policy", "data_pipeline", now) == {
            "task_1": "litigation 42",
            "task_2": "all of them",
        }
        assert pins.active_for("other", "data_pipeline", now) == {"task_2": "all of them"}
        assert pins.active_for("other", "huawei_dcs", now) == {}

    def test_until(self, store: AuditStore) -> None:
        """A pin with an end holds until then, and not after."""
        ends = datetime.now(UTC) + timedelta(hours=1)
        pin(store, "task_1", until=ends)
        pins = PinStore(store)
        assert pins.active_for("test-policy", "data_pipeline", ends - timedelta(seconds=1))
        assert pins.active_for("test-policy", "data_pipeline", ends) == {}

    def test_twice_is_refused_and_unpinning_nothing_too(self, store: AuditStore) -> None:
        """A second pin of the same task and scope is refused, as is lifting a pin not there."""
        pin(store, "task_1")
        with pytest.raises(PinError, match="already pinned for policy test-policy"):
            pin(store, "task_1")
        with pytest.raises(PinError, match="no active pin"):
            PinStore(store).unpin("task_9", "policy", "test-policy", by="x", now=NOW)

    def test_pinning_and_unpinning_are_chained_runs(self, store: AuditStore) -> None:
        """Each pin and unpin is a run of mode pin/unpin with one chained row naming who, why,
        and which scope; the chains verify, and editing the who breaks them."""
        made = pin(store, "task_1")
        lifted = PinStore(store).unpin(
            "task_1", "policy", "test-policy", by="judge", now=datetime.now(UTC), comment="done"
        )
        with store.engine.connect() as connection:
            runs = {
                row.id: row
                for row in connection.execute(
                    select(runs_table).where(runs_table.c.mode.in_(("pin", "unpin")))
                )
            }
            rows = {
                row.run_id: row
                for row in connection.execute(
                    select(audit_table).where(audit_table.c.run_id.in_(runs))
                )
            }
        assert runs[made.pin_run_id].mode == "pin"
        assert runs[lifted.unpin_run_id].mode == "unpin"
        pinned, unpinned = rows[made.pin_run_id], rows[lifted.unpin_run_id]
        assert (pinned.task_id, pinned.outcome, pinned.reason) == (
            "task_1",
            "pinned",
            "pinned: litigation 42",
        )
        assert "pinned by legal for policy test-policy" in pinned.note
        assert unpinned.outcome == "unpinned" and "unpinned by judge" in unpinned.note
        assert unpinned.note.endswith(": done")
        assert pinned.row_hash is not None and pinned.chain_seq == 1
        assert store.verify() == []
        with store.engine.begin() as connection:
            connection.execute(
                audit_table.update()
                .where(audit_table.c.id == pinned.id)
                .values(note=pinned.note.replace("legal", "nobody"))
            )
        [problem] = store.verify()
        assert problem.run_id == made.pin_run_id

    def test_prune_keeps_the_record_of_pins(self, store: AuditStore) -> None:
        """`audit prune` never deletes the runs recording pins and unpins."""
        made = pin(store, "task_1")
        runs, _ = store.prune(datetime.now(UTC) + timedelta(days=1))
        assert runs == 0
        assert store.run(made.pin_run_id) is not None


def run(loaded: LoadedPolicy, store: AuditStore, **kwargs: Any) -> Any:
    return asyncio.run(run_policy(loaded, store, now=NOW, **kwargs))


class TestRuns:
    def test_a_pinned_task_is_not_deleted(self, data_pipeline: Start, store: AuditStore) -> None:
        """A run deletes everything eligible but the pinned task, which the plan shows as
        protected by the pin."""
        sim, url = data_pipeline(old(5))
        pin(store, "task_20260901_000002")
        result = run(make_policy(url), store)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert sorted(sim.deleted_ids) == [f"task_20260901_{i:06d}" for i in (0, 1, 3, 4)]
        assert result.plan.counts[(Verdict.PROTECTED, "protected: pinned: litigation 42")] == 1

    def test_a_pin_wins_over_a_saved_plan(self, data_pipeline: Start, store: AuditStore) -> None:
        """Applying a reviewed plan that lists a task pinned since deletes everything but it."""
        sim, url = data_pipeline(old(3))
        loaded = make_policy(url)
        ids = [f"task_20260901_{i:06d}" for i in range(3)]
        saved = SavedPlan(loaded.name, loaded.digest, NOW, "t", dict.fromkeys(ids, "reviewed"))
        pin(store, ids[1], scope="target", name="data_pipeline")
        result = run(loaded, store, mode=Mode.APPLY, approved=saved)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert sorted(sim.deleted_ids) == [ids[0], ids[2]]
        assert result.not_eligible == [ids[1]]

    def test_a_pin_taken_while_deleting_stops_the_send(
        self, data_pipeline: Start, store: AuditStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A task pinned after the plan, while earlier batches are being deleted, is not sent:
        its row says skipped_changed, pinned while the run was deleting."""
        monkeypatch.setattr("reaper.pins.REFRESH_SECONDS", 0.0)
        sim, url = data_pipeline(old(30))
        loaded = make_policy(url, delete={"batch_size": 5, "concurrency": 1, "rate": "200/s"})
        newest = "task_20260901_000000"  # the plan deletes oldest first: this one comes last
        pinned: list[str] = []

        def on_batch(event: Any) -> None:
            if not pinned:
                pin(store, newest, reason="late hold")
                pinned.append(newest)

        result = run(loaded, store, on_batch=on_batch)
        assert pinned == [newest]
        assert newest not in sim.deleted_ids
        assert len(sim.deleted_ids) == 29
        assert result.summary.skipped_changed == 1
        with store.engine.connect() as connection:
            row = connection.execute(
                select(audit_table).where(
                    audit_table.c.run_id == result.run_id, audit_table.c.task_id == newest
                )
            ).one()
        assert row.outcome == "skipped_changed"
        assert row.note == "not sent: pinned while the run was deleting: late hold"
        assert store.verify() == []


def write_policy(directory: Path, doc: dict[str, Any]) -> None:
    (directory / "policies").mkdir(exist_ok=True)
    (directory / "policies" / "p.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")


class TestCommands:
    def test_pin_list_explain_unpin(
        self, data_pipeline: Start, tmp_path: Path, database_url: str
    ) -> None:
        """`reaper pin` holds a task through `reaper run`; `pin list` shows it, `explain` shows
        who pinned it and why, and `unpin` lifts it so the next run deletes it."""
        sim, url = data_pipeline(old(3))
        write_policy(tmp_path, policy_doc(url))
        env = {"REAPER_DATABASE_URL": database_url, "REAPER_POLICIES": str(tmp_path / "policies")}
        task_id = "task_20260901_000001"
        pinned = reaper(
            "pin", task_id, "--policy", "test-policy", "--reason", "case 7", "--by", "ana", env=env
        )
        assert pinned.returncode == 0, pinned.stderr
        assert pinned.stdout.startswith(f"pinned {task_id} for policy test-policy (pin 1)")
        listed = json.loads(reaper("pin", "list", "--output", "json", env=env).stdout)
        assert [(p["task_id"], p["reason"], p["pinned_by"]) for p in listed] == [
            (task_id, "case 7", "ana")
        ]
        assert reaper("run", env=env).returncode == 0
        assert task_id not in sim.deleted_ids and len(sim.deleted_ids) == 2
        explained = json.loads(reaper("explain", task_id, "--output", "json", env=env).stdout)
        assert [(e["outcome"], e["mode"]) for e in explained] == [("pinned", "pin")]
        assert "pinned by ana" in explained[0]["note"]
        text = reaper("explain", task_id, env=env).stdout
        assert "pinned by ana" in text and "case 7" in text
        # A person's decision: no request went to the target, and nothing was listed.
        assert "answered" not in text and "listed as" not in text
        unpinned = reaper("unpin", task_id, "--policy", "test-policy", "--by", "ana", env=env)
        assert unpinned.returncode == 0, unpinned.stderr
        assert reaper("pin", "list", "--output", "json", env=env).stdout.strip() == "[]"
        assert reaper("run", env=env).returncode == 0
        assert task_id in sim.deleted_ids

    def test_mistakes_are_refused(self, tmp_path: Path, database_url: str) -> None:
        """An unknown policy or target kind is a configuration error (exit 2); a pin needs
        exactly one scope; an end in the past is refused; nothing is recorded."""
        write_policy(tmp_path, policy_doc("http://127.0.0.1:9"))
        env = {"REAPER_DATABASE_URL": database_url, "REAPER_POLICIES": str(tmp_path / "policies")}
        unknown = reaper("pin", "t1", "--policy", "test-polcy", env=env)
        assert unknown.returncode == 2 and "no policy named 'test-polcy'" in unknown.stderr
        kind = reaper("pin", "t1", "--target", "jira", env=env)
        assert kind.returncode == 2 and "no target kind 'jira'" in kind.stderr
        both = reaper("pin", "t1", "--policy", "test-policy", "--target", "jira", env=env)
        assert both.returncode == 2 and "exactly one of" in both.stderr
        past = reaper(
            "pin", "t1", "--policy", "test-policy", "--until", "2020-01-01T00:00:00", env=env
        )
        assert past.returncode == 2 and "already have ended" in past.stderr
        again = reaper("unpin", "t1", "--policy", "test-policy", env=env)
        assert again.returncode == 1 and "no active pin" in again.stderr
        assert reaper("pin", "list", "--output", "json", env=env).stdout.strip() == "[]"
