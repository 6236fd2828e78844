"""The audit database: engines, the UTC column type, and Alembic migrations.

SQLite (a file) is the embedded default; PostgreSQL (psycopg 3) is the production database. The
same code serves both. The schema is created and changed only by the migrations in
``reaper/migrations``, never by ``create_all`` at runtime: every command that needs the database
sets up an *empty* one itself (:func:`ensure_schema`), while a database at an older revision is
migrated only when asked (``reaper db upgrade`` or ``REAPER_DB_AUTO_UPGRADE``). A database that
holds other tables, or a revision this reaper does not know, is refused rather than touched.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, DateTime, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.types import TypeDecorator

from reaper.errors import AuditError
from reaper.settings import redact_url

__all__ = [
    "UTCDateTime",
    "current_revision",
    "ensure_schema",
    "head_revision",
    "make_engine",
    "require_current_schema",
    "require_sqlite",
    "short_error",
    "upgrade",
]

MIGRATIONS = Path(__file__).parent / "migrations"
# Serialises migrations between replicas on PostgreSQL (an arbitrary constant key).
_MIGRATION_LOCK_KEY = 0x5245415045520001
#: Alembic's own bookkeeping table: its presence alone does not make a database "not empty".
_VERSION_TABLE = "alembic_version"

log = structlog.get_logger("reaper.db")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on SQLite and PostgreSQL alike."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime refused by the audit database")
        value = value.astimezone(UTC)
        # SQLite has no timezone type: store UTC wall time; PostgreSQL keeps the offset.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def make_engine(url: URL | str, **kwargs: Any) -> Engine:
    """Create an engine for the audit database with safe per-dialect settings."""
    url = make_url(url)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() == "sqlite":
        require_sqlite(sqlite3.sqlite_version_info)
        if url.database and url.database != ":memory:":
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {"check_same_thread": False, "timeout": 30})
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    # psycopg prepares repeated statements; a generic plan cached while reaper_audit had no
    # statistics is a sequential scan kept for the connection's life, which made each outcome
    # update O(rows in the table). Custom plans use the (run_id, task_id) index every time.
    kwargs.setdefault(
        "connect_args",
        {"connect_timeout": 10, "options": "-c plan_cache_mode=force_custom_plan"},
    )
    return create_engine(url, **kwargs)


#: The audit writes each group in one statement over a JSON array (json_each, ``->>``: 3.38).
MIN_SQLITE = (3, 38, 0)


def require_sqlite(version: tuple[int, int, int]) -> None:
    """Raise AuditError, before anything is written, if the SQLite library is too old."""
    if version < MIN_SQLITE:
        have, need = ".".join(map(str, version)), ".".join(map(str, MIN_SQLITE))
        raise AuditError(
            f"the SQLite library Python uses is {have}; reaper's audit needs {need} or newer "
            "(use a newer Python build, or PostgreSQL via REAPER_DATABASE_URL)"
        )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets `reaper audit` read while a run writes; FULL makes each commit durable on disk.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    """The newest migration shipped with this version of reaper."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


class _RevisionReads(logging.Filter):
    """Holds back Alembic's INFO lines in the threads reading a revision (:func:`_quiet_alembic`).

    A filter and a thread-local flag, not the logger's level: policies running at once read
    revisions in several threads, and a level saved and restored by each of them could be left
    at WARNING for good, hiding a later migration's lines.
    """

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(self.local, "quiet", False) or record.levelno > logging.INFO:
            return True
        return logging.getLogger(record.name).getEffectiveLevel() <= logging.DEBUG


_REVISION_READS = _RevisionReads()
logging.getLogger("alembic.runtime.migration").addFilter(_REVISION_READS)


@contextmanager
def _quiet_alembic() -> Iterator[None]:
    """Alembic logs two INFO lines ("Context impl ...", "Will assume ... DDL") whenever it only
    reads the revision; every command does that, so those lines are held back (shown at debug
    level). The lines of an actual migration ("Running upgrade ...") still show."""
    local = _REVISION_READS.local
    previous = getattr(local, "quiet", False)
    local.quiet = True
    try:
        yield
    finally:
        local.quiet = previous


def _revision(connection: Connection) -> str | None:
    with _quiet_alembic():
        return MigrationContext.configure(connection).get_current_revision()


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at (None for an empty database)."""
    try:
        with engine.connect() as connection:
            return _revision(connection)
    except SQLAlchemyError as exc:
        raise AuditError(
            f"cannot reach the audit database {redact_url(engine.url)}: {short_error(exc)}"
        ) from None


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Apply every pending migration (idempotent); return (revision before, revision after).

    The explicit ``reaper db upgrade``: it also adds reaper's tables to a database that holds
    other tables (a shared database is the operator's choice), but never migrates a revision this
    reaper does not know.
    """
    return _migrate(engine, setup_foreign=True, upgrade_older=True)


def ensure_schema(engine: Engine, *, auto_upgrade: bool = False) -> None:
    """Make the schema usable by every command: raise AuditError unless it is at head afterwards.

    An empty database is set up; one at an older revision is migrated only with ``auto_upgrade``
    (``REAPER_DB_AUTO_UPGRADE``, ``--migrate``); one holding other tables, or at a revision this
    reaper does not know, is refused. Replicas racing to set up the same database are serialised.
    """
    # The common case reads one row and takes no lock.
    if current_revision(engine) == head_revision():
        return
    _migrate(engine, setup_foreign=False, upgrade_older=auto_upgrade)


def _migrate(engine: Engine, *, setup_foreign: bool, upgrade_older: bool) -> tuple[str | None, str]:
    url = redact_url(engine.url)
    try:
        with engine.begin() as connection:
            _lock(connection)
            # Read under the lock: a replica that set the database up meanwhile leaves it at head.
            before = _revision(connection)
            refused = _refusal(connection, url, before, setup_foreign, upgrade_older)
            if refused is not None:
                raise AuditError(refused)
            if before != head_revision():
                config = _config()
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
            after = _revision(connection)
    except SQLAlchemyError as exc:
        raise AuditError(f"migrating the audit database {url} failed: {short_error(exc)}") from None
    assert after is not None
    if before is None:
        log.info("database_initialised", database=url, revision=after)
    elif before != after:
        log.info("database_upgraded", database=url, revision_before=before, revision=after)
    return before, after


def _lock(connection: Connection) -> None:
    """Hold the database's migration lock until the transaction ends."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
    else:
        # pysqlite defers BEGIN to the first write, so two processes could both find the file
        # empty; IMMEDIATE takes the write lock now (waiting out busy_timeout for the other).
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _refusal(
    connection: Connection, url: str, current: str | None, setup_foreign: bool, upgrade_older: bool
) -> str | None:
    head = head_revision()
    if current == head:
        return None
    if current is None:
        inspector = inspect(connection)
        tables = sorted(
            {*inspector.get_table_names(), *inspector.get_view_names()} - {_VERSION_TABLE}
        )
        if not tables or setup_foreign:
            return None
        shown = ", ".join(tables[:5]) + (f" and {len(tables) - 5} more" if len(tables) > 5 else "")
        return (
            f"the audit database {url} is not empty but has no reaper schema (it holds {shown}): "
            "refusing to set it up implicitly; point REAPER_DATABASE_URL at an empty database, "
            "or run `reaper db upgrade` to add reaper's tables to this one"
        )
    if current not in _known_revisions():
        return (
            f"the audit database {url} is at revision {current}, which this reaper does not know "
            f"(its newest is {head}): it was migrated by a newer reaper or belongs to another "
            "application; refusing to use it (upgrade reaper, or point REAPER_DATABASE_URL at "
            "reaper's own database)"
        )
    if not upgrade_older:
        return (
            f"the audit database {url} is at revision {current}, this reaper needs {head}: "
            "run `reaper db upgrade` (or set REAPER_DB_AUTO_UPGRADE=true)"
        )
    return None


def _known_revisions() -> set[str]:
    return {script.revision for script in ScriptDirectory.from_config(_config()).walk_revisions()}


def require_current_schema(engine: Engine) -> None:
    """Raise AuditError unless the database schema is at the newest migration."""
    current = current_revision(engine)
    head = head_revision()
    if current != head:
        state = "empty" if current is None else f"at revision {current}"
        raise AuditError(
            f"the audit database {redact_url(engine.url)} is {state}, this reaper needs {head}: "
            "run `reaper db upgrade` (or set REAPER_DB_AUTO_UPGRADE=true)"
        )


def database_failure(
    engine: Engine, action: str, exc: BaseException, what: str = "audit database"
) -> AuditError:
    """The error of a failed database ``action``: the URL without its password, the driver's
    first line without SQL parameters."""
    return AuditError(f"{what} {redact_url(engine.url)}: {action} failed: {short_error(exc)}")


def short_error(exc: BaseException) -> str:
    """The first line of a driver error, without SQL parameters (they may hold task data)."""
    message = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return message[0] if message else type(exc).__name__
