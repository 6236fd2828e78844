"""One policy run, end to end: listing → plan → executor → audit.

``run_policy`` is what ``reaper run`` (and later the daemon) calls for each policy. It opens the run
in the audit first (no audit, no delete), plans from a complete listing (an incomplete listing
aborts the policy with nothing deleted), records ids the target's guard refuses, then deletes —
or, in a dry run, records what it would delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import httpx
import structlog
from sqlalchemy import Engine

from reaper.audit import AuditEntry, AuditStore, RunRecord, RunSummary
from reaper.budgets import EndpointBudgets
from reaper.clocks import ClockLimits, check_clocks
from reaper.converters import format_duration
from reaper.errors import AuditError, ListingError, RunAborted, TargetAuthError, TargetError
from reaper.execute import AsyncAudit, Batches, BatchEvent, Executor, auto_concurrency
from reaper.guards import GuardOverrides, GuardTrip, check_guards
from reaper.holds import Approval, HeldStore, HoldError, refusal
from reaper.http import HttpStats, RetryPolicy, TargetHttp
from reaper.inventory import Inventory
from reaper.locks import PolicyLock
from reaper.notices import NoticeStore
from reaper.notify import Event, Notifier, id_list
from reaper.pins import PinnedCheck, PinStore
from reaper.plan import Plan, Verdict, make_plan
from reaper.planfile import SavedPlan, not_eligible_now
from reaper.policy import LoadedPolicy
from reaper.ratelimit import RateLimiter
from reaper.recheck import SendCheck
from reaper.reconcile import Reconciler, ReconcileReport
from reaper.sinks import EventKind
from reaper.targets.base import ListRequest, Outcome, RecheckRequest, Target, Task
from reaper.targets.state import TargetState

__all__ = [
    "Mode",
    "PolicyRun",
    "RunOptions",
    "RunStatus",
    "build_target",
    "plan_policy",
    "reconcile_policy",
    "run_policy",
    "run_record",
    "target_state",
]

log = structlog.get_logger("reaper.runner")

_RECORD_CHUNK = 1000
DEFAULT_MIN_AGE = timedelta(hours=1)
#: How long a run that made its own notifier waits for its deliveries before returning.
OWN_NOTIFIER_WAIT = timedelta(seconds=30)


class Mode(StrEnum):
    RUN = "run"
    DRY_RUN = "dry_run"
    APPLY = "apply"  # a reviewed, saved plan
    #: Not a run of the policy: the correction rows for acknowledged deletions a listing
    #: contradicted (reaper.reconcile).
    CORRECTION = "correction"


def run_record(loaded: LoadedPolicy, target_kind: str, mode: Mode) -> RunRecord:
    """What the audit records about a run of ``loaded`` when it starts."""
    policy = loaded.policy
    return RunRecord(
        policy=policy.name,
        policy_hash=loaded.digest,
        policy_json=policy.canonical_json(),
        target_kind=target_kind,
        target=policy.target_config.describe(),
        mode=mode.value,
    )


class RunStatus(StrEnum):
    """How a policy run ended (stored in ``reaper_runs.status``)."""

    SUCCEEDED = "succeeded"  # everything eligible was deleted (or nothing was eligible)
    PARTIAL = "partial"  # some deletions failed, had unknown outcomes, or were refused by id
    ABORTED = "aborted"  # the policy stopped before deleting everything (listing, auth, stop)
    REFUSED = "refused"  # a mass-deletion guard tripped: nothing was deleted
    FAILED = "failed"  # the audit failed: the run stopped, fail closed
    SKIPPED = "skipped"  # another run of the policy holds its lock (not recorded)
    INTERRUPTED = "interrupted"  # stopped by a signal, or found dead by reconciliation


@dataclass
class PolicyRun:
    """What happened to one policy in one invocation."""

    policy: str
    mode: Mode
    status: RunStatus
    summary: RunSummary = field(default_factory=RunSummary)
    run_id: str | None = None
    plan: Plan | None = None
    error: str | None = None
    #: Applying a saved plan: approved ids that were no longer eligible, so not deleted.
    not_eligible: list[str] = field(default_factory=list)
    #: The target's HTTP counters for this run (requests by status, retries), for metrics.
    http: HttpStats | None = None
    #: The scheduled slot this run served (daemon and `reaper run --slot`).
    slot: datetime | None = None
    #: The approval this run carried out (reaper.holds), if any.
    approval_id: str | None = None
    #: A guard refused the run and its plan is held for approval.
    held: bool = False
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None
    #: What the run's output should point out (a clock or zone that looks wrong, reaper.clocks).
    warnings: list[str] = field(default_factory=list)
    #: Eligible tasks the run did not get to (its time was up, it was stopped, a guard refused):
    #: the next run's. None when the run made no plan.
    remaining: int | None = None
    #: The run stopped starting batches at ``delete.max_run_time``.
    time_up: bool = False

    @property
    def ok(self) -> bool:
        """Exit code 0: everything eligible was deleted, or another process ran it, or the run
        was stopped by a signal or at its ``max_run_time`` and recorded so, with no deletion
        failed (the rest is left for the next run)."""
        if self.status is RunStatus.PARTIAL and self.time_up:
            s = self.summary
            return not (s.failed or s.unknown or s.skipped)
        return self.status in (RunStatus.SUCCEEDED, RunStatus.SKIPPED, RunStatus.INTERRUPTED)


def target_state(loaded: LoadedPolicy, engine: Engine) -> TargetState | None:
    """The stores in reaper's database a policy's target keeps its state in (None for the
    kinds that keep none)."""
    if not loaded.policy.target_class.keeps_state:
        return None
    return TargetState(inventory=Inventory(engine))


def build_target(
    loaded: LoadedPolicy,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    state: TargetState | None = None,
    budgets: EndpointBudgets | None = None,
) -> tuple[Target, httpx.AsyncClient]:
    """Create the target for a policy, with its HTTP client, rate limiter and retry policy, and
    the stores it keeps its state in (``state``: see :func:`target_state`).

    With ``budgets`` its requests share the rate limiter and in-flight limit of its endpoint
    with every other policy reaching it (:mod:`reaper.budgets`); without, it has its own
    limiter at its own rate.
    """
    policy = loaded.policy
    config = policy.target_config
    if policy.target_class.keeps_state and state is None:
        raise ValueError(f"the {config.type} target keeps state: build it with state=")
    verify = tls_context(config.verify_tls, config.ca_bundle)
    if not config.verify_tls:
        log.warning(
            "tls_verification_disabled",
            policy=policy.name,
            target=config.describe(),
            hint="target.verify_tls is false: the target's identity is not checked",
        )
    timeout = config.timeout.total_seconds()
    auth = policy.target_class.client_auth(config)
    client = httpx.AsyncClient(
        auth=auth,
        timeout=httpx.Timeout(timeout),
        verify=verify,
        transport=transport,
        follow_redirects=False,
        headers={"User-Agent": "reaper/0.1"},
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
    )
    retries = config.retries
    retry = RetryPolicy(
        attempts=retries.attempts,
        backoff=retries.backoff.total_seconds(),
        max_backoff=retries.max_backoff.total_seconds(),
    )
    if budgets is None:
        limiter = RateLimiter(policy.delete.rate, policy.delete.burst)
        http = TargetHttp(client, limiter, retry, max_response_bytes=config.max_response_bytes)
    else:
        budget = budgets.budget(loaded)
        http = TargetHttp(
            client,
            budget.limiter,
            retry,
            max_response_bytes=config.max_response_bytes,
            inflight=budget.inflight,
            pace=budgets.pace(loaded, budget),
        )
    return policy.target_class(config, http, state), client


def tls_context(verify: bool, ca_bundle: str | None) -> ssl.SSLContext:
    """The TLS context of a target's client, one per trust setting in the process.

    Loading a CA bundle costs some 50 ms of CPU, and httpx loads it for every client it makes:
    10 s of the event loop's time for a fleet of 200 policies. A context may be shared; the key
    includes the bundle file's modification time (and httpx's SSL_CERT_* variables), so a
    rotated bundle is read again.
    """
    if not verify:
        return _tls_context(False, None, None, None, None)
    mtime = None
    if ca_bundle:
        with contextlib.suppress(OSError):  # a missing file fails in ssl, as before
            mtime = os.stat(ca_bundle).st_mtime_ns
    return _tls_context(
        True, ca_bundle, mtime, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")
    )


@functools.lru_cache(maxsize=32)
def _tls_context(
    verify: bool,
    ca_bundle: str | None,
    mtime: int | None,
    cert_file: str | None,
    cert_dir: str | None,
) -> ssl.SSLContext:
    if ca_bundle:
        # httpx 0.28 deprecates a CA path as `verify`: hand it an SSL context.
        return ssl.create_default_context(cafile=ca_bundle)
    # certifi's bundle, or SSL_CERT_FILE / SSL_CERT_DIR (the arguments above) as httpx reads them.
    return httpx.create_ssl_context(verify=verify)


def _list_request(loaded: LoadedPolicy, cutoff: datetime, *, raw: bool = False) -> ListRequest:
    policy = loaded.policy
    fields = frozenset(policy.select.match) | frozenset(policy.protect.match)
    return ListRequest(
        age_field=policy.age_field,
        match_fields=fields - {"task_id"},
        # Server-side filtering by age would hide the newest tasks keep-newest-N must count.
        created_before=(
            cutoff if policy.age_field == "created_at" and not policy.keep.newest else None
        ),
        raw=raw,
    )


async def plan_policy(
    loaded: LoadedPolicy,
    target: Target,
    now: datetime,
    min_age: timedelta = DEFAULT_MIN_AGE,
    *,
    observe: Reconciler | None = None,
    stop: asyncio.Event | None = None,
    clock: ClockLimits | None = None,
    pins: Mapping[str, str] | None = None,
    snapshots: bool = False,
) -> Plan:
    """List the target completely and plan the policy over it, then judge the clocks behind it
    (``plan.clock``, its warnings logged).

    ``observe`` sees every listed task too (reconciliation shares the run's listing); ``pins``
    are the tasks pinned for the policy (id -> reason), protected whatever else the policy says;
    with ``snapshots`` the plan keeps the eligible tasks' records as listed, for the audit.
    """
    cutoff = now - loaded.policy.select.older_than
    tasks = target.list_tasks(_list_request(loaded, cutoff, raw=snapshots))
    if observe:
        tasks = observe.watch(tasks)
    if stop is not None:
        tasks = _until(stop, tasks)
    clock = clock or ClockLimits()
    held = observe.held if observe is not None else None
    plan = await make_plan(
        loaded,
        target,
        tasks,
        now,
        min_age,
        clock.future_tolerance,
        held,
        pins=pins,
        snapshots=snapshots,
    )
    plan.clock = check_clocks(loaded.policy, target.http.stats, plan, clock)
    plan.clock.log()
    return plan


def plan_clock_trip(plan: Plan) -> GuardTrip | None:
    """The guard the plan's clock check tripped, if any."""
    return plan.clock.trip if plan.clock is not None else None


class Interrupted(Exception):
    """A stop was requested (SIGTERM) while listing."""


async def _until(stop: asyncio.Event, tasks: AsyncIterator[Task]) -> AsyncIterator[Task]:
    async for task in tasks:
        if stop.is_set():
            raise Interrupted
        yield task


@dataclass(frozen=True)
class RunOptions:
    """How a policy run behaves, beyond the policy itself."""

    mode: Mode = Mode.RUN
    now: datetime | None = None
    transport: httpx.AsyncBaseTransport | None = None
    on_batch: Callable[[BatchEvent], None] | None = None
    on_plan: Callable[[Plan], None] | None = None
    stop: asyncio.Event | None = None
    overrides: GuardOverrides = field(default_factory=GuardOverrides)
    min_age: timedelta = DEFAULT_MIN_AGE
    approved: SavedPlan | None = None
    #: Claim this scheduled slot in the run ledger first; skip if another process has it.
    slot: datetime | None = None
    clock: ClockLimits = field(default_factory=ClockLimits)
    #: The request budgets of the process's endpoints, shared with the policies running beside
    #: this one (None: the run has a limiter of its own).
    budgets: EndpointBudgets | None = None
    #: Monotonic seconds, for ``delete.max_run_time`` (tests replace it).
    monotonic: Callable[[], float] = time.monotonic
    #: Carry out this approval of a held plan (with mode=APPLY and ``approved`` its plan); a
    #: plain run finds its policy's approval in force itself.
    approval: Approval | None = None
    #: Sends this run's notifications (reaper.notify). Without one, a policy with its own
    #: ``notify`` sinks gets a notifier for the run, which waits for its deliveries at the end.
    notifier: Notifier | None = None


async def run_policy(loaded: LoadedPolicy, audit: AuditStore, **options: Any) -> PolicyRun:
    """Run one policy once (see :class:`RunOptions`). Target and audit trouble never raise:
    the returned :class:`PolicyRun` says what happened."""
    opts = RunOptions(**options)
    if (opts.mode is Mode.APPLY) != (opts.approved is not None):
        raise ValueError("a saved plan is applied with mode=APPLY, and only then")
    if opts.approved is not None and opts.approved.policy_hash != loaded.digest:
        raise ValueError("the saved plan was made for another version of the policy")
    if opts.approval is not None and opts.approval.policy_hash != loaded.digest:
        raise ValueError("the approval was given for another version of the policy")
    return await _PolicyRunner(loaded, audit, opts).execute()


class _PolicyRunner:
    """The steps of one run, in order; each step records what it learnt in ``self.run``."""

    def __init__(self, loaded: LoadedPolicy, store: AuditStore, opts: RunOptions) -> None:
        self.loaded = loaded
        self.policy = loaded.policy
        self.opts = opts
        self.now = opts.now or datetime.now(UTC)
        max_run_time = self.policy.delete.max_run_time
        #: When no further batch may start (monotonic), from ``delete.max_run_time``.
        self.deadline = (
            opts.monotonic() + max_run_time.total_seconds() if max_run_time is not None else None
        )
        self.store = store
        self.audit = AsyncAudit(store)
        self.run = PolicyRun(self.policy.name, opts.mode, RunStatus.FAILED)
        #: Tasks whose earlier deletion, which may have been carried out, a listing contradicted.
        self.corrected: set[str] = set()
        #: When the listing this run plans from began (the re-check looks for later changes).
        self.listing_started: datetime | None = None
        #: How long an audit call took to come back just before deleting (sizes the workers).
        self.audit_seconds = 0.0
        #: The approval of a held plan this run carries out.
        self.approval = opts.approval
        self.notifier = opts.notifier

    async def execute(self) -> PolicyRun:
        """Run, then announce how it went (reaper.notify); the notifications never delay or
        fail the run's work, only a notifier of the run's own is waited for at the end."""
        own = self.notifier is None and bool(self.policy.notify)
        if own:
            self.notifier = Notifier(store=self.store)
        try:
            run = await self._execute()
            self._announce(run)
            return run
        finally:
            if own and self.notifier is not None:
                await self.notifier.drain(OWN_NOTIFIER_WAIT.total_seconds())

    async def _execute(self) -> PolicyRun:
        run, policy = self.run, self.policy
        lock = PolicyLock(self.store.engine, policy.name)
        async with AsyncExitStack() as stack:
            stack.callback(self.audit.close)
            try:
                if self.opts.slot is not None:
                    run.slot = self.opts.slot
                    if not await self.audit.call(
                        self.store.claim_slot, policy.name, self.opts.slot
                    ):
                        run.status = RunStatus.SKIPPED
                        run.error = f"slot {self.opts.slot.isoformat()} already ran elsewhere"
                        log.info("slot_taken", policy=policy.name, slot=self.opts.slot)
                        return self._done()
                held = await self.audit.call(lock.acquire)
            except AuditError as exc:
                run.error = f"{exc}; nothing was listed or deleted"
                log.error("run_not_started", policy=policy.name, error=run.error)
                return self._done()
            if not held:
                run.status = RunStatus.SKIPPED
                run.error = "another run of this policy holds its lock; skipped"
                log.warning("run_skipped", policy=policy.name, reason=run.error)
                return self._done()
            stack.push_async_callback(self.audit.call, lock.release)
            target, client = build_target(
                self.loaded,
                transport=self.opts.transport,
                state=target_state(self.loaded, self.store.engine),
                budgets=self.opts.budgets,
            )
            stack.push_async_callback(client.aclose)
            try:
                await self._approval_in_force()
                run.run_id = await self.audit.call(self.store.start_run, self._record(target))
            except AuditError as exc:
                # No audit, no delete: nothing is listed either.
                run.error = f"{exc}; nothing was listed or deleted"
                log.error("run_not_started", policy=policy.name, error=run.error)
                return self._done()
            run.http = target.http.stats
            if self.opts.slot is not None:
                await self.audit.call(
                    self.store.ledger_run, policy.name, self.opts.slot, run.run_id
                )
            with structlog.contextvars.bound_contextvars(run_id=run.run_id, policy=policy.name):
                try:
                    await self._steps(target, run.run_id)
                except AuditError as exc:
                    run.status = RunStatus.FAILED
                    run.error = f"audit database failed; no further deletions were sent: {exc}"
                    log.error("audit_failed", error=str(exc))
                finally:
                    await _finish(run, self.audit)
        return self._done()

    def _done(self) -> PolicyRun:
        self.run.finished_at = datetime.now(UTC)
        return self.run

    def _record(self, target: Target, mode: Mode | None = None) -> RunRecord:
        record = run_record(self.loaded, target.kind, mode or self.opts.mode)
        if mode is None and self.approval is not None:
            record = replace(record, approval_id=self.approval.id)
        return record

    async def _approval_in_force(self) -> None:
        """A plain run carries out its policy's approved held plan, if one is valid now."""
        if self.approval is None and self.opts.mode is Mode.RUN:
            holds = HeldStore(self.store)
            now = datetime.now(UTC)
            held = await self.audit.call(holds.approval_for, self.policy.name, now)
            if held is not None:
                why = refusal(held, self.loaded, now)
                if why is None:
                    self.approval = await self.audit.call(holds.approval, held)
                else:
                    log.warning("approval_refused", policy=self.policy.name, reason=why)
                    try:
                        await self.audit.call(holds.refused, held, why, now)
                    except HoldError:
                        pass  # rejected meanwhile: refused either way
        if self.approval is not None:
            self.run.approval_id = self.approval.id
            log.info(
                "approval_in_force",
                policy=self.policy.name,
                approval=self.approval.id,
                held_run=self.approval.held.run_id,
                approved_by=self.approval.by,
                ids=len(self.approval.items),
            )

    async def _steps(self, target: Target, run_id: str) -> None:
        run, policy, summary = self.run, self.policy, self.run.summary
        log.info("run_started", mode=run.mode.value, target=policy.target_config.describe())
        reconciler = await self.audit.call(
            Reconciler.load,
            self.store,
            policy.name,
            exclude_run=run_id,
            settle_after=target.settle_after(),
        )
        self.listing_started = datetime.now(UTC)
        pins = await self._pins()
        try:
            plan = await plan_policy(
                self.loaded,
                target,
                self.now,
                self.opts.min_age,
                observe=reconciler,
                stop=self.opts.stop,
                clock=self.opts.clock,
                pins=pins,
                # Each deletion's audit row keeps the task's record as listed.
                snapshots=run.mode is not Mode.DRY_RUN,
            )
        except Interrupted:
            run.status = RunStatus.INTERRUPTED
            run.error = "stopped by a signal while listing; nothing was deleted"
            log.warning("run_interrupted", phase="listing")
            return
        except (ListingError, TargetError) as exc:
            # An incomplete listing deletes nothing: keep-newest-N needs all of it.
            run.status = RunStatus.ABORTED
            run.error = f"listing failed, nothing deleted: {exc}"
            log.error("listing_failed", error=str(exc))
            return
        if run.mode in (Mode.RUN, Mode.APPLY):
            # What the listing learnt for the target's own state (Aparavi's inventory) is
            # written by runs that may delete; plans and dry runs only read.
            await target.save_state()
        # The listing was complete: earlier runs' unresolved rows can be settled from it, and
        # the deletions acknowledged since the last listing checked against it.
        report = await self.audit.call(
            reconciler.apply,
            self.store,
            self._record(target, Mode.CORRECTION),
            exclude_run=run_id,
            seen_by=f"the listing of run {run_id}",
        )
        summary.acknowledged_not_deleted = report.acknowledged_not_deleted
        # Contradicted by this listing or by an earlier one (`reaper reconcile`, a verification
        # listing, a settled 504): a later "nothing to delete" for these is our own deletion.
        self.corrected = report.corrected | await self.audit.call(
            self.store.contradicted, policy.name
        )
        self._not_carried_out(report)
        plan = await self._give_notice(plan, run_id)
        plan = self._restrict(plan)
        run.plan = plan
        summary.listed = plan.listed
        summary.eligible = plan.eligible
        summary.kept = sum(
            n
            for (verdict, _), n in plan.counts.items()
            if verdict in (Verdict.KEEP, Verdict.PROTECTED)
        )
        summary.skipped = len(plan.invalid)
        run.remaining = plan.eligible
        if self.opts.on_plan is not None:
            self.opts.on_plan(plan)
        log.info(
            "plan_ready",
            listed=plan.listed,
            eligible=plan.eligible,
            kept=summary.kept,
            refused_ids=summary.skipped,
        )
        trip = await self._guards(plan)
        if trip is not None:
            run.status = RunStatus.REFUSED
            run.error = trip.message
            log.error("guard_tripped", guard=trip.guard, error=trip.message)
            # A plan is held for a person to judge the numbers; a clock too far off to trust
            # any age is fixed at the target, not approved.
            if run.mode is Mode.RUN and trip is not plan_clock_trip(plan):
                await self._hold(plan, trip, run_id)
            return
        await self._record_invalid(plan, run_id)
        if run.mode is Mode.DRY_RUN:
            await _record_dry_run(plan, self.audit, run_id, summary)
            run.status = RunStatus.SUCCEEDED
            return
        if plan.eligible and self._time_up():
            self._out_of_time(plan)
            return
        # Only now is the approval used up: a run refused by the clock, or out of time before
        # its first batch, has not carried it out, and leaves it to the next run.
        if not await self._carry_out_approval(run_id):
            return
        if plan.eligible:
            listing_requests = target.http.stats.requests
            await self._delete(plan, target, run_id)
            if summary.deleted and self._verify_now(listing_requests, target):
                await self._verify(target, run_id)
        if run.status is RunStatus.FAILED and run.error is None:
            run.status = _final_status(summary)

    def _clock_trip(self, plan: Plan) -> GuardTrip | None:
        """Note what the plan's clock check found; its guard, if the target's clock is too far
        from ours to trust any age."""
        summary = self.run.summary
        summary.future_timestamps = plan.future_timestamps
        if plan.clock is None:
            return None
        summary.clock_skew_seconds = plan.clock.skew
        self.run.warnings.extend(warning.message for warning in plan.clock.warnings)
        return plan.clock.trip

    def _time_up(self) -> bool:
        return self.deadline is not None and self.opts.monotonic() >= self.deadline

    def _out_of_time(self, plan: Plan) -> None:
        """``max_run_time`` was up before the first batch: nothing is sent this time."""
        run = self.run
        run.time_up = True
        run.status = RunStatus.PARTIAL
        run.error = (
            f"delete.max_run_time ({self._max_run_time()}) was up before deleting started; "
            f"all {plan.eligible} eligible task(s) are left for the next run"
        )
        log.warning("max_run_time_reached", done=0, remaining=plan.eligible)

    def _max_run_time(self) -> str:
        limit = self.policy.delete.max_run_time
        return format_duration(limit) if limit is not None else "none"

    def _verify_now(self, listing_requests: int, target: Target) -> bool:
        """Whether to list again right after deleting: ``delete.verify`` says always, or auto
        and a listing costs at most a tenth of the requests the deletions took."""
        setting = self.policy.delete.verify
        stop = self.opts.stop
        if setting == "never" or (stop is not None and stop.is_set()) or self._time_up():
            return False
        if setting == "always":
            return True
        deleting = target.http.stats.requests - listing_requests
        return listing_requests * 10 <= deleting

    async def _verify(self, target: Target, run_id: str) -> None:
        """List again and check this run's acknowledged deletions against the listing."""
        acknowledged = await self.audit.call(
            self.store.acknowledged, self.policy.name, only_run=run_id
        )
        verifier = Reconciler(self.policy.name, [], acknowledged)
        cutoff = self.now - self.policy.select.older_than
        try:
            async for _ in verifier.watch(target.list_tasks(_list_request(self.loaded, cutoff))):
                pass
        except (ListingError, TargetError) as exc:
            # The deletions are recorded; the next run's listing checks them instead.
            log.warning("verification_listing_failed", error=str(exc))
            return
        report = await self.audit.call(
            verifier.apply,
            self.store,
            self._record(target, Mode.CORRECTION),
            exclude_run=run_id,
            seen_by=f"the verification listing of run {run_id}",
        )
        self.run.summary.acknowledged_not_deleted += report.acknowledged_not_deleted
        self._not_carried_out(report)
        log.info(
            "verified_after_deleting",
            checked=len(acknowledged),
            acknowledged_not_deleted=report.acknowledged_not_deleted,
        )

    async def _give_notice(self, plan: Plan, run_id: str) -> Plan:
        """With ``delete.notice``, only tasks noticed long enough ago are deleted; tasks eligible
        for the first time are noticed now (not in a dry run) and announced (reaper.notices)."""
        notice = self.policy.delete.notice
        if notice is None:
            return plan
        notices = NoticeStore(self.store)
        first_seen = await self.audit.call(notices.first_seen, self.policy.name)
        plan = plan.give_notice(first_seen, self.now, notice)
        assert plan.notice is not None
        if self.run.mode is not Mode.DRY_RUN:
            await self.audit.call(notices.record, self.policy.name, plan.notice, run_id, self.now)
            if plan.notice.new:
                self._notify(
                    "deletions.upcoming",
                    {
                        "count": len(plan.notice.new),
                        "due_at": plan.notice.new_due.isoformat(),
                        "notice": format_duration(notice),
                        "task_ids": id_list(plan.notice.new),
                    },
                )
        log.info(
            "notice",
            due=plan.notice.due,
            waiting=len(plan.notice.waiting),
            noticed_now=len(plan.notice.new),
            forgotten=len(plan.notice.forgotten),
            next_due=plan.notice.next_due,
        )
        return plan

    def _notify(self, kind: EventKind, data: dict[str, Any]) -> None:
        """Hand an event about this run to the notifier; it is sent in the background."""
        if self.notifier is not None:
            self.notifier.send(self.loaded, Event(kind, self.policy.name, self.run.run_id, data))

    def _not_carried_out(self, report: ReconcileReport) -> None:
        if report.acknowledged_not_deleted:
            self._notify(
                "deletions.not_carried_out",
                {
                    "count": report.acknowledged_not_deleted,
                    "correction_run": report.correction_run,
                    "task_ids": id_list(sorted(report.corrected)),
                },
            )

    def _announce(self, run: PolicyRun) -> None:
        """The run's summary, and its failure if it failed (not for dry runs)."""
        if run.status is RunStatus.SKIPPED or run.mode is Mode.DRY_RUN:
            return
        s = run.summary
        counts = {
            "status": run.status.value,
            "mode": run.mode.value,
            "error": run.error,
            "listed": s.listed,
            "eligible": s.eligible,
            "kept": s.kept,
            "deleted": s.deleted,
            "already_gone": s.already_gone,
            "failed": s.failed,
            "unknown": s.unknown,
            "refused_ids": s.skipped,
            "skipped_changed": s.skipped_changed,
            "reclaimed_bytes": s.reclaimed_bytes,
        }
        if run.status in _FAILED or s.failed or s.unknown:
            self._notify("run.failed", counts)
        if run.run_id is not None:
            reasons = sorted(
                (
                    (n, reason)
                    for (verdict, reason), n in (run.plan.counts if run.plan else {}).items()
                    if verdict is Verdict.DELETE
                ),
                reverse=True,
            )
            self._notify(
                "run.summary",
                counts
                | {
                    "approval_id": run.approval_id,
                    "top_reasons": [{"reason": r, "count": n} for n, r in reasons[:5]],
                    "started_at": run.started_at.isoformat(),
                    "finished_at": run.finished_at.isoformat() if run.finished_at else None,
                },
            )

    async def _guards(self, plan: Plan) -> GuardTrip | None:
        """The guard the plan trips. A clock that cannot be trusted always stops the run; the
        other guards not when a person approved exactly these ids."""
        policy = self.policy
        clock = self._clock_trip(plan)
        if clock is not None:
            return clock
        if self.approval is not None:
            log.info("guards_lifted", reason=self.approval.describe(), eligible=plan.eligible)
            return None
        asked = time.monotonic()
        history = await self.audit.call(
            self.store.recent_eligible, policy.name, policy.delete.anomaly.history
        )
        self.audit_seconds = time.monotonic() - asked
        return check_guards(policy, plan.eligible, plan.listed, history, self.opts.overrides)

    async def _hold(self, plan: Plan, trip: GuardTrip, run_id: str) -> None:
        """Keep the refused plan for a person to approve or reject (reaper.holds)."""
        try:
            await self.audit.call(HeldStore(self.store).hold, run_id, plan, trip, datetime.now(UTC))
        except AuditError as exc:
            log.error("plan_not_held", error=str(exc))
            self.run.error = f"{self.run.error}; the plan could not be held: {exc}"
            return
        self.run.held = True
        self.run.error = (
            f"{self.run.error}; the plan is held: review it with `reaper held show {run_id}`, "
            f"then `reaper approve {run_id} --by NAME` or `reaper reject {run_id}`"
        )
        log.info("plan_held", eligible=plan.eligible, guard=trip.guard)
        self._notify(
            "plan.held",
            {
                "guard": trip.guard,
                "message": trip.message,
                "eligible": plan.eligible,
                "listed": plan.listed,
                "policy_hash": self.loaded.digest,
            },
        )

    async def _carry_out_approval(self, run_id: str) -> bool:
        """Mark the approval this run carries out as used; False (the run stops) when it was
        withdrawn meanwhile."""
        if self.approval is None or self.run.mode is Mode.DRY_RUN:
            return True
        holds = HeldStore(self.store)
        try:
            await self.audit.call(holds.applied, self.approval.held, run_id, datetime.now(UTC))
        except HoldError as exc:
            self.run.status = RunStatus.ABORTED
            self.run.error = f"the approval was withdrawn before deleting; nothing deleted: {exc}"
            log.error("approval_withdrawn", error=str(exc))
            return False
        return True

    def _restrict(self, plan: Plan) -> Plan:
        approved = self.opts.approved
        if approved is None and self.approval is not None:
            approved = self.approval.saved_plan()
        if approved is None:
            return plan
        # Only what was reviewed, and only if it is still eligible right now.
        self.run.not_eligible = not_eligible_now(approved, plan)
        restricted = plan.restrict(approved.items)
        log.info(
            "saved_plan_checked",
            approved=len(approved.items),
            still_eligible=restricted.eligible,
            not_eligible=len(self.run.not_eligible),
            examples=self.run.not_eligible[:10],
        )
        return restricted

    async def _record_invalid(self, plan: Plan, run_id: str) -> None:
        for start in range(0, len(plan.invalid), _RECORD_CHUNK):
            chunk = plan.invalid[start : start + _RECORD_CHUNK]
            await self.audit.call(
                self.store.record,
                run_id,
                [
                    AuditEntry(
                        c.task_id,
                        c.reason,
                        c.status,
                        c.timestamp,
                        Outcome.SKIPPED_INVALID_ID,
                        "id refused by the target's guard; never sent",
                    )
                    for c in chunk
                ],
            )

    async def _pins(self) -> dict[str, str]:
        """The tasks pinned for this policy now (id -> reason)."""
        pins = PinStore(self.store)
        kind = self.policy.target_class.kind
        return await self.audit.call(pins.active_for, self.policy.name, kind, datetime.now(UTC))

    def _send_check(self, plan: Plan, target: Target, batches: Batches) -> SendCheck:
        policy = self.policy
        assert plan.decide is not None
        request = RecheckRequest(
            listing=_list_request(self.loaded, plan.cutoff),
            eligible_statuses=eligible_statuses(self.loaded),
            status_counts=dict(plan.status_counts),
            listing_started=self.listing_started,
        )
        # Pins taken since the plan stop sends too (reaper.pins).
        return PinnedCheck(
            target,
            request,
            plan.decide,
            policy.target_config.recheck.max_staleness.total_seconds(),
            ids_per_second=policy.delete.rate.per_second * policy.batch_size,
            remaining=batches.remaining,
            pins=self._pins,
        )

    async def _delete(self, plan: Plan, target: Target, run_id: str) -> None:
        run, policy = self.run, self.policy
        # The endpoint's budget may be slower than the policy (shared with others): workers
        # beyond what it allows would only wait.
        rate = min(policy.delete.rate.per_second, target.http.limiter.rate.per_second)
        concurrency = policy.delete.concurrency or auto_concurrency(
            rate, target.http.stats.latency_p90(), self.audit_seconds
        )
        batches = Batches(plan, policy.batch_size)
        check = self._send_check(plan, target, batches)
        if not check.enabled:
            log.info("recheck_not_needed", reason=target.server_refuses_live)
        executor = Executor(
            target,
            self.audit,
            run_id,
            policy.target_class.options_model.model_validate(policy.delete.options),
            batch_size=policy.batch_size,
            concurrency=concurrency,
            continue_on_error=policy.delete.continue_on_error,
            summary=run.summary,
            on_batch=self.opts.on_batch,
            stop=self.opts.stop,
            check=check,
            corrected=self.corrected if target.gone_after_acknowledged_is_ours else frozenset(),
            deadline=self.deadline,
            clock=self.opts.monotonic,
        )
        log.info(
            "deleting",
            eligible=plan.eligible,
            concurrency=concurrency,
            batch_size=policy.batch_size,
            rate=str(policy.delete.rate),
            recheck_max_staleness=policy.target_config.recheck.max_staleness.total_seconds(),
        )
        try:
            await executor.run(plan, batches)
        except TargetAuthError as exc:
            run.status = RunStatus.ABORTED
            run.error = f"the target refused our credentials; stopped: {exc}"
            return
        finally:
            s = run.summary
            run.remaining = plan.eligible - (
                s.deleted + s.already_gone + s.failed + s.unknown + s.skipped_changed
            )
        if check.checks:
            log.info(
                "recheck_summary",
                checks=check.checks,
                requests=check.requests,
                dropped=check.dropped,
            )
        if executor.stopped is not None:
            run.status = RunStatus.ABORTED
            run.error = executor.stopped
        elif self.opts.stop is not None and self.opts.stop.is_set():
            s = run.summary
            done = s.deleted + s.already_gone + s.failed + s.unknown + s.skipped_changed
            if done < plan.eligible:
                run.status = RunStatus.INTERRUPTED
                run.error = (
                    f"stopped by a signal after {done} of {plan.eligible} deletions; "
                    "the rest is left for the next run"
                )
                log.warning("run_interrupted", phase="deleting", done=done, of=plan.eligible)
        elif executor.time_up and run.remaining:
            run.time_up = True
            run.status = RunStatus.PARTIAL
            run.error = (
                f"delete.max_run_time ({self._max_run_time()}) was up after "
                f"{plan.eligible - run.remaining} of {plan.eligible} deletions; "
                f"{run.remaining} left for the next run"
            )
            log.warning(
                "max_run_time_reached",
                done=plan.eligible - run.remaining,
                remaining=run.remaining,
            )


def eligible_statuses(loaded: LoadedPolicy) -> frozenset[str]:
    """The statuses a task may be in and still be deleted by the policy."""
    policy = loaded.policy
    target = policy.target_class
    protected = set(policy.protect.status)
    if not policy.select.allow_live:
        protected |= target.live_statuses
    statuses = set(policy.select.status) - protected
    if target.deletable_statuses is not None:
        statuses &= target.deletable_statuses
    return frozenset(statuses)


#: Run statuses announced as failures.
_FAILED = frozenset({RunStatus.PARTIAL, RunStatus.ABORTED, RunStatus.FAILED, RunStatus.INTERRUPTED})


def _final_status(summary: RunSummary) -> RunStatus:
    if summary.failed or summary.unknown or summary.skipped:
        return RunStatus.PARTIAL
    return RunStatus.SUCCEEDED


async def _record_dry_run(plan: Plan, audit: AsyncAudit, run_id: str, summary: RunSummary) -> None:
    chunk: list[AuditEntry] = []
    for candidate in plan.candidates():
        chunk.append(
            AuditEntry(
                candidate.task_id,
                candidate.reason,
                candidate.status,
                candidate.timestamp,
                Outcome.DRY_RUN,
            )
        )
        if len(chunk) == _RECORD_CHUNK:
            await audit.call(audit.store.record, run_id, chunk)
            summary.dry_run += len(chunk)
            chunk = []
    if chunk:
        await audit.call(audit.store.record, run_id, chunk)
        summary.dry_run += len(chunk)


async def _finish(run: PolicyRun, audit: AsyncAudit) -> None:
    assert run.run_id is not None
    s = run.summary
    log.info(
        "run_finished",
        status=run.status.value,
        listed=s.listed,
        eligible=s.eligible,
        deleted=s.deleted,
        already_gone=s.already_gone,
        failed=s.failed,
        unknown=s.unknown,
        refused_ids=s.skipped,
        skipped_changed=s.skipped_changed,
        acknowledged_not_deleted=s.acknowledged_not_deleted,
        future_timestamps=s.future_timestamps,
        dry_run=s.dry_run,
        reclaimed_bytes=s.reclaimed_bytes,
        error=run.error,
    )
    try:
        await audit.call(audit.store.finish_run, run.run_id, run.status.value, s, run.error)
    except AuditError as exc:
        run.status = RunStatus.FAILED
        run.error = (run.error + "; " if run.error else "") + str(exc)
        log.error("run_not_recorded", error=str(exc))


async def reconcile_policy(
    loaded: LoadedPolicy,
    store: AuditStore,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> ReconcileReport:
    """Resolve the policy's ``pending``/``unknown`` rows against a fresh, complete listing.

    Takes the policy's run lock, so a run in progress is never second-guessed. Raises
    ListingError/TargetError if the listing is incomplete (nothing is resolved then).
    """
    audit = AsyncAudit(store)
    lock = PolicyLock(store.engine, loaded.name)
    try:
        if not await audit.call(lock.acquire):
            raise RunAborted(f"policy {loaded.name!r} is running elsewhere; try again later")
        try:
            settle_after = loaded.policy.target_class.settle_after_for(loaded.policy.target_config)
            reconciler = await audit.call(
                Reconciler.load, store, loaded.name, settle_after=settle_after
            )
            kind = loaded.policy.target_class.kind
            if reconciler:
                target, client = build_target(
                    loaded, transport=transport, state=target_state(loaded, store.engine)
                )
                try:
                    cutoff = datetime.now(UTC) - loaded.policy.select.older_than
                    listing = target.list_tasks(_list_request(loaded, cutoff))
                    async for _ in reconciler.watch(listing):
                        pass
                finally:
                    await client.aclose()
            return await audit.call(
                reconciler.apply,
                store,
                run_record(loaded, kind, Mode.CORRECTION),
                seen_by="the listing of `reaper reconcile`",
            )
        finally:
            await audit.call(lock.release)
    finally:
        audit.close()
