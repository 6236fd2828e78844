"""Peak memory of ``reaper audit --output json|csv`` as the audit grows (issue #16, item 3).

``python -m bench.audit_export [ROWS ...]`` (default 10000 100000 1000000) fills an SQLite audit
database with ROWS rows, then runs the real command line in its own process, stdout to
/dev/null, and prints that process's peak RSS (``wait4``) and wall time. The streamed export
should stay flat as ROWS grows. For contrast, ``list`` reads every row into memory first and
renders the JSON in one piece, as ``reaper audit --output json`` did before it streamed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.common import machine, quiet_logs
from reaper.audit import sqlite_datetime
from reaper.db import make_engine, upgrade

SIZES = (10_000, 100_000, 1_000_000)
CHUNK = 50_000
#: The old way: every row in a list, then one JSON document (what cli.audit did before).
LIST_ALL = """
import io, json, sys
from reaper.audit import AuditStore
from reaper.db import make_engine
rows = AuditStore(make_engine(sys.argv[1])).rows(limit=None)
sys.stdout.write(json.dumps([r.as_dict() for r in rows], ensure_ascii=False, indent=2))
"""


def fill(url: str, rows: int) -> None:
    """One run with ``rows`` final audit rows of realistic width, inserted in bulk."""
    engine = make_engine(url)
    upgrade(engine)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    now = sqlite_datetime(datetime.now(UTC))
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO reaper_runs (id, policy, policy_hash, policy_json, target_kind, target,"
            " mode, status, started_at, listed, eligible, kept, deleted, already_gone, failed,"
            " unknown, skipped, reclaimed_bytes, host, pid, chain_length) VALUES"
            " ('bench-run', 'bench', ?, '{}', 'data_pipeline', 'http://127.0.0.1:9', 'run',"
            " 'succeeded', ?, 0, 0, 0, 0, 0, 0, 0, 0, 0, 'bench', 1, 0)",
            ("0" * 64, now),
        )
        for first in range(0, rows, CHUNK):
            connection.exec_driver_sql(
                "INSERT INTO reaper_audit (run_id, seq, policy, target, task_id, outcome, reason,"
                " task_status, task_timestamp, task_age_seconds, http_status, reclaimed_bytes,"
                " files_count, recorded_at, decided_at, chain_seq, row_hash) VALUES"
                " ('bench-run', ?, 'bench', 'http://127.0.0.1:9', ?, 'deleted',"
                " 'older than 30d and status completed', 'completed', ?, ?, 200, 2048, 3, ?, ?,"
                " ?, ?)",
                [
                    (
                        i,
                        f"task_20260101_{i:07d}",
                        sqlite_datetime(start + timedelta(seconds=i)),
                        40 * 86400 + i,
                        now,
                        now,
                        i,
                        f"{i:064x}",
                    )
                    for i in range(first, min(first + CHUNK, rows))
                ],
            )
    engine.dispose()


def measure(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Peak RSS (MiB) and wall seconds of one child process writing to /dev/null."""
    started = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        process = subprocess.Popen(args, stdout=devnull, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{args} exited {process.returncode}")
    return usage.ru_maxrss / 1024, time.perf_counter() - started


def main(sizes: list[int]) -> None:
    quiet_logs()
    print(machine())
    print("rows       export        peak RSS MiB   wall s")
    for rows in sizes:
        with tempfile.TemporaryDirectory() as directory:
            url = f"sqlite:///{Path(directory) / 'audit.db'}"
            fill(url, rows)
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("REAPER_")},
                "REAPER_DATABASE_URL": url,
                "REAPER_LOG_FORMAT": "json",
            }
            cases = [
                ("json", [sys.executable, "-m", "reaper", "audit", "--output", "json"]),
                ("csv", [sys.executable, "-m", "reaper", "audit", "--output", "csv"]),
                ("list (old)", [sys.executable, "-c", LIST_ALL, url]),
            ]
            for name, args in cases:
                rss, wall = measure(args, env)
                print(f"{rows:>9,}  {name:<12} {rss:>13.1f}  {wall:>7.1f}", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or list(SIZES))
