"""The aparavi target: inventory tracking and import, status-based listing, deletion rules, the
inventory handed in through the storage interface, and planning that writes nothing."""

from __future__ import annotations

import ast
import asyncio
import json
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from click.testing import CliRunner
from sqlalchemy import select

import reaper
from reaper.audit import AuditStore, audit_table, runs_table
from reaper.cli import cli
from reaper.errors import ListingError, PolicyError
from reaper.inventory import INVENTORY_POLICY, Inventory
from reaper.policy import LoadedPolicy, load_policy_text
from reaper.runner import Mode, PolicyRun, RunStatus, build_target, run_policy
from reaper.simulators import AparaviSimTask, AparaviSimulator, Faults
from reaper.targets import ListRequest
from reaper.targets.aparavi import AparaviTarget
from reaper.targets.state import TargetState, TaskInventory, TrackedTask
from reaper.track import import_records, read_records, track, track_command

KEY = "aparavi-test-key-3f9c"
KEY_ENV = "REAPER_TEST_APARAVI_KEY"
Sim = Callable[..., tuple[AparaviSimulator, str]]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, store: AuditStore, database_url: str) -> AuditStore:
    """The key in the environment; the migrated test database is reaper's database."""
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv("REAPER_DATABASE_URL", database_url)
    return store


@pytest.fixture
def aparavi() -> Iterator[Sim]:
    """Start Aparavi simulators that accept KEY; stopped after the test."""
    started: list[AparaviSimulator] = []

    def start(tasks: list[AparaviSimTask], **kwargs: Any) -> tuple[AparaviSimulator, str]:
        kwargs.setdefault("api_keys", [KEY])
        sim = AparaviSimulator(tasks, seed=1, **kwargs)
        url = sim.start()
        started.append(sim)
        return sim, url

    yield start
    for sim in started:
        sim.stop()


def now() -> datetime:
    return datetime.now(UTC)


def completed(token: str, ended: timedelta, task_type: str = "cpu") -> AparaviSimTask:
    end = now() - ended
    return AparaviSimTask(token, task_type, "Completed", end - timedelta(minutes=5), end)


def running(token: str, started: timedelta, **kwargs: Any) -> AparaviSimTask:
    return AparaviSimTask(token, "cpu", "Running", now() - started, None, **kwargs)


def policy_doc(url: str, *, target: dict[str, Any] | None = None, **sections: Any) -> Any:
    doc: dict[str, Any] = {
        "name": "aparavi-test",
        "target": {
            "type": "aparavi",
            "base_url": url,
            "auth": {"key_env": KEY_ENV},
            **(target or {}),
        },
        "select": {"status": ["Completed", "Failed"], "older_than": "7d"},
        "delete": {"rate": "200/s", "max_fraction": 1.0},
    }
    doc.update(sections)
    return doc


def policy(url: str, **options: Any) -> LoadedPolicy:
    [loaded] = load_policy_text(yaml.safe_dump(policy_doc(url, **options)))
    return loaded


def terminate_policy(url: str, **target: Any) -> LoadedPolicy:
    return policy(
        url,
        target=target,
        select={
            "status": ["Running"],
            "allow_live": True,
            "age_field": "startTime",
            "older_than": "6h",
        },
    )


def run(loaded: LoadedPolicy, store: AuditStore) -> PolicyRun:
    return asyncio.run(run_policy(loaded, store, now=now()))


def register(store: AuditStore, url: str, tasks: list[AparaviSimTask]) -> None:
    for task in tasks:
        track(task.token, task.type, name=task.name, base_url=url, engine=store.engine)


def rows(store: AuditStore, policy_name: str | None = None) -> list[dict[str, Any]]:
    query = select(audit_table).order_by(audit_table.c.id)
    if policy_name is not None:
        query = query.where(audit_table.c.policy == policy_name)
    with store.engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(query)]


class TestConfig:
    def test_termination_needs_both_fields(self) -> None:
        """allow_running without max_runtime, or max_runtime alone, does not load."""
        with pytest.raises(PolicyError, match="needs max_runtime"):
            policy("http://a.invalid", target={"allow_running": True})
        with pytest.raises(PolicyError, match="only applies with allow_running"):
            policy("http://a.invalid", target={"max_runtime": "6h"})

    def test_running_needs_allow_live(self) -> None:
        """Selecting Running is refused without select.allow_live (it is the live status)."""
        with pytest.raises(PolicyError, match="live status"):
            policy("http://a.invalid", select={"status": ["Running"], "older_than": "6h"})

    def test_key_never_inline(self) -> None:
        """An inline key does not load; exactly one source is required."""
        with pytest.raises(PolicyError, match="never goes in a policy file"):
            policy("http://a.invalid", target={"auth": {"key": KEY}})
        with pytest.raises(PolicyError, match="exactly one of key_env or key_file"):
            policy("http://a.invalid", target={"auth": {}})

    @pytest.mark.parametrize("task_id", ["cpu", "tpu:abc", "cpu:a/b", "cpu:../x", "cpu:"])
    def test_id_guard(self, task_id: str) -> None:
        """Only <cpu|gpu>:<url-safe token> is ever sent."""
        assert AparaviTarget.invalid_id_reason(None, task_id) is not None  # type: ignore[arg-type]


class TestTracking:
    def test_track_is_idempotent(self, env: AuditStore) -> None:
        """Registering twice keeps one entry; the default database is REAPER_DATABASE_URL."""
        first = track("tok-1", "cpu", name="nightly", base_url="http://aparavi.test/")
        second = track("tok-1", "cpu", base_url="http://aparavi.test")
        assert (first.state, second.state) == ("registered", "already tracked")
        assert first.entry.id == second.entry.id
        [entry] = Inventory(env.engine).entries("http://aparavi.test")
        assert (entry.task_id, entry.name) == ("cpu:tok-1", "nightly")

    def test_invalid_registrations_are_refused(self, env: AuditStore) -> None:
        """Bad tokens and types raise ValueError and write nothing."""
        with pytest.raises(ValueError, match="token"):
            track("a/b", "cpu", engine=env.engine)
        with pytest.raises(ValueError, match="type"):
            track("ok", "tpu", engine=env.engine)
        assert Inventory(env.engine).entries() == []

    def test_import_jsonl_and_csv(self, env: AuditStore) -> None:
        """JSON Lines and CSV imports register every line once; repeats are reported."""
        jsonl = '{"token": "a1", "type": "cpu"}\n# comment\n{"token": "a2", "type": "gpu"}\n'
        first = import_records(read_records(jsonl, base_url="http://x.test"), engine=env.engine)
        csv_text = "token,type,name\na2,gpu,again\na3,cpu,third\n"
        second = import_records(read_records(csv_text, base_url="http://x.test"), engine=env.engine)
        assert (first.registered, first.already_tracked) == (2, 0)
        assert (second.registered, second.already_tracked) == (1, 1)
        entries = Inventory(env.engine).entries("http://x.test")
        assert sorted(e.task_id for e in entries) == ["cpu:a1", "cpu:a3", "gpu:a2"]

    def test_bad_import_imports_nothing(self) -> None:
        """One bad line: every problem is reported with its line, nothing is imported."""
        text = '{"token": "a1", "type": "cpu"}\n{"token": "b", "type": "tpu"}\nnot json\n'
        with pytest.raises(ValueError) as info:
            read_records(text, "jsonl")
        assert "line 2" in str(info.value)
        assert "line 3" in str(info.value)

    def test_cli(self, env: AuditStore, tmp_path: Path) -> None:
        """`reaper track aparavi` registers one task or imports a file; `list` shows them."""
        runner = CliRunner()
        one = runner.invoke(
            track_command,
            ["aparavi", "--token", "t-1", "--type", "gpu", "--base-url", "http://x.test"],
        )
        assert one.exit_code == 0, one.output
        assert "registered: gpu:t-1" in one.output
        again = runner.invoke(
            track_command,
            ["aparavi", "--token", "t-1", "--type", "gpu", "--base-url", "http://x.test"],
        )
        assert "already tracked" in again.output
        source = tmp_path / "tasks.csv"
        source.write_text("token,type\nt-2,cpu\nt-3,cpu\n", encoding="utf-8")
        bulk = runner.invoke(
            track_command, ["aparavi", "--from", str(source), "--base-url", "http://x.test"]
        )
        assert bulk.exit_code == 0, bulk.output
        assert "2 registered" in bulk.output
        listed = runner.invoke(track_command, ["list", "--output", "json"])
        assert sorted(e["token"] for e in json.loads(listed.output)) == ["t-1", "t-2", "t-3"]
        bad = runner.invoke(track_command, ["aparavi", "--token", "t-4"])
        assert bad.exit_code == 2


class TestRun:
    def test_completed_tasks_older_than_7d_are_deleted(self, env: AuditStore, aparavi: Sim) -> None:
        """Old completed tasks go; young ones and running ones stay; audit == the server."""
        old = [completed(f"old-{i}", timedelta(days=8 + i)) for i in range(5)]
        young = completed("young", timedelta(days=2))
        live = running("live", timedelta(days=30))
        sim, url = aparavi([*old, young, live])
        register(env, url, [*old, young, live])
        result = run(policy(url), env)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert result.summary.listed == 7
        assert sorted(sim.deleted_ids) == sorted(t.key for t in old)
        audit = rows(env, "aparavi-test")
        assert {r["task_id"] for r in audit if r["outcome"] == "deleted"} == set(sim.deleted_ids)
        assert all(r["reason"] == "older than 7d and status Completed" for r in audit)
        # The next run retires the deleted entries from those audit rows, then lists the rest.
        second = run(policy(url), env)
        assert second.summary.listed == 2
        entries = Inventory(env.engine).entries(url, include_retired=True)
        retired = {e.task_id: e.retired_reason for e in entries if e.retired_at is not None}
        assert set(retired) == {t.key for t in old}
        assert all("audit row" in (reason or "") for reason in retired.values())

    def test_bearer_and_bare_keys(self, env: AuditStore, aparavi: Sim) -> None:
        """The key goes as 'Bearer <key>' by default, bare with scheme: bare."""
        task = completed("t", timedelta(days=9))
        sim, url = aparavi([task], auth_scheme="bare")
        register(env, url, [task])
        refused = run(policy(url), env)
        assert refused.status is RunStatus.ABORTED
        accepted = run(policy(url, target={"auth": {"key_env": KEY_ENV, "scheme": "bare"}}), env)
        assert accepted.status is RunStatus.SUCCEEDED, accepted.error
        assert sim.deleted_ids == ["cpu:t"]
        assert sim.authorization_headers[0] == f"Bearer {KEY}"
        assert sim.authorization_headers[-1] == KEY

    def test_wrong_key_stops_the_policy(
        self, env: AuditStore, aparavi: Sim, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """401 is a configuration error: the policy aborts and nothing is deleted."""
        task = completed("t", timedelta(days=9))
        sim, url = aparavi([task])
        register(env, url, [task])
        monkeypatch.setenv(KEY_ENV, "not-the-key")
        result = run(policy(url), env)
        assert result.status is RunStatus.ABORTED
        assert "401" in (result.error or "")
        assert sim.stats["delete_requests"] == 0

    def test_missing_key_is_a_config_error(self, aparavi: Sim) -> None:
        """No key in the environment: client_auth names the variable."""
        from reaper.errors import ConfigError

        loaded = policy("http://a.invalid")
        with pytest.raises(ConfigError, match=KEY_ENV):
            AparaviTarget.client_auth(loaded.policy.target_config)

    def test_errors_in_200_bodies_fail_the_listing(self, env: AuditStore, aparavi: Sim) -> None:
        """A status call answering HTTP 200 with status Error makes the listing incomplete."""
        tasks = [completed(f"t{i}", timedelta(days=9)) for i in range(3)]
        sim, url = aparavi(tasks)
        sim.broken_tokens.add("t1")
        register(env, url, tasks)
        result = run(policy(url), env)
        assert result.status is RunStatus.ABORTED
        assert "Internal error" in (result.error or "")
        assert sim.stats["delete_requests"] == 0

    def test_status_not_found_retires_with_an_audit_row(
        self, env: AuditStore, aparavi: Sim
    ) -> None:
        """'Task not found' on status: listed as gone, audited as already_gone, then retired."""
        kept, vanished = completed("kept", timedelta(days=1)), completed("gone", timedelta(days=9))
        sim, url = aparavi([kept])
        register(env, url, [kept, vanished])
        result = run(policy(url), env)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert sim.stats["delete_requests"] == 0
        [row] = rows(env, INVENTORY_POLICY)
        assert (row["task_id"], row["outcome"]) == ("cpu:gone", "already_gone")
        assert row["error_message"] == "Task not found"
        [entry] = [
            e for e in Inventory(env.engine).entries(url, include_retired=True) if e.retired_at
        ]
        assert entry.task_id == "cpu:gone"
        assert f"audit row {row['id']}" in (entry.retired_reason or "")
        with env.engine.connect() as connection:
            modes = {r.mode for r in connection.execute(select(runs_table.c.mode))}
        assert "inventory" in modes

    def test_delete_not_found_is_already_gone(self, env: AuditStore, aparavi: Sim) -> None:
        """A task that vanished between listing and delete is already_gone, then retired."""
        task = completed("t", timedelta(days=9))
        sim, url = aparavi([task])
        register(env, url, [task])
        result = asyncio.run(
            run_policy(policy(url), env, now=now(), on_plan=lambda _: sim.remove("cpu", "t"))
        )
        assert result.summary.already_gone == 1
        assert [r["outcome"] for r in rows(env, "aparavi-test")] == ["already_gone"]
        run(policy(url), env)
        assert Inventory(env.engine).entries(url) == []

    def test_cannot_delete_completed_is_never_retried(self, env: AuditStore, aparavi: Sim) -> None:
        """A deployment refusing the delete: failed with a note, retired, not sent again."""
        task = completed("t", timedelta(days=9))
        sim, url = aparavi([task], refuse_completed=True)
        register(env, url, [task])
        first = run(policy(url), env)
        assert first.status is RunStatus.PARTIAL
        [row] = rows(env, "aparavi-test")
        assert (row["outcome"], row["error_message"]) == ("failed", "Cannot delete completed task")
        second = run(policy(url), env)
        assert second.status is RunStatus.SUCCEEDED
        assert sim.delete_requests_by_id["cpu:t"] == 1
        assert Inventory(env.engine).entries(url) == []

    def test_partial_failures_continue(self, env: AuditStore, aparavi: Sim) -> None:
        """Failed deletes keep the service's message; the others go through."""
        tasks = [completed(f"t{i}", timedelta(days=9, minutes=i)) for i in range(20)]
        sim, url = aparavi(tasks, faults=Faults(partial_failure_rate=0.3))
        register(env, url, tasks)
        result = run(policy(url), env)
        audit = rows(env, "aparavi-test")
        failed = [r for r in audit if r["outcome"] == "failed"]
        assert failed and all("engine is busy" in r["error_message"] for r in failed)
        assert {r["task_id"] for r in audit if r["outcome"] == "deleted"} == set(sim.deleted_ids)
        assert result.status is RunStatus.PARTIAL


class TestTermination:
    def test_opt_in_terminates_running_tasks_past_max_runtime(
        self, env: AuditStore, aparavi: Sim
    ) -> None:
        """With allow_running and max_runtime 6h, only tasks running longer are terminated."""
        stuck = [running(f"stuck-{i}", timedelta(hours=7 + i)) for i in range(3)]
        fresh = running("fresh", timedelta(hours=2))
        done = completed("done", timedelta(days=30))
        sim, url = aparavi([*stuck, fresh, done])
        register(env, url, [*stuck, fresh, done])
        result = run(terminate_policy(url, allow_running=True, max_runtime="6h"), env)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert sorted(sim.deleted_ids) == sorted(t.key for t in stuck)
        audit = rows(env, "aparavi-test")
        assert Counter(r["outcome"] for r in audit) == {"deleted": 3}
        assert all(
            (r["note"] or "").startswith("terminated: running longer than 6h") for r in audit
        )

    def test_no_termination_without_the_opt_in(self, env: AuditStore, aparavi: Sim) -> None:
        """select.allow_live alone: running tasks are refused unsent, never terminated."""
        stuck = running("stuck", timedelta(hours=30), zero_end_time=True)
        sim, url = aparavi([stuck])
        register(env, url, [stuck])
        result = run(terminate_policy(url), env)
        assert sim.stats["delete_requests"] == 0
        [row] = rows(env, "aparavi-test")
        assert row["outcome"] == "failed"
        assert "allow_running" in row["error_message"]
        assert result.status is RunStatus.PARTIAL

    def test_younger_than_max_runtime_is_refused(self, env: AuditStore, aparavi: Sim) -> None:
        """older_than below max_runtime: tasks in between are refused by the target itself."""
        task = running("r", timedelta(hours=8))
        sim, url = aparavi([task])
        register(env, url, [task])
        run(terminate_policy(url, allow_running=True, max_runtime="12h"), env)
        assert sim.stats["delete_requests"] == 0
        [row] = rows(env, "aparavi-test")
        assert "not longer than max_runtime 12h" in row["error_message"]

    def test_completed_policies_never_terminate(self, env: AuditStore, aparavi: Sim) -> None:
        """A policy about completed tasks protects running ones, whatever their age."""
        task = running("r", timedelta(days=40))
        sim, url = aparavi([task])
        register(env, url, [task])
        result = run(policy(url, target={"allow_running": True, "max_runtime": "1h"}), env)
        assert result.status is RunStatus.SUCCEEDED
        assert sim.stats["delete_requests"] == 0


class TestPrune:
    def test_prune_audits_every_removed_entry(self, env: AuditStore) -> None:
        """Retired entries are removed only by prune, which writes an audit row for each."""
        inventory = Inventory(env.engine, clock=lambda: now() - timedelta(days=100))
        inventory.register("http://x.test", "a", "cpu")
        inventory.register("http://x.test", "b", "cpu")
        entries = inventory.entries("http://x.test")
        inventory.record_gone("http://x.test", [(entries[0], "Task not found")], store=env)
        pruned = Inventory(env.engine).prune(now() - timedelta(days=90), store=env)
        assert [e.task_id for e in pruned] == ["cpu:a"]
        remaining = Inventory(env.engine).entries(include_retired=True)
        assert [e.task_id for e in remaining] == ["cpu:b"]
        audit = rows(env, INVENTORY_POLICY)
        assert [r["reason"][:16] for r in audit] == ["inventory: the s", "inventory prune:"]
        assert env.verify() == []


class MemoryInventory(TaskInventory):
    """A TaskInventory in memory that logs every write: the target needs no database."""

    def __init__(self, entries: list[TrackedTask], gone: list[tuple[TrackedTask, str]]) -> None:
        self._entries = entries
        self._gone = gone
        self.writes: list[tuple[str, Any]] = []

    def entries(
        self, base_url: str | None = None, *, types: Any, include_retired: bool = False
    ) -> list[TrackedTask]:
        return [e for e in self._entries if e.base_url == base_url and e.type in types]

    def gone_per_audit(self, base_url: str) -> list[tuple[TrackedTask, str]]:
        return [(e, why) for e, why in self._gone if e.base_url == base_url]

    def retire(self, retirements: Any) -> list[TrackedTask]:
        self.writes.append(("retire", [(e.task_id, why) for e, why in retirements]))
        return [e for e, _ in retirements]

    def note_statuses(self, checked: Any) -> None:
        ids = {e.id: e.task_id for e in self._entries}
        self.writes.append(("note_statuses", sorted((ids[i], status) for i, status in checked)))

    def record_gone(self, base_url: str, gone: Any) -> list[TrackedTask]:
        self.writes.append(("record_gone", [(e.task_id, why) for e, why in gone]))
        return [e for e, _ in gone]


def entry(number: int, base: str, token: str) -> TrackedTask:
    return TrackedTask(number, base, token, "cpu", None, now() - timedelta(days=20))


def snapshot(engine: sa.Engine) -> dict[str, list[str]]:
    """Every row of every table in the database, in a stable order."""
    tables = sa.MetaData()
    tables.reflect(engine)
    with engine.connect() as connection:
        return {
            name: sorted(repr(tuple(row)) for row in connection.execute(select(table)))
            for name, table in sorted(tables.tables.items())
        }


class TestStorageSeam:
    def test_the_target_uses_the_inventory_it_is_handed(self, aparavi: Sim) -> None:
        """Listing only reads the handed-in inventory (entries an audit row records as gone
        are not even asked about); save_state then retires, notes statuses, records the gone."""
        sim, url = aparavi(
            [completed("done", timedelta(days=9)), running("live", timedelta(hours=1))]
        )
        base = url.rstrip("/")
        done, live, vanished, earlier = (
            entry(i, base, token) for i, token in enumerate(["done", "live", "vanished", "old"])
        )
        inventory = MemoryInventory(
            [done, live, vanished, earlier], gone=[(earlier, "audit row 7: deleted")]
        )

        async def main() -> tuple[list[Any], list[str]]:
            target, client = build_target(policy(url), state=TargetState(inventory))
            try:
                listed = [
                    (t.id, t.status, t.gone)
                    async for t in target.list_tasks(ListRequest("endTime"))
                ]
                assert inventory.writes == []  # listing wrote nothing
                changes = list(target.state_changes())
                await target.save_state()
                return listed, changes
            finally:
                await client.aclose()

        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(KEY_ENV, KEY)
            listed, changes = asyncio.run(main())
        assert sorted(listed) == [
            ("cpu:done", "Completed", False),
            ("cpu:live", "Running", False),
            ("cpu:vanished", "NotFound", True),
        ]
        # None for the entry an audit row records as gone.
        assert sorted(sim.status_requests) == ["cpu:done", "cpu:live", "cpu:vanished"]
        assert len(changes) == 2
        assert "retire 1 inventory entry" in changes[0]
        assert "1 task(s) the status call reports as not found" in changes[1]
        assert inventory.writes == [
            ("retire", [("cpu:old", "audit row 7: deleted")]),
            (
                "note_statuses",
                [("cpu:done", "Completed"), ("cpu:live", "Running"), ("cpu:vanished", None)],
            ),
            ("record_gone", [("cpu:vanished", "Task not found")]),
        ]

    def test_an_incomplete_listing_saves_nothing(self, aparavi: Sim) -> None:
        """A listing that fails part way leaves nothing to save: the next run starts over."""
        sim, url = aparavi([completed("a", timedelta(days=9)), completed("b", timedelta(days=9))])
        sim.broken_tokens.add("b")
        base = url.rstrip("/")
        inventory = MemoryInventory([entry(1, base, "a"), entry(2, base, "b")], gone=[])

        async def main() -> list[str]:
            target, client = build_target(policy(url), state=TargetState(inventory))
            try:
                with pytest.raises(ListingError):
                    async for _ in target.list_tasks(ListRequest("endTime")):
                        pass
                await target.save_state()
                return list(target.state_changes())
            finally:
                await client.aclose()

        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(KEY_ENV, KEY)
            assert asyncio.run(main()) == []
        assert inventory.writes == []

    def test_a_target_that_keeps_state_is_not_built_without_it(self) -> None:
        """build_target refuses an aparavi policy without the stores it keeps its state in."""
        assert AparaviTarget.keeps_state
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(KEY_ENV, KEY)
            with pytest.raises(ValueError, match="keeps state"):
                build_target(policy("http://a.invalid"))

    def test_dependencies_run_one_way(self) -> None:
        """No module of reaper imports itself back through others (the audit, the inventory and
        the Aparavi target used to), and no target module imports a store or a database."""
        graph = import_graph()
        assert cycles(graph) == []
        stores = {"reaper.audit", "reaper.inventory", "reaper.db", "reaper.settings", "sqlalchemy"}
        for module, imported in graph.items():
            if module.startswith("reaper.targets"):
                assert imported & stores == set(), module


def import_graph() -> dict[str, set[str]]:
    """Which reaper modules (and sqlalchemy) each module of the package imports when it runs,
    anywhere in it (``if TYPE_CHECKING:`` blocks aside); read from the source, so that the
    package's ``__init__`` importing everything does not blur it."""
    root = Path(reaper.__file__).parent
    modules = {
        _name(path.relative_to(root.parent)): path
        for path in root.rglob("*.py")
        if "migrations" not in path.parts
    }
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        imported = _runtime_imports(ast.parse(path.read_text(encoding="utf-8")))
        graph[module] = {
            name
            for name in imported
            if (name in modules and name not in ("reaper", module)) or name == "sqlalchemy"
        }
    return graph


def _runtime_imports(node: ast.AST) -> set[str]:
    if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
        return set().union(*(_runtime_imports(child) for child in node.orelse))
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if isinstance(node, ast.ImportFrom) and node.module:
        return {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return set().union(*(_runtime_imports(child) for child in ast.iter_child_nodes(node)))


def _name(path: Path) -> str:
    return ".".join(path.with_suffix("").parts).removesuffix(".__init__")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The modules that reach themselves again, one path each."""
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            found.append([*path[path.index(module) :], module])
            return
        if module in done:
            return
        for name in sorted(graph.get(module, ())):
            visit(name, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    return found


class TestPlanningIsReadOnly:
    def scenario(self, store: AuditStore, aparavi: Sim, tmp_path: Path) -> tuple[str, Path]:
        """A task deleted by an earlier run (its entry not retired yet), one registered but
        unknown to the server, one young: a run would retire two entries and audit one."""
        old, young = completed("old", timedelta(days=9)), completed("young", timedelta(days=1))
        sim, url = aparavi([old, young])
        register(store, url, [old, young])
        assert run(policy(url), store).status is RunStatus.SUCCEEDED
        assert sim.deleted_ids == ["cpu:old"]
        register(store, url, [completed("vanished", timedelta(days=9))])
        path = tmp_path / "aparavi.yaml"
        path.write_text(yaml.safe_dump(policy_doc(url)), encoding="utf-8")
        return url, path

    def test_plan_leaves_the_database_unchanged(
        self, env: AuditStore, aparavi: Sim, tmp_path: Path
    ) -> None:
        """`reaper plan` writes nothing (every table's rows compared before and after) and says
        what a run would write; the run that follows writes it."""
        url, path = self.scenario(env, aparavi, tmp_path)
        before = snapshot(env.engine)
        as_json = CliRunner().invoke(cli, ["plan", "--policies", str(path), "--output", "json"])
        as_table = CliRunner().invoke(cli, ["plan", "--policies", str(path)])
        assert (as_json.exit_code, as_table.exit_code) == (0, 0), as_json.output + as_table.output
        assert snapshot(env.engine) == before
        [document] = json.loads(as_json.stdout)
        changes = document["state_changes"]
        assert [change.split(" whose")[0] for change in changes[:1]] == ["retire 1 inventory entry"]
        assert "record 1 task(s) the status call reports as not found" in changes[1]
        assert f"a run would also {changes[0]}" in as_table.stdout
        assert run(policy(url), env).status is RunStatus.SUCCEEDED
        assert snapshot(env.engine) != before
        retired = Inventory(env.engine).entries(url, include_retired=True)
        assert sorted(e.task_id for e in retired if e.retired_at) == ["cpu:old", "cpu:vanished"]

    def test_a_dry_run_leaves_the_inventory_unchanged(
        self, env: AuditStore, aparavi: Sim, tmp_path: Path
    ) -> None:
        """A dry run records its own run, and changes no inventory entry."""
        url, _ = self.scenario(env, aparavi, tmp_path)
        before = snapshot(env.engine)["reaper_aparavi_inventory"]
        result = asyncio.run(run_policy(policy(url), env, now=now(), mode=Mode.DRY_RUN))
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert snapshot(env.engine)["reaper_aparavi_inventory"] == before
