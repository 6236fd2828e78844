"""A new user's first commands: an empty database is set up by whichever command comes first.

An older schema is migrated only when asked (`reaper db upgrade`, `REAPER_DB_AUTO_UPGRADE`,
`--migrate`); a database holding other tables, or at a revision this reaper does not know, is
refused. Real processes, on SQLite and on a real PostgreSQL.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
import yaml
from conftest import migrate_to, policy_doc
from test_cli import old, reaper
from test_daemon import Process

from reaper.db import current_revision, ensure_schema, head_revision, make_engine, upgrade
from reaper.errors import AuditError
from reaper.settings import Settings, redact_url
from reaper.simulators import DataPipelineSimulator
from reaper.track import track

Start = Callable[..., tuple[DataPipelineSimulator, str]]
#: A password for the PostgreSQL URL (the test server trusts local logins, so any will do).
PASSWORD = "first-run-s3cret"
APARAVI_KEY = "aparavi-test-key"
TOKEN = "abcdefgh12345678"


@pytest.fixture
def fresh(tmp_path: Path, database_url: str) -> dict[str, Any]:
    """An empty database, a policy directory and the environment a new user would set."""
    (tmp_path / "policies").mkdir()
    env = {
        "REAPER_DATABASE_URL": database_url,
        "REAPER_POLICIES": str(tmp_path / "policies"),
        "APARAVI_API_KEY": APARAVI_KEY,
    }
    if database_url.startswith("postgresql"):
        env["REAPER_DATABASE_PASSWORD"] = PASSWORD
    return {"dir": tmp_path, "url": database_url, "env": env}


def write(path: Path, doc: Any) -> Path:
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def aparavi_doc() -> dict[str, Any]:
    return {
        "name": "aparavi-completed",
        "target": {
            "type": "aparavi",
            "base_url": "http://127.0.0.1:9",
            "auth": {"key_env": "APARAVI_API_KEY"},
        },
        "select": {"status": ["Completed"], "older_than": "7d", "age_field": "endTime"},
        "delete": {"rate": "5/s"},
    }


def events(stderr: str, name: str) -> list[dict[str, Any]]:
    found = []
    for line in stderr.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == name:
            found.append(event)
    return found


def revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        return current_revision(engine)
    finally:
        engine.dispose()


def execute(url: str, *statements: str) -> None:
    engine = make_engine(url)
    with engine.begin() as connection:
        for statement in statements:
            connection.exec_driver_sql(statement)
    engine.dispose()


def tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def shown_url(fresh: dict[str, Any]) -> str:
    """The database as reaper may print it: the URL with the password hidden."""
    password = fresh["env"].get("REAPER_DATABASE_PASSWORD")
    return redact_url(Settings(database_url=fresh["url"], database_password=password).database())


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.close()


class TestFirstCommand:
    def test_run_on_a_fresh_database(self, data_pipeline: Start, fresh: dict[str, Any]) -> None:
        """`reaper run` on an empty database sets it up, deletes, exits 0 and logs it once."""
        sim, url = data_pipeline(old(5))
        write(fresh["dir"] / "policies" / "p.yaml", policy_doc(url))
        result = reaper("run", "--output", "json", env=fresh["env"])
        assert result.returncode == 0, result.stderr
        [summary] = json.loads(result.stdout)
        assert summary["status"] == "succeeded" and summary["deleted"] == 5
        assert len(sim.deleted_ids) == 5
        [initialised] = events(result.stderr, "database_initialised")
        assert initialised["revision"] == head_revision()
        assert initialised["database"] == shown_url(fresh)
        assert PASSWORD not in result.stderr + result.stdout
        assert revision(fresh["url"]) == head_revision()

    @pytest.mark.parametrize(
        "args",
        [
            ["audit", "--output", "json"],
            ["audit", "verify"],
            ["audit", "prune", "--older-than", "365d"],
            ["explain", "task_20260901_000001"],
            ["reconcile"],
            ["track", "aparavi", "--token", TOKEN, "--type", "cpu"],
            ["track", "list"],
            ["plan", "--policy", "aparavi-completed"],
        ],
        ids=" ".join,
    )
    def test_every_command_sets_up_an_empty_database(
        self, args: list[str], data_pipeline: Start, fresh: dict[str, Any]
    ) -> None:
        """Each command that needs the database sets up an empty one and then works."""
        _, url = data_pipeline(old(0))
        write(fresh["dir"] / "policies" / "p.yaml", policy_doc(url))
        write(fresh["dir"] / "policies" / "aparavi.yaml", aparavi_doc())
        result = reaper(*args, env=fresh["env"])
        assert result.returncode == 0, result.stderr
        assert len(events(result.stderr, "database_initialised")) == 1
        assert revision(fresh["url"]) == head_revision()
        again = reaper(*args, env=fresh["env"])
        assert again.returncode == 0, again.stderr
        assert events(again.stderr, "database_initialised") == []

    def test_audit_json_on_a_fresh_database_is_an_empty_list(self, fresh: dict[str, Any]) -> None:
        """The first `reaper audit --output json` prints [] on stdout, nothing else."""
        result = reaper("audit", "--output", "json", env=fresh["env"])
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == []

    def test_track_registers_on_a_fresh_database(self, fresh: dict[str, Any]) -> None:
        """`reaper track aparavi` first, as the issue tried it: registered, and listed after."""
        result = reaper("track", "aparavi", "--token", TOKEN, "--type", "gpu", env=fresh["env"])
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"registered: gpu:{TOKEN}")
        listed = reaper("track", "list", "--output", "json", env=fresh["env"])
        assert [(e["type"], e["token"]) for e in json.loads(listed.stdout)] == [("gpu", TOKEN)]

    def test_track_from_python_sets_up_an_empty_database(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`reaper.track()` called by a program first thing on a fresh database registers."""
        url = f"sqlite:///{tmp_path / 'fresh.db'}"
        monkeypatch.setenv("REAPER_DATABASE_URL", url)
        assert track(TOKEN, "cpu").state == "registered"
        assert revision(url) == head_revision()

    def test_apply_sets_up_the_database_a_plan_did_not_need(
        self, data_pipeline: Start, fresh: dict[str, Any]
    ) -> None:
        """A data_pipeline plan touches no database; the `apply` after it sets one up."""
        sim, url = data_pipeline(old(3))
        write(fresh["dir"] / "policies" / "p.yaml", policy_doc(url))
        saved = fresh["dir"] / "plan.json"
        planned = reaper("plan", "--save", str(saved), env=fresh["env"])
        assert planned.returncode == 0, planned.stderr
        if fresh["url"].startswith("sqlite"):
            assert not (fresh["dir"] / "audit.db").exists()
        assert revision(fresh["url"]) is None
        applied = reaper("apply", str(saved), env=fresh["env"])
        assert applied.returncode == 0, applied.stderr
        assert len(sim.deleted_ids) == 3
        assert len(events(applied.stderr, "database_initialised")) == 1

    def test_serve_sets_up_an_empty_database(
        self, data_pipeline: Start, fresh: dict[str, Any]
    ) -> None:
        """`reaper serve` on an empty database sets it up and becomes ready; SIGTERM exits 0."""
        _, url = data_pipeline(old(0))
        write(fresh["dir"] / "policies" / "p.yaml", policy_doc(url, schedule="0 3 * * *"))
        process = Process("serve", "--metrics-port", "0", env=fresh["env"])
        try:
            initialised = process.wait_for("database_initialised")
            process.wait_for("serving")
            assert initialised["revision"] == head_revision()
            assert process.stop() == 0
        finally:
            process.close()
        assert revision(fresh["url"]) == head_revision()


class TestOlderRevision:
    def test_run_refuses_and_says_what_to_do(
        self, data_pipeline: Start, fresh: dict[str, Any]
    ) -> None:
        """At an older revision, `reaper run` exits 1 naming both remedies; nothing is listed."""
        sim, url = data_pipeline(old(5))
        write(fresh["dir"] / "policies" / "p.yaml", policy_doc(url))
        migrate_to(fresh["url"], "0001")
        result = reaper("run", env=fresh["env"])
        assert result.returncode == 1
        assert "at revision 0001" in result.stderr
        assert "reaper db upgrade" in result.stderr
        assert "REAPER_DB_AUTO_UPGRADE=true" in result.stderr
        assert PASSWORD not in result.stderr
        assert sim.stats["requests"] == 0
        assert revision(fresh["url"]) == "0001"

    @pytest.mark.parametrize(
        "args",
        [
            ["track", "aparavi", "--token", TOKEN, "--type", "cpu"],
            ["track", "list"],
            ["audit", "--output", "json"],
            ["explain", "task_20260901_000001"],
        ],
        ids=" ".join,
    )
    def test_every_command_refuses_without_auto_upgrade(
        self, args: list[str], fresh: dict[str, Any]
    ) -> None:
        """Commands other than `run` refuse an older schema too (exit 1), and leave it alone."""
        migrate_to(fresh["url"], "0001")
        result = reaper(*args, env=fresh["env"])
        assert result.returncode == 1
        assert "reaper db upgrade" in result.stderr
        assert revision(fresh["url"]) == "0001"

    @pytest.mark.parametrize(
        "args",
        [
            ["track", "aparavi", "--token", TOKEN, "--type", "cpu"],
            ["audit", "--output", "json"],
            ["explain", "task_20260901_000001"],
        ],
        ids=" ".join,
    )
    def test_auto_upgrade_is_honoured_everywhere(
        self, args: list[str], fresh: dict[str, Any]
    ) -> None:
        """REAPER_DB_AUTO_UPGRADE=true migrates an older schema for any command, `track` too."""
        migrate_to(fresh["url"], "0001")
        result = reaper(*args, env={**fresh["env"], "REAPER_DB_AUTO_UPGRADE": "true"})
        assert result.returncode == 0, result.stderr
        [upgraded] = events(result.stderr, "database_upgraded")
        assert (upgraded["revision_before"], upgraded["revision"]) == ("0001", head_revision())
        assert revision(fresh["url"]) == head_revision()

    def test_migrate_flag_upgrades(self, data_pipeline: Start, fresh: dict[str, Any]) -> None:
        """`reaper run --migrate` migrates an older schema, then runs."""
        sim, url = data_pipeline(old(2))
        write(fresh["dir"] / "policies" / "p.yaml", policy_doc(url))
        migrate_to(fresh["url"], "0001")
        result = reaper("run", "--migrate", env=fresh["env"])
        assert result.returncode == 0, result.stderr
        assert len(sim.deleted_ids) == 2
        assert revision(fresh["url"]) == head_revision()


class TestRefusedDatabases:
    def test_a_database_with_other_tables_is_not_taken_over(
        self, data_pipeline: Start, fresh: dict[str, Any]
    ) -> None:
        """Tables that are not reaper's and no alembic_version: refused, nothing created."""
        sim, url = data_pipeline(old(2))
        write(fresh["dir"] / "policies" / "p.yaml", policy_doc(url))
        execute(fresh["url"], "CREATE TABLE orders (id INTEGER PRIMARY KEY)")
        for args in (["run"], ["track", "aparavi", "--token", TOKEN, "--type", "cpu"]):
            result = reaper(*args, env={**fresh["env"], "REAPER_DB_AUTO_UPGRADE": "true"})
            assert result.returncode == 1, args
            assert "not empty but has no reaper schema" in result.stderr
            assert "orders" in result.stderr
        assert tables(fresh["url"]) == {"orders"}
        assert sim.stats["requests"] == 0

    def test_db_upgrade_adds_reaper_to_a_shared_database_when_asked(
        self, fresh: dict[str, Any]
    ) -> None:
        """The explicit `reaper db upgrade` may add reaper's tables beside other tables."""
        execute(fresh["url"], "CREATE TABLE orders (id INTEGER PRIMARY KEY)")
        result = reaper("db", "upgrade", env=fresh["env"])
        assert result.returncode == 0, result.stderr
        assert revision(fresh["url"]) == head_revision()
        assert {"orders", "reaper_runs", "reaper_audit"} <= tables(fresh["url"])
        assert reaper("audit", env=fresh["env"]).returncode == 0

    def test_an_alembic_version_alone_is_still_empty(self, fresh: dict[str, Any]) -> None:
        """An empty alembic_version table (and nothing else) counts as an empty database."""
        execute(fresh["url"], "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        result = reaper("audit", "--output", "json", env=fresh["env"])
        assert result.returncode == 0, result.stderr
        assert revision(fresh["url"]) == head_revision()

    @pytest.mark.parametrize("args", [["run"], ["audit"], ["db", "upgrade"]], ids=" ".join)
    def test_an_unknown_revision_is_refused(self, args: list[str], fresh: dict[str, Any]) -> None:
        """A revision this reaper does not know (a newer reaper's): refused, db upgrade too."""
        write(fresh["dir"] / "policies" / "p.yaml", policy_doc("http://127.0.0.1:9"))
        upgrade_engine = make_engine(fresh["url"])
        upgrade(upgrade_engine)
        upgrade_engine.dispose()
        execute(fresh["url"], "UPDATE alembic_version SET version_num = '9999_from_the_future'")
        result = reaper(*args, env={**fresh["env"], "REAPER_DB_AUTO_UPGRADE": "true"})
        assert result.returncode == 1
        assert "at revision 9999_from_the_future, which this reaper does not know" in (
            result.stderr
        )
        assert "Traceback" not in result.stderr
        assert revision(fresh["url"]) == "9999_from_the_future"


class TestConcurrentSetup:
    def test_two_racing_setups_both_succeed(self, database_url: str) -> None:
        """Two setups of one empty database, made to collide at the lock: both succeed, one
        creates the schema (the other finds it ready) and the database ends at head."""
        holder = make_engine(database_url)
        engines = [make_engine(database_url) for _ in range(2)]
        arrived = [threading.Event() for _ in engines]
        errors: list[BaseException] = []

        for engine, event in zip(engines, arrived, strict=True):
            sa.event.listen(engine, "before_cursor_execute", _signal_at_lock(event))

        def set_up(engine: sa.Engine) -> None:
            try:
                ensure_schema(engine)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        with structlog.testing.capture_logs() as logs:
            with holder.connect() as connection:
                # Hold the migration lock so both setups get past their first look at the
                # database and queue up behind it.
                if connection.dialect.name == "postgresql":
                    connection.execute(
                        sa.text("SELECT pg_advisory_lock(:key)"), {"key": _lock_key()}
                    )
                else:
                    connection.exec_driver_sql("BEGIN IMMEDIATE")
                threads = [threading.Thread(target=set_up, args=(e,)) for e in engines]
                for thread in threads:
                    thread.start()
                for event in arrived:
                    assert event.wait(60)
                if connection.dialect.name == "postgresql":
                    _wait_for_lock_waiters(connection, 2)
                    connection.execute(
                        sa.text("SELECT pg_advisory_unlock(:key)"), {"key": _lock_key()}
                    )
                else:
                    connection.exec_driver_sql("COMMIT")
                for thread in threads:
                    thread.join(120)
        for engine in (holder, *engines):
            engine.dispose()
        assert errors == []
        assert [e["event"] for e in logs if e["event"] == "database_initialised"] == [
            "database_initialised"
        ]
        assert revision(database_url) == head_revision()

    def test_two_processes_track_at_once_on_postgresql(
        self, pg_server: Any, processes: list[Process]
    ) -> None:
        """Two `reaper track aparavi` started together on an empty PostgreSQL both register."""
        url = pg_server.create_database()
        env = {"REAPER_DATABASE_URL": url}
        started = [
            Process("track", "aparavi", "--token", f"{TOKEN}{i}", "--type", "cpu", env=env)
            for i in range(2)
        ]
        processes.extend(started)
        assert [p.popen.wait(timeout=120) for p in started] == [0, 0]
        listed = reaper("track", "list", "--output", "json", env=env)
        assert sorted(e["token"] for e in json.loads(listed.stdout)) == [f"{TOKEN}0", f"{TOKEN}1"]


def _lock_key() -> int:
    from reaper import db

    return db._MIGRATION_LOCK_KEY


def _signal_at_lock(event: threading.Event) -> Callable[..., None]:
    def listener(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "pg_advisory_xact_lock" in statement or statement == "BEGIN IMMEDIATE":
            event.set()

    return listener


def _wait_for_lock_waiters(connection: sa.Connection, count: int) -> None:
    """Block until ``count`` sessions wait for an advisory lock (no timing assumption)."""
    import time

    for _ in range(6000):
        waiting = connection.execute(
            sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        ).scalar_one()
        if waiting >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"{count} sessions never queued for the migration lock")


class TestEnsureSchema:
    def test_an_unreachable_database_is_an_audit_error(self) -> None:
        """ensure_schema on an unreachable PostgreSQL raises AuditError without the password."""
        engine = make_engine("postgresql://reaper:s3cret-pw@127.0.0.1:9/reaper")
        with pytest.raises(AuditError) as info:
            ensure_schema(engine)
        assert "s3cret-pw" not in str(info.value)
