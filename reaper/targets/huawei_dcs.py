"""The Huawei Cloud DCS task center (``/v2/{project_id}/tasks``; TARGETS.md section 2).

Listing pages with ``offset``/``limit`` (up to 1000) until a short page, and pushes the age cutoff
to the server as ``end_time`` (UTC ``yyyyMMddHHmmss``, rounded *up* to the second so that no task
older than the cutoff is filtered out; the planner still compares exact timestamps). Deletion is
one ``DELETE /v2/{project_id}/tasks/{task_id}`` per id: 200 deleted, 404 already gone. ``EXECUTING``
is the live status; a status the API does not document is never deletable (policies cannot name
one).

Before deleting, tasks are re-checked by listing again the creation-time window of the ids due
next (``start_time``/``end_time``, usually one page of up to 1000 for hundreds of deletes); with
``age_field: updated_at`` the creation times are unknown and the whole target is listed again.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import quote

import structlog
from pydantic import AnyHttpUrl, Field, field_validator, model_validator

from reaper.errors import ListingError
from reaper.targets.base import (
    DeleteOptions,
    ListRequest,
    Recheck,
    RecheckRequest,
    Task,
    task_reader,
)
from reaper.targets.huawei import (
    HuaweiConfig,
    HuaweiTarget,
    check_endpoint,
    parse_iso_millis_time,
)

__all__ = ["HuaweiDcsConfig", "HuaweiDcsOptions", "HuaweiDcsTarget"]

log = structlog.get_logger("reaper.targets.huawei_dcs")

PAGE_CAP = 1000
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
END_TIME_FORMAT = "%Y%m%d%H%M%S"


class HuaweiDcsConfig(HuaweiConfig):
    """``target:`` settings for ``type: huawei_dcs``."""

    type: Literal["huawei_dcs"]
    endpoint: AnyHttpUrl | None = Field(
        None, description="e.g. https://dcs.cn-north-4.myhuaweicloud.com (or give region)."
    )
    region: str | None = Field(
        None,
        pattern=r"^[a-z]{2,}(-[a-z0-9]+)+$",
        description="e.g. cn-north-4: the endpoint is https://dcs.{region}.myhuaweicloud.com.",
    )
    page_size: int = Field(
        PAGE_CAP, ge=1, le=PAGE_CAP, description="Tasks per listing page (max 1000)."
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: AnyHttpUrl | None) -> AnyHttpUrl | None:
        return check_endpoint(value) if value is not None else None

    @model_validator(mode="after")
    def _endpoint_or_region(self) -> HuaweiDcsConfig:
        if (self.endpoint is None) == (self.region is None):
            raise ValueError("give exactly one of endpoint or region")
        return self

    def base_url(self) -> str:
        if self.endpoint is not None:
            return str(self.endpoint).rstrip("/")
        return f"https://dcs.{self.region}.myhuaweicloud.com"

    def tasks_url(self) -> str:
        return f"{self.base_url()}/v2/{self.project_id}/tasks"


class HuaweiDcsOptions(DeleteOptions):
    """``delete.options`` for huawei_dcs."""

    message: str | None = Field(
        None, max_length=1024, description="Sent as the request body's 'message' (optional)."
    )


def end_time_param(cutoff: datetime) -> str:
    """``yyyyMMddHHmmss`` (UTC) of the cutoff, rounded up to the whole second."""
    utc = cutoff.astimezone(UTC)
    whole = utc.replace(microsecond=0)
    if whole != utc:
        whole += timedelta(seconds=1)
    return whole.strftime(END_TIME_FORMAT)


def start_time_param(start: datetime) -> str:
    """``yyyyMMddHHmmss`` (UTC) of ``start``, rounded down to the whole second."""
    return start.astimezone(UTC).strftime(END_TIME_FORMAT)


class HuaweiDcsTarget(HuaweiTarget):
    """List and delete DCS background tasks."""

    kind = "huawei_dcs"
    config_model = HuaweiDcsConfig
    options_model = HuaweiDcsOptions
    live_statuses = frozenset({"EXECUTING"})
    known_statuses = frozenset({"SUCCESS", "FAILED", "EXECUTING"})
    time_fields = ("created_at", "updated_at")
    match_fields = frozenset(
        {"task_id", "name", "details", "user_name", "user_id", "job_id", "error_code", "params"}
    )
    max_batch_size = 1
    deleted_statuses = frozenset({200, 204})

    config: HuaweiDcsConfig

    def invalid_id_reason(self, task_id: str) -> str | None:
        if not isinstance(task_id, str) or not ID_PATTERN.fullmatch(task_id):
            return "id is not 1-64 letters, digits, '-' or '_' (it becomes a URL path segment)"
        return None

    def delete_url(self, task_id: str) -> str:
        return f"{self.config.tasks_url()}/{quote(task_id, safe='')}"

    def delete_body(self, options: DeleteOptions) -> Any:
        assert isinstance(options, HuaweiDcsOptions)
        return {"message": options.message} if options.message is not None else None

    async def list_tasks(self, request: ListRequest) -> AsyncIterator[Task]:
        params: dict[str, Any] = {}
        if request.created_before is not None:
            params["end_time"] = end_time_param(request.created_before)
        async for task in self._list(request, params):
            yield task

    async def recheck(
        self, ids: Sequence[str], upcoming: Sequence[str], request: RecheckRequest
    ) -> Recheck:
        """List again the creation-time window of ``ids`` and ``upcoming`` (age field
        ``created_at``); otherwise the whole target."""
        wanted = [*ids, *upcoming]
        stamps = [request.timestamps[i] for i in wanted if i in request.timestamps]
        if request.listing.age_field != "created_at" or len(stamps) != len(wanted):
            return await super().recheck(ids, upcoming, request)
        params = {
            "start_time": start_time_param(min(stamps)),
            "end_time": end_time_param(max(stamps)),
        }
        covered = frozenset(wanted)
        seen: dict[str, Task] = {}
        async for task in self._list(request.listing, params):
            if task.id in covered:
                seen[task.id] = task
        return Recheck(
            seen,
            covered,
            covered - seen.keys(),
            means=f"listed tasks created {params['start_time']}..{params['end_time']}",
        )

    async def _list(self, request: ListRequest, filters: dict[str, Any]) -> AsyncIterator[Task]:
        url = self.config.tasks_url()
        limit = self.config.page_size
        read = task_reader(request, id_field="id", parse_time=parse_iso_millis_time)
        params: dict[str, Any] = {"limit": limit, **filters}
        offset = 0
        page_no = 0
        previous_ids: set[str] = set()
        while True:
            page_no += 1
            where = f"listing page {page_no} (offset {offset})"
            body = await self.fetch_json(where, "GET", url, params={**params, "offset": offset})
            if not isinstance(body, dict) or not isinstance(body.get("tasks"), list):
                raise ListingError(f"{where}: the body has no tasks list")
            tasks: list[Any] = body["tasks"]
            total = _count(body.get("task_count"))
            page_ids: set[str] = set()
            shifted = 0
            for position, raw in enumerate(tasks):
                task = read(raw, where)
                page_ids.add(task.id)
                if task.id in previous_ids:
                    # Tasks created meanwhile (newest first) pushed the last ones of the previous
                    # page across the boundary: the same records again, at the start of this
                    # page. Anywhere else it is a paging fault.
                    if position != shifted:
                        raise ListingError(
                            f"{where}: task {task.id!r} of the previous page appears again "
                            "in the middle of this one: paging is inconsistent"
                        )
                    shifted += 1
                    log.info("listing_shifted", task_id=task.id, page=page_no)
                    continue
                yield task
            previous_ids = page_ids
            offset += len(tasks)
            if len(tasks) < limit or (total is not None and offset >= total):
                return


def _count(value: Any) -> int | None:
    """``task_count`` is documented as a string, and some regions send an integer."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None
