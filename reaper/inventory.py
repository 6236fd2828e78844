"""The Aparavi task inventory: the ``(token, type)`` pairs reaper tracks, in its own database.

Aparavi has no list endpoint, so the programs that start tasks register them here (``reaper track``,
:func:`reaper.track.track`, or a JSON Lines/CSV import) and a run reads the active entries back as
its "listing". :class:`Inventory` is the store behind the
:class:`~reaper.targets.state.TaskInventory` interface the Aparavi target is handed. Its table is
defined on the audit's MetaData (the migrations see both) and created by migration 0004.

Inventory rows are never removed without an audit row saying why:

* an entry is *retired* (``retired_at``/``retired_reason`` set, the row kept) only after an audit
  row records that its task is gone: a deletion, an ``already_gone``, or a delete the deployment
  refused for good. :meth:`Inventory.gone_per_audit` finds those rows (reading only),
  :meth:`Inventory.retire` retires from them, and :meth:`Inventory.record_gone` first writes such
  rows (as a run of the pseudo-policy ``<aparavi-inventory>``) for tasks the status call reports
  as not found;
* rows are deleted physically only by :meth:`Inventory.prune`, which writes one audit row per
  pruned entry first.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Engine,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    delete,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from reaper.audit import (
    AuditEntry,
    AuditStore,
    RunRecord,
    RunSummary,
    audit_table,
    metadata,
)
from reaper.db import UTCDateTime, database_failure
from reaper.errors import AuditError
from reaper.targets.aparavi import (
    NOT_DELETABLE_NOTE,
    TASK_TYPES,
    check_registration,
    normalize_base_url,
)
from reaper.targets.base import Outcome
from reaper.targets.state import TaskInventory, TrackedTask

__all__ = ["INVENTORY_POLICY", "Inventory", "Registration", "inventory_table"]

#: The pseudo-policy under which inventory housekeeping is audited.
INVENTORY_POLICY = "<aparavi-inventory>"
_Id = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements INTEGER keys only
_CHUNK = 500

inventory_table = Table(
    "reaper_aparavi_inventory",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("base_url", String(512), nullable=False),
    Column("token", String(200), nullable=False),
    Column("type", String(8), nullable=False),
    Column("name", String(255)),
    Column("registered_at", UTCDateTime, nullable=False),
    Column("retired_at", UTCDateTime),
    Column("retired_reason", Text),
    Column("last_status", String(64)),
    Column("last_checked_at", UTCDateTime),
    UniqueConstraint("base_url", "token", "type"),
    CheckConstraint("type IN ('cpu', 'gpu')", name="ck_reaper_aparavi_inventory_type"),
    Index(None, "base_url", "retired_at"),
)

#: Audit outcomes after which an inventory entry is retired.
_GONE_OUTCOMES = (Outcome.DELETED.value, Outcome.ALREADY_GONE.value)


@dataclass(frozen=True)
class Registration:
    """The answer to one registration: the entry, and whether this call created it."""

    entry: TrackedTask
    created: bool

    @property
    def state(self) -> str:
        if self.created:
            return "registered"
        return "retired" if self.entry.retired_at is not None else "already tracked"


class Inventory(TaskInventory):
    """Reads and writes the inventory. Database failures are AuditErrors (fail closed)."""

    def __init__(self, engine: Engine, *, clock: Any = None) -> None:
        self.engine = engine
        self._clock = clock or (lambda: datetime.now(UTC))

    def _now(self) -> datetime:
        now: datetime = self._clock()
        return now

    def _fail(self, action: str, exc: SQLAlchemyError) -> AuditError:
        return database_failure(self.engine, action, exc, "inventory database")

    # -- registration -------------------------------------------------------------------------

    def register(
        self, base_url: str, token: str, task_type: str, name: str | None = None
    ) -> Registration:
        """Track one task (idempotent: an existing entry is returned unchanged)."""
        [registration] = self.register_many(base_url, [(token, task_type, name)])
        return registration

    def register_many(
        self, base_url: str, items: Sequence[tuple[str, str, str | None]]
    ) -> list[Registration]:
        """Track several tasks in one transaction; existing entries are left as they are.

        Raises ValueError (nothing written) if any item is invalid.
        """
        base = normalize_base_url(base_url)
        problems = [
            f"item {index + 1}: {problem}"
            for index, (token, task_type, name) in enumerate(items)
            for problem in check_registration(token, task_type, name)
        ]
        if problems:
            raise ValueError("; ".join(problems))
        for attempt in range(2):
            try:
                return self._register(base, items)
            except IntegrityError:
                # A concurrent registration of the same task won the race: read it back.
                if attempt:
                    raise
            except SQLAlchemyError as exc:
                raise self._fail(f"registering {len(items)} task(s)", exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _register(
        self, base: str, items: Sequence[tuple[str, str, str | None]]
    ) -> list[Registration]:
        now = self._now()
        keys = [(token, task_type) for token, task_type, _ in items]
        with self.engine.begin() as connection:
            existing = {(e.token, e.type): e for e in self._find(connection, base, keys)}
            new_rows = []
            queued: set[tuple[str, str]] = set()
            for token, task_type, name in items:
                key = (token, task_type)
                if key in existing or key in queued:
                    continue
                queued.add(key)
                new_rows.append(
                    {
                        "base_url": base,
                        "token": token,
                        "type": task_type,
                        "name": name,
                        "registered_at": now,
                    }
                )
            if new_rows:
                connection.execute(insert(inventory_table), new_rows)
            found = {(e.token, e.type): e for e in self._find(connection, base, keys)}
        return [
            Registration(found[(token, task_type)], (token, task_type) in queued)
            for token, task_type, _ in items
        ]

    @staticmethod
    def _find(connection: Any, base: str, keys: Sequence[tuple[str, str]]) -> list[TrackedTask]:
        entries: list[TrackedTask] = []
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start : start + _CHUNK]
            rows = connection.execute(
                select(inventory_table).where(
                    inventory_table.c.base_url == base,
                    tuple_(inventory_table.c.token, inventory_table.c.type).in_(chunk),
                )
            )
            entries.extend(_entry(row) for row in rows)
        return entries

    # -- reading ------------------------------------------------------------------------------

    def entries(
        self,
        base_url: str | None = None,
        *,
        types: Iterable[str] = TASK_TYPES,
        include_retired: bool = False,
    ) -> list[TrackedTask]:
        """Entries of one deployment (or all), oldest registration first."""
        query = (
            select(inventory_table)
            .where(inventory_table.c.type.in_(list(types)))
            .order_by(inventory_table.c.registered_at, inventory_table.c.id)
        )
        if base_url is not None:
            query = query.where(inventory_table.c.base_url == normalize_base_url(base_url))
        if not include_retired:
            query = query.where(inventory_table.c.retired_at.is_(None))
        try:
            with self.engine.connect() as connection:
                return [_entry(row) for row in connection.execute(query)]
        except SQLAlchemyError as exc:
            raise self._fail("reading the inventory", exc) from None

    def note_statuses(self, checked: Sequence[tuple[int, str | None]]) -> None:
        """Store the status each entry had when it was last checked (None: not found)."""
        if not checked:
            return
        now = self._now()
        statement = (
            update(inventory_table)
            .where(inventory_table.c.id == bindparam("entry_id"))
            .values(last_status=bindparam("status"), last_checked_at=now)
        )
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    statement, [{"entry_id": entry, "status": status} for entry, status in checked]
                )
        except SQLAlchemyError as exc:
            raise self._fail("recording task statuses", exc) from None

    # -- retiring -----------------------------------------------------------------------------

    def gone_per_audit(self, base_url: str) -> list[tuple[TrackedTask, str]]:
        """Active entries whose task an audit row records as gone, each with the reason to
        retire it (naming the row). Reads only.

        Gone means a ``deleted`` or ``already_gone`` row on this deployment, or a ``failed`` one
        noting that the deployment refuses to delete the task for good.
        """
        base = normalize_base_url(base_url)
        found: list[tuple[TrackedTask, str]] = []
        try:
            with self.engine.connect() as connection:
                active = {
                    e.task_id: e
                    for e in (
                        _entry(row)
                        for row in connection.execute(
                            select(inventory_table).where(
                                inventory_table.c.base_url == base,
                                inventory_table.c.retired_at.is_(None),
                            )
                        )
                    )
                }
                ids = list(active)
                for start in range(0, len(ids), _CHUNK):
                    rows = connection.execute(
                        select(
                            audit_table.c.id,
                            audit_table.c.run_id,
                            audit_table.c.task_id,
                            audit_table.c.outcome,
                            audit_table.c.policy,
                            audit_table.c.error_message,
                        )
                        .where(
                            audit_table.c.target == base,
                            audit_table.c.task_id.in_(ids[start : start + _CHUNK]),
                            (
                                audit_table.c.outcome.in_(_GONE_OUTCOMES)
                                | and_(
                                    audit_table.c.outcome == Outcome.FAILED.value,
                                    audit_table.c.note == NOT_DELETABLE_NOTE,
                                )
                            ),
                        )
                        .order_by(audit_table.c.id)
                    )
                    for row in rows:
                        entry = active.pop(row.task_id, None)
                        if entry is None:
                            continue  # an earlier row already accounts for it
                        detail = f": {row.error_message}" if row.error_message else ""
                        reason = (
                            f"audit row {row.id} (policy {row.policy}, run {row.run_id}): "
                            f"{row.outcome}{detail}"
                        )[:2000]
                        found.append((entry, reason))
        except SQLAlchemyError as exc:
            raise self._fail("reading the audit rows of gone tasks", exc) from None
        return found

    def retire(self, retirements: Sequence[tuple[TrackedTask, str]]) -> list[TrackedTask]:
        """Retire entries, each with its reason; returns those this call retired (an entry
        retired meanwhile keeps its first reason)."""
        now = self._now()
        retired: list[TrackedTask] = []
        try:
            with self.engine.begin() as connection:
                for entry, reason in retirements:
                    result = connection.execute(
                        update(inventory_table)
                        .where(
                            inventory_table.c.id == entry.id,
                            inventory_table.c.retired_at.is_(None),
                        )
                        .values(retired_at=now, retired_reason=reason)
                    )
                    if result.rowcount:
                        retired.append(replace(entry, retired_at=now, retired_reason=reason))
        except SQLAlchemyError as exc:
            raise self._fail("retiring entries", exc) from None
        return retired

    def retire_from_audit(self, base_url: str) -> list[TrackedTask]:
        """Retire every active entry whose task an audit row records as gone; return them."""
        return self.retire(self.gone_per_audit(base_url))

    def record_gone(
        self,
        base_url: str,
        gone: Sequence[tuple[TrackedTask, str]],
        *,
        store: AuditStore | None = None,
    ) -> list[TrackedTask]:
        """Audit tasks the target reports as not found, then retire their entries.

        One run of the pseudo-policy ``<aparavi-inventory>`` records an ``already_gone`` row per
        task with the target's words; the entries are retired from those rows afterwards.
        """
        if not gone:
            return []
        base = normalize_base_url(base_url)
        store = store or AuditStore(self.engine)
        run_id = store.start_run(
            RunRecord(
                policy=INVENTORY_POLICY,
                policy_hash="0" * 64,
                policy_json=json.dumps({"action": "retire", "base_url": base}),
                target_kind="aparavi",
                target=base,
                mode="inventory",
            )
        )
        summary = RunSummary(listed=len(gone), already_gone=len(gone))
        try:
            store.record(
                run_id,
                [
                    AuditEntry(
                        entry.task_id,
                        f"inventory: the status call answered {why!r}; retired",
                        entry.last_status,
                        None,
                        Outcome.ALREADY_GONE,
                        why,
                    )
                    for entry, why in gone
                ],
            )
        except AuditError as exc:
            store.finish_run(run_id, "failed", RunSummary(), str(exc))
            raise
        store.finish_run(run_id, "succeeded", summary)
        return self.retire_from_audit(base)

    # -- pruning ------------------------------------------------------------------------------

    def prune(
        self, retired_before: datetime, *, store: AuditStore | None = None
    ) -> list[TrackedTask]:
        """Delete entries retired before ``retired_before``; one audit row per entry first."""
        try:
            with self.engine.connect() as connection:
                rows = connection.execute(
                    select(inventory_table)
                    .where(
                        inventory_table.c.retired_at.is_not(None),
                        inventory_table.c.retired_at < retired_before,
                    )
                    .order_by(inventory_table.c.id)
                )
                doomed = [_entry(row) for row in rows]
        except SQLAlchemyError as exc:
            raise self._fail("reading retired entries", exc) from None
        if not doomed:
            return []
        store = store or AuditStore(self.engine)
        by_base: dict[str, list[TrackedTask]] = {}
        for entry in doomed:
            by_base.setdefault(entry.base_url, []).append(entry)
        for base, entries in by_base.items():
            run_id = store.start_run(
                RunRecord(
                    policy=INVENTORY_POLICY,
                    policy_hash="0" * 64,
                    policy_json=json.dumps(
                        {"action": "prune", "retired_before": retired_before.isoformat()}
                    ),
                    target_kind="aparavi",
                    target=base,
                    mode="inventory",
                )
            )
            store.record(
                run_id,
                [
                    AuditEntry(
                        entry.task_id,
                        f"inventory prune: entry removed (retired {entry.retired_at:%Y-%m-%d} "
                        f"before {retired_before:%Y-%m-%d}: {entry.retired_reason})"[:2000],
                        entry.last_status,
                        None,
                        Outcome.ALREADY_GONE,
                    )
                    for entry in entries
                ],
            )
            store.finish_run(
                run_id, "succeeded", RunSummary(listed=len(entries), already_gone=len(entries))
            )
        try:
            with self.engine.begin() as connection:
                ids = [entry.id for entry in doomed]
                for start in range(0, len(ids), _CHUNK):
                    connection.execute(
                        delete(inventory_table).where(
                            inventory_table.c.id.in_(ids[start : start + _CHUNK]),
                            inventory_table.c.retired_at.is_not(None),
                        )
                    )
        except SQLAlchemyError as exc:
            raise self._fail("pruning the inventory", exc) from None
        return doomed


def _entry(row: Any) -> TrackedTask:
    return TrackedTask(
        id=row.id,
        base_url=row.base_url,
        token=row.token,
        type=row.type,
        name=row.name,
        registered_at=row.registered_at,
        retired_at=row.retired_at,
        retired_reason=row.retired_reason,
        last_status=row.last_status,
        last_checked_at=row.last_checked_at,
    )
