"""The extension point: what every target kind provides, and the records it hands inward.

A target lists tasks as :class:`Task` records (id, status, one aware UTC timestamp, the fields a
policy may match on) and deletes ids, answering with one :class:`DeleteResult` per id. It knows
its API's paging, status vocabulary, id format and error bodies; it knows nothing about policies,
plans or the audit. Adding a target kind means one new module here plus one line in
``reaper/targets/__init__.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple

import httpx
from pydantic import BaseModel, ConfigDict, Field

from reaper.errors import ListingError
from reaper.fields import Duration
from reaper.http import Exchange, RequestFailed, ResponseTooLarge, TargetHttp, error_fields

__all__ = [
    "BatchResult",
    "DeleteResult",
    "ListRequest",
    "Outcome",
    "Target",
    "TargetConfig",
    "Task",
    "task_reader",
]


class Outcome(StrEnum):
    """What happened to one task id. Stored in the audit as its string value."""

    PENDING = "pending"  # write-ahead intent: the request is about to leave
    DELETED = "deleted"
    ALREADY_GONE = "already_gone"
    FAILED = "failed"
    UNKNOWN = "unknown"  # the request may have reached the server; its answer was lost
    SKIPPED_INVALID_ID = "skipped_invalid_id"
    DRY_RUN = "dry_run"
    NOT_DELETED = "not_deleted"  # a pending/unknown row that reconciliation found still present


class Task(NamedTuple):
    """One listed task, as much of it as planning needs.

    An immutable named tuple rather than a frozen dataclass: a million of them are built per
    listing of a large target, and a tuple is built in less than half the time.
    """

    id: str
    status: str
    #: The policy's age field, aware UTC; None when the task has no value for it.
    timestamp: datetime | None
    #: The raw values of the fields the policy matches on.
    fields: Mapping[str, str] = MappingProxyType({})
    #: The target reports the task as already deleted (it is listed but its data is gone).
    gone: bool = False
    #: Why the record cannot be trusted (e.g. its timestamp does not parse); never deleted.
    problem: str | None = None


@dataclass(frozen=True)
class ListRequest:
    """What the planner needs from a listing; targets may push filters to the server."""

    age_field: str
    match_fields: frozenset[str] = frozenset()
    #: Tasks created at or after this instant cannot be eligible (a server-side hint only).
    created_before: datetime | None = None


@dataclass(frozen=True, slots=True)
class DeleteResult:
    """The outcome of one id in a delete request."""

    task_id: str
    outcome: Outcome
    http_status: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    reclaimed_bytes: int | None = None
    files_count: int | None = None
    note: str | None = None


@dataclass(frozen=True)
class BatchResult:
    """The answer to one delete request, one result per id that was sent."""

    results: Sequence[DeleteResult]
    #: Earlier attempts of this request may have reached the server (their answers were lost).
    lost_attempts: int = 0


class RetrySettings(BaseModel):
    """How requests to a target are retried."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    attempts: int = Field(5, ge=1, le=20, description="Attempts per request, the first included.")
    backoff: Duration = Field(
        timedelta(seconds=1),
        description="First backoff delay; doubles per attempt.",
        json_schema_extra={"default": "1s"},
    )
    max_backoff: Duration = Field(
        timedelta(seconds=30),
        description="Longest single delay.",
        json_schema_extra={"default": "30s"},
    )


class TargetConfig(BaseModel):
    """Settings every target kind shares. Subclasses add ``type`` and their own fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    type: str
    timeout: Duration = Field(
        timedelta(seconds=30),
        description="Timeout of one HTTP request, e.g. '30s'.",
        json_schema_extra={"default": "30s"},
    )
    retries: RetrySettings = Field(default_factory=RetrySettings)
    verify_tls: bool = Field(True, description="Verify the target's TLS certificate.")
    ca_bundle: str | None = Field(None, description="Path to a CA bundle for the target.")
    max_response_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest response body reaper will read."
    )

    def describe(self) -> str:
        """A short, secret-free name for logs and the audit (e.g. the base URL)."""
        return self.type


class DeleteOptions(BaseModel):
    """Target-specific delete options (``delete.options`` in a policy); none by default."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class Target(ABC):
    """One task API: list tasks, delete ids."""

    #: The ``target.type`` value in a policy.
    kind: ClassVar[str]
    config_model: ClassVar[type[TargetConfig]]
    options_model: ClassVar[type[DeleteOptions]] = DeleteOptions
    #: Statuses of tasks that are still running: protected unless a policy opts in explicitly.
    live_statuses: ClassVar[frozenset[str]] = frozenset()
    #: Every status the API documents (used to catch typos in policies).
    known_statuses: ClassVar[frozenset[str]] = frozenset()
    #: The only statuses the API lets a client delete (None: any). A hard rail: no policy can
    #: select others, and the planner protects tasks in them whatever a policy says.
    deletable_statuses: ClassVar[frozenset[str] | None] = None
    #: Timestamp fields a policy may use as ``select.age_field``; the first is the default.
    time_fields: ClassVar[tuple[str, ...]]
    #: Fields a policy may match regular expressions against.
    match_fields: ClassVar[frozenset[str]] = frozenset({"task_id"})
    #: Largest number of ids one delete request may carry (1 for per-id APIs).
    max_batch_size: ClassVar[int] = 1

    def __init__(self, config: TargetConfig, http: TargetHttp) -> None:
        self.config = config
        self.http = http

    @classmethod
    def client_auth(cls, config: TargetConfig) -> httpx.Auth | None:
        """The auth flow for every request to this target (it may read secrets: a missing one
        is a ConfigError naming the variable or file, never its value)."""
        return None

    def invalid_id_reason(self, task_id: str) -> str | None:
        """Why ``task_id`` must never be sent to this target, or None when it is safe."""
        if not task_id or "/" in task_id or "\\" in task_id or ".." in task_id:
            return "id is empty or contains a path separator or '..'"
        if not task_id.isprintable():
            return "id contains control characters"
        return None

    async def fetch_page(self, where: str, method: str, url: str, **kwargs: Any) -> Exchange:
        """Send one listing request; a failure after retries is a ListingError naming the page.

        Credential errors stay TargetAuthError: they are configuration errors, not paging ones.
        """
        try:
            return await self.http.send(method, url, **kwargs)
        except (RequestFailed, ResponseTooLarge) as exc:
            raise ListingError(f"{where}: {exc}", http_status=exc.http_status) from exc

    async def fetch_json(self, where: str, method: str, url: str, **kwargs: Any) -> Any:
        """One listing request that must answer 200 with JSON; anything else is a ListingError
        naming the page, with the target's own error code and message when it sent them."""
        exchange = await self.fetch_page(where, method, url, **kwargs)
        if exchange.status_code != 200:
            code, message = self.error_text(exchange.body)
            raise ListingError(
                f"{where}: HTTP {exchange.status_code}: {message or 'no error message'}",
                http_status=exchange.status_code,
                error_code=code,
                error_message=message,
            )
        try:
            return exchange.json()
        except ValueError as exc:
            raise ListingError(f"{where}: the body is not JSON") from exc

    def error_text(self, body: bytes) -> tuple[str | None, str | None]:
        """The target's own error code and message in an error body (APIs override this)."""
        return error_fields(body)

    @abstractmethod
    def list_tasks(self, request: ListRequest) -> AsyncIterator[Task]:
        """Yield every task, page by page; raise ListingError if the listing is incomplete."""

    @abstractmethod
    async def delete(self, task_ids: Sequence[str], options: DeleteOptions) -> BatchResult:
        """Send one delete request for ``task_ids`` (at most ``max_batch_size``)."""


#: The ``fields`` of every task when the policy matches on nothing but the id (read-only).
_NO_FIELDS: Mapping[str, str] = MappingProxyType({})
# Task(...) goes through the named tuple's generated Python __new__; tuple.__new__ builds the
# same tuple in C. Every field is passed, in order.
_new_task = tuple.__new__


def task_reader(
    request: ListRequest,
    *,
    id_field: str,
    parse_time: Callable[[Any], datetime],
    gone_unless: str | None = None,
) -> Callable[[Any, str], Task]:
    """``read(raw, where)``: a :class:`Task` from one listed JSON record.

    The id and status are required (else the listing is broken: ListingError), the requested
    age field is parsed (a value that does not parse becomes ``problem``, never a guess), and
    the requested match fields are kept as strings. ``gone_unless`` names a field whose value
    ``false`` means the target has already deleted the task (listed, but its data is gone).

    Set up once per listing, called once per record: a million times for a large target.
    """
    age_field = request.age_field
    match_fields = tuple(request.match_fields)

    def read(raw: Any, where: str) -> Task:
        if not isinstance(raw, dict):
            raise ListingError(f"{where}: a task entry is not an object")
        task_id, status = raw.get(id_field), raw.get("status")
        if not isinstance(task_id, str) or not task_id:
            raise ListingError(f"{where}: a task has no {id_field}")
        if not isinstance(status, str) or not status:
            raise ListingError(f"{where}: task {task_id!r} has no status")
        timestamp = problem = None
        value = raw.get(age_field)
        if value is not None:
            try:
                timestamp = parse_time(value)
            except ValueError as exc:
                problem = f"{age_field} does not parse: {exc}"
        fields = _NO_FIELDS
        if match_fields:  # most policies match on nothing but the id
            strings: dict[str, str] = {}
            for name in match_fields:
                field_value = raw.get(name)
                strings[name] = "" if field_value is None else str(field_value)
            fields = strings
        gone = gone_unless is not None and raw.get(gone_unless) is False
        task: Task = _new_task(Task, (task_id, status, timestamp, fields, gone, problem))
        return task

    return read
