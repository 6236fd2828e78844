"""What the benchmarks share: policies and simulator arguments per target, in-process runs.

Every figure is printed beside the machine's core count: absolute times on shared machines are
noisy, the ratios printed next to them are what a reader should compare.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import yaml

from reaper import runner
from reaper.audit import AuditStore
from reaper.db import make_engine, upgrade
from reaper.execute import AsyncAudit, Executor
from reaper.logs import configure_logging
from reaper.plan import Plan
from reaper.policy import LoadedPolicy, load_policy_text

TARGETS = ("data_pipeline", "huawei_dcs", "huawei_iotda")
PROJECT = "0123456789abcdef0123456789abcdef"
AK = "BENCHACCESSKEY000001"
SK = "bench-secret-key-not-a-real-one"
IOTDA_TYPES = ("firmwareUpgrade", "createCommands")
#: What each target's policy selects: every finished status it can delete.
SELECTED = {
    "data_pipeline": ["completed", "failed", "partial_completed"],
    "huawei_dcs": ["SUCCESS", "FAILED"],
    "huawei_iotda": ["Success", "Fail", "PartialSuccess", "Stopped"],
}
#: Guards off: a benchmark deletes far more than the default 1000 / 50%.
NO_GUARDS = {"max_deletions": 100_000_000, "max_fraction": 1.0}


def machine() -> str:
    """The line every benchmark prints first."""
    return f"machine: {os.cpu_count()} cores (os.cpu_count), python {sys.version.split()[0]}"


def quiet_logs() -> None:
    """Warnings and errors only, as JSON on stderr: stdout carries the figures."""
    configure_logging("json", "warning")


def huawei_environment() -> None:
    """Credentials for the Huawei simulators and reaper (the simulator process inherits them)."""
    os.environ["BENCH_HW_AK"] = AK
    os.environ["BENCH_HW_SK"] = SK
    os.environ["HUAWEI_SIM_SK"] = SK


def sim_args(kind: str, tasks: int, *, latency_ms: float, rate: float, seed: int = 5) -> list[str]:
    """Simulator arguments: ``tasks`` tasks, latency per request, server-side rate limit."""
    args = ["--tasks", str(tasks), "--latency-ms", f"{latency_ms:g}", "--seed", str(seed)]
    if rate:
        args += ["--rate-limit", f"{rate:g}"]
    if kind == "data_pipeline":
        # Spread over 180 days: the share of tasks older than a day does not depend on `tasks`.
        args += ["--timezone", "UTC", "--span-days", "180"]
    else:
        args += ["--ak", AK, "--project-id", PROJECT]
    if kind == "huawei_iotda":
        args += ["--task-types", ",".join(IOTDA_TYPES)]
    return args


def target_config(kind: str, url: str) -> dict[str, Any]:
    if kind == "data_pipeline":
        return {"type": kind, "base_url": url}
    target: dict[str, Any] = {
        "type": kind,
        "endpoint": url,
        "project_id": PROJECT,
        "auth": {"type": "aksk", "ak_env": "BENCH_HW_AK", "sk_env": "BENCH_HW_SK"},
    }
    if kind == "huawei_iotda":
        target["task_types"] = list(IOTDA_TYPES)
    return target


def policy_text(
    kind: str,
    url: str,
    rate: float,
    *,
    batch: int | None = None,
    older_than: str = "1d",
    name: str = "bench",
    keep_newest: int = 0,
    **delete: Any,
) -> str:
    """A policy deleting every finished task older than ``older_than``, guards off."""
    settings: dict[str, Any] = {"rate": f"{rate:g}/s", **NO_GUARDS, **delete}
    if batch is not None:
        settings["batch_size"] = batch
    policy: dict[str, Any] = {
        "name": name,
        "target": target_config(kind, url),
        "select": {"status": SELECTED[kind], "older_than": older_than},
        "delete": settings,
    }
    if keep_newest:
        policy["keep"] = {"newest": keep_newest}
    return yaml.safe_dump(policy)


def load(text: str) -> LoadedPolicy:
    [loaded] = load_policy_text(text)
    return loaded


@dataclass
class Measured:
    """One in-process ``run_policy``: what it did and how long its deletion phase took."""

    eligible: int
    deleted: int
    delete_requests: int
    delete_seconds: float
    workers: int
    error: str | None
    #: Seconds the audit thread spent in AuditStore calls during the deletion phase.
    audit_seconds: float = 0.0
    #: The whole run (lock, listing, plan, deletion, finish) and its audit seconds.
    total_seconds: float = 0.0
    total_audit_seconds: float = 0.0
    #: CPU time of the audit thread in AuditStore calls over the whole run.
    total_audit_cpu_seconds: float = 0.0


class AuditTimer:
    """Wraps ``AsyncAudit.call`` to add up the time its thread spends in AuditStore calls."""

    def __init__(self) -> None:
        self.busy = 0.0
        self.cpu = 0.0
        self.calls = 0
        self._original = AsyncAudit.call

    def __enter__(self) -> AuditTimer:
        original, timer = self._original, self

        async def call(audit: AsyncAudit, fn: Any, *args: Any, **kwargs: Any) -> Any:
            def timed() -> Any:
                start, cpu = time.perf_counter(), time.thread_time()
                try:
                    return fn(*args, **kwargs)
                finally:
                    timer.busy += time.perf_counter() - start
                    timer.cpu += time.thread_time() - cpu
                    timer.calls += 1

            return await original(audit, timed)

        AsyncAudit.call = call  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        AsyncAudit.call = self._original  # type: ignore[method-assign]


class WithoutDeletionRows(AuditStore):
    """The baseline of the audit-overhead benchmark: the same run, its deletion rows not written.

    Runs, locks, reconciliation and the run's counts still use the database; only the write-ahead
    intents and outcomes (``AuditStore.write``) are skipped. Never used outside ``bench/``.
    """

    def write(self, *args: Any, **kwargs: Any) -> None:
        return None


def run_in_process(
    loaded: LoadedPolicy, database_url: str, store_class: type[AuditStore] = AuditStore
) -> Measured:
    """Run a policy with ``run_policy``; time from the finished plan to the last outcome."""
    engine = make_engine(database_url)
    upgrade(engine)
    marks: dict[str, float] = {}
    workers: list[int] = []

    timer = AuditTimer()

    def on_plan(plan: Plan) -> None:
        marks["start"] = time.perf_counter()
        marks["audit"] = timer.busy

    class CountingExecutor(Executor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            workers.append(self.concurrency)

    original = runner.Executor
    runner.Executor = CountingExecutor  # type: ignore[misc]
    began = time.perf_counter()
    try:
        with timer:
            result = asyncio.run(runner.run_policy(loaded, store_class(engine), on_plan=on_plan))
    finally:
        runner.Executor = original  # type: ignore[misc]
        engine.dispose()
    finished = time.perf_counter()
    elapsed = finished - marks.get("start", finished)
    batch = loaded.policy.batch_size
    return Measured(
        eligible=result.summary.eligible,
        deleted=result.summary.deleted,
        delete_requests=-(-result.summary.eligible // batch),
        delete_seconds=elapsed,
        workers=workers[0] if workers else 0,
        error=result.error,
        audit_seconds=timer.busy - marks.get("audit", 0.0),
        total_seconds=finished - began,
        total_audit_seconds=timer.busy,
        total_audit_cpu_seconds=timer.cpu,
    )
