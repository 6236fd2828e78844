"""A simulator of the data_pipeline task API (a Flask service; see TARGETS.md section 1).

It lists tasks (``GET /api/v0/data_pipeline/tasks`` and ``POST .../tasks/query``), shows one task
(``GET .../tasks/{task_id}``) and deletes their directories (``DELETE /api/v0/data_pipeline/tasks``)
the way the real service does, including its quirks: ``total`` is the length of the page,
timestamps are naive server-local strings, unknown ids delete "successfully", ids are joined into
paths unchecked (the simulator records such ids), live tasks are deleted like any other (the
simulator records those in ``live_deleted``), and a batch is worked through synchronously.

Faults of the real service, switched by :class:`~reaper.simulators.base.Faults`: finished tasks
re-executed right after a listing shows them (``reexecute_rate``), a database update that fails
after the directory was removed while the id is still reported deleted
(``db_update_failure_rate``), deletions acknowledged without effect (``ack_without_effect_rate``),
a 504 after acting (``act_then_504_rate``) and slow synchronous batches (``delete_ms_per_id``;
overlapping requests for the same id are counted in ``overlapping_deletes``).

Listing a page is O(page size + log n) even with a million tasks: tasks are kept in a sorted index
that supports removal through a Fenwick tree, and indexes are only rebuilt after tasks are added.
"""

from __future__ import annotations

import collections
import gc
import random
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, date, datetime, timedelta
from functools import cache
from operator import attrgetter
from typing import Any, ClassVar, overload
from zoneinfo import ZoneInfo

from reaper.simulators.base import Faults, Request, Response, Route, SimulatorBase

__all__ = [
    "LIVE_STATUSES",
    "STATUSES",
    "DataPipelineSimulator",
    "SimTask",
    "format_size",
    "generate_tasks",
]

STATUSES = ("pending", "in_progress", "partial_completed", "completed", "failed")
LIVE_STATUSES = frozenset({"pending", "in_progress"})

# The real list query derives step_status from the task's steps; these are its values.
_STEP_STATUS = {
    "pending": "pending",
    "in_progress": "running",
    "partial_completed": "partial_completed",
    "completed": "all_completed",
    "failed": "failed",
}

_BASE_PATH = "/api/v0/data_pipeline/tasks"
_LIST_LIMIT_DEFAULT = 50
_PAGE_MAX = 100
_QUERY_SORT_FIELDS = ("created_at", "started_at", "completed_at", "task_name", "status")
_TIMESTAMP_FIELDS = ("created_at", "started_at", "completed_at", "updated_at")


@dataclass(slots=True)
class SimTask:
    """One task row plus the size of its directory; all datetimes are aware UTC."""

    task_id: str
    task_name: str | None
    status: str
    step_status: str | None
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    updated_at: datetime | None = None
    created_by: str = "guest"
    db_name: str = "highway_db"
    business_context: str = "数据库管理系统"
    directory_exists: bool = True
    files_count: int = 0
    size_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The task as JSON-ready data with aware ISO timestamps (the ``POST /_sim/tasks`` form)."""
        data = asdict(self)
        for name in _TIMESTAMP_FIELDS:
            value = data[name]
            data[name] = value.isoformat() if value is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimTask:
        """Build a task from :meth:`to_dict` data; timestamps must carry a UTC offset."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown task field(s): {', '.join(unknown)}")
        for required in ("task_id", "status", "created_at"):
            if not isinstance(data.get(required), str):
                raise ValueError(f"task field {required} must be a string")
        for name, kind in (("directory_exists", bool), ("files_count", int), ("size_bytes", int)):
            if name in data and type(data[name]) is not kind:
                raise ValueError(f"task field {name} must be of type {kind.__name__}")
        values = dict(data)
        for name in _TIMESTAMP_FIELDS:
            raw = values.get(name)
            if raw is None:
                continue
            parsed = datetime.fromisoformat(raw)
            if parsed.tzinfo is None:
                raise ValueError(f"task {values['task_id']}: {name} {raw!r} has no UTC offset")
            values[name] = parsed.astimezone(UTC)
        values.setdefault("task_name", None)
        values.setdefault("step_status", _STEP_STATUS.get(values["status"]))
        return cls(**values)


def format_size(size_bytes: int) -> str:
    """Format a size the way the service does (``delete_task_directory_simple``): whole bytes
    below 1 KB (``"512 B"``), else 1024-based with one decimal (``"2.5 MB"``), at most GB."""
    if size_bytes < 1024:
        return f"{size_bytes} B"
    if size_bytes < 1024**2:
        return f"{size_bytes / 1024:.1f} KB"
    if size_bytes < 1024**3:
        return f"{size_bytes / 1024**2:.1f} MB"
    return f"{size_bytes / 1024**3:.1f} GB"


# -- task generation ---------------------------------------------------------------------------

# Statuses drawn uniformly from a table of 20 (5% steps): completed 60%, failed 15%, partial 5%,
# pending 10% and in_progress 10% for tasks older than two hours; the most recent ones are mostly
# still queued or running.
_STATUS_TABLE_OLD = (
    ("completed",) * 12
    + ("failed",) * 3
    + ("partial_completed",)
    + ("pending",) * 2
    + ("in_progress",) * 2
)
_STATUS_TABLE_RECENT = ("pending",) * 9 + ("in_progress",) * 9 + ("completed", "failed")
_RECENT_SECONDS = 2 * 3600
_DEFAULT_SPACING_SECONDS = 180  # one task every ~3 minutes...
_MAX_SPAN_SECONDS = 180 * 86400  # ...over at most ~180 days
# Per status: step_status, files_count low and range, seconds from start to end low and range.
_SHAPE = {
    "pending": ("pending", 1, 1, 0.0, 0.0),
    "in_progress": ("running", 1, 20, 0.0, 0.0),
    "partial_completed": ("partial_completed", 3, 23, 300.0, 3300.0),
    "completed": ("all_completed", 8, 53, 60.0, 3540.0),
    "failed": ("failed", 1, 12, 5.0, 1795.0),
}
_DATABASES = (
    ("highway_db", "高速公路服务区管理系统"),
    ("retail_dw", "零售门店经营分析系统"),
    ("bank_crm", "银行客户关系管理系统"),
    ("hospital_his", "医院信息管理系统"),
    ("business_db", "数据库管理系统"),
)
_TASK_NAMES = ("训练数据生成", "每日训练数据更新", "表结构同步", "问答对生成", "全量重建", None)
_CREATORS = ("guest", "guest", "guest", "admin", "api")
# Every (task_name, created_by, db_name, business_context) combination, so one draw picks all.
_LABELS = tuple(
    (name, creator, db_name, context)
    for name in _TASK_NAMES
    for creator in _CREATORS
    for db_name, context in _DATABASES
)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC: a million new tracked objects trigger ever longer collections."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@cache
def _hms_table() -> tuple[str, ...]:
    """``HHMMSS`` for every second of a day: strftime per task is the slow part of generation."""
    return tuple(f"{s // 3600:02d}{s // 60 % 60:02d}{s % 60:02d}" for s in range(86400))


def generate_tasks(
    n: int,
    seed: int = 0,
    now: datetime | None = None,
    timezone: str = "Asia/Shanghai",
    *,
    span: timedelta | None = None,
    cleaned_rate: float = 0.0,
    old_live_share: float | None = None,
) -> list[SimTask]:
    """Generate ``n`` realistic tasks, deterministic for a seed and ``now``, oldest first.

    Creation times lie in the ``span`` before ``now`` (default: about 3 minutes per task, at most
    about 180 days), one task per second at most so that ids ``task_YYYYMMDD_HHMMSS`` (rendered in
    ``timezone``, about 3% ``manual_...``) are unique. ``cleaned_rate`` is the fraction of finished
    tasks whose directory is already gone (``directory_exists=False``).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0 <= cleaned_rate <= 1:
        raise ValueError(f"cleaned_rate must be between 0 and 1, got {cleaned_rate}")
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    zone = ZoneInfo(timezone)
    if span is not None:
        span_seconds = span.total_seconds()
    else:
        span_seconds = min(n * _DEFAULT_SPACING_SECONDS, _MAX_SPAN_SECONDS)
    # Gaps are uniform in [1, 2 * mean - 1] whole seconds: the mean spreads tasks over the span
    # and the minimum of 1 keeps every creation second distinct.
    gap_spread = max(2 * span_seconds / max(n, 1) - 1, 1.0)

    # Hot loop: everything it touches is a local, and it makes no call it can do without.
    rand = random.Random(seed).random
    from_ts = datetime.fromtimestamp
    hms = _hms_table()
    shapes = _SHAPE
    labels, label_count = _LABELS, len(_LABELS)
    old_table, recent_table = _STATUS_TABLE_OLD, _STATUS_TABLE_RECENT
    day_strings: dict[int, str] = {}
    epoch_day = date(1970, 1, 1)
    offset_bucket, offset = -1, 0
    now_ts = now.timestamp()
    recent_ts = now_ts - _RECENT_SECONDS
    second = int(now_ts)
    last_local = second + 86400  # later than any local time generated
    tasks: list[SimTask] = []
    append = tasks.append
    with _gc_paused():
        for _ in range(n):
            second -= 1 + int(rand() * gap_spread)
            # Offsets only change on quarter hours, so one lookup serves many tasks.
            bucket = second // 900
            if bucket != offset_bucket:
                offset_bucket = bucket
                utcoffset = from_ts(bucket * 900, zone).utcoffset()
                offset = int(utcoffset.total_seconds()) if utcoffset is not None else 0
            local = second + offset
            if local >= last_local:
                # Walking back across a "clocks go back" change repeats local seconds already
                # used: skip the repeated hour so that local seconds, hence ids, stay unique.
                second -= local - last_local + 1
                local = last_local - 1
            last_local = local
            day = local // 86400
            day_text = day_strings.get(day)
            if day_text is None:
                day_text = (epoch_day + timedelta(days=day)).strftime("%Y%m%d")
                day_strings[day] = day_text
            prefix = "manual_" if rand() < 0.03 else "task_"
            task_id = f"{prefix}{day_text}_{hms[local % 86400]}"

            # Below one second so that rounding to microseconds never reaches the next second.
            created_ts = second + rand() * 0.999999
            created_at = from_ts(created_ts, UTC)
            table = recent_table if created_ts > recent_ts else old_table
            status = table[int(rand() * 20)]
            step_status, files_low, files_range, run_low, run_range = shapes[status]
            started_at = completed_at = None
            if status != "pending":
                started_ts = created_ts + 1 + rand() * 29
                started_at = from_ts(started_ts if started_ts < now_ts else now_ts, UTC)
                if status != "in_progress":
                    finished_ts = started_ts + run_low + rand() * run_range
                    completed_at = from_ts(finished_ts if finished_ts < now_ts else now_ts, UTC)
            files_count = files_low + int(rand() * files_range)
            task_name, created_by, db_name, business_context = labels[int(rand() * label_count)]
            append(
                SimTask(
                    task_id,
                    task_name,
                    status,
                    step_status,
                    created_at,
                    started_at,
                    completed_at,
                    completed_at or started_at or created_at,
                    created_by,
                    db_name,
                    business_context,
                    True,
                    files_count,
                    # Files of 1 KB to ~400 KB: directories of a few KB to some tens of MB.
                    files_count * (1024 + int(rand() * 400_000)),
                )
            )
    if old_live_share is not None:
        if not 0 <= old_live_share <= 0.2:
            raise ValueError(f"old_live_share must be between 0 and 0.2, got {old_live_share}")
        # A separate generator, so the share does not change the other tasks.
        keep = random.Random(seed + 2).random
        for task in tasks:
            if (
                task.status in LIVE_STATUSES
                and task.created_at.timestamp() <= recent_ts
                and keep() >= old_live_share / 0.2
            ):
                task.status, task.step_status = "completed", _STEP_STATUS["completed"]
                task.started_at = task.created_at + timedelta(seconds=5)
                task.completed_at = task.started_at + timedelta(minutes=5)
                task.updated_at = task.completed_at
    if cleaned_rate:
        # A separate generator, so the rate does not change the tasks themselves.
        clean = random.Random(seed + 1).random
        for task in tasks:
            if task.status not in LIVE_STATUSES and clean() < cleaned_rate:
                task.directory_exists = False
    tasks.reverse()
    return tasks


# -- the sorted index ------------------------------------------------------------------------

_SORT_KEY = attrgetter("created_at", "task_id")
_CREATED_KEY = attrgetter("created_at")


class _Index:
    """Tasks in ascending ``(created_at, task_id)`` order with O(log n) removal and ranking.

    Removed tasks stay in ``items`` as tombstones; a Fenwick tree over the ``alive`` flags maps
    between positions and ranks among the remaining tasks. Both are created on the first removal,
    so an index that never loses a task is a plain list.
    """

    __slots__ = ("alive", "items", "removed", "tree")

    def __init__(self, items: list[SimTask]) -> None:
        self.items = items
        self.alive: bytearray | None = None
        self.tree: array[int] | None = None
        self.removed = 0

    def __len__(self) -> int:
        return len(self.items) - self.removed

    def discard(self, task: SimTask) -> bool:
        """Remove ``task``; False when it is not where its sort key says (mutated in place)."""
        items = self.items
        position = bisect_left(items, (task.created_at, task.task_id), key=_SORT_KEY)
        if position >= len(items) or items[position] is not task:
            return False
        if self.alive is None or self.tree is None:
            self.alive = bytearray(b"\x01") * len(items)
            # The Fenwick tree of an all-ones array: node i covers (i & -i) elements.
            self.tree = array("q", (i & -i for i in range(len(items) + 1)))
        if self.alive[position]:
            self.alive[position] = 0
            self.removed += 1
            tree, size, i = self.tree, len(items), position + 1
            while i <= size:
                tree[i] -= 1
                i += i & -i
        return True

    def compacted(self) -> _Index:
        """This index, or a fresh one without tombstones once they are the majority."""
        if self.alive is None or self.removed * 2 <= len(self.items):
            return self
        alive = self.alive
        return _Index([task for task, flag in zip(self.items, alive, strict=True) if flag])

    def rank(self, position: int) -> int:
        """How many remaining tasks lie before ``position``."""
        if self.tree is None or self.removed == 0:
            return position
        tree, total, i = self.tree, 0, position
        while i > 0:
            total += tree[i]
            i -= i & -i
        return total

    def select(self, rank: int) -> SimTask:
        """The remaining task of rank ``rank`` (0-based)."""
        if self.tree is None or self.removed == 0:
            return self.items[rank]
        tree, size = self.tree, len(self.items)
        position, remaining = 0, rank + 1
        step = 1 << size.bit_length()
        while step:
            nxt = position + step
            if nxt <= size and tree[nxt] < remaining:
                position = nxt
                remaining -= tree[nxt]
            step >>= 1
        return self.items[position]

    def window(self, start: datetime | None, end: datetime | None) -> tuple[int, int]:
        """The rank range ``[low, high)`` of tasks created in ``[start, end]``."""
        low = 0 if start is None else bisect_left(self.items, start, key=_CREATED_KEY)
        high = len(self.items) if end is None else bisect_right(self.items, end, key=_CREATED_KEY)
        return self.rank(low), self.rank(max(low, high))

    def page(
        self, low: int, high: int, offset: int, limit: int, *, descending: bool
    ) -> list[SimTask]:
        """Up to ``limit`` tasks of the rank range, skipping ``offset``, in the given order."""
        if descending:
            first = high - 1 - offset
            last = max(low, first - limit + 1)
            ranks = range(first, last - 1, -1)
        else:
            first = low + offset
            ranks = range(first, min(high, first + limit))
        return [self.select(rank) for rank in ranks]


# -- the simulator -----------------------------------------------------------------------------


class _BadRequest(Exception):
    def __init__(self, message: str, error_type: str = "INVALID_PARAMS", **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type
        self.extra = extra


class DataPipelineSimulator(SimulatorBase):
    """The data_pipeline task API over real HTTP, with faults and a deletion log."""

    name: ClassVar[str] = "data_pipeline"

    def __init__(
        self,
        tasks: Iterable[SimTask] = (),
        *,
        timezone: str = "Asia/Shanghai",
        faults: Faults | None = None,
        seed: int = 0,
    ) -> None:
        self.timezone = timezone
        self._zone = ZoneInfo(timezone)
        self._tasks: dict[str, SimTask] = {}
        # Sorted indexes by status filter (None: all tasks), built on demand.
        self._indexes: dict[str | None, _Index] = {}
        # Tasks whose directory is gone although their row still says directory_exists: true
        # (the database update after the removal failed).
        self._data_gone: set[str] = set()
        # Ids of delete requests being worked on, for counting overlapping requests.
        self._in_flight: collections.Counter[str] = collections.Counter()
        #: Ids whose directory was removed but whose row update failed (db_update_failure_rate).
        self.db_update_failed: list[str] = []
        #: Ids re-executed after a listing showed them (reexecute_rate, or reexecute()).
        self.reexecuted: list[str] = []
        #: Delete requests that named an id another, still running, request was deleting.
        self.overlapping_deletes = 0
        super().__init__(faults=faults, seed=seed)
        self.add_tasks(tasks)
        # Sort now rather than on the first list request, so that request is as fast as the rest.
        with self.lock:
            self._index(None)

    # -- the Python API ----------------------------------------------------------------------

    @property
    def tasks(self) -> list[SimTask]:
        """The task records (those whose directory is gone included; removed records not)."""
        with self.lock:
            return list(self._tasks.values())

    def task(self, task_id: str) -> SimTask | None:
        """The task record with this id, or None."""
        with self.lock:
            return self._tasks.get(task_id)

    def add_tasks(self, tasks: Iterable[SimTask]) -> None:
        """Add task records; an id that already exists is refused (it is the primary key)."""
        new = list(tasks)
        with self.lock:
            ids = {task.task_id for task in new}
            if len(ids) != len(new):
                raise ValueError("duplicate task ids in the tasks to add")
            clash = next((task_id for task_id in ids if task_id in self._tasks), None)
            if clash is not None:
                raise ValueError(f"task {clash} already exists")
            for task in new:
                if task.created_at.tzinfo is None:
                    raise ValueError(f"task {task.task_id}: created_at must be aware")
                self._tasks[task.task_id] = task
            if new:
                self._indexes.clear()

    def reindex(self) -> None:
        """Rebuild the list order; call after changing a task's status or created_at in place."""
        with self.lock:
            self._indexes.clear()

    def reexecute(self, task_id: str) -> None:
        """Run a task again, as ``POST .../tasks/{task_id}/execute`` does: back to in_progress,
        its directory recreated (``directory_exists`` is not reset, as on the real server).
        ``started_at`` is kept (the server sets it only when it is empty); ``completed_at``
        stays until the task finishes again (:meth:`finish`)."""
        with self.lock:
            task = self._tasks[task_id]
            now = datetime.now(UTC)
            task.status, task.step_status = "in_progress", _STEP_STATUS["in_progress"]
            task.started_at = task.started_at or now
            self._data_gone.discard(task_id)
            self.reexecuted.append(task_id)
            # Status indexes hold the old status; the full index is ordered by creation only.
            self._indexes = {None: self._indexes[None]} if None in self._indexes else {}

    def finish(self, task_id: str, status: str) -> None:
        """A running task ends: ``completed``/``failed`` set ``completed_at`` to now (as
        ``update_task_status`` does); ``partial_completed`` leaves it as it was."""
        with self.lock:
            task = self._tasks[task_id]
            task.status, task.step_status = status, _STEP_STATUS[status]
            if status in ("completed", "failed"):
                task.completed_at = datetime.now(UTC)
            self._indexes = {None: self._indexes[None]} if None in self._indexes else {}

    def add_tasks_from_json(self, payload: Any) -> int:
        """Add tasks given as a JSON list of :meth:`SimTask.to_dict` objects."""
        if not isinstance(payload, list) or not all(isinstance(item, dict) for item in payload):
            raise ValueError("tasks must be a JSON list of objects")
        tasks = [SimTask.from_dict(item) for item in payload]
        self.add_tasks(tasks)
        return len(tasks)

    # -- routes ------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        """List, query and delete, as the real service serves them."""
        return [
            Route("GET", _BASE_PATH, self._list, kind="list"),
            Route("POST", _BASE_PATH + "/query", self._query, kind="list"),
            Route("GET", _BASE_PATH + r"/(?P<task_id>[^/]+)", self._get, kind="get"),
            Route("DELETE", _BASE_PATH, self._delete, kind="delete"),
        ]

    def error_response(self, request: Request, status: int, detail: str) -> Response:
        """The service's error shape; the specific text goes in ``data.response``."""
        if status == 500:
            if request.method == "DELETE":
                message = "删除任务失败,请稍后重试"
            elif request.path.endswith("/query"):
                message = "查询任务列表失败,请稍后重试"
            else:
                message = "获取任务列表失败,请稍后重试"
            return self._error(500, message, "INTERNAL_ERROR", detail)
        message, error_type = {
            400: ("请求参数错误", "INVALID_PARAMS"),
            404: ("请求的资源不存在", "NOT_FOUND"),
            405: ("请求方法不允许", "METHOD_NOT_ALLOWED"),
            429: ("请求过于频繁,请稍后重试", "RATE_LIMITED"),
        }.get(status, ("请求失败", "ERROR"))
        return self._error(status, message, error_type, detail)

    def _list(self, request: Request) -> Response:
        try:
            limit = min(_int_param(request.arg("limit"), "limit", _LIST_LIMIT_DEFAULT), _PAGE_MAX)
            offset = _int_param(request.arg("offset"), "offset", 0)
        except _BadRequest as exc:
            return self._bad_request(exc)
        status = request.arg("status") or None
        with self.lock:
            index = self._index(status)
            page = index.page(0, len(index), offset, limit, descending=True)
            rendered = [self._render(task) for task in page]
            rate = self.faults.reexecute_rate
            if rate:
                # Someone re-runs tasks just after this page showed them finished.
                for task in page:
                    if task.status not in LIVE_STATUSES and task.directory_exists:
                        if self.roll(rate):
                            self.reexecute(task.task_id)
        return self._ok(
            "获取任务列表成功",
            {
                "tasks": rendered,
                # The real service reports the page length here, not the number of matches.
                "total": len(rendered),
                "limit": limit,
                "offset": offset,
                "response": "获取任务列表成功",
                "timestamp": self._now_text(),
            },
        )

    def _query(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            body = _json_object(request, allow_empty=True)
            page = max(_int_param(body.get("page"), "page", 1), 1)
            page_size = min(max(_int_param(body.get("page_size"), "page_size", 20), 1), _PAGE_MAX)
            status = _str_param(body, "status")
            sort_by = _str_param(body, "sort_by") or "created_at"
            if sort_by not in _QUERY_SORT_FIELDS:
                sort_by = "created_at"  # the service falls back instead of refusing
            sort_order = (_str_param(body, "sort_order") or "desc").lower()
            if sort_order not in ("asc", "desc"):
                sort_order = "desc"
            ranges = {
                name: (
                    self._local_param(body, f"{prefix}_time_start"),
                    self._local_param(body, f"{prefix}_time_end"),
                )
                for name, prefix in (
                    ("created_at", "created"),
                    ("started_at", "started"),
                    ("completed_at", "completed"),
                )
            }
            task_name = _str_param(body, "task_name")
            created_by = _str_param(body, "created_by")
            db_name = _str_param(body, "db_name")
        except _BadRequest as exc:
            return self._bad_request(exc)

        offset = (page - 1) * page_size
        simple = (
            sort_by == "created_at"
            and not (task_name or created_by or db_name)
            and ranges["started_at"] == ranges["completed_at"] == (None, None)
        )
        with self.lock:
            if simple:
                index = self._index(status)
                low, high = index.window(*ranges["created_at"])
                total = high - low
                selected = index.page(low, high, offset, page_size, descending=sort_order == "desc")
            else:
                matches = [
                    task
                    for task in self._tasks.values()
                    if (not status or task.status == status)
                    and (not task_name or task_name.lower() in (task.task_name or "").lower())
                    and (not created_by or task.created_by == created_by)
                    and (not db_name or task.db_name == db_name)
                    and all(_in_range(getattr(task, f), *r) for f, r in ranges.items())
                ]
                total = len(matches)
                selected = _sorted_like_postgres(matches, sort_by, sort_order)[
                    offset : offset + page_size
                ]
            rendered = [self._render(task) for task in selected]
        total_pages = (total + page_size - 1) // page_size
        return self._ok(
            "查询任务列表成功",
            {
                "tasks": rendered,
                "pagination": {
                    "page": page,
                    "page_size": page_size,
                    "total": total,
                    "total_pages": total_pages,
                    "has_next": page < total_pages,
                    "has_prev": page > 1,
                },
                "sort_applied": {"sort_by": sort_by, "sort_order": sort_order},
                "query_time": f"{time.perf_counter() - started:.3f}s",
                "response": f"查询到{total}个任务",
            },
        )

    def _get(self, request: Request) -> Response:
        """One task, shaped like ``get_data_pipeline_task_status`` (no directory_exists)."""
        task_id = request.params["task_id"]
        with self.lock:
            task = self._tasks.get(task_id)
            if task is None:
                return self.error_response(request, 404, f"任务不存在: {task_id}")
            render = self._render_time
            steps = _steps(task.status)
            data = {
                "task_id": task.task_id,
                "task_name": task.task_name,
                "status": task.status,
                "step_status": dict(steps),
                "created_at": render(task.created_at),
                "started_at": render(task.started_at),
                "completed_at": render(task.completed_at),
                "parameters": {"db_name": task.db_name},
                "result": None,
                "error_message": None,
                "current_step": None,
                "total_steps": len(steps),
                "steps": [
                    {
                        "step_name": name,
                        "step_status": status,
                        "started_at": None,
                        "completed_at": None,
                        "error_message": None,
                    }
                    for name, status in steps
                ],
            }
        return self._ok("获取任务状态成功", data)

    def _delete(self, request: Request) -> Response:
        try:
            body = _json_object(request, allow_empty=False)
            missing = [name for name in ("task_ids", "confirm") if name not in body]
            if missing and missing != ["task_ids"]:
                raise _BadRequest(
                    f"缺少必需参数: {', '.join(missing)}", "MISSING_PARAMS", missing_params=missing
                )
            task_ids = body.get("task_ids")
            if (
                not isinstance(task_ids, list)
                or not task_ids
                or not all(isinstance(task_id, str) for task_id in task_ids)
            ):
                raise _BadRequest("task_ids必须是非空的任务ID列表")
            if body["confirm"] is not True:
                raise _BadRequest("confirm参数必须为true,以确认删除操作")
            delete_records = _bool_param(body, "delete_database_records", default=False)
            continue_on_error = _bool_param(body, "continue_on_error", default=True)
        except _BadRequest as exc:
            return self._bad_request(exc)

        now = datetime.now(UTC)
        now_text = self._render_time(now)
        faults = self.faults
        deleted: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        with self.lock:
            for task_id in task_ids:
                if self._in_flight[task_id]:
                    self.overlapping_deletes += 1
                    break
            self._in_flight.update(task_ids)
        try:
            for task_id in task_ids:
                if faults.delete_ms_per_id:
                    # Synchronous work per id, outside the lock: other requests go on meanwhile.
                    self._stopping.wait(faults.delete_ms_per_id / 1000)
                with self.lock:
                    self.record_delete_request(task_id)
                    if self.roll(faults.partial_failure_rate):
                        failed.append(
                            {
                                "task_id": task_id,
                                "error": "删除任务目录失败",
                                "error_code": "DELETE_FAILED",
                            }
                        )
                        if not continue_on_error:
                            break
                        continue
                    deleted.append(self._delete_one(task_id, delete_records, now, now_text))
        finally:
            with self.lock:
                self._in_flight.subtract(task_ids)
        return self._ok(
            "任务目录删除成功" if not failed else "批量删除部分完成",
            {
                "deleted_at": now_text,
                "deleted_tasks": deleted,
                "failed_tasks": failed,
                "summary": {
                    "total_requested": len(task_ids),
                    "successfully_deleted": len(deleted),
                    "failed": len(failed),
                },
            },
        )

    def _delete_one(
        self, task_id: str, delete_records: bool, now: datetime, now_text: str
    ) -> dict[str, Any]:
        # The caller holds the lock. Unknown ids and gone directories succeed, deleting nothing.
        task = self._tasks.get(task_id)
        if task is not None and task.directory_exists and self.acknowledge_without_effect(task_id):
            return _deleted_entry(task_id, True, False, task.files_count, task.size_bytes, now_text)
        present = task is not None and task.directory_exists and task_id not in self._data_gone
        files_count = size_bytes = 0
        database_records_deleted = False
        if task is not None:
            if present:
                files_count, size_bytes = task.files_count, task.size_bytes
                self.record_deleted(task_id, live=task.status in LIVE_STATUSES)
            if self.roll(self.faults.db_update_failure_rate):
                # The directory is gone, the row still says it exists: logged, then swallowed.
                self._data_gone.add(task_id)
                self.db_update_failed.append(task_id)
            elif delete_records:
                self._data_gone.discard(task_id)
                self._remove_record(task)
                database_records_deleted = True
            else:
                self._data_gone.discard(task_id)
                task.directory_exists = False
                task.updated_at = now
        elif delete_records:
            # The server runs its DELETE statements for unknown ids too, and says so.
            database_records_deleted = True
        return _deleted_entry(
            task_id, present, database_records_deleted, files_count, size_bytes, now_text
        )

    # -- internals ---------------------------------------------------------------------------

    def _index(self, status: str | None) -> _Index:
        # The caller holds the lock.
        index = self._indexes.get(status)
        if index is None:
            if status is None:
                # Tasks are usually added oldest first, which makes this sort close to linear.
                with _gc_paused():
                    index = _Index(sorted(self._tasks.values(), key=_SORT_KEY))
            else:
                everything = self._index(None)
                alive = everything.alive
                index = _Index(
                    [
                        task
                        for position, task in enumerate(everything.items)
                        if task.status == status and (alive is None or alive[position])
                    ]
                )
            self._indexes[status] = index
        return index

    def _remove_record(self, task: SimTask) -> None:
        # The caller holds the lock.
        del self._tasks[task.task_id]
        for status, index in list(self._indexes.items()):
            if status is not None and status != task.status:
                continue
            if not index.discard(task):
                # The task was changed in place since the index was built: start over.
                self._indexes.clear()
                return
            self._indexes[status] = index.compacted()

    def _render(self, task: SimTask) -> dict[str, Any]:
        render = self._render_time
        return {
            "task_id": task.task_id,
            "task_name": task.task_name,
            "status": task.status,
            "step_status": task.step_status,
            "created_at": render(task.created_at),
            "started_at": render(task.started_at),
            "completed_at": render(task.completed_at),
            "created_by": task.created_by,
            "db_name": task.db_name,
            "business_context": task.business_context,
            "directory_exists": task.directory_exists,
            "updated_at": render(task.updated_at),
        }

    @overload
    def _render_time(self, value: datetime) -> str: ...
    @overload
    def _render_time(self, value: None) -> None: ...
    def _render_time(self, value: datetime | None) -> str | None:
        # Naive server-local time via isoformat(), like the service: microseconds are omitted
        # when they are zero, exactly as Python prints them.
        if value is None:
            return None
        return value.astimezone(self._zone).replace(tzinfo=None).isoformat()

    def _now_text(self) -> str:
        return self._render_time(datetime.now(UTC))

    def _local_param(self, body: Mapping[str, Any], name: str) -> datetime | None:
        text = _str_param(body, name)
        if not text:
            return None
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise _BadRequest(f"{name}格式错误: {text}") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=self._zone)
        return parsed.astimezone(UTC)

    def _ok(self, message: str, data: dict[str, Any]) -> Response:
        return Response.json({"success": True, "code": 200, "message": message, "data": data})

    def _bad_request(self, exc: _BadRequest) -> Response:
        return self._error(400, exc.message, exc.error_type, exc.message, **exc.extra)

    def _error(
        self, status: int, message: str, error_type: str, detail: str, **extra: Any
    ) -> Response:
        data = {"response": detail, "error_type": error_type, **extra}
        payload = {"success": False, "code": status, "message": message, "data": data}
        return Response.json(payload, status=status)


def _deleted_entry(
    task_id: str,
    directory_deleted: bool,
    database_records_deleted: bool,
    files_count: int,
    size_bytes: int,
    now_text: str,
) -> dict[str, Any]:
    """One ``deleted_tasks`` entry, as ``delete_task_directory_simple`` returns it."""
    return {
        "success": True,
        "task_id": task_id,
        "directory_deleted": directory_deleted,
        "database_records_deleted": database_records_deleted,
        "deleted_files_count": files_count if directory_deleted else 0,
        "deleted_size": format_size(size_bytes if directory_deleted else 0),
        "deleted_at": now_text,
        "operation_message": "目录删除成功" if directory_deleted else "目录不存在,无需删除",
    }


_STEP_NAMES = ("ddl_generation", "qa_generation", "sql_validation", "training_load")


def _steps(status: str) -> list[tuple[str, str]]:
    """Plausible step statuses for a task status (the real service keeps them per step)."""
    if status == "pending":
        return [(name, "pending") for name in _STEP_NAMES]
    if status == "in_progress":
        return [(_STEP_NAMES[0], "completed"), (_STEP_NAMES[1], "running")] + [
            (name, "pending") for name in _STEP_NAMES[2:]
        ]
    if status == "completed":
        return [(name, "completed") for name in _STEP_NAMES]
    if status == "failed":
        return [(_STEP_NAMES[0], "completed"), (_STEP_NAMES[1], "failed")] + [
            (name, "pending") for name in _STEP_NAMES[2:]
        ]
    return [(_STEP_NAMES[0], "completed"), (_STEP_NAMES[1], "completed")] + [
        (name, "pending") for name in _STEP_NAMES[2:]
    ]


def _int_param(raw: object, name: str, default: int) -> int:
    if raw is None:
        return default
    if isinstance(raw, bool):
        raise _BadRequest(f"{name}参数必须是非负整数")
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, str):
        try:
            value = int(raw.strip())
        except ValueError:
            raise _BadRequest(f"{name}参数必须是非负整数") from None
    else:
        raise _BadRequest(f"{name}参数必须是非负整数")
    if value < 0:
        raise _BadRequest(f"{name}参数必须是非负整数")
    return value


def _str_param(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _BadRequest(f"{name}参数必须是字符串")
    return value


def _bool_param(body: Mapping[str, Any], name: str, *, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise _BadRequest(f"{name}参数必须是布尔值")
    return value


def _json_object(request: Request, *, allow_empty: bool) -> dict[str, Any]:
    if allow_empty and not request.body.strip():
        return {}
    try:
        body = request.json()
    except ValueError:
        raise _BadRequest("请求体必须是有效的JSON格式") from None
    if not isinstance(body, dict):
        raise _BadRequest("请求体必须是JSON对象")
    return body


def _in_range(value: datetime | None, start: datetime | None, end: datetime | None) -> bool:
    # SQL semantics: a NULL column never satisfies a comparison.
    if start is None and end is None:
        return True
    if value is None:
        return False
    return (start is None or value >= start) and (end is None or value <= end)


def _sorted_like_postgres(tasks: list[SimTask], sort_by: str, sort_order: str) -> list[SimTask]:
    # PostgreSQL puts NULLs last when ascending and first when descending; task_id breaks ties.
    present = [task for task in tasks if getattr(task, sort_by) is not None]
    missing = [task for task in tasks if getattr(task, sort_by) is None]
    descending = sort_order == "desc"
    present.sort(key=attrgetter(sort_by, "task_id"), reverse=descending)
    missing.sort(key=attrgetter("task_id"), reverse=descending)
    return missing + present if descending else present + missing
