"""The data_pipeline task API (a Flask service; ``/api/v0/data_pipeline/tasks``).

Listing pages with ``limit``/``offset`` until a short page: the server's ``total`` is only the
length of the page, never the number of tasks. Timestamps are naive server-local wall time, read
in the configured ``timestamps_timezone``. Deletion is batched (``task_ids`` + ``confirm: true``)
and every id's outcome is read from ``deleted_tasks``/``failed_tasks``: a partly failed batch is a
normal answer. The server joins ids into a directory path unvalidated, so ids that do not match
``^(task|manual)_\\d{8}_\\d{6}$`` are never sent.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal
from zoneinfo import ZoneInfo

import structlog
from pydantic import AnyHttpUrl, ConfigDict, Field, field_validator

from reaper.converters import parse_size, parse_timezone, timestamp_parser
from reaper.errors import ListingError, TargetResponseError
from reaper.http import loads_json
from reaper.targets.base import (
    BatchResult,
    DeleteOptions,
    DeleteResult,
    ListRequest,
    Outcome,
    Target,
    TargetConfig,
    Task,
    task_reader,
)

__all__ = ["DataPipelineConfig", "DataPipelineOptions", "DataPipelineTarget"]

log = structlog.get_logger("reaper.targets.data_pipeline")

TASKS_PATH = "/api/v0/data_pipeline/tasks"
# [0-9], not \d: \d also matches other scripts' digits, which would pass the path guard.
ID_PATTERN = re.compile(r"(task|manual)_[0-9]{8}_[0-9]{6}")
SERVER_PAGE_CAP = 100


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
    # The server has no limit; a request of a few thousand ids is still one small JSON body.
    max_batch_size = 5000

    config: DataPipelineConfig

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
        body = await self.fetch_json(where, "GET", f"{url}?limit={limit}&offset={offset}")
        return _page_tasks(body, where)

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
        exchange = await self.http.send("DELETE", self.config.endpoint(), json_body=payload)
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
            _read_outcomes(task_ids, body["data"], exchange.status_code), exchange.lost_attempts
        )


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
    task_ids: Sequence[str], data: dict[str, Any], http_status: int
) -> list[DeleteResult]:
    """One result per requested id, read from the per-id lists of the answer."""
    requested = set(task_ids)
    found: dict[str, DeleteResult] = {}
    deleted = data.get("deleted_tasks")
    failed = data.get("failed_tasks")
    if not isinstance(deleted, list) or not isinstance(failed, list):
        raise TargetResponseError(
            "delete answer lacks deleted_tasks/failed_tasks lists", http_status=http_status
        )
    for entry in deleted:
        if not isinstance(entry, dict) or entry.get("task_id") not in requested:
            continue  # never record an outcome for an id we did not send
        task_id = str(entry["task_id"])
        if entry.get("success") is False:
            found[task_id] = DeleteResult(
                task_id, Outcome.FAILED, http_status, None, "reported success: false"
            )
        elif entry.get("directory_deleted") is False:
            found[task_id] = DeleteResult(
                task_id, Outcome.ALREADY_GONE, http_status, note="directory_deleted: false"
            )
        else:
            size = entry.get("deleted_size")
            files = entry.get("deleted_files_count")
            found[task_id] = DeleteResult(
                task_id,
                Outcome.DELETED,
                http_status,
                reclaimed_bytes=parse_size(size),
                files_count=files if isinstance(files, int) else None,
                note=f"deleted_size: {size}" if size is not None else None,
            )
    for entry in failed:
        if not isinstance(entry, dict) or entry.get("task_id") not in requested:
            continue
        task_id = str(entry["task_id"])
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
