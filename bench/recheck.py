"""The send-time re-check's cost (issue 15 A): requests and wall time with and without it.

The same data_pipeline run twice on fresh simulators (separate processes: their CPU is not
reaper's), once as shipped and once with the re-check switched off (a bench-only patch of the
runner; no setting turns it off). The policy selects every finished status and protects the live
ones, as the example policy does; batches are the default 50. Each row prints the requests the
simulator served in both runs, the extra share, the wall time of both runs, and the checks the
re-check made (each one: a re-listing of the live statuses plus one query of the tasks completed
since the listing began, unless a GET per task was cheaper).

Datasets: ``few-live`` has 1% of the tasks older than two hours still live (zombies), which is what
the issue means by "usually few"; ``sim-default`` is the simulator's own mix, where 20% of old
tasks are pending or in progress, a pessimistic case. ``--staleness 10`` (seconds) shows a run
long enough for several checks.

``python -m bench.recheck [TASKS ...] [--staleness S]`` (default 20000 100000).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import load, machine, policy_text, quiet_logs, run_in_process, sim_args
from bench.simproc import sim_stats, simulator
from reaper import runner
from reaper.recheck import SendCheck

RATE = 100.0
LATENCY_MS = 5
DATASETS = {"few-live": ["--old-live-share", "0.01"], "sim-default": []}


class _Counting(SendCheck):
    """The shipped re-check, remembering its figures for the report."""

    last: SendCheck | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _Counting.last = self


class _Off(SendCheck):
    """The re-check switched off (the baseline)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.enabled = False


def one_run(tasks: int, dataset: list[str], check: type[SendCheck], staleness: int) -> Any:
    args = sim_args("data_pipeline", tasks, latency_ms=LATENCY_MS, rate=0) + dataset
    text = policy_text("data_pipeline", "URL", RATE)
    original = runner.SendCheck
    runner.SendCheck = check  # type: ignore[misc]
    try:
        with tempfile.TemporaryDirectory() as tmp, simulator("data_pipeline", *args) as url:
            doc = yaml.safe_load(text)
            doc["target"]["base_url"] = url
            doc["target"]["recheck"] = {"max_staleness": f"{staleness}s"}
            loaded = load(yaml.safe_dump(doc))
            began = time.perf_counter()
            measured = run_in_process(loaded, f"sqlite:///{Path(tmp) / 'audit.db'}")
            wall = time.perf_counter() - began
            stats = sim_stats(url)
    finally:
        runner.SendCheck = original  # type: ignore[misc]
    assert measured.error is None, measured.error
    return measured, stats, wall


def main(sizes: list[int], staleness: int) -> None:
    quiet_logs()
    print(machine())
    print(
        f"data_pipeline simulator ({LATENCY_MS} ms latency, no server limit), client rate "
        f"{RATE:g}/s, batch 50, select completed/failed/partial_completed older than 1d, "
        f"target.recheck.max_staleness {staleness}s; SQLite audit"
    )
    print(
        f"{'dataset':>11} {'tasks':>7} {'deleted':>7} {'requests':>9} {'+recheck':>9} "
        f"{'extra':>6} {'checks':>6} {'GETs':>5} {'wall s':>7} {'+recheck':>8} {'extra':>6}"
    )
    for tasks in sizes:
        for name, dataset in DATASETS.items():
            base, base_stats, base_wall = one_run(tasks, dataset, _Off, staleness)
            shipped, stats, wall = one_run(tasks, dataset, _Counting, staleness)
            check = _Counting.last
            assert check is not None
            assert shipped.deleted == base.deleted, (shipped.deleted, base.deleted)
            print(
                f"{name:>11} {tasks:>7} {shipped.deleted:>7} {base_stats['requests']:>9} "
                f"{stats['requests']:>9} "
                f"{stats['requests'] / base_stats['requests'] - 1:>6.1%} {check.checks:>6} "
                f"{stats['get_requests']:>5} {base_wall:>7.1f} {wall:>8.1f} "
                f"{wall / base_wall - 1:>6.1%}",
                flush=True,
            )


if __name__ == "__main__":
    argv = sys.argv[1:]
    stale = 60
    if "--staleness" in argv:
        at = argv.index("--staleness")
        stale = int(argv[at + 1])
        del argv[at : at + 2]
    main([int(a) for a in argv] or [20000, 100000], stale)
