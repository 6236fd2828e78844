"""Process settings: environment variables with the ``REAPER_`` prefix, or a ``.env`` file.

Secrets (the database password) are read from the environment or from a file, never from policy
files, and are kept as ``SecretStr`` so they do not print.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from reaper.fields import Duration

__all__ = ["Settings", "credential_path", "redact_url"]


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
