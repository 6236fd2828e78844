"""Policy leases: N replicas of ``reaper serve`` on one PostgreSQL share the policies.

Without leases every replica schedules every policy and the run ledger lets the first one to fire
run each slot; that is safe but makes N replicas N times the scheduling work and the database
traffic, and shares nothing. With leases each scheduled policy has one holder at a time, and a
replica schedules only the policies it holds:

- Every replica heartbeats a row in ``reaper_replicas`` and renews its leases every third of the
  lease time (``REAPER_LEASE_TTL``, 30s). All times are the database's clock.
- A replica holds at most its fair share, ``ceil(policies / live replicas)``. Below it, it claims
  free or expired leases with ``SELECT ... FOR UPDATE SKIP LOCKED``, so two replicas claiming at
  once take different policies without waiting for each other. Above it (a replica joined), it
  releases the extra ones, idle ones first.
- A replica that stops (SIGTERM) releases its leases; one that dies stops renewing, and the others
  take its policies over once its leases expire. A replica that cannot reach the database stops
  scheduling once its own leases would have expired.

Leases only decide who *schedules* a policy. What makes a slot run once is still the run ledger
(and one run at a time the policy lock), so the moments when two replicas both think they hold a
lease (a renewal that came late) cost at most a skipped fire, never a second run.

On SQLite (one host) there are no leases: ``reaper serve`` schedules every policy.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Integer,
    String,
    Table,
    and_,
    delete,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from reaper.audit import ledger_table, metadata
from reaper.db import UTCDateTime, short_error
from reaper.errors import AuditError
from reaper.settings import redact_url

__all__ = ["LeaseState", "Leases", "leases_table", "replicas_table"]

leases_table = Table(
    "reaper_leases",
    metadata,
    # One row per policy ever scheduled here; holder NULL: free.
    Column("policy", String(128), primary_key=True),
    Column("holder", String(255)),
    Column("expires_at", UTCDateTime),
    Column("acquired_at", UTCDateTime),
)

replicas_table = Table(
    "reaper_replicas",
    metadata,
    # The live replicas: each heartbeats its row; an expired row is a replica gone.
    Column("replica", String(255), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
)


@dataclass(frozen=True)
class LeaseState:
    """What one renewal found: the policies this replica holds, and how many replicas live."""

    held: frozenset[str]
    replicas: int
    #: The database's clock at the renewal.
    now: datetime


class Leases:
    """One replica's leases (sync: call it from a thread)."""

    def __init__(self, engine: Engine, ttl: timedelta, replica: str | None = None) -> None:
        self.engine = engine
        self.ttl = ttl
        host = socket.gethostname()
        # The pid alone repeats across container restarts (often 1): a random part keeps a new
        # process from inheriting a dead one's leases before they expire.
        self.replica = replica or f"{host[:200]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._host = host[:255]
        self._started: datetime | None = None
        self._rows: set[str] = set()
        # A renewal still queued or running in its thread when shutdown releases must not renew
        # (nor heartbeat) after it.
        self._serial = threading.Lock()
        self._released = False

    def _fail(self, action: str, exc: SQLAlchemyError) -> AuditError:
        return AuditError(f"{action} on {redact_url(self.engine.url)} failed: {short_error(exc)}")

    def tick(
        self, policies: Sequence[str], busy: Collection[str] = (), *, share: bool = True
    ) -> LeaseState:
        """Heartbeat, renew, then release above or claim up to the fair share.

        ``policies`` are the scheduled policies this replica knows; ``busy`` the ones running
        here now (released last when this replica holds too many). ``share=False`` (stopping):
        renew the held ones among ``policies``, release the others, claim nothing.
        """
        try:
            with self._serial:
                if self._released:
                    return LeaseState(frozenset(), 0, datetime.now(UTC))
                with self.engine.begin() as connection:
                    return self._tick(connection, sorted(set(policies)), set(busy), share)
        except SQLAlchemyError as exc:
            self._rows.clear()  # the rows this transaction inserted were rolled back
            raise self._fail("renewing policy leases", exc) from None

    def _tick(
        self, connection: Connection, wanted: list[str], busy: set[str], sharing: bool
    ) -> LeaseState:
        now = _db_now(connection)
        expires = now + self.ttl
        self._heartbeat(connection, now, expires)
        connection.execute(delete(replicas_table).where(replicas_table.c.expires_at <= now))
        replicas = connection.execute(
            select(func.count())
            .select_from(replicas_table)
            .where(replicas_table.c.expires_at > now)
        ).scalar_one()
        self._ensure_rows(connection, wanted)
        # Leases of policies this replica no longer has (a reload dropped them) go back.
        connection.execute(
            update(leases_table)
            .where(leases_table.c.holder == self.replica, leases_table.c.policy.not_in(wanted))
            .values(holder=None, expires_at=None)
        )
        held = set(
            connection.execute(
                update(leases_table)
                .where(leases_table.c.holder == self.replica, leases_table.c.policy.in_(wanted))
                .values(expires_at=expires)
                .returning(leases_table.c.policy)
            ).scalars()
        )
        share = math.ceil(len(wanted) / max(1, replicas)) if sharing else len(held)
        if len(held) > share:
            extra = sorted(held, key=lambda name: (name in busy, name))[: len(held) - share]
            connection.execute(
                update(leases_table)
                .where(leases_table.c.holder == self.replica, leases_table.c.policy.in_(extra))
                .values(holder=None, expires_at=None)
            )
            held -= set(extra)
        elif len(held) < share:
            free = (
                select(leases_table.c.policy)
                .where(
                    leases_table.c.policy.in_(wanted),
                    or_(leases_table.c.holder.is_(None), leases_table.c.expires_at <= now),
                )
                .order_by(leases_table.c.policy)
                .limit(share - len(held))
                .with_for_update(skip_locked=True)
            )
            claimed = connection.execute(
                update(leases_table)
                .where(leases_table.c.policy.in_(free.scalar_subquery()))
                .values(holder=self.replica, expires_at=expires, acquired_at=now)
                .returning(leases_table.c.policy)
            ).scalars()
            held |= set(claimed)
        return LeaseState(frozenset(held), int(replicas), now)

    def _heartbeat(self, connection: Connection, now: datetime, expires: datetime) -> None:
        if self._started is None:
            self._started = now
        insert_ = pg_insert if connection.dialect.name == "postgresql" else sqlite_insert
        statement = insert_(replicas_table).values(
            replica=self.replica,
            host=self._host,
            pid=os.getpid(),
            started_at=self._started,
            expires_at=expires,
        )
        connection.execute(
            statement.on_conflict_do_update(
                index_elements=["replica"], set_={"expires_at": statement.excluded.expires_at}
            )
        )

    def _ensure_rows(self, connection: Connection, wanted: list[str]) -> None:
        new = [name for name in wanted if name not in self._rows]
        if not new:
            return
        insert_ = pg_insert if connection.dialect.name == "postgresql" else sqlite_insert
        connection.execute(
            insert_(leases_table)
            .values([{"policy": name} for name in new])
            .on_conflict_do_nothing(index_elements=["policy"])
        )
        self._rows.update(new)

    def release(self) -> None:
        """Give every lease back and leave the replica set (on shutdown; renewals end)."""
        try:
            with self._serial, self.engine.begin() as connection:
                self._released = True
                connection.execute(
                    update(leases_table)
                    .where(leases_table.c.holder == self.replica)
                    .values(holder=None, expires_at=None)
                )
                connection.execute(
                    delete(replicas_table).where(replicas_table.c.replica == self.replica)
                )
        except SQLAlchemyError as exc:
            raise self._fail("releasing policy leases", exc) from None

    def slot_claimed(self, policy: str, slot: datetime) -> bool:
        """Whether a run already claimed this slot of the policy in the run ledger."""
        try:
            with self.engine.connect() as connection:
                found = connection.execute(
                    select(ledger_table.c.policy).where(
                        and_(ledger_table.c.policy == policy, ledger_table.c.slot == slot)
                    )
                ).first()
        except SQLAlchemyError as exc:
            raise self._fail("reading the run ledger", exc) from None
        return found is not None

    def holders(self) -> dict[str, str | None]:
        """Each policy's current holder (None: free or expired), for logs and tests."""
        try:
            with self.engine.connect() as connection:
                now = _db_now(connection)
                rows = connection.execute(select(leases_table)).all()
        except SQLAlchemyError as exc:
            raise self._fail("reading policy leases", exc) from None
        return {
            row.policy: row.holder if row.expires_at is not None and row.expires_at > now else None
            for row in rows
        }


def _db_now(connection: Connection) -> datetime:
    if connection.dialect.name == "postgresql":
        value: datetime = connection.execute(text("SELECT CURRENT_TIMESTAMP")).scalar_one()
        return value.astimezone(UTC)
    raw = connection.execute(text("SELECT strftime('%Y-%m-%dT%H:%M:%f', 'now')")).scalar_one()
    return datetime.fromisoformat(raw).replace(tzinfo=UTC)
