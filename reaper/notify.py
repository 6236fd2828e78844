"""Notifications: events about runs, sent to webhooks beside the deletion, never in its way.

A policy's ``notify:`` list, and the file ``REAPER_NOTIFY_FILE`` names for every policy, list
sinks. The one kind so far is ``webhook``: each event is POSTed as JSON signed as the Standard
Webhooks specification says (https://www.standardwebhooks.com): ``webhook-id`` (one per event,
the same on every retry and for every sink), ``webhook-timestamp`` (Unix seconds, of the attempt)
and ``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, keyed with the
base64-decoded part of a ``whsec_...`` secret read from ``secret_env`` or ``secret_file``. With
``format: slack`` the body is ``{"text": ...}`` for a Slack (or compatible) incoming webhook.

Events, each naming the policy and the run: ``plan.held`` (a guard tripped and the plan is held),
``run.failed`` (failures, unknown outcomes, aborted), ``run.summary`` (deleted, reclaimed, top
reasons), ``deletions.not_carried_out`` (acknowledged deletions a listing contradicted) and
``deletions.upcoming`` (tasks newly noticed under ``delete.notice``).

Delivery runs in background tasks: :meth:`Notifier.send` returns at once, a failing or slow
receiver never delays or fails a run. Each attempt has a timeout; 429, 5xx, timeouts and
connection errors are retried with exponential backoff; other answers end the delivery. Every
delivery and its outcome is recorded in ``reaper_deliveries`` and counted in
``reaper_notifications_total{policy,event,outcome}``. Secrets (and URLs read from ``url_env`` /
``url_file``, which may carry one, as Slack's do) are registered for log redaction and never
recorded; deliveries are recorded by sink name (default: the URL's host).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import structlog
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import Column, Index, Integer, String, Table, Text, insert, select
from sqlalchemy.exc import SQLAlchemyError

from reaper.audit import AuditStore, metadata
from reaper.db import UTCDateTime, short_error
from reaper.errors import AuditError
from reaper.logs import redact_secrets
from reaper.sinks import EventKind, Resolved, WebhookSink, load_sinks, resolve

if TYPE_CHECKING:
    from reaper.policy import LoadedPolicy

__all__ = [
    "MAX_IDS",
    "Delivery",
    "Event",
    "Notifier",
    "deliveries",
    "deliveries_table",
    "id_list",
    "record_delivery",
    "sign",
]

log = structlog.get_logger("reaper.notify")

#: At most this many task ids are listed in one event (the count is always complete).
MAX_IDS = 100

deliveries_table = Table(
    "reaper_deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False),
    Column("event", String(32), nullable=False),
    Column("policy", String(128), nullable=False),
    Column("run_id", String(36)),
    Column("sink", String(255), nullable=False),
    Column("format", String(16), nullable=False),
    # delivered, failed (refused, or out of attempts), abandoned (the process was stopping)
    Column("outcome", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("http_status", Integer),
    Column("error", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=False),
    Index(None, "policy", "created_at"),
)


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """Something about one run of one policy, for the sinks that asked for its kind."""

    kind: EventKind
    policy: str
    run_id: str | None
    data: Mapping[str, Any]
    id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def payload(self) -> dict[str, Any]:
        """The Standard Webhooks payload shape: type, timestamp, data."""
        return {
            "type": self.kind,
            "timestamp": self.at.isoformat(),
            "data": {"policy": self.policy, "run_id": self.run_id, **self.data},
        }

    def text(self) -> str:
        """One message for a person (Slack)."""
        data, run = self.data, self.run_id or "(not started)"
        head = f"reaper: policy {self.policy}, run {run}: "
        if self.kind == "plan.held":
            return head + (
                f"a guard ({data['guard']}) refused deleting {data['eligible']} of "
                f"{data['listed']} tasks; the plan is held. Review: `reaper held show {run}`, "
                f"then `reaper approve {run} --by NAME` or `reaper reject {run}`."
            )
        if self.kind == "run.failed":
            return (
                head
                + (
                    f"{data['status']}: {data['failed']} failed, {data['unknown']} unknown, "
                    f"{data['deleted']} deleted. {data['error'] or ''}"
                ).rstrip()
            )
        if self.kind == "run.summary":
            reasons = "; ".join(f"{r['count']} {r['reason']}" for r in data["top_reasons"])
            return head + (
                f"{data['status']}: deleted {data['deleted']} of {data['eligible']} eligible "
                f"({data['listed']} listed), reclaimed {data['reclaimed_bytes']} bytes"
                + (f". Top reasons: {reasons}" if reasons else "")
            )
        if self.kind == "deletions.not_carried_out":
            return head + (
                f"{data['count']} deletion(s) the target acknowledged were not carried out "
                f"(still listed): {_ids_text(data)}; they are eligible again."
            )
        return head + (
            f"{data['count']} task(s) noticed for deletion, due {data['due_at']} if still "
            f"eligible then: {_ids_text(data)}"
        )

    def body(self, fmt: str) -> bytes:
        content: Any = self.payload() if fmt == "standard" else {"text": self.text()}
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()


def _ids_text(data: Mapping[str, Any]) -> str:
    shown = ", ".join(data["task_ids"])
    more = data["count"] - len(data["task_ids"])
    return shown + (f" and {more} more" if more > 0 else "")


def id_list(ids: Iterable[str]) -> list[str]:
    """The first :data:`MAX_IDS` ids, for an event."""
    listed: list[str] = []
    for task_id in ids:
        if len(listed) == MAX_IDS:
            break
        listed.append(task_id)
    return listed


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """``webhook-signature`` as the Standard Webhooks specification defines it."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return f"v1,{base64.b64encode(digest).decode()}"


# --- delivery ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """How one event went to one sink."""

    event: Event
    sink: str
    format: str
    outcome: str
    attempts: int
    http_status: int | None
    error: str | None
    started: datetime
    finished: datetime


#: Answers worth another attempt; any other non-2xx answer ends the delivery.
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class Notifier:
    """Sends events to sinks in background tasks, records every delivery, never raises."""

    def __init__(
        self,
        sinks: Sequence[WebhookSink] = (),
        *,
        store: AuditStore | None = None,
        registry: CollectorRegistry | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        #: Sinks for every policy (REAPER_NOTIFY_FILE), resolved now: a missing secret is a
        #: configuration error before anything runs.
        self.shared = [resolve(sink, f"notify sink {i}") for i, sink in enumerate(sinks)]
        self.store = store
        self.transport = transport
        self.sleep = sleep
        self.counter = _counter(registry if registry is not None else CollectorRegistry())
        self._own: dict[tuple[WebhookSink, ...], list[Resolved]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None
        #: Every delivery made, in the order they ended (for `reaper run`'s report and tests).
        self.deliveries: list[Delivery] = []

    def register(self, registry: CollectorRegistry) -> None:
        """Count deliveries in ``registry`` (the process's metrics) from now on."""
        self.counter = _counter(registry)

    @classmethod
    def from_settings(
        cls,
        notify_file: Path | None,
        store: AuditStore | None,
        registry: CollectorRegistry | None = None,
    ) -> Notifier:
        """The notifier of a command: REAPER_NOTIFY_FILE's sinks for every policy."""
        return cls(load_sinks(notify_file) if notify_file else (), store=store, registry=registry)

    def sinks_for(self, loaded: LoadedPolicy) -> list[Resolved]:
        """Every sink an event of ``loaded`` goes to: the shared ones, then the policy's own."""
        own = tuple(loaded.policy.notify)
        if own not in self._own:
            self._own[own] = [
                resolve(sink, f"policy {loaded.name!r}: notify.{i}") for i, sink in enumerate(own)
            ]
        return [*self.shared, *self._own[own]]

    def send(self, loaded: LoadedPolicy, event: Event) -> None:
        """Deliver ``event`` to the sinks that want it, in the background; returns at once."""
        try:
            sinks = [s for s in self.sinks_for(loaded) if event.kind in s.config.events]
            for sink in sinks:
                task = asyncio.get_running_loop().create_task(self._deliver(sink, event))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except Exception as exc:  # a notification never fails a run
            log.error(
                "notification_not_sent", policy=event.policy, event_type=event.kind, error=str(exc)
            )

    @property
    def pending(self) -> int:
        """Deliveries still in flight."""
        return len(self._tasks)

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for deliveries in flight; abandon the rest."""
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=5)
                log.warning("notifications_abandoned", count=len(late), waited=timeout)
        await self.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=self.transport,
                follow_redirects=False,
                headers={"User-Agent": "reaper/0.1"},
            )
        return self._client

    async def _deliver(self, sink: Resolved, event: Event) -> None:
        try:
            await self._send(sink, event)
        except Exception as exc:  # never raised into the event loop, never into a run
            log.error("notification_failed", policy=event.policy, sink=sink.name, error=str(exc))

    async def _send(self, sink: Resolved, event: Event) -> None:
        config = sink.config
        body = event.body(config.format)
        started = datetime.now(UTC)
        attempts, status, error, outcome = 0, None, None, "failed"
        try:
            for attempt in range(1, config.attempts + 1):
                attempts = attempt
                status, error = await self._attempt(sink, event, body)
                if status is not None and 200 <= status < 300:
                    outcome, error = "delivered", None
                    break
                if status is not None and status not in _RETRY_STATUSES:
                    break
                if attempt < config.attempts:
                    await self.sleep(_backoff(config, attempt))
        except asyncio.CancelledError:
            outcome, error = "abandoned", "the process stopped before the delivery ended"
            await self._record(sink, event, outcome, attempts, status, error, started)
            raise
        await self._record(sink, event, outcome, attempts, status, error, started)

    async def _attempt(
        self, sink: Resolved, event: Event, body: bytes
    ) -> tuple[int | None, str | None]:
        """One POST; its status, or None and what went wrong."""
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": event.id,
            "webhook-timestamp": str(timestamp),
        }
        if sink.key is not None:
            headers["webhook-signature"] = sign(sink.key, event.id, timestamp, body)
        try:
            response = await self._http().post(
                sink.url, content=body, headers=headers, timeout=sink.config.timeout.total_seconds()
            )
        except httpx.HTTPError as exc:
            # The exception's text may hold the URL; only its kind is kept.
            return None, type(exc).__name__
        return response.status_code, None if response.is_success else f"HTTP {response.status_code}"

    async def _record(
        self,
        sink: Resolved,
        event: Event,
        outcome: str,
        attempts: int,
        status: int | None,
        error: str | None,
        started: datetime,
    ) -> None:
        delivery = Delivery(
            event,
            sink.name,
            sink.config.format,
            outcome,
            attempts,
            status,
            _scrub(error),
            started,
            datetime.now(UTC),
        )
        self.deliveries.append(delivery)
        self.counter.labels(event.policy, event.kind, outcome).inc()
        logger = log.info if outcome == "delivered" else log.warning
        logger(
            "notification",
            policy=event.policy,
            run_id=event.run_id,
            event_type=event.kind,
            event_id=event.id,
            sink=sink.name,
            outcome=outcome,
            attempts=attempts,
            http_status=status,
            error=delivery.error,
        )
        if self.store is not None:
            try:
                await asyncio.to_thread(record_delivery, self.store, delivery)
            except AuditError as exc:
                log.error("delivery_not_recorded", error=str(exc))


def _counter(registry: CollectorRegistry) -> Counter:
    return Counter(
        "reaper_notifications",
        "Notification deliveries, by event and outcome (delivered, failed, abandoned).",
        ["policy", "event", "outcome"],
        registry=registry,
    )


def _backoff(config: WebhookSink, attempt: int) -> float:
    delay: float = config.backoff.total_seconds() * 2 ** (attempt - 1)
    delay = min(delay, config.max_backoff.total_seconds())
    return delay * random.uniform(0.8, 1.0)  # noqa: S311 - jitter, not cryptography


def _scrub(text: str | None) -> str | None:
    if text is None:
        return None
    return str(redact_secrets(None, "", {"text": text})["text"])


def record_delivery(store: AuditStore, delivery: Delivery) -> None:
    """Insert one delivery row (AuditError on failure)."""
    event = delivery.event
    try:
        with store.engine.begin() as connection:
            connection.execute(
                insert(deliveries_table).values(
                    event_id=event.id,
                    event=event.kind,
                    policy=event.policy,
                    run_id=event.run_id,
                    sink=delivery.sink,
                    format=delivery.format,
                    outcome=delivery.outcome,
                    attempts=delivery.attempts,
                    http_status=delivery.http_status,
                    error=delivery.error,
                    created_at=delivery.started,
                    finished_at=delivery.finished,
                )
            )
    except SQLAlchemyError as exc:
        raise AuditError(f"recording a notification delivery failed: {short_error(exc)}") from None


def deliveries(store: AuditStore, *, policy: str | None = None) -> list[dict[str, Any]]:
    """Recorded deliveries, oldest first."""
    query = select(deliveries_table).order_by(deliveries_table.c.id)
    if policy is not None:
        query = query.where(deliveries_table.c.policy == policy)
    try:
        with store.engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]
    except SQLAlchemyError as exc:
        raise AuditError(f"reading notification deliveries failed: {short_error(exc)}") from None
