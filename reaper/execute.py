"""Executing a plan: batched delete requests, bounded concurrency, write-ahead audit rows.

Workers take the plan's batches in order (oldest tasks first). For each batch a worker

1. hands every id to the group commit as ``pending`` and waits until it is durable; if that
   fails, nothing is sent and the run stops: *no audit, no delete*. A worker hands in its next
   batch's intents while its current request is in flight, so the wait is usually over before it
   starts; if the run stops in between, that batch is recorded ``not_deleted`` ("never sent");
2. clears the batch with the send-time re-check (:mod:`reaper.recheck`): tasks the target now
   reports live, gone or no longer eligible are dropped (``skipped_changed``), and the rest may
   be sent until the check goes stale;
3. sends the delete through the target, under that deadline; it waits for the shared rate limiter
   and retries 429/5xx/timeouts/connection errors as configured. Ids whose request could not
   leave in time are checked again and re-sent;
4. hands each id's outcome from the answer (``deleted``, ``already_gone``, ``failed``, or
   ``unknown`` when the server may have acted but its answer was lost or was a 5xx) to the
   group commit, which writes it with the next group (:mod:`reaper.groupcommit`). The run ends
   only after the last outcome is durable.

Only ids taken from the plan are ever sent. With ``continue_on_error: false`` no new batch starts
after the first failure; batches already in flight finish and are recorded. Nor does one start
after the ``deadline`` (``delete.max_run_time``) or once the caller's ``stop`` event is set (a
signal); an executor that halts on its own (failure, refused credentials, the audit) stops only
itself, never the policies running beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, ParamSpec, TypeVar

import structlog
from sqlalchemy import Engine

from reaper.audit import AuditEntry, AuditStore, RunSummary
from reaper.errors import AuditError, TargetAuthError, TargetError
from reaper.groupcommit import GroupCommit
from reaper.http import Stale
from reaper.plan import Candidate, Plan
from reaper.recheck import RecheckTooSlow, SendCheck
from reaper.targets.base import (
    BatchResult,
    DeleteOptions,
    DeleteResult,
    Outcome,
    Target,
    result_of_error,
)

__all__ = ["AsyncAudit", "BatchEvent", "Batches", "Executor", "auto_concurrency"]

log = structlog.get_logger("reaper.execute")

P = ParamSpec("P")
T = TypeVar("T")

_MAX_AUTO_CONCURRENCY = 64

#: Crash tests kill the process at a named point (``REAPER_FAILPOINT=after_intent``). Off unless
#: that variable is set; read once at import.
_FAILPOINT = os.environ.get("REAPER_FAILPOINT")


def failpoint(name: str) -> None:
    """Die here, as SIGKILL would, when the crash tests ask for this point."""
    if _FAILPOINT == name:
        os.kill(os.getpid(), signal.SIGKILL)


#: The shortest request cycle a worker is sized for. Besides its request, a worker waits for its
#: next batch's intents to be committed, and under load a group commit takes some tens of
#: milliseconds (fsync, and the rows of every batch it carries: ~50 ms for 16 batches of 50 on
#: PostgreSQL). Sized by a 1 ms request alone, a policy's rate is not reached.
_MIN_CYCLE_SECONDS = 0.1


def auto_concurrency(
    rate_per_second: float, latency_seconds: float | None, audit_seconds: float = 0.0
) -> int:
    """Workers needed to keep ``rate`` requests per second in flight at the given latency.

    ``audit_seconds`` is how long an audit call takes to come back: a worker's next intents
    commit while its request is in flight, so its cycle is at least that long too. Alone it
    is a few milliseconds; among a fleet's runs sharing SQLite's one writer it can be most of a
    second, and a policy alone at its endpoint would not reach the endpoint's rate.
    """
    latency = latency_seconds if latency_seconds is not None else 0.25
    cycle = max(latency, audit_seconds, _MIN_CYCLE_SECONDS)
    # Little's law, with headroom for latency variance.
    needed = math.ceil(rate_per_second * cycle * 1.5) + 1
    return max(1, min(_MAX_AUTO_CONCURRENCY, needed))


class AsyncAudit:
    """Runs AuditStore calls on one dedicated thread, so the event loop never blocks on I/O.

    One thread also serialises a run's writes, which SQLite needs and PostgreSQL does not mind.
    On SQLite every run in the process shares one thread: SQLite takes one writer at a time,
    and writers on threads of their own wait for its lock in sleeps that grow to 100 ms (its busy
    handler) rather than in turn, so with many runs at once (``reaper run`` over a fleet) commits
    queued for seconds. On PostgreSQL each run keeps a thread of its own.
    """

    #: The shared thread of each SQLite engine, and how many AsyncAudits use it.
    _shared: ClassVar[dict[Engine, tuple[ThreadPoolExecutor, int]]] = {}
    _shared_lock = threading.Lock()

    def __init__(self, store: AuditStore) -> None:
        self.store = store
        self._closed = False
        engine = store.engine
        self._engine = engine if engine.dialect.name == "sqlite" else None
        if self._engine is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reaper-audit")
            return
        with self._shared_lock:
            pool, users = self._shared.get(engine, (None, 0))
            if pool is None:
                pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reaper-audit")
            self._shared[engine] = (pool, users + 1)
        self._pool = pool

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        # In the caller's context, as asyncio.to_thread does: a line logged there keeps the
        # run's run_id and policy (structlog's contextvars).
        context = contextvars.copy_context()
        return await loop.run_in_executor(self._pool, lambda: context.run(fn, *args, **kwargs))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._engine is not None:
            with self._shared_lock:
                pool, users = self._shared[self._engine]
                if users > 1:
                    self._shared[self._engine] = (pool, users - 1)
                    return
                del self._shared[self._engine]
        self._pool.shutdown(wait=True)


@dataclass(frozen=True)
class BatchEvent:
    """Reported after each batch, for progress bars and per-batch log lines."""

    batch_no: int
    size: int
    results: Sequence[DeleteResult]
    summary: RunSummary
    total: int


class Batches:
    """A plan's candidates in delete requests of at most ``size`` ids, taken in order by the
    workers; the re-check may look at the ones not taken yet."""

    def __init__(self, plan: Plan, size: int) -> None:
        self.plan = plan
        self.size = size
        self.position = 0  # index of the first candidate not taken yet
        # Batches taken but not yet sent (a worker's prefetched one): first id -> index.
        self._open: dict[str, int] = {}

    def take(self) -> list[Candidate] | None:
        start = self.position
        if start >= len(self.plan):
            return None
        stop = min(start + self.size, len(self.plan))
        self.position = stop
        batch = [self.plan.candidate(index) for index in range(start, stop)]
        self._open[batch[0].task_id] = start
        return batch

    def done(self, batch: Sequence[Candidate]) -> None:
        """``batch`` has been sent or dropped: it is no longer upcoming."""
        self._open.pop(batch[0].task_id, None)

    def upcoming(self, count: int) -> tuple[list[str], dict[str, datetime]]:
        """The ids (and listed timestamps) of up to ``count`` candidates due next: those of
        batches taken but not sent yet, then those not taken."""
        start = min(self._open.values(), default=self.position)
        stop = min(start + count, len(self.plan))
        ids, stamps = [], {}
        for index in range(start, stop):
            task_id, stamp = self.plan.id_and_timestamp(index)
            ids.append(task_id)
            stamps[task_id] = stamp
        return ids, stamps

    def remaining(self) -> int:
        """Candidates not sent yet (taken or not)."""
        return len(self.plan) - min(self._open.values(), default=self.position)


#: How often a batch whose check went stale before it could leave is checked and sent again.
_MAX_RESENDS = 3


class Executor:
    """Delete a plan's candidates, recording each one in the audit before and after."""

    def __init__(
        self,
        target: Target,
        audit: AsyncAudit,
        run_id: str,
        options: DeleteOptions,
        *,
        batch_size: int,
        concurrency: int,
        continue_on_error: bool,
        summary: RunSummary,
        on_batch: Callable[[BatchEvent], None] | None = None,
        stop: asyncio.Event | None = None,
        check: SendCheck | None = None,
        corrected: Collection[str] = frozenset(),
        deadline: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self.check = check
        #: Tasks whose earlier deletion, which may have been carried out (acknowledged, or
        #: answered 5xx), a listing contradicted.
        self.corrected = corrected
        self.audit = audit
        self.run_id = run_id
        self.options = options
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.continue_on_error = continue_on_error
        self.summary = summary
        self.on_batch = on_batch
        #: The caller's stop (a signal): read, never set here.
        self.signal = stop
        #: This executor's own halt.
        self.halted = asyncio.Event()
        #: No batch starts at or after this monotonic instant (``delete.max_run_time``).
        self.deadline = deadline
        self.clock = clock
        #: Batches were left unsent because the deadline had passed.
        self.time_up = False
        #: Why the executor stopped early (None when it went through the whole plan).
        self.stopped: str | None = None
        self.fatal: BaseException | None = None
        self._batch_no = 0
        self.journal = GroupCommit(self._write, on_failure=self._audit_failed)

    async def _write(self, entries: list[AuditEntry], results: list[DeleteResult]) -> None:
        await self.audit.call(self.audit.store.write, self.run_id, entries, results)

    def _audit_failed(self, exc: AuditError) -> None:
        # No audit, no delete: no other batch starts.
        self.fatal = self.fatal or exc
        self._halt(f"audit write failed: {exc}")

    async def run(self, plan: Plan, batches: Batches | None = None) -> RunSummary:
        """Delete everything in ``plan``; raise AuditError/TargetAuthError if the run must stop."""
        batches = batches or Batches(plan, self.batch_size)
        workers = min(self.concurrency, max(1, math.ceil(len(plan) / self.batch_size)))
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(workers):
                    group.create_task(self._worker(batches, len(plan)))
        finally:
            # The outcomes of every answered request, even if a worker failed.
            with contextlib.suppress(AuditError):  # _audit_failed has recorded it
                await self.journal.flush()
            log.debug("group_commit", **_stats(self.journal))
        if self.fatal is not None:
            raise self.fatal
        return self.summary

    def _halt(self, reason: str) -> None:
        if self.stopped is None:
            self.stopped = reason
        self.halted.set()

    def _stopping(self) -> bool:
        """No batch may start: halted, the caller said stop, or the time is up."""
        if self.halted.is_set() or (self.signal is not None and self.signal.is_set()):
            return True
        if self.deadline is not None and self.clock() >= self.deadline:
            self.time_up = True
            return True
        return False

    async def _worker(self, batches: Batches, total: int) -> None:
        """Send batches one after another, each batch's intents written while the one before
        it is in flight: the write-ahead costs the worker no wait unless the audit falls behind.
        """
        current = self._prepare(batches)
        while current is not None:
            batch_no, batch, durable = current
            try:
                await durable
            except AuditError:
                return  # not sent; _audit_failed has stopped the others
            if self._stopping():
                batches.done(batch)
                self._never_sent(batch)
                return
            following = self._prepare(batches)
            try:
                await self._one_batch(batch_no, batch, total, batches)
            finally:
                batches.done(batch)
            current = following

    def _prepare(self, batches: Batches) -> tuple[int, list[Candidate], asyncio.Task[None]] | None:
        """Take the next batch and hand its ``pending`` intents to the group commit."""
        if self._stopping():
            return None
        batch = batches.take()
        if batch is None:
            return None
        self._batch_no += 1
        intents = [
            AuditEntry(
                c.task_id, c.reason, c.status, c.timestamp, Outcome.PENDING, snapshot=c.snapshot
            )
            for c in batch
        ]
        return self._batch_no, batch, asyncio.ensure_future(self.journal.intend(intents))

    def _never_sent(self, batch: list[Candidate]) -> None:
        """The run stopped after this batch's intents were written: it was never sent."""
        note = f"never sent: the run stopped first ({self._why()})"
        self.journal.settle(
            [DeleteResult(c.task_id, Outcome.NOT_DELETED, note=note) for c in batch]
        )

    async def _one_batch(
        self, batch_no: int, batch: list[Candidate], total: int, batches: Batches
    ) -> None:
        failpoint("after_intent")
        results = await self._deliver(batch, batches)
        failpoint("after_response")
        # Counted before the outcome write: the deletions happened whether or not it succeeds.
        for result in results:
            self.summary.count(result)
        self.journal.settle(results)
        failed = [r for r in results if r.outcome in (Outcome.FAILED, Outcome.UNKNOWN)]
        event = BatchEvent(batch_no, len(batch), results, self.summary, total)
        if self.on_batch is not None:
            self.on_batch(event)
        if failed and not self.continue_on_error:
            self._halt(
                f"stop-on-error: {len(failed)} deletion(s) failed in batch {batch_no} "
                f"(first: {failed[0].task_id}: {failed[0].error_message or failed[0].outcome})"
            )

    async def _deliver(self, batch: list[Candidate], batches: Batches) -> list[DeleteResult]:
        """Clear the batch with the re-check, send it, and re-check and re-send whatever could
        not leave before its check went stale; one result per candidate."""
        results: list[DeleteResult] = []
        pending = batch
        for _ in range(_MAX_RESENDS + 1):
            not_after: float | None = None
            if self.check is not None:
                try:
                    cleared = await self.check.clear(pending, batches.upcoming)
                except TargetAuthError as exc:
                    self.fatal = self.fatal or exc
                    self._halt(str(exc))
                    return results + self._unsent(pending, f"the re-check was refused: {exc}")
                except TargetError as exc:
                    log.error("recheck_failed", error=str(exc), ids=len(pending))
                    if isinstance(exc, RecheckTooSlow):
                        # Every further check would take as long: stop starting batches.
                        self._halt(str(exc))
                    return results + [
                        DeleteResult(
                            c.task_id,
                            Outcome.FAILED,
                            exc.http_status,
                            exc.error_code,
                            f"not sent: the re-check before sending failed: {exc}",
                        )
                        for c in pending
                    ]
                results.extend(cleared.dropped)
                pending, not_after = cleared.send, cleared.not_after
            if not pending:
                return results
            ids = [c.task_id for c in pending]
            answered, unsent = await self._send(ids, not_after)
            results.extend(answered)
            if self.check is not None:
                self.check.forget(ids)
            if not unsent:
                return results
            if self._stopping():
                return results + self._unsent(
                    [c for c in pending if c.task_id in set(unsent)], self._why()
                )
            again = set(unsent)
            pending = [c for c in pending if c.task_id in again]
            log.info("recheck_expired_before_send", ids=len(pending))
        return results + [
            DeleteResult(
                c.task_id,
                Outcome.FAILED,
                error_message=(
                    f"not sent: {_MAX_RESENDS + 1} re-checks went stale before the request "
                    "could leave (rate limit too low for target.recheck.max_staleness?)"
                ),
            )
            for c in pending
        ]

    def _why(self) -> str:
        if self.stopped is not None:
            return self.stopped
        return "delete.max_run_time was up" if self.time_up else "stop requested"

    def _unsent(self, batch: Sequence[Candidate], why: str) -> list[DeleteResult]:
        note = f"never sent: the run stopped first ({why})"
        return [DeleteResult(c.task_id, Outcome.NOT_DELETED, note=note) for c in batch]

    async def _send(
        self, ids: list[str], not_after: float | None
    ) -> tuple[list[DeleteResult], tuple[str, ...]]:
        """Send ``ids``; their results, and the ids that were not sent (check gone stale)."""
        try:
            with self.target.http.deadline(not_after):
                answer = await self.target.delete(ids, self.options)
        except TargetAuthError as exc:
            # Credentials are wrong: every further request would fail the same way.
            self.fatal = self.fatal or exc
            self._halt(str(exc))
            return [result_of_error(task_id, exc) for task_id in ids], ()
        except Stale as exc:
            if not exc.earlier:
                return [], tuple(ids)
            return [result_of_error(task_id, exc) for task_id in ids], ()
        except TargetError as exc:
            return [result_of_error(task_id, exc) for task_id in ids], ()
        if answer.stop is not None:
            self.fatal = self.fatal or answer.stop
            self._halt(str(answer.stop))
            sent = [task_id for task_id in ids if task_id not in set(answer.unsent)]
            never = [
                DeleteResult(
                    task_id,
                    Outcome.NOT_DELETED,
                    note=f"never sent: the run stopped first ({answer.stop})",
                )
                for task_id in answer.unsent
            ]
            return _settle(sent, answer, self.corrected) + never, ()
        unsent = set(answer.unsent)
        sent = [task_id for task_id in ids if task_id not in unsent]
        return _settle(sent, answer, self.corrected), answer.unsent


def _stats(journal: GroupCommit) -> dict[str, object]:
    stats = journal.stats
    return {
        "commits": stats.commits,
        "intents": stats.intents,
        "outcomes": stats.outcomes,
        "batches_per_commit": round(stats.batches / max(1, stats.commits), 1),
        "intent_wait_s": round(stats.intent_wait, 3),
        "flush_wait_s": round(stats.flush_wait, 3),
    }


def _settle(
    ids: Sequence[str], answer: BatchResult, corrected: Collection[str] = frozenset()
) -> list[DeleteResult]:
    """One result per sent id; an 'already gone' after an attempt that may have been carried out
    (answer lost, or 5xx) was our own deletion, and so is one for a task whose earlier deletion
    (acknowledged, or answered 5xx) had been contradicted by a listing (the earlier request did
    its work after all, only the target's record of it was missing)."""
    by_id = {result.task_id: result for result in answer.results}
    results = []
    for task_id in ids:
        result = by_id.get(task_id) or DeleteResult(
            task_id, Outcome.UNKNOWN, error_message="no outcome reported for this id"
        )
        if result.outcome is Outcome.ALREADY_GONE and task_id in corrected:
            result = DeleteResult(
                task_id,
                Outcome.DELETED,
                result.http_status,
                note="deleted: the target found nothing left to delete, so an earlier request "
                "of ours, which a listing had contradicted (see this task's earlier rows), had "
                "removed the data; the target's record of the task is now updated",
            )
        elif result.outcome is Outcome.ALREADY_GONE and answer.earlier:
            # The task was listed as present; an earlier attempt of this same request may have
            # been carried out. The deletion is ours: record it as such, and say why.
            result = DeleteResult(
                task_id,
                Outcome.DELETED,
                result.http_status,
                note=f"deleted: confirmed after an earlier attempt ({', '.join(answer.earlier)})"
                "; this attempt found it gone",
            )
        results.append(result)
    return results
