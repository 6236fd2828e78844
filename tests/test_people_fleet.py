"""Where the people features (pins, held plans and approvals, notice, notifications) meet the
fleet features (templates, concurrent runs, turns, shards, bounded runs).

Expected values come from the README's rules: an instance of a template is ``template[key]``,
``--policy`` takes a pattern whose brackets are literal, a held plan is approved per run and
carried out by the next run *of that policy*, a pin protects a task ahead of every rule, the
notifications each name their policy and run, and ``reaper run`` waits for deliveries up to
``REAPER_NOTIFY_WAIT`` before exiting.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import NOW, make_policy, policy_doc, sim_task
from webhooks import SECRET, Receiver

from reaper.audit import AuditStore
from reaper.holds import HeldStore
from reaper.notices import NoticeStore
from reaper.notify import deliveries
from reaper.runner import PolicyRun, RunStatus, run_policy
from reaper.simulators import DataPipelineSimulator, Faults
from reaper.simulators.data_pipeline import SimTask

Start = Callable[..., tuple[DataPipelineSimulator, str]]
LIMIT = {"max_deletions": 3}


def reaper(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("REAPER_")}
    return subprocess.run(
        [sys.executable, "-m", "reaper", *args],
        capture_output=True,
        text=True,
        env={**base, "REAPER_LOG_FORMAT": "json", **env},
        timeout=180,
        check=False,
    )


def tasks(prefix: str, n: int) -> list[SimTask]:
    """``n`` completed tasks, 40 days old (a minute apart), ids ``task_2026090<prefix>_...``."""
    return [
        sim_task(f"task_2026090{prefix}_{i:06d}", age=timedelta(days=40, minutes=i))
        for i in range(n)
    ]


def ids(prefix: str, n: int) -> list[str]:
    return [f"task_2026090{prefix}_{i:06d}" for i in range(n)]


def events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver().start()
    yield started
    started.stop()


class Workspace:
    """A policy directory, an audit database and the environment of `reaper` commands."""

    def __init__(self, tmp_path: Path, database_url: str) -> None:
        self.dir = tmp_path / "policies"
        self.dir.mkdir()
        self.tmp = tmp_path
        self.env = {"REAPER_DATABASE_URL": database_url, "REAPER_POLICIES": str(self.dir)}

    def write(self, name: str, document: Any) -> None:
        (self.dir / f"{name}.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")

    def notify_to(self, receiver: Receiver) -> None:
        path = self.tmp / "notify.yaml"
        sink = {"type": "webhook", "url": receiver.url, "secret_env": "HOOK_SECRET"}
        path.write_text(yaml.safe_dump([sink]), encoding="utf-8")
        self.env |= {"REAPER_NOTIFY_FILE": str(path), "HOOK_SECRET": SECRET}

    def run(self, *args: str, code: int | None = 0) -> subprocess.CompletedProcess[str]:
        result = reaper(*args, env=self.env)
        if code is not None:
            assert result.returncode == code, (args, result.stdout, result.stderr)
        return result

    def json(self, *args: str, code: int | None = 0) -> Any:
        return json.loads(self.run(*args, "--output", "json", code=code).stdout)


def template(urls: dict[str, str], name: str = "tmpl", **delete: Any) -> dict[str, Any]:
    """A data_pipeline template with one instance per site, named ``name[eu/<site>]``."""
    return {
        "name": name,
        "for_each": [{"region": "eu", "site": site, "url": url} for site, url in urls.items()],
        "instance_key": "${region}/${site}",
        "target": {"type": "data_pipeline", "base_url": "${url}", "timestamps_timezone": "UTC"},
        "select": {"status": ["completed", "failed"], "older_than": "30d"},
        "delete": {"batch_size": 10, "rate": "200/s", "max_fraction": 1.0, **delete},
    }


def by_policy(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["policy"]: r for r in runs}


# --- templates, held plans and approvals ---------------------------------------------------------


class TestTemplateInstanceApproval:
    def test_an_instance_is_held_approved_and_carried_out_by_a_pattern_run(
        self, data_pipeline: Start, tmp_path: Path, database_url: str
    ) -> None:
        """Two instances and a plain policy, each refused by max_deletions: three held plans,
        each under its own name and run. Approving one instance's run lets the next
        `reaper run --policy 'tmpl[*'` delete exactly that instance's approved, unpinned ids;
        the other instance is refused and held again; the plain policy does not run."""
        sim_a, url_a = data_pipeline(tasks("1", 5))
        sim_b, url_b = data_pipeline(tasks("2", 5))
        sim_c, url_c = data_pipeline(tasks("3", 5))
        ws = Workspace(tmp_path, database_url)
        ws.write("tmpl", template({"a": url_a, "b": url_b}, **LIMIT))
        ws.write("plain", policy_doc(url_c, name="plain", delete=LIMIT))

        first = by_policy(ws.json("run", code=1))
        assert sorted(first) == ["plain", "tmpl[eu/a]", "tmpl[eu/b]"]
        assert all(r["status"] == "refused" and r["held"] for r in first.values())
        held = {h["policy"]: h for h in ws.json("held", "list")}
        assert {name: h["run_id"] for name, h in held.items()} == {
            name: r["run_id"] for name, r in first.items()
        }
        assert all(h["eligible"] == 5 and h["guard"] == "max_deletions" for h in held.values())
        [only_a] = ws.json("held", "list", "--policy", "tmpl[eu/a]")
        assert only_a["run_id"] == first["tmpl[eu/a]"]["run_id"]

        pinned = ids("1", 5)[1]
        ws.run("pin", pinned, "--policy", "tmpl[eu/a]", "--reason", "case 7", "--by", "lee")
        ws.run("approve", first["tmpl[eu/a]"]["run_id"], "--by", "alice", "--comment", "ok")

        second = by_policy(ws.json("run", "--policy", "tmpl[*", code=1))
        assert sorted(second) == ["tmpl[eu/a]", "tmpl[eu/b]"]
        a, b = second["tmpl[eu/a]"], second["tmpl[eu/b]"]
        assert (a["status"], a["deleted"]) == ("succeeded", 4)
        assert a["approval_id"]
        assert (b["status"], b["held"], b.get("approval_id")) == ("refused", True, None)
        assert sorted(sim_a.deleted_ids) == sorted(set(ids("1", 5)) - {pinned})
        assert (sim_b.deleted_ids, sim_c.deleted_ids) == ([], [])

        everything = {h["run_id"]: h for h in ws.json("held", "list", "--all")}
        assert everything[first["tmpl[eu/a]"]["run_id"]]["status"] == "applied"
        assert everything[first["tmpl[eu/a]"]["run_id"]]["applied_run_id"] == a["run_id"]
        assert everything[first["tmpl[eu/b]"]["run_id"]]["status"] == "superseded"
        assert everything[b["run_id"]]["status"] == "held"
        assert everything[first["plain"]["run_id"]]["status"] == "held"

        deleted = [e for e in ws.json("explain", ids("1", 5)[0]) if e["outcome"] == "deleted"]
        assert [e["approval"]["approved_by"] for e in deleted] == ["alice"]
        assert deleted[0]["approval"]["held_run"] == first["tmpl[eu/a]"]["run_id"]
        assert "audit chains verified" in ws.run("audit", "verify").stdout

    def test_concurrent_runs_each_carry_out_only_their_own_approval(
        self, data_pipeline: Start, tmp_path: Path, database_url: str
    ) -> None:
        """Four policies run together in one `reaper run` (two of them over the same tasks,
        taking turns), three of them approved: each run carries out its own policy's approval
        and no other, and deletes only the ids that approval names."""
        sim_x, url_x = data_pipeline(tasks("1", 4) + tasks("2", 4))
        sim_y, url_y = data_pipeline(tasks("3", 5))
        sim_z, url_z = data_pipeline(tasks("4", 5))
        ws = Workspace(tmp_path, database_url)
        # "first" and "second" list one target: the completed tasks prefixed 1 and 2, split by
        # an id match; "third" and "fourth" are instances of a template at another target.
        ws.write(
            "first", policy_doc(url_x, name="first", select=_match("^task_20260901"), delete=LIMIT)
        )
        ws.write(
            "second",
            policy_doc(url_x, name="second", select=_match("^task_20260902"), delete=LIMIT),
        )
        other = {"c": url_y, "d": url_z}
        ws.write("tmpl", template(other, **LIMIT))
        first = by_policy(ws.json("run", code=1))
        assert sorted(first) == ["first", "second", "tmpl[eu/c]", "tmpl[eu/d]"]
        assert all(r["held"] for r in first.values())
        approvals = {}
        for name in ("first", "second", "tmpl[eu/c]"):
            ws.run("approve", first[name]["run_id"], "--by", f"by-{name}")
            [held] = ws.json("held", "list", "--policy", name)
            approvals[name] = held["approval_id"]
        assert len(set(approvals.values())) == 3

        second = by_policy(ws.json("run", code=1))
        for name in ("first", "second", "tmpl[eu/c]"):
            assert second[name]["approval_id"] == approvals[name], name
            assert second[name]["status"] == "succeeded", second[name]
        assert second["first"]["deleted"] == 4 and second["second"]["deleted"] == 4
        assert second["tmpl[eu/c]"]["deleted"] == 5
        assert second["tmpl[eu/d]"]["status"] == "refused"
        assert second["tmpl[eu/d]"].get("approval_id") is None
        assert sorted(sim_x.deleted_ids) == sorted(ids("1", 4) + ids("2", 4))
        assert sorted(sim_y.deleted_ids) == sorted(ids("3", 5))
        assert sim_z.deleted_ids == []
        for name in ("first", "second", "tmpl[eu/c]"):
            rows = ws.json("audit", "--run-id", second[name]["run_id"])
            deleted = [r for r in rows if r["outcome"] == "deleted"]
            assert deleted and {r["approval_id"] for r in deleted} == {approvals[name]}, name
            assert {r["policy"] for r in deleted} == {name}

    def test_apply_held_carries_out_one_instance_and_leaves_the_others_approval(
        self, data_pipeline: Start, receiver: Receiver, tmp_path: Path
    ) -> None:
        """Two approved instances: `reaper apply --held RUN_ID` runs only the instance whose
        plan RUN_ID held (its webhook names that instance, mode apply, and the approval); the
        other instance's approval stays in force and its next run carries it out."""
        sim_a, url_a = data_pipeline(tasks("1", 5))
        sim_b, url_b = data_pipeline(tasks("2", 5))
        ws = Workspace(tmp_path, f"sqlite:///{tmp_path / 'audit.db'}")
        ws.write("tmpl", template({"a": url_a, "b": url_b}, **LIMIT))
        first = by_policy(ws.json("run", code=1))
        approvals = {}
        for name in first:
            ws.run("approve", first[name]["run_id"], "--by", "alice")
            [held] = ws.json("held", "list", "--policy", name)
            approvals[name] = held["approval_id"]
        ws.notify_to(receiver)
        [applied] = ws.json("apply", "--held", first["tmpl[eu/a]"]["run_id"])
        assert (applied["policy"], applied["status"], applied["deleted"]) == (
            "tmpl[eu/a]",
            "succeeded",
            5,
        )
        assert applied["approval_id"] == approvals["tmpl[eu/a]"]
        assert (sorted(sim_a.deleted_ids), sim_b.deleted_ids) == (ids("1", 5), [])
        [summary] = receiver.of_type("run.summary")
        data = summary.verified["data"]
        assert (data["policy"], data["run_id"], data["mode"], data["approval_id"]) == (
            "tmpl[eu/a]",
            applied["run_id"],
            "apply",
            approvals["tmpl[eu/a]"],
        )
        [still] = ws.json("held", "list")
        assert (still["policy"], still["status"]) == ("tmpl[eu/b]", "approved")
        ws.run("apply", "--held", first["tmpl[eu/a]"]["run_id"], code=1)  # carried out once
        later = by_policy(ws.json("run", "--policy", "tmpl"))
        assert later["tmpl[eu/b]"]["approval_id"] == approvals["tmpl[eu/b]"]
        assert later["tmpl[eu/a]"]["deleted"] == 0
        assert sorted(sim_b.deleted_ids) == ids("2", 5)


def _match(pattern: str) -> dict[str, Any]:
    return {"status": ["completed"], "older_than": "30d", "match": {"task_id": pattern}}


# --- notifications from concurrent runs ----------------------------------------------------------


class TestConcurrentNotifications:
    def test_every_event_names_its_own_policy_and_run(
        self, data_pipeline: Start, receiver: Receiver, tmp_path: Path, database_url: str
    ) -> None:
        """Three policies run at once (two template instances, one held by its guard; one with
        delete.notice): every webhook verifies, and names the policy and the run that sent it;
        each run sends one summary, the held one its plan.held, the noticing one its upcoming
        deletions with its own ids; every delivery is recorded under its policy and run."""
        sim_a, url_a = data_pipeline(tasks("1", 4))
        _, url_b = data_pipeline(tasks("2", 5))
        _, url_c = data_pipeline(tasks("3", 3))
        ws = Workspace(tmp_path, database_url)
        ws.notify_to(receiver)
        ws.write("tmpl", template({"a": url_a, "b": url_b}, max_deletions=4))
        ws.write("noticed", policy_doc(url_c, name="noticed", delete={"notice": "3d"}))
        runs = by_policy(ws.json("run", code=1))
        assert (runs["tmpl[eu/a]"]["status"], runs["tmpl[eu/b]"]["status"]) == (
            "succeeded",
            "refused",
        )
        assert runs["noticed"]["status"] == "succeeded" and runs["noticed"]["deleted"] == 0
        assert len(sim_a.deleted_ids) == 4
        run_ids = {name: r["run_id"] for name, r in runs.items()}

        seen: dict[str, list[str]] = {}
        for request in receiver:
            assert request.error is None, request.error
            data = request.verified["data"]
            assert data["run_id"] == run_ids[data["policy"]], data
            seen.setdefault(data["policy"], []).append(request.verified["type"])
        assert sorted(seen["tmpl[eu/a]"]) == ["run.summary"]
        assert sorted(seen["tmpl[eu/b]"]) == ["plan.held", "run.summary"]
        assert sorted(seen["noticed"]) == ["deletions.upcoming", "run.summary"]
        [upcoming] = receiver.of_type("deletions.upcoming")
        assert upcoming.verified["data"]["count"] == 3
        assert sorted(upcoming.verified["data"]["task_ids"]) == ids("3", 3)
        [held] = receiver.of_type("plan.held")
        assert (held.verified["data"]["eligible"], held.verified["data"]["listed"]) == (5, 5)
        summaries = {
            r.verified["data"]["policy"]: r.verified["data"]
            for r in receiver.of_type("run.summary")
        }
        assert summaries["tmpl[eu/a]"]["deleted"] == 4 and summaries["tmpl[eu/b]"]["deleted"] == 0

        engine_store = _store(database_url)
        try:
            rows = deliveries(engine_store)
        finally:
            engine_store.engine.dispose()
        assert len(rows) == len(receiver.events())
        assert all(row["outcome"] == "delivered" for row in rows)
        assert all(row["run_id"] == run_ids[row["policy"]] for row in rows)
        ids_sent = {r.headers["webhook-id"] for r in receiver}
        assert {row["event_id"] for row in rows} == ids_sent

    def test_run_waits_for_deliveries_once_for_all_policies(
        self, data_pipeline: Start, receiver: Receiver, tmp_path: Path
    ) -> None:
        """A receiver that does not answer: `reaper run` waits REAPER_NOTIFY_WAIT for every
        policy's deliveries together, then records them all abandoned: one
        `notifications_abandoned` line counting the summaries of all three runs."""
        receiver.wait = True
        ws = Workspace(tmp_path, f"sqlite:///{tmp_path / 'audit.db'}")
        ws.notify_to(receiver)
        ws.env["REAPER_NOTIFY_WAIT"] = "1s"
        for name in ("p1", "p2", "p3"):
            _, url = data_pipeline(tasks("1", 2))
            ws.write(name, policy_doc(url, name=name))
        result = ws.run("run", "--output", "json")
        receiver.hold.set()
        runs = json.loads(result.stdout)
        assert [r["status"] for r in runs] == ["succeeded"] * 3
        abandoned = [
            e for e in events(result.stderr) if e.get("event") == "notifications_abandoned"
        ]
        assert len(abandoned) == 1, abandoned
        assert abandoned[0]["count"] == 3
        store = _store(ws.env["REAPER_DATABASE_URL"])
        try:
            rows = deliveries(store)
        finally:
            store.engine.dispose()
        assert sorted((row["policy"], row["event"], row["outcome"]) for row in rows) == [
            (name, "run.summary", "abandoned") for name in ("p1", "p2", "p3")
        ]


def _store(url: str) -> AuditStore:
    from reaper.db import make_engine

    return AuditStore(make_engine(url))


# --- approvals and notices in bounded runs -------------------------------------------------------


def run(loaded: Any, store: AuditStore, **options: Any) -> PolicyRun:
    return asyncio.run(run_policy(loaded, store, **options))


def approve(store: AuditStore, run_id: str) -> Any:
    from datetime import UTC, datetime

    return HeldStore(store).approve(
        run_id, by="olga", now=datetime.now(UTC), valid_for=timedelta(hours=24), comment="ok"
    )


class TestBoundedApprovals:
    def test_an_approval_is_not_used_up_by_a_run_whose_time_was_up_before_deleting(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """A run carrying out an approval whose max_run_time is up before its first batch sends
        nothing and leaves everything for the next run: the approval was not carried out, so
        the next run (still within its validity) carries it out and deletes the approved ids,
        instead of being refused by the guard again."""
        sim, url = data_pipeline(tasks("1", 6))
        loaded = make_policy(url, delete={**LIMIT, "max_run_time": "30s"})
        refused = run(loaded, store, now=NOW)
        assert refused.status is RunStatus.REFUSED and refused.held
        approval = approve(store, refused.run_id)
        clock = [0.0]

        def listing_took_long(_: object) -> None:
            clock[0] = 31.0

        late = run(loaded, store, now=NOW, on_plan=listing_took_long, monotonic=lambda: clock[0])
        assert late.status is RunStatus.PARTIAL and late.time_up
        assert (late.summary.deleted, late.remaining) == (0, 6)
        assert sim.deleted_ids == []

        after = run(loaded, store, now=NOW)
        assert after.status is RunStatus.SUCCEEDED, after.error
        assert after.approval_id == approval.id
        assert sorted(sim.deleted_ids) == ids("1", 6)
        [held] = HeldStore(store).held(include_closed=True)
        assert (held.status, held.applied_run_id) == ("applied", after.run_id)

    def test_an_approval_is_not_used_up_by_a_run_the_clock_guard_refused(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """The clock guard refuses a run whatever was approved, and deletes nothing: the
        approval was not carried out, and the next run, with the clock fixed, carries it out."""
        sim, url = data_pipeline(tasks("1", 6))
        loaded = make_policy(url, delete=LIMIT)
        refused = run(loaded, store, now=NOW)
        assert refused.held
        approval = approve(store, refused.run_id)
        sim.set_faults(Faults(clock_skew_s=2 * 86400.0))  # the target's clock two days off
        skewed = run(loaded, store, now=NOW)
        assert skewed.status is RunStatus.REFUSED and not skewed.held
        assert "clock_skew" in (skewed.error or "")
        assert sim.deleted_ids == []
        sim.set_faults(Faults())
        fixed = run(loaded, store, now=NOW)
        assert fixed.status is RunStatus.SUCCEEDED, fixed.error
        assert fixed.approval_id == approval.id
        assert sorted(sim.deleted_ids) == ids("1", 6)

    def test_a_run_cut_by_max_run_time_carries_out_its_approval_once(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """An approved run that runs out of time part-way deletes only approved ids, oldest
        first, and the approval is closed as carried out by it (carried out once)."""
        sim, url = data_pipeline(tasks("1", 12))
        loaded = make_policy(
            url, delete={**LIMIT, "batch_size": 2, "concurrency": 1, "max_run_time": "10s"}
        )
        refused = run(loaded, store, now=NOW)
        approval = approve(store, refused.run_id)
        clock = [0.0]

        def tick(_: object) -> None:
            clock[0] += 4.0

        cut = run(loaded, store, now=NOW, on_batch=tick, monotonic=lambda: clock[0])
        assert cut.status is RunStatus.PARTIAL and cut.time_up
        assert cut.approval_id == approval.id
        assert 0 < cut.summary.deleted < 12
        # Oldest first: the ids with the largest suffix are the oldest.
        assert sorted(sim.deleted_ids) == sorted(ids("1", 12)[12 - cut.summary.deleted :])
        [held] = HeldStore(store).held(include_closed=True)
        assert (held.status, held.applied_run_id) == ("applied", cut.run_id)


class TestNoticeInBoundedRuns:
    def test_a_run_cut_by_max_run_time_leaves_the_noticed_rest_due(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """delete.notice with max_run_time: the first run notices every task and deletes
        none; once the notice has passed a run that runs out of time deletes the oldest part;
        the rest keep their notice (nothing is noticed again) and the next run deletes them,
        each task once."""
        sim, url = data_pipeline(tasks("1", 10))
        loaded = make_policy(
            url,
            delete={"notice": "3d", "batch_size": 2, "concurrency": 1, "max_run_time": "10s"},
        )
        first = run(loaded, store, now=NOW)
        assert first.status is RunStatus.SUCCEEDED and sim.deleted_ids == []
        assert first.plan is not None and first.plan.notice is not None
        assert sorted(first.plan.notice.new) == ids("1", 10)
        noticed = NoticeStore(store).first_seen(loaded.name)
        assert set(noticed) == set(ids("1", 10))

        clock = [0.0]

        def tick(_: object) -> None:
            clock[0] += 4.0

        later = NOW + timedelta(days=4)
        cut = run(loaded, store, now=later, on_batch=tick, monotonic=lambda: clock[0])
        assert cut.status is RunStatus.PARTIAL and cut.time_up
        assert cut.plan is not None and cut.plan.notice is not None
        assert (cut.plan.notice.due, cut.plan.notice.new) == (10, [])
        done = cut.summary.deleted
        assert 0 < done < 10 and cut.remaining == 10 - done
        assert sorted(sim.deleted_ids) == sorted(ids("1", 10)[10 - done :])
        left = NoticeStore(store).first_seen(loaded.name)
        assert {k: v for k, v in left.items() if k not in sim.deleted_ids} == {
            k: v for k, v in noticed.items() if k not in sim.deleted_ids
        }

        rest = run(loaded, store, now=later + timedelta(minutes=1))
        assert rest.status is RunStatus.SUCCEEDED, rest.error
        assert rest.plan is not None and rest.plan.notice is not None
        assert rest.plan.notice.new == []
        assert rest.summary.deleted == 10 - done
        assert sorted(sim.deleted_ids) == ids("1", 10)
        assert max(sim.delete_requests_by_id.values()) == 1

    def test_a_held_plan_of_a_noticed_policy_holds_only_the_due_tasks(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """With notice and a guard: the guard counts only the tasks due now; the held plan
        holds those; after approval the next run deletes exactly them, while tasks noticed
        later keep waiting for their own notice."""
        sim, url = data_pipeline(tasks("1", 5))
        loaded = make_policy(url, delete={"notice": "3d", **LIMIT})
        assert run(loaded, store, now=NOW).status is RunStatus.SUCCEEDED
        sim.add_tasks(tasks("2", 2))
        later = NOW + timedelta(days=4)
        refused = run(loaded, store, now=later)
        assert refused.status is RunStatus.REFUSED and refused.held
        [held] = HeldStore(store).held()
        assert held.eligible == 5
        assert sorted(i["task_id"] for i in HeldStore(store).items(held.run_id)) == ids("1", 5)
        approve(store, held.run_id)
        done = run(loaded, store, now=later + timedelta(minutes=1))
        assert done.status is RunStatus.SUCCEEDED, done.error
        assert sorted(sim.deleted_ids) == ids("1", 5)
        seen = NoticeStore(store).first_seen(loaded.name)
        assert {task_id: seen[task_id] for task_id in ids("2", 2)} == dict.fromkeys(
            ids("2", 2), later
        )
        assert done.plan is not None and done.plan.notice is not None
        assert sorted(done.plan.notice.waiting) == ids("2", 2)


# --- pins, instances and shards ------------------------------------------------------------------


def shard_of(name: str, count: int) -> int:
    """README: the SHA-256 of the (instance) name, read as a big-endian number, modulo N."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest(), "big") % count


class TestPinsAcrossTheFleet:
    def test_pins_hold_in_every_shard(
        self, data_pipeline: Start, tmp_path: Path, database_url: str
    ) -> None:
        """Instances split over two shards, a pin on one instance (`--policy NAME[key]`) and a
        pin for the whole target kind: each `reaper run --shard K/2` runs only its instances
        and deletes everything else they select, never a pinned task; a pin for one instance
        does not protect the same id on another instance's target."""
        sites = ["a", "b", "c", "d"]
        sims, urls = {}, {}
        for site in sites:
            sims[site], urls[site] = data_pipeline(tasks("1", 4))
        ws = Workspace(tmp_path, database_url)
        ws.write("tmpl", template(urls))
        names = {site: f"tmpl[eu/{site}]" for site in sites}
        shards = {site: shard_of(names[site], 2) for site in sites}
        assert set(shards.values()) == {0, 1}  # the names fall in both shards
        held_here, held_everywhere = ids("1", 4)[0], ids("1", 4)[3]
        ws.run("pin", held_here, "--policy", names["a"], "--reason", "case 1", "--by", "lee")
        ws.run("pin", held_everywhere, "--target", "data_pipeline", "--reason", "case 2")
        [pin] = ws.json("pin", "list", "--policy", names["a"])
        assert (pin["task_id"], pin["name"]) == (held_here, names["a"])

        for shard in (0, 1):
            runs = ws.json("run", "--shard", f"{shard}/2")
            assert sorted(r["policy"] for r in runs) == sorted(
                names[site] for site in sites if shards[site] == shard
            )
            assert all(r["status"] == "succeeded" for r in runs)
        for site in sites:
            kept = {held_everywhere} | ({held_here} if site == "a" else set())
            assert sorted(sims[site].deleted_ids) == sorted(set(ids("1", 4)) - kept), site
        pinned = ws.json("explain", held_here)
        assert [e["outcome"] for e in pinned if e["policy"] == names["a"]] == ["pinned"]

    @pytest.mark.parametrize("name", ["tmpl", "tmpl[*", "tmpl[eu/z]"])
    def test_a_pin_must_name_one_policy(
        self, data_pipeline: Start, tmp_path: Path, name: str
    ) -> None:
        """A pin holds for one policy by name: a template's name, a pattern or an instance that
        does not exist would protect nothing, and is refused (exit 2), nothing pinned."""
        _, url = data_pipeline(tasks("1", 2))
        ws = Workspace(tmp_path, f"sqlite:///{tmp_path / 'audit.db'}")
        ws.write("tmpl", template({"a": url}))
        refused = ws.run("pin", ids("1", 1)[0], "--policy", name, code=2)
        assert "tmpl[eu/a]" in refused.stderr or "tmpl[*]" in refused.stderr
        assert ws.json("pin", "list", "--all") == []


# --- reaper serve: turns, approvals and the daemon's notifier ------------------------------------


class TestServe:
    def test_scheduled_runs_over_one_target_take_turns_and_use_their_own_approvals(
        self,
        data_pipeline: Start,
        store: AuditStore,
        receiver: Receiver,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """`reaper serve` fires two approved policies over the same target together: they take
        turns (their runs do not overlap), each carries out its own approval, and each
        notification, sent through the daemon's notifier, names its own policy and run."""
        from sqlalchemy import select

        from reaper.audit import runs_table
        from reaper.daemon import Daemon, DaemonConfig

        monkeypatch.setenv("HOOK_SECRET", SECRET)
        sim, url = data_pipeline(tasks("1", 4) + tasks("2", 4))
        sink = {"type": "webhook", "url": receiver.url, "secret_env": "HOOK_SECRET"}
        documents = [
            policy_doc(
                url,
                name=name,
                schedule="0 3 * * *",
                select=_match(f"^task_2026090{prefix}"),
                delete={**LIMIT, "batch_size": 1, "concurrency": 1},
                notify=[sink],
            )
            for name, prefix in (("first", "1"), ("second", "2"))
        ]
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(documents), encoding="utf-8")
        daemon = Daemon(DaemonConfig(policies=tmp_path), store)
        loaded = {item.name: item for item in daemon.load()}
        held_runs = {name: run(item, store).run_id for name, item in loaded.items()}
        approvals = {name: approve(store, held_runs[name]).id for name in loaded}
        receiver.requests.clear()
        daemon.install(list(loaded.values()))

        async def main() -> None:
            await asyncio.gather(daemon._fire("first"), daemon._fire("second"))
            await daemon.notifier.drain(30)

        asyncio.run(main())
        assert sorted(sim.deleted_ids) == sorted(ids("1", 4) + ids("2", 4))
        assert sim.overlapping_deletes == 0
        with store.engine.connect() as connection:
            runs = [
                dict(row._mapping)
                for row in connection.execute(
                    select(runs_table).where(runs_table.c.approval_id.is_not(None))
                )
            ]
        assert {r["policy"]: r["approval_id"] for r in runs} == approvals
        a, b = runs
        assert a["finished_at"] <= b["started_at"] or b["finished_at"] <= a["started_at"]
        run_ids = {r["policy"]: r["id"] for r in runs}
        summaries = receiver.of_type("run.summary")
        assert len(summaries) == 2
        for request in summaries:
            data = request.verified["data"]
            assert data["run_id"] == run_ids[data["policy"]]
            assert data["approval_id"] == approvals[data["policy"]]
            assert data["deleted"] == 4


class TestTemplateChanges:
    def test_adding_an_instance_keeps_the_others_approvals(
        self, data_pipeline: Start, store: AuditStore, tmp_path: Path
    ) -> None:
        """A fleet grows by one project: the other instances' policies did not change, so an
        approval given for one of them before is still carried out."""
        from reaper.policy import load_policies

        sim_a, url_a = data_pipeline(tasks("1", 5))
        _, url_b = data_pipeline(tasks("2", 5))
        path = tmp_path / "tmpl.yaml"
        path.write_text(yaml.safe_dump(template({"a": url_a}, **LIMIT)), encoding="utf-8")
        [before] = load_policies([path])
        refused = run(before, store, now=NOW)
        assert before.name == "tmpl[eu/a]" and refused.held
        approval = approve(store, refused.run_id)
        grown = template({"a": url_a, "b": url_b}, **LIMIT)
        path.write_text(yaml.safe_dump(grown), encoding="utf-8")
        after = {item.name: item for item in load_policies([path])}
        assert sorted(after) == ["tmpl[eu/a]", "tmpl[eu/b]"]
        result = run(after["tmpl[eu/a]"], store, now=NOW)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert result.approval_id == approval.id
        assert sorted(sim_a.deleted_ids) == ids("1", 5)


class TestWithdrawal:
    def test_a_rejection_before_the_first_batch_wins(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """An approved plan is rejected while the run carrying it out is still planning: the
        run sends nothing (aborted, saying the approval was withdrawn) and the plan stays
        rejected."""
        from datetime import UTC, datetime

        sim, url = data_pipeline(tasks("1", 5))
        loaded = make_policy(url, delete=LIMIT)
        refused = run(loaded, store, now=NOW)
        approve(store, refused.run_id)

        def reject_now(_: object) -> None:
            HeldStore(store).reject(refused.run_id, by="legal", now=datetime.now(UTC))

        result = run(loaded, store, now=NOW, on_plan=reject_now)
        assert result.status is RunStatus.ABORTED
        assert "withdrawn" in (result.error or "")
        assert sim.deleted_ids == [] and sim.stats["delete_requests"] == 0
        assert HeldStore(store).get(refused.run_id).status == "rejected"
