"""Rate-limit efficiency on the data_pipeline simulator (issue #2's first benchmark).

The simulator runs in its own process with 50 ms latency per request and a server-side rate limit
equal to the client's configured rate. reaper runs a policy against it; we print the achieved
delete-request rate as a fraction of the limit (target >= 0.95, no 429s), and the same work done
the way the seed's ``cleanup_old_tasks`` does it: one request after another, no rate limiter.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import yaml

from bench.simproc import sim_deletions, sim_stats, simulator
from reaper.audit import AuditStore
from reaper.db import make_engine, upgrade
from reaper.plan import Plan
from reaper.policy import load_policy_text
from reaper.runner import run_policy

TASKS = 4000
LATENCY_MS = 50
BATCH = 10


def _policy(url: str, rate: float) -> str:
    return yaml.safe_dump(
        {
            "name": "bench-rate",
            "target": {"type": "data_pipeline", "base_url": url},
            "select": {"status": ["completed", "failed", "partial_completed"], "older_than": "1d"},
            "delete": {"batch_size": BATCH, "rate": f"{rate:g}/s", "max_deletions": 1_000_000},
        }
    )


def run_reaper(url: str, rate: float, database: Path) -> tuple[int, float]:
    """Delete with reaper; return (delete requests, seconds of the deletion phase)."""
    [loaded] = load_policy_text(_policy(url, rate))
    engine = make_engine(f"sqlite:///{database}")
    upgrade(engine)
    marks: dict[str, float] = {}

    def on_plan(plan: Plan) -> None:
        marks["start"] = time.perf_counter()

    result = asyncio.run(run_policy(loaded, AuditStore(engine), on_plan=on_plan))
    elapsed = time.perf_counter() - marks["start"]
    engine.dispose()
    assert result.summary.failed == 0, result.error
    requests = -(-result.summary.eligible // BATCH)
    return requests, elapsed


def run_sequential(url: str) -> tuple[int, float]:
    """The seed's approach, made complete: list every page, then delete batch after batch."""
    endpoint = f"{url}/api/v0/data_pipeline/tasks"
    cutoff = datetime.now(UTC).timestamp() - 86400
    with httpx.Client(timeout=30) as client:
        old: list[str] = []
        offset = 0
        while True:
            page = client.get(endpoint, params={"limit": 100, "offset": offset}).json()
            tasks = page["data"]["tasks"]
            for task in tasks:
                created = datetime.fromisoformat(task["created_at"]).replace(tzinfo=UTC)
                if task["status"] in ("completed", "failed", "partial_completed") and (
                    created.timestamp() < cutoff and task["directory_exists"]
                ):
                    old.append(task["task_id"])
            if len(tasks) < 100:
                break
            offset += len(tasks)
        start = time.perf_counter()
        requests = 0
        for index in range(0, len(old), BATCH):
            response = client.request(
                "DELETE",
                endpoint,
                json={
                    "task_ids": old[index : index + BATCH],
                    "confirm": True,
                    "delete_database_records": False,
                },
            )
            requests += 1
            response.raise_for_status()
        return requests, time.perf_counter() - start


def main() -> None:
    print(
        f"machine: {os.cpu_count()} cores; simulator: {TASKS} tasks, {LATENCY_MS} ms latency, "
        f"batch size {BATCH}"
    )
    print(
        f"{'rate':>8} {'who':>11} {'requests':>9} {'seconds':>8} {'req/s':>7} "
        f"{'of limit':>8} {'429s':>5} {'audit==sim':>10}"
    )
    for rate in (20.0, 100.0):
        args = [
            "--tasks",
            str(TASKS),
            "--timezone",
            "UTC",
            "--latency-ms",
            str(LATENCY_MS),
            "--rate-limit",
            f"{rate:g}",
            "--seed",
            "5",
        ]
        with tempfile.TemporaryDirectory() as tmp:
            database = Path(tmp) / "audit.db"
            with simulator("data_pipeline", *args) as url:
                requests, seconds = run_reaper(url, rate, database)
                stats = sim_stats(url)
                deleted = set(sim_deletions(url)["deleted_ids"])
            engine = make_engine(f"sqlite:///{database}")
            audited = {
                row.task_id for row in AuditStore(engine).rows(outcome="deleted", limit=None)
            }
            engine.dispose()
        achieved = requests / seconds
        print(
            f"{rate:>6g}/s {'reaper':>11} {requests:>9} {seconds:>8.2f} {achieved:>7.2f} "
            f"{achieved / rate:>8.3f} {stats['status_429']:>5} {audited == deleted!s:>10}"
        )
        with simulator("data_pipeline", *args) as url:
            seq_requests, seq_seconds = run_sequential(url)
            seq_stats = sim_stats(url)
        seq_rate = seq_requests / seq_seconds
        print(
            f"{rate:>6g}/s {'sequential':>11} {seq_requests:>9} {seq_seconds:>8.2f} "
            f"{seq_rate:>7.2f} {seq_rate / rate:>8.3f} {seq_stats['status_429']:>5} {'-':>10}"
        )
        print(f"{'':>8} reaper / sequential throughput: {achieved / seq_rate:.2f}x")


if __name__ == "__main__":
    main()
