"""Converters from raw configuration and target values to typed, UTC-aware values.

Everything inward of the policy loader and the target modules sees ``timedelta``, aware UTC
``datetime`` and ``Rate`` objects only; the raw strings stop here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "DURATION_PATTERN",
    "RATE_NUMBER_LIMIT",
    "RATE_NUMBER_MIN",
    "RATE_PATTERN",
    "Rate",
    "as_aware_utc",
    "format_duration",
    "parse_duration",
    "parse_rate",
    "parse_size",
    "parse_timestamp",
    "parse_timezone",
    "timestamp_parser",
]

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_PART = re.compile(r"([0-9]+)([smhdw])")

#: The durations the loader reads, as a JSON Schema (ECMA-262) pattern: numbers with a unit, each
#: unit at most once. The digit limits keep the longest one (about 630 years) inside what a
#: ``timedelta`` and ``now - duration`` can hold; the policy schema publishes this same pattern.
DURATION_PATTERN = (
    r"^(?!.*w.*w)(?!.*d.*d)(?!.*h.*h)(?!.*m.*m)(?!.*s.*s)"
    r"([0-9]{1,4}w|[0-9]{1,5}d|[0-9]{1,6}h|[0-9]{1,7}m|[0-9]{1,9}s)+$"
)
_DURATION_RE = re.compile(DURATION_PATTERN)


def parse_duration(text: str) -> timedelta:
    """Parse ``30d``, ``12h``, ``1w2d`` or ``90s`` into a timedelta (units s, m, h, d, w)."""
    if not isinstance(text, str):
        raise ValueError(f"expected a duration such as '30d', got {type(text).__name__}")
    if not text:
        raise ValueError("empty duration; use e.g. '30d', '12h', '90m' (units s, m, h, d, w)")
    # fullmatch: a pattern's ``$`` would also match before a final newline.
    if not _DURATION_RE.fullmatch(text):
        raise ValueError(
            f"invalid duration {text!r}; use a number and a unit, e.g. '30d', '12h', '1w2d' "
            "(units s, m, h, d, w), each unit at most once and at most 9999w, 99999d, "
            "999999h, 9999999m or 999999999s"
        )
    seconds = sum(
        int(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(text)
    )
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """Render a timedelta the way policies write it (``30d``, ``1w2d``, ``90m``)."""
    seconds = int(value.total_seconds())
    if seconds == 0:
        return "0s"
    parts = []
    # Days, not weeks: "14d" reads better than "2w" next to policies written in days.
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


@dataclass(frozen=True)
class Rate:
    """A request rate: ``per_second`` requests each second."""

    per_second: float

    @property
    def interval(self) -> float:
        """Seconds between two evenly spaced requests."""
        return 1.0 / self.per_second

    def __str__(self) -> str:
        return f"{self.per_second:g}/s"


_RATE_UNITS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
}
#: The rates the loader reads as text, as a JSON Schema (ECMA-262) pattern: a count above zero
#: (the lookahead wants a non-zero digit) with at most nine digits either side of the point, so
#: it is always a finite, non-zero float; the policy schema publishes this same pattern.
RATE_PATTERN = r"^(?=[0-9.]*[1-9])[0-9]{1,9}(\.[0-9]{1,9})?/(" + "|".join(_RATE_UNITS) + r")$"
_RATE_RE = re.compile(RATE_PATTERN)
#: A bare number is requests per second, in the range a written count can have.
RATE_NUMBER_MIN = 1e-9
RATE_NUMBER_LIMIT = 1_000_000_000  # exclusive


def parse_rate(text: str | float | int) -> Rate:
    """Parse ``5/s``, ``300/m``, ``300/min`` or ``1000/h`` (a bare number means per second)."""
    if isinstance(text, bool):
        raise ValueError("expected a rate such as '5/s'")
    if isinstance(text, int | float):
        if not RATE_NUMBER_MIN <= text < RATE_NUMBER_LIMIT:  # NaN fails this too
            raise ValueError(
                "a bare rate (requests per second) must be at least 0.000000001 and below "
                "1000000000; or write it with a unit, e.g. '5/s'"
            )
        return Rate(float(text))
    if not isinstance(text, str):
        raise ValueError("expected a rate such as '5/s'")
    if not _RATE_RE.fullmatch(text):  # fullmatch: ``$`` would also match before a newline
        raise ValueError(
            f"invalid rate {text!r}; write a count above zero (up to 9 digits each side of the "
            "point) and a unit, e.g. '5/s', '0.5/sec', '300/min' or '1000/h'"
        )
    count, unit = text.split("/")
    return Rate(float(count) / _RATE_UNITS[unit])


def parse_timezone(name: str) -> ZoneInfo:
    """Return the IANA zone ``name`` (e.g. ``Asia/Shanghai``, ``UTC``) or raise ValueError."""
    if not isinstance(name, str) or not name:
        raise ValueError("expected an IANA timezone name such as 'UTC' or 'Europe/Berlin'")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown timezone {name!r}; use an IANA name such as 'UTC'") from exc


# A naive value plus the UTC epoch minus the naive epoch is the same value, aware in UTC: two C
# operations, six times cheaper than ``replace(tzinfo=UTC)`` (whose keyword parsing dominates).
_NAIVE_EPOCH = datetime(1970, 1, 1)  # noqa: DTZ001 - naive on purpose, see above
_UTC_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _is_utc(zone: tzinfo) -> bool:
    return zone is UTC or getattr(zone, "key", None) == "UTC"


def as_aware_utc(value: datetime, naive_tz: tzinfo = UTC) -> datetime:
    """Return ``value`` in UTC; a naive value is read as wall time in ``naive_tz``."""
    return _to_utc(value, naive_tz, _is_utc(naive_tz))


def _to_utc(value: datetime, naive_tz: tzinfo, naive_is_utc: bool) -> datetime:
    zone = value.tzinfo
    if zone is None:
        if naive_is_utc:
            return _UTC_EPOCH + (value - _NAIVE_EPOCH)  # the common case, on the hot path
        value = value.replace(tzinfo=naive_tz)
    elif zone is UTC:
        return value
    return value.astimezone(UTC)


def parse_timestamp(text: str, naive_tz: tzinfo = UTC) -> datetime:
    """Parse an ISO-8601 timestamp into aware UTC; naive values are wall time in ``naive_tz``.

    Raises ValueError for anything that is not a complete date and time. This is on the hot path
    of every listing (a million calls for a million tasks), hence the cheap checks first; a
    listing parses with :func:`timestamp_parser`, which fixes the zone once.
    """
    return _parse_timestamp(text, naive_tz, _is_utc(naive_tz))


def timestamp_parser(naive_tz: tzinfo = UTC) -> Callable[[str], datetime]:
    """:func:`parse_timestamp` with the zone fixed, for parsing a whole listing."""
    utc = _is_utc(naive_tz)

    def parse(text: str) -> datetime:
        return _parse_timestamp(text, naive_tz, utc)

    return parse


def _parse_timestamp(text: str, naive_tz: tzinfo, naive_is_utc: bool) -> datetime:
    if not isinstance(text, str):
        raise ValueError(f"expected an ISO-8601 timestamp string, got {type(text).__name__}")
    # A bare date would silently mean midnight: a retention tool wants the full timestamp.
    if len(text) < 16 or text[10] not in "Tt ":
        text = text.strip()
        if len(text) < 16 or text[10] not in "Tt ":
            raise ValueError(f"not a full ISO-8601 timestamp: {text!r}")
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        if not text.endswith(("Z", "z")):
            raise ValueError(f"not an ISO-8601 timestamp: {text!r}") from None
        try:
            parsed = datetime.fromisoformat(text[:-1] + "+00:00")
        except ValueError:
            raise ValueError(f"not an ISO-8601 timestamp: {text!r}") from None
    return _to_utc(parsed, naive_tz, naive_is_utc)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?i?B|bytes?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "BYTE": 1,
    "BYTES": 1,
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
    "T": 1024**4,
    "P": 1024**5,
}


def parse_size(text: str | int | float | None) -> int | None:
    """Parse a formatted size such as ``"2.5 MB"`` into bytes (1024-based); None if unknown."""
    if text is None or isinstance(text, bool):
        return None
    if isinstance(text, int | float):
        return int(text) if text >= 0 else None
    match = _SIZE_RE.match(text)
    if not match:
        return None
    unit = (match.group(2) or "").upper()
    key = unit if unit in _SIZE_UNITS else unit[:1]
    return int(float(match.group(1)) * _SIZE_UNITS[key])
