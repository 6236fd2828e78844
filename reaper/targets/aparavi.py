"""The Aparavi DTC task API (``/task``; TARGETS.md section 4): no list endpoint, an inventory.

Aparavi can start a task, report its status and delete it, but cannot list tasks. The programs
that start tasks register their ``(token, type)`` pairs with reaper (:mod:`reaper.track`), and
this target's "listing" is the inventory (:mod:`reaper.inventory`) plus one status call per active
entry, with bounded concurrency under the policy's rate limit. A task id is ``<type>:<token>``.

* Errors come as **HTTP 200** with ``{"status": "Error", "error": {"message"}}``: every answer's
  body is read. ``Task not found`` (or ``Task has already been deleted``) on a status call means
  the task is gone: it is listed as ``gone``; a run then audits it as ``already_gone`` under the
  pseudo-policy ``<aparavi-inventory>`` and retires its entry. Any other error makes the listing
  incomplete (nothing is deleted). On a delete it is ``already_gone``; ``Cannot delete completed
  task`` is recorded as a failure that is never retried (the entry is retired from that audit row).
* 401 (or an ``Unauthorized`` error body) is a configuration error that stops the policy.
* ``Running`` is the live status. Terminating running tasks (what ``DELETE /task`` does to them)
  needs the policy's ``select.allow_live: true`` *and* the target's ``allow_running: true`` with a
  ``max_runtime``; :meth:`AparaviTarget.delete` refuses, unsent, any running task that has not run
  longer than ``max_runtime``, whatever the plan says.
* Entries are retired only after an audit row says why: entries whose task an earlier run
  deleted (or found gone) are not listed, and a run retires them from those rows.
* Before deleting, each task's status is fetched again (its API offers no cheaper means): a task
  no longer in a deletable status, or gone, is not sent.

The inventory is handed in (:class:`~reaper.targets.state.TaskInventory`; reaper's own lives in
its database, :mod:`reaper.inventory`). Listing only reads it: what a listing learns (entries to
retire, tasks found gone, statuses) is written by :meth:`AparaviTarget.save_state`, which only a
run that may delete calls; ``reaper plan`` prints :meth:`AparaviTarget.state_changes` instead.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import httpx
import structlog
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

from reaper.converters import format_duration
from reaper.errors import ListingError, TargetAuthError
from reaper.fields import Duration
from reaper.targets.base import (
    BatchResult,
    Credential,
    DeleteOptions,
    DeleteResult,
    ListRequest,
    Outcome,
    Recheck,
    RecheckRequest,
    Target,
    TargetConfig,
    Task,
    gone_result,
    origin_of,
)
from reaper.targets.httpauth import HeaderAuth
from reaper.targets.huawei import read_secret, secret_source
from reaper.targets.state import TaskInventory, TrackedTask

__all__ = [
    "DEFAULT_BASE_URL",
    "NOT_DELETABLE_NOTE",
    "TASK_TYPES",
    "TOKEN_PATTERN",
    "AparaviAuth",
    "AparaviConfig",
    "AparaviTarget",
    "check_registration",
    "normalize_base_url",
    "parse_task_id",
    "task_id",
]

log = structlog.get_logger("reaper.targets.aparavi")

DEFAULT_BASE_URL = "https://eaas.aparavi.com"
TASK_PATH = "/task"
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_GONE_MESSAGES = ("task not found", "task has already been deleted")
_NOT_DELETABLE = "cannot delete completed task"
_UNAUTHORIZED = ("unauthorized", "invalid api key")
_WINDOW = 256  # status calls scheduled at once (memory stays flat for large inventories)
#: The note of a delete the deployment refused for good ("Cannot delete completed task").
NOT_DELETABLE_NOTE = "not deletable on this deployment: retired from the inventory, never retried"
TASK_TYPES = ("cpu", "gpu")
#: Tokens go into query strings and audit task ids: keep them to URL-safe printable characters.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]{0,199}")


_URL = TypeAdapter(AnyHttpUrl)


def normalize_base_url(url: Any) -> str:
    """The inventory's key for an Aparavi deployment: the normalised URL without a trailing
    slash (what the target's ``describe()`` and so the audit's ``target`` column say).

    Raises ValueError for anything that is not an http(s) URL.
    """
    try:
        parsed = _URL.validate_python(str(url).strip())
    except ValueError:
        raise ValueError(f"{url!r} is not an http(s) URL") from None
    return str(parsed).rstrip("/")


def task_id(task_type: str, token: str) -> str:
    """The id reaper uses for an Aparavi task in plans and the audit: ``cpu:<token>``."""
    return f"{task_type}:{token}"


def parse_task_id(value: str) -> tuple[str, str] | None:
    """``(type, token)`` from a task id, or None when it is not one of ours."""
    task_type, sep, token = value.partition(":")
    if not sep or task_type not in TASK_TYPES or not TOKEN_PATTERN.fullmatch(token):
        return None
    return task_type, token


def check_registration(token: Any, task_type: Any, name: Any = None) -> list[str]:
    """Why a registration is invalid (empty when it is fine)."""
    problems = []
    if not isinstance(token, str) or not TOKEN_PATTERN.fullmatch(token):
        problems.append(
            f"token {token!r} must be 1-200 characters of letters, digits, '.', '_', '~', '-'"
        )
    if task_type not in TASK_TYPES:
        problems.append(f"type {task_type!r} must be one of: {', '.join(TASK_TYPES)}")
    if name is not None and (not isinstance(name, str) or len(name) > 255):
        problems.append("name must be a string of at most 255 characters")
    return problems


class AparaviAuth(BaseModel):
    """``target.auth``: the API key from a variable or a file, sent bare or as a bearer token."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    key_env: str | None = Field(None, pattern=_ENV_NAME, description="Variable holding the key.")
    key_file: str | None = Field(None, min_length=1, description="File holding the key.")
    scheme: Literal["bearer", "bare"] = Field(
        "bearer",
        description="'bearer': Authorization: Bearer <key> (Python SDK, docs); "
        "'bare': Authorization: <key> (node SDK).",
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_inline(cls, data: Any) -> Any:
        if isinstance(data, dict) and {"key", "api_key", "token", "secret"} & set(data):
            raise ValueError(
                "the API key never goes in a policy file: name a variable (key_env) or a file "
                "(key_file)"
            )
        return data

    @model_validator(mode="after")
    def _one_source(self) -> AparaviAuth:
        if (self.key_env is None) == (self.key_file is None):
            raise ValueError("give exactly one of key_env or key_file")
        return self

    def build(self) -> httpx.Auth:
        """Read the key (ConfigError naming the variable or file when it is missing)."""
        key = read_secret(self.key_env, self.key_file, "the Aparavi API key").get_secret_value()
        return HeaderAuth("Authorization", f"Bearer {key}" if self.scheme == "bearer" else key)

    def credential(self) -> Credential:
        """The account: the API key itself."""
        env, file = self.key_env, self.key_file
        return Credential(
            "api key",
            f"API key from {secret_source(env, file)}",
            lambda: read_secret(env, file, "the Aparavi API key").get_secret_value(),
        )


class AparaviConfig(TargetConfig):
    """``target:`` settings for ``type: aparavi``."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, hide_input_in_errors=True
    )

    type: Literal["aparavi"]
    base_url: AnyHttpUrl = Field(
        AnyHttpUrl(DEFAULT_BASE_URL),
        description="The Aparavi deployment; also the key of its inventory entries.",
        json_schema_extra={"default": DEFAULT_BASE_URL},
    )
    auth: AparaviAuth = Field(description="Where the API key is (never inline).")
    task_types: tuple[Literal["cpu", "gpu"], ...] = Field(
        ("cpu", "gpu"),
        min_length=1,
        description="Which inventory entries this policy covers.",
        json_schema_extra={"uniqueItems": True, "default": list(TASK_TYPES)},
    )
    status_concurrency: int = Field(
        8, ge=1, le=64, description="Status calls in flight while listing (rate limit applies)."
    )
    allow_running: bool = Field(
        False,
        description="Allow terminating Running tasks (needs max_runtime, and select.allow_live).",
    )
    max_runtime: Duration | None = Field(
        None,
        description="Only Running tasks that have run longer than this may be terminated.",
    )

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: AnyHttpUrl) -> AnyHttpUrl:
        if value.username or value.password:
            raise ValueError("credentials do not belong in base_url")
        if value.query or value.fragment:
            raise ValueError("base_url must not have a query or fragment")
        return value

    @model_validator(mode="after")
    def _termination(self) -> AparaviConfig:
        if self.allow_running and self.max_runtime is None:
            raise ValueError("allow_running: true needs max_runtime (e.g. '6h'): never without it")
        if self.max_runtime is not None and not self.allow_running:
            raise ValueError("max_runtime only applies with allow_running: true")
        if self.max_runtime is not None and self.max_runtime <= timedelta(0):
            raise ValueError("max_runtime must be longer than 0s")
        if len(set(self.task_types)) != len(self.task_types):
            raise ValueError("a task type is listed twice")
        return self

    def root(self) -> str:
        return normalize_base_url(str(self.base_url))

    def describe(self) -> str:
        return self.root()

    def origin(self) -> str:
        return origin_of(self.root())

    def credential(self) -> Credential:
        return self.auth.credential()


@dataclass(frozen=True)
class _Listed:
    status: str
    start: datetime | None


@dataclass(frozen=True)
class _Learnt:
    """What one complete listing learnt for the inventory (written by ``save_state``)."""

    #: Entries an audit row records as gone, each with the reason (naming the row).
    retire: tuple[tuple[TrackedTask, str], ...]
    #: Tasks the status call reports as not found, each with the service's words.
    gone: tuple[tuple[TrackedTask, str], ...]
    #: The status each checked entry had (None: not found).
    statuses: tuple[tuple[int, str | None], ...]


class AparaviTarget(Target):
    """Inventory-backed listing, per-task status calls, per-id delete (terminate) requests."""

    kind = "aparavi"
    config_model = AparaviConfig
    live_statuses = frozenset({"Running"})
    known_statuses = frozenset({"Running", "Completed", "Failed", "Cancelled", "Stopped", "Error"})
    time_fields = ("endTime", "startTime")
    match_fields = frozenset({"task_id", "name", "type", "token"})
    max_batch_size = 1

    keeps_state = True

    config: AparaviConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert self.state is not None  # keeps_state: the base class refuses None
        self.inventory: TaskInventory = self.state.inventory
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        #: What this run's listing said about each id: delete() checks it.
        self.listed: dict[str, _Listed] = {}
        #: What the last complete listing learnt (None while a listing is under way).
        self.learnt: _Learnt | None = None

    @classmethod
    def client_auth(cls, config: TargetConfig) -> httpx.Auth:
        assert isinstance(config, AparaviConfig)
        return config.auth.build()

    def invalid_id_reason(self, task_id: str) -> str | None:
        if not isinstance(task_id, str) or parse_task_id(task_id) is None:
            return "id is not <cpu|gpu>:<token> with a URL-safe token"
        return None

    def url(self) -> str:
        return self.config.root() + TASK_PATH

    # -- listing ------------------------------------------------------------------------------

    async def list_tasks(self, request: ListRequest) -> AsyncIterator[Task]:
        self.listed.clear()
        self.learnt = None
        base = self.config.root()
        inventory = self.inventory
        retire = await asyncio.to_thread(inventory.gone_per_audit, base)
        retiring = {entry.id for entry, _ in retire}
        entries = [
            entry
            for entry in await asyncio.to_thread(
                inventory.entries, base, types=self.config.task_types
            )
            if entry.id not in retiring
        ]
        log.info("inventory_read", target=base, active=len(entries), retiring=len(retire))
        limit = asyncio.Semaphore(self.config.status_concurrency)
        gone: list[tuple[TrackedTask, str]] = []
        statuses: list[tuple[int, str | None]] = []
        for start in range(0, len(entries), _WINDOW):
            window = entries[start : start + _WINDOW]
            try:
                async with asyncio.TaskGroup() as group:
                    calls = [
                        group.create_task(
                            self._status(entry.task_id, entry.token, entry.type, limit)
                        )
                        for entry in window
                    ]
            except BaseExceptionGroup as failed:
                # The first failure is the cause; the other calls were cancelled because of it.
                raise _first(failed) from None
            for entry, call in zip(window, calls, strict=True):
                data, gone_message = call.result()
                if gone_message is not None:
                    gone.append((entry, gone_message))
                    statuses.append((entry.id, None))
                    yield Task(entry.task_id, entry.last_status or "NotFound", None, gone=True)
                    continue
                assert data is not None
                task = self._task(entry, data, request)
                statuses.append((entry.id, task.status))
                self.listed[task.id] = _Listed(task.status, _epoch(data.get("startTime")))
                yield task
        self.learnt = _Learnt(tuple(retire), tuple(gone), tuple(statuses))

    def state_changes(self) -> list[str]:
        learnt = self.learnt
        if learnt is None:
            return []
        changes = []
        if learnt.retire:
            changes.append(
                f"retire {_entries(len(learnt.retire))} whose task an audit row records as gone"
            )
        if learnt.gone:
            changes.append(
                f"record {len(learnt.gone)} task(s) the status call reports as not found "
                "(already_gone, policy <aparavi-inventory>) and retire "
                + _entries(len(learnt.gone))
            )
        return changes

    async def save_state(self) -> None:
        learnt, base = self.learnt, self.config.root()
        if learnt is None:
            return
        self.learnt = None  # written once
        inventory = self.inventory
        if learnt.retire:
            retired = await asyncio.to_thread(inventory.retire, learnt.retire)
            log.info("inventory_retired", target=base, retired=len(retired), source="audit")
        await asyncio.to_thread(inventory.note_statuses, learnt.statuses)
        if learnt.gone:
            retired = await asyncio.to_thread(inventory.record_gone, base, learnt.gone)
            log.info("inventory_retired", target=base, retired=len(retired), source="status")

    async def _status(
        self, task_id: str, token: str, task_type: str, limit: asyncio.Semaphore
    ) -> tuple[dict[str, Any] | None, str | None]:
        """The task's status data, or (None, the 'not found' message)."""
        where = f"status of {task_id}"
        async with limit:
            exchange = await self.fetch_page(
                where, "GET", self.url(), params={"token": token, "type": task_type}
            )
        status, body = exchange.status_code, _json(exchange.body)
        message = _error_message(body)
        if _is_unauthorized(message):
            raise TargetAuthError(f"{where}: the key was refused ({message})", http_status=status)
        if message is not None and message.strip().lower().startswith(_GONE_MESSAGES):
            return None, message
        if status != 200 or not isinstance(body, dict):
            raise ListingError(
                f"{where}: HTTP {status}: {message or 'not the documented JSON answer'}",
                http_status=status,
                error_message=message,
            )
        if body.get("status") != "OK" or not isinstance(body.get("data"), dict):
            raise ListingError(
                f"{where}: the service reported an error: {message or body.get('status')!r}",
                http_status=status,
                error_message=message,
            )
        data: dict[str, Any] = body["data"]
        if not isinstance(data.get("status"), str) or not data["status"]:
            raise ListingError(f"{where}: the answer has no status")
        return data, None

    def _task(self, entry: TrackedTask, data: dict[str, Any], request: ListRequest) -> Task:
        timestamp = problem = None
        raw = data.get(request.age_field)
        try:
            timestamp = _epoch(raw)
        except ValueError as exc:
            problem = f"{request.age_field} does not parse: {exc}"
        values = {"name": entry.name or "", "type": entry.type, "token": entry.token}
        fields = {name: values.get(name, "") for name in request.match_fields}
        kept = data if request.raw else None
        return Task(entry.task_id, data["status"], timestamp, fields, problem=problem, raw=kept)

    # -- deletion -----------------------------------------------------------------------------

    async def recheck(
        self, ids: Sequence[str], upcoming: Sequence[str], request: RecheckRequest
    ) -> Recheck:
        """Fetch each task's status again (one call per task: the API has no other means)."""
        limit = asyncio.Semaphore(self.config.status_concurrency)
        keys = {task_id: parse_task_id(task_id) for task_id in ids}
        try:
            async with asyncio.TaskGroup() as group:
                calls = {
                    task_id: group.create_task(self._status(task_id, key[1], key[0], limit))
                    for task_id, key in keys.items()
                    if key is not None
                }
        except BaseExceptionGroup as failed:
            raise _first(failed) from None
        seen: dict[str, Task] = {}
        absent = {task_id for task_id, key in keys.items() if key is None}
        for task_id, call in calls.items():
            data, _ = call.result()
            if data is None:
                absent.add(task_id)
                continue
            timestamp = problem = None
            try:
                timestamp = _epoch(data.get(request.listing.age_field))
            except ValueError as exc:
                problem = f"{request.listing.age_field} does not parse: {exc}"
            seen[task_id] = Task(task_id, data["status"], timestamp, problem=problem)
            self.listed[task_id] = _Listed(data["status"], _epoch(data.get("startTime")))
        return Recheck(
            seen,
            frozenset(ids),
            frozenset(absent),
            means=f"status of {len(ids)} task(s)",
            fields=False,
        )

    async def delete(self, task_ids: Sequence[str], options: DeleteOptions) -> BatchResult:
        async def one(task_id: str) -> DeleteResult:
            refusal, note = self.refusal(task_id)
            if refusal is not None:
                return DeleteResult(task_id, Outcome.FAILED, error_message=refusal, note="not sent")
            return await self._delete_one(task_id, note)

        return await self.delete_each(task_ids, one)

    def refusal(self, task_id: str) -> tuple[str | None, str | None]:
        """(why reaper will not send a delete for ``task_id``, or None; the note if sent)."""
        key = parse_task_id(task_id) if isinstance(task_id, str) else None
        if key is None:
            return "refused: the id is not <cpu|gpu>:<token>", None
        listed = self.listed.get(task_id)
        if listed is None:
            return "refused: the task was not in this run's listing", None
        if listed.status not in self.live_statuses:
            return None, None
        config = self.config
        if not config.allow_running or config.max_runtime is None:
            return (
                f"refused: the task is {listed.status}; terminating running tasks needs "
                "target.allow_running: true and target.max_runtime",
                None,
            )
        limit = format_duration(config.max_runtime)
        if listed.start is None:
            return f"refused: running task without a startTime (max_runtime {limit})", None
        runtime = self.clock() - listed.start
        if runtime <= config.max_runtime:
            return (
                f"refused: running for {format_duration(runtime)}, not longer than "
                f"max_runtime {limit}",
                None,
            )
        return None, f"terminated: running longer than {limit} ({format_duration(runtime)})"

    async def _delete_one(self, task_id: str, note: str | None) -> DeleteResult:
        key = parse_task_id(task_id)
        assert key is not None
        task_type, token = key
        exchange = await self.http.send(
            "DELETE", self.url(), params={"token": token, "type": task_type}
        )
        status, body = exchange.status_code, _json(exchange.body)
        message = _error_message(body)
        if _is_unauthorized(message):
            raise TargetAuthError(
                f"delete of {task_id}: the key was refused ({message})", http_status=status
            )
        if message is not None:
            lowered = message.strip().lower()
            if lowered.startswith(_GONE_MESSAGES):
                return gone_result(task_id, exchange.earlier, status, None, message, note=note)
            if _NOT_DELETABLE in lowered:
                return DeleteResult(
                    task_id, Outcome.FAILED, status, error_message=message, note=NOT_DELETABLE_NOTE
                )
            return DeleteResult(task_id, Outcome.FAILED, status, error_message=message, note=note)
        if status == 200 and isinstance(body, dict) and body.get("status") == "OK":
            return DeleteResult(task_id, Outcome.DELETED, status, note=note)
        if 200 <= status < 300:
            # The server may have acted: we cannot say it did not.
            return DeleteResult(
                task_id,
                Outcome.UNKNOWN,
                status,
                error_message='HTTP 2xx without the documented {"status": "OK"} body',
            )
        return DeleteResult(
            task_id, Outcome.FAILED, status, error_message=f"HTTP {status} without error body"
        )


def _entries(count: int) -> str:
    return f"{count} inventory entr{'y' if count == 1 else 'ies'}"


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _error_message(body: Any) -> str | None:
    """The error text of an Aparavi answer (``status: Error``, or a bare ``error`` field)."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict) and error.get("message") is not None:
        return str(error["message"])[:1024]
    if isinstance(error, str):
        return error[:1024]
    if body.get("status") == "Error":
        return str(body.get("message") or "unspecified error")[:1024]
    return None


def _is_unauthorized(message: str | None) -> bool:
    return message is not None and message.strip().lower().startswith(_UNAUTHORIZED)


def _epoch(value: Any) -> datetime | None:
    """Aparavi's epoch seconds (float); None and 0 mean "not yet" (a running task's endTime)."""
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected epoch seconds, got {value!r}")
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise ValueError(f"{value!r} is not a valid epoch time") from exc
