"""Held plans and approvals: a plan a guard refused, kept for a person to approve or reject.

When a mass-deletion guard trips, the run is recorded ``refused`` and deletes nothing, as before;
its plan (every id with its reason, the policy's content hash, the guard) is also *held* in the
database. ``reaper held list`` shows held plans; ``reaper approve RUN_ID --by NAME [--comment]
[--valid-for 24h]`` approves one, ``reaper reject RUN_ID`` drops it.

An approval is recorded in the audit before it takes effect: a run of mode ``approval`` with one
chained row per approved id, naming who approved, when, until when and why. The ids a held plan
deletes are read back from those rows, never from the held plan's own table, so what is deleted
is exactly what the chain says was approved.

While the approval is valid, the next run of the policy (or ``reaper apply --held RUN_ID``)
carries it out, as a saved plan is applied: it lists the target again and deletes only approved
ids that are still eligible (pins included), the guards lifted for exactly those ids, and every
row it writes names the approval. An approval is carried out once. A held plan whose policy
changed since it was held is refused, as a saved plan is. A newer held plan of the same policy
supersedes an older one nobody decided on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Index,
    Integer,
    String,
    Table,
    Text,
    and_,
    delete,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from reaper.audit import (
    AuditEntry,
    AuditStore,
    Mark,
    RunRecord,
    audit_table,
    metadata,
    runs_table,
)
from reaper.db import UTCDateTime, database_failure
from reaper.errors import AuditError, ReaperError
from reaper.guards import GuardTrip
from reaper.plan import Plan
from reaper.planfile import SavedPlan
from reaper.policy import LoadedPolicy

__all__ = [
    "Approval",
    "HeldPlan",
    "HeldStore",
    "HoldError",
    "held_items_table",
    "held_table",
    "refusal",
]

log = structlog.get_logger("reaper.holds")

held_table = Table(
    "reaper_held",
    metadata,
    # The refused run whose plan is held.
    Column("run_id", String(36), primary_key=True),
    Column("policy", String(128), nullable=False),
    Column("policy_hash", String(64), nullable=False),
    Column("target", String(512), nullable=False),
    Column("guard", String(32), nullable=False),
    Column("message", Text, nullable=False),
    Column("eligible", BigInteger, nullable=False),
    Column("listed", BigInteger, nullable=False),
    Column("held_at", UTCDateTime, nullable=False),
    # held, approved, applied, rejected, superseded, or refused (its policy changed)
    Column("status", String(16), nullable=False),
    Column("approval_id", String(36)),
    Column("approved_by", String(128)),
    Column("approved_at", UTCDateTime),
    Column("valid_until", UTCDateTime),
    Column("comment", Text),
    Column("applied_run_id", String(36)),
    Column("closed_at", UTCDateTime),
    Column("closed_by", String(128)),
    Column("close_note", Text),
    Index(None, "policy", "status"),
)

held_items_table = Table(
    "reaper_held_items",
    metadata,
    Column("run_id", String(36), primary_key=True),
    Column("task_id", String(255), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Column("task_status", String(64)),
    Column("task_timestamp", UTCDateTime),
)

_CHUNK = 5000


class HoldError(ReaperError):
    """A held plan that cannot be approved, rejected or applied as asked."""


class UnknownHeldRun(HoldError):
    """No plan is held for the run named (a mistyped RUN_ID: a usage error, exit 2)."""


@dataclass(frozen=True)
class HeldPlan:
    """A plan a guard refused, and what people decided about it."""

    run_id: str
    policy: str
    policy_hash: str
    target: str
    guard: str
    message: str
    eligible: int
    listed: int
    held_at: datetime
    status: str
    approval_id: str | None = None
    approved_by: str | None = None
    approved_at: datetime | None = None
    valid_until: datetime | None = None
    comment: str | None = None
    applied_run_id: str | None = None
    closed_at: datetime | None = None
    closed_by: str | None = None
    close_note: str | None = None

    def expired(self, now: datetime) -> bool:
        """Approved, but the approval's validity ended before it was carried out."""
        return (
            self.status == "approved" and self.valid_until is not None and self.valid_until <= now
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            name: (value.isoformat() if isinstance(value, datetime) else value)
            for name, value in self.__dict__.items()
        } | {"expired": self.expired(datetime.now(UTC))}


@dataclass(frozen=True)
class Approval:
    """An approved held plan: who approved which ids, until when."""

    id: str  # the run recording the approval
    held: HeldPlan
    by: str
    at: datetime
    valid_until: datetime
    comment: str | None
    #: task id -> the reason it was selected, as the chained approval rows record them.
    items: dict[str, str]

    @property
    def policy(self) -> str:
        return self.held.policy

    @property
    def policy_hash(self) -> str:
        return self.held.policy_hash

    def saved_plan(self) -> SavedPlan:
        """The approval as a reviewed plan to apply (reaper.planfile)."""
        held = self.held
        return SavedPlan(held.policy, held.policy_hash, held.held_at, held.target, self.items)

    def describe(self) -> str:
        text = f"approved by {self.by} at {self.at.isoformat()}"
        return text + (f": {self.comment}" if self.comment else "")


def _marked(items: Sequence[Any], mark: Mark, note: str) -> list[AuditEntry]:
    """One audit row per held id, recording what a person (or reaper) decided about it."""
    return [
        AuditEntry(
            item.task_id, item.reason, item.task_status, item.task_timestamp, mark, note=note
        )
        for item in items
    ]


def refusal(held: HeldPlan, loaded: LoadedPolicy | None, now: datetime) -> str | None:
    """Why the approval of ``held`` must not be carried out now, or None when it may be."""
    if held.status != "approved":
        return f"held run {held.run_id} is {held.status}, not approved"
    assert held.valid_until is not None
    if held.valid_until <= now:
        return (
            f"the approval of held run {held.run_id} expired at {held.valid_until.isoformat()}: "
            "approve it again, or let the next run hold a new plan"
        )
    if loaded is None:
        return f"held run {held.run_id} is for policy {held.policy!r}, which no file defines now"
    if loaded.digest != held.policy_hash:
        return (
            f"policy {held.policy!r} changed since run {held.run_id} was held (content hash "
            f"{held.policy_hash[:12]} then, {loaded.digest[:12]} now): the approval is refused; "
            "the next run plans the changed policy afresh"
        )
    return None


class HeldStore:
    """Reads and writes held plans; approvals and rejections are recorded in the audit first."""

    def __init__(self, store: AuditStore) -> None:
        self.store = store
        self.engine = store.engine

    def _fail(self, action: str, exc: SQLAlchemyError) -> AuditError:
        return database_failure(self.engine, action, exc)

    # -- holding ----------------------------------------------------------------------------

    def hold(self, run_id: str, plan: Plan, trip: GuardTrip, now: datetime) -> HeldPlan:
        """Hold ``plan``, refused by ``trip`` in run ``run_id``; an older plan of the policy
        nobody decided on, or whose approval expired unused, is superseded."""
        loaded = plan.policy
        held = HeldPlan(
            run_id=run_id,
            policy=loaded.name,
            policy_hash=loaded.digest,
            target=loaded.policy.target_config.describe(),
            guard=trip.guard,
            message=trip.message,
            eligible=plan.eligible,
            listed=plan.listed,
            held_at=now,
            status="held",
        )
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    update(held_table)
                    .where(
                        held_table.c.policy == loaded.name,
                        or_(
                            held_table.c.status == "held",
                            and_(
                                held_table.c.status == "approved", held_table.c.valid_until <= now
                            ),
                        ),
                    )
                    .values(status="superseded", closed_at=now, close_note=f"by run {run_id}")
                )
                connection.execute(insert(held_table).values(**held.__dict__))
                chunk: list[dict[str, Any]] = []
                for position, candidate in enumerate(plan.candidates()):
                    chunk.append(
                        {
                            "run_id": run_id,
                            "task_id": candidate.task_id,
                            "position": position,
                            "reason": candidate.reason,
                            "task_status": candidate.status,
                            "task_timestamp": candidate.timestamp,
                        }
                    )
                    if len(chunk) == _CHUNK:
                        connection.execute(insert(held_items_table), chunk)
                        chunk = []
                if chunk:
                    connection.execute(insert(held_items_table), chunk)
        except SQLAlchemyError as exc:
            raise self._fail("holding a refused plan", exc) from None
        return held

    # -- reading ----------------------------------------------------------------------------

    def held(self, *, include_closed: bool = False, policy: str | None = None) -> list[HeldPlan]:
        """Held plans, newest first: those awaiting a decision or approved and not carried out
        yet, unless ``include_closed``."""
        query = select(held_table).order_by(held_table.c.held_at.desc())
        if not include_closed:
            query = query.where(held_table.c.status.in_(("held", "approved")))
        if policy is not None:
            query = query.where(held_table.c.policy == policy)
        try:
            with self.engine.connect() as connection:
                return [HeldPlan(**row._mapping) for row in connection.execute(query)]
        except SQLAlchemyError as exc:
            raise self._fail("reading held plans", exc) from None

    def get(self, run_id: str) -> HeldPlan:
        """The held plan of run ``run_id``; HoldError if there is none."""
        try:
            with self.engine.connect() as connection:
                row = connection.execute(
                    select(held_table).where(held_table.c.run_id == run_id)
                ).first()
        except SQLAlchemyError as exc:
            raise self._fail("reading a held plan", exc) from None
        if row is None:
            raise UnknownHeldRun(f"no plan is held for run {run_id!r} (see `reaper held list`)")
        return HeldPlan(**row._mapping)

    def _items(self, connection: Connection, run_id: str) -> list[Any]:
        return list(
            connection.execute(
                select(held_items_table)
                .where(held_items_table.c.run_id == run_id)
                .order_by(held_items_table.c.position)
            )
        )

    def items(self, run_id: str) -> list[dict[str, Any]]:
        """The ids a held plan would delete, in the plan's order (oldest first), with reasons."""
        try:
            with self.engine.connect() as connection:
                rows = self._items(connection, run_id)
        except SQLAlchemyError as exc:
            raise self._fail("reading a held plan", exc) from None
        return [
            {
                "task_id": row.task_id,
                "reason": row.reason,
                "status": row.task_status,
                "timestamp": row.task_timestamp.isoformat() if row.task_timestamp else None,
            }
            for row in rows
        ]

    def approval(self, held: HeldPlan) -> Approval:
        """The approval of an approved held plan, its ids read from the chained approval rows."""
        if held.approval_id is None:
            raise HoldError(f"held run {held.run_id} is {held.status}, not approved")
        assert held.approved_by and held.approved_at and held.valid_until
        query = (
            select(audit_table.c.task_id, audit_table.c.reason)
            .where(
                audit_table.c.run_id == held.approval_id,
                audit_table.c.outcome == Mark.APPROVED.value,
            )
            .order_by(audit_table.c.chain_seq)
        )
        try:
            with self.engine.connect() as connection:
                items = {str(task_id): str(reason) for task_id, reason in connection.execute(query)}
        except SQLAlchemyError as exc:
            raise self._fail("reading an approval", exc) from None
        return Approval(
            held.approval_id,
            held,
            held.approved_by,
            held.approved_at,
            held.valid_until,
            held.comment,
            items,
        )

    def approval_for(self, policy: str, now: datetime) -> HeldPlan | None:
        """The newest approved held plan of ``policy`` still valid at ``now``."""
        query = (
            select(held_table)
            .where(
                held_table.c.policy == policy,
                held_table.c.status == "approved",
                held_table.c.valid_until > now,
            )
            .order_by(held_table.c.approved_at.desc())
            .limit(1)
        )
        try:
            with self.engine.connect() as connection:
                row = connection.execute(query).first()
        except SQLAlchemyError as exc:
            raise self._fail("reading approvals", exc) from None
        return HeldPlan(**row._mapping) if row is not None else None

    def approvals(self, approval_ids: Sequence[str]) -> dict[str, HeldPlan]:
        """The held plans behind these approvals (for ``reaper explain``)."""
        if not approval_ids:
            return {}
        query = select(held_table).where(held_table.c.approval_id.in_(sorted(set(approval_ids))))
        try:
            with self.engine.connect() as connection:
                rows = [HeldPlan(**row._mapping) for row in connection.execute(query)]
        except SQLAlchemyError as exc:
            raise self._fail("reading approvals", exc) from None
        return {held.approval_id: held for held in rows if held.approval_id is not None}

    # -- deciding ---------------------------------------------------------------------------

    def approve(
        self,
        run_id: str,
        *,
        by: str,
        now: datetime,
        valid_for: timedelta,
        comment: str | None = None,
    ) -> Approval:
        """Approve the held plan of ``run_id``: recorded in the audit (one chained row per id),
        then in force for ``valid_for``."""
        held = self.get(run_id)
        # An approval that expired unused may be given again (a new approval, chained too).
        expired = held.status == "approved" and held.expired(now)
        if held.status != "held" and not expired:
            raise HoldError(f"held run {run_id} is {held.status}: only a held plan is approved")
        until = now + valid_for
        try:
            with self.engine.connect() as connection:
                items = self._items(connection, run_id)
                target_kind = self._target_kind(connection, run_id)
        except SQLAlchemyError as exc:
            raise self._fail("reading a held plan", exc) from None
        note = (
            f"approved by {by} at {now.isoformat()}, valid until {until.isoformat()}, "
            f"held run {run_id} (guard {held.guard})"
        )
        if comment:
            note += f": {comment}"
        approval_id = self.store.record_event(
            self._record(held, target_kind, "approval", by, comment, until),
            _marked(items, Mark.APPROVED, note),
            f"{by} approved the {len(items)} id(s) held by run {run_id} until "
            f"{until.isoformat()}" + (f": {comment}" if comment else ""),
        )
        approved = replace(
            held,
            status="approved",
            approval_id=approval_id,
            approved_by=by,
            approved_at=now,
            valid_until=until,
            comment=comment,
        )
        try:
            self._update(
                run_id,
                held.status,
                "recording an approval",
                status="approved",
                approval_id=approval_id,
                approved_by=by,
                approved_at=now,
                valid_until=until,
                comment=comment,
            )
        except HoldError:
            # A run superseded (or someone rejected) the plan between the approval's rows and
            # its status: the chained approval never took effect, and the audit says so.
            self._void(held, target_kind, items, approval_id, by)
            raise HoldError(
                f"held run {run_id} changed meanwhile (it is now {self.get(run_id).status}); "
                f"the approval {approval_id} did not take effect and is recorded void"
            ) from None
        log.info("plan_approved", held_run=run_id, approval=approval_id, by=by, ids=len(items))
        return Approval(
            approval_id, approved, by, now, until, comment, {i.task_id: i.reason for i in items}
        )

    def _void(
        self,
        held: HeldPlan,
        target_kind: str,
        items: Sequence[Any],
        approval_id: str,
        by: str,
    ) -> None:
        """Record that approval ``approval_id`` (rows already chained) never took effect."""
        note = (
            f"approval {approval_id} by {by} did not take effect: the plan held by run "
            f"{held.run_id} changed meanwhile"
        )
        self.store.record_event(
            self._record(held, target_kind, "rejection", "reaper", note, None),
            _marked(items, Mark.REJECTED, note),
            note,
        )

    def reject(
        self, run_id: str, *, by: str, now: datetime, comment: str | None = None
    ) -> HeldPlan:
        """Drop the held plan of ``run_id`` (held or approved, not yet carried out): recorded in
        the audit (one chained row per id), then its ids are forgotten."""
        held = self.get(run_id)
        if held.status not in ("held", "approved"):
            raise HoldError(f"held run {run_id} is {held.status}: nothing to reject")
        try:
            with self.engine.connect() as connection:
                items = self._items(connection, run_id)
                target_kind = self._target_kind(connection, run_id)
        except SQLAlchemyError as exc:
            raise self._fail("reading a held plan", exc) from None
        note = f"rejected by {by} at {now.isoformat()}, held run {run_id} (guard {held.guard})"
        if comment:
            note += f": {comment}"
        self.store.record_event(
            self._record(held, target_kind, "rejection", by, comment, None),
            _marked(items, Mark.REJECTED, note),
            f"{by} rejected the plan held by run {run_id}" + (f": {comment}" if comment else ""),
        )
        self._update(
            held.run_id,
            held.status,
            "recording a rejection",
            status="rejected",
            closed_at=now,
            closed_by=by,
            close_note=comment,
        )
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    delete(held_items_table).where(held_items_table.c.run_id == run_id)
                )
        except SQLAlchemyError as exc:
            raise self._fail("dropping a rejected plan", exc) from None
        return replace(held, status="rejected", closed_at=now, closed_by=by, close_note=comment)

    def applied(self, held: HeldPlan, run_id: str, now: datetime) -> None:
        """Run ``run_id`` carries out the approval of ``held``: it is not carried out again."""
        self._update(
            held.run_id,
            "approved",
            "recording an applied approval",
            status="applied",
            applied_run_id=run_id,
            closed_at=now,
            close_note=f"carried out by run {run_id}",
        )

    def refused(self, held: HeldPlan, why: str, now: datetime) -> None:
        """The approval of ``held`` cannot be carried out any more (its policy changed)."""
        self._update(
            held.run_id,
            "approved",
            "refusing an approval",
            status="refused",
            closed_at=now,
            close_note=why,
        )

    def _update(self, run_id: str, was: str, action: str, **values: Any) -> None:
        """Set ``values`` on the held plan of ``run_id`` if its status is still ``was``."""
        try:
            with self.engine.begin() as connection:
                changed = connection.execute(
                    update(held_table)
                    .where(held_table.c.run_id == run_id, held_table.c.status == was)
                    .values(**values)
                ).rowcount
        except SQLAlchemyError as exc:
            raise self._fail(action, exc) from None
        if not changed:
            raise HoldError(f"held run {run_id} changed meanwhile (it is no longer {was})")

    @staticmethod
    def _target_kind(connection: Connection, run_id: str) -> str:
        kind = connection.execute(
            select(runs_table.c.target_kind).where(runs_table.c.id == run_id)
        ).scalar()
        return str(kind) if kind is not None else "unknown"

    @staticmethod
    def _record(
        held: HeldPlan,
        target_kind: str,
        mode: str,
        by: str,
        comment: str | None,
        until: datetime | None,
    ) -> RunRecord:
        details = {
            "held_run": held.run_id,
            "by": by,
            "comment": comment,
            "valid_until": until.isoformat() if until is not None else None,
        }
        return RunRecord(
            policy=held.policy,
            policy_hash=held.policy_hash,
            policy_json=json.dumps(details, sort_keys=True, ensure_ascii=False),
            target_kind=target_kind,
            target=held.target,
            mode=mode,
        )
