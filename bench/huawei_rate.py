"""Rate-limit efficiency of single-id deletes on the Huawei simulators (DCS and IoTDA).

Each simulator runs in its own process with 50 ms latency per request, AK/SK signature checking,
and a server-side rate limit equal to the client's configured rate. reaper runs a policy against
it with every request signed; we print the achieved delete-request rate (one id per request) as a
fraction of the limit (target >= 0.95, no 429s) and whether the audit equals the server's record.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.simproc import sim_deletions, sim_stats, simulator
from reaper.audit import AuditStore
from reaper.db import make_engine, upgrade
from reaper.plan import Plan
from reaper.policy import load_policy_text
from reaper.runner import run_policy

TASKS = 1000
LATENCY_MS = 50
RATES = (50.0, 100.0)
PROJECT = "0123456789abcdef0123456789abcdef"
AK = "BENCHACCESSKEY000001"
SK = "bench-secret-key-not-a-real-one"


def _target(kind: str, url: str) -> dict[str, Any]:
    target: dict[str, Any] = {
        "type": kind,
        "endpoint": url,
        "project_id": PROJECT,
        "auth": {"type": "aksk", "ak_env": "BENCH_HW_AK", "sk_env": "BENCH_HW_SK"},
    }
    if kind == "huawei_iotda":
        target["task_types"] = ["firmwareUpgrade", "createCommands"]
    return target


def _policy(kind: str, url: str, rate: float) -> str:
    statuses = (
        ["SUCCESS", "FAILED"]
        if kind == "huawei_dcs"
        else ["Success", "Fail", "PartialSuccess", "Stopped"]
    )
    return yaml.safe_dump(
        {
            "name": f"bench-{kind}",
            "target": _target(kind, url),
            "select": {"status": statuses, "older_than": "1d"},
            "delete": {
                "rate": f"{rate:g}/s",
                "max_deletions": 1_000_000,
                "max_fraction": 1.0,
            },
        }
    )


def run_reaper(kind: str, url: str, rate: float, database: Path) -> tuple[int, float, int]:
    """Delete with reaper; return (delete requests, seconds of the deletion phase, deleted)."""
    [loaded] = load_policy_text(_policy(kind, url, rate))
    engine = make_engine(f"sqlite:///{database}")
    upgrade(engine)
    marks: dict[str, float] = {}

    def on_plan(plan: Plan) -> None:
        marks["start"] = time.perf_counter()

    result = asyncio.run(run_policy(loaded, AuditStore(engine), on_plan=on_plan))
    elapsed = time.perf_counter() - marks["start"]
    engine.dispose()
    assert result.summary.failed == 0 and result.error is None, result.error
    return result.summary.eligible, elapsed, result.summary.deleted


def main() -> None:
    os.environ["BENCH_HW_AK"] = AK
    os.environ["BENCH_HW_SK"] = SK
    os.environ["HUAWEI_SIM_SK"] = SK  # inherited by the simulator process
    print(
        f"machine: {os.cpu_count()} cores; simulators: {TASKS} tasks, {LATENCY_MS} ms latency, "
        "AK/SK signed, one id per delete request"
    )
    print(
        f"{'target':>13} {'rate':>7} {'requests':>9} {'seconds':>8} {'req/s':>7} "
        f"{'of limit':>8} {'429s':>5} {'401s':>5} {'audit==sim':>10}"
    )
    for kind in ("huawei_dcs", "huawei_iotda"):
        for rate in RATES:
            args = [
                "--tasks",
                str(TASKS),
                "--latency-ms",
                str(LATENCY_MS),
                "--rate-limit",
                f"{rate:g}",
                "--seed",
                "5",
                "--ak",
                AK,
                "--project-id",
                PROJECT,
            ]
            with tempfile.TemporaryDirectory() as tmp:
                database = Path(tmp) / "audit.db"
                with simulator(kind, *args) as url:
                    requests, seconds, _ = run_reaper(kind, url, rate, database)
                    stats = sim_stats(url)
                    deleted = set(sim_deletions(url)["deleted_ids"])
                engine = make_engine(f"sqlite:///{database}")
                audited = {
                    row.task_id for row in AuditStore(engine).rows(outcome="deleted", limit=None)
                }
                engine.dispose()
            achieved = requests / seconds
            unauthorized = stats["status_4xx"] - stats["status_429"]
            print(
                f"{kind:>13} {rate:>5g}/s {requests:>9} {seconds:>8.2f} {achieved:>7.2f} "
                f"{achieved / rate:>8.3f} {stats['status_429']:>5} {unauthorized:>5} "
                f"{audited == deleted!s:>10}"
            )


if __name__ == "__main__":
    main()
