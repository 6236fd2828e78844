"""Crashes: `reaper run` killed with SIGKILL anywhere; after `reaper reconcile` the audit is true.

Real processes against the data_pipeline simulator and a real PostgreSQL. Named failpoints
(``REAPER_FAILPOINT``) kill the process exactly between intent and request and between response
and outcome write; random SIGKILLs cover the rest (listing, mid-batch, anywhere).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import policy_doc, sim_task
from pgserver import PostgresServer
from sqlalchemy import select

from reaper.audit import audit_table, runs_table
from reaper.db import make_engine
from reaper.simulators import DataPipelineSimulator, Faults

Start = Callable[..., tuple[DataPipelineSimulator, str]]
TASKS = 80


def reaper(*args: str, env: dict[str, str], failpoint: str | None = None) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("REAPER_")}
    extra = {"REAPER_FAILPOINT": failpoint} if failpoint else {}
    return subprocess.Popen(
        [sys.executable, "-m", "reaper", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**base, "REAPER_LOG_FORMAT": "json", **env, **extra},
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def audit_state(url: str) -> tuple[dict[str, set[str]], list[str]]:
    engine = make_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(select(audit_table.c.task_id, audit_table.c.outcome)).all()
        statuses = list(connection.execute(select(runs_table.c.status)).scalars())
    engine.dispose()
    by_outcome: dict[str, set[str]] = {}
    for task_id, outcome in rows:
        by_outcome.setdefault(outcome, set()).add(task_id)
    return by_outcome, statuses


def scenario(index: int) -> tuple[str | None, float | None]:
    """(failpoint, kill delay): named failpoints first, then random kills."""
    named = ["after_intent", "after_response", "after_intent", "after_response"]
    if index < len(named):
        return named[index], None
    return None, random.Random(index).uniform(0.3, 2.2)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(24))
def test_sigkill_then_reconcile(
    index: int, data_pipeline: Start, pg_server: PostgresServer, tmp_path: Path
) -> None:
    """After a SIGKILL and `reaper reconcile`: audit == simulator, no pending, none twice."""
    now = datetime.now(UTC)
    tasks = [
        sim_task(f"task_20260901_{i:06d}", age=timedelta(days=40, minutes=i), now=now)
        for i in range(TASKS)
    ]
    sim, url = data_pipeline(tasks, faults=Faults(latency_ms=30))
    doc = policy_doc(url, delete={"batch_size": 5, "rate": "40/s", "concurrency": 2})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    database = pg_server.create_database()
    env = {
        "REAPER_DATABASE_URL": database,
        "REAPER_POLICIES": str(tmp_path / "p.yaml"),
        "REAPER_DB_AUTO_UPGRADE": "true",
    }

    failpoint, delay = scenario(index)
    process = reaper("run", env=env, failpoint=failpoint)
    if delay is not None:
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
    code, err = finish(process)
    if failpoint is not None:
        assert code == -signal.SIGKILL, err

    code, err = finish(reaper("reconcile", env=env))
    assert code == 0, err
    outcomes, statuses = audit_state(database)
    assert "pending" not in outcomes and "unknown" not in outcomes
    assert outcomes.get("deleted", set()) == set(sim.deleted_ids)
    assert "running" not in statuses
    assert max(sim.delete_requests_by_id.values(), default=0) <= 1

    code, err = finish(reaper("run", env=env))
    assert code == 0, err
    code, err = finish(reaper("reconcile", env=env))
    assert code == 0, err
    outcomes, _ = audit_state(database)
    assert set(sim.deleted_ids) == {t.task_id for t in tasks}
    assert outcomes["deleted"] == set(sim.deleted_ids)
    assert "pending" not in outcomes and "unknown" not in outcomes
    assert max(sim.delete_requests_by_id.values()) == 1


def test_failpoint_leaves_pending_rows_that_a_run_reconciles(
    data_pipeline: Start, tmp_path: Path, database_url: str
) -> None:
    """Killed between intent and request: pending rows; the next run settles them first."""
    now = datetime.now(UTC)
    tasks = [
        sim_task(f"task_20260901_{i:06d}", age=timedelta(days=40, minutes=i), now=now)
        for i in range(10)
    ]
    sim, url = data_pipeline(tasks)
    doc = policy_doc(url, delete={"batch_size": 5, "concurrency": 1})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    env: dict[str, Any] = {
        "REAPER_DATABASE_URL": database_url,
        "REAPER_POLICIES": str(tmp_path / "p.yaml"),
        "REAPER_DB_AUTO_UPGRADE": "true",
    }
    finish(reaper("run", env=env, failpoint="after_intent"))
    outcomes, statuses = audit_state(database_url)
    assert len(outcomes["pending"]) == 5
    assert statuses == ["running"]
    assert sim.deleted_ids == []

    code, err = finish(reaper("run", env=env))
    assert code == 0, err
    outcomes, statuses = audit_state(database_url)
    assert outcomes["not_deleted"] == outcomes["deleted"] & outcomes["not_deleted"]
    assert len(outcomes["not_deleted"]) == 5
    assert outcomes["deleted"] == set(sim.deleted_ids) == {t.task_id for t in tasks}
    assert sorted(statuses) == ["interrupted", "succeeded"]
