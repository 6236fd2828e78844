"""Process settings: environment variables with the ``REAPER_`` prefix, or a ``.env`` file.

Secrets (the database password) are read from the environment or from a file, never from policy
files, and are kept as ``SecretStr`` so they do not print.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

import httpx
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictInt,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from reaper.converters import format_duration
from reaper.fields import INTEGRAL, Duration, RateValue

__all__ = ["EndpointBudget", "Settings", "credential_path", "redact_url"]

_PORTS = {"http": 80, "https": 443}


class EndpointBudget(BaseModel):
    """An endpoint's request budget, given by the operator (``REAPER_ENDPOINT_BUDGETS``).

    Each field left out comes from the policies that reach the endpoint (the lowest they
    declare).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    rate: RateValue | None = Field(None, description="Requests per second, e.g. '10/s'.")
    burst: Annotated[Annotated[StrictInt, Field(ge=1, le=1000)] | None, INTEGRAL] = Field(
        None, description="Requests that may go at once after idling."
    )
    concurrency: Annotated[Annotated[StrictInt, Field(ge=1, le=1024)] | None, INTEGRAL] = Field(
        None, description="Requests in flight at once."
    )


def _origin(text: str) -> str:
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in _PORTS or not url.host:
        raise ValueError(f"{text!r} is not an http(s) URL")
    if url.userinfo or url.query or url.fragment or url.path not in ("", "/"):
        raise ValueError(f"{text!r}: name only the scheme, host and port")
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{url.scheme}://{host}:{url.port or _PORTS[url.scheme]}"


class Settings(BaseSettings):
    """Settings for every reaper command."""

    model_config = SettingsConfigDict(
        env_prefix="REAPER_", env_file=".env", extra="ignore", frozen=True
    )

    database_url: str = Field(
        "sqlite:///reaper.db",
        description="SQLAlchemy URL of the audit database (SQLite file or PostgreSQL).",
    )
    database_password: SecretStr | None = Field(
        None, description="Password for database_url, kept out of the URL."
    )
    database_password_file: Path | None = Field(
        None, description="File holding the database password (e.g. a mounted secret)."
    )
    db_auto_upgrade: bool = Field(
        False, description="Apply pending audit database migrations before running."
    )
    policies: Path = Field(Path("policies"), description="Policy file or directory.")
    min_age: Duration = Field(
        timedelta(hours=1),
        description="No policy deletes a task younger than this, whatever it says.",
    )
    future_tolerance: Duration = Field(
        timedelta(minutes=5),
        description="A task whose age field lies further than this in the future is protected.",
    )
    clock_skew_warn: Duration = Field(
        timedelta(minutes=5),
        description="Warn when a target's HTTP Date and this host's clock differ by more.",
    )
    max_clock_skew: Duration = Field(
        timedelta(hours=1),
        description="Refuse a policy run when they differ by more: no age can be trusted.",
    )
    audit_retention: Duration | None = Field(
        None, description="Prune runs and audit rows older than this after each `reaper run`."
    )
    metrics_host: str = Field("127.0.0.1", description="`serve`: address of /metrics, /healthz.")
    metrics_port: int = Field(9464, ge=0, le=65535, description="`serve`: its port (0: any).")
    shutdown_grace: Duration = Field(
        timedelta(seconds=25),
        description="On SIGTERM, how long in-flight batches may take (below Kubernetes' 30s).",
    )
    misfire_grace: Duration = Field(
        timedelta(minutes=5), description="`serve`: how late a missed run may still start."
    )
    pushgateway_url: str | None = Field(
        None, description="`run`: push metrics to this Prometheus Pushgateway when done."
    )
    metrics_file: Path | None = Field(
        None, description="`run`: write metrics here (node_exporter textfile collector)."
    )
    shard_count: int | None = Field(
        None,
        ge=1,
        le=999_999,
        description="`run --shard auto`: how many shards (the Indexed Job's spec.completions).",
    )
    lease_ttl: Duration = Field(
        timedelta(seconds=30),
        description="`serve` on PostgreSQL: how long a replica's policy leases outlive it.",
    )
    max_parallel_policies: int = Field(
        64,
        ge=1,
        le=1024,
        description="`run`, `serve`: how many policies run at once (each waits for a slot).",
    )
    # NoDecode: the JSON is read by the validator below, so bad JSON is a validation error that
    # names the setting, like any other bad value.
    endpoint_budgets: Annotated[dict[str, EndpointBudget], NoDecode] = Field(
        default_factory=dict,
        description=(
            "JSON: the request budget of an endpoint, by its URL (scheme, host, port), e.g. "
            '{"https://dcs.cn-north-4.myhuaweicloud.com": {"rate": "10/s", "concurrency": 8}}; '
            "shared by the policies reaching it with the same credentials."
        ),
    )
    notify_file: Path | None = Field(
        None,
        description="YAML list of notification sinks for every policy (see reaper.notify).",
    )
    notify_wait: Duration = Field(
        timedelta(seconds=30),
        description="`run`/`apply`: how long to wait for notifications in flight before exiting.",
    )
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("max_clock_skew")
    @classmethod
    def _skew_limits(cls, value: timedelta, info: ValidationInfo) -> timedelta:
        warn = info.data.get("clock_skew_warn")
        if isinstance(warn, timedelta) and value < warn:
            raise ValueError(
                f"must not be below REAPER_CLOCK_SKEW_WARN ({format_duration(warn)}): a skew "
                "that refuses the run would never have been warned about"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _url(cls, value: str) -> str:
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError("not a database URL; expected e.g. sqlite:///reaper.db") from None
        if url.get_backend_name() not in {"sqlite", "postgresql"}:
            raise ValueError("only sqlite and postgresql audit databases are supported")
        return value

    @field_validator("lease_ttl")
    @classmethod
    def _lease(cls, value: timedelta) -> timedelta:
        # Renewed every third of it: below a second, a busy event loop would lose its leases.
        if value < timedelta(seconds=1):
            raise ValueError("a lease lasts at least 1s")
        return value

    @field_validator("endpoint_budgets", mode="before")
    @classmethod
    def _json(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else {}
            except ValueError:
                raise ValueError(
                    'expected a JSON object, e.g. {"https://api.example.com": {"rate": "10/s"}}'
                ) from None
        return value

    @field_validator("endpoint_budgets")
    @classmethod
    def _endpoints(cls, value: dict[str, EndpointBudget]) -> dict[str, EndpointBudget]:
        budgets: dict[str, EndpointBudget] = {}
        for url, budget in value.items():
            origin = _origin(url)
            if origin in budgets:
                raise ValueError(f"{url!r}: {origin} is given twice")
            budgets[origin] = budget
        return budgets

    def database(self) -> URL:
        """The audit database URL with the password from the environment or file applied."""
        url = make_url(self.database_url)
        if url.get_backend_name() == "postgresql" and url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        password = None
        if self.database_password is not None:
            password = self.database_password.get_secret_value()
        elif self.database_password_file is not None:
            password = (
                credential_path(self.database_password_file).read_text(encoding="utf-8").strip()
            )
        if password:  # an empty file (e.g. a systemd credential left blank for SQLite): none
            url = url.set(password=password)
        return url


def credential_path(path: Path) -> Path:
    """A secret file's path; a relative one is looked up in systemd's $CREDENTIALS_DIRECTORY
    (``LoadCredential=``) when that is set, so units can name credentials by their id."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory and not path.is_absolute():
        return Path(directory) / path
    return path


def redact_url(url: URL | str) -> str:
    """Render a database URL with its password hidden."""
    if isinstance(url, str):
        try:
            url = make_url(url)
        except ArgumentError:
            return "<invalid database URL>"
    return url.render_as_string(hide_password=True)
