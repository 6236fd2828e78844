"""Notice before deletion: when each task of a policy with ``delete.notice`` was first eligible.

With ``delete.notice: 3d``, a task a run first finds eligible is not deleted: it is recorded
here with that moment (``first_seen``), due ``notice`` later, and the notification of upcoming
deletions lists it. A later run deletes it only if it is still eligible then; a noticed task that
is no longer eligible loses its notice, which starts again if it becomes eligible again. The
split itself is :meth:`reaper.plan.Plan.give_notice`; ``reaper plan`` shows due, waiting and new
tasks apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Column, String, Table, delete, insert, select
from sqlalchemy.exc import SQLAlchemyError

from reaper.audit import AuditStore, metadata
from reaper.db import UTCDateTime, database_failure
from reaper.errors import AuditError
from reaper.plan import Notice

__all__ = ["NoticeStore", "notices_table"]

notices_table = Table(
    "reaper_notices",
    metadata,
    Column("policy", String(128), primary_key=True),
    Column("task_id", String(255), primary_key=True),
    # When a run first found the task eligible, and which run.
    Column("first_seen", UTCDateTime, nullable=False),
    Column("run_id", String(36), nullable=False),
)

_CHUNK = 5000


class NoticeStore:
    """Reads and writes the notices of policies."""

    def __init__(self, store: AuditStore) -> None:
        self.engine = store.engine

    def _fail(self, action: str, exc: SQLAlchemyError) -> AuditError:
        return database_failure(self.engine, action, exc)

    def first_seen(self, policy: str) -> dict[str, datetime]:
        """Each noticed task of ``policy``: when a run first found it eligible."""
        query = select(notices_table.c.task_id, notices_table.c.first_seen).where(
            notices_table.c.policy == policy
        )
        try:
            with self.engine.connect() as connection:
                return {str(task_id): seen for task_id, seen in connection.execute(query)}
        except SQLAlchemyError as exc:
            raise self._fail("reading notices", exc) from None

    def record(self, policy: str, notice: Notice, run_id: str, now: datetime) -> None:
        """Record the tasks noticed now and forget those no longer eligible, in one
        transaction."""
        try:
            with self.engine.begin() as connection:
                for chunk in _chunks(notice.forgotten):
                    connection.execute(
                        delete(notices_table).where(
                            notices_table.c.policy == policy, notices_table.c.task_id.in_(chunk)
                        )
                    )
                for chunk in _chunks(notice.new):
                    connection.execute(
                        insert(notices_table),
                        [
                            {
                                "policy": policy,
                                "task_id": task_id,
                                "first_seen": now,
                                "run_id": run_id,
                            }
                            for task_id in chunk
                        ],
                    )
        except SQLAlchemyError as exc:
            raise self._fail("recording notices", exc) from None


def _chunks(ids: Sequence[str]) -> list[Sequence[str]]:
    return [ids[start : start + _CHUNK] for start in range(0, len(ids), _CHUNK)]
