"""Audit throughput (issue #9, item 4): intent + outcome writes per second, SQLite and PostgreSQL.

Part 1 calls ``AuditStore.record()`` (``pending`` intents) then ``AuditStore.resolve()``
(outcomes) batch by batch, as the executor does, for ``ROWS`` task ids; "ids/s" counts a task once
(its intent insert and its outcome update), "writes/s" counts both writes. Target >= 20,000/s on
PostgreSQL (judged on writes/s; ids/s is shown beside it).

Part 2 runs a whole policy against a fast data_pipeline simulator (no latency, no limit) and
times every AuditStore call on the audit thread (wrapping ``AsyncAudit.call``): the share of the
run's wall time spent in the audit. Target < 5%.

SQLite: a file on disk with reaper's pragmas (WAL, synchronous=FULL). PostgreSQL: a throwaway
cluster from tests/pgserver.py with fsync and synchronous_commit on (its data dir is on /dev/shm
when roomy, so commits are cheap: a lower bound for a networked server).

``python -m bench.audit_throughput [ROWS]`` (default 20000).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.common import load, machine, policy_text, quiet_logs, run_in_process, sim_args
from bench.simproc import simulator
from reaper.audit import AuditEntry, AuditStore, RunRecord
from reaper.db import make_engine, upgrade
from reaper.targets.base import DeleteResult, Outcome

ROWS = 20_000
BATCHES = (50, 500)
TARGET_ROWS = 20_000
TARGET_SHARE = 0.05
RUN_TASKS = 20_000
RUN_BATCH = 50  # the default delete.batch_size

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


@contextmanager
def databases() -> Iterator[list[tuple[str, str]]]:
    """(name, SQLAlchemy URL) of a fresh SQLite file and, if it can start, a PostgreSQL."""
    with tempfile.TemporaryDirectory() as tmp:
        found = [("sqlite", f"sqlite:///{Path(tmp) / 'audit.db'}")]
        try:
            from pgserver import PostgresServer, find_pg_bindir

            find_pg_bindir()
        except Exception as exc:
            print(f"PostgreSQL skipped: {exc}")
            yield found
            return
        settings = {"fsync": "on", "full_page_writes": "on", "synchronous_commit": "on"}
        with PostgresServer(settings=settings) as server:
            found.append(("postgresql", server.create_database()))
            yield found


def _run_record(name: str) -> RunRecord:
    return RunRecord(name, "0" * 64, "{}", "data_pipeline", "http://bench", "run")


def direct(url: str, rows: int, batch: int) -> tuple[float, float]:
    """Seconds for intents and for outcomes of ``rows`` ids in batches of ``batch``."""
    engine = make_engine(url)
    upgrade(engine)
    store = AuditStore(engine)
    run_id = store.start_run(_run_record(f"bench-{batch}"))
    stamp = datetime.now(UTC) - timedelta(days=40)
    reason = "older than 30d and status completed"
    ids = [f"task_20250101_{i:06d}" for i in range(rows)]
    record_seconds = resolve_seconds = 0.0
    for start in range(0, rows, batch):
        chunk = ids[start : start + batch]
        intents = [AuditEntry(i, reason, "completed", stamp, Outcome.PENDING) for i in chunk]
        results = [
            DeleteResult(i, Outcome.DELETED, 200, reclaimed_bytes=1024, files_count=3)
            for i in chunk
        ]
        began = time.perf_counter()
        store.record(run_id, intents)
        recorded = time.perf_counter()
        store.resolve(run_id, results)
        record_seconds += recorded - began
        resolve_seconds += time.perf_counter() - recorded
    engine.dispose()
    return record_seconds, resolve_seconds


def main(rows: int) -> None:
    quiet_logs()
    print(machine())
    with databases() as found:
        print(f"\ndirect AuditStore.record() + resolve(), {rows} ids per case")
        print(
            f"{'database':>10} {'batch':>5} {'intents/s':>9} {'outcomes/s':>10} {'ids/s':>7} "
            f"{'writes/s':>8} {'met':>3}"
        )
        for name, url in found:
            for batch in BATCHES:
                record_s, resolve_s = direct(url, rows, batch)
                writes = 2 * rows / (record_s + resolve_s)
                met = "-" if name == "sqlite" else ("yes" if writes >= TARGET_ROWS else "NO")
                print(
                    f"{name:>10} {batch:>5} {rows / record_s:>9.0f} {rows / resolve_s:>10.0f} "
                    f"{rows / (record_s + resolve_s):>7.0f} {writes:>8.0f} {met:>3}",
                    flush=True,
                )
        print(
            f"\nshare of a run's wall time in audit calls: data_pipeline simulator, {RUN_TASKS} "
            f"tasks, 0 ms latency, no limit, client rate 100000/s, batch {RUN_BATCH}"
        )
        print(
            f"{'database':>10} {'deleted':>7} {'run s':>6} {'audit s':>7} {'of run':>6} "
            f"{'delete s':>8} {'audit s':>7} {'of delete':>9} {'met':>3}"
        )
        for name, url in found:
            args = sim_args("data_pipeline", RUN_TASKS, latency_ms=0, rate=0)
            with simulator("data_pipeline", *args) as sim:
                loaded = load(policy_text("data_pipeline", sim, 100_000, batch=RUN_BATCH))
                m = run_in_process(loaded, url)
            assert m.error is None, m.error
            share = m.total_audit_seconds / m.total_seconds
            print(
                f"{name:>10} {m.deleted:>7} {m.total_seconds:>6.2f} "
                f"{m.total_audit_seconds:>7.2f} {share:>6.1%} {m.delete_seconds:>8.2f} "
                f"{m.audit_seconds:>7.2f} {m.audit_seconds / m.delete_seconds:>9.1%} "
                f"{'yes' if share < TARGET_SHARE else 'NO':>3}",
                flush=True,
            )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else ROWS)
