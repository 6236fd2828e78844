"""The data_pipeline task API (a Flask service; ``/api/v0/data_pipeline/tasks``).

Listing pages with ``limit``/``offset`` until a short page: the server's ``total`` is only the
length of the page, never the number of tasks. Timestamps are naive server-local wall time, read
in the configured ``timestamps_timezone``. Deletion is batched (``task_ids`` + ``confirm: true``)
and every id's outcome is read from ``deleted_tasks``/``failed_tasks``: a partly failed batch is a
normal answer. The server joins ids into a directory path unvalidated, so ids that do not match
``^(task|manual)_\\d{8}_\\d{6}$`` are never sent.

The server deletes whatever ids it is sent, live ones included, and a finished task can be
re-executed (back to ``in_progress``). Before a batch leaves, tasks are re-checked
(:meth:`DataPipelineTarget.recheck`): by re-listing every status in which a task is no longer
deletable (``?status=pending``, ``?status=in_progress``, ...: usually few pages), or, when that
would cost more requests than the ids about to be sent, by ``GET .../tasks/{task_id}`` per task.

The server works through a batch synchronously (a file walk and a database connection per id), so
a delete request's timeout grows with its batch (``delete_timeout_per_id``), and a request that
timed out, or that a gateway answered 502/504, is not sent again while the server may still be
working on it: its ids are ``unknown`` until reconciliation settles them.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

import structlog
from pydantic import AnyHttpUrl, ConfigDict, Field, field_validator

from reaper.converters import parse_size, parse_timezone, timestamp_parser
from reaper.errors import ListingError, TargetResponseError
from reaper.fields import Duration
from reaper.http import loads_json
from reaper.targets.base import (
    BatchResult,
    DeleteOptions,
    DeleteResult,
    ListRequest,
    Outcome,
    Recheck,
    RecheckRequest,
    Target,
    TargetConfig,
    Task,
    origin_of,
    task_reader,
)

__all__ = ["DataPipelineConfig", "DataPipelineOptions", "DataPipelineTarget"]

log = structlog.get_logger("reaper.targets.data_pipeline")

TASKS_PATH = "/api/v0/data_pipeline/tasks"
# [0-9], not \d: \d also matches other scripts' digits, which would pass the path guard.
ID_PATTERN = re.compile(r"(task|manual)_[0-9]{8}_[0-9]{6}")
SERVER_PAGE_CAP = 100
#: A re-listing by status steps by this much less than a page, so that up to this many tasks
#: leaving the status between two page requests cannot hide a task that stayed in it.
RELIST_OVERLAP = 10


class DataPipelineConfig(TargetConfig):
    """``target:`` settings for ``type: data_pipeline``."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    type: Literal["data_pipeline"]
    base_url: AnyHttpUrl = Field(description="Service root, e.g. http://127.0.0.1:8084")
    timestamps_timezone: str = Field(
        "UTC", description="IANA zone the server's naive timestamps are written in."
    )
    page_size: int = Field(
        SERVER_PAGE_CAP, ge=1, le=SERVER_PAGE_CAP, description="Tasks per listing page (max 100)."
    )
    verify_total: bool = Field(
        True,
        description="Cross-check the listing against the query endpoint's true total.",
    )
    settle_after: Duration = Field(
        timedelta(minutes=10),
        description=(
            "How long a delete request that timed out (or a gateway answered 502/504) may still "
            "be running on the server: its tasks are not sent again until it is over."
        ),
        json_schema_extra={"default": "10m"},
    )
    delete_timeout_per_id: Duration = Field(
        timedelta(seconds=1),
        description=(
            "Added to `timeout` per id of a delete request: the server deletes a batch id by id, "
            "synchronously."
        ),
        json_schema_extra={"default": "1s"},
    )

    @field_validator("timestamps_timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        parse_timezone(value)
        return value

    @field_validator("base_url")
    @classmethod
    def _no_credentials(cls, value: AnyHttpUrl) -> AnyHttpUrl:
        if value.username or value.password:
            raise ValueError("credentials do not belong in base_url")
        if value.query or value.fragment:
            raise ValueError("base_url must not have a query or fragment")
        return value

    @property
    def zone(self) -> ZoneInfo:
        return parse_timezone(self.timestamps_timezone)

    def endpoint(self) -> str:
        return str(self.base_url).rstrip("/") + TASKS_PATH

    def describe(self) -> str:
        return str(self.base_url).rstrip("/")

    def origin(self) -> str:
        return origin_of(str(self.base_url))


class DataPipelineOptions(DeleteOptions):
    """``delete.options`` for data_pipeline."""

    delete_database_records: bool = Field(
        False, description="Also remove the task's database rows (default: keep the history)."
    )


def _error_text(body: Any) -> tuple[str | None, str | None]:
    """The server's own error code and most specific message from an error body."""
    if not isinstance(body, dict):
        return None, None
    data = body.get("data")
    message = body.get("message")
    code = None
    if isinstance(data, dict):
        message = data.get("response") or message
        code = data.get("error_type")
    return (str(code) if code is not None else None), (
        str(message) if message is not None else None
    )


class DataPipelineTarget(Target):
    """List and batch-delete data_pipeline tasks."""

    kind = "data_pipeline"
    config_model = DataPipelineConfig
    options_model = DataPipelineOptions
    live_statuses = frozenset({"pending", "in_progress"})
    known_statuses = frozenset(
        {"pending", "in_progress", "partial_completed", "completed", "failed"}
    )
    time_fields = ("created_at", "started_at", "completed_at", "updated_at")
    match_fields = frozenset(
        {"task_id", "task_name", "step_status", "created_by", "db_name", "business_context"}
    )
    # The real server removes the directory, then updates the row in a new connection and
    # swallows a failure there: an id it acknowledged can stay listed with its directory gone.
    gone_after_acknowledged_is_ours = True
    # The server has no limit of its own, but works through a batch synchronously: a batch of
    # thousands would hold one request open for minutes (the default batch is 50).
    max_batch_size = 1000

    config: DataPipelineConfig

    @classmethod
    def settle_after_for(cls, config: TargetConfig) -> timedelta | None:
        # The server works through a batch synchronously and keeps going when the client (or a
        # gateway in front of it) gives up: a second request would overlap the first.
        assert isinstance(config, DataPipelineConfig)
        return config.settle_after

    def invalid_id_reason(self, task_id: str) -> str | None:
        # fullmatch: '$' would accept a trailing newline.
        if not isinstance(task_id, str) or not ID_PATTERN.fullmatch(task_id):
            return "id does not match ^(task|manual)_[0-9]{8}_[0-9]{6}$ (path-traversal guard)"
        return None

    async def list_tasks(self, request: ListRequest) -> AsyncIterator[Task]:
        url = self.config.endpoint()
        limit = self.config.page_size
        read = self._reader(request, self.config.zone)
        total_before = await self._true_total() if self.config.verify_total else None
        offset = 0
        page_no = 0
        listed = 0
        previous_ids: set[str] = set()
        while True:
            page_no += 1
            where = f"listing page {page_no} (offset {offset})"
            tasks = await self._page(url, limit, offset, where)
            page_ids: set[str] = set()
            shifted = 0
            for position, raw in enumerate(tasks):
                task = read(raw, where)
                page_ids.add(task.id)
                if task.id in previous_ids:
                    # Tasks created meanwhile arrive at the head (newest first) and push the
                    # last ones of the previous page across the boundary: the same records
                    # again, at the start of this page. Anywhere else it is a paging fault.
                    if position != shifted:
                        raise ListingError(
                            f"{where}: task {task.id!r} of the previous page appears again in "
                            "the middle of this one: paging is inconsistent"
                        )
                    shifted += 1
                    continue
                listed += 1
                yield task
            if tasks and shifted == len(tasks):
                raise ListingError(f"{where}: the page repeats the previous one")
            if shifted:
                log.info("listing_shifted", page=page_no, repeated=shifted)
            previous_ids = page_ids
            # `total` is the page length, not a grand total: only a short page ends the listing.
            if len(tasks) < limit:
                break
            offset += len(tasks)
        if total_before is not None:
            total_after = await self._true_total()
            expected = min(total_before, total_after)
            if listed < expected:
                raise ListingError(
                    f"the listing returned {listed} task(s) but the server holds {expected}: "
                    "a page was missing or cut short; nothing is deleted"
                )

    async def _page(self, url: str, limit: int, offset: int, where: str) -> list[Any]:
        # The query written out (two integers): httpx's params merging costs ~45 us of CPU a
        # request, and a million tasks are 10,000 requests.
        sent = time.time()
        body = await self.fetch_json(where, "GET", f"{url}?limit={limit}&offset={offset}")
        tasks = _page_tasks(body, where)
        self._observe_local_time(body["data"].get("timestamp"), sent, time.time())
        return tasks

    def _observe_local_time(self, value: Any, sent: float, received: float) -> None:
        """Note the server's local time (``data.timestamp``, naive) read in the configured
        zone: a zone that is not the server's shows as an offset of hours (reaper.clocks).

        Informational only: a missing or odd value is ignored, never a listing error."""
        if not isinstance(value, str):
            return
        try:
            local = datetime.fromisoformat(value)
        except ValueError:
            return
        if local.tzinfo is not None:
            return  # it says its own offset: there is no zone to get wrong
        server = local.replace(tzinfo=self.config.zone).timestamp()
        self.http.stats.local_time_offsets.add(server - received, server - sent)

    def error_text(self, body: bytes) -> tuple[str | None, str | None]:
        return _error_text(_json_or_none(body))

    async def _true_total(self) -> int:
        """The number of task records, from the query form (its total is a real count)."""
        where = "counting tasks (POST .../tasks/query)"
        exchange = await self.fetch_page(
            where,
            "POST",
            self.config.endpoint() + "/query",
            json_body={"page": 1, "page_size": 1},
        )
        body = _json_or_none(exchange.body)
        data = body.get("data") if isinstance(body, dict) else None
        pagination = data.get("pagination") if isinstance(data, dict) else None
        total = pagination.get("total") if isinstance(pagination, dict) else None
        if exchange.status_code != 200 or not isinstance(total, int) or isinstance(total, bool):
            raise ListingError(
                f"{where}: HTTP {exchange.status_code} without a pagination total; set "
                "target.verify_total: false if this server has no query endpoint",
                http_status=exchange.status_code,
            )
        return total

    def _reader(self, request: ListRequest, zone: ZoneInfo) -> Callable[[Any, str], Task]:
        """Listed records as Tasks: naive timestamps read in ``zone``; a listed task whose
        directory is gone was already deleted (``directory_exists: false``)."""
        return task_reader(
            request,
            id_field="task_id",
            parse_time=timestamp_parser(zone),
            gone_unless="directory_exists",
        )

    async def delete(self, task_ids: Sequence[str], options: DeleteOptions) -> BatchResult:
        assert isinstance(options, DataPipelineOptions)
        payload = {
            "task_ids": list(task_ids),
            "confirm": True,
            "delete_database_records": options.delete_database_records,
            # reaper decides whether to go on after a failure; the server must always report
            # every id, which it only does when it continues.
            "continue_on_error": True,
        }
        budget = self.config.timeout + self.config.delete_timeout_per_id * len(task_ids)
        exchange = await self.http.send(
            "DELETE",
            self.config.endpoint(),
            json_body=payload,
            timeout=budget.total_seconds(),
            # A second request for the same ids while the first may still be running would
            # walk and remove the same directories twice over.
            overlap_safe=False,
        )
        body = _json_or_none(exchange.body)
        if exchange.status_code != 200:
            code, message = _error_text(body)
            raise TargetResponseError(
                f"delete of {len(task_ids)} id(s) answered HTTP {exchange.status_code}: "
                f"{message or 'no error message'}",
                http_status=exchange.status_code,
                error_code=code,
                error_message=message,
            )
        if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
            raise TargetResponseError(
                "delete answered HTTP 200 with a body that is not the documented JSON object",
                http_status=200,
            )
        return BatchResult(
            _read_outcomes(task_ids, body["data"], exchange.status_code, options),
            exchange.earlier,
        )

    # -- the re-check before deleting -----------------------------------------------------------

    async def recheck(
        self, ids: Sequence[str], upcoming: Sequence[str], request: RecheckRequest
    ) -> Recheck:
        """A check that holds for every task, or a GET per task when that costs fewer requests
        than the ids about to go.

        A finished task changes only by being executed again: it goes back to ``in_progress``,
        then finishes (``update_task_status``) or is marked ``failed`` by the zombie check. Only
        ``completed`` is always entered with a new ``completed_at``; ``partial_completed`` never
        sets one, and neither does the zombie check (which picks a re-executed task at once: it
        keeps its old ``started_at``). So the statuses that exclude a task are re-listed, all
        but ``completed``, and the tasks completed since the listing began are queried
        (``POST .../tasks/query`` with ``completed_time_start``: usually one page): that sees
        every status change, and every new ``completed_at``. Without the query endpoint
        (``verify_total: false``) every excluding status is re-listed instead, and for a policy
        aging tasks by ``completed_at`` also ``completed`` and ``failed``: a re-run that ended
        so again has a new ``completed_at`` under a status the policy may delete.
        """
        excluded = self.known_statuses - request.eligible_statuses
        since = request.listing_started
        if self.config.verify_total and since is not None:
            statuses = sorted(excluded - _ALWAYS_TIMESTAMPED)
            pages = _relist_pages(statuses, request.status_counts) + 1
        else:
            relisted = set(excluded)
            if request.listing.age_field == "completed_at":
                relisted |= _COMPLETED_AT_STATUSES
            statuses = sorted(relisted)
            pages = _relist_pages(statuses, request.status_counts)
            since = None
        if pages == 0:
            return Recheck({}, None, means="no status excludes a task")
        if pages > max(request.horizon, len(ids)):
            return await self._get_each(ids, request)
        seen = await self._relist(statuses, request)
        means = f"re-listed statuses {', '.join(statuses)}"
        if since is not None:
            finished = await self._finished_since(since, request)
            seen.update(finished)
            means += f"; {len(finished)} task(s) finished since the listing began"
        return Recheck(seen, None, means=means)

    async def _finished_since(self, since: datetime, request: RecheckRequest) -> dict[str, Task]:
        """Tasks whose completed_at is at or after ``since`` (less a margin for the server's
        clock), in full, from the query endpoint (completed_at ascending: stable while paging)."""
        start = (since - _CLOCK_MARGIN).astimezone(self.config.zone).replace(tzinfo=None)
        read = self._reader(request.listing, self.config.zone)
        found: dict[str, Task] = {}
        page = 1
        while True:
            where = f"querying tasks completed since {start.isoformat()} (page {page})"
            exchange = await self.fetch_page(
                where,
                "POST",
                self.config.endpoint() + "/query",
                json_body={
                    "page": page,
                    "page_size": SERVER_PAGE_CAP,
                    "completed_time_start": start.isoformat(timespec="seconds"),
                    "sort_by": "completed_at",
                    "sort_order": "asc",
                },
            )
            body = _json_or_none(exchange.body)
            data = body.get("data") if isinstance(body, dict) else None
            pagination = data.get("pagination") if isinstance(data, dict) else None
            if exchange.status_code != 200 or not isinstance(pagination, dict):
                raise ListingError(
                    f"{where}: HTTP {exchange.status_code} without a paginated answer",
                    http_status=exchange.status_code,
                )
            for raw in _page_tasks(body, where):
                task = read(raw, where)
                found[task.id] = task
            if pagination.get("has_next") is not True:
                return found
            page += 1

    async def _relist(self, statuses: Sequence[str], request: RecheckRequest) -> dict[str, Task]:
        seen: dict[str, Task] = {}
        read = self._reader(request.listing, self.config.zone)
        for status in statuses:
            for attempt in range(1, 4):
                try:
                    found = await self._relist_status(status, read)
                    break
                except _Shifted as exc:
                    if attempt == 3:
                        raise ListingError(
                            f"re-listing status {status}: {exc}; tasks change status faster "
                            "than it can be listed"
                        ) from None
            seen.update(found)
        return seen

    async def _relist_status(
        self, status: str, read: Callable[[Any, str], Task]
    ) -> dict[str, Task]:
        """Every task in ``status``. Pages overlap by RELIST_OVERLAP ids: each must share one
        with the previous page's tail, or tasks that left the status may have hidden one that
        stayed in it (then _Shifted, and the status is listed again)."""
        url = self.config.endpoint()
        limit = SERVER_PAGE_CAP
        step = limit - RELIST_OVERLAP
        found: dict[str, Task] = {}
        offset = 0
        tail: set[str] = set()
        while True:
            where = f"re-listing status {status} (offset {offset})"
            body = await self.fetch_json(
                where, "GET", f"{url}?status={status}&limit={limit}&offset={offset}"
            )
            tasks = [read(raw, where) for raw in _page_tasks(body, where)]
            if offset and tail and not tail & {task.id for task in tasks[:RELIST_OVERLAP]}:
                raise _Shifted(f"page at offset {offset} does not overlap the previous one")
            for task in tasks:
                if task.status != status:
                    raise ListingError(f"{where}: task {task.id!r} has status {task.status}")
                found[task.id] = task
            if len(tasks) < limit:
                return found
            tail = {task.id for task in tasks[step:]}
            offset += step

    async def _get_each(self, ids: Sequence[str], request: RecheckRequest) -> Recheck:
        parse_time = timestamp_parser(self.config.zone)
        age_field = request.listing.age_field
        seen: dict[str, Task] = {}
        absent: set[str] = set()
        for task_id in ids:
            where = f"re-checking task {task_id}"
            exchange = await self.fetch_page(where, "GET", f"{self.config.endpoint()}/{task_id}")
            if exchange.status_code == 404:
                absent.add(task_id)
                continue
            body = _json_or_none(exchange.body)
            data = body.get("data") if isinstance(body, dict) else None
            if exchange.status_code != 200 or not isinstance(data, dict):
                code, message = _error_text(body)
                raise ListingError(
                    f"{where}: HTTP {exchange.status_code}: {message or 'not the documented JSON'}",
                    http_status=exchange.status_code,
                    error_code=code,
                    error_message=message,
                )
            status = data.get("status")
            if data.get("task_id") != task_id or not isinstance(status, str):
                raise ListingError(f"{where}: the answer is not about this task")
            timestamp = problem = None
            value = data.get(age_field)
            if value is not None:
                try:
                    timestamp = parse_time(value)
                except ValueError as exc:
                    problem = f"{age_field} does not parse: {exc}"
            seen[task_id] = Task(task_id, status, timestamp, problem=problem)
        return Recheck(
            seen,
            frozenset(ids),
            frozenset(absent),
            means=f"GET of {len(ids)} task(s)",
            # This answer carries the status and times, not every field a policy may match on.
            fields=False,
        )


#: The statuses the server enters only through update_task_status, which sets completed_at: a
#: task that entered one since the listing is found by querying completed_time_start.
_ALWAYS_TIMESTAMPED = frozenset({"completed"})
#: The statuses update_task_status enters with a new completed_at (failed also comes from the
#: zombie check, without one).
_COMPLETED_AT_STATUSES = frozenset({"completed", "failed"})

#: Tasks completed this long before the listing began are queried too: the server's clock (its
#: database session's) and reaper's may differ a little.
_CLOCK_MARGIN = timedelta(minutes=10)


def _relist_pages(statuses: Sequence[str], counts: Mapping[str, int]) -> int:
    """Pages a re-listing of ``statuses`` costs, from the run's listing counts."""
    step = SERVER_PAGE_CAP - RELIST_OVERLAP
    return sum(
        1 + max(0, counts.get(status, 0) - SERVER_PAGE_CAP + step) // step for status in statuses
    )


class _Shifted(Exception):
    """Tasks left a status faster than its re-listing could page through it."""


def _json_or_none(body: bytes) -> Any:
    try:
        return loads_json(body)
    except ValueError:
        return None


def _page_tasks(body: Any, where: str) -> list[Any]:
    if not isinstance(body, dict):
        raise ListingError(f"{where}: the body is not a JSON object")
    if body.get("success") is False:
        code, message = _error_text(body)
        raise ListingError(f"{where}: the server reported failure: {message}", error_code=code)
    data = body.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list):
        raise ListingError(f"{where}: the body has no data.tasks list")
    tasks: list[Any] = data["tasks"]
    return tasks


def _read_outcomes(
    task_ids: Sequence[str],
    data: dict[str, Any],
    http_status: int,
    options: DataPipelineOptions,
) -> list[DeleteResult]:
    """One result per requested id, read from the per-id lists of the answer.

    An answer that breaks the documented shape (lists missing, an entry that is not an object, an
    id that is not a string) is a TargetResponseError: the batch's ids become ``unknown``.
    """
    requested = set(task_ids)
    found: dict[str, DeleteResult] = {}
    deleted = data.get("deleted_tasks")
    failed = data.get("failed_tasks")
    if not isinstance(deleted, list) or not isinstance(failed, list):
        raise TargetResponseError(
            "delete answer lacks deleted_tasks/failed_tasks lists", http_status=http_status
        )
    for name, entries in (("deleted_tasks", deleted), ("failed_tasks", failed)):
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("task_id"), str):
                raise TargetResponseError(
                    f"delete answer: an entry of {name} is not an object with a string task_id",
                    http_status=http_status,
                )
    for entry in deleted:
        task_id = entry["task_id"]
        if task_id not in requested:
            continue  # never record an outcome for an id we did not send
        rows = _rows_note(entry, options)
        if entry.get("success") is False:
            found[task_id] = DeleteResult(
                task_id, Outcome.FAILED, http_status, None, "reported success: false", note=rows
            )
        elif entry.get("directory_deleted") is False:
            found[task_id] = DeleteResult(
                task_id,
                Outcome.ALREADY_GONE,
                http_status,
                note=_join("directory_deleted: false", rows),
            )
        else:
            size = entry.get("deleted_size")
            files = entry.get("deleted_files_count")
            found[task_id] = DeleteResult(
                task_id,
                Outcome.DELETED,
                http_status,
                reclaimed_bytes=parse_size(size) if isinstance(size, str | int) else None,
                files_count=files if type(files) is int else None,
                note=_join(f"deleted_size: {size}" if size is not None else None, rows),
            )
    for entry in failed:
        task_id = entry["task_id"]
        if task_id not in requested:
            continue
        code = entry.get("error_code")
        error = entry.get("error")
        found.setdefault(
            task_id,
            DeleteResult(
                task_id,
                Outcome.FAILED,
                http_status,
                str(code) if code is not None else None,
                str(error) if error is not None else None,
            ),
        )
    results = []
    for task_id in task_ids:
        result = found.get(task_id)
        if result is None:
            result = DeleteResult(
                task_id,
                Outcome.UNKNOWN,
                http_status,
                error_message="the answer named this id in neither deleted_tasks nor failed_tasks",
            )
        results.append(result)
    return results


def _rows_note(entry: dict[str, Any], options: DataPipelineOptions) -> str | None:
    """What the server says it did to the task's database rows."""
    flag = entry.get("database_records_deleted")
    if not isinstance(flag, bool):
        return None
    if flag:
        return "database rows deleted (database_records_deleted: true)"
    if options.delete_database_records:
        # Asked to delete the rows, and the server says it did not.
        return "database rows NOT deleted although asked (database_records_deleted: false)"
    return "database rows kept (database_records_deleted: false)"


def _join(*parts: str | None) -> str | None:
    text = "; ".join(part for part in parts if part)
    return text or None
