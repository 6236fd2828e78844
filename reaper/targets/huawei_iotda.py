"""Huawei Cloud IoTDA batch tasks (``/v5/iot/{project_id}/batchtasks``; TARGETS.md section 3).

The list call requires a ``task_type``: the target walks each type the policy covers, following
``marker`` pages (descending 24-hex task ids, limit up to 50) until a short page. Deletion is one
``DELETE .../batchtasks/{task_id}`` per id: 204 deleted, 404 already gone.

IoTDA only deletes finished tasks, and so does reaper, whatever a policy says: only ``Success``,
``Fail``, ``PartialSuccess`` and ``Stopped`` are known statuses (a policy naming another one does
not load), the unfinished ones are live (protected), and :meth:`HuaweiIotdaTarget.delete` refuses,
without a request, any id whose status in this run's listing is not one of the four.

No re-check is made before deleting: the server itself refuses to delete a batch task that is not
finished (a 400 error; the simulator answers ``IOTDA.014111`` the same way, and a test holds
reaper to recording that refusal as ``failed``), and a finished batch task never runs again.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

from pydantic import AnyHttpUrl, Field, field_validator

from reaper.errors import ListingError
from reaper.targets.base import (
    BatchResult,
    DeleteOptions,
    DeleteResult,
    ListRequest,
    Outcome,
    Task,
    task_reader,
)
from reaper.targets.huawei import (
    HuaweiConfig,
    HuaweiTarget,
    check_endpoint,
    parse_compact_time,
)

__all__ = [
    "DELETABLE_STATUSES",
    "TASK_TYPES",
    "UNFINISHED_STATUSES",
    "HuaweiIotdaConfig",
    "HuaweiIotdaTarget",
]

PAGE_CAP = 50
FIRST_MARKER = "f" * 24
ID_PATTERN = re.compile(r"[0-9a-f]{24}")
DELETABLE_STATUSES = frozenset({"Success", "Fail", "PartialSuccess", "Stopped"})
UNFINISHED_STATUSES = frozenset({"Initializing", "Waitting", "Processing", "Stopping"})
TaskType = Literal[
    "softwareUpgrade",
    "firmwareUpgrade",
    "moduleUpgrade",
    "createDevices",
    "deleteDevices",
    "freezeDevices",
    "unfreezeDevices",
    "createCommands",
    "createAsyncCommands",
    "createMessages",
    "updateDeviceShadows",
    "updateDevices",
]
TASK_TYPES: tuple[str, ...] = TaskType.__args__  # type: ignore[attr-defined]


class HuaweiIotdaConfig(HuaweiConfig):
    """``target:`` settings for ``type: huawei_iotda``."""

    type: Literal["huawei_iotda"]
    endpoint: AnyHttpUrl = Field(
        description="e.g. https://iotda.cn-north-4.myhuaweicloud.com or an instance endpoint."
    )
    instance_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9-]{1,36}$",
        description="Sent as the Instance-Id header (professional editions).",
    )
    task_types: tuple[TaskType, ...] = Field(
        min_length=1,
        description="The batch task types to cover; the list call takes one type at a time.",
        json_schema_extra={"uniqueItems": True},
    )
    page_size: int = Field(
        PAGE_CAP, ge=1, le=PAGE_CAP, description="Tasks per listing page (max 50)."
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: AnyHttpUrl) -> AnyHttpUrl:
        return check_endpoint(value)

    @field_validator("task_types")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("a task type is listed twice")
        return value

    def base_url(self) -> str:
        return str(self.endpoint).rstrip("/")

    def tasks_url(self) -> str:
        return f"{self.base_url()}/v5/iot/{self.project_id}/batchtasks"

    def describe(self) -> str:
        instance = f" instance {self.instance_id}" if self.instance_id else ""
        return f"{super().describe()}{instance}"


class HuaweiIotdaTarget(HuaweiTarget):
    """List and delete IoTDA batch tasks (finished ones only)."""

    kind = "huawei_iotda"
    config_model = HuaweiIotdaConfig
    live_statuses = UNFINISHED_STATUSES
    # Only the deletable statuses: a policy that names any other one fails validation.
    known_statuses = DELETABLE_STATUSES | UNFINISHED_STATUSES
    deletable_statuses = DELETABLE_STATUSES
    time_fields = ("create_time",)
    match_fields = frozenset({"task_id", "task_name", "task_type", "status_desc"})
    max_batch_size = 1
    deleted_statuses = frozenset({204, 200})
    server_refuses_live = (
        "IoTDA itself refuses to delete a batch task that is not finished, and a finished batch "
        "task never runs again"
    )

    config: HuaweiIotdaConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The status each id had in this run's listing: delete() checks it (defence in depth).
        self.listed_status: dict[str, str] = {}

    def invalid_id_reason(self, task_id: str) -> str | None:
        if not isinstance(task_id, str) or not ID_PATTERN.fullmatch(task_id):
            return "id is not 24 lowercase hexadecimal characters"
        return None

    def request_headers(self) -> dict[str, str] | None:
        return {"Instance-Id": self.config.instance_id} if self.config.instance_id else None

    def delete_url(self, task_id: str) -> str:
        return f"{self.config.tasks_url()}/{task_id}"

    async def delete(self, task_ids: Sequence[str], options: DeleteOptions) -> BatchResult:
        async def one(task_id: str) -> DeleteResult:
            refusal = self.refusal(task_id)
            if refusal is not None:
                return DeleteResult(task_id, Outcome.FAILED, error_message=refusal, note="not sent")
            return await self.delete_one(task_id, options)

        return await self.delete_each(task_ids, one)

    def refusal(self, task_id: str) -> str | None:
        """Why reaper will not send a delete for ``task_id``, or None."""
        if self.invalid_id_reason(task_id) is not None:
            return "refused: the id is not 24 lowercase hexadecimal characters"
        status = self.listed_status.get(task_id)
        if status is None:
            return "refused: the task was not in this run's listing"
        if status not in DELETABLE_STATUSES:
            return (
                f"refused: IoTDA only deletes finished tasks, this one was listed as {status} "
                f"(deletable: {', '.join(sorted(DELETABLE_STATUSES))})"
            )
        return None

    async def list_tasks(self, request: ListRequest) -> AsyncIterator[Task]:
        self.listed_status.clear()
        for task_type in self.config.task_types:
            async for task in self._list_type(task_type, request):
                self.listed_status[task.id] = task.status
                yield task

    async def _list_type(self, task_type: str, request: ListRequest) -> AsyncIterator[Task]:
        url = self.config.tasks_url()
        limit = self.config.page_size
        read = task_reader(request, id_field="task_id", parse_time=parse_compact_time)
        marker = FIRST_MARKER
        page_no = 0
        while True:
            page_no += 1
            where = f"listing {task_type} page {page_no} (marker {marker})"
            body = await self.fetch_json(
                where,
                "GET",
                url,
                params={"task_type": task_type, "limit": limit, "marker": marker},
                headers=self.request_headers(),
            )
            if not isinstance(body, dict) or not isinstance(body.get("batchtasks"), list):
                raise ListingError(f"{where}: the body has no batchtasks list")
            tasks: list[Any] = body["batchtasks"]
            last = None
            for raw in tasks:
                task = read(raw, where)
                if task.id >= marker:
                    raise ListingError(
                        f"{where}: task {task.id} is not below the marker: paging is inconsistent"
                    )
                last = task.id
                yield task
            if len(tasks) < limit or last is None:
                return
            page = body.get("page")
            next_marker = page.get("marker") if isinstance(page, dict) else None
            if not isinstance(next_marker, str) or not ID_PATTERN.fullmatch(next_marker):
                next_marker = last  # the marker is the id of the page's last record
            if next_marker >= marker:
                raise ListingError(f"{where}: the marker did not advance")
            marker = next_marker
