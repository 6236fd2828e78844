"""Executing a plan: batched delete requests, bounded concurrency, write-ahead audit rows.

Workers take the plan's batches in order (oldest tasks first). For each batch a worker

1. hands every id to the group commit as ``pending`` and waits until it is durable; if that
   fails, nothing is sent and the run stops: *no audit, no delete*. A worker hands in its next
   batch's intents while its current request is in flight, so the wait is usually over before it
   starts; if the run stops in between, that batch is recorded ``not_deleted`` ("never sent");
2. sends one delete request through the target, which waits for the shared rate limiter and
   retries 429/5xx/timeouts/connection errors as configured;
3. hands each id's outcome from the answer (``deleted``, ``already_gone``, ``failed``, or
   ``unknown`` when the request may have reached the server but its answer was lost) to the
   group commit, which writes it with the next group (:mod:`reaper.groupcommit`). The run ends
   only after the last outcome is durable.

Only ids taken from the plan are ever sent. With ``continue_on_error: false`` no new batch starts
after the first failure; batches already in flight finish and are recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import structlog

from reaper.audit import AuditEntry, AuditStore, RunSummary
from reaper.errors import AuditError, TargetAuthError, TargetError
from reaper.groupcommit import GroupCommit
from reaper.http import RequestFailed, ResponseTooLarge
from reaper.plan import Candidate, Plan
from reaper.targets.base import BatchResult, DeleteOptions, DeleteResult, Outcome, Target

__all__ = ["AsyncAudit", "BatchEvent", "Executor", "auto_concurrency"]

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


def auto_concurrency(rate_per_second: float, latency_seconds: float | None) -> int:
    """Workers needed to keep ``rate`` requests per second in flight at the given latency."""
    latency = latency_seconds if latency_seconds is not None else 0.25
    cycle = max(latency, _MIN_CYCLE_SECONDS)
    # Little's law, with headroom for latency variance.
    needed = math.ceil(rate_per_second * cycle * 1.5) + 1
    return max(1, min(_MAX_AUTO_CONCURRENCY, needed))


class AsyncAudit:
    """Runs AuditStore calls on one dedicated thread, so the event loop never blocks on I/O.

    One thread also serialises writes, which SQLite needs and PostgreSQL does not mind.
    """

    def __init__(self, store: AuditStore) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reaper-audit")

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclass(frozen=True)
class BatchEvent:
    """Reported after each batch, for progress bars and per-batch log lines."""

    batch_no: int
    size: int
    results: Sequence[DeleteResult]
    summary: RunSummary
    total: int


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
    ) -> None:
        self.target = target
        self.audit = audit
        self.run_id = run_id
        self.options = options
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.continue_on_error = continue_on_error
        self.summary = summary
        self.on_batch = on_batch
        self.stop = stop or asyncio.Event()
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

    async def run(self, plan: Plan) -> RunSummary:
        """Delete everything in ``plan``; raise AuditError/TargetAuthError if the run must stop."""
        batches = plan.batches(self.batch_size)
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
        self.stop.set()

    async def _worker(self, batches: Iterator[list[Candidate]], total: int) -> None:
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
            if self.stop.is_set():
                self._never_sent(batch)
                return
            following = self._prepare(batches)
            await self._one_batch(batch_no, batch, total)
            current = following

    def _prepare(
        self, batches: Iterator[list[Candidate]]
    ) -> tuple[int, list[Candidate], asyncio.Task[None]] | None:
        """Take the next batch and hand its ``pending`` intents to the group commit."""
        if self.stop.is_set():
            return None
        batch = next(batches, None)
        if batch is None:
            return None
        self._batch_no += 1
        intents = [
            AuditEntry(c.task_id, c.reason, c.status, c.timestamp, Outcome.PENDING) for c in batch
        ]
        return self._batch_no, batch, asyncio.ensure_future(self.journal.intend(intents))

    def _never_sent(self, batch: list[Candidate]) -> None:
        """The run stopped after this batch's intents were written: it was never sent."""
        note = f"never sent: the run stopped first ({self.stopped or 'stop requested'})"
        self.journal.settle(
            [DeleteResult(c.task_id, Outcome.NOT_DELETED, note=note) for c in batch]
        )

    async def _one_batch(self, batch_no: int, batch: list[Candidate], total: int) -> None:
        ids = [candidate.task_id for candidate in batch]
        failpoint("after_intent")
        results = await self._send(ids)
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

    async def _send(self, ids: list[str]) -> list[DeleteResult]:
        try:
            answer = await self.target.delete(ids, self.options)
        except TargetAuthError as exc:
            # Credentials are wrong: every further request would fail the same way.
            self.fatal = self.fatal or exc
            self._halt(str(exc))
            return _all(ids, Outcome.FAILED, exc)
        except RequestFailed as exc:
            return _all(ids, Outcome.UNKNOWN if exc.maybe_sent else Outcome.FAILED, exc)
        except ResponseTooLarge as exc:
            return _all(ids, Outcome.UNKNOWN, exc)
        except TargetError as exc:
            # A 2xx answer we cannot read may still mean the server acted.
            acted = exc.http_status is None or 200 <= exc.http_status < 300
            return _all(ids, Outcome.UNKNOWN if acted else Outcome.FAILED, exc)
        return _settle(ids, answer)


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


def _all(ids: Sequence[str], outcome: Outcome, exc: TargetError) -> list[DeleteResult]:
    message = exc.error_message or str(exc)
    return [
        DeleteResult(task_id, outcome, exc.http_status, exc.error_code, message) for task_id in ids
    ]


def _settle(ids: Sequence[str], answer: BatchResult) -> list[DeleteResult]:
    """One result per sent id; an 'already gone' after a lost attempt was our own deletion."""
    by_id = {result.task_id: result for result in answer.results}
    results = []
    for task_id in ids:
        result = by_id.get(task_id) or DeleteResult(
            task_id, Outcome.UNKNOWN, error_message="no outcome reported for this id"
        )
        if result.outcome is Outcome.ALREADY_GONE and answer.lost_attempts:
            # The task was listed as present; an earlier attempt of this same request may have
            # reached the server. The deletion is ours: record it as such, and say why.
            result = DeleteResult(
                task_id,
                Outcome.DELETED,
                result.http_status,
                note="deleted by an earlier attempt of this request whose answer was lost",
            )
        results.append(result)
    return results
