"""The records a deleting run keeps of its eligible tasks, until their audit rows are written.

A run's plan keeps each eligible task's record as listed (:func:`reaper.plan.snapshot_of`, a few
hundred bytes of JSON) for that task's audit row. Held as Python objects, 100,000 of them cost
some 50 MB and scatter the heap; here they are appended to one buffer that moves to an
anonymous temporary file past :data:`IN_MEMORY` bytes, and a plan holds only positions. Where no
temporary file can be made (a read-only filesystem without a writable ``TMPDIR``), the records
stay in memory, as before, and a warning says so once.

:class:`Snapshots` is a column of the plan: ``column[i]`` is the i-th task's record (or None),
and :meth:`Snapshots.take` makes the column of a narrowed or reordered plan without copying any
record. Reads and writes are serialised by a lock (the audit is written from a worker thread).
"""

from __future__ import annotations

import tempfile
import threading
import weakref
from array import array
from collections.abc import Iterable
from typing import IO

import structlog

__all__ = ["IN_MEMORY", "Snapshots"]

log = structlog.get_logger("reaper.snapshots")

#: Bytes of records kept in memory before they move to a temporary file.
IN_MEMORY = 4 * 1024 * 1024

_ABSENT = -1


class _Spool:
    """Records appended once, read by number; in memory, then in a temporary file."""

    def __init__(self, in_memory: int) -> None:
        self.in_memory = in_memory
        self.lock = threading.Lock()
        self.buffer = bytearray()
        self.file: IO[bytes] | None = None
        self.size = 0
        self.offsets: array[int] = array("q")
        self.lengths: array[int] = array("l")
        self.unspooled = False  # no temporary file could be made: all in memory

    def append(self, record: bytes | None) -> int:
        with self.lock:
            number = len(self.offsets)
            if record is None:
                self.offsets.append(_ABSENT)
                self.lengths.append(0)
                return number
            self.offsets.append(self.size)
            self.lengths.append(len(record))
            self.size += len(record)
            if self.file is not None:
                self.file.seek(0, 2)
                self.file.write(record)
                return number
            self.buffer += record
            if len(self.buffer) > self.in_memory and not self.unspooled:
                self._roll_over()
            return number

    def _roll_over(self) -> None:
        try:
            spooled = tempfile.TemporaryFile()
        except OSError as exc:
            self.unspooled = True
            log.warning(
                "snapshots_in_memory",
                error=f"{type(exc).__name__}: {exc.strerror or exc}",
                hint="no temporary file could be made (set TMPDIR to a writable directory); "
                "the tasks' records stay in memory",
            )
            return
        spooled.write(self.buffer)
        self.file, self.buffer = spooled, bytearray()
        # Closed (and so removed) when the last column sharing it is gone.
        weakref.finalize(self, spooled.close)

    def read(self, number: int) -> bytes | None:
        offset = self.offsets[number]
        if offset == _ABSENT:
            return None
        length = self.lengths[number]
        with self.lock:
            if self.file is None:
                return bytes(self.buffer[offset : offset + length])
            self.file.seek(offset)
            return self.file.read(length)


class Snapshots:
    """A column of task records by position; columns made by :meth:`take` share the records."""

    def __init__(self, in_memory: int = IN_MEMORY, *, _spool: _Spool | None = None) -> None:
        self._spool = _spool or _Spool(in_memory)
        self._numbers: array[int] = array("q")

    def append(self, record: bytes | None) -> None:
        self._numbers.append(self._spool.append(record))

    def __len__(self) -> int:
        return len(self._numbers)

    def __getitem__(self, index: int) -> bytes | None:
        return self._spool.read(self._numbers[index])

    def take(self, indexes: Iterable[int]) -> Snapshots:
        """The column of the positions ``indexes`` name, in their order."""
        column = Snapshots(_spool=self._spool)
        numbers = self._numbers
        column._numbers = array("q", (numbers[index] for index in indexes))
        return column

    @property
    def on_disk(self) -> bool:
        """Whether the records have moved to a temporary file."""
        return self._spool.file is not None
