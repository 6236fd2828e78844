"""The extension point: what every target kind provides, and the records it hands inward.

A target lists tasks as :class:`Task` records (id, status, one aware UTC timestamp, the fields a
policy may match on), re-checks tasks just before they are deleted (:meth:`Target.recheck`), and
deletes ids, answering with one :class:`DeleteResult` per id. It knows its API's paging, status
vocabulary, id format and error bodies; it knows nothing about policies, plans or the audit.

This is a public API: other distributions add kinds by subclassing :class:`Target` and declaring
an entry point, whose name is the kind's (:mod:`reaper.targets.registry`). A kind **must** have
``config_model`` (a :class:`TargetConfig` subclass whose ``type`` is ``Literal[kind]``) and
``time_fields``, and implement :meth:`Target.list_tasks` and :meth:`Target.delete`; ``kind`` and
the config's ``type`` are set from the entry point when the class does not set them (a subclass
of a built-in kind needs nothing else). It **may** override the other class attributes
(statuses, match fields, batch size, the re-check rails), ``options_model``,
:meth:`Target.client_auth`, :meth:`Target.invalid_id_reason`, :meth:`Target.recheck`,
:meth:`Target.settle_after_for`, :meth:`Target.error_text`, and, when it keeps state
(``keeps_state``), :meth:`Target.state_changes` and :meth:`Target.save_state`. The README's
"Writing a target" shows how to test one against a simulator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from reaper.errors import ListingError, TargetAuthError, TargetError
from reaper.fields import Duration
from reaper.http import (
    Exchange,
    RequestFailed,
    ResponseTooLarge,
    Stale,
    TargetHttp,
    error_fields,
)
from reaper.targets.state import TargetState

__all__ = [
    "STILL_RUNNING_NOTE",
    "BatchResult",
    "Credential",
    "DeleteResult",
    "ListRequest",
    "Outcome",
    "Recheck",
    "RecheckRequest",
    "RecheckSettings",
    "Target",
    "TargetConfig",
    "Task",
    "gone_result",
    "origin_of",
    "result_of_error",
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
    #: Not deleted: reconciliation found a pending/unknown row's task still present, the run
    #: stopped before the request left, or a later listing still shows a task whose deletion the
    #: target had acknowledged (a correction row).
    NOT_DELETED = "not_deleted"
    #: Dropped at send time: the re-check just before the request saw the task live, gone or no
    #: longer eligible. Final when written; the id was never sent.
    SKIPPED_CHANGED = "skipped_changed"


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
    #: The record as the target listed it (parsed JSON), when the target keeps it: the plan
    #: keeps it, bounded, for the tasks it deletes (the audit row's snapshot).
    raw: Any = None


@dataclass(frozen=True)
class ListRequest:
    """What the planner needs from a listing; targets may push filters to the server."""

    age_field: str
    match_fields: frozenset[str] = frozenset()
    #: Tasks created at or after this instant cannot be eligible (a server-side hint only).
    created_before: datetime | None = None
    #: Keep each listed record on its Task (``Task.raw``), for the audit's snapshots.
    raw: bool = False


@dataclass(frozen=True)
class RecheckRequest:
    """What a target needs to re-check tasks just before deleting them."""

    #: Read fresh records the way the run's listing read them (age field, match fields).
    listing: ListRequest
    #: Statuses a task may be in and still be deleted; in any other it is no longer eligible.
    eligible_statuses: frozenset[str]
    #: Tasks per status in the run's listing: what a re-listing by status would cost.
    status_counts: Mapping[str, int] = field(default_factory=dict)
    #: About how many ids will be sent while one re-check stays fresh (for choosing a means).
    horizon: int = 0
    #: The listed age-field value of each id asked about (for re-listing a time window).
    timestamps: Mapping[str, datetime] = field(default_factory=dict)
    #: When the run's listing began: a change after it is what a re-check looks for.
    listing_started: datetime | None = None


@dataclass(frozen=True)
class Recheck:
    """What a re-check saw.

    ``seen`` holds fresh records; ``absent`` the ids no longer on the target. ``covered`` is the set
    of ids the check speaks for (each is in ``seen`` or ``absent``), or None for a re-listing of
    every status in which a task is no longer deletable: then an id missing from ``seen`` is in
    none of those statuses, whichever id it is, until the check goes stale.
    """

    seen: Mapping[str, Task]
    covered: frozenset[str] | None
    absent: frozenset[str] = frozenset()
    #: How the target checked, for logs (e.g. "re-listed statuses pending, in_progress").
    means: str = ""
    #: The fresh records carry the fields a policy matches on (a listing's do; a per-task
    #: status answer may not): otherwise only their status and age are decided again.
    fields: bool = True


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
    """The answer to one delete call: one result per id that was sent.

    A target that sends several requests for one call (one per id, or chunks) reports each id's
    own outcome, and the ids it did not send in ``unsent``: the executor re-checks those and sends
    them again, or, when ``stop`` is set (the target refused our credentials), records them as
    never sent and stops the policy.
    """

    results: Sequence[DeleteResult]
    #: Earlier attempts of this (single) request that may have been carried out by the server
    #: (their answers were lost, or were 5xx): a "not found" answer then confirms our deletion.
    earlier: tuple[str, ...] = ()
    #: Ids not sent at all (their check went stale, or the target stopped).
    unsent: tuple[str, ...] = ()
    #: Why the target stopped sending: every further request would fail the same way.
    stop: TargetAuthError | None = None

    @property
    def lost_attempts(self) -> int:
        return len(self.earlier)


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


class RecheckSettings(BaseModel):
    """``target.recheck``: how fresh a task's re-check must be when its delete request leaves."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    max_staleness: Duration = Field(
        timedelta(seconds=60),
        description=(
            "Longest time between re-checking a task on the target and sending its delete "
            "request (retries included); tasks seen live, gone or no longer eligible are dropped."
        ),
        json_schema_extra={"default": "60s"},
    )

    @field_validator("max_staleness")
    @classmethod
    def _bounded(cls, value: timedelta) -> timedelta:
        if not timedelta(seconds=1) <= value <= timedelta(hours=1):
            raise ValueError("max_staleness must be between 1s and 1h")
        return value


_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> str:
    """``scheme://host:port`` of an http(s) URL, the port always written (RFC 6454's origin)."""
    parsed = httpx.URL(url)
    host = parsed.host
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    port = parsed.port or _DEFAULT_PORTS[parsed.scheme]
    return f"{parsed.scheme}://{host}:{port}"


@dataclass(frozen=True)
class Credential:
    """Which account a target's requests are made as: what servers count their limits by.

    ``kind`` and ``source`` are never secret (``"aksk"``, ``"AK from environment variable
    HW_AK"``). ``read`` returns the value that identifies the account (the AK, which is not
    secret; a token or API key, which is): whoever calls it must keep it out of logs and keys
    (:mod:`reaper.budgets` only keeps a keyed hash of it).
    """

    kind: str
    source: str = ""
    read: Callable[[], str] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def none(cls) -> Credential:
        """No authentication: every client of the endpoint is the same to it."""
        return cls("none")


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
    recheck: RecheckSettings = Field(default_factory=RecheckSettings)

    def describe(self) -> str:
        """A short, secret-free name for logs and the audit (e.g. the base URL)."""
        return self.type

    def origin(self) -> str | None:
        """``scheme://host:port`` of the API: with :meth:`credential`, the key of the request
        budget every policy reaching it shares (:mod:`reaper.budgets`). None (a target kind
        that does not say): the policy's runs keep a budget of their own."""
        return None

    def credential(self) -> Credential:
        """Which account the requests are made as (default: no authentication)."""
        return Credential.none()


class DeleteOptions(BaseModel):
    """Target-specific delete options (``delete.options`` in a policy); none by default."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class Target(ABC):
    """One task API: list tasks, delete ids.

    Built once per run by the runner with the policy's validated ``config``, a
    :class:`~reaper.http.TargetHttp` (rate limit, retries, auth and size limits already applied:
    send every request through it) and, for kinds that keep state, a :class:`TargetState`.
    """

    #: The ``target.type`` value in a policy: the entry point's name (the registry sets it on a
    #: subclass when the class does not).
    kind: ClassVar[str]
    #: The model of the policy's ``target:`` section; its ``type`` is ``Literal[kind]``. Must be
    #: set.
    config_model: ClassVar[type[TargetConfig]]
    #: The model of the policy's ``delete.options`` (none by default).
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
    #: A deletion the target acknowledged, contradicted by a later listing and sent again, then
    #: answered "nothing to delete": True when that means the first request did the work and
    #: only the target's record of it was lost (data_pipeline: the directory was removed, the
    #: row update failed), so the deletion is recorded as ours.
    gone_after_acknowledged_is_ours: ClassVar[bool] = False
    #: Set when the target's server itself refuses to delete a task that is not finished, and a
    #: finished task never becomes live again: then no re-check is needed before deleting, and
    #: this sentence says why (it is logged and documented).
    server_refuses_live: ClassVar[str | None] = None
    #: Set by kinds that keep state in reaper's database between runs (Aparavi's inventory of
    #: tracked tasks): they are handed a :class:`TargetState`, and ``reaper plan`` sets the
    #: database up before listing them.
    keeps_state: ClassVar[bool] = False

    def __init__(
        self, config: TargetConfig, http: TargetHttp, state: TargetState | None = None
    ) -> None:
        if self.keeps_state and state is None:
            raise ValueError(f"the {self.kind} target keeps state: it needs state=TargetState")
        self.config = config
        self.http = http
        self.state = state

    @classmethod
    def settle_after_for(cls, config: TargetConfig) -> timedelta | None:
        """How long a delete request that timed out (or that a gateway answered 502/504) may
        still be running on the server: until then its tasks are not sent again, and still being
        listed does not settle it. None (the default): requests do not outlive their answers."""
        return None

    def settle_after(self) -> timedelta | None:
        """:meth:`settle_after_for` of this target's configuration."""
        return self.settle_after_for(self.config)

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
        """Yield every task, page by page (an ``async def`` generator).

        Each :class:`Task` carries the id, the status, the request's ``age_field`` as an aware
        UTC datetime and the requested ``match_fields`` (:func:`task_reader` builds them from
        JSON records). Raise ListingError whenever the listing may be incomplete (a page
        failed, repeated or came back malformed): nothing of the policy is deleted then. Send
        requests with :meth:`fetch_json` or :meth:`fetch_page`.
        """

    @abstractmethod
    async def delete(self, task_ids: Sequence[str], options: DeleteOptions) -> BatchResult:
        """Delete ``task_ids`` (at most ``max_batch_size``): one request, or one per id through
        :meth:`delete_each`. Every id sent gets its own result; see :class:`BatchResult`."""

    async def recheck(
        self, ids: Sequence[str], upcoming: Sequence[str], request: RecheckRequest
    ) -> Recheck:
        """Look at ``ids`` on the target again, just before they are deleted.

        ``upcoming`` are the ids due next; a means that covers them at no extra cost may report
        them too. Any failure raises (ListingError, TargetError): the ids are then not sent.

        The default lists the whole target again, which every API allows; targets override it
        with the cheapest means their API offers (a re-listing of a few statuses, a time window,
        or one request per task).
        """
        wanted = frozenset(ids) | frozenset(upcoming)
        seen: dict[str, Task] = {}
        async for task in self.list_tasks(request.listing):
            if task.id in wanted:
                seen[task.id] = task
        return Recheck(seen, wanted, wanted - seen.keys(), means="listed the target again")

    def state_changes(self) -> Sequence[str]:
        """What the last complete listing learnt that :meth:`save_state` would write, one line
        each (``reaper plan`` prints them); nothing for kinds without state."""
        return ()

    async def save_state(self) -> None:
        """Write what the last complete listing learnt to the target's state.

        Listing itself never writes: the runner calls this after a complete listing in a run
        that may delete, never for ``reaper plan`` or a dry run. Nothing for kinds without state.
        """
        return None

    async def delete_each(
        self,
        task_ids: Sequence[str],
        delete_one: Callable[[str], Awaitable[DeleteResult]],
    ) -> BatchResult:
        """Delete ids one request at a time, each id with its own outcome.

        A failed request fails its own id only (``unknown`` when the server may have acted);
        ids answered before keep their outcomes. Credentials refused stop the batch (the rest is
        ``unsent``, and ``stop`` says why); a check gone stale leaves the rest ``unsent`` too.
        """
        results: list[DeleteResult] = []
        for index, task_id in enumerate(task_ids):
            try:
                results.append(await delete_one(task_id))
            except TargetAuthError as exc:
                results.append(result_of_error(task_id, exc))
                return BatchResult(results, unsent=tuple(task_ids[index + 1 :]), stop=exc)
            except Stale as exc:
                if not exc.earlier:
                    return BatchResult(results, unsent=tuple(task_ids[index:]))
                results.append(result_of_error(task_id, exc))
                return BatchResult(results, unsent=tuple(task_ids[index + 1 :]))
            except TargetError as exc:
                results.append(result_of_error(task_id, exc))
        return BatchResult(results)


#: The note of an ``unknown`` outcome whose request may still be at work on the server (it timed
#: out after being sent, or a gateway answered 502/504): reconciliation waits for it to settle.
STILL_RUNNING_NOTE = "the server may still be working on this request"


def result_of_error(task_id: str, exc: TargetError) -> DeleteResult:
    """The outcome of an id whose request ended in ``exc``.

    ``unknown`` when the server may have acted (an answer lost, a 5xx, a 2xx we cannot read, a
    body too large to read, a check gone stale after such an attempt): reconciliation settles it.
    ``failed`` when it certainly did not.
    """
    if isinstance(exc, Stale):
        return DeleteResult(
            task_id,
            Outcome.UNKNOWN,
            error_message=(
                f"not repeated: the re-check went stale after an attempt that may have been "
                f"carried out ({', '.join(exc.earlier)})"
            ),
        )
    if isinstance(exc, RequestFailed):
        outcome = Outcome.UNKNOWN if exc.maybe_sent else Outcome.FAILED
    elif isinstance(exc, ResponseTooLarge):
        outcome = Outcome.UNKNOWN
    elif isinstance(exc, TargetAuthError):
        outcome = Outcome.FAILED
    else:
        # A 2xx answer we cannot read may still mean the server acted.
        acted = exc.http_status is None or 200 <= exc.http_status < 300
        outcome = Outcome.UNKNOWN if acted else Outcome.FAILED
    message = exc.error_message or str(exc)
    running = isinstance(exc, RequestFailed) and exc.still_running
    return DeleteResult(
        task_id,
        outcome,
        exc.http_status,
        exc.error_code,
        message,
        note=STILL_RUNNING_NOTE if running else None,
    )


def gone_result(
    task_id: str,
    earlier: Sequence[str],
    http_status: int | None,
    error_code: str | None = None,
    error_message: str | None = None,
    *,
    note: str | None = None,
) -> DeleteResult:
    """The outcome of a "not found" answer to a delete.

    The task was listed present. If an earlier attempt of the same request may have been carried
    out (its answer was lost, or was 500/502/503/504), the deletion is ours: ``deleted``, noted.
    Otherwise someone else deleted it: ``already_gone``.
    """
    if earlier:
        return DeleteResult(
            task_id,
            Outcome.DELETED,
            http_status,
            note=f"deleted: confirmed after an earlier attempt ({', '.join(earlier)}); "
            "this attempt found it gone",
        )
    return DeleteResult(
        task_id, Outcome.ALREADY_GONE, http_status, error_code, error_message, note=note
    )


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
    keep_raw = request.raw

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
        kept = raw if keep_raw else None
        task: Task = _new_task(Task, (task_id, status, timestamp, fields, gone, problem, kept))
        return task

    return read
