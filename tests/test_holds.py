"""Held plans and approvals: a refused plan is kept; an approval, chained in the audit, lets the
next run (or `reaper apply --held`) delete exactly the approved ids still eligible (SQLite, PG)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import NOW, make_policy, policy_doc, sim_task
from sqlalchemy import delete, insert, select, update
from test_cli import reaper

from reaper.audit import AuditStore, audit_table, runs_table
from reaper.holds import HeldStore, HoldError, held_items_table, held_table
from reaper.pins import PinStore
from reaper.policy import LoadedPolicy
from reaper.runner import Mode, PolicyRun, RunStatus, run_policy
from reaper.simulators import DataPipelineSimulator
from reaper.simulators.data_pipeline import SimTask

Start = Callable[..., tuple[DataPipelineSimulator, str]]
LIMIT = {"max_deletions": 3}


def old(n: int, start: int = 0) -> list[SimTask]:
    return [
        sim_task(f"task_20260901_{i:06d}", age=timedelta(days=40, minutes=i))
        for i in range(start, start + n)
    ]


def ids(*numbers: int) -> list[str]:
    return [f"task_20260901_{i:06d}" for i in numbers]


def run(loaded: LoadedPolicy, store: AuditStore, **kwargs: Any) -> PolicyRun:
    return asyncio.run(run_policy(loaded, store, now=NOW, **kwargs))


def rows(store: AuditStore, run_id: str) -> list[Any]:
    with store.engine.connect() as connection:
        return list(
            connection.execute(
                select(audit_table)
                .where(audit_table.c.run_id == run_id)
                .order_by(audit_table.c.chain_seq)
            )
        )


def approve(store: AuditStore, run_id: str, **kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "by": "olga",
        "now": datetime.now(UTC),
        "valid_for": timedelta(hours=24),
        "comment": "reviewed the backlog",
    }
    return HeldStore(store).approve(run_id, **options | kwargs)


class TestHolding:
    def test_a_tripped_guard_holds_the_plan(self, data_pipeline: Start, store: AuditStore) -> None:
        """The run is still refused and deletes nothing; its plan (every id with its reason,
        the policy hash, the guard) is held, and the run says how to review it."""
        sim, url = data_pipeline(old(5))
        loaded = make_policy(url, delete=LIMIT)
        result = run(loaded, store)
        assert result.status is RunStatus.REFUSED
        assert result.held and sim.deleted_ids == []
        assert f"reaper approve {result.run_id} --by NAME" in (result.error or "")
        [held] = HeldStore(store).held()
        assert (held.run_id, held.policy, held.policy_hash) == (
            result.run_id,
            loaded.name,
            loaded.digest,
        )
        assert (held.guard, held.eligible, held.listed, held.status) == (
            "max_deletions",
            5,
            5,
            "held",
        )
        items = HeldStore(store).items(held.run_id)
        assert [item["task_id"] for item in items] == ids(4, 3, 2, 1, 0)  # oldest first
        assert {item["reason"] for item in items} == {"older than 30d and status completed"}

    def test_a_newer_hold_supersedes_an_undecided_one(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """Each refused run holds its plan; the previous one nobody decided on is superseded."""
        _, url = data_pipeline(old(5))
        loaded = make_policy(url, delete=LIMIT)
        first, second = run(loaded, store), run(loaded, store)
        holds = HeldStore(store)
        assert [h.run_id for h in holds.held()] == [second.run_id]
        statuses = {h.run_id: h.status for h in holds.held(include_closed=True)}
        assert statuses == {first.run_id: "superseded", second.run_id: "held"}
        with pytest.raises(HoldError, match="superseded"):
            approve(store, first.run_id)

    def test_dry_runs_hold_nothing(self, data_pipeline: Start, store: AuditStore) -> None:
        """A dry run that trips a guard is refused but holds no plan."""
        _, url = data_pipeline(old(5))
        result = run(make_policy(url, delete=LIMIT), store, mode=Mode.DRY_RUN)
        assert result.status is RunStatus.REFUSED and not result.held
        assert HeldStore(store).held(include_closed=True) == []


class TestApproval:
    def test_the_next_run_deletes_exactly_the_approved_ids(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """After approval, the next run deletes the approved ids still eligible (not a task
        that became eligible since, nor one running again), the guard lifted; every
        row names the approval; the approval is carried out once."""
        sim, url = data_pipeline(old(5))
        loaded = make_policy(url, delete=LIMIT)
        refused = run(loaded, store)
        approval = approve(store, refused.run_id)
        sim.add_tasks(old(1, start=50))  # eligible now, never approved
        sim.reexecute(ids(0)[0])  # approved, but running again: no longer eligible
        result = run(loaded, store)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert result.approval_id == approval.id
        assert sorted(sim.deleted_ids) == ids(1, 2, 3, 4)
        deleted = rows(store, result.run_id or "")
        assert {row.task_id for row in deleted} == set(ids(1, 2, 3, 4))
        assert {row.approval_id for row in deleted} == {approval.id}
        assert {row.outcome for row in deleted} == {"deleted"}
        assert store.verify() == []
        with store.engine.connect() as connection:
            assert (
                connection.execute(
                    select(runs_table.c.approval_id).where(runs_table.c.id == result.run_id)
                ).scalar_one()
                == approval.id
            )
        held = HeldStore(store).get(refused.run_id)
        assert (held.status, held.applied_run_id) == ("applied", result.run_id)
        after = run(loaded, store)
        assert after.approval_id is None
        assert after.status is RunStatus.SUCCEEDED  # the one new task: under the limit
        assert ids(50)[0] in sim.deleted_ids

    def test_the_approval_is_chained_in_the_audit(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """Approving records a run of mode approval with one chained row per approved id,
        naming who, when, until when, the held run and the comment; editing it is found."""
        _, url = data_pipeline(old(4))
        refused = run(make_policy(url, delete=LIMIT), store)
        approval = approve(store, refused.run_id, comment="ticket OPS-1")
        recorded = store.run(approval.id)
        assert recorded is not None and recorded["mode"] == "approval"
        approved = rows(store, approval.id)
        assert [row.task_id for row in approved] == ids(3, 2, 1, 0)
        assert {row.outcome for row in approved} == {"approved"}
        note = approved[0].note
        assert note.startswith(f"approved by olga at {approval.at.isoformat()}, valid until ")
        assert f"held run {refused.run_id} (guard max_deletions): ticket OPS-1" in note
        assert store.verify() == []
        with store.engine.begin() as connection:
            connection.execute(
                update(audit_table)
                .where(audit_table.c.id == approved[1].id)
                .values(note=note.replace("olga", "mallory"))
            )
        assert [p.run_id for p in store.verify()] == [approval.id]

    def test_what_is_deleted_comes_from_the_chained_approval(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """An id slipped into the held plan's table after the approval is not deleted: the
        approved ids are read from the approval's chained rows."""
        sim, url = data_pipeline(old(5))
        loaded = make_policy(url, delete=LIMIT)
        refused = run(loaded, store)
        with store.engine.begin() as connection:
            connection.execute(
                delete(held_items_table).where(held_items_table.c.task_id == ids(4)[0])
            )
        approve(store, refused.run_id)
        with store.engine.begin() as connection:
            connection.execute(
                insert(held_items_table).values(
                    run_id=refused.run_id, task_id=ids(4)[0], position=99, reason="slipped in"
                )
            )
        result = run(loaded, store)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert sorted(sim.deleted_ids) == ids(0, 1, 2, 3)

    def test_a_pin_wins_over_an_approval(self, data_pipeline: Start, store: AuditStore) -> None:
        """A task pinned after its approval is not deleted; the rest are."""
        sim, url = data_pipeline(old(5))
        loaded = make_policy(url, delete=LIMIT)
        refused = run(loaded, store)
        approve(store, refused.run_id)
        PinStore(store).pin(
            ids(2)[0], "policy", loaded.name, reason="hold", by="legal", now=datetime.now(UTC)
        )
        result = run(loaded, store)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert sorted(sim.deleted_ids) == ids(0, 1, 3, 4)
        assert result.not_eligible == ids(2)

    def test_a_changed_policy_refuses_the_approval(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """When the policy changed since the plan was held, the approval is refused (closed,
        saying why) and the run plans the changed policy under its guards."""
        sim, url = data_pipeline(old(5))
        refused = run(make_policy(url, delete=LIMIT), store)
        approve(store, refused.run_id)
        changed = make_policy(url, delete={**LIMIT, "batch_size": 7})
        result = run(changed, store)
        assert result.approval_id is None
        assert result.status is RunStatus.REFUSED and sim.deleted_ids == []
        held = HeldStore(store).get(refused.run_id)
        assert held.status == "refused"
        assert "changed since run" in (held.close_note or "")

    def test_an_expired_approval_is_not_carried_out(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """An approval past its validity is ignored: the next run is refused again."""
        sim, url = data_pipeline(old(5))
        loaded = make_policy(url, delete=LIMIT)
        refused = run(loaded, store)
        approve(
            store,
            refused.run_id,
            now=datetime.now(UTC) - timedelta(hours=2),
            valid_for=timedelta(hours=1),
        )
        result = run(loaded, store)
        assert result.status is RunStatus.REFUSED and sim.deleted_ids == []

    def test_an_expired_approval_may_be_given_again(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """An approval that ran out unused shows as expired and can be given again (a second
        approval, chained); the next run then carries it out."""
        sim, url = data_pipeline(old(5))
        loaded = make_policy(url, delete=LIMIT)
        refused = run(loaded, store)
        approve(
            store,
            refused.run_id,
            now=datetime.now(UTC) - timedelta(hours=2),
            valid_for=timedelta(hours=1),
        )
        held = HeldStore(store).get(refused.run_id)
        assert held.expired(datetime.now(UTC)) and held.as_dict()["expired"] is True
        again = approve(store, refused.run_id, by="pia")
        assert again.by == "pia"
        result = run(loaded, store)
        assert result.status is RunStatus.SUCCEEDED and result.approval_id == again.id
        assert sorted(sim.deleted_ids) == ids(0, 1, 2, 3, 4)
        with store.engine.connect() as connection:
            modes = connection.execute(
                select(runs_table.c.mode).where(runs_table.c.mode == "approval")
            ).scalars()
            assert list(modes) == ["approval", "approval"]
        assert store.verify() == []

    def test_a_new_hold_supersedes_an_expired_approval(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """When the run after an expired approval is refused and holds its plan, the expired
        one is superseded: one plan of the policy is open at a time."""
        _, url = data_pipeline(old(5))
        loaded = make_policy(url, delete=LIMIT)
        first = run(loaded, store)
        approve(
            store,
            first.run_id,
            now=datetime.now(UTC) - timedelta(hours=2),
            valid_for=timedelta(hours=1),
        )
        second = run(loaded, store)
        assert second.status is RunStatus.REFUSED and second.held
        assert HeldStore(store).get(first.run_id).status == "superseded"
        assert [h.run_id for h in HeldStore(store).held()] == [second.run_id]
        with pytest.raises(HoldError, match="superseded"):
            approve(store, first.run_id)

    def test_an_approval_that_loses_a_race_is_recorded_void(
        self, data_pipeline: Start, store: AuditStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A run supersedes the plan between the approval's chained rows and its status: the
        approval fails (nothing will carry it out), and the audit records it void, chained."""
        _, url = data_pipeline(old(5))
        loaded = make_policy(url, delete=LIMIT)
        refused = run(loaded, store)
        record_event = store.record_event

        def then_a_run_supersedes(*args: Any, **kwargs: Any) -> str:
            recorded = record_event(*args, **kwargs)
            monkeypatch.setattr(store, "record_event", record_event)
            with store.engine.begin() as connection:
                connection.execute(
                    update(held_table)
                    .where(held_table.c.run_id == refused.run_id)
                    .values(status="superseded")
                )
            return recorded

        monkeypatch.setattr(store, "record_event", then_a_run_supersedes)
        with pytest.raises(HoldError, match="did not take effect and is recorded void"):
            approve(store, refused.run_id)
        with store.engine.connect() as connection:
            modes = [
                row.mode
                for row in connection.execute(
                    select(runs_table.c.mode)
                    .where(runs_table.c.mode.in_(["approval", "rejection"]))
                    .order_by(runs_table.c.started_at)
                )
            ]
            voids = connection.execute(
                select(audit_table.c.outcome, audit_table.c.note).where(
                    audit_table.c.outcome == "rejected"
                )
            ).all()
        assert modes == ["approval", "rejection"]
        assert len(voids) == 5 and all("did not take effect" in note for _, note in voids)
        assert HeldStore(store).approval_for(loaded.name, datetime.now(UTC)) is None
        assert store.verify() == []

    def test_rejecting_drops_the_plan(self, data_pipeline: Start, store: AuditStore) -> None:
        """A rejected plan (even an approved one) is never carried out; the rejection is a
        chained run of its own; a plan carried out cannot be rejected."""
        sim, url = data_pipeline(old(5))
        loaded = make_policy(url, delete=LIMIT)
        refused = run(loaded, store)
        approve(store, refused.run_id)
        held = HeldStore(store).reject(
            refused.run_id, by="ivan", now=datetime.now(UTC), comment="too much"
        )
        assert held.status == "rejected"
        assert HeldStore(store).items(refused.run_id) == []
        with store.engine.connect() as connection:
            [mode] = connection.execute(
                select(runs_table.c.mode).where(runs_table.c.mode == "rejection")
            ).scalars()
        assert mode == "rejection"
        result = run(loaded, store)
        assert result.status is RunStatus.REFUSED and sim.deleted_ids == []
        with pytest.raises(HoldError, match="rejected: nothing to reject"):
            HeldStore(store).reject(refused.run_id, by="ivan", now=datetime.now(UTC))
        assert store.verify() == []


def workspace(tmp_path: Path, database_url: str, doc: dict[str, Any]) -> dict[str, str]:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    return {"REAPER_DATABASE_URL": database_url, "REAPER_POLICIES": str(tmp_path / "policies")}


class TestCommands:
    def test_held_list_approve_apply_explain(
        self, data_pipeline: Start, tmp_path: Path, database_url: str
    ) -> None:
        """The review loop on the command line: `run` is refused (exit 1) and holds the plan,
        `held list` shows it, `approve` approves it, `apply --held` deletes it, and `explain`
        names the approver."""
        sim, url = data_pipeline(old(5))
        env = workspace(tmp_path, database_url, policy_doc(url, delete=LIMIT))
        refused = reaper("run", "--output", "json", env=env)
        assert refused.returncode == 1
        [summary] = json.loads(refused.stdout)
        assert summary["status"] == "refused" and summary["held"] is True
        run_id = summary["run_id"]
        [listed] = json.loads(reaper("held", "list", "--output", "json", env=env).stdout)
        assert {k: listed[k] for k in ("run_id", "policy", "eligible", "guard", "status")} == {
            "run_id": run_id,
            "policy": "test-policy",
            "eligible": 5,
            "guard": "max_deletions",
            "status": "held",
        }
        assert listed["held_at"]
        shown = json.loads(reaper("held", "show", run_id, "--output", "json", env=env).stdout)
        assert len(shown["items"]) == 5
        approved = reaper(
            "approve", run_id, "--by", "olga", "--comment", "OPS-7", "--valid-for", "2h", env=env
        )
        assert approved.returncode == 0, approved.stderr
        assert "approved 5 id(s)" in approved.stdout
        applied = reaper("apply", "--held", run_id, "--output", "json", env=env)
        assert applied.returncode == 0, applied.stderr
        [done] = json.loads(applied.stdout)
        assert (done["mode"], done["deleted"]) == ("apply", 5)
        assert len(sim.deleted_ids) == 5
        again = reaper("apply", "--held", run_id, env=env)
        assert again.returncode == 1 and "is applied, not approved" in again.stderr
        task_id = sim.deleted_ids[0]
        entries = json.loads(reaper("explain", task_id, "--output", "json", env=env).stdout)
        assert [e["outcome"] for e in entries] == ["approved", "deleted"]
        approval = entries[1]["approval"]
        assert (approval["approved_by"], approval["comment"], approval["held_run"]) == (
            "olga",
            "OPS-7",
            run_id,
        )
        text = reaper("explain", task_id, env=env).stdout
        assert "approved by olga" in text and "OPS-7" in text

    def test_refusals(self, data_pipeline: Start, tmp_path: Path, database_url: str) -> None:
        """`apply --held` refuses a plan not approved and a plan whose policy changed; `apply`
        wants a file or --held; `approve` wants --by; `reject` drops the plan."""
        sim, url = data_pipeline(old(5))
        env = workspace(tmp_path, database_url, policy_doc(url, delete=LIMIT))
        [summary] = json.loads(reaper("run", "--output", "json", env=env).stdout)
        run_id = summary["run_id"]
        unapproved = reaper("apply", "--held", run_id, env=env)
        assert unapproved.returncode == 1 and "is held, not approved" in unapproved.stderr
        assert reaper("apply", env=env).returncode == 2
        assert reaper("approve", run_id, env=env).returncode == 2
        assert reaper("approve", run_id, "--by", "o", env=env).returncode == 0
        changed = policy_doc(url, delete={**LIMIT, "batch_size": 3})
        (tmp_path / "policies" / "p.yaml").write_text(yaml.safe_dump(changed), encoding="utf-8")
        stale = reaper("apply", "--held", run_id, env=env)
        assert stale.returncode == 1 and "changed since run" in stale.stderr
        rejected = reaper("reject", run_id, "--by", "o", env=env)
        assert rejected.returncode == 0, rejected.stderr
        assert reaper("held", "list", "--output", "json", env=env).stdout.strip() == "[]"
        assert sim.deleted_ids == []
        # A RUN_ID no plan is held for is a usage error (exit 2), for every command taking one.
        for command in (
            ("approve", "nope", "--by", "o"),
            ("reject", "nope"),
            ("held", "show", "nope"),
            ("apply", "--held", "nope"),
        ):
            unknown = reaper(*command, env=env)
            assert unknown.returncode == 2, (command, unknown.stderr)
            assert "no plan is held for run 'nope'" in unknown.stderr
