"""A simulator of Huawei Cloud IoTDA batch tasks (TARGETS.md section 3), behind the gateway.

``GET /v5/iot/{project_id}/batchtasks?task_type=&status=&limit=&marker=&offset=`` requires
``task_type``, answers records of that type in descending ``task_id`` order strictly below
``marker`` (default ``ffffffffffffffffffffffff``), at most ``limit`` (1..50, default 10), with
``page.count`` the true total and ``page.marker`` the id of the page's last record.
``DELETE /v5/iot/{project_id}/batchtasks/{task_id}`` answers 204 without a body, 404 for an
unknown task, and 400 for a task that is not finished (only Success, Fail, PartialSuccess and
Stopped may be deleted). When the simulator has an ``instance_id``, requests must carry it in
``Instance-Id``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from reaper.simulators.base import Faults, Request, Response, Route
from reaper.simulators.huawei import Handler, HuaweiSimulatorBase

__all__ = [
    "DELETABLE",
    "STATUSES",
    "TASK_TYPES",
    "HuaweiIotdaSimulator",
    "IotdaSimTask",
    "generate_iotda_tasks",
    "object_id",
]

TASK_TYPES = (
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
)
STATUSES = (
    "Initializing",
    "Waitting",
    "Processing",
    "Success",
    "Fail",
    "PartialSuccess",
    "Stopped",
    "Stopping",
)
DELETABLE = frozenset({"Success", "Fail", "PartialSuccess", "Stopped"})
_ID = re.compile(r"[0-9a-f]{24}")
_FIRST_MARKER = "f" * 24
_LIMIT_DEFAULT = 10
_LIMIT_MAX = 50


def render_time(value: datetime) -> str:
    """``20151212T121212Z``."""
    return value.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def object_id(created: datetime, rng: random.Random) -> str:
    """A 24-hex id that starts with the creation second, like the platform's ids."""
    return f"{int(created.timestamp()):08x}{rng.getrandbits(64):016x}"


@dataclass(slots=True)
class IotdaSimTask:
    """One batch task; ``create_time`` is aware UTC."""

    task_id: str
    task_type: str
    status: str
    create_time: datetime
    task_name: str = "batch task"
    status_desc: str = ""
    total: int = 10
    #: Overrides the rendered create_time (to test unparseable timestamps).
    raw_create_time: str | None = None

    def render(self) -> dict[str, Any]:
        done = self.total if self.status in DELETABLE else 0
        return {
            "task_id": self.task_id,
            "task_name": self.task_name,
            "task_type": self.task_type,
            "targets": [],
            "targets_filter": {},
            "document": {},
            "task_policy": None,
            "status": self.status,
            "status_desc": self.status_desc,
            "task_progress": {
                "total": self.total,
                "processing": self.total - done,
                "success": done if self.status == "Success" else 0,
                "fail": done if self.status == "Fail" else 0,
                "waitting": 0,
                "fail_wait_retry": 0,
                "stopped": done if self.status == "Stopped" else 0,
                "removed": 0,
            },
            "create_time": self.raw_create_time or render_time(self.create_time),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IotdaSimTask:
        values = dict(data)
        if isinstance(values.get("create_time"), str):
            parsed = datetime.fromisoformat(values["create_time"])
            if parsed.tzinfo is None:
                raise ValueError("create_time must carry a UTC offset")
            values["create_time"] = parsed.astimezone(UTC)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["create_time"] = self.create_time.isoformat()
        return data


def generate_iotda_tasks(
    n: int,
    seed: int = 0,
    now: datetime | None = None,
    task_types: Iterable[str] = ("firmwareUpgrade", "createCommands"),
) -> list[IotdaSimTask]:
    """``n`` tasks over the last ~90 days, spread over ``task_types``; ~85% finished."""
    rng = random.Random(seed)
    now = now or datetime.now(UTC)
    types = tuple(task_types)
    finished = ("Success",) * 10 + ("Fail",) * 3 + ("PartialSuccess", "Stopped")
    unfinished = ("Initializing", "Waitting", "Processing", "Stopping")
    tasks: list[IotdaSimTask] = []
    ids: set[str] = set()
    while len(tasks) < n:
        created = now - timedelta(seconds=rng.uniform(3600, 90 * 86400))
        task_id = object_id(created, rng)
        if task_id in ids:
            continue
        ids.add(task_id)
        status = rng.choice(finished) if rng.random() < 0.85 else rng.choice(unfinished)
        tasks.append(
            IotdaSimTask(
                task_id,
                rng.choice(types),
                status,
                created,
                task_name=f"task-{len(tasks)}",
                status_desc="" if status == "Success" else status.lower(),
            )
        )
    return tasks


class HuaweiIotdaSimulator(HuaweiSimulatorBase):
    """IoTDA batch tasks over real HTTP, with faults, authentication and a deletion log."""

    name: ClassVar[str] = "huawei_iotda"

    def __init__(
        self,
        tasks: Iterable[IotdaSimTask] = (),
        *,
        project_id: str = "0123456789abcdef0123456789abcdef",
        instance_id: str | None = None,
        credentials: Mapping[str, str] | None = None,
        tokens: Iterable[str] = (),
        faults: Faults | None = None,
        seed: int = 0,
    ) -> None:
        self.instance_id = instance_id
        self._tasks: dict[str, IotdaSimTask] = {}
        self._by_type: dict[str, list[IotdaSimTask]] | None = None
        #: Delete requests refused because the task was not finished.
        self.refused_unfinished: list[str] = []
        #: The query of every list request.
        self.list_queries: list[dict[str, str]] = []
        super().__init__(
            project_id=project_id,
            credentials=credentials,
            tokens=tokens,
            faults=faults,
            seed=seed,
        )
        self.add_tasks(tasks)

    @property
    def tasks(self) -> list[IotdaSimTask]:
        with self.lock:
            return list(self._tasks.values())

    def task(self, task_id: str) -> IotdaSimTask | None:
        with self.lock:
            return self._tasks.get(task_id)

    def remove(self, task_id: str) -> None:
        """Remove a task (someone else deleted it)."""
        with self.lock:
            del self._tasks[task_id]
            self._by_type = None

    def set_status(self, task_id: str, status: str) -> None:
        """Change a task's status (a task finishing, or being restarted)."""
        with self.lock:
            self._tasks[task_id].status = status

    def add_tasks(self, tasks: Iterable[IotdaSimTask]) -> None:
        """Add tasks; an id that already exists, or that is not 24 hex, is refused."""
        with self.lock:
            for task in tasks:
                if not _ID.fullmatch(task.task_id):
                    raise ValueError(f"task id {task.task_id!r} is not 24 lowercase hex")
                if task.task_id in self._tasks:
                    raise ValueError(f"task {task.task_id} already exists")
                if task.task_type not in TASK_TYPES or task.status not in STATUSES:
                    raise ValueError(f"task {task.task_id}: unknown type or status")
                self._tasks[task.task_id] = task
            self._by_type = None

    def add_tasks_from_json(self, payload: Any) -> int:
        if not isinstance(payload, list) or not all(isinstance(i, dict) for i in payload):
            raise ValueError("tasks must be a JSON list of objects")
        tasks = [IotdaSimTask.from_dict(item) for item in payload]
        self.add_tasks(tasks)
        return len(tasks)

    def routes(self) -> list[Route]:
        base = r"/v5/iot/(?P<project_id>[^/]+)/batchtasks"
        return self.guarded(
            [
                Route("GET", base, self._instance(self._list), kind="list"),
                Route(
                    "DELETE",
                    base + r"/(?P<task_id>[^/]+)",
                    self._instance(self._delete),
                    kind="delete",
                ),
            ]
        )

    def service_code(self, status: int) -> str:
        return {400: "IOTDA.000006", 500: "IOTDA.000001"}.get(status, f"IOTDA.{status:06d}")

    def _instance(self, handler: Handler) -> Handler:
        def check(request: Request) -> Response:
            if self.instance_id is not None and request.headers.get("instance-id") != (
                self.instance_id
            ):
                return self.error(403, "IOTDA.000003", "The Instance-Id header is missing or wrong")
            return handler(request)

        return check

    def _list(self, request: Request) -> Response:
        with self.lock:
            self.list_queries.append({k: v[0] for k, v in request.query.items()})
        task_type = request.arg("task_type")
        if not task_type or task_type not in TASK_TYPES:
            return self.error(400, "IOTDA.000006", "Invalid input data: task_type is required")
        status = request.arg("status") or None
        marker = request.arg("marker") or _FIRST_MARKER
        try:
            limit = int(request.arg("limit") or _LIMIT_DEFAULT)
            offset = int(request.arg("offset") or 0)
        except ValueError:
            return self.error(400, "IOTDA.000006", "Invalid input data: limit/offset")
        if not 1 <= limit <= _LIMIT_MAX or not 0 <= offset <= 500 or not _ID.fullmatch(marker):
            return self.error(400, "IOTDA.000006", "Invalid input data: limit, offset or marker")
        with self.lock:
            if self._by_type is None:
                self._by_type = {}
                for task in sorted(self._tasks.values(), key=lambda t: t.task_id, reverse=True):
                    self._by_type.setdefault(task.task_type, []).append(task)
            of_type = [
                t for t in self._by_type.get(task_type, []) if status is None or t.status == status
            ]
            below = [t for t in of_type if t.task_id < marker]
            page = below[offset : offset + limit]
            rendered = [task.render() for task in page]
        result: dict[str, Any] = {"batchtasks": rendered, "page": {"count": len(of_type)}}
        if page:
            result["page"]["marker"] = page[-1].task_id
        return Response.json(result)

    def _delete(self, request: Request) -> Response:
        task_id = request.params["task_id"]
        self.record_delete_request(task_id)
        if not _ID.fullmatch(task_id):
            return self.error(400, "IOTDA.000006", "Invalid input data: task_id")
        with self.lock:
            task = self._tasks.get(task_id)
            if task is None:
                return self.error(404, "IOTDA.014104", f"The batch task {task_id} is not found")
            if task.status not in DELETABLE:
                self.refused_unfinished.append(task_id)
                return self.error(
                    400,
                    "IOTDA.014111",
                    f"The batch task is {task.status}: only finished tasks can be deleted",
                )
            if self.roll(self.faults.partial_failure_rate):
                return self.error(400, "IOTDA.014112", "Failed to delete the batch task")
            if self.acknowledge_without_effect(task_id):
                return Response(status=204, body=b"", content_type=None)
            del self._tasks[task_id]
            self._by_type = None
            self.record_deleted(task_id)
        return Response(status=204, body=b"", content_type=None)
