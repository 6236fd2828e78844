"""Rate-limit efficiency per built-in target (issue #9, item 1).

Each simulator runs in its own process with 50 ms latency per request and a server-side rate
limit equal to the client's configured rate (20/s and 100/s). reaper runs a policy against it
(concurrency left to ``auto_concurrency``: the policy sets only ``rate``); we print the achieved
delete-request rate as a fraction of the limit (target >= 0.97, zero 429s) and whether the audit
equals the server's record of deletions.

Beside it, the seed's ``cleanup_old_tasks`` way on a fresh simulator with the same data: one
request after another, no limiter, no concurrency. It needs ~latency per request whatever the
limit, so it runs for at most ``SEQUENTIAL_REQUESTS`` requests; the ratio compares throughputs.

``python -m bench.rate_limit [TARGET ...]`` (default: all three).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench.common import (
    PROJECT,
    TARGETS,
    huawei_environment,
    load,
    machine,
    policy_text,
    quiet_logs,
    run_in_process,
    sim_args,
)
from bench.simproc import sim_deletions, sim_stats, simulator
from reaper.audit import AuditStore
from reaper.db import make_engine
from reaper.policy import LoadedPolicy
from reaper.runner import build_target, plan_policy

LATENCY_MS = 50
RATES = (20.0, 100.0)
SECONDS = 10  # reaper's deletion phase lasts about this long at the configured rate
BATCH = {"data_pipeline": 10, "huawei_dcs": 1, "huawei_iotda": 1}
#: Share of generated tasks the bench policy finds eligible (measured; sizes the inventory).
ELIGIBLE_SHARE = {"data_pipeline": 0.78, "huawei_dcs": 0.88, "huawei_iotda": 0.83}
SEQUENTIAL_REQUESTS = 150
TARGET_RATIO = 0.97


def tasks_for(kind: str, rate: float) -> int:
    return int(rate * SECONDS * BATCH[kind] / ELIGIBLE_SHARE[kind]) + 20


async def _eligible_ids(loaded: LoadedPolicy) -> list[str]:
    target, client = build_target(loaded)
    try:
        plan = await plan_policy(loaded, target, datetime.now(UTC))
    finally:
        await client.aclose()
    return list(plan.task_ids())


def run_sequential(kind: str, url: str, rate: float) -> tuple[int, float]:
    """The seed's loop: one delete request after another; (requests, seconds)."""
    loaded = load(policy_text(kind, url, rate, batch=BATCH[kind]))
    ids = asyncio.run(_eligible_ids(loaded))  # listing is not timed
    batch = BATCH[kind]
    auth = loaded.policy.target_class.client_auth(loaded.policy.target_config)
    batches = [ids[i : i + batch] for i in range(0, len(ids), batch)][:SEQUENTIAL_REQUESTS]
    with httpx.Client(timeout=30, auth=auth) as client:
        start = time.perf_counter()
        for chunk in batches:
            if kind == "data_pipeline":
                response = client.request(
                    "DELETE",
                    f"{url}/api/v0/data_pipeline/tasks",
                    json={"task_ids": chunk, "confirm": True, "delete_database_records": False},
                )
            elif kind == "huawei_dcs":
                response = client.delete(f"{url}/v2/{PROJECT}/tasks/{chunk[0]}")
            else:
                response = client.delete(f"{url}/v5/iot/{PROJECT}/batchtasks/{chunk[0]}")
            response.raise_for_status()
        return len(batches), time.perf_counter() - start


def main(kinds: list[str]) -> None:
    huawei_environment()
    quiet_logs()
    print(machine())
    print(
        f"simulators: {LATENCY_MS} ms latency per request, server rate limit = client rate; "
        f"policies set only `rate` (concurrency automatic); target >= {TARGET_RATIO}, 0 429s"
    )
    header = (
        f"{'target':>13} {'rate':>6} {'batch':>5} {'workers':>7} {'requests':>8} {'seconds':>7} "
        f"{'req/s':>7} {'of limit':>8} {'429s':>4} {'audit==sim':>10} {'seq req/s':>9} "
        f"{'reaper/seq':>10} {'met':>3}"
    )
    print(header)
    for kind in kinds:
        for rate in RATES:
            args = sim_args(kind, tasks_for(kind, rate), latency_ms=LATENCY_MS, rate=rate)
            loaded_text = {"batch": BATCH[kind]}
            with tempfile.TemporaryDirectory() as tmp:
                database = f"sqlite:///{Path(tmp) / 'audit.db'}"
                with simulator(kind, *args) as url:
                    measured = run_in_process(
                        load(policy_text(kind, url, rate, **loaded_text)), database
                    )
                    stats = sim_stats(url)
                    deleted = set(sim_deletions(url)["deleted_ids"])
                engine = make_engine(database)
                audited = {
                    row.task_id for row in AuditStore(engine).rows(outcome="deleted", limit=None)
                }
                engine.dispose()
            assert measured.error is None, measured.error
            with simulator(kind, *args) as url:
                seq_requests, seq_seconds = run_sequential(kind, url, rate)
            achieved = measured.delete_requests / measured.delete_seconds
            ratio = achieved / rate
            seq_rate = seq_requests / seq_seconds
            met = ratio >= TARGET_RATIO and stats["status_429"] == 0 and audited == deleted
            print(
                f"{kind:>13} {rate:>4g}/s {BATCH[kind]:>5} {measured.workers:>7} "
                f"{measured.delete_requests:>8} {measured.delete_seconds:>7.2f} {achieved:>7.2f} "
                f"{ratio:>8.3f} {stats['status_429']:>4} {audited == deleted!s:>10} "
                f"{seq_rate:>9.2f} {achieved / seq_rate:>9.2f}x {'yes' if met else 'NO':>3}",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1:] or list(TARGETS))
