"""A target for any task API, described declaratively in the policy (``type: generic_http``).

The policy says how to list (a path template, method, static parameters or body, where the items
are in the answer, the paging style), how to read an item (which JSON paths hold the id, status,
timestamp and matchable fields, and when an item counts as already deleted), how to delete (one
request per id, or batches with per-id outcomes read from the answer, or all-or-nothing) and how to
authenticate (:mod:`reaper.targets.httpauth`). Every part is validated when the policy loads.

Paging never trusts a ``total`` blindly: offset and page styles stop at a short page (or on
``has_next: false``), cursor and ``Link`` styles when the answer names no next page; a configured
``total`` is only a cross-check that fails the listing when fewer items arrived. Repeated pages,
cursors or links that do not advance, ids seen twice (beyond the one-page shift that tasks created
meanwhile cause in offset paging) all make the listing incomplete: nothing is deleted.

Ids pass a guard before they are put anywhere: never empty, '/', '\\', '..' or control characters,
and ``id_pattern`` when given; in a URL path they are percent-encoded as well. Only ids this run
listed are ever sent, and with ``deletable_statuses`` only ids listed in one of them.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Annotated, Any, ClassVar, Literal, Union
from urllib.parse import quote

import httpx
import structlog
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from reaper.converters import parse_size, parse_timezone
from reaper.errors import ListingError, TargetAuthError
from reaper.http import Exchange, RequestFailed, ResponseTooLarge, Stale, error_fields
from reaper.jsonpath import MISSING, JsonPath
from reaper.targets.base import (
    BatchResult,
    Credential,
    DeleteOptions,
    DeleteResult,
    ListRequest,
    Outcome,
    Target,
    TargetConfig,
    Task,
    gone_result,
    origin_of,
    result_of_error,
)
from reaper.targets.httpauth import HttpAuth, NoAuth
from reaper.timeformats import TimeFormat, check_format

__all__ = ["GenericHttpConfig", "GenericHttpTarget"]

log = structlog.get_logger("reaper.targets.generic_http")

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_PARAM = r"^[A-Za-z0-9_.\[\]-]{1,64}$"
# Static headers must not carry credentials: those belong in `auth`, read from a secret.
_SECRET_HEADERS = frozenset({"authorization", "x-auth-token", "x-api-key", "cookie", "api-key"})
Scalar = str | int | float | bool | None


def _path(value: Any) -> str:
    JsonPath.parse(value)
    return str(value)


def _regex(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a regular expression string")
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {value!r}: {exc}") from exc
    return value


PathText = Annotated[str, BeforeValidator(_path)]


def _placeholders(text: str) -> list[str]:
    return _PLACEHOLDER.findall(text)


def _url_path(value: str, allowed: set[str], what: str) -> str:
    if not value.startswith("/") or value.startswith("//"):
        raise ValueError(f"{what} must be a path starting with '/' (relative to base_url)")
    if any(c in value for c in "?#") or not value.isprintable() or " " in value:
        raise ValueError(f"{what} must be a plain path: no query, fragment or spaces")
    unknown = [name for name in _placeholders(value) if name not in allowed]
    if unknown:
        known = ", ".join("{" + n + "}" for n in sorted(allowed)) or "none"
        raise ValueError(f"{what}: unknown placeholder(s) {unknown}; allowed: {known}")
    return value


def _count_marker(value: Any, marker: str) -> int:
    """How often ``marker`` is a whole value in a JSON template (part of a string: refused)."""
    if isinstance(value, str):
        if marker in value and value != marker:
            raise ValueError(f"{marker} must be a whole value, not part of {value!r}")
        return int(value == marker)
    if isinstance(value, dict):
        return sum(_count_marker(v, marker) for v in value.values())
    if isinstance(value, list):
        return sum(_count_marker(v, marker) for v in value)
    return 0


def _substitute(value: Any, marker: str, replacement: Any) -> Any:
    if value == marker:
        return replacement
    if isinstance(value, dict):
        return {k: _substitute(v, marker, replacement) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, marker, replacement) for v in value]
    return value


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class Condition(_Model):
    """True when the value at ``path`` equals ``equals`` (e.g. ``directory_exists`` is false)."""

    path: PathText = Field(description="JSON path inside the object, e.g. 'directory_exists'.")
    equals: Scalar = Field(description="The JSON value that makes the condition true.")

    def test(self, document: Any) -> bool:
        value = JsonPath.parse(self.path).get(document)
        return value is not MISSING and value == self.equals and type(value) is type(self.equals)


# --- paging -----------------------------------------------------------------------------------


class OffsetPaging(_Model):
    """``?offset=&limit=``: stop at a page shorter than ``limit``."""

    style: Literal["offset"]
    offset_param: str = Field("offset", pattern=_PARAM)
    limit_param: str = Field("limit", pattern=_PARAM)
    limit: int = Field(100, ge=1, le=10000, description="At most the server's own cap.")
    start: int = Field(0, ge=0, description="The first offset (0 or 1 based APIs).")
    total: PathText | None = Field(
        None, description="Path of a true total: a cross-check only, never a stop condition."
    )


class PagePaging(_Model):
    """``?page=&page_size=``: stop at a short page, or when ``has_next`` is false."""

    style: Literal["page"]
    page_param: str = Field("page", pattern=_PARAM)
    size_param: str = Field("page_size", pattern=_PARAM)
    size: int = Field(100, ge=1, le=10000, description="At most the server's own cap.")
    first_page: int = Field(1, ge=0)
    has_next: PathText | None = Field(None, description="Path of a has-next boolean.")
    total: PathText | None = Field(None, description="Path of a true total (cross-check only).")


class CursorPaging(_Model):
    """A cursor or marker taken from the answer (or from the last item) and sent back."""

    style: Literal["cursor"]
    param: str = Field("cursor", pattern=_PARAM, description="Query/body name of the cursor.")
    next: PathText | None = Field(None, description="Path of the next cursor in the answer.")
    next_from_item: PathText | None = Field(
        None, description="... or the path, in the page's last item, of the value to send back."
    )
    first: str | None = Field(None, description="Cursor of the first request (default: none).")
    limit_param: str | None = Field(None, pattern=_PARAM)
    limit: int | None = Field(None, ge=1, le=10000)
    stop_on_short_page: bool = Field(
        False, description="A page shorter than limit is the last (no extra request)."
    )

    @model_validator(mode="after")
    def _check(self) -> CursorPaging:
        if (self.next is None) == (self.next_from_item is None):
            raise ValueError("give exactly one of next or next_from_item")
        if (self.limit is None) != (self.limit_param is None):
            raise ValueError("limit and limit_param go together")
        if self.stop_on_short_page and self.limit is None:
            raise ValueError("stop_on_short_page needs limit")
        return self


class LinkPaging(_Model):
    """RFC 8288 ``Link: <url>; rel="next"`` headers (same origin as base_url only)."""

    style: Literal["link"]
    limit_param: str | None = Field(None, pattern=_PARAM)
    limit: int | None = Field(None, ge=1, le=10000)

    @model_validator(mode="after")
    def _check(self) -> LinkPaging:
        if (self.limit is None) != (self.limit_param is None):
            raise ValueError("limit and limit_param go together")
        return self


class NoPaging(_Model):
    """One request answers every task."""

    style: Literal["none"]


Paging = Annotated[
    Union[OffsetPaging, PagePaging, CursorPaging, LinkPaging, NoPaging],  # noqa: UP007
    Field(discriminator="style"),
]


class Each(_Model):
    """List once per value (e.g. an API whose list call requires a ``task_type``)."""

    param: str | None = Field(None, pattern=_PARAM, description="Query parameter of the value.")
    values: tuple[str, ...] = Field(min_length=1, json_schema_extra={"uniqueItems": True})

    @field_validator("values")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("a value is listed twice")
        return value


class ListSpec(_Model):
    """How to list tasks."""

    path: str = Field(description="Path below base_url; may contain {each}.")
    method: Literal["GET", "POST"] = "GET"
    params: dict[str, Scalar] = Field(default_factory=dict, description="Static query parameters.")
    body: dict[str, Any] | None = Field(None, description="Static JSON body (POST listings).")
    paging_in: Literal["query", "body"] = Field("query", description="Where paging values go.")
    items: PathText = Field(description="Path of the list of tasks in the answer, e.g. data.tasks.")
    ok_when: Condition | None = Field(
        None, description="An answer must satisfy this (e.g. success: true) to count."
    )
    error_code: PathText | None = None
    error_message: PathText | None = None
    paging: Paging = Field(description="offset, page, cursor, link or none.")
    each: Each | None = None
    max_pages: int = Field(100_000, ge=1, description="Guard against endless paging.")

    @model_validator(mode="after")
    def _check(self) -> ListSpec:
        allowed = {"each"} if self.each is not None else set()
        _url_path(self.path, allowed, "list.path")
        if self.each is not None and self.each.param is None and "{each}" not in self.path:
            raise ValueError("each needs a param, or {each} in list.path")
        if self.paging_in == "body" and self.method != "POST":
            raise ValueError("paging_in: body needs method: POST")
        return self


class TimestampSpec(_Model):
    """Where the timestamp is and how it is written."""

    path: PathText
    format: str = Field("iso8601", description="iso8601, epoch_s, epoch_ms, or a strftime pattern.")
    timezone: str = Field("UTC", description="Zone of naive values.")

    @field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        return check_format(value)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        parse_timezone(value)
        return value


class ItemSpec(_Model):
    """How to read one listed task."""

    id: PathText
    status: PathText
    timestamp: TimestampSpec = Field(description="The policy's age field ('timestamp').")
    fields: dict[str, PathText] = Field(
        default_factory=dict, description="Fields policies may match on, by name: JSON path."
    )
    gone_when: Condition | None = Field(
        None, description="The item is listed but already deleted (e.g. directory_exists false)."
    )

    @field_validator("fields")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        if "task_id" in value:
            raise ValueError("task_id is always the id; do not declare it")
        return value


# --- deletion ---------------------------------------------------------------------------------


class PerIdDelete(_Model):
    """One request per id: ``path`` contains ``{id}`` (percent-encoded)."""

    style: Literal["per_id"]
    path: str = Field(description="Path below base_url with {id}, e.g. /tasks/{id}.")
    method: Literal["DELETE", "POST", "PUT", "PATCH"] = "DELETE"
    body: dict[str, Any] | None = Field(None, description="JSON body; a value '{id}' is the id.")
    success: tuple[int, ...] = Field((200, 202, 204), min_length=1)
    gone: tuple[int, ...] = Field((404,), description="Statuses meaning already deleted.")
    ok_when: Condition | None = Field(None, description="A success answer must satisfy this.")
    error_code: PathText | None = None
    error_message: PathText | None = None

    @model_validator(mode="after")
    def _check(self) -> PerIdDelete:
        _url_path(self.path, {"id"}, "delete.path")
        if _placeholders(self.path).count("id") != 1:
            raise ValueError("delete.path must contain {id} exactly once")
        if set(self.success) & set(self.gone):
            raise ValueError("a status cannot mean both success and gone")
        return self


class PerIdResults(_Model):
    """Read each id's outcome from lists in the answer."""

    mode: Literal["per_id"]
    deleted: PathText = Field(description="Path of the list of deleted entries.")
    failed: PathText | None = Field(None, description="Path of the list of failed entries.")
    id: PathText = Field(description="Path of the id inside an entry.")
    gone_when: Condition | None = Field(None, description="A deleted entry that was already gone.")
    failed_when: Condition | None = Field(None, description="A 'deleted' entry that failed.")
    error: PathText | None = Field(None, description="Error text inside a failed entry.")
    code: PathText | None = Field(None, description="Error code inside a failed entry.")
    bytes: PathText | None = Field(None, description="Space reclaimed ('2.5 MB' or a number).")
    files: PathText | None = Field(None, description="Files removed.")


class AllOrNothing(_Model):
    """The API does not report per id: a success status means every id was deleted."""

    mode: Literal["all_or_nothing"]


class BatchDelete(_Model):
    """Many ids per request: ``body`` contains ``"{ids}"`` where the list goes."""

    style: Literal["batch"]
    path: str
    method: Literal["DELETE", "POST", "PUT", "PATCH"] = "POST"
    body: dict[str, Any] = Field(description="JSON body; the value '{ids}' becomes the id list.")
    max_ids: int = Field(100, ge=1, le=5000, description="Ids per request.")
    success: tuple[int, ...] = Field((200,), min_length=1)
    ok_when: Condition | None = None
    error_code: PathText | None = None
    error_message: PathText | None = None
    result: Annotated[
        Union[PerIdResults, AllOrNothing],  # noqa: UP007
        Field(discriminator="mode"),
    ]

    @model_validator(mode="after")
    def _check(self) -> BatchDelete:
        _url_path(self.path, set(), "delete.path")
        if _count_marker(self.body, "{ids}") != 1:
            raise ValueError('delete.body must contain the value "{ids}" exactly once')
        return self


DeleteSpec = Annotated[
    Union[PerIdDelete, BatchDelete],  # noqa: UP007
    Field(discriminator="style"),
]


class GenericHttpConfig(TargetConfig):
    """``target:`` settings for ``type: generic_http``."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, hide_input_in_errors=True
    )

    type: Literal["generic_http"]
    base_url: AnyHttpUrl = Field(description="The API root; every path is relative to it.")
    auth: HttpAuth = Field(default_factory=lambda: NoAuth(type="none"))
    headers: dict[str, str] = Field(
        default_factory=dict, description="Static, non-secret headers sent with every request."
    )
    id_pattern: Annotated[str, BeforeValidator(_regex)] | None = Field(
        None, description="Ids must match this in full before they are sent."
    )
    deletable_statuses: tuple[str, ...] | None = Field(
        None, description="Only ids listed in one of these statuses are ever sent."
    )
    list: ListSpec
    item: ItemSpec
    delete: DeleteSpec

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: AnyHttpUrl) -> AnyHttpUrl:
        if value.username or value.password:
            raise ValueError("credentials do not belong in base_url")
        if value.query or value.fragment:
            raise ValueError("base_url must not have a query or fragment")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        secret = sorted(name for name in value if name.lower() in _SECRET_HEADERS)
        if secret:
            raise ValueError(f"{', '.join(secret)}: credentials belong in target.auth")
        return value

    def root(self) -> str:
        return str(self.base_url).rstrip("/")

    def describe(self) -> str:
        return self.root()

    def origin(self) -> str:
        return origin_of(self.root())

    def credential(self) -> Credential:
        return self.auth.credential()


class _AnyField(frozenset[str]):
    """Match-field names are the policy's own (``item.fields``): the listing checks them."""

    def __contains__(self, item: object) -> bool:
        return isinstance(item, str)


class GenericHttpTarget(Target):
    """List and delete tasks of an API described in the policy."""

    kind = "generic_http"
    config_model = GenericHttpConfig
    time_fields = ("timestamp",)
    match_fields: ClassVar[frozenset[str]] = _AnyField()
    max_batch_size = 5000

    config: GenericHttpConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.listed_status: dict[str, str] = {}
        item = self.config.item
        self._id = JsonPath.parse(item.id)
        self._status = JsonPath.parse(item.status)
        self._stamp = JsonPath.parse(item.timestamp.path)
        self._time = TimeFormat(item.timestamp.format, item.timestamp.timezone)
        self._fields = {name: JsonPath.parse(p) for name, p in item.fields.items()}
        self._pattern = re.compile(self.config.id_pattern) if self.config.id_pattern else None

    @classmethod
    def client_auth(cls, config: TargetConfig) -> httpx.Auth | None:
        assert isinstance(config, GenericHttpConfig)
        return config.auth.build()

    def invalid_id_reason(self, task_id: str) -> str | None:
        reason = super().invalid_id_reason(task_id)
        if reason is None and self._pattern is not None and not self._pattern.fullmatch(task_id):
            reason = f"id does not match {self.config.id_pattern}"
        return reason

    def _headers(self) -> dict[str, str] | None:
        return dict(self.config.headers) or None

    # -- listing ------------------------------------------------------------------------------

    async def list_tasks(self, request: ListRequest) -> AsyncIterator[Task]:
        undeclared = sorted(set(request.match_fields) - {"task_id"} - set(self._fields))
        if undeclared:
            raise ListingError(
                f"the policy matches on {', '.join(undeclared)}, which target.item.fields does "
                f"not declare (declared: {', '.join(sorted(self._fields)) or 'none'})"
            )
        if request.age_field != "timestamp":
            raise ListingError(
                f"generic_http has one age field, 'timestamp', not {request.age_field!r}"
            )
        self.listed_status.clear()
        spec = self.config.list
        for value in spec.each.values if spec.each is not None else (None,):
            async for task in self._walk(value, request):
                self.listed_status[task.id] = task.status
                yield task

    async def _walk(self, each: str | None, request: ListRequest) -> AsyncIterator[Task]:
        spec = self.config.list
        paging = spec.paging
        path = spec.path
        params: dict[str, Any] = dict(spec.params)
        if each is not None:
            path = path.replace("{each}", quote(each, safe=""))
            if spec.each is not None and spec.each.param:
                params[spec.each.param] = each
        url = self.config.root() + path
        label = f" ({spec.each.param if spec.each and spec.each.param else 'each'} {each})"
        label = label if each is not None else ""
        previous: set[str] = set()
        seen_cursors: set[str] = set()
        listed = 0
        totals: list[int] = []
        offset = getattr(paging, "start", 0)
        page = getattr(paging, "first_page", 1)
        cursor: str | None = getattr(paging, "first", None)
        next_url: str | None = None
        for page_no in range(1, spec.max_pages + 1):
            paging_values: dict[str, Any] = {}
            if isinstance(paging, OffsetPaging):
                paging_values = {paging.offset_param: offset, paging.limit_param: paging.limit}
                where = f"listing{label} page {page_no} (offset {offset})"
            elif isinstance(paging, PagePaging):
                paging_values = {paging.page_param: page, paging.size_param: paging.size}
                where = f"listing{label} page {page_no} (page {page})"
            elif isinstance(paging, CursorPaging):
                if cursor is not None:
                    paging_values[paging.param] = cursor
                if paging.limit_param and paging.limit:
                    paging_values[paging.limit_param] = paging.limit
                where = f"listing{label} page {page_no} (cursor {cursor})"
            elif isinstance(paging, LinkPaging):
                if next_url is None and paging.limit_param and paging.limit:
                    paging_values[paging.limit_param] = paging.limit
                where = f"listing{label} page {page_no}"
            else:
                where = f"listing{label}"
            exchange, body = await self._list_page(
                next_url or url, params if next_url is None else {}, paging_values, where
            )
            raw_items = self._items(body, where)
            page_ids: set[str] = set()
            shifted = 0
            last_raw: Any = None
            for position, raw in enumerate(raw_items):
                task = self._task(raw, request, where)
                if task.id in page_ids:
                    raise ListingError(f"{where}: task {task.id!r} appears twice in one page")
                page_ids.add(task.id)
                last_raw = raw
                if task.id in previous:
                    # Offset-style pages shift by one when a task is created meanwhile: the
                    # previous page's last records come again at the head. Anywhere else, or in
                    # another paging style, it is a fault.
                    shiftable = isinstance(paging, OffsetPaging | PagePaging)
                    if not shiftable or position != shifted:
                        raise ListingError(
                            f"{where}: task {task.id!r} of the previous page appears again: "
                            "paging is inconsistent"
                        )
                    shifted += 1
                    continue
                listed += 1
                yield task
            if raw_items and shifted == len(raw_items):
                raise ListingError(f"{where}: the page repeats the previous one")
            previous = (
                previous | page_ids
                if not isinstance(paging, OffsetPaging | PagePaging)
                else page_ids
            )
            count = len(raw_items)
            if isinstance(paging, OffsetPaging | PagePaging) and paging.total is not None:
                totals.append(self._total(body, paging.total, where))
            if isinstance(paging, NoPaging):
                break
            if isinstance(paging, OffsetPaging):
                if count < paging.limit:
                    break
                offset += count
            elif isinstance(paging, PagePaging):
                if paging.has_next is not None:
                    has_next = JsonPath.parse(paging.has_next).get(body)
                    if not isinstance(has_next, bool):
                        raise ListingError(f"{where}: {paging.has_next} is not a boolean")
                    if not has_next:
                        break
                    if count == 0:
                        raise ListingError(f"{where}: an empty page says there is a next one")
                elif count < paging.size:
                    break
                page += 1
            elif isinstance(paging, CursorPaging):
                if count == 0:
                    break
                if paging.stop_on_short_page and paging.limit and count < paging.limit:
                    break
                if paging.next is not None:
                    value = JsonPath.parse(paging.next).get(body)
                else:
                    assert paging.next_from_item is not None
                    value = JsonPath.parse(paging.next_from_item).get(last_raw)
                if value is MISSING or value is None or value == "":
                    break
                if isinstance(value, bool) or not isinstance(value, str | int):
                    raise ListingError(f"{where}: the next cursor is not a string or number")
                value = str(value)
                if value == cursor or value in seen_cursors:
                    raise ListingError(f"{where}: the cursor did not advance ({value!r})")
                seen_cursors.add(value)
                cursor = value
            elif isinstance(paging, LinkPaging):
                link = self._next_link(exchange, where)
                if link is None:
                    break
                if link in seen_cursors:
                    raise ListingError(f"{where}: the next link repeats an earlier page")
                seen_cursors.add(link)
                next_url = link
        else:
            raise ListingError(f"{label.strip() or 'listing'}: more than {spec.max_pages} pages")
        if totals:
            expected = min(totals[0], totals[-1])
            if listed < expected:
                raise ListingError(
                    f"the listing{label} returned {listed} task(s) but the server reports "
                    f"{expected}: a page was missing or cut short; nothing is deleted"
                )

    async def _list_page(
        self, url: str, params: dict[str, Any], paging: dict[str, Any], where: str
    ) -> tuple[Exchange, Any]:
        spec = self.config.list
        body = dict(spec.body) if spec.body is not None else None
        query = dict(params)
        if spec.paging_in == "body":
            body = {**(body or {}), **paging}
        else:
            query.update(paging)
        exchange = await self.fetch_page(
            where,
            spec.method,
            url,
            params=query or None,
            json_body=body,
            headers=self._headers(),
        )
        decoded = _json(exchange.body)
        if not 200 <= exchange.status_code < 300:
            code, message = self._error(decoded, exchange.body, spec.error_code, spec.error_message)
            raise ListingError(
                f"{where}: HTTP {exchange.status_code}: {message or 'no error message'}",
                http_status=exchange.status_code,
                error_code=code,
                error_message=message,
            )
        if decoded is MISSING:
            raise ListingError(f"{where}: the body is not JSON", http_status=exchange.status_code)
        if spec.ok_when is not None and not spec.ok_when.test(decoded):
            code, message = self._error(decoded, exchange.body, spec.error_code, spec.error_message)
            raise ListingError(
                f"{where}: the answer does not report success: {message or 'no error message'}",
                error_code=code,
                error_message=message,
            )
        return exchange, decoded

    def _items(self, body: Any, where: str) -> list[Any]:
        items = JsonPath.parse(self.config.list.items).get(body)
        if not isinstance(items, list):
            raise ListingError(f"{where}: the answer has no list at {self.config.list.items}")
        return items

    @staticmethod
    def _total(body: Any, path: str, where: str) -> int:
        value = JsonPath.parse(path).get(body)
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ListingError(f"{where}: {path} is not a count")
        return value

    def _next_link(self, exchange: Exchange, where: str) -> str | None:
        link = exchange.response.links.get("next")
        target = link.get("url") if link else None
        if not target:
            return None
        resolved = exchange.response.request.url.join(target)
        base = httpx.URL(self.config.root())
        if (resolved.scheme, resolved.host, resolved.port) != (base.scheme, base.host, base.port):
            # Following it would send our credentials to another origin.
            raise ListingError(f"{where}: the next link leaves {self.config.root()}: {target}")
        return str(resolved)

    def _task(self, raw: Any, request: ListRequest, where: str) -> Task:
        if not isinstance(raw, dict):
            raise ListingError(f"{where}: a task entry is not an object")
        task_id = self._id.get(raw)
        if isinstance(task_id, int) and not isinstance(task_id, bool):
            task_id = str(task_id)
        if not isinstance(task_id, str) or not task_id:
            raise ListingError(f"{where}: a task has no id at {self.config.item.id}")
        status = self._status.get(raw)
        if not isinstance(status, str) or not status:
            raise ListingError(f"{where}: task {task_id!r} has no status")
        timestamp = problem = None
        value = self._stamp.get(raw)
        if value is not MISSING and value is not None:
            try:
                timestamp = self._time.parse(value)
            except ValueError as exc:
                problem = f"timestamp ({self.config.item.timestamp.path}) does not parse: {exc}"
        fields = {}
        for name in request.match_fields:
            if name == "task_id":
                continue
            field_value = self._fields[name].get(raw)
            fields[name] = "" if field_value is MISSING or field_value is None else str(field_value)
        gone = self.config.item.gone_when is not None and self.config.item.gone_when.test(raw)
        return Task(
            task_id,
            status,
            timestamp,
            fields,
            gone=gone,
            problem=problem,
            raw=raw if request.raw else None,
        )

    @staticmethod
    def _error(
        decoded: Any, raw: bytes, code_path: str | None, message_path: str | None
    ) -> tuple[str | None, str | None]:
        code, message = error_fields(raw)
        if code_path is not None:
            value = JsonPath.parse(code_path).get(decoded)
            code = str(value)[:128] if value not in (MISSING, None) else code
        if message_path is not None:
            value = JsonPath.parse(message_path).get(decoded)
            message = str(value)[:1024] if value not in (MISSING, None) else message
        return code, message

    # -- deletion -----------------------------------------------------------------------------

    def refusal(self, task_id: str) -> str | None:
        """Why reaper will not send ``task_id``, or None."""
        why = self.invalid_id_reason(task_id)
        if why is not None:
            return f"refused: {why}"
        status = self.listed_status.get(task_id)
        if status is None:
            return "refused: the task was not in this run's listing"
        allowed = self.config.deletable_statuses
        if allowed is not None and status not in allowed:
            return f"refused: listed as {status}; only {', '.join(allowed)} may be deleted"
        return None

    async def delete(self, task_ids: Sequence[str], options: DeleteOptions) -> BatchResult:
        refused: dict[str, DeleteResult] = {}
        sendable: list[str] = []
        for task_id in task_ids:
            why = self.refusal(task_id)
            if why is None:
                sendable.append(task_id)
            else:
                refused[task_id] = DeleteResult(
                    task_id, Outcome.FAILED, error_message=why, note="not sent"
                )
        spec = self.config.delete
        if isinstance(spec, PerIdDelete):
            answer = await self.delete_each(
                sendable, lambda task_id: self._delete_one(spec, task_id)
            )
            return replace(answer, results=[*refused.values(), *answer.results])
        results = list(refused.values())
        for start in range(0, len(sendable), spec.max_ids):
            chunk = sendable[start : start + spec.max_ids]
            try:
                results.extend(await self._delete_batch(spec, chunk))
            except TargetAuthError as exc:
                results.extend(result_of_error(i, exc) for i in chunk)
                return BatchResult(results, unsent=tuple(sendable[start + len(chunk) :]), stop=exc)
            except Stale as exc:
                # Chunks already answered keep their outcomes; the rest is checked again.
                if exc.earlier:
                    results.extend(result_of_error(i, exc) for i in chunk)
                    return BatchResult(results, unsent=tuple(sendable[start + len(chunk) :]))
                return BatchResult(results, unsent=tuple(sendable[start:]))
        return BatchResult(results)

    async def _delete_one(self, spec: PerIdDelete, task_id: str) -> DeleteResult:
        url = self.config.root() + spec.path.replace("{id}", quote(task_id, safe=""))
        body = _substitute(spec.body, "{id}", task_id) if spec.body is not None else None
        exchange = await self.http.send(spec.method, url, json_body=body, headers=self._headers())
        status = exchange.status_code
        decoded = _json(exchange.body)
        code, message = self._error(decoded, exchange.body, spec.error_code, spec.error_message)
        if status in spec.success:
            if spec.ok_when is not None and not spec.ok_when.test(decoded):
                return DeleteResult(
                    task_id, Outcome.FAILED, status, code, message or "the answer reports failure"
                )
            return DeleteResult(task_id, Outcome.DELETED, status)
        if status in spec.gone:
            return gone_result(
                task_id, exchange.earlier, status, code, message, note=f"{status}: gone"
            )
        if 200 <= status < 300:
            return DeleteResult(
                task_id, Outcome.UNKNOWN, status, code, message or f"undocumented status {status}"
            )
        return DeleteResult(
            task_id, Outcome.FAILED, status, code, message or f"HTTP {status} without error body"
        )

    async def _delete_batch(self, spec: BatchDelete, ids: list[str]) -> list[DeleteResult]:
        body = _substitute(spec.body, "{ids}", list(ids))
        try:
            exchange = await self.http.send(
                spec.method, self.config.root() + spec.path, json_body=body, headers=self._headers()
            )
        except (RequestFailed, ResponseTooLarge) as exc:
            maybe = isinstance(exc, ResponseTooLarge) or exc.maybe_sent
            outcome = Outcome.UNKNOWN if maybe else Outcome.FAILED
            return [DeleteResult(i, outcome, exc.http_status, None, str(exc)) for i in ids]
        status = exchange.status_code
        decoded = _json(exchange.body)
        code, message = self._error(decoded, exchange.body, spec.error_code, spec.error_message)
        succeeded = status in spec.success and (spec.ok_when is None or spec.ok_when.test(decoded))
        if not succeeded:
            # A 2xx we cannot read may still mean the server acted.
            outcome = Outcome.UNKNOWN if 200 <= status < 300 else Outcome.FAILED
            text = message or f"HTTP {status}"
            return [DeleteResult(i, outcome, status, code, text) for i in ids]
        if isinstance(spec.result, AllOrNothing):
            return [DeleteResult(i, Outcome.DELETED, status, note="all or nothing") for i in ids]
        return _per_id(spec.result, ids, decoded, status)


def _per_id(spec: PerIdResults, ids: Sequence[str], body: Any, status: int) -> list[DeleteResult]:
    requested = set(ids)
    found: dict[str, DeleteResult] = {}
    id_path = JsonPath.parse(spec.id)
    deleted = JsonPath.parse(spec.deleted).get(body)
    failed = JsonPath.parse(spec.failed).get(body) if spec.failed else []
    if not isinstance(deleted, list) or not isinstance(failed, list):
        return [
            DeleteResult(
                i, Outcome.UNKNOWN, status, error_message="the answer lacks the per-id lists"
            )
            for i in ids
        ]

    def text(entry: Any, path: str | None) -> str | None:
        if path is None:
            return None
        value = JsonPath.parse(path).get(entry)
        return None if value is MISSING or value is None else str(value)

    for entry in deleted:
        task_id = id_path.get(entry)
        if not isinstance(task_id, str) or task_id not in requested:
            continue  # never record an outcome for an id we did not send
        if spec.failed_when is not None and spec.failed_when.test(entry):
            found[task_id] = DeleteResult(
                task_id, Outcome.FAILED, status, text(entry, spec.code), text(entry, spec.error)
            )
        elif spec.gone_when is not None and spec.gone_when.test(entry):
            found[task_id] = DeleteResult(task_id, Outcome.ALREADY_GONE, status, note="gone")
        else:
            size = JsonPath.parse(spec.bytes).get(entry) if spec.bytes else None
            files = JsonPath.parse(spec.files).get(entry) if spec.files else None
            found[task_id] = DeleteResult(
                task_id,
                Outcome.DELETED,
                status,
                reclaimed_bytes=parse_size(size) if size is not MISSING else None,
                files_count=files if type(files) is int else None,
            )
    for entry in failed:
        task_id = id_path.get(entry)
        if not isinstance(task_id, str) or task_id not in requested:
            continue
        found.setdefault(
            task_id,
            DeleteResult(
                task_id, Outcome.FAILED, status, text(entry, spec.code), text(entry, spec.error)
            ),
        )
    return [
        found.get(i)
        or DeleteResult(
            i, Outcome.UNKNOWN, status, error_message="the answer does not mention this id"
        )
        for i in ids
    ]


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return MISSING
