"""A simulator of the Huawei Cloud DCS task center (TARGETS.md section 2), behind the gateway.

``GET /v2/{project_id}/tasks?offset=&limit=&start_time=&end_time=`` lists tasks newest first with
``task_count`` (a string, like the real service) as the true total; ``start_time``/``end_time``
(UTC ``yyyyMMddHHmmss``) filter on creation time, both ends inclusive. ``DELETE
/v2/{project_id}/tasks/{task_id}`` answers 200 with an empty body, 404 for an unknown task, and 400
when the fault profile's ``partial_failure_rate`` says this deletion fails.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar
from urllib.parse import unquote

from reaper.simulators.base import Faults, Request, Response, Route
from reaper.simulators.huawei import HuaweiSimulatorBase

__all__ = ["DcsSimTask", "HuaweiDcsSimulator", "generate_dcs_tasks"]

STATUSES = ("SUCCESS", "FAILED", "EXECUTING")
_LIMIT_DEFAULT = 10
_LIMIT_MAX = 1000
_TIME_FORMAT = "%Y%m%d%H%M%S"
_NAMES = ("backup", "restore", "modifyInstance", "createInstance", "extendInstance", "flush")


def render_time(value: datetime) -> str:
    """``2020-06-17T07:38:42.503Z``: UTC with milliseconds."""
    utc = value.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


@dataclass(slots=True)
class DcsSimTask:
    """One background task; datetimes are aware UTC."""

    id: str
    status: str
    created_at: datetime
    name: str = "backup"
    updated_at: datetime | None = None
    details: str = ""
    user_name: str = "ops"
    user_id: str = "0a1b2c3d4e5f60718293a4b5c6d7e8f9"
    params: str = ""
    error_code: str | None = None
    enable_show: bool = True
    job_id: str = ""
    #: Overrides the rendered created_at (to test unparseable timestamps).
    raw_created_at: str | None = field(default=None)

    def render(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "details": self.details,
            "user_name": self.user_name,
            "user_id": self.user_id,
            "params": self.params,
            "status": self.status,
            "created_at": self.raw_created_at or render_time(self.created_at),
            "updated_at": render_time(self.updated_at or self.created_at),
            "error_code": self.error_code,
            "enable_show": self.enable_show,
            "job_id": self.job_id,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DcsSimTask:
        values = dict(data)
        for name in ("created_at", "updated_at"):
            if isinstance(values.get(name), str):
                parsed = datetime.fromisoformat(values[name])
                if parsed.tzinfo is None:
                    raise ValueError(f"{name} must carry a UTC offset")
                values[name] = parsed.astimezone(UTC)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("created_at", "updated_at"):
            if data[name] is not None:
                data[name] = data[name].isoformat()
        return data


def generate_dcs_tasks(n: int, seed: int = 0, now: datetime | None = None) -> list[DcsSimTask]:
    """``n`` tasks over the last ~90 days: 70% SUCCESS, 20% FAILED, 10% EXECUTING."""
    rng = random.Random(seed)
    now = now or datetime.now(UTC)
    tasks: list[DcsSimTask] = []
    for _ in range(n):
        created = now - timedelta(seconds=rng.uniform(3600, 90 * 86400))
        roll = rng.random()
        status = "SUCCESS" if roll < 0.7 else "FAILED" if roll < 0.9 else "EXECUTING"
        tasks.append(
            DcsSimTask(
                id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                status=status,
                created_at=created,
                name=rng.choice(_NAMES),
                updated_at=created + timedelta(seconds=rng.uniform(1, 600)),
                details="instance dcs-" + f"{rng.getrandbits(16):04x}",
                job_id=f"{rng.getrandbits(64):016x}",
                error_code="DCS.4000" if status == "FAILED" else None,
            )
        )
    return tasks


class HuaweiDcsSimulator(HuaweiSimulatorBase):
    """The DCS task center over real HTTP, with faults, authentication and a deletion log."""

    name: ClassVar[str] = "huawei_dcs"
    ext_msg: ClassVar[bool] = True

    def __init__(
        self,
        tasks: Iterable[DcsSimTask] = (),
        *,
        project_id: str = "0123456789abcdef0123456789abcdef",
        credentials: Mapping[str, str] | None = None,
        tokens: Iterable[str] = (),
        faults: Faults | None = None,
        seed: int = 0,
        task_count_as_string: bool = True,
    ) -> None:
        self._tasks: dict[str, DcsSimTask] = {}
        self._order: list[DcsSimTask] | None = None
        self.task_count_as_string = task_count_as_string
        #: The query of every list request, for tests of server-side filtering.
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
    def tasks(self) -> list[DcsSimTask]:
        with self.lock:
            return list(self._tasks.values())

    def task(self, task_id: str) -> DcsSimTask | None:
        with self.lock:
            return self._tasks.get(task_id)

    def remove(self, task_id: str) -> None:
        """Remove a task (someone else deleted it)."""
        with self.lock:
            del self._tasks[task_id]
            self._order = None

    def add_tasks(self, tasks: Iterable[DcsSimTask]) -> None:
        """Add tasks; an id that already exists is refused."""
        with self.lock:
            for task in tasks:
                if task.id in self._tasks:
                    raise ValueError(f"task {task.id} already exists")
                if task.created_at.tzinfo is None:
                    raise ValueError(f"task {task.id}: created_at must be aware")
                self._tasks[task.id] = task
            self._order = None

    def add_tasks_from_json(self, payload: Any) -> int:
        if not isinstance(payload, list) or not all(isinstance(i, dict) for i in payload):
            raise ValueError("tasks must be a JSON list of objects")
        tasks = [DcsSimTask.from_dict(item) for item in payload]
        self.add_tasks(tasks)
        return len(tasks)

    def routes(self) -> list[Route]:
        base = r"/v2/(?P<project_id>[^/]+)/tasks"
        return self.guarded(
            [
                Route("GET", base, self._list, kind="list"),
                Route("DELETE", base + r"/(?P<task_id>[^/]+)", self._delete, kind="delete"),
            ]
        )

    def service_code(self, status: int) -> str:
        return {400: "DCS.4000", 500: "DCS.5000"}.get(status, f"DCS.{status}0")

    def _list(self, request: Request) -> Response:
        with self.lock:
            self.list_queries.append({k: v[0] for k, v in request.query.items()})
        try:
            offset = _int(request.arg("offset"), "offset", 0, 0, None)
            limit = _int(request.arg("limit"), "limit", _LIMIT_DEFAULT, 1, _LIMIT_MAX)
            start = _time(request.arg("start_time"), "start_time")
            end = _time(request.arg("end_time"), "end_time")
        except ValueError as exc:
            return self.error(400, "DCS.4961", str(exc))
        with self.lock:
            if self._order is None:
                self._order = sorted(
                    self._tasks.values(), key=lambda t: (t.created_at, t.id), reverse=True
                )
            matching = [
                task
                for task in self._order
                if (start is None or task.created_at >= start)
                and (end is None or task.created_at < end + timedelta(seconds=1))
            ]
            page = [task.render() for task in matching[offset : offset + limit]]
        count: int | str = len(matching)
        if self.task_count_as_string:
            count = str(count)
        return Response.json({"task_count": count, "tasks": page})

    def _delete(self, request: Request) -> Response:
        task_id = unquote(request.params["task_id"])
        if request.body.strip():
            try:
                body = request.json()
            except ValueError:
                return self.error(400, "DCS.4961", "the request body is not JSON")
            if not isinstance(body, dict) or not isinstance(body.get("message", ""), str):
                return self.error(400, "DCS.4961", "message must be a string")
        self.record_delete_request(task_id)
        with self.lock:
            task = self._tasks.get(task_id)
            if task is None:
                return self.error(404, "DCS.4133", f"The background task {task_id} does not exist")
            if self.roll(self.faults.partial_failure_rate):
                return self.error(400, "DCS.4980", "Failed to delete the background task")
            if self.acknowledge_without_effect(task_id):
                return Response(status=200, body=b"", content_type=None)
            del self._tasks[task_id]
            self._order = None
            self.record_deleted(task_id)
        return Response(status=200, body=b"", content_type=None)


def _int(raw: str | None, name: str, default: int, low: int, high: int | None) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer") from None
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be between {low} and {high}")
    return value


def _time(raw: str | None, name: str) -> datetime | None:
    if not raw:
        return None
    try:
        return datetime.strptime(raw, _TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(f"{name} must be yyyyMMddHHmmss (UTC)") from None
