"""Group commit: one audit transaction for the intents and outcomes of many batches.

Every delete request needs its ids durable as ``pending`` before it leaves, and each answer needs
its outcomes written. Done per batch, that is two commits per request, and against a fast target
the commits *are* the run. :class:`GroupCommit` collects what all workers hand in and writes it
on the audit thread, one transaction per group:

* :meth:`GroupCommit.intend` queues a batch's intents and returns once they are durable; a worker
  sends its request only then (*no audit, no delete*);
* :meth:`GroupCommit.settle` queues a batch's outcomes and returns at once: the intents already
  cover those ids, and if the process dies before the outcomes land, reconciliation resolves the
  ``pending`` rows against the target;
* while one group is being written, the next one fills up; with N workers a commit carries up
  to N batches.

A failed write fails every intent waiting in its group and every later one, so no further request
is sent; the outcomes it carried stay ``pending`` in the database for reconciliation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from reaper.audit import AuditEntry
from reaper.errors import AuditError
from reaper.targets.base import DeleteResult

__all__ = ["GroupCommit", "GroupStats"]

#: Intents per transaction at most (outcomes are always all taken).
MAX_GROUP_ROWS = 20_000


@dataclass
class GroupStats:
    """How the writes were grouped, for logs and the benchmarks."""

    commits: int = 0
    intents: int = 0
    outcomes: int = 0
    #: Seconds workers spent waiting for their intents to become durable (summed over workers).
    intent_wait: float = 0.0
    #: Seconds the run waited at the end for the last outcomes.
    flush_wait: float = 0.0
    #: Batches whose intents the commits carried.
    batches: int = 0


class GroupCommit:
    """Collects one run's audit writes from all workers and commits them in groups."""

    def __init__(
        self,
        write: Callable[[list[AuditEntry], list[DeleteResult]], Awaitable[None]],
        *,
        max_rows: int = MAX_GROUP_ROWS,
        on_failure: Callable[[AuditError], None] | None = None,
    ) -> None:
        """``write(entries, results)`` makes one group durable in one transaction (on the audit
        thread) or raises."""
        self._write = write
        self._max_rows = max_rows
        self._on_failure = on_failure
        self._intents: list[tuple[Sequence[AuditEntry], asyncio.Future[None]]] = []
        self._outcomes: list[DeleteResult] = []
        self._writer: asyncio.Task[None] | None = None
        self.failure: AuditError | None = None
        self.stats = GroupStats()

    async def intend(self, entries: Sequence[AuditEntry]) -> None:
        """Return when ``entries`` are durable; raise AuditError if they cannot be written."""
        if self.failure is not None:
            raise self.failure
        loop = asyncio.get_running_loop()
        durable: asyncio.Future[None] = loop.create_future()
        self._intents.append((entries, durable))
        self._start()
        began = loop.time()
        try:
            await durable
        finally:
            self.stats.intent_wait += loop.time() - began

    def settle(self, results: Sequence[DeleteResult]) -> None:
        """Queue outcomes for the next group; :meth:`flush` waits for them."""
        if self.failure is not None or not results:
            return  # they stay pending in the database; the run is failing already
        self._outcomes.extend(results)
        self._start()

    async def flush(self) -> None:
        """Wait until everything queued is written; raise the AuditError if a write failed."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
        self.stats.flush_wait += loop.time() - began
        if self.failure is not None:
            raise self.failure

    def _start(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(
                self._drain(), name="reaper-group-commit"
            )

    async def _drain(self) -> None:
        while (self._intents or self._outcomes) and self.failure is None:
            taken, rows = 0, 0
            while taken < len(self._intents) and rows < self._max_rows:
                rows += len(self._intents[taken][0])
                taken += 1
            group, self._intents = self._intents[:taken], self._intents[taken:]
            outcomes, self._outcomes = self._outcomes, []
            entries = [entry for batch, _ in group for entry in batch]
            try:
                await self._write(entries, outcomes)
            except Exception as exc:  # any failure to write fails closed
                self._fail(group, exc)
                return
            self.stats.commits += 1
            self.stats.intents += len(entries)
            self.stats.outcomes += len(outcomes)
            self.stats.batches += len(group)
            for _, durable in group:
                if not durable.done():
                    durable.set_result(None)

    def _fail(
        self, group: list[tuple[Sequence[AuditEntry], asyncio.Future[None]]], exc: Exception
    ) -> None:
        failure = exc if isinstance(exc, AuditError) else AuditError(f"audit write failed: {exc!r}")
        self.failure = failure
        waiting, self._intents, self._outcomes = group + self._intents, [], []
        for _, durable in waiting:
            if not durable.done():
                durable.set_exception(failure)
        if self._on_failure is not None:
            self._on_failure(failure)
