"""Batching on data_pipeline (issue #9, item 2): tasks deleted per second by batch size.

The request rate is fixed (the simulator's limit equals the client's rate, 50 ms latency per
request); only ``delete.batch_size`` changes. Ideal throughput is rate x batch size; the column
"of ideal" shows how much of it reaper reached, and "audit busy" how much of the deletion phase
the audit thread spent writing intent and outcome rows (SQLite, synchronous=FULL). Where the
ratio falls, reaper (not the server's latency) has become the limit.

``python -m bench.batching [SIZE ...]`` (default 1 10 100 500).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench.common import load, machine, policy_text, quiet_logs, run_in_process, sim_args
from bench.simproc import sim_stats, simulator

RATE = 20.0
LATENCY_MS = 50
REQUESTS = 60  # delete requests per batch size: ~3 s of deletion at the fixed rate
ELIGIBLE_SHARE = 0.78
SIZES = (1, 10, 100, 500)


def main(sizes: list[int]) -> None:
    quiet_logs()
    print(machine())
    print(
        f"data_pipeline simulator: {LATENCY_MS} ms latency, server limit {RATE:g}/s = client "
        f"rate; ~{REQUESTS} delete requests per batch size; SQLite audit"
    )
    print(
        f"{'batch':>5} {'tasks':>6} {'requests':>8} {'seconds':>7} {'req/s':>6} "
        f"{'tasks/s':>8} {'of ideal':>8} {'vs batch 1':>10} {'audit busy':>10} {'429s':>4}"
    )
    base: float | None = None
    for size in sizes:
        tasks = int(REQUESTS * size / ELIGIBLE_SHARE) + 10
        args = sim_args("data_pipeline", tasks, latency_ms=LATENCY_MS, rate=RATE)
        with tempfile.TemporaryDirectory() as tmp, simulator("data_pipeline", *args) as url:
            loaded = load(policy_text("data_pipeline", url, RATE, batch=size))
            measured = run_in_process(loaded, f"sqlite:///{Path(tmp) / 'audit.db'}")
            stats = sim_stats(url)
        assert measured.error is None, measured.error
        per_second = measured.deleted / measured.delete_seconds
        requests_per_second = measured.delete_requests / measured.delete_seconds
        base = base or per_second / size
        print(
            f"{size:>5} {measured.eligible:>6} {measured.delete_requests:>8} "
            f"{measured.delete_seconds:>7.2f} {requests_per_second:>6.2f} "
            f"{per_second:>8.0f} {per_second / (RATE * size):>8.3f} "
            f"{per_second / base:>9.1f}x {measured.audit_seconds / measured.delete_seconds:>10.1%} "
            f"{stats['status_429']:>4}",
            flush=True,
        )


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or list(SIZES))
