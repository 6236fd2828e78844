"""The one exception tree of reaper.

::

    ReaperError
    ├── ConfigError                 a policy file or a setting is wrong (exit code 2)
    │   └── PolicyError             ... with the file, policy, line and field it concerns
    ├── TargetError                 talking to a target failed
    │   ├── ListingError            the listing is incomplete or malformed: nothing is deleted
    │   ├── TargetAuthError         401/403: a configuration error that stops the policy
    │   └── TargetResponseError     an unusable answer (status, target error code and message)
    ├── AuditError                  the audit database could not be read or written: fail closed
    └── RunAborted                  a policy run was stopped on purpose (stop-on-error, a guard)

Every error carries enough context to act on it: the policy, the file and field, the task id or the
HTTP status and the target's own error code. Messages never contain secrets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "AuditError",
    "ConfigError",
    "FieldError",
    "ListingError",
    "PolicyError",
    "ReaperError",
    "RunAborted",
    "TargetAuthError",
    "TargetError",
    "TargetResponseError",
]


class ReaperError(Exception):
    """The root of every error reaper raises on purpose."""


class ConfigError(ReaperError):
    """A configuration problem: reaper refuses to start work (exit code 2)."""


@dataclass(frozen=True)
class FieldError:
    """One problem in a policy file, located as precisely as the file allows."""

    field: str
    message: str
    line: int | None = None
    column: int | None = None
    policy: str | None = None

    def render(self, path: Path | str | None) -> str:
        where = str(path) if path is not None else "<policy>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        who = f" policy {self.policy!r}" if self.policy else ""
        return f"{where}:{who} field {self.field!r}: {self.message}"


class PolicyError(ConfigError):
    """One or more policy files are invalid; each problem names file, line, policy and field."""

    def __init__(self, path: Path | str | None, errors: list[FieldError]) -> None:
        self.path = path
        self.errors = errors
        super().__init__("\n".join(e.render(path) for e in errors))


class TargetError(ReaperError):
    """Talking to a target failed."""

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> None:
        self.http_status = http_status
        self.error_code = error_code
        self.error_message = error_message
        super().__init__(message)


class ListingError(TargetError):
    """The listing could not be completed or did not make sense; the policy deletes nothing."""


class TargetAuthError(TargetError):
    """The target refused our credentials: a configuration error that stops the policy."""


class TargetResponseError(TargetError):
    """The target answered something we cannot use."""


class AuditError(ReaperError):
    """The audit database could not be written or read. No audit, no delete."""


class RunAborted(ReaperError):
    """A policy run stopped on purpose before finishing (stop-on-error, max deletions, a guard)."""
