"""Where notifications go: the sink settings of a policy's ``notify:`` list and of the file
``REAPER_NOTIFY_FILE`` names, validated strictly, and their secrets read (reaper.notify sends).

A sink names its secrets by environment variable or file, never by value: the ``whsec_...``
signing secret (``secret_env``/``secret_file``) and, for URLs that carry a secret themselves
(Slack's), the URL (``url_env``/``url_file``). Values read are registered for log redaction.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from reaper.errors import ConfigError, FieldError, PolicyError
from reaper.fields import Duration
from reaper.logs import register_secret
from reaper.targets.huawei import read_secret
from reaper.yamlfile import YamlError, read_documents

if TYPE_CHECKING:
    from reaper.policy import LoadedPolicy

__all__ = [
    "EVENTS",
    "EventKind",
    "Resolved",
    "Sink",
    "WebhookSink",
    "load_sinks",
    "resolve",
    "sink_problems",
]

EventKind = Literal[
    "plan.held",
    "run.failed",
    "run.summary",
    "deletions.not_carried_out",
    "deletions.upcoming",
]
EVENTS: tuple[EventKind, ...] = (
    "plan.held",
    "run.failed",
    "run.summary",
    "deletions.not_carried_out",
    "deletions.upcoming",
)


class WebhookSink(BaseModel):
    """``type: webhook``: POST each event to ``url``, signed (Standard Webhooks)."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, hide_input_in_errors=True
    )

    type: Literal["webhook"]
    name: str | None = Field(
        None,
        max_length=255,
        description="How deliveries to it are recorded (default: the URL's host).",
    )
    url: str | None = Field(None, description="http(s) URL to POST events to.")
    url_env: str | None = Field(
        None, description="Environment variable holding the URL (when it carries a secret)."
    )
    url_file: str | None = Field(None, description="File holding the URL.")
    secret_env: str | None = Field(
        None, description="Environment variable holding the whsec_... signing secret."
    )
    secret_file: str | None = Field(None, description="File holding the whsec_... secret.")
    format: Literal["standard", "slack"] = Field(
        "standard",
        description='standard: the event as JSON, signed; slack: {"text": ...} (signed if a '
        "secret is given).",
    )
    events: tuple[EventKind, ...] = Field(EVENTS, min_length=1, description="Events to send.")
    timeout: Duration = Field(
        timedelta(seconds=10),
        description="Timeout of one attempt.",
        json_schema_extra={"default": "10s"},
    )
    attempts: int = Field(5, ge=1, le=20, description="Attempts per event, the first included.")
    backoff: Duration = Field(
        timedelta(seconds=1),
        description="First delay before a retry; doubles per attempt.",
        json_schema_extra={"default": "1s"},
    )
    max_backoff: Duration = Field(
        timedelta(seconds=60),
        description="Longest delay between attempts.",
        json_schema_extra={"default": "60s"},
    )

    @model_validator(mode="after")
    def _sources(self) -> WebhookSink:
        given = [name for name in ("url", "url_env", "url_file") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError("give exactly one of url, url_env, url_file")
        if self.secret_env and self.secret_file:
            raise ValueError("give at most one of secret_env, secret_file")
        if self.format == "standard" and not (self.secret_env or self.secret_file):
            raise ValueError(
                "a standard webhook is signed: give secret_env or secret_file (a whsec_ secret)"
            )
        if self.url is not None:
            _check_url(self.url)
        return self


Sink = WebhookSink


def _check_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise ValueError("not a URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("expected an http:// or https:// URL with a host")
    return parsed


@dataclass(frozen=True)
class Resolved:
    """A sink with its secrets read: what a delivery needs."""

    name: str
    url: str
    key: bytes | None
    config: WebhookSink = field(repr=False)


def _key(secret: str, what: str) -> bytes:
    """The HMAC key of a ``whsec_...`` secret: the base64 after the prefix."""
    encoded = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{what}: not a whsec_ secret (base64 after 'whsec_')") from None
    if not key:
        raise ConfigError(f"{what}: the secret is empty")
    return key


def resolve(sink: WebhookSink, where: str) -> Resolved:
    """Read a sink's URL and secret (ConfigError naming the variable or file, never a value)."""
    url = sink.url
    if url is None:
        url = read_secret(sink.url_env, sink.url_file, f"{where}: webhook url").get_secret_value()
        try:
            _check_url(url)
        except ValueError as exc:
            source = sink.url_env or sink.url_file
            raise ConfigError(f"{where}: webhook url from {source}: {exc}") from None
    key = None
    if sink.secret_env or sink.secret_file:
        secret = read_secret(sink.secret_env, sink.secret_file, f"{where}: webhook secret")
        key = _key(secret.get_secret_value(), f"{where}: webhook secret")
        register_secret(secret.get_secret_value().removeprefix("whsec_"))
    host = httpx.URL(url).host
    return Resolved(sink.name or host, url, key, sink)


_SINKS = TypeAdapter(list[WebhookSink])


def load_sinks(path: Path) -> list[WebhookSink]:
    """Read ``REAPER_NOTIFY_FILE``: a YAML (or JSON) list of sinks for every policy. Problems are
    a PolicyError naming the file, line and field."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(path, [FieldError("<file>", f"cannot read the file: {exc}")]) from None
    try:
        documents = read_documents(text)
    except YamlError as exc:
        field_ = ".".join(str(p) for p in exc.path) or "<yaml>"
        raise PolicyError(path, [FieldError(field_, exc.message, exc.line, exc.column)]) from None
    sinks: list[WebhookSink] = []
    errors: list[FieldError] = []
    for document in documents:
        if document.data is None:
            continue
        try:
            sinks.extend(_SINKS.validate_python(document.data))
        except ValidationError as exc:
            for error in exc.errors():
                loc = tuple(error["loc"])
                position = document.position(loc)
                message = str(error["msg"]).removeprefix("Value error, ")
                if error["type"] == "extra_forbidden":
                    message = "unknown key (check its spelling and indentation)"
                errors.append(
                    FieldError(
                        ".".join(str(p) for p in loc) or "<sinks>",
                        message,
                        position[0] if position else None,
                        position[1] if position else None,
                    )
                )
    if errors:
        raise PolicyError(path, errors)
    return sinks


def sink_problems(loaded: LoadedPolicy) -> list[str]:
    """Why the secrets of a policy's own sinks cannot be read (checked before anything runs)."""
    problems = []
    for index, sink in enumerate(loaded.policy.notify):
        try:
            resolve(sink, f"policy {loaded.name!r}: notify.{index}")
        except ConfigError as exc:
            problems.append(str(exc))
    return problems
