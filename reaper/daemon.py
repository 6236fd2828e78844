"""``reaper serve``: the long-running scheduler.

One APScheduler 3 cron job per policy with a schedule, each in its policy's timezone; the
scheduler's own zone is UTC, never the machine's. The policy files are the source of truth: jobs
are built from them at start and on SIGHUP (no pickled job store). Missed runs coalesce into one;
one run per policy at a time (``max_instances=1`` here, the policy lock across processes). Each
fire claims its slot in the run ledger (the database clock decides the slot), so replicas and
CronJob pods never run the same slot twice. On PostgreSQL the replicas also share the policies
(:mod:`reaper.leases`): each schedules only the policies it holds a lease on.

Policies reaching one endpoint share its request budget (:mod:`reaper.budgets`), policies over
the same tasks take turns (:mod:`reaper.parallel`), and at most
``REAPER_MAX_PARALLEL_POLICIES`` runs go at once (the others wait for a slot). A policy's
``schedule_jitter`` starts its runs a fixed, name-derived offset after each scheduled time
(:class:`JitteredTrigger`), so that many policies on one cron line do not all start together; each
run still belongs to its scheduled slot.

Signals: SIGHUP re-reads and validates every policy and swaps the jobs only if all are valid
(a run in progress keeps going); SIGTERM/SIGINT stop starting batches, let the in-flight ones
finish within the grace period, record the runs as interrupted and exit 0; a second signal exits
at once (pending audit rows are reconciled by the next run).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger

from reaper.audit import AuditStore
from reaper.budgets import EndpointBudgets
from reaper.clocks import ClockLimits
from reaper.errors import AuditError, PolicyError
from reaper.leases import Leases
from reaper.metrics import HealthServer, Metrics
from reaper.notify import Notifier
from reaper.parallel import Turns, same_tasks
from reaper.policy import LoadedPolicy, load_policies
from reaper.runner import run_policy
from reaper.schedule import CronSchedule, parse_cron
from reaper.settings import EndpointBudget
from reaper.systemd import notify, watchdog_interval

__all__ = ["Daemon", "DaemonConfig", "JitteredTrigger"]

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
    clock: ClockLimits = field(default_factory=ClockLimits)
    max_parallel: int = 64
    endpoint_budgets: Mapping[str, EndpointBudget] = field(default_factory=dict)


class JitteredTrigger(BaseTrigger):  # type: ignore[misc]  # APScheduler 3 is untyped
    """Fires each slot of a schedule a fixed offset after it: the same fraction of ``jitter``
    for every slot, drawn from the policy's name, and at most half the gap to the next slot.

    A run at slot + offset still belongs to its slot: the latest scheduled time at or before it
    is the slot itself, which is what the run ledger is keyed by (and what ``reaper run --slot
    auto`` computes).
    """

    def __init__(self, schedule: CronSchedule, jitter: timedelta, name: str) -> None:
        self.schedule = schedule
        self.jitter = jitter
        digest = hashlib.sha256(name.encode()).digest()
        self.fraction = int.from_bytes(digest[:8], "big") / 2**64

    def fire_time(self, slot: datetime) -> datetime:
        """When the run of ``slot`` starts."""
        following = self.schedule.next_fire_time(slot)
        room = self.jitter if following is None else min(self.jitter, (following - slot) / 2)
        return slot + room * self.fraction

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        # As the unjittered trigger: the first fire after `now`, or after the previous fire if
        # that is earlier; the slot that fire belongs to may have begun already.
        after = now - timedelta(microseconds=1)
        if previous_fire_time is not None:
            after = min(after, previous_fire_time)
        current = self.schedule.previous_fire_time(after)
        if current is not None and (fire := self.fire_time(current)) > after:
            return fire
        following = self.schedule.next_fire_time(after)
        return None if following is None else self.fire_time(following)

    def __str__(self) -> str:
        return f"cron[{self.schedule.expression!r}, {self.schedule.timezone}, +{self.jitter}]"


class Daemon:
    """The scheduler, its jobs, the health server and the signal handling."""

    def __init__(
        self,
        config: DaemonConfig,
        store: AuditStore,
        metrics: Metrics | None = None,
        leases: Leases | None = None,
        notifier: Notifier | None = None,
    ):
        self.config = config
        self.store = store
        self.metrics = metrics or Metrics()
        #: Sends the runs' notifications; its deliveries are counted in the daemon's metrics.
        self.notifier = notifier or Notifier(store=store)
        self.notifier.register(self.metrics.registry)
        self.policies: dict[str, LoadedPolicy] = {}
        #: With leases (PostgreSQL, several replicas), only the held policies are scheduled here.
        self.leases = leases
        self.held: frozenset[str] = frozenset()
        self._renewed = time.monotonic()
        self._rebalance = asyncio.Event()
        self._running: set[str] = set()
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
        self.budgets = EndpointBudgets(config.endpoint_budgets)
        self._slots = asyncio.Semaphore(config.max_parallel)
        self.turns = Turns()

    # -- policies and jobs ----------------------------------------------------------------------

    def load(self) -> list[LoadedPolicy]:
        """Read and validate every policy file (raises PolicyError)."""
        return load_policies([self.config.policies])

    def install(self, loaded: Sequence[LoadedPolicy]) -> None:
        """Replace the job set with one cron job per scheduled policy."""
        wanted = {item.name: item for item in loaded if item.policy.schedule}
        if self.leases is not None:
            wanted = {name: item for name, item in wanted.items() if name in self.held}
        for job in self.scheduler.get_jobs():
            if job.id not in wanted:
                job.remove()
        self.metrics.interval.clear()
        for name, item in wanted.items():
            policy = item.policy
            assert policy.schedule is not None
            schedule = parse_cron(policy.schedule, policy.zone)
            trigger: BaseTrigger = schedule.trigger
            if policy.schedule_jitter:
                trigger = JitteredTrigger(schedule, policy.schedule_jitter, name)
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
        self.budgets.register(loaded)
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
        self._rebalance.set()  # new or removed policies: renew the leases now
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
        self._running.add(name)
        try:
            # Policies over the same tasks take turns (reaper.parallel); a turn before a slot, so
            # a waiting policy holds no slot another target could use.
            async with self.turns.of(same_tasks(loaded)), self._slots:
                if self.stop.is_set():
                    return
                await self.run_once(loaded)
        finally:
            self._active.discard(task)
            self._running.discard(name)

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
            clock=self.config.clock,
            budgets=self.budgets,
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
        if self.leases is not None:
            await self.renew_leases()
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
        renewer = asyncio.create_task(self._lease_loop()) if self.leases is not None else None
        try:
            await self._stopping.wait()
        finally:
            pinger.cancel()
            await self._shutdown(renewer)
        return 0

    async def _shutdown(self, renewer: asyncio.Task[None] | None = None) -> None:
        self.scheduler.shutdown(wait=False)
        self.stop.set()
        self._rebalance.set()  # leases of idle policies go back now; running ones' stay renewed
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
        if renewer is not None:
            renewer.cancel()
        if self.leases is not None:
            try:
                await asyncio.to_thread(self.leases.release)
            except AuditError as exc:
                log.warning("leases_not_released", error=str(exc), hint="they expire on their own")
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

    # -- leases (PostgreSQL: replicas share the policies) ---------------------------------------

    async def _lease_loop(self) -> None:
        assert self.leases is not None
        interval = self.leases.ttl.total_seconds() / 3
        while True:
            try:
                await asyncio.wait_for(self._rebalance.wait(), interval)
            except TimeoutError:
                pass
            self._rebalance.clear()
            await self.renew_leases()

    async def renew_leases(self) -> None:
        """Renew, release or claim leases; schedule what is held, and run a newly held policy
        whose current slot nobody ran yet, if that is still within the misfire grace."""
        assert self.leases is not None
        scheduled = [name for name, item in self.policies.items() if item.policy.schedule]
        stopping = self.stop.is_set()
        if stopping:
            # Keep only the leases of runs still going. Until they end, no other replica
            # schedules those policies; a fire missed meanwhile is caught up by the replica
            # that takes the lease over.
            scheduled = [name for name in scheduled if name in self._running]
        started = time.monotonic()
        try:
            state = await asyncio.to_thread(
                self.leases.tick, scheduled, set(self._running), share=not stopping
            )
        except AuditError as exc:
            log.warning("lease_renewal_failed", error=str(exc))
            if self.held and time.monotonic() - self._renewed > self.leases.ttl.total_seconds():
                # Others may hold these leases by now: stop scheduling them here.
                log.error("leases_lost", policies=sorted(self.held))
                self.held = frozenset()
                self.install(list(self.policies.values()))
            return
        self._renewed = started
        if stopping:
            self.held = state.held
            return
        if state.held == self.held:
            return
        acquired, released = state.held - self.held, self.held - state.held
        self.held = state.held
        log.info(
            "leases_changed",
            held=sorted(state.held),
            acquired=sorted(acquired),
            released=sorted(released),
            replicas=state.replicas,
        )
        self.install(list(self.policies.values()))
        for name in sorted(acquired):
            await self._catch_up(name, state.now)

    async def _catch_up(self, name: str, now: datetime) -> None:
        """A policy taken over: run its current slot if no one did and it is not too late."""
        assert self.leases is not None
        item = self.policies.get(name)
        if item is None or not item.policy.schedule or self.stop.is_set():
            return
        slot = parse_cron(item.policy.schedule, item.policy.zone).previous_fire_time(now)
        if slot is None or now - slot > self.config.misfire_grace:
            return
        try:
            if await asyncio.to_thread(self.leases.slot_claimed, name, slot):
                return
        except AuditError as exc:
            log.warning("catch_up_skipped", policy=name, error=str(exc))
            return
        log.info("catching_up", policy=name, slot=slot.isoformat())
        # Kept in _active (as _fire does) so that shutdown waits for it too.
        task = asyncio.get_running_loop().create_task(self._fire(name))
        self._active.add(task)
        task.add_done_callback(self._active.discard)
