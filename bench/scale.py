"""Scale and growth (issue #9, items 3 and 5): plan over N tasks, then delete a tenth of them.

For each inventory size N (default 10k, 100k and 1M) a data_pipeline simulator holds N tasks
(spread over 180 days, no latency, no server limit) and reaper runs in its own process
(``bench.reaper_proc``), so its CPU time and peak RSS are its own, not the simulator's:

* ``plan``: what ``reaper plan --output json`` does over all N tasks (a policy that finds ~80% of
  them eligible, keep newest 5). Printed: wall time, reaper's CPU (user+sys) for the listing and
  planning, CPU per listed task (target <= 25 us), peak RSS (target <= 256 MB).
* ``delete``: ``reaper run`` with a policy whose cutoff selects ~N/10 tasks, batch size 500, a
  client rate of 100000/s (the limiter is not the bottleneck), SQLite audit. The deletion phase's
  wall and CPU time per deleted task, and the share of it the audit thread was busy.

CPU per task excludes the interpreter's start and imports (printed once, as "startup").
Growth: time per task should stay flat as N grows (time linear in N), and so should peak RSS
(within what the plan must keep: the eligible ids for deletion).

``python -m bench.scale [N ...]`` (e.g. ``python -m bench.scale 10000`` for a quick run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine, policy_text, sim_args
from bench.simproc import sim_stats, simulator

SIZES = (10_000, 100_000, 1_000_000)
RATE = 100_000.0
BATCH = 500
#: Tasks spread uniformly over 180 days, 80% of them in a selected status: a cutoff at 157.5
#: days selects 12.5% x 80% = ~10% of the inventory.
TENTH_CUTOFF = "3780h"
RSS_TARGET_MB = 256
CPU_TARGET_US = 25


def _child(*args: str) -> tuple[dict[str, Any], float, float]:
    """Run ``bench.reaper_proc ARGS``; return its figures, its CPU and peak RSS (MB) per wait4."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.reaper_proc", *args], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"bench.reaper_proc {args[0]} exited {process.returncode}")
    figures: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return figures, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def measure(size: int, tmp: Path) -> dict[str, Any]:
    """Plan and delete against one simulator of ``size`` tasks."""
    args = sim_args("data_pipeline", size, latency_ms=0, rate=0)
    started = time.perf_counter()
    with simulator("data_pipeline", *args) as url:
        sim_ready = time.perf_counter() - started
        plan_file = tmp / f"plan-{size}.yaml"
        plan_file.write_text(policy_text("data_pipeline", url, RATE, batch=BATCH, keep_newest=5))
        plan, plan_cpu_total, plan_rss = _child("plan", str(plan_file))
        run_file = tmp / f"run-{size}.yaml"
        run_file.write_text(
            policy_text(
                "data_pipeline",
                url,
                RATE,
                batch=BATCH,
                older_than=TENTH_CUTOFF,
                keep_newest=5,
            )
        )
        database = f"sqlite:///{tmp / f'audit-{size}.db'}"  # its own: no anomaly guard history
        run, run_cpu_total, run_rss = _child("run", str(run_file), database)
        stats = sim_stats(url)
    if run.get("error"):
        raise RuntimeError(f"the delete run failed: {run['error']}")
    return {
        "size": size,
        "sim_ready": sim_ready,
        "startup_cpu": plan["imported_cpu"],
        "startup_rss": plan["imported_rss_kb"] / 1024,
        "listed": plan["listed"],
        "plan_eligible": plan["eligible"],
        "plan_wall": plan["plan_wall"] - plan["imported_wall"],
        "plan_cpu": plan["plan_cpu"] - plan["imported_cpu"],
        "plan_cpu_total": plan_cpu_total,
        "plan_rss": plan_rss,
        "deleted": run["deleted"],
        "run_list_wall": run["plan_wall"] - run["imported_wall"],
        "delete_wall": run["end_wall"] - run["plan_wall"],
        "delete_cpu": run["end_cpu"] - run["plan_cpu"],
        "delete_audit": run["audit_busy"] - run["plan_audit_busy"],
        "run_cpu_total": run_cpu_total,
        "run_rss": run_rss,
        "delete_requests": stats["delete_requests"],
    }


def report(rows: list[dict[str, Any]]) -> None:
    print(
        f"\nplan (`reaper plan --output json` work; startup = interpreter + imports: "
        f"{rows[0]['startup_cpu']:.2f} s CPU, {rows[0]['startup_rss']:.0f} MB RSS)"
    )
    print(
        f"{'tasks':>9} {'eligible':>8} {'wall s':>7} {'cpu s':>6} {'cpu/wall':>8} "
        f"{'us/task':>7} {'peak MB':>7} {'proc cpu s':>10} {'met':>3}"
    )
    for r in rows:
        per_task = r["plan_cpu"] / r["listed"] * 1e6
        met = per_task <= CPU_TARGET_US and r["plan_rss"] <= RSS_TARGET_MB
        print(
            f"{r['listed']:>9} {r['plan_eligible']:>8} {r['plan_wall']:>7.1f} "
            f"{r['plan_cpu']:>6.1f} {r['plan_cpu'] / r['plan_wall']:>8.0%} {per_task:>7.1f} "
            f"{r['plan_rss']:>7.0f} {r['plan_cpu_total']:>10.1f} {'yes' if met else 'NO':>3}"
        )
    print(f"\ndelete (`reaper run`, batch {BATCH}, SQLite audit; figures of the deletion phase)")
    print(
        f"{'tasks':>9} {'deleted':>8} {'requests':>8} {'list s':>6} {'wall s':>6} "
        f"{'cpu s':>6} {'us/deleted':>10} {'tasks/s':>7} {'audit busy':>10} {'peak MB':>7} "
        f"{'met':>3}"
    )
    for r in rows:
        per_task = r["delete_cpu"] / max(r["deleted"], 1) * 1e6
        print(
            f"{r['size']:>9} {r['deleted']:>8} {r['delete_requests']:>8} "
            f"{r['run_list_wall']:>6.1f} {r['delete_wall']:>6.1f} {r['delete_cpu']:>6.1f} "
            f"{per_task:>10.1f} {r['deleted'] / r['delete_wall']:>7.0f} "
            f"{r['delete_audit'] / r['delete_wall']:>10.0%} {r['run_rss']:>7.0f} "
            f"{'yes' if r['run_rss'] <= RSS_TARGET_MB else 'NO':>3}"
        )
    if len(rows) > 1:
        first = rows[0]
        print(f"\ngrowth relative to {first['size']} tasks (time linear = flat per task)")
        print(
            f"{'tasks':>9} {'x tasks':>7} {'x plan wall':>11} {'x plan cpu':>10} "
            f"{'plan us/task':>12} {'plan peak MB':>12} {'x del cpu/task':>14} {'run peak MB':>11}"
        )
        for r in rows:
            base_del = first["delete_cpu"] / max(first["deleted"], 1)
            print(
                f"{r['size']:>9} {r['size'] / first['size']:>7.0f} "
                f"{r['plan_wall'] / first['plan_wall']:>11.1f} "
                f"{r['plan_cpu'] / first['plan_cpu']:>10.1f} "
                f"{r['plan_cpu'] / r['listed'] * 1e6:>12.1f} {r['plan_rss']:>12.0f} "
                f"{r['delete_cpu'] / max(r['deleted'], 1) / base_del:>14.2f} "
                f"{r['run_rss']:>11.0f}"
            )


def main(sizes: list[int]) -> None:
    print(machine())
    print(
        "data_pipeline simulator in its own process (0 ms latency, no limit, 100 tasks/page); "
        f"client rate {RATE:g}/s; reaper in its own process"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            rows.append(measure(size, Path(tmp)))
            r = rows[-1]
            print(
                f"  {size} tasks: simulator ready in {r['sim_ready']:.0f} s; plan "
                f"{r['plan_wall']:.1f} s, delete {r['deleted']} in {r['delete_wall']:.1f} s",
                flush=True,
            )
    report(rows)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or list(SIZES))
