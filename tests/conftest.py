"""Shared fixtures: databases (SQLite and a real PostgreSQL), simulators, policies."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from pgserver import PostgresNotFoundError, PostgresServer, find_pg_bindir

from reaper.audit import AuditStore
from reaper.db import MIGRATIONS, make_engine, upgrade
from reaper.logs import reset_logging
from reaper.policy import LoadedPolicy, load_policy_text
from reaper.simulators import DataPipelineSimulator, Faults, generate_tasks
from reaper.simulators.data_pipeline import SimTask

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No REAPER_* setting leaks in from the developer's shell; logging is reset after."""
    for name in list(os.environ):
        if name.startswith("REAPER_") and name != "REAPER_TEST_SKIP_POSTGRES":
            monkeypatch.delenv(name)
    yield
    reset_logging()


# --- databases --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL cluster for the whole session (skip only if told to)."""
    try:
        find_pg_bindir()
        missing = None
    except PostgresNotFoundError as exc:
        missing = str(exc)
    if missing is not None:
        if os.environ.get("REAPER_TEST_SKIP_POSTGRES") == "1":
            pytest.skip(f"REAPER_TEST_SKIP_POSTGRES=1 and {missing}")
        pytest.fail(
            f"{missing}\nSet REAPER_TEST_SKIP_POSTGRES=1 to skip the PostgreSQL tests instead.",
            pytrace=False,
        )
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"], ids=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database per test, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'audit.db'}"
        return
    server: PostgresServer = request.getfixturevalue("pg_server")
    url = server.create_database()
    try:
        yield url
    finally:
        server.drop_database(sa.make_url(url).database or "")


@pytest.fixture
def private_pg_server() -> Iterator[PostgresServer]:
    """A cluster of the test's own, for tests that stop or restart PostgreSQL."""
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="module")
def module_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditStore]:
    """One SQLite audit store for a module's many generated examples."""
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('db') / 'audit.db'}")
    upgrade(engine)
    yield AuditStore(engine)
    engine.dispose()


def migrate_to(url: str, revision: str) -> None:
    """Bring a database to an older migration, as an earlier reaper would have left it."""
    from alembic import command
    from alembic.config import Config

    engine = make_engine(url)
    with engine.begin() as connection:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    engine.dispose()


@pytest.fixture
def store(database_url: str) -> Iterator[AuditStore]:
    """A migrated audit store on each database."""
    engine = make_engine(database_url)
    upgrade(engine)
    yield AuditStore(engine)
    engine.dispose()


# --- simulators and policies ------------------------------------------------------------------


def sim_task(
    task_id: str,
    status: str = "completed",
    age: timedelta = timedelta(days=40),
    *,
    now: datetime = NOW,
    **extra: Any,
) -> SimTask:
    """A simulator task created ``age`` before ``now``."""
    created = now - age
    finished = status not in ("pending", "in_progress")
    return SimTask(
        task_id=task_id,
        task_name=extra.pop("task_name", f"name of {task_id}"),
        status=status,
        step_status=None,
        created_at=created,
        started_at=created + timedelta(seconds=5),
        completed_at=created + timedelta(minutes=10) if finished else None,
        updated_at=created + timedelta(minutes=10),
        files_count=extra.pop("files_count", 3),
        size_bytes=extra.pop("size_bytes", 2048),
        **extra,
    )


@pytest.fixture
def data_pipeline() -> Iterator[Callable[..., tuple[DataPipelineSimulator, str]]]:
    """Start data_pipeline simulators on 127.0.0.1 (random ports); all stopped after the test."""
    started: list[DataPipelineSimulator] = []

    def start(
        tasks: list[SimTask] | None = None,
        *,
        faults: Faults | None = None,
        timezone: str = "UTC",
        n: int = 0,
    ) -> tuple[DataPipelineSimulator, str]:
        if tasks is None:
            tasks = generate_tasks(n=n, seed=3, now=NOW, timezone=timezone)
        sim = DataPipelineSimulator(tasks, timezone=timezone, faults=faults or Faults(), seed=1)
        url = sim.start()
        started.append(sim)
        return sim, url

    yield start
    for sim in started:
        sim.stop()


def policy_doc(base_url: str, **sections: Any) -> dict[str, Any]:
    """A valid data_pipeline policy document; keyword arguments replace whole sections."""
    doc: dict[str, Any] = {
        "name": "test-policy",
        "target": {"type": "data_pipeline", "base_url": base_url, "timestamps_timezone": "UTC"},
        "select": {"status": ["completed", "failed"], "older_than": "30d"},
        # Tests delete most of small inventories: the fraction guard has its own tests.
        "delete": {"batch_size": 10, "rate": "200/s", "max_fraction": 1.0},
    }
    for key, value in sections.items():
        if value is None:
            doc.pop(key, None)
        elif key == "delete":
            doc[key] = {"max_fraction": 1.0, **value}
        else:
            doc[key] = value
    return doc


def make_policy(base_url: str, **sections: Any) -> LoadedPolicy:
    """Load a policy through the real loader (so tests exercise validation too)."""
    [loaded] = load_policy_text(yaml.safe_dump(policy_doc(base_url, **sections)))
    return loaded


def fast_retries() -> dict[str, Any]:
    """Target settings that retry quickly, for tests of the retry path."""
    return {"attempts": 4, "backoff": "0s", "max_backoff": "1s"}


#: The version of an empty policy text ("{}") as the audit records it: its SHA-256, which
#: `reaper audit verify` checks a policy run's stored text against.
EMPTY_POLICY_HASH = hashlib.sha256(b"{}").hexdigest()
