"""Reconciliation: make the audit match reality after a crash, a kill or a lost answer.

A row left ``pending`` (the process died between recording the intent and recording the answer)
or ``unknown`` (the answer was lost) says nothing true yet. Reconciliation looks the task up on
the target: if it is gone, the deletion happened (``deleted``, noted as confirmed by
reconciliation); if it is still there, it did not (``not_deleted``). It runs at the start of every
run, on the same listing the run plans from, and on its own as ``reaper reconcile``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog

from reaper.audit import AuditRow, AuditStore
from reaper.targets.base import DeleteResult, Outcome, Task

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

    @property
    def resolved(self) -> int:
        return self.deleted + self.not_deleted


class Reconciler:
    """Watches a complete listing for the tasks of unresolved rows, then resolves them."""

    def __init__(self, policy: str, rows: list[AuditRow]) -> None:
        self.policy = policy
        self.rows = rows
        self._wanted = {row.task_id for row in rows}
        self._present: set[str] = set()

    @classmethod
    def load(cls, store: AuditStore, policy: str, exclude_run: str | None = None) -> Reconciler:
        return cls(policy, store.unresolved(policy, exclude_run=exclude_run))

    def __bool__(self) -> bool:
        return bool(self.rows)

    def observe(self, task: Task) -> None:
        """Note a listed task; one that is listed but already deleted counts as gone."""
        if task.id in self._wanted and not task.gone:
            self._present.add(task.id)

    async def watch(self, tasks: AsyncIterator[Task]) -> AsyncIterator[Task]:
        """Pass a listing through, observing each task."""
        async for task in tasks:
            self.observe(task)
            yield task

    def results(self) -> dict[str, list[DeleteResult]]:
        """Per run, the outcome of each unresolved row. Call only after a complete listing."""
        by_run: dict[str, list[DeleteResult]] = defaultdict(list)
        for row in self.rows:
            if row.task_id in self._present:
                result = DeleteResult(row.task_id, Outcome.NOT_DELETED, note=PRESENT_NOTE)
            else:
                result = DeleteResult(row.task_id, Outcome.DELETED, note=GONE_NOTE)
            by_run[row.run_id].append(result)
        return by_run

    def apply(self, store: AuditStore, exclude_run: str | None = None) -> ReconcileReport:
        """Write the outcomes (one transaction per earlier run) and mark dead runs interrupted."""
        report = ReconcileReport(self.policy)
        for run_id, results in self.results().items():
            store.resolve(run_id, results)
            report.runs.add(run_id)
            for result in results:
                if result.outcome is Outcome.DELETED:
                    report.deleted += 1
                else:
                    report.not_deleted += 1
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
