"""The audit log: one row per run and one row per task reaper acted on, durably.

Deletion rows are written ahead: a row is inserted as ``pending`` before the delete request that
carries its id leaves, and updated to the outcome after the answer (``deleted``, ``already_gone``,
``failed``, or ``unknown`` when the answer was lost). If the database cannot take the intent, the
request is not sent. Writes are batched per request, not one transaction per row.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Select,
    String,
    Table,
    Text,
    UniqueConstraint,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from reaper.db import UTCDateTime, database_failure
from reaper.errors import AuditError
from reaper.settings import redact_url
from reaper.targets.base import DeleteResult, Outcome

__all__ = [
    "RETENTION_POLICY",
    "Acknowledged",
    "AuditEntry",
    "AuditRow",
    "AuditStore",
    "ChainProblem",
    "Correction",
    "Mark",
    "RunRecord",
    "RunSummary",
    "audit_table",
    "ledger_table",
    "metadata",
    "runs_table",
]

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

_Id = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements INTEGER keys only

runs_table = Table(
    "reaper_runs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("policy", String(128), nullable=False),
    Column("policy_hash", String(64), nullable=False),
    Column("policy_json", Text, nullable=False),
    Column("target_kind", String(32), nullable=False),
    Column("target", String(512), nullable=False),
    Column("mode", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("listed", BigInteger, nullable=False, default=0),
    Column("eligible", BigInteger, nullable=False, default=0),
    Column("kept", BigInteger, nullable=False, default=0),
    Column("deleted", BigInteger, nullable=False, default=0),
    Column("already_gone", BigInteger, nullable=False, default=0),
    Column("failed", BigInteger, nullable=False, default=0),
    Column("unknown", BigInteger, nullable=False, default=0),
    Column("skipped", BigInteger, nullable=False, default=0),
    Column("reclaimed_bytes", BigInteger, nullable=False, default=0),
    Column("error", Text),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    # The hash of the newest finalized row of this run, and how many rows the chain holds.
    Column("chain_head", String(64)),
    Column("chain_length", Integer, nullable=False, default=0, server_default="0"),
    Column("skipped_changed", BigInteger, nullable=False, default=0, server_default="0"),
    Column("acknowledged_not_deleted", BigInteger, nullable=False, default=0, server_default="0"),
    # The highest `deleted` audit row id of the policy that this run's listing checked.
    Column("verified_through", BigInteger),
    # Listed tasks the plan protected because their age field lay in the future, and the
    # target's clock minus ours (HTTP Date, seconds): what the run's ages were based on.
    Column("future_timestamps", BigInteger, nullable=False, default=0, server_default="0"),
    Column("clock_skew_seconds", Float),
    # The approval (the run recording it) this run carried out, if any.
    Column("approval_id", String(36)),
    Index(None, "policy", "started_at"),
    Index(None, "started_at"),
)

audit_table = Table(
    "reaper_audit",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("run_id", String(36), ForeignKey("reaper_runs.id"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("policy", String(128), nullable=False),
    Column("target", String(512), nullable=False),
    Column("task_id", String(255), nullable=False),
    Column("outcome", String(24), nullable=False),
    Column("reason", Text, nullable=False),
    Column("task_status", String(64)),
    Column("task_timestamp", UTCDateTime),
    Column("task_age_seconds", BigInteger),
    Column("http_status", Integer),
    Column("error_code", String(128)),
    Column("error_message", Text),
    Column("reclaimed_bytes", BigInteger),
    Column("files_count", Integer),
    Column("note", Text),
    Column("recorded_at", UTCDateTime, nullable=False),
    Column("decided_at", UTCDateTime),
    # Position in the run's hash chain and the hash over this row and the previous one; set when
    # the row gets its final outcome (pending and unknown rows are not yet in the chain).
    Column("chain_seq", Integer),
    Column("row_hash", String(64)),
    # The approval a deletion carries out (reaper.holds), and the task's record as listed (JSON,
    # bounded): both covered by the chain when present.
    Column("approval_id", String(36)),
    Column("snapshot", Text),
    UniqueConstraint("run_id", "task_id"),
    Index(None, "task_id"),
    Index(None, "recorded_at"),
    Index(None, "policy", "recorded_at"),
)

ledger_table = Table(
    "reaper_ledger",
    metadata,
    # One row per policy and scheduled slot: whoever inserts it first runs that slot.
    Column("policy", String(128), primary_key=True),
    Column("slot", UTCDateTime, primary_key=True),
    Column("claimed_at", UTCDateTime, nullable=False),
    Column("run_id", String(36)),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
)

#: Outcomes a finished deletion row can have (``unknown`` is not among them: reconciliation
#: settles it, so it joins its run's hash chain only then).
FINAL_OUTCOMES = frozenset({Outcome.DELETED, Outcome.ALREADY_GONE, Outcome.FAILED})


@dataclass(frozen=True)
class RunRecord:
    """What is known about a run when it starts."""

    policy: str
    policy_hash: str
    policy_json: str
    target_kind: str
    target: str
    mode: str
    #: The approval this run carries out: every row it writes names it.
    approval_id: str | None = None


@dataclass
class RunSummary:
    """The counts of a run, updated as it goes and stored when it ends."""

    listed: int = 0
    eligible: int = 0
    kept: int = 0
    deleted: int = 0
    already_gone: int = 0
    failed: int = 0
    unknown: int = 0
    skipped: int = 0
    dry_run: int = 0
    reclaimed_bytes: int = 0
    #: Dropped at send time: the re-check saw them live, gone or no longer eligible.
    skipped_changed: int = 0
    #: Earlier deletions the target acknowledged but a listing of this run still showed present.
    acknowledged_not_deleted: int = 0
    #: Tasks protected because their age field lay in the future (a zone or clock is wrong).
    future_timestamps: int = 0
    #: The target's clock minus ours, from the HTTP Date of its answers (None: none had one).
    clock_skew_seconds: float | None = None

    def count(self, result: DeleteResult) -> None:
        if result.outcome is Outcome.DELETED:
            self.deleted += 1
            self.reclaimed_bytes += result.reclaimed_bytes or 0
        elif result.outcome is Outcome.ALREADY_GONE:
            self.already_gone += 1
        elif result.outcome is Outcome.FAILED:
            self.failed += 1
        elif result.outcome is Outcome.UNKNOWN:
            self.unknown += 1
        elif result.outcome is Outcome.SKIPPED_CHANGED:
            self.skipped_changed += 1


class Mark(StrEnum):
    """What a person did about a task: the outcome of a row in a run of its own (mode ``pin``,
    ``unpin``, ``approval`` or ``rejection``), chained like any other row."""

    PINNED = "pinned"
    UNPINNED = "unpinned"
    APPROVED = "approved"
    REJECTED = "rejected"


@dataclass(frozen=True)
class AuditEntry:
    """One task reaper is about to act on (or decided not to send)."""

    task_id: str
    reason: str
    task_status: str | None
    task_timestamp: datetime | None
    outcome: Outcome | Mark = Outcome.PENDING
    error_message: str | None = None
    note: str | None = None
    #: The task's record as the target listed it (JSON, bounded; see reaper.plan). Kept as
    #: UTF-8 bytes until it is written: a plan's thousands of queued rows hold it compactly.
    snapshot: str | bytes | None = None

    def __post_init__(self) -> None:
        if self.task_timestamp is not None and self.task_timestamp.tzinfo is None:
            raise ValueError(f"naive timestamp for task {self.task_id!r}: refused by the audit")


@dataclass(frozen=True)
class Acknowledged:
    """A deletion the target acknowledged (a ``deleted`` row), to check against a listing."""

    row_id: int
    run_id: str
    task_id: str
    decided_at: datetime | None


@dataclass(frozen=True)
class Correction:
    """A listing still shows a task whose deletion the target had acknowledged."""

    acknowledged: Acknowledged
    status: str
    timestamp: datetime | None
    #: When, and by what, the task was seen present (e.g. "the listing of run <id>").
    seen_at: datetime
    seen_by: str

    def note(self) -> str:
        ack = self.acknowledged
        when = ack.decided_at.isoformat() if ack.decided_at is not None else "an unknown time"
        return (
            f"acknowledged as deleted in run {ack.run_id} at {when} (audit row {ack.row_id}); "
            f"{self.seen_by} at {self.seen_at.isoformat()} still shows it present "
            f"(status {self.status})"
        )


#: The reason of a correction row.
CORRECTION_REASON = (
    "correction: the target acknowledged this deletion, but a later listing still shows the task"
)


@dataclass(frozen=True)
class AuditRow:
    """One row of the audit log, as ``reaper audit`` shows it."""

    id: int
    run_id: str
    seq: int
    policy: str
    target: str
    task_id: str
    outcome: str
    reason: str
    task_status: str | None
    task_timestamp: datetime | None
    task_age_seconds: int | None
    http_status: int | None
    error_code: str | None
    error_message: str | None
    reclaimed_bytes: int | None
    files_count: int | None
    note: str | None
    recorded_at: datetime
    decided_at: datetime | None
    chain_seq: int | None = None
    row_hash: str | None = None
    approval_id: str | None = None
    snapshot: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            name: (value.isoformat() if isinstance(value, datetime) else value)
            for name, value in self.__dict__.items()
        }


@dataclass
class _RunState:
    record: RunRecord
    seq: int = 0
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    #: The snapshot digest of each row written pending (or resolved unknown) that has one: its
    #: outcome's hash covers it.
    digests: dict[str, str] = field(default_factory=dict)


GENESIS = "0" * 64
#: An audit row about to be written: its own values, in _ENTRY_FIELDS or _RESOLVE_FIELDS order.
_Row = list[Any]
# The chain's serialisation of a row (one encoder: json.dumps would build one per call).
_CANONICAL_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


@functools.lru_cache(maxsize=64)
def _isoformat(decided: datetime) -> str:
    # The rows of one write share their decision time: format it once.
    return decided.astimezone(UTC).isoformat()


def sqlite_datetime(value: datetime | None) -> str | None:
    """What UTCDateTime stores on SQLite for ``value``: the UTC wall time, microseconds always.

    The same text as SQLAlchemy's SQLite DATETIME bind processor (a test holds them equal), for
    the audit's executemany fast path.
    """
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetime refused by the audit database")
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


def row_hash(previous: str, policy_hash: str, row: Mapping[str, Any]) -> str:
    """The chain hash of one finalized audit row.

    It covers the previous row's hash, the run, the row's place in the chain, the task, the
    outcome, the policy version and what the target answered, and, on rows that have them, the
    approval carried out and the task's listed record (:func:`_extension`); editing any of them,
    or removing a row, breaks every later link.
    """
    decided = row["decided_at"]
    content = [
        row["run_id"],
        row["chain_seq"],
        row["task_id"],
        row["outcome"],
        policy_hash,
        row["http_status"],
        row["error_code"],
        row["error_message"],
        row["reclaimed_bytes"],
        row["note"],
        _isoformat(decided) if decided is not None else None,
    ]
    snapshot = row.get("snapshot")
    extension = _extension(
        snapshot_digest(snapshot) if snapshot is not None else None, row.get("approval_id")
    )
    return _link_hash(previous, content + extension if extension else content)


def snapshot_digest(snapshot: str | bytes) -> str:
    """What a row's chain hash covers of its snapshot: the SHA-256 of its text (UTF-8)."""
    if isinstance(snapshot, str):
        snapshot = snapshot.encode("utf-8", "surrogatepass")
    return hashlib.sha256(snapshot).hexdigest()


def _extension(digest: str | None, approval_id: str | None) -> list[Any]:
    """What a row's hash covers beyond the original eleven values: the snapshot's digest and the
    approval, and only on rows that have one of them, so rows written before they existed hash
    (and verify) as they always did."""
    if digest is None and approval_id is None:
        return []
    return [digest, approval_id]


def _link_hash(previous: str, content: list[Any]) -> str:
    # ``content`` in row_hash's order; AuditStore's write path builds it inline, per row.
    return hashlib.sha256(previous.encode() + canonical_json(content)).hexdigest()


def canonical_json(content: list[Any]) -> bytes:
    """``json.dumps(content, separators=(",", ":"), ensure_ascii=False)`` as UTF-8, fast.

    orjson writes the same bytes for strings, 64-bit integers and null (a hypothesis test holds
    them equal) at a fraction of the cost; what it refuses (lone surrogates, larger integers) goes
    through the standard library, as every row did before.
    """
    try:
        return orjson.dumps(content)
    except TypeError:
        return _CANONICAL_JSON.encode(content).encode()


@dataclass
class _Chain:
    """A run's hash chain inside one transaction: load the head, append rows, store it."""

    run_id: str
    policy_hash: str
    head: str
    length: int
    #: The run's approval: each of its rows names it.
    approval_id: str | None = None

    @classmethod
    def load(cls, connection: Connection, run_id: str) -> _Chain:
        query = select(
            runs_table.c.policy_hash,
            runs_table.c.chain_head,
            runs_table.c.chain_length,
            runs_table.c.approval_id,
        ).where(runs_table.c.id == run_id)
        if connection.dialect.name == "postgresql":
            query = query.with_for_update()  # one writer per chain, even across processes
        row = connection.execute(query).one()
        return cls(
            run_id, row.policy_hash, row.chain_head or GENESIS, row.chain_length, row.approval_id
        )

    def link(
        self,
        row: _Row,
        error_message: str | None,
        note: str | None,
        decided: str,
        digest: str | None = None,
    ) -> None:
        """Chain an entry row inserted already final (dry run, skipped): set its chain fields."""
        self.length += 1
        task_id, outcome = row[_TASK_ID], row[_OUTCOME]
        content = [self.run_id, self.length, task_id, outcome, self.policy_hash]
        content += [None, None, error_message, None, note, decided]
        content += _extension(digest, self.approval_id)
        self.head = _link_hash(self.head, content)
        row[_CHAIN_SEQ], row[_ROW_HASH] = self.length, self.head

    def store(self, connection: Connection) -> None:
        connection.execute(
            update(runs_table)
            .where(runs_table.c.id == self.run_id)
            .values(chain_head=self.head, chain_length=self.length)
        )


class AuditStore:
    """Reads and writes the audit tables. Every failure is an AuditError: callers fail closed."""

    def __init__(self, engine: Engine, *, clock: Any = None) -> None:
        self.engine = engine
        self._clock = clock or (lambda: datetime.now(UTC))
        self._runs: dict[str, _RunState] = {}

    def _now(self) -> datetime:
        now: datetime = self._clock()
        return now

    def _fail(self, action: str, exc: SQLAlchemyError) -> AuditError:
        return database_failure(self.engine, action, exc)

    # -- runs ---------------------------------------------------------------------------------

    def start_run(self, record: RunRecord) -> str:
        """Insert a run row (status ``running``) and return its id."""
        run_id = str(uuid.uuid4())
        state = _RunState(record, started_at=self._now())
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    insert(runs_table).values(
                        id=run_id,
                        policy=record.policy,
                        policy_hash=record.policy_hash,
                        policy_json=record.policy_json,
                        target_kind=record.target_kind,
                        target=record.target,
                        mode=record.mode,
                        status="running",
                        started_at=state.started_at,
                        approval_id=record.approval_id,
                        host=socket.gethostname()[:255],
                        pid=os.getpid(),
                    )
                )
        except SQLAlchemyError as exc:
            raise self._fail("starting a run", exc) from None
        self._runs[run_id] = state
        return run_id

    def finish_run(
        self, run_id: str, status: str, summary: RunSummary, error: str | None = None
    ) -> None:
        """Store a run's final status and counts."""
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    update(runs_table)
                    .where(runs_table.c.id == run_id)
                    .values(
                        status=status,
                        finished_at=self._now(),
                        listed=summary.listed,
                        eligible=summary.eligible,
                        kept=summary.kept,
                        deleted=summary.deleted,
                        already_gone=summary.already_gone,
                        failed=summary.failed,
                        unknown=summary.unknown,
                        skipped=summary.skipped,
                        reclaimed_bytes=summary.reclaimed_bytes,
                        skipped_changed=summary.skipped_changed,
                        acknowledged_not_deleted=summary.acknowledged_not_deleted,
                        future_timestamps=summary.future_timestamps,
                        clock_skew_seconds=summary.clock_skew_seconds,
                        error=error,
                    )
                )
        except SQLAlchemyError as exc:
            raise self._fail("finishing a run", exc) from None
        self._runs.pop(run_id, None)

    # -- rows ---------------------------------------------------------------------------------

    def record(self, run_id: str, entries: Sequence[AuditEntry]) -> None:
        """Insert rows in one transaction: ``pending`` intents, or final rows (dry run, skipped)."""
        self.write(run_id, entries, ())

    def resolve(
        self, run_id: str, results: Iterable[DeleteResult], *, note: str | None = None
    ) -> None:
        """Turn ``pending``/``unknown`` rows of ``run_id`` into their outcomes, in one transaction.

        Each resolved row joins the run's hash chain. ``note`` is appended to every row's note
        (reconciliation says so there).
        """
        self.write(run_id, (), results, note=note)

    def write(
        self,
        run_id: str,
        entries: Sequence[AuditEntry],
        results: Iterable[DeleteResult],
        *,
        note: str | None = None,
    ) -> None:
        """Insert ``entries`` and resolve ``results`` of ``run_id`` in one transaction.

        This is the group commit of a run's deletions: the intents of the batches about to be
        sent and the outcomes of the batches answered since the last commit, durable together
        with one commit. If it fails, none of it is written.

        It runs once per group with thousands of rows, so rows are built with as little Python
        as it takes: each row holds only its own values (what a write's rows share is bound
        once), datetimes are left to the JSON encoder and the database, and an outcome's chain
        hash is taken in the loop that builds its row.
        """
        now = self._now()
        results = results if isinstance(results, list) else list(results)
        state = self._runs.get(run_id)
        rows, decided = self._entry_rows(entries, now, state)
        if not rows and not results:
            return
        try:
            with self.engine.begin() as connection:
                chain = _Chain.load(connection, run_id) if decided or results else None
                if rows:
                    if chain is not None:
                        decided_at = _isoformat(now)
                        for row, error_message, entry_note, digest in decided:
                            chain.link(row, error_message, entry_note, decided_at, digest)
                    self._insert(connection, run_id, rows, now)
                if chain is not None and results:
                    digests = state.digests if state is not None else None
                    if digests is None:
                        digests = _stored_digests(connection, run_id, results)
                    self._update(connection, chain, results, now, note, digests)
                if chain is not None:
                    chain.store(connection)
            if state is not None and state.digests and results:
                unknown = Outcome.UNKNOWN
                for result in results:
                    # An unknown outcome may be resolved again: its digest is still needed.
                    if result.outcome is not unknown:
                        state.digests.pop(result.task_id, None)
        except SQLAlchemyError as exc:
            what = " and ".join(
                part
                for part in (
                    f"{len(rows)} row(s)" if rows else "",
                    f"{len(results)} outcome(s)" if results else "",
                )
                if part
            )
            raise self._fail(f"recording {what}", exc) from None

    def _entry_rows(
        self, entries: Sequence[AuditEntry], now: datetime, state: _RunState | None
    ) -> tuple[list[_Row], list[tuple[_Row, str | None, str | None, str | None]]]:
        """One list per entry in ``_ENTRY_FIELDS`` order, and the rows already final (with
        their error message, note and snapshot digest, which the chain covers). The snapshot
        digests of pending rows are kept in ``state`` for their outcomes."""
        if not entries:
            return [], []
        rows: list[_Row] = []
        decided: list[tuple[_Row, str | None, str | None, str | None]] = []
        pending = Outcome.PENDING
        for entry in entries:
            stamp = entry.task_timestamp
            age = None
            if stamp is not None:
                if stamp.tzinfo is not UTC:
                    stamp = stamp.astimezone(UTC)
                age = int((now - stamp).total_seconds())
            outcome = entry.outcome
            snapshot = entry.snapshot  # bytes until its insert statement is built (_insert)
            row: _Row = [entry.task_id, outcome, entry.reason, entry.task_status, stamp, age]
            # chain_seq, row_hash: set when the row is final
            row += [entry.error_message, entry.note, None, None, snapshot]
            rows.append(row)
            digest = snapshot_digest(snapshot) if snapshot is not None else None
            if outcome is not pending:
                decided.append((row, entry.error_message, entry.note, digest))
            elif digest is not None and state is not None:
                state.digests[entry.task_id] = digest
        return rows, decided

    def _insert(self, connection: Connection, run_id: str, rows: list[_Row], now: datetime) -> None:
        # One statement per write, its rows in one JSON array parameter: the database parses
        # and inserts them (off the GIL, often on another core), where per-row parameters
        # would cost Python time per value. A large write goes in a few statements, so the JSON
        # text (snapshots make rows large) stays a bounded size.
        state = self._runs[run_id]
        seq, state.seq = state.seq, state.seq + len(rows)
        policy, target = state.record.policy, state.record.target
        approval = state.record.approval_id
        postgresql = connection.dialect.name == "postgresql"
        stamp = sqlite_datetime(now)
        for start in range(0, len(rows), _INSERT_CHUNK):
            chunk = rows[start : start + _INSERT_CHUNK]
            for row in chunk:
                if isinstance(row[_SNAPSHOT], bytes):
                    row[_SNAPSHOT] = row[_SNAPSHOT].decode()
            document = _json_rows(chunk)
            if postgresql:
                params = {"run_id": run_id, "seq": seq + start, "policy": policy}
                params.update(target=target, now=now, approval_id=approval, rows=document)
                connection.exec_driver_sql(_PG_RECORD, params)
            else:
                connection.exec_driver_sql(
                    _SQLITE_RECORD,
                    (run_id, seq + start, policy, target, stamp, document, approval),
                )
            del document
            for row in chunk:
                row[_SNAPSHOT] = None  # written: only one statement's snapshots are text at once

    def _update(
        self,
        connection: Connection,
        chain: _Chain,
        results: list[DeleteResult],
        now: datetime,
        note: str | None,
        digests: Mapping[str, str],
    ) -> None:
        """Resolve ``results``: each row in ``_RESOLVE_FIELDS`` order, chained as it is built
        (``unknown`` rows are not: they are settled later). ``digests`` holds the snapshot
        digest of the rows that have a snapshot."""
        run_id, policy_hash, decided = chain.run_id, chain.policy_hash, _isoformat(now)
        head, length = chain.head, chain.length
        unsettled = Outcome.UNKNOWN
        approval = chain.approval_id
        rows: list[_Row] = []
        for result in results:
            result_note = result.note
            if note is not None:
                result_note = f"{result_note}; {note}" if result_note else note
            code = _clip(result.error_code, 128)
            message = _clip(result.error_message, 4000)
            result_note = _clip(result_note, 4000)
            task_id, outcome = result.task_id, result.outcome
            http_status, reclaimed = result.http_status, result.reclaimed_bytes
            if outcome is unsettled:
                # Not final: reconciliation settles it later, and a row in the chain can never
                # change again. It joins the chain when it is settled, as a pending row does.
                answer = [task_id, outcome, http_status, code, message, reclaimed]
                rows.append([*answer, result.files_count, result_note, None, None])
                continue
            length += 1
            # row_hash's content, in its order: the outcome (a StrEnum) serialises as its text.
            content = [
                run_id,
                length,
                task_id,
                outcome,
                policy_hash,
                http_status,
                code,
                message,
                reclaimed,
                result_note,
                decided,
            ]
            if digests or approval is not None:
                content += _extension(digests.get(task_id), approval)
            head = _link_hash(head, content)
            rows.append(
                [
                    task_id,
                    outcome,
                    http_status,
                    code,
                    message,
                    reclaimed,
                    result.files_count,
                    result_note,
                    length,
                    head,
                ]
            )
        chain.head, chain.length = head, length
        values = _json_rows(rows)
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(
                _PG_RESOLVE, {"run_id": run_id, "decided_at": now, "rows": values}
            )
            return
        connection.exec_driver_sql(_SQLITE_RESOLVE, (sqlite_datetime(now), values, run_id))

    # -- queries ------------------------------------------------------------------------------

    def rows(
        self,
        *,
        policy: str | None = None,
        task_id: str | None = None,
        run_id: str | None = None,
        outcome: str | None = None,
        since: datetime | None = None,
        limit: int | None = 1000,
    ) -> list[AuditRow]:
        """Audit rows, newest first, filtered."""
        return list(
            self.stream_rows(
                policy=policy,
                task_id=task_id,
                run_id=run_id,
                outcome=outcome,
                since=since,
                limit=limit,
            )
        )

    def stream_rows(
        self,
        *,
        policy: str | None = None,
        task_id: str | None = None,
        run_id: str | None = None,
        outcome: str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
        chunk: int = 1000,
    ) -> Iterator[AuditRow]:
        """Audit rows, newest first, filtered, read ``chunk`` at a time (all of them by default).

        Memory stays bounded however many rows match: PostgreSQL reads through a server-side
        cursor, SQLite steps its cursor. The connection is held until the iterator is exhausted
        or closed.
        """
        query = self._rows_query(policy, task_id, run_id, outcome, since)
        if limit is not None:
            query = query.limit(limit)
        try:
            with self.engine.connect() as connection:
                # Closing the result closes the (server-side) cursor when a reader stops early.
                with connection.execution_options(yield_per=chunk).execute(query) as result:
                    for row in result:
                        yield AuditRow(**row._mapping)
        except SQLAlchemyError as exc:
            raise self._fail("reading audit rows", exc) from None

    def count_rows(
        self,
        *,
        policy: str | None = None,
        task_id: str | None = None,
        run_id: str | None = None,
        outcome: str | None = None,
        since: datetime | None = None,
    ) -> int:
        """How many audit rows match the filters of :meth:`stream_rows`."""
        query = self._rows_query(policy, task_id, run_id, outcome, since).order_by(None)
        try:
            with self.engine.connect() as connection:
                return int(
                    connection.execute(
                        select(func.count()).select_from(query.subquery())
                    ).scalar_one()
                )
        except SQLAlchemyError as exc:
            raise self._fail("counting audit rows", exc) from None

    @staticmethod
    def _rows_query(
        policy: str | None,
        task_id: str | None,
        run_id: str | None,
        outcome: str | None,
        since: datetime | None,
    ) -> Select[Any]:
        query = select(audit_table).order_by(audit_table.c.id.desc())
        if policy is not None:
            query = query.where(audit_table.c.policy == policy)
        if task_id is not None:
            query = query.where(audit_table.c.task_id == task_id)
        if run_id is not None:
            query = query.where(audit_table.c.run_id == run_id)
        if outcome is not None:
            query = query.where(audit_table.c.outcome == outcome)
        if since is not None:
            query = query.where(audit_table.c.recorded_at >= since)
        return query

    def recent_eligible(self, policy: str, count: int) -> list[int]:
        """Eligible counts of the policy's last ``count`` completed deleting runs, newest first.

        Runs a guard refused, dry runs and runs that never got to plan are not history.
        """
        query = (
            select(runs_table.c.eligible)
            .where(
                runs_table.c.policy == policy,
                runs_table.c.mode.in_(("run", "apply")),
                runs_table.c.status.in_(("succeeded", "partial")),
            )
            .order_by(runs_table.c.started_at.desc())
            .limit(count)
        )
        try:
            with self.engine.connect() as connection:
                return [int(value) for value in connection.execute(query).scalars()]
        except SQLAlchemyError as exc:
            raise self._fail("reading run history", exc) from None

    def unresolved(self, policy: str, *, exclude_run: str | None = None) -> list[AuditRow]:
        """``pending``/``unknown`` rows of the policy's other runs: what reconciliation resolves."""
        query = (
            select(audit_table)
            .where(
                audit_table.c.policy == policy,
                audit_table.c.outcome.in_((Outcome.PENDING.value, Outcome.UNKNOWN.value)),
            )
            .order_by(audit_table.c.id)
        )
        if exclude_run is not None:
            query = query.where(audit_table.c.run_id != exclude_run)
        try:
            with self.engine.connect() as connection:
                return [AuditRow(**row._mapping) for row in connection.execute(query)]
        except SQLAlchemyError as exc:
            raise self._fail("reading unresolved rows", exc) from None

    def contradicted(self, policy: str) -> set[str]:
        """Tasks whose latest deletion by the policy may have been carried out although a
        listing still showed them present: their newest row is a ``not_deleted`` correction of
        an acknowledged deletion, or an ``unknown`` row (a 5xx, a lost answer: it keeps its
        error) that reconciliation settled ``not_deleted``; and no deletion was recorded since.

        When the target later finds nothing left to delete for such a task, the earlier request
        did the work and only the target's record of it was lost: the deletion is ours.
        """
        later = audit_table.alias("later")
        query = select(audit_table.c.task_id).where(
            audit_table.c.policy == policy,
            audit_table.c.outcome == Outcome.NOT_DELETED.value,
            or_(
                audit_table.c.reason == CORRECTION_REASON,
                audit_table.c.error_message.is_not(None),
            ),
            ~exists().where(
                later.c.policy == policy,
                later.c.task_id == audit_table.c.task_id,
                later.c.outcome.in_((Outcome.DELETED.value, Outcome.ALREADY_GONE.value)),
                later.c.decided_at > audit_table.c.decided_at,
            ),
        )
        try:
            with self.engine.connect() as connection:
                return set(connection.execute(query).scalars())
        except SQLAlchemyError as exc:
            raise self._fail("reading contradicted deletions", exc) from None

    def acknowledged(
        self, policy: str, *, exclude_run: str | None = None, only_run: str | None = None
    ) -> list[Acknowledged]:
        """The policy's ``deleted`` rows no listing has checked yet (newer than the highest
        ``verified_through`` of its runs), oldest first; of one run with ``only_run``."""
        through = (
            select(func.max(runs_table.c.verified_through))
            .where(runs_table.c.policy == policy)
            .scalar_subquery()
        )
        query = (
            select(
                audit_table.c.id,
                audit_table.c.run_id,
                audit_table.c.task_id,
                audit_table.c.decided_at,
            )
            .where(
                audit_table.c.policy == policy,
                audit_table.c.outcome == Outcome.DELETED.value,
                audit_table.c.id > func.coalesce(through, 0),
            )
            .order_by(audit_table.c.id)
        )
        if exclude_run is not None:
            query = query.where(audit_table.c.run_id != exclude_run)
        if only_run is not None:
            query = query.where(audit_table.c.run_id == only_run)
        try:
            with self.engine.connect() as connection:
                return [Acknowledged(*row) for row in connection.execute(query)]
        except SQLAlchemyError as exc:
            raise self._fail("reading acknowledged deletions", exc) from None

    def verified(self, run_id: str, through: int) -> None:
        """Record that ``run_id``'s listing checked the policy's deleted rows up to ``through``."""
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    update(runs_table)
                    .where(runs_table.c.id == run_id)
                    .values(verified_through=through)
                )
        except SQLAlchemyError as exc:
            raise self._fail("recording a verification", exc) from None

    def record_corrections(
        self, record: RunRecord, corrections: Sequence[Correction], *, through: int | None = None
    ) -> str:
        """Record corrections as a run of their own (mode ``correction``): one final
        ``not_deleted`` row per task, chained like any run. The acknowledged rows stay as they
        are: corrections are new rows, never edits. Returns the run id."""
        run_id = self.start_run(record)
        entries = [
            AuditEntry(
                c.acknowledged.task_id,
                CORRECTION_REASON,
                c.status,
                c.timestamp,
                Outcome.NOT_DELETED,
                note=c.note(),
            )
            for c in corrections
        ]
        self.record(run_id, entries)
        summary = RunSummary(acknowledged_not_deleted=len(entries))
        self.finish_run(
            run_id,
            "succeeded",
            summary,
            f"{len(entries)} acknowledged deletion(s) not carried out; the tasks are eligible "
            "again",
        )
        if through is not None:
            self.verified(run_id, through)
        return run_id

    def record_event(self, record: RunRecord, entries: Sequence[AuditEntry], message: str) -> str:
        """Record what a person did (a pin, an approval...) as a run of its own: ``entries``
        are final rows, chained like any run's, and ``message`` says what was done. Returns the
        run id."""
        run_id = self.start_run(record)
        for start in range(0, len(entries), 5000):  # an approval may cover many ids
            self.record(run_id, entries[start : start + 5000])
        self.finish_run(run_id, "succeeded", RunSummary(), message)
        return run_id

    def mark_interrupted(self, policy: str, *, exclude_run: str | None = None) -> int:
        """Runs of the policy still marked ``running`` were interrupted (the caller holds the
        policy's lock, so none of them is alive); record them so. Returns how many."""
        statement = (
            update(runs_table)
            .where(runs_table.c.policy == policy, runs_table.c.status == "running")
            .values(status="interrupted", error="the run stopped without finishing (crash or kill)")
        )
        if exclude_run is not None:
            statement = statement.where(runs_table.c.id != exclude_run)
        try:
            with self.engine.begin() as connection:
                return int(connection.execute(statement).rowcount or 0)
        except SQLAlchemyError as exc:
            raise self._fail("marking interrupted runs", exc) from None

    def verify(self) -> list[ChainProblem]:
        """Check every run's hash chain; return the first problem of each broken run."""
        problems: list[ChainProblem] = []
        try:
            with self.engine.connect() as connection:
                runs = connection.execute(
                    select(
                        runs_table.c.id,
                        runs_table.c.mode,
                        runs_table.c.policy_hash,
                        runs_table.c.policy_json,
                        runs_table.c.chain_head,
                        runs_table.c.chain_length,
                    ).order_by(runs_table.c.started_at)
                ).all()
                for run in runs:
                    problem = _verify_policy_text(run) or _verify_run(connection, run)
                    if problem is not None:
                        problems.append(problem)
        except SQLAlchemyError as exc:
            raise self._fail("verifying the audit chains", exc) from None
        return problems

    def prune(self, older_than: datetime) -> tuple[int, int]:
        """Delete runs finished before ``older_than`` with all their rows (whole chains only).

        The pruning itself is recorded as a run of the pseudo-policy ``<audit-retention>``; runs
        recording pins and unpins are kept. Returns (runs, rows) deleted.
        """
        finished = select(runs_table.c.id).where(
            runs_table.c.finished_at < older_than,
            runs_table.c.policy != RETENTION_POLICY,
            # A legal hold's record lasts as long as the audit: pins are never pruned.
            runs_table.c.mode.not_in(KEPT_MODES),
        )
        try:
            with self.engine.begin() as connection:
                rows = connection.execute(
                    audit_table.delete().where(audit_table.c.run_id.in_(finished))
                ).rowcount
                runs = connection.execute(
                    runs_table.delete().where(runs_table.c.id.in_(finished))
                ).rowcount
                now = self._now()
                connection.execute(
                    insert(runs_table).values(
                        id=str(uuid.uuid4()),
                        policy=RETENTION_POLICY,
                        policy_hash=GENESIS,
                        policy_json=json.dumps({"older_than": older_than.isoformat()}),
                        target_kind="audit",
                        target=redact_url(self.engine.url),
                        mode="prune",
                        status="succeeded",
                        started_at=now,
                        finished_at=now,
                        listed=0,
                        eligible=runs,
                        kept=0,
                        deleted=rows,
                        already_gone=0,
                        failed=0,
                        unknown=0,
                        skipped=0,
                        reclaimed_bytes=0,
                        error=f"pruned {runs} run(s) and {rows} audit row(s) finished before "
                        f"{older_than.isoformat()}",
                        host=socket.gethostname()[:255],
                        pid=os.getpid(),
                    )
                )
        except SQLAlchemyError as exc:
            raise self._fail("pruning the audit log", exc) from None
        return int(runs or 0), int(rows or 0)

    def run(self, run_id: str) -> dict[str, Any] | None:
        """One run row."""
        try:
            with self.engine.connect() as connection:
                row = connection.execute(
                    select(runs_table).where(runs_table.c.id == run_id)
                ).first()
        except SQLAlchemyError as exc:
            raise self._fail("reading a run", exc) from None
        return dict(row._mapping) if row is not None else None

    def last_successes(self) -> dict[str, datetime]:
        """When each policy last finished a run with everything eligible deleted."""
        query = (
            select(runs_table.c.policy, func.max(runs_table.c.finished_at))
            .where(runs_table.c.status == "succeeded", runs_table.c.mode.in_(("run", "apply")))
            .group_by(runs_table.c.policy)
        )
        try:
            with self.engine.connect() as connection:
                rows = connection.execute(query).all()
        except SQLAlchemyError as exc:
            raise self._fail("reading last successes", exc) from None
        # max() keeps the column's type: the values come back as aware UTC datetimes.
        return {policy: when for policy, when in rows if when is not None}

    # -- the run ledger -----------------------------------------------------------------------

    def db_now(self) -> datetime:
        """The database's clock: every replica agrees on it, whatever the hosts' clocks say."""
        try:
            with self.engine.connect() as connection:
                if connection.dialect.name == "postgresql":
                    value = connection.execute(text("SELECT CURRENT_TIMESTAMP")).scalar_one()
                else:
                    value = datetime.fromisoformat(
                        connection.execute(
                            text("SELECT strftime('%Y-%m-%dT%H:%M:%f', 'now')")
                        ).scalar_one()
                    )
        except SQLAlchemyError as exc:
            raise self._fail("reading the database clock", exc) from None
        moment: datetime = value
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)

    def claim_slot(self, policy: str, slot: datetime) -> bool:
        """Claim a scheduled slot of a policy; False when another process claimed it first."""
        dialect = self.engine.dialect.name
        insert_ = pg_insert if dialect == "postgresql" else sqlite_insert
        statement = (
            insert_(ledger_table)
            .values(
                policy=policy,
                slot=slot,
                claimed_at=self.db_now(),
                host=socket.gethostname()[:255],
                pid=os.getpid(),
            )
            .on_conflict_do_nothing(index_elements=["policy", "slot"])
            # RETURNING, not rowcount: drivers disagree on rowcount for a skipped insert.
            .returning(ledger_table.c.policy)
        )
        try:
            with self.engine.begin() as connection:
                return connection.execute(statement).first() is not None
        except SQLAlchemyError as exc:
            raise self._fail("claiming a schedule slot", exc) from None

    def ledger_run(self, policy: str, slot: datetime, run_id: str | None) -> None:
        """Record which run served a claimed slot."""
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    update(ledger_table)
                    .where(ledger_table.c.policy == policy, ledger_table.c.slot == slot)
                    .values(run_id=run_id)
                )
        except SQLAlchemyError as exc:
            raise self._fail("recording a slot's run", exc) from None

    def ledger(self, policy: str | None = None) -> list[dict[str, Any]]:
        """Claimed slots, newest first."""
        query = select(ledger_table).order_by(ledger_table.c.slot.desc())
        if policy is not None:
            query = query.where(ledger_table.c.policy == policy)
        try:
            with self.engine.connect() as connection:
                return [dict(row._mapping) for row in connection.execute(query)]
        except SQLAlchemyError as exc:
            raise self._fail("reading the run ledger", exc) from None

    def runs(self, *, policy: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Recent runs, newest first."""
        query = select(runs_table).order_by(runs_table.c.started_at.desc()).limit(limit)
        if policy is not None:
            query = query.where(runs_table.c.policy == policy)
        try:
            with self.engine.connect() as connection:
                return [dict(row._mapping) for row in connection.execute(query)]
        except SQLAlchemyError as exc:
            raise self._fail("reading runs", exc) from None


#: Rows per insert statement (its JSON text: about 1 MB with snapshots).
_INSERT_CHUNK = 2000
#: An entry row's own values, in this order in its JSON array (what all rows of a write share,
#: run, policy, target and times, is bound once per statement).
_ENTRY_FIELDS = (
    ("task_id", "text"),
    ("outcome", "text"),
    ("reason", "text"),
    ("task_status", "text"),
    ("task_timestamp", "timestamptz"),
    ("task_age_seconds", "bigint"),
    ("error_message", "text"),
    ("note", "text"),
    ("chain_seq", "int"),
    ("row_hash", "text"),
    ("snapshot", "text"),
)
_ENTRY_NAMES = [name for name, _ in _ENTRY_FIELDS]
_TASK_ID, _OUTCOME, _CHAIN_SEQ, _ROW_HASH, _SNAPSHOT = (
    _ENTRY_NAMES.index(name) for name in ("task_id", "outcome", "chain_seq", "row_hash", "snapshot")
)
#: Columns bound once per write, then the entry fields.
_RECORD_NAMES = [
    "run_id",
    "seq",
    "policy",
    "target",
    "recorded_at",
    "decided_at",
    "approval_id",
    *_ENTRY_NAMES,
]
#: An outcome's values, in this order in its JSON array; task_id first, as the join key.
_RESOLVE_FIELDS = (
    ("task_id", "text"),
    ("outcome", "text"),
    ("http_status", "int"),
    ("error_code", "text"),
    ("error_message", "text"),
    ("reclaimed_bytes", "bigint"),
    ("files_count", "int"),
    ("note", "text"),
    ("chain_seq", "int"),
    ("row_hash", "text"),
)

# The statements below are built from the constant column lists above, never from input.
# Each takes a write's rows as one JSON array of arrays, in the lists' order (jsonb on
# PostgreSQL: each row is parsed once, where json would re-parse it for every field taken).
_PG_RECORD = (
    "INSERT INTO reaper_audit ("  # noqa: S608
    + ", ".join(_RECORD_NAMES)
    + ") SELECT %(run_id)s, %(seq)s + n, %(policy)s, %(target)s, %(now)s,"
    + " CASE WHEN e ->> 1 = 'pending' THEN NULL ELSE CAST(%(now)s AS timestamptz) END,"
    + " %(approval_id)s, "
    + ", ".join(f"CAST(e ->> {i} AS {kind})" for i, (_, kind) in enumerate(_ENTRY_FIELDS))
    + " FROM jsonb_array_elements(CAST(%(rows)s AS jsonb)) WITH ORDINALITY AS r(e, n) ORDER BY n"
)
_PG_RESOLVE = (
    # Each of the write's rows is looked up in (run_id, task_id) (the LATERAL join), then
    # updated by primary key: a plain join would walk all of the run's rows per write while
    # statistics do not know the run yet.
    "UPDATE reaper_audit AS a SET "  # noqa: S608
    + ", ".join(
        f"{name} = CAST(t.e ->> {i} AS {kind})"
        for i, (name, kind) in enumerate(_RESOLVE_FIELDS)
        if name != "task_id"
    )
    + ", decided_at = %(decided_at)s"
    + " FROM (SELECT found.id, v.e FROM jsonb_array_elements(CAST(%(rows)s AS jsonb)) AS v(e)"
    + " CROSS JOIN LATERAL (SELECT id FROM reaper_audit"
    + " WHERE run_id = %(run_id)s AND task_id = v.e ->> 0"
    + " AND outcome IN ('pending', 'unknown') LIMIT 1) AS found) AS t"
    + " WHERE a.id = t.id"
)


def _sqlite_time(value: str) -> str:
    """SQL turning an ISO 8601 UTC time from the JSON encoder (``2026-01-02T03:04:05[.ffffff]``
    then its offset) into what UTCDateTime stores on SQLite (``2026-01-02 03:04:05.ffffff``);
    NULL stays NULL. A hypothesis test holds it equal to :func:`sqlite_datetime`."""
    return (
        f"substr({value}, 1, 10) || ' ' || substr({value}, 12, 8) || "
        f"iif(substr({value}, 20, 1) = '.', substr({value}, 20, 7), '.000000')"
    )


_SQLITE_RECORD = (
    "INSERT INTO reaper_audit ("  # noqa: S608
    + ", ".join(_RECORD_NAMES)
    + ") SELECT ?1, ?2 + key + 1, ?3, ?4, ?5, iif(value ->> 1 = 'pending', NULL, ?5), ?7, "
    + ", ".join(
        _sqlite_time("stamp") if kind == "timestamptz" else f"value ->> {i}"
        for i, (_, kind) in enumerate(_ENTRY_FIELDS)
    )
    + f" FROM (SELECT key, value, value ->> {_ENTRY_NAMES.index('task_timestamp')} AS stamp"
    + " FROM json_each(?6)) ORDER BY key"
)
_SQLITE_RESOLVE = (
    # Materialised first, so the planner walks the write's rows and looks each up in
    # (run_id, task_id), rather than walking the run's rows and scanning the JSON for each.
    "WITH v AS MATERIALIZED (SELECT value FROM json_each(?2)) "  # noqa: S608
    "UPDATE reaper_audit SET "
    + ", ".join(
        f"{name} = v.value ->> {i}"
        for i, (name, _) in enumerate(_RESOLVE_FIELDS)
        if name != "task_id"
    )
    + ", decided_at = ?1 FROM v"
    + " WHERE reaper_audit.run_id = ?3 AND reaper_audit.task_id = v.value ->> 0"
    + " AND reaper_audit.outcome IN ('pending', 'unknown')"
)


def _stored_digests(
    connection: Connection, run_id: str, results: Sequence[DeleteResult]
) -> dict[str, str]:
    """The snapshot digests of the unresolved rows ``results`` resolve, read from the database:
    for a run this process did not write (reconciliation of an earlier run)."""
    digests: dict[str, str] = {}
    ids = [result.task_id for result in results]
    for start in range(0, len(ids), 500):
        query = select(audit_table.c.task_id, audit_table.c.snapshot).where(
            audit_table.c.run_id == run_id,
            audit_table.c.task_id.in_(ids[start : start + 500]),
            audit_table.c.outcome.in_((Outcome.PENDING.value, Outcome.UNKNOWN.value)),
            audit_table.c.snapshot.is_not(None),
        )
        for task_id, snapshot in connection.execute(query):
            digests[task_id] = snapshot_digest(snapshot)
    return digests


def _json_rows(rows: Sequence[Sequence[Any]]) -> str:
    """Rows as one JSON array of arrays (datetimes as ISO 8601 with their offset)."""
    try:
        return orjson.dumps(rows).decode()
    except TypeError:  # an integer beyond 64 bits, a lone surrogate: the standard library
        return json.dumps(rows, default=_isoformat, ensure_ascii=False)


RETENTION_POLICY = "<audit-retention>"
#: Runs `reaper audit prune` keeps whatever their age: the records of pins (legal holds).
KEPT_MODES = ("pin", "unpin")


@dataclass(frozen=True)
class ChainProblem:
    """The first broken link of one run's chain."""

    run_id: str
    chain_seq: int | None
    task_id: str | None
    message: str


#: Runs of a policy: their ``policy_json`` is the policy's canonical JSON, and ``policy_hash``
#: its SHA-256 (people's and housekeeping runs record other details there).
_POLICY_MODES = frozenset({"run", "dry_run", "apply", "correction"})


def _verify_policy_text(run: Any) -> ChainProblem | None:
    """A policy run's stored policy text must hash to the version its chained rows name (which
    the chain covers): ``explain --show-policy`` prints that text."""
    if run.mode not in _POLICY_MODES or not run.policy_json:
        return None
    if hashlib.sha256(run.policy_json.encode()).hexdigest() == run.policy_hash:
        return None
    return ChainProblem(
        run.id,
        None,
        None,
        f"the run's policy text does not hash to its policy version {run.policy_hash[:12]}: "
        "it was edited",
    )


def _verify_run(connection: Connection, run: Any) -> ChainProblem | None:
    rows = connection.execute(
        select(audit_table)
        .where(audit_table.c.run_id == run.id, audit_table.c.chain_seq.is_not(None))
        .order_by(audit_table.c.chain_seq)
    ).mappings()
    head, expected = GENESIS, 0
    for row in rows:
        expected += 1
        if row["chain_seq"] != expected:
            return ChainProblem(
                run.id,
                expected,
                None,
                f"row {expected} of the chain is missing (next present is {row['chain_seq']}): "
                "a row was deleted",
            )
        head = row_hash(head, run.policy_hash, dict(row))
        if head != row["row_hash"]:
            return ChainProblem(
                run.id,
                expected,
                row["task_id"],
                f"row {expected} (audit id {row['id']}, task {row['task_id']!r}) does not match "
                "its hash: it was edited",
            )
    if expected != run.chain_length or (expected and head != run.chain_head):
        return ChainProblem(
            run.id,
            expected + 1,
            None,
            f"the run records {run.chain_length} chained row(s) but {expected} are present "
            "or its head differs: rows were deleted",
        )
    return None


def _clip(value: str | None, size: int) -> str | None:
    if value is None or len(value) <= size:
        return value
    return value[: size - 1] + "…"
