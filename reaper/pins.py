"""Pins: legal holds on single tasks, kept in the audit database.

``reaper pin TASK_ID --policy NAME`` (or ``--target KIND``, for every policy on that kind of
target) puts a hold on one task: the plan protects it (``protected: pinned: <reason>``) ahead of
every other rule, so no policy, saved plan or approval deletes it, until ``reaper unpin`` or its
``--until`` time. Pinning and unpinning are each recorded as a run of their own in the audit
(mode ``pin``/``unpin``, one chained row naming who, when and why), and those runs are never
pruned.

A run reads its policy's pins when it plans. A pin taken while the run is deleting also holds:
before each batch is sent the pins are read again (at most every :data:`REFRESH_SECONDS`), and a
pinned task is dropped from the batch (``skipped_changed``, "not sent: pinned ..."). A request
already cleared for sending when the pin is committed may still leave.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Column, Index, Integer, String, Table, Text, insert, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from reaper.audit import GENESIS, AuditEntry, AuditStore, Mark, RunRecord, metadata
from reaper.db import UTCDateTime, database_failure
from reaper.errors import AuditError, ReaperError
from reaper.plan import Candidate
from reaper.recheck import Cleared, SendCheck, Upcoming
from reaper.targets.base import DeleteResult, Outcome

__all__ = [
    "REFRESH_SECONDS",
    "Pin",
    "PinError",
    "PinStore",
    "PinnedCheck",
    "Scope",
    "pins_table",
]

Scope = Literal["policy", "target"]

#: While a run deletes, its pins are read again at most this often (before a batch is sent).
REFRESH_SECONDS = 2.0

pins_table = Table(
    "reaper_pins",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task_id", String(255), nullable=False),
    # "policy": the pin holds for the policy named; "target": for every policy on that kind.
    Column("scope", String(8), nullable=False),
    Column("name", String(128), nullable=False),
    Column("reason", Text, nullable=False),
    Column("pinned_by", String(128), nullable=False),
    Column("pinned_at", UTCDateTime, nullable=False),
    Column("until", UTCDateTime),
    Column("pin_run_id", String(36), nullable=False),
    Column("unpinned_at", UTCDateTime),
    Column("unpinned_by", String(128)),
    Column("unpin_run_id", String(36)),
    Index(None, "scope", "name", "unpinned_at"),
    Index(None, "task_id"),
)


class PinError(ReaperError):
    """A pin or unpin that cannot be done as asked (already pinned, nothing to unpin)."""


@dataclass(frozen=True)
class Pin:
    """One pin, active or not."""

    id: int
    task_id: str
    scope: Scope
    name: str
    reason: str
    pinned_by: str
    pinned_at: datetime
    until: datetime | None
    pin_run_id: str
    unpinned_at: datetime | None = None
    unpinned_by: str | None = None
    unpin_run_id: str | None = None

    def active(self, now: datetime) -> bool:
        return self.unpinned_at is None and (self.until is None or self.until > now)

    def describe(self) -> str:
        """``policy p`` or ``every data_pipeline policy``."""
        return f"policy {self.name}" if self.scope == "policy" else f"every {self.name} policy"

    def as_dict(self) -> dict[str, Any]:
        return {
            name: (value.isoformat() if isinstance(value, datetime) else value)
            for name, value in self.__dict__.items()
        }


def _active(now: datetime) -> Any:
    return (pins_table.c.unpinned_at.is_(None)) & (
        or_(pins_table.c.until.is_(None), pins_table.c.until > now)
    )


class PinStore:
    """Reads and writes pins; each change is recorded in the audit first."""

    def __init__(self, store: AuditStore) -> None:
        self.store = store
        self.engine = store.engine

    def _fail(self, action: str, exc: SQLAlchemyError) -> AuditError:
        return database_failure(self.engine, action, exc)

    def pin(
        self,
        task_id: str,
        scope: Scope,
        name: str,
        *,
        reason: str,
        by: str,
        now: datetime,
        until: datetime | None = None,
        policy_hash: str = GENESIS,
        target_kind: str = "",
        target: str = "",
    ) -> Pin:
        """Pin ``task_id`` for the policy (or target kind) ``name``; PinError if it already is."""
        for pin in self.pins(task_id=task_id, now=now):
            if pin.scope == scope and pin.name == name:
                raise PinError(
                    f"task {task_id!r} is already pinned for {pin.describe()} (pin {pin.id}, by "
                    f"{pin.pinned_by} at {pin.pinned_at.isoformat()}): unpin it first to change it"
                )
        details: dict[str, Any] = {"scope": scope, "name": name, "reason": reason, "by": by}
        details["until"] = until.isoformat() if until is not None else None
        note = f"pinned by {by} for {_scope_text(scope, name)}"
        if until is not None:
            note += f" until {until.isoformat()}"
        run_id = self.store.record_event(
            _record(scope, name, "pin", (policy_hash, target_kind, target), details),
            [AuditEntry(task_id, f"pinned: {reason}", None, None, Mark.PINNED, note=note)],
            f"pinned task {task_id} for {_scope_text(scope, name)}: {reason}",
        )
        pin = Pin(0, task_id, scope, name, reason, by, now, until, run_id)
        values = pin.__dict__.copy()
        del values["id"]
        try:
            with self.engine.begin() as connection:
                pin_id = connection.execute(
                    insert(pins_table).values(**values).returning(pins_table.c.id)
                ).scalar_one()
        except SQLAlchemyError as exc:
            raise self._fail("recording a pin", exc) from None
        return replace(pin, id=pin_id)

    def unpin(
        self,
        task_id: str,
        scope: Scope,
        name: str,
        *,
        by: str,
        now: datetime,
        comment: str | None = None,
        policy_hash: str = GENESIS,
        target_kind: str = "",
        target: str = "",
    ) -> Pin:
        """Lift the active pin of ``task_id`` for ``name``; PinError if there is none."""
        found = [
            pin
            for pin in self.pins(task_id=task_id, now=now)
            if pin.scope == scope and pin.name == name
        ]
        if not found:
            raise PinError(f"task {task_id!r} has no active pin for {_scope_text(scope, name)}")
        [pin] = found
        note = f"unpinned by {by} (pin {pin.id}, pinned by {pin.pinned_by} at "
        note += f"{pin.pinned_at.isoformat()})"
        if comment:
            note += f": {comment}"
        details = {"scope": scope, "name": name, "by": by, "pin": pin.id, "comment": comment}
        run_id = self.store.record_event(
            _record(scope, name, "unpin", (policy_hash, target_kind, target), details),
            [AuditEntry(task_id, f"unpinned: {pin.reason}", None, None, Mark.UNPINNED, note=note)],
            f"unpinned task {task_id} for {_scope_text(scope, name)}",
        )
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    update(pins_table)
                    .where(pins_table.c.id == pin.id)
                    .values(unpinned_at=now, unpinned_by=by, unpin_run_id=run_id)
                )
        except SQLAlchemyError as exc:
            raise self._fail("recording an unpin", exc) from None
        return replace(pin, unpinned_at=now, unpinned_by=by, unpin_run_id=run_id)

    def pins(
        self,
        *,
        now: datetime,
        task_id: str | None = None,
        scope: Scope | None = None,
        name: str | None = None,
        include_inactive: bool = False,
    ) -> list[Pin]:
        """Pins, oldest first: the active ones at ``now`` unless ``include_inactive``."""
        query = select(pins_table).order_by(pins_table.c.id)
        if not include_inactive:
            query = query.where(_active(now))
        if task_id is not None:
            query = query.where(pins_table.c.task_id == task_id)
        if scope is not None:
            query = query.where(pins_table.c.scope == scope)
        if name is not None:
            query = query.where(pins_table.c.name == name)
        try:
            with self.engine.connect() as connection:
                return [Pin(**row._mapping) for row in connection.execute(query)]
        except SQLAlchemyError as exc:
            raise self._fail("reading pins", exc) from None

    def active_for(self, policy: str, target_kind: str, now: datetime) -> dict[str, str]:
        """The tasks pinned for ``policy`` (or for its kind of target) at ``now``: id -> reason
        (the oldest pin's, when a task has several)."""
        query = (
            select(pins_table.c.task_id, pins_table.c.reason)
            .where(
                _active(now),
                or_(
                    (pins_table.c.scope == "policy") & (pins_table.c.name == policy),
                    (pins_table.c.scope == "target") & (pins_table.c.name == target_kind),
                ),
            )
            .order_by(pins_table.c.id.desc())
        )
        try:
            with self.engine.connect() as connection:
                # Newest first, so the oldest pin's reason is the one left in the dict.
                return {str(task_id): str(reason) for task_id, reason in connection.execute(query)}
        except SQLAlchemyError as exc:
            raise self._fail("reading pins", exc) from None


def _scope_text(scope: Scope, name: str) -> str:
    return f"policy {name}" if scope == "policy" else f"every {name} policy"


def _record(
    scope: Scope, name: str, mode: str, where: tuple[str, str, str], details: dict[str, Any]
) -> RunRecord:
    """The run recording a pin: ``where`` is the policy's hash, target kind and target (for a
    target-wide pin, which belongs to no one policy, the kind alone)."""
    policy_hash, target_kind, target = where
    return RunRecord(
        policy=name if scope == "policy" else f"<target:{name}>",
        policy_hash=policy_hash,
        policy_json=json.dumps(details, sort_keys=True, ensure_ascii=False),
        target_kind=target_kind or name,
        target=target or name,
        mode=mode,
    )


class PinnedCheck(SendCheck):
    """The send-time re-check, which first drops tasks pinned since the plan was made."""

    def __init__(
        self,
        *args: Any,
        pins: Callable[[], Awaitable[Mapping[str, str]]],
        refresh_seconds: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._read_pins = pins
        self._pins: Mapping[str, str] = {}
        self._refresh = REFRESH_SECONDS if refresh_seconds is None else refresh_seconds
        self._read_at = -math.inf  # the first batch reads them

    async def _current(self) -> Mapping[str, str]:
        if time.monotonic() - self._read_at >= self._refresh:
            self._pins = await self._read_pins()
            self._read_at = time.monotonic()
        return self._pins

    async def clear(self, batch: Sequence[Candidate], upcoming: Upcoming) -> Cleared:
        pins = await self._current()
        pinned = [c for c in batch if c.task_id in pins] if pins else []
        if not pinned:
            return await super().clear(batch, upcoming)
        dropped = [
            DeleteResult(
                c.task_id,
                Outcome.SKIPPED_CHANGED,
                note=f"not sent: pinned while the run was deleting: {pins[c.task_id]}",
            )
            for c in pinned
        ]
        self.dropped += len(dropped)
        rest = [c for c in batch if c.task_id not in pins]
        cleared = await super().clear(rest, upcoming) if rest else Cleared([], [], None)
        return Cleared(cleared.send, dropped + cleared.dropped, cleared.not_after)
