"""The audit database: engines, the UTC column type, and Alembic migrations.

SQLite (a file) is the embedded default; PostgreSQL (psycopg 3) is the production database. The
same code serves both. The schema is created and changed only by the migrations in
``reaper/migrations`` (``reaper db upgrade``), never by ``create_all`` at runtime.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import DateTime, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.types import TypeDecorator

from reaper.errors import AuditError
from reaper.settings import redact_url

__all__ = [
    "UTCDateTime",
    "current_revision",
    "head_revision",
    "make_engine",
    "require_current_schema",
    "require_sqlite",
    "short_error",
    "upgrade",
]

MIGRATIONS = Path(__file__).parent / "migrations"
# Serialises `reaper db upgrade` between replicas on PostgreSQL (an arbitrary constant key).
_MIGRATION_LOCK_KEY = 0x5245415045520001


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


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at (None for an empty database)."""
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as exc:
        raise AuditError(
            f"cannot reach the audit database {redact_url(engine.url)}: {short_error(exc)}"
        ) from None


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Apply every pending migration (idempotent); return (revision before, revision after)."""
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
                )
            before = MigrationContext.configure(connection).get_current_revision()
            config = _config()
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            after = MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as exc:
        raise AuditError(
            f"migrating the audit database {redact_url(engine.url)} failed: {short_error(exc)}"
        ) from None
    assert after is not None
    return before, after


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


def short_error(exc: BaseException) -> str:
    """The first line of a driver error, without SQL parameters (they may hold task data)."""
    message = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return message[0] if message else type(exc).__name__
