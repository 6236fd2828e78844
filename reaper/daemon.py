"""``reaper serve``: the long-running scheduler.

One APScheduler 3 cron job per policy with a schedule, each in its policy's timezone; the
scheduler's own zone is UTC, never the machine's. The policy files are the source of truth: jobs
are built from them at start and on SIGHUP (no pickled job store). Missed runs coalesce into one;
one run per policy at a time (``max_instances=1`` here, the policy lock across processes). Each
fire claims its slot in the run ledger (the database clock decides the slot), so replicas and
CronJob pods never run the same slot twice.

Signals: SIGHUP re-reads and validates every policy and swaps the jobs only if all are valid
(a run in progress keeps going); SIGTERM/SIGINT stop starting batches, let the in-flight ones
finish within the grace period, record the runs as interrupted and exit 0; a second signal exits
at once (pending audit rows are reconciled by the next run).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from reaper.audit import AuditStore
from reaper.errors import AuditError, PolicyError
from reaper.metrics import HealthServer, Metrics
from reaper.notify import Notifier
from reaper.policy import LoadedPolicy, load_policies
from reaper.runner import run_policy
from reaper.schedule import parse_cron
from reaper.systemd import notify, watchdog_interval

__all__ = ["Daemon", "DaemonConfig"]

log = structlog.get_logger("reaper.daemon")

#: On shutdown, how long notifications in flight may still take (after the runs' grace).
NOTIFY_WAIT_SECONDS = 5.0


@dataclass(frozen=True)
class DaemonConfig:
    """How ``reaper serve`` runs."""

    policies: Path
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    grace: timedelta = timedelta(seconds=25)
    misfire_grace: timedelta = timedelta(minutes=5)
    min_age: timedelta = timedelta(hours=1)


class Daemon:
    """The scheduler, its jobs, the health server and the signal handling."""

    def __init__(
        self,
        config: DaemonConfig,
        store: AuditStore,
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
    ):
        self.config = config
        self.store = store
        self.metrics = metrics or Metrics()
        #: Sends the runs' notifications; its deliveries are counted in the daemon's metrics.
        self.notifier = notifier or Notifier(store=store)
        self.notifier.register(self.metrics.registry)
        self.policies: dict[str, LoadedPolicy] = {}
        self.scheduler = AsyncIOScheduler(
            timezone=UTC,
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": int(config.misfire_grace.total_seconds()),
            },
        )
        self.stop = asyncio.Event()  # tells running policies to stop starting batches
        self._stopping = asyncio.Event()
        self._signals = 0
        self._active: set[asyncio.Task[Any]] = set()
        self.health: HealthServer | None = None

    # -- policies and jobs ----------------------------------------------------------------------

    def load(self) -> list[LoadedPolicy]:
        """Read and validate every policy file (raises PolicyError)."""
        return load_policies([self.config.policies])

    def install(self, loaded: Sequence[LoadedPolicy]) -> None:
        """Replace the job set with one cron job per scheduled policy."""
        wanted = {item.name: item for item in loaded if item.policy.schedule}
        for job in self.scheduler.get_jobs():
            if job.id not in wanted:
                job.remove()
        self.metrics.interval.clear()
        for name, item in wanted.items():
            policy = item.policy
            assert policy.schedule is not None
            schedule = parse_cron(policy.schedule, policy.zone)
            trigger = schedule.trigger
            first = schedule.next_fire_time(datetime.now(UTC))
            second = schedule.next_fire_time(first) if first is not None else None
            if first is not None and second is not None:
                self.metrics.interval.labels(name).set((second - first).total_seconds())
            self.scheduler.add_job(
                self._fire, trigger, args=[name], id=name, name=name, replace_existing=True
            )
        for item in loaded:
            if not item.policy.schedule:
                log.info("policy_not_scheduled", policy=item.name, hint="it has no schedule")
        self.policies = {item.name: item for item in loaded}
        self.metrics.policies.set(len(wanted))
        log.info("policies_loaded", scheduled=sorted(wanted), total=len(loaded))

    def reload(self) -> bool:
        """SIGHUP: swap to the new policy set only if every file is valid."""
        notify("RELOADING=1")
        try:
            loaded = self.load()
        except PolicyError as exc:
            log.error("reload_refused", error=str(exc), hint="the previous policies stay active")
            notify("READY=1")
            return False
        self.install(loaded)
        notify("READY=1")
        return True

    def next_runs(self) -> dict[str, str]:
        """Each job's next fire time (for logs and tests)."""
        return {
            job.id: job.next_run_time.isoformat()
            for job in self.scheduler.get_jobs()
            if job.next_run_time is not None
        }

    # -- running --------------------------------------------------------------------------------

    async def _fire(self, name: str) -> None:
        loaded = self.policies.get(name)
        if loaded is None or self.stop.is_set():
            return
        task = asyncio.current_task()
        assert task is not None
        self._active.add(task)
        try:
            await self.run_once(loaded)
        finally:
            self._active.discard(task)

    async def run_once(self, loaded: LoadedPolicy) -> None:
        """Run one policy for the slot the database clock says it is in."""
        policy = loaded.policy
        assert policy.schedule is not None
        try:
            now = await asyncio.to_thread(self.store.db_now)
        except AuditError as exc:
            log.error("run_not_started", policy=loaded.name, error=str(exc))
            return
        slot = parse_cron(policy.schedule, policy.zone).previous_fire_time(now)
        run = await run_policy(
            loaded,
            self.store,
            slot=slot,
            stop=self.stop,
            min_age=self.config.min_age,
            notifier=self.notifier,
        )
        self.metrics.observe(run, policy.target_config.type)

    def ready(self) -> tuple[bool, str]:
        """/readyz: the audit database answers and policies are loaded."""
        if not self.policies:
            return False, "no policies loaded"
        try:
            self.store.db_now()
        except AuditError as exc:
            return False, f"audit database unreachable: {exc}"
        return True, f"ready: {len(self.policies)} policies"

    def _signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second_signal", signal=signal.Signals(signum).name, action="exit now")
            os._exit(1)
        log.info(
            "shutting_down",
            signal=signal.Signals(signum).name,
            grace=self.config.grace.total_seconds(),
        )
        notify("STOPPING=1")
        self._stopping.set()

    def _restore_last_success(self) -> None:
        """After a restart, the last-success gauge starts from the audit, not from zero."""
        try:
            finished = self.store.last_successes()
        except AuditError as exc:
            log.warning("last_success_unknown", error=str(exc))
            return
        for policy, when in finished.items():
            self.metrics.last_success.labels(policy).set(when.timestamp())

    async def serve(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit code."""
        self.install(self.load())
        self._restore_last_success()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._signal, signum)
        self.scheduler.start()
        self.health = HealthServer(
            self.config.metrics_host, self.config.metrics_port, self.metrics, self.ready
        )
        self.health.start()
        log.info(
            "serving",
            metrics=f"{self.config.metrics_host}:{self.health.port}",
            next_runs=self.next_runs(),
        )
        notify("READY=1")
        pinger = asyncio.create_task(self._watchdog())
        try:
            await self._stopping.wait()
        finally:
            pinger.cancel()
            await self._shutdown()
        return 0

    async def _shutdown(self) -> None:
        self.scheduler.shutdown(wait=False)
        self.stop.set()
        if self._active:
            _, pending = await asyncio.wait(
                set(self._active), timeout=self.config.grace.total_seconds()
            )
            for task in pending:
                # Past the grace period: abandon the in-flight batch. Its rows stay pending and
                # the next run reconciles them against the target.
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
                log.warning("runs_abandoned", count=len(pending))
        # Notifications still in flight get a few seconds; the rest are recorded abandoned.
        await self.notifier.drain(NOTIFY_WAIT_SECONDS)
        if self.health is not None:
            self.health.stop()
        log.info("stopped")

    async def _watchdog(self) -> None:
        interval = watchdog_interval()
        if interval is None:
            return
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)
