"""Timestamp formats a target's configuration can name, each turned into aware UTC.

``iso8601`` (naive values read in the configured zone), ``epoch_s`` and ``epoch_ms`` (numbers or
numeric strings), or a ``strftime`` pattern (anything containing ``%``, e.g. ``%Y%m%dT%H%M%SZ``).
A value that does not fit its format is a ValueError: the caller reports the task as unusable
rather than guessing its age.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any

from reaper.converters import as_aware_utc, parse_timestamp, parse_timezone

__all__ = ["NAMED_FORMATS", "TimeFormat", "check_format"]

NAMED_FORMATS = ("iso8601", "epoch_s", "epoch_ms")
# Epoch values outside these years are almost certainly a unit mix-up (seconds read as ms).
_EARLIEST = datetime(1990, 1, 1, tzinfo=UTC).timestamp()
_LATEST = datetime(2200, 1, 1, tzinfo=UTC).timestamp()


def check_format(value: str) -> str:
    """Validate a format name or strftime pattern (for config validators)."""
    if value in NAMED_FORMATS:
        return value
    if "%" not in value:
        raise ValueError(
            f"unknown timestamp format {value!r}; use iso8601, epoch_s, epoch_ms or a strftime "
            "pattern such as '%Y%m%dT%H%M%SZ'"
        )
    try:
        datetime(2001, 2, 3, 4, 5, 6, tzinfo=UTC).strftime(value)
    except ValueError as exc:  # pragma: no cover - platform-dependent directives
        raise ValueError(f"invalid strftime pattern {value!r}: {exc}") from exc
    return value


@dataclass(frozen=True)
class TimeFormat:
    """One configured timestamp format; :meth:`parse` returns aware UTC or raises ValueError."""

    format: str = "iso8601"
    #: The zone naive values are wall time in (values with an offset keep theirs).
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        check_format(self.format)
        parse_timezone(self.timezone)

    @property
    def zone(self) -> tzinfo:
        return parse_timezone(self.timezone)

    def parse(self, value: Any) -> datetime:
        """``value`` as aware UTC; ValueError when it does not fit the format."""
        if self.format == "iso8601":
            if not isinstance(value, str):
                raise ValueError(f"expected an ISO-8601 string, got {value!r}")
            return parse_timestamp(value, self.zone)
        if self.format in ("epoch_s", "epoch_ms"):
            return self._epoch(value)
        if not isinstance(value, str):
            raise ValueError(f"expected a string of the form {self.format!r}, got {value!r}")
        try:
            parsed = datetime.strptime(value, self.format)  # noqa: DTZ007 - zone applied below
        except ValueError as exc:
            raise ValueError(f"{value!r} does not match {self.format!r}") from exc
        return as_aware_utc(parsed, self.zone)

    def _epoch(self, value: Any) -> datetime:
        if isinstance(value, bool):
            raise ValueError(f"expected an epoch number, got {value!r}")
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise ValueError(f"expected an epoch number, got {value!r}") from None
        elif isinstance(value, int | float):
            number = float(value)
        else:
            raise ValueError(f"expected an epoch number, got {value!r}")
        if self.format == "epoch_ms":
            number /= 1000
        if not math.isfinite(number) or not _EARLIEST <= number <= _LATEST:
            unit = "milliseconds" if self.format == "epoch_ms" else "seconds"
            raise ValueError(f"{value!r} is not a plausible epoch time in {unit}")
        return datetime.fromtimestamp(number, UTC)
