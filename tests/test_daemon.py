"""`reaper serve` and multi-replica safety, with real processes, a simulator and PostgreSQL."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import policy_doc, sim_task
from pgserver import PostgresServer
from sqlalchemy import select

from reaper.audit import audit_table, ledger_table, runs_table
from reaper.db import make_engine
from reaper.simulators import DataPipelineSimulator, Faults

Start = Callable[..., tuple[DataPipelineSimulator, str]]


class Process:
    """A reaper subprocess whose JSON log lines are read on a thread."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("REAPER_")}
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "reaper", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**base, "REAPER_LOG_FORMAT": "json", **env},
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"event": "text", "line": line})

    def wait_for(self, event: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for seen in self.seen:
            if seen.get("event") == event:
                self.seen.remove(seen)
                return seen
        while time.monotonic() < deadline:
            try:
                item = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item.get("event") == event:
                return item
            self.seen.append(item)
        raise AssertionError(f"no {event!r} event; saw {[e.get('event') for e in self.seen]}")

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=60)

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        self.reader.join(timeout=10)
        assert self.popen.stderr is not None
        self.popen.stderr.close()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.close()


def tasks_now(n: int) -> list[Any]:
    now = datetime.now(UTC)
    return [
        sim_task(f"task_20260901_{i:06d}", age=timedelta(days=40, minutes=i), now=now)
        for i in range(n)
    ]


def write(path: Path, doc: Any) -> None:
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")


def query(url: str, table: Any) -> list[dict[str, Any]]:
    engine = make_engine(url)
    with engine.connect() as connection:
        rows = [dict(r._mapping) for r in connection.execute(select(table))]
    engine.dispose()
    return rows


class TestReplicas:
    def test_two_processes_same_slot_delete_each_task_once(
        self,
        data_pipeline: Start,
        pg_server: PostgresServer,
        tmp_path: Path,
        processes: list[Process],
    ) -> None:
        """Two `reaper run --slot auto` at the same moment: one runs the slot, one skips."""
        sim, url = data_pipeline(tasks_now(60), faults=Faults(latency_ms=20))
        write(tmp_path / "p.yaml", policy_doc(url, schedule="0 * * * *"))
        database = pg_server.create_database()
        env = {
            "REAPER_DATABASE_URL": database,
            "REAPER_POLICIES": str(tmp_path / "p.yaml"),
            "REAPER_DB_AUTO_UPGRADE": "true",
        }
        subprocess.run(
            [sys.executable, "-m", "reaper", "db", "upgrade"],
            check=True,
            env={**os.environ, **env},
            capture_output=True,
        )
        pair = [Process("run", "--slot", "auto", env=env) for _ in range(2)]
        processes.extend(pair)
        codes = [p.popen.wait(timeout=120) for p in pair]
        assert codes == [0, 0]
        assert len(sim.deleted_ids) == 60
        assert max(sim.delete_requests_by_id.values()) == 1
        [slot] = query(database, ledger_table)
        [run] = query(database, runs_table)
        assert slot["run_id"] == run["id"]
        assert run["deleted"] == 60
        deleted = {r["task_id"] for r in query(database, audit_table) if r["outcome"] == "deleted"}
        assert deleted == set(sim.deleted_ids)

    def test_lock_without_ledger_never_overlaps(
        self,
        data_pipeline: Start,
        pg_server: PostgresServer,
        tmp_path: Path,
        processes: list[Process],
    ) -> None:
        """Without slots, two overlapping runs of one policy never delete a task twice."""
        sim, url = data_pipeline(tasks_now(40), faults=Faults(latency_ms=20))
        write(tmp_path / "p.yaml", policy_doc(url))
        database = pg_server.create_database()
        env = {
            "REAPER_DATABASE_URL": database,
            "REAPER_POLICIES": str(tmp_path / "p.yaml"),
            "REAPER_DB_AUTO_UPGRADE": "true",
        }
        subprocess.run(
            [sys.executable, "-m", "reaper", "db", "upgrade"],
            check=True,
            env={**os.environ, **env},
            capture_output=True,
        )
        pair = [Process("run", env=env) for _ in range(2)]
        processes.extend(pair)
        assert [p.popen.wait(timeout=120) for p in pair] == [0, 0]
        assert len(sim.deleted_ids) == 40
        assert max(sim.delete_requests_by_id.values()) == 1


class TestSignals:
    def test_sigterm_mid_run_is_recorded_as_interrupted(
        self,
        data_pipeline: Start,
        pg_server: PostgresServer,
        tmp_path: Path,
        processes: list[Process],
    ) -> None:
        """SIGTERM while deleting: exit 0 within the grace period, run interrupted, audit true."""
        sim, url = data_pipeline(tasks_now(200), faults=Faults(latency_ms=50))
        write(
            tmp_path / "p.yaml",
            policy_doc(url, delete={"batch_size": 2, "rate": "20/s", "concurrency": 2}),
        )
        database = pg_server.create_database()
        env = {
            "REAPER_DATABASE_URL": database,
            "REAPER_POLICIES": str(tmp_path / "p.yaml"),
            "REAPER_DB_AUTO_UPGRADE": "true",
            "REAPER_SHUTDOWN_GRACE": "10s",
        }
        process = Process("run", env=env)
        processes.append(process)
        process.wait_for("batch_done", timeout=60)
        started = time.monotonic()
        process.popen.send_signal(signal.SIGTERM)
        assert process.popen.wait(timeout=30) == 0
        assert time.monotonic() - started < 10
        [run] = query(database, runs_table)
        assert run["status"] == "interrupted"
        assert 0 < run["deleted"] < 200
        rows = query(database, audit_table)
        # Each worker's next batch had its intents written while the last one was in flight:
        # recorded as never sent. Nothing is left pending.
        assert {r["outcome"] for r in rows} <= {"deleted", "not_deleted"}
        assert {r["task_id"] for r in rows if r["outcome"] == "deleted"} == set(sim.deleted_ids)
        never_sent = {r["task_id"] for r in rows if r["outcome"] == "not_deleted"}
        assert len(never_sent) <= 2 * 2  # at most one batch of 2 per worker
        assert not never_sent & set(sim.delete_requests_by_id)
        assert run["deleted"] == len(sim.deleted_ids)


class TestServe:
    def start(self, tmp_path: Path, doc: Any, processes: list[Process]) -> tuple[Process, str]:
        write(tmp_path / "policies" / "p.yaml", doc)
        env = {
            "REAPER_DATABASE_URL": f"sqlite:///{tmp_path / 'audit.db'}",
            "REAPER_POLICIES": str(tmp_path / "policies"),
            "REAPER_DB_AUTO_UPGRADE": "true",
        }
        process = Process("serve", "--metrics-port", "0", env=env)
        processes.append(process)
        process.wait_for("policies_loaded")
        serving = process.wait_for("serving")
        return process, f"http://{serving['metrics']}"

    def test_health_ready_and_metrics_over_http(
        self, tmp_path: Path, processes: list[Process]
    ) -> None:
        """/healthz, /readyz and /metrics answer over real HTTP; SIGTERM exits 0."""
        (tmp_path / "policies").mkdir()
        doc = policy_doc("http://127.0.0.1:9", schedule="15 3 * * *")
        process, base = self.start(tmp_path, doc, processes)
        assert httpx.get(f"{base}/healthz").text == "ok\n"
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 200 and "1 policies" in ready.text
        metrics = httpx.get(f"{base}/metrics").text
        assert "reaper_policies_loaded 1.0" in metrics
        assert 'reaper_schedule_interval_seconds{policy="test-policy"} 86400.0' in metrics
        # labels are names and codes only: no target URL (nor anything that could hold a secret)
        assert "127.0.0.1:9" not in metrics
        assert "reaper_deletions_total" in metrics or "# HELP reaper_deletions" in metrics
        assert process.stop() == 0

    def test_sighup_keeps_old_schedule_on_a_broken_policy_and_swaps_on_a_good_one(
        self, tmp_path: Path, processes: list[Process]
    ) -> None:
        """A broken file on SIGHUP is refused (old jobs stay); a valid one replaces them."""
        (tmp_path / "policies").mkdir()
        doc = policy_doc("http://127.0.0.1:9", schedule="15 3 * * *")
        process, _ = self.start(tmp_path, doc, processes)
        (tmp_path / "policies" / "p.yaml").write_text("name: [broken\n")
        process.popen.send_signal(signal.SIGHUP)
        refused = process.wait_for("reload_refused")
        assert "p.yaml" in refused["error"]
        good = dict(doc, name="renamed-policy", schedule="45 4 * * *", timezone="Asia/Tokyo")
        write(tmp_path / "policies" / "p.yaml", good)
        process.popen.send_signal(signal.SIGHUP)
        loaded = process.wait_for("policies_loaded")
        assert loaded["scheduled"] == ["renamed-policy"]
        assert process.stop() == 0

    def test_a_scheduled_run_happens_and_is_measured(
        self, data_pipeline: Start, tmp_path: Path, processes: list[Process]
    ) -> None:
        """A policy due every minute runs within the minute; its deletions show in /metrics."""
        sim, url = data_pipeline(tasks_now(5))
        (tmp_path / "policies").mkdir()
        process, base = self.start(tmp_path, policy_doc(url, schedule="* * * * *"), processes)
        finished = process.wait_for("run_finished", timeout=75)
        assert finished["deleted"] == 5
        metrics = httpx.get(f"{base}/metrics").text
        assert (
            'reaper_deletions_total{outcome="deleted",policy="test-policy",'
            'target="data_pipeline"} 5.0' in metrics
        )
        assert 'reaper_runs_total{policy="test-policy",status="succeeded"} 1.0' in metrics
        assert len(sim.deleted_ids) == 5
        assert process.stop() == 0
