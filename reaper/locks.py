"""One run per policy at a time, across processes and hosts.

On PostgreSQL a session-level advisory lock per policy is held on a dedicated connection for the
whole run: a second replica, an overlapping CronJob pod or ``reaper reconcile`` cannot take it, and
if the holder crashes PostgreSQL releases it with the session. On SQLite (one host) an exclusive
``flock`` on a lock file beside the database gives the same guarantee between processes; the
kernel releases it when the holder dies.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from reaper.db import short_error
from reaper.errors import AuditError
from reaper.settings import redact_url

__all__ = ["PolicyLock", "lock_key"]


def lock_key(policy: str) -> int:
    """A stable signed 64-bit advisory lock key for a policy name."""
    digest = hashlib.sha256(f"reaper-policy:{policy}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PolicyLock:
    """``with PolicyLock(engine, name) as held:`` — ``held`` is False if another run has it."""

    def __init__(self, engine: Engine, policy: str) -> None:
        self.engine = engine
        self.policy = policy
        self._connection: Any = None
        self._file: IO[bytes] | None = None
        self.held = False

    def acquire(self) -> bool:
        """Try to take the lock without waiting; True when this process now holds it."""
        if self.engine.dialect.name == "postgresql":
            return self._acquire_postgresql()
        return self._acquire_file()

    def _acquire_postgresql(self) -> bool:
        try:
            # A connection of its own, outside the pool's reuse: the lock lives with the session.
            self._connection = self.engine.connect()
            got = self._connection.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": lock_key(self.policy)}
            ).scalar()
            self._connection.commit()
        except SQLAlchemyError as exc:
            self._close_connection()
            raise AuditError(
                f"cannot take the run lock for policy {self.policy!r} on "
                f"{redact_url(self.engine.url)}: {short_error(exc)}"
            ) from None
        self.held = bool(got)
        if not self.held:
            self._close_connection()
        return self.held

    def _acquire_file(self) -> bool:
        database = self.engine.url.database
        if not database or database == ":memory:":
            self.held = True  # one process by construction
            return True
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", self.policy)
        if safe != self.policy:
            # Template instances ('p[a/b]', 'p[a_b]') would share a file once cleaned up: the
            # name's own hash keeps their locks apart.
            safe += "-" + hashlib.sha256(self.policy.encode()).hexdigest()[:16]
        path = Path(f"{database}.{safe}.lock")
        handle = path.open("ab")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n".encode())
        handle.flush()
        self._file = handle
        self.held = True
        return True

    def release(self) -> None:
        """Give the lock back (also done by the database or kernel if the process dies)."""
        if self._connection is not None:
            try:
                self._connection.execute(
                    text("SELECT pg_advisory_unlock(:key)"), {"key": lock_key(self.policy)}
                )
                self._connection.commit()
            except SQLAlchemyError:
                pass  # closing the session releases it anyway
            self._close_connection()
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        self.held = False

    def _close_connection(self) -> None:
        if self._connection is not None:
            try:
                self._connection.invalidate()  # never return a lock-holding session to the pool
                self._connection.close()
            except SQLAlchemyError:
                pass
            self._connection = None

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
