"""Whether the ages a plan was built on can be trusted: clocks and zones, checked after a listing.

Every age is ``now`` minus a timestamp the target wrote, so a wrong clock or zone shifts all of
them at once. A data_pipeline database at UTC-5 read as UTC makes every task look 5 hours older;
a host clock a day fast makes every task of every target look a day older. Nothing in a single
task shows that, but the target's answers do, and so does the listing as a whole:

- the HTTP ``Date`` of the target's answers against this host's clock (``HttpStats.date_offsets``):
  past ``REAPER_CLOCK_SKEW_WARN`` a warning, past ``REAPER_MAX_CLOCK_SKEW`` the run is refused
  like a mass-deletion guard (``guard clock_skew``), nothing deleted;
- the server's local wall time where an answer carries one (data_pipeline's ``data.timestamp``,
  naive), read in the configured zone: an hour or more away from the time now is a warning that
  the zone is wrong (``HttpStats.local_time_offsets``);
- tasks whose age field lies in the future beyond ``REAPER_FUTURE_TOLERANCE`` are protected by
  the plan (:class:`reaper.plan.NotInFuture`); one warning per run counts them and names the
  likely cause.

What none of these can see is a zone *west* of the configured one on a target whose answers carry
no local time (its tasks look older, none in the future, and ``Date`` is UTC whatever the zone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from reaper.converters import format_duration, parse_timezone
from reaper.guards import GuardTrip, check_clock_skew, describe_offset, format_offset
from reaper.http import ClockOffsets, HttpStats
from reaper.plan import DEFAULT_FUTURE_TOLERANCE, Plan
from reaper.policy import Policy
from reaper.settings import Settings

__all__ = [
    "DEFAULT_CLOCK_SKEW_WARN",
    "DEFAULT_MAX_CLOCK_SKEW",
    "LOCAL_TIME_TOLERANCE",
    "ClockCheck",
    "ClockLimits",
    "ClockWarning",
    "check_clocks",
]

log = structlog.get_logger("reaper.clocks")

DEFAULT_CLOCK_SKEW_WARN = timedelta(minutes=5)
DEFAULT_MAX_CLOCK_SKEW = timedelta(hours=1)
#: A server's local time this far from the time now in the configured zone is a zone mismatch.
#: Zones differ by whole hours (a few by 30 or 45 minutes); below an hour so that a whole hour is
#: caught whatever the latency, and well above the clock skew the Date check warns about.
LOCAL_TIME_TOLERANCE = timedelta(minutes=45)


@dataclass(frozen=True)
class ClockLimits:
    """How much disagreement the checks accept (REAPER_FUTURE_TOLERANCE,
    REAPER_CLOCK_SKEW_WARN, REAPER_MAX_CLOCK_SKEW)."""

    future_tolerance: timedelta = DEFAULT_FUTURE_TOLERANCE
    skew_warn: timedelta = DEFAULT_CLOCK_SKEW_WARN
    max_skew: timedelta = DEFAULT_MAX_CLOCK_SKEW

    @classmethod
    def from_settings(cls, settings: Settings) -> ClockLimits:
        """The limits the process settings give."""
        return cls(settings.future_tolerance, settings.clock_skew_warn, settings.max_clock_skew)


@dataclass(frozen=True)
class ClockWarning:
    """One finding, as a structured log event and a sentence for the plan or run output."""

    event: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClockCheck:
    """What the target's answers and the plan said about clocks and zones."""

    warnings: tuple[ClockWarning, ...] = ()
    #: The clock guard, when the target's clock is too far from ours to plan anything.
    trip: GuardTrip | None = None
    #: The target's clock minus ours (median, seconds); None when no answer had a Date.
    skew: float | None = None

    def log(self) -> None:
        """One warning event per finding; a skew past the maximum too (a run then logs its
        refusal as guard_tripped, `reaper plan` only this)."""
        if self.trip is not None:
            log.warning("clock_skew", message=self.trip.message, skew_seconds=self.skew)
        for warning in self.warnings:
            log.warning(warning.event, message=warning.message, **warning.fields)


def check_clocks(policy: Policy, stats: HttpStats, plan: Plan, limits: ClockLimits) -> ClockCheck:
    """Judge the clocks behind ``plan`` from the answers counted in ``stats``."""
    dates = stats.date_offsets
    skew = dates.median()
    warnings: list[ClockWarning] = []
    trip = check_clock_skew(skew, dates.count, limits.max_skew)
    if trip is None and skew is not None and abs(skew) > limits.skew_warn.total_seconds():
        warnings.append(_skew_warning(dates, skew))
    zone = _zone_setting(policy)
    local = stats.local_time_offsets.median()
    if local is not None and abs(local) >= LOCAL_TIME_TOLERANCE.total_seconds():
        warnings.append(_zone_warning(stats.local_time_offsets, local, skew, zone))
    if plan.future_timestamps:
        warnings.append(_future_warning(policy, plan, skew, zone, limits))
    return ClockCheck(tuple(warnings), trip, skew)


def _skew_warning(dates: ClockOffsets, skew: float) -> ClockWarning:
    return ClockWarning(
        "clock_skew",
        f"the target's clock (HTTP Date) is {describe_offset(skew)} this host's (median of "
        f"{dates.count} answer(s)): every task looks {format_offset(skew)} "
        f"{'older' if skew < 0 else 'younger'} than it is; set both clocks right (NTP)",
        {
            "skew_seconds": round(skew, 1),
            "answers": dates.count,
            "smallest_seconds": round(dates.smallest, 1),
            "largest_seconds": round(dates.largest, 1),
        },
    )


def _zone_warning(
    offsets: ClockOffsets, local: float, skew: float | None, zone: str | None
) -> ClockWarning:
    name = zone or "UTC"
    now = datetime.now(UTC)
    # The zone the server's wall time is in, to the quarter hour (zones are on that grid).
    configured = _zone_offset(name, now)
    guessed = round((configured + local) / 900) * 900
    message = (
        f"the target's local time (data.timestamp) is {describe_offset(local)} the time now in "
        f"target.timestamps_timezone {name}: its timestamps are likely written at "
        f"{_utc_offset(guessed)}, not {_utc_offset(configured)}, so every task looks "
        f"{format_offset(local)} {'older' if local < 0 else 'younger'} than it is; set "
        "target.timestamps_timezone to the zone of the target's database session"
    )
    if skew is not None and abs(local - skew) < LOCAL_TIME_TOLERANCE.total_seconds():
        message += " (its HTTP Date is off by as much: its clock may be wrong rather than the zone)"
    return ClockWarning(
        "server_local_time_mismatch",
        message,
        {
            "offset_seconds": round(local),
            "answers": offsets.count,
            "timestamps_timezone": name,
            "server_utc_offset": _utc_offset(guessed),
        },
    )


def _future_warning(
    policy: Policy, plan: Plan, skew: float | None, zone: str | None, limits: ClockLimits
) -> ClockWarning:
    tolerance = limits.future_tolerance.total_seconds()
    if skew is not None and skew > tolerance:
        cause = f"this host's clock is {format_offset(skew)} behind the target's (HTTP Date)"
    else:
        where = (
            f"target.timestamps_timezone ({zone}) is west of the zone the target writes its "
            "timestamps in"
            if zone is not None
            else "the target writes timestamps ahead of its own clock"
        )
        # A host clock behind the target's would explain it too, unless the Date rules it out.
        cause = where + (
            " (this host's clock is not behind the target's, by its HTTP Date)"
            if skew is not None
            else ", or this host's clock is slow"
        )
    furthest = plan.future_furthest.total_seconds()
    return ClockWarning(
        "future_timestamps",
        f"{plan.future_timestamps} task(s) have a {policy.age_field} in the future, up to "
        f"{format_offset(furthest)} ahead (tolerance "
        f"{format_duration(limits.future_tolerance)}); they are protected, and every other age "
        f"is likely off too. Likely cause: {cause}",
        {
            "tasks": plan.future_timestamps,
            "furthest_seconds": round(furthest),
            "age_field": policy.age_field,
        },
    )


def _zone_setting(policy: Policy) -> str | None:
    """The configured zone of a target whose timestamps are naive (None: they carry offsets)."""
    zone = getattr(policy.target_config, "timestamps_timezone", None)
    return zone if isinstance(zone, str) else None


def _zone_offset(name: str, when: datetime) -> float:
    offset = when.astimezone(parse_timezone(name)).utcoffset()
    return offset.total_seconds() if offset is not None else 0.0


def _utc_offset(seconds: float) -> str:
    sign = "-" if seconds < 0 else "+"
    minutes = round(abs(seconds)) // 60
    return f"UTC{sign}{minutes // 60:02d}:{minutes % 60:02d}"
