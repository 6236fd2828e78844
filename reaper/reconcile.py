"""Reconciliation: make the audit match reality after a crash, a kill, a lost answer or a
deletion the target acknowledged but did not carry out.

A row left ``pending`` (the process died between recording the intent and recording the answer)
or ``unknown`` (the answer was lost) says nothing true yet. Reconciliation looks the task up on
the target: if it is gone, the deletion happened (``deleted``, noted as confirmed by
reconciliation); if it is still there, it did not (``not_deleted``).

A ``deleted`` row is what the target acknowledged, and an acknowledgement is not proof: the real
data_pipeline server reports an id as deleted even when its own database update failed. So the
first complete listing after a deletion also looks for the task: if it is still listed present,
a correction is recorded: a ``not_deleted`` row in a run of mode ``correction`` that names the
run and time of the acknowledgement (the ``deleted`` row itself is never edited, and the task is
eligible again). Each listing checks the policy's deletions acknowledged since the last check.

It runs at the start of every run, on the same listing the run plans from, and on its own as
``reaper reconcile``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import structlog

from reaper.audit import Acknowledged, AuditRow, AuditStore, Correction, RunRecord
from reaper.targets.base import STILL_RUNNING_NOTE, DeleteResult, Outcome, Task

__all__ = ["ReconcileReport", "Reconciler"]

log = structlog.get_logger("reaper.reconcile")

GONE_NOTE = "confirmed by reconciliation: the task is gone from the target"
PRESENT_NOTE = "reconciliation: the task is still on the target"


@dataclass
class ReconcileReport:
    """What one reconciliation resolved."""

    policy: str
    deleted: int = 0
    not_deleted: int = 0
    interrupted_runs: int = 0
    runs: set[str] = field(default_factory=set)
    #: Acknowledged deletions the listing contradicted, and the run holding their corrections.
    acknowledged_not_deleted: int = 0
    correction_run: str | None = None
    #: The ids corrected (eligible again).
    corrected: set[str] = field(default_factory=set)

    @property
    def resolved(self) -> int:
        return self.deleted + self.not_deleted


class Reconciler:
    """Watches a complete listing for the tasks of unresolved rows and of acknowledged
    deletions not yet checked, then resolves and corrects them."""

    def __init__(
        self,
        policy: str,
        rows: list[AuditRow],
        acknowledged: Sequence[Acknowledged] = (),
        *,
        settle_after: timedelta | None = None,
        now: datetime | None = None,
    ) -> None:
        self.policy = policy
        self.rows = rows
        self._wanted = {row.task_id for row in rows}
        #: Tasks whose delete request may still be running on the target (its requests outlive
        #: their timeouts, and the row is younger than ``settle_after``), with the reason the
        #: plan gives for not sending them again. Settled from a listing only once gone.
        self.held: dict[str, str] = {}
        if settle_after is not None:
            now = now or datetime.now(UTC)
            for row in rows:
                if not (row.note or "").startswith(STILL_RUNNING_NOTE):
                    continue  # its request is over (answered, or never sent)
                when = row.decided_at or row.recorded_at
                if when + settle_after > now:
                    self.held[row.task_id] = (
                        f"protected: a delete request of run {row.run_id} at {when.isoformat()} "
                        f"may still be running; not sent again before "
                        f"{(when + settle_after).isoformat()} (target.settle_after)"
                    )
        self._present: set[str] = set()
        # The newest acknowledgement per task (a task deleted twice: the later one counts).
        self._acknowledged: dict[str, Acknowledged] = {ack.task_id: ack for ack in acknowledged}
        self._through = max((ack.row_id for ack in acknowledged), default=None)
        self._contradicted: dict[str, Task] = {}
        self._seen_at: datetime | None = None

    @classmethod
    def load(
        cls,
        store: AuditStore,
        policy: str,
        exclude_run: str | None = None,
        *,
        settle_after: timedelta | None = None,
    ) -> Reconciler:
        return cls(
            policy,
            store.unresolved(policy, exclude_run=exclude_run),
            store.acknowledged(policy, exclude_run=exclude_run),
            settle_after=settle_after,
        )

    def __bool__(self) -> bool:
        return bool(self.rows) or bool(self._acknowledged)

    def observe(self, task: Task) -> None:
        """Note a listed task; one that is listed but already deleted counts as gone."""
        if task.gone:
            return
        if task.id in self._wanted:
            self._present.add(task.id)
        if task.id in self._acknowledged:
            self._contradicted[task.id] = task

    async def watch(self, tasks: AsyncIterator[Task]) -> AsyncIterator[Task]:
        """Pass a listing through, observing each task."""
        self._seen_at = datetime.now(UTC)
        async for task in tasks:
            self.observe(task)
            yield task

    def results(self) -> dict[str, list[DeleteResult]]:
        """Per run, the outcome of each unresolved row. Call only after a complete listing."""
        by_run: dict[str, list[DeleteResult]] = defaultdict(list)
        for row in self.rows:
            outcome, note = Outcome.DELETED, GONE_NOTE
            if row.task_id in self._present:
                if row.task_id in self.held:
                    continue  # its request may still be at work: settle it later
                outcome, note = Outcome.NOT_DELETED, PRESENT_NOTE
            # An unknown row keeps what its request was answered (a 504, a lost answer): the
            # request may have been carried out, and a later deletion relies on knowing it.
            by_run[row.run_id].append(
                DeleteResult(
                    row.task_id,
                    outcome,
                    row.http_status,
                    row.error_code,
                    row.error_message,
                    note=note,
                )
                if row.outcome == Outcome.UNKNOWN.value
                else DeleteResult(row.task_id, outcome, note=note)
            )
        return by_run

    def corrections(self, seen_by: str) -> list[Correction]:
        """Acknowledged deletions the listing contradicted. Call only after a complete listing."""
        seen_at = self._seen_at or datetime.now(UTC)
        return [
            Correction(self._acknowledged[task_id], task.status, task.timestamp, seen_at, seen_by)
            for task_id, task in self._contradicted.items()
        ]

    def apply(
        self,
        store: AuditStore,
        record: RunRecord,
        exclude_run: str | None = None,
        *,
        seen_by: str = "a reconciliation listing",
    ) -> ReconcileReport:
        """Write the outcomes (one transaction per earlier run), record the corrections (as a
        run of their own, built from ``record``), note how far acknowledged deletions have been
        checked (on ``exclude_run``, the current run, else on the correction run), and mark
        dead runs interrupted."""
        report = ReconcileReport(self.policy)
        for run_id, results in self.results().items():
            store.resolve(run_id, results)
            report.runs.add(run_id)
            for result in results:
                if result.outcome is Outcome.DELETED:
                    report.deleted += 1
                else:
                    report.not_deleted += 1
        corrections = self.corrections(seen_by)
        if corrections:
            report.correction_run = store.record_corrections(
                record, corrections, through=self._through if exclude_run is None else None
            )
            report.acknowledged_not_deleted = len(corrections)
            report.corrected = {c.acknowledged.task_id for c in corrections}
            log.warning(
                "acknowledged_not_deleted",
                policy=self.policy,
                count=len(corrections),
                correction_run=report.correction_run,
                examples=[c.acknowledged.task_id for c in corrections[:10]],
                hint="the target acknowledged these deletions but still lists the tasks; "
                "they are eligible again",
            )
        if exclude_run is not None and self._through is not None:
            store.verified(exclude_run, self._through)
        report.interrupted_runs = store.mark_interrupted(self.policy, exclude_run=exclude_run)
        if report.resolved or report.interrupted_runs:
            log.info(
                "reconciled",
                policy=self.policy,
                deleted=report.deleted,
                not_deleted=report.not_deleted,
                runs=len(report.runs),
                interrupted_runs=report.interrupted_runs,
            )
        return report
