"""Audit throughput (issue #9, item 4; issue #6): intent + outcome writes per second, and overhead.

Part 1 writes ``ROWS`` task ids straight through ``AuditStore``, batch by batch, two ways:

* ``separate``: ``record()`` (``pending`` intents) then ``resolve()`` (outcomes) per batch, two
  commits per batch;
* ``grouped``: what the executor's group commit does with one worker: one ``write()`` per batch
  carrying this batch's intents and the previous batch's outcomes, one commit per batch (with N
  workers a commit carries up to N batches).

"ids/s" counts a task once (its intent insert and its outcome update), "writes/s" counts both
writes. Target >= 20,000 writes/s on PostgreSQL.

Part 2 is the audit's overhead on a whole run against a fast data_pipeline simulator (concurrency
sized automatically; "limit -" means no server limit and a client rate of 100000/s): the same
policy runs with the audit written and with its deletion rows not written
(``bench.common.WithoutDeletionRows``: runs, locks and counts still go to the database). After one
warm-up run, ``PAIRS`` pairs run back to back, the order inside a pair alternating; each pair gives
(wall with audit - wall without) / wall with audit, and the median pair is the overhead (the
quartiles beside it show how noisy the machine was). Target < 5%. "audit busy" is the share of the
run the audit thread spent in AuditStore calls (it overlaps the HTTP requests, so it is not the
overhead); "audit CPU" is that thread's CPU time per deleted task.

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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.common import (
    Measured,
    WithoutDeletionRows,
    load,
    machine,
    policy_text,
    quiet_logs,
    run_in_process,
    sim_args,
)
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
#: (latency ms, rate limit per second: server and client; 0 = none, the client at 100000/s).
RUN_CASES = ((0, 0), (0, 200), (5, 0), (20, 0), (50, 100))
PAIRS = 7

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


def direct(url: str, rows: int, batch: int, *, grouped: bool) -> tuple[float, float]:
    """Seconds spent writing intents and outcomes of ``rows`` ids in batches of ``batch``.

    ``grouped``: one write() per batch (its intents, the previous batch's outcomes); the time is
    split between intents and outcomes by their row counts. Else record() then resolve().
    """
    engine = make_engine(url)
    upgrade(engine)
    store = AuditStore(engine)
    run_id = store.start_run(_run_record(f"bench-{batch}-{grouped}"))
    stamp = datetime.now(UTC) - timedelta(days=40)
    reason = "older than 30d and status completed"
    ids = [f"task_20250101_{i:06d}" for i in range(rows)]
    record_seconds = resolve_seconds = 0.0
    previous: list[DeleteResult] = []
    for start in range(0, rows + batch, batch):
        chunk = ids[start : start + batch]
        intents = [AuditEntry(i, reason, "completed", stamp, Outcome.PENDING) for i in chunk]
        results = [
            DeleteResult(i, Outcome.DELETED, 200, reclaimed_bytes=1024, files_count=3)
            for i in chunk
        ]
        if grouped:
            began = time.perf_counter()
            store.write(run_id, intents, previous)
            spent = time.perf_counter() - began
            share = len(intents) / max(1, len(intents) + len(previous))
            record_seconds += spent * share
            resolve_seconds += spent * (1 - share)
            previous = results
        elif chunk:
            began = time.perf_counter()
            store.record(run_id, intents)
            recorded = time.perf_counter()
            store.resolve(run_id, results)
            record_seconds += recorded - began
            resolve_seconds += time.perf_counter() - recorded
    engine.dispose()
    return record_seconds, resolve_seconds


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


@dataclass
class Overhead:
    """The paired runs of one case."""

    with_audit: list[Measured]
    without: list[Measured]

    @property
    def shares(self) -> list[float]:
        return sorted(
            (audited.total_seconds - bare.total_seconds) / audited.total_seconds
            for audited, bare in zip(self.with_audit, self.without, strict=True)
        )


def overhead(url: str, latency_ms: float, limit: float) -> Overhead:
    """One warm-up run, then PAIRS pairs (with the audit, without its deletion rows)."""
    args = sim_args("data_pipeline", RUN_TASKS, latency_ms=latency_ms, rate=limit)

    def run(store_class: type[AuditStore]) -> Measured:
        with simulator("data_pipeline", *args) as sim:
            rate = limit or 100_000
            loaded = load(policy_text("data_pipeline", sim, rate, batch=RUN_BATCH))
            measured = run_in_process(loaded, url, store_class)
        assert measured.error is None, measured.error
        return measured

    run(AuditStore)
    found = Overhead([], [])
    for pair in range(PAIRS):
        first_audited = pair % 2 == 0
        first = run(AuditStore if first_audited else WithoutDeletionRows)
        second = run(WithoutDeletionRows if first_audited else AuditStore)
        found.with_audit.append(first if first_audited else second)
        found.without.append(second if first_audited else first)
    return found


def main(rows: int) -> None:
    quiet_logs()
    print(machine())
    with databases() as found:
        print(f"\ndirect AuditStore writes, {rows} ids per case")
        print(
            f"{'database':>10} {'mode':>8} {'batch':>5} {'intents/s':>9} {'outcomes/s':>10} "
            f"{'ids/s':>7} {'writes/s':>8} {'met':>3}"
        )
        for name, url in found:
            for grouped in (False, True):
                for batch in BATCHES:
                    record_s, resolve_s = direct(url, rows, batch, grouped=grouped)
                    writes = 2 * rows / (record_s + resolve_s)
                    met = "-" if name == "sqlite" else ("yes" if writes >= TARGET_ROWS else "NO")
                    mode = "grouped" if grouped else "separate"
                    print(
                        f"{name:>10} {mode:>8} {batch:>5} {rows / record_s:>9.0f} "
                        f"{rows / resolve_s:>10.0f} {rows / (record_s + resolve_s):>7.0f} "
                        f"{writes:>8.0f} {met:>3}",
                        flush=True,
                    )
        print(
            f"\naudit overhead on a run: data_pipeline simulator, {RUN_TASKS} tasks, batch "
            f"{RUN_BATCH}, concurrency sized automatically, {PAIRS} pairs after a warm-up; "
            "limit '-': no server limit, client rate 100000/s"
        )
        print(
            f"{'database':>10} {'latency':>7} {'limit':>5} {'deleted':>7} {'workers':>7} "
            f"{'run s':>6} {'no-rows s':>9} {'overhead':>8} {'quartiles':>13} "
            f"{'audit busy':>10} {'audit CPU':>11} {'met':>3}"
        )
        for name, url in found:
            for latency, limit in RUN_CASES:
                case = overhead(url, latency, limit)
                shares = case.shares
                share = _median(shares)
                quartiles = f"{shares[len(shares) // 4]:.1%}..{shares[3 * len(shares) // 4]:.1%}"
                audited = case.with_audit
                busy = _median([m.total_audit_seconds / m.total_seconds for m in audited])
                cpu = _median([m.total_audit_cpu_seconds / max(1, m.deleted) for m in audited])
                print(
                    f"{name:>10} {latency:>5}ms {f'{limit:g}/s' if limit else '-':>5} "
                    f"{audited[0].deleted:>7} {audited[0].workers:>7} "
                    f"{_median([m.total_seconds for m in audited]):>6.2f} "
                    f"{_median([m.total_seconds for m in case.without]):>9.2f} {share:>8.1%} "
                    f"{quartiles:>13} {busy:>10.1%} {cpu * 1e6:>6.1f} us/t "
                    f"{'yes' if share < TARGET_SHARE else 'NO':>3}",
                    flush=True,
                )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else ROWS)
