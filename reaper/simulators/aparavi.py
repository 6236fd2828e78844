"""A simulator of the Aparavi DTC task API (TARGETS.md section 4).

* ``PUT /task?name=&threads=&type=`` with ``{"pipeline": {...}}`` starts a task:
  ``{"status": "OK", "data": {"token", "type"}}``.
* ``GET /task?token=&type=``: ``{"status": "OK", "data": {"completed", "status", "startTime",
  "endTime", "errors", "exitCode", ...}}`` (epoch seconds; ``endTime`` null or 0 while running).
* ``DELETE /task?token=&type=`` terminates and cleans up: ``{"status": "OK", "data":
  {"cancelled": true, "token"}}``.

Like the real service it reports errors as **HTTP 200** with ``{"status": "Error", "error":
{"message": ...}}`` (``Task not found``; ``Cannot delete completed task`` on deployments that clean
completed tasks themselves, ``refuse_completed=True``), 401 for a missing or wrong key and 422 for
a malformed request. There is no list endpoint. Keys are accepted bare (``Authorization: <key>``)
or as ``Bearer <key>``, or only one of the two (``auth_scheme``).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal

from reaper.simulators.base import Faults, Request, Response, Route, SimulatorBase

__all__ = ["AparaviSimTask", "AparaviSimulator", "generate_aparavi_tasks"]

AuthScheme = Literal["bare", "bearer", "both"]
_TYPES = ("cpu", "gpu")


@dataclass(slots=True)
class AparaviSimTask:
    """One task; times are aware UTC (``end_time`` None while it runs)."""

    token: str
    type: str = "cpu"
    status: str = "Completed"
    start_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    end_time: datetime | None = None
    name: str = "task"
    exit_code: int = 0
    #: Render a running task's endTime as 0 (what the live service sends) instead of null.
    zero_end_time: bool = False

    @property
    def key(self) -> str:
        return f"{self.type}:{self.token}"

    def render(self) -> dict[str, Any]:
        end = self.end_time.timestamp() if self.end_time is not None else None
        return {
            "completed": self.status != "Running",
            "status": self.status,
            "startTime": self.start_time.timestamp(),
            "endTime": 0 if end is None and self.zero_end_time else end,
            "warnings": [],
            "errors": [],
            "exitCode": self.exit_code,
            "exitMsg": "",
            "totalCount": 0,
            "completedCount": 0,
            "failedCount": 0,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AparaviSimTask:
        values = dict(data)
        for name in ("start_time", "end_time"):
            raw = values.get(name)
            if isinstance(raw, str):
                parsed = datetime.fromisoformat(raw)
                if parsed.tzinfo is None:
                    raise ValueError(f"{name} must carry a UTC offset")
                values[name] = parsed.astimezone(UTC)
        return cls(**values)


def generate_aparavi_tasks(
    n: int, seed: int = 0, now: datetime | None = None
) -> list[AparaviSimTask]:
    """``n`` tasks over the last ~30 days: most completed, some running, a few failed."""
    rng = random.Random(seed)
    now = now or datetime.now(UTC)
    tasks = []
    for index in range(n):
        start = now - timedelta(seconds=rng.uniform(600, 30 * 86400))
        status = rng.choice(("Completed",) * 8 + ("Running", "Failed"))
        end = None if status == "Running" else start + timedelta(seconds=rng.uniform(5, 7200))
        tasks.append(
            AparaviSimTask(
                token=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                type=rng.choice(_TYPES),
                status=status,
                start_time=start,
                end_time=end,
                name=f"pipeline-{index}",
                exit_code=1 if status == "Failed" else 0,
            )
        )
    return tasks


class AparaviSimulator(SimulatorBase):
    """The Aparavi task API over real HTTP, with faults, key checking and a deletion log."""

    name: ClassVar[str] = "aparavi"

    def __init__(
        self,
        tasks: Iterable[AparaviSimTask] = (),
        *,
        api_keys: Iterable[str] = ("sim-aparavi-key",),
        auth_scheme: AuthScheme = "both",
        refuse_completed: bool = False,
        faults: Faults | None = None,
        seed: int = 0,
    ) -> None:
        self.api_keys = set(api_keys)
        self.auth_scheme: AuthScheme = auth_scheme
        #: Deployments that clean completed tasks themselves refuse to delete them.
        self.refuse_completed = refuse_completed
        self._tasks: dict[str, AparaviSimTask] = {}
        self._token_rng = random.Random(seed + 1)
        #: Tokens whose requests answer HTTP 200 {"status": "Error"} with an internal error.
        self.broken_tokens: set[str] = set()
        #: Every status request's key, and the authorization headers seen.
        self.status_requests: list[str] = []
        self.authorization_headers: list[str] = []
        self.refused_completed: list[str] = []
        super().__init__(faults=faults, seed=seed)
        self.add_tasks(tasks)

    # -- state --------------------------------------------------------------------------------

    @property
    def tasks(self) -> list[AparaviSimTask]:
        with self.lock:
            return list(self._tasks.values())

    def task(self, task_type: str, token: str) -> AparaviSimTask | None:
        with self.lock:
            return self._tasks.get(f"{task_type}:{token}")

    def add_tasks(self, tasks: Iterable[AparaviSimTask]) -> None:
        with self.lock:
            for task in tasks:
                if task.type not in _TYPES:
                    raise ValueError(f"task {task.token}: type must be cpu or gpu")
                if task.key in self._tasks:
                    raise ValueError(f"task {task.key} already exists")
                self._tasks[task.key] = task

    def add_tasks_from_json(self, payload: Any) -> int:
        if not isinstance(payload, list) or not all(isinstance(i, dict) for i in payload):
            raise ValueError("tasks must be a JSON list of objects")
        tasks = [AparaviSimTask.from_dict(item) for item in payload]
        self.add_tasks(tasks)
        return len(tasks)

    def remove(self, task_type: str, token: str) -> None:
        """Someone else deleted the task (or the service cleaned it up)."""
        with self.lock:
            del self._tasks[f"{task_type}:{token}"]

    def complete(self, task_type: str, token: str, when: datetime | None = None) -> None:
        """A running task finishes."""
        with self.lock:
            task = self._tasks[f"{task_type}:{token}"]
            task.status = "Completed"
            task.end_time = when or datetime.now(UTC)

    # -- HTTP ---------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            Route("PUT", "/task", self._authenticated(self._start), kind="other"),
            Route("GET", "/task", self._authenticated(self._status), kind="list"),
            Route("DELETE", "/task", self._authenticated(self._delete), kind="delete"),
        ]

    def error_response(self, request: Request, status: int, detail: str) -> Response:
        if status == 422:
            return Response.json({"detail": [{"msg": detail, "type": "value_error"}]}, 422)
        return Response.json({"status": "Error", "error": {"message": detail}}, status=status)

    def _error(self, message: str, status: int = 200) -> Response:
        # The service's habit: an error is a 200 whose body says so.
        return Response.json({"status": "Error", "error": {"message": message}}, status=status)

    def _authenticated(self, handler: Callable[[Request], Response]) -> Any:
        def check(request: Request) -> Response:
            header = request.headers.get("authorization", "")
            with self.lock:
                self.authorization_headers.append(header)
            key = None
            if header.startswith("Bearer ") and self.auth_scheme in ("bearer", "both"):
                key = header.removeprefix("Bearer ").strip()
            elif not header.startswith("Bearer ") and self.auth_scheme in ("bare", "both"):
                key = header.strip()
            if not key or key not in self.api_keys:
                return self._error("Unauthorized", 401)
            return handler(request)

        return check

    def _key(self, request: Request) -> tuple[str, str] | Response:
        token, task_type = request.arg("token"), request.arg("type")
        if not token or task_type not in _TYPES:
            return self.error_response(request, 422, "token and type (cpu|gpu) are required")
        if token in self.broken_tokens:
            return self._error("Internal error: the task engine did not answer")
        return token, task_type

    def _start(self, request: Request) -> Response:
        try:
            body = request.json()
        except ValueError:
            return self.error_response(request, 422, "the body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("pipeline"), dict):
            return self.error_response(request, 422, "body.pipeline is required")
        task_type = request.arg("type") or "cpu"
        if task_type not in _TYPES:
            return self.error_response(request, 422, "type must be cpu or gpu")
        with self.lock:
            token = str(uuid.UUID(int=self._token_rng.getrandbits(128), version=4))
            task = AparaviSimTask(
                token, task_type, "Running", datetime.now(UTC), name=request.arg("name") or "task"
            )
            self._tasks[task.key] = task
        return Response.json({"status": "OK", "data": {"token": token, "type": task_type}})

    def _status(self, request: Request) -> Response:
        key = self._key(request)
        if isinstance(key, Response):
            return key
        token, task_type = key
        with self.lock:
            self.status_requests.append(f"{task_type}:{token}")
            task = self._tasks.get(f"{task_type}:{token}")
            data = task.render() if task is not None else None
        if data is None:
            return self._error("Task not found")
        return Response.json({"status": "OK", "data": data})

    def _delete(self, request: Request) -> Response:
        key = self._key(request)
        if isinstance(key, Response):
            return key
        token, task_type = key
        task_key = f"{task_type}:{token}"
        self.record_delete_request(task_key)
        with self.lock:
            task = self._tasks.get(task_key)
            if task is None:
                return self._error("Task not found")
            if self.refuse_completed and task.status != "Running":
                self.refused_completed.append(task_key)
                return self._error("Cannot delete completed task")
            if self.roll(self.faults.partial_failure_rate):
                return self._error("Error deleting task: the engine is busy")
            del self._tasks[task_key]
            self.record_deleted(task_key)
        return Response.json({"status": "OK", "data": {"cancelled": True, "token": token}})
