"""Re-checking tasks on the target just before their delete request leaves.

A plan is made from a listing that can be minutes old when a batch goes out, and a task can change
meanwhile: data_pipeline re-executes a finished task (back to ``in_progress``), and its server
deletes whatever ids it is sent. So before a batch is sent, :class:`SendCheck` makes sure each of
its tasks was seen on the target, by a check made *after* the plan, no longer ago than
``target.recheck.max_staleness`` (60 s by default); a task the check saw live, gone or no longer
eligible is dropped, with a final ``skipped_changed`` audit row saying what was seen and when.

The bound holds up to the moment every attempt of the request leaves: the executor sends under a
deadline (:meth:`reaper.http.TargetHttp.deadline`), and an attempt that would leave later is not
sent (:class:`~reaper.http.Stale`); its tasks are checked again first.

Each target checks by the cheapest means its API offers (:meth:`reaper.targets.Target.recheck`).
A check that re-lists every status in which a task is no longer deletable speaks for every task
until it goes stale, so one check serves many batches; a check by id or time window speaks for
the ids it covered, and is asked for the upcoming ids too so that one request serves many. Targets
whose server refuses to delete unfinished tasks need no check (``Target.server_refuses_live``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import structlog

from reaper.errors import TargetError
from reaper.plan import Candidate, Decision
from reaper.targets.base import (
    DeleteResult,
    Outcome,
    Recheck,
    RecheckRequest,
    Target,
    Task,
)

__all__ = ["Cleared", "RecheckTooSlow", "SendCheck", "Upcoming"]

log = structlog.get_logger("reaper.recheck")

#: ``upcoming(n)``: the ids of up to ``n`` candidates due after the ones being checked, with
#: their listed age-field timestamps.
Upcoming = Callable[[int], tuple[list[str], dict[str, datetime]]]

# Seen as present but in none of the statuses the check looked for (a re-listing by status).
_UNCHANGED = object()


class RecheckTooSlow(TargetError):
    """A re-check took longer than the staleness it must guarantee: nothing can be sent."""


@dataclass(frozen=True)
class Cleared:
    """What may be sent now, what was dropped, and until when the check holds."""

    send: list[Candidate]
    dropped: list[DeleteResult]
    #: The latest monotonic instant at which the request for ``send`` may still leave.
    not_after: float | None


@dataclass(frozen=True, slots=True)
class _Seen:
    at: float  # monotonic start of the check that saw it
    when: datetime  # the same instant, for the audit
    task: Task | None  # None: no longer on the target
    fields: bool = True  # the record carries the fields policies match on


class SendCheck:
    """Clears batches for sending; one per run, shared by its workers."""

    def __init__(
        self,
        target: Target,
        request: RecheckRequest,
        decide: Callable[..., Decision | None],
        max_staleness: float,
        *,
        ids_per_second: float,
        remaining: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self.request = request
        self.decide = decide
        self.max_staleness = max_staleness
        #: Check again when a task's check has less than this left: a request must fit in it.
        self.margin = min(max_staleness / 4, 15.0)
        self.ids_per_second = ids_per_second
        self.remaining = remaining
        self.clock = clock
        self.enabled = target.server_refuses_live is None
        self._snapshot: Recheck | None = None
        self._snapshot_seen: _Seen | None = None  # when the snapshot was taken
        self._seen: dict[str, _Seen] = {}
        self._lock = asyncio.Lock()
        #: Checks made, target requests they cost, and tasks dropped.
        self.checks = 0
        self.requests = 0
        self.dropped = 0

    def _fresh_until(self, task_id: str) -> float:
        seen = self._seen.get(task_id)
        if seen is not None:
            return seen.at + self.max_staleness
        if self._snapshot_seen is not None:
            return self._snapshot_seen.at + self.max_staleness
        return -math.inf

    def _stale(self, batch: Sequence[Candidate]) -> list[Candidate]:
        limit = self.clock() + self.margin
        return [c for c in batch if self._fresh_until(c.task_id) < limit]

    async def clear(self, batch: Sequence[Candidate], upcoming: Upcoming) -> Cleared:
        """Check ``batch`` if its tasks' checks are missing or about to go stale, then split it
        into what may be sent (and until when) and what must be dropped.

        Raises TargetError (the target's, or :class:`RecheckTooSlow`) when the check fails: the
        batch is then not sent.
        """
        if not self.enabled:
            return Cleared(list(batch), [], None)
        if self._stale(batch):
            async with self._lock:
                # Another worker may have checked these meanwhile.
                stale = self._stale(batch)
                if stale:
                    await self._check(stale, upcoming)
        send: list[Candidate] = []
        dropped: list[DeleteResult] = []
        not_after = math.inf
        for candidate in batch:
            seen, task = self._observation(candidate.task_id)
            why = self._why_not(task, seen.fields)
            if why is None:
                send.append(candidate)
                not_after = min(not_after, seen.at + self.max_staleness)
            elif task is None:
                # Someone else deleted it since the listing: what already_gone means.
                dropped.append(
                    DeleteResult(
                        candidate.task_id,
                        Outcome.ALREADY_GONE,
                        note=f"not sent: re-checked at {seen.when.isoformat()}: {why}",
                    )
                )
            else:
                dropped.append(
                    DeleteResult(
                        candidate.task_id,
                        Outcome.SKIPPED_CHANGED,
                        note=f"not sent: re-checked at {seen.when.isoformat()}: {why}",
                    )
                )
        self.dropped += len(dropped)
        if dropped:
            log.warning(
                "recheck_dropped",
                dropped=len(dropped),
                examples=[f"{r.task_id}: {r.note}" for r in dropped[:5]],
            )
        return Cleared(send, dropped, not_after if send else None)

    def forget(self, task_ids: Sequence[str]) -> None:
        """The request for these ids has been answered: their observations are spent."""
        for task_id in task_ids:
            self._seen.pop(task_id, None)

    def _observation(self, task_id: str) -> tuple[_Seen, Task | object | None]:
        seen = self._seen.get(task_id)
        if seen is not None:
            return seen, seen.task
        snapshot, taken = self._snapshot, self._snapshot_seen
        assert snapshot is not None and taken is not None  # _check covered every stale id
        return taken, snapshot.seen.get(task_id, _UNCHANGED)

    def _why_not(self, task: Task | object | None, fields: bool) -> str | None:
        """None when the task may still be deleted, else what was seen."""
        if task is _UNCHANGED:
            return None
        if task is None:
            return "no longer on the target"
        assert isinstance(task, Task)
        if task.problem is not None:
            return f"status {task.status}, and {task.problem}"
        decision = self.decide(task, fields=fields)
        if decision is None:
            return None
        return f"status {task.status} ({decision[1]})"

    async def _check(self, stale: list[Candidate], upcoming: Upcoming) -> None:
        ids = [c.task_id for c in stale]
        horizon = max(
            len(ids),
            min(
                self.remaining(),
                math.ceil(self.ids_per_second * (self.max_staleness - self.margin)),
            ),
        )
        # The batches due next start with the stale ones (or just after them).
        more, stamps = upcoming(horizon)
        stamps.update((c.task_id, c.timestamp) for c in stale)
        request = replace(self.request, horizon=horizon, timestamps=stamps)
        requests_before = self.target.http.stats.requests
        started, when = self.clock(), datetime.now(UTC)
        result = await self.target.recheck(ids, more, request)
        took = self.clock() - started
        self.checks += 1
        self.requests += self.target.http.stats.requests - requests_before
        if took > self.max_staleness - self.margin:
            raise RecheckTooSlow(
                f"re-checking {len(ids)} task(s) took {took:.0f} s ({result.means}): longer "
                f"than target.recheck.max_staleness allows for sending afterwards; raise it"
            )
        seen = _Seen(started, when, None, result.fields)
        if result.covered is None:
            self._snapshot, self._snapshot_seen = result, seen
            # Older per-id observations are superseded by the snapshot.
            self._seen.clear()
        else:
            for task_id in result.covered:
                self._seen[task_id] = replace(seen, task=result.seen.get(task_id))
            for task_id in ids:
                if task_id not in result.covered:
                    # The target did not speak for it: treat it as not found, never as fine.
                    self._seen[task_id] = seen
        log.info(
            "rechecked",
            ids=len(ids),
            upcoming=len(more),
            means=result.means,
            requests=self.target.http.stats.requests - requests_before,
            seconds=round(took, 3),
        )
