"""Cron schedules: what a crontab line means in a policy's timezone, and its APScheduler trigger.

A schedule means what it means to cron (crontab(5), Vixie/ISC cron as Debian ships it):

- five fields, minute hour day-of-month month day-of-week; ``*``, lists, ranges and steps;
  ``jan``-``dec`` and ``sun``-``sat`` (any case); 0 and 7 are Sunday; ``@hourly``, ``@daily``
  (``@midnight``), ``@weekly``, ``@monthly``, ``@yearly`` (``@annually``);
- when day-of-month and day-of-week are both restricted (neither starts with ``*``), a day
  matching either one runs; otherwise both must match;
- fields are wall-clock times in the policy's timezone. Across daylight-saving changes a job with
  a fixed minute and hour (neither field starts with ``*``) runs once a night: at the first
  occurrence of a repeated time, and right after the change for a time the clocks skip. Any other
  job ("wildcard", e.g. ``*/15 * * * *``) runs at every real instant its fields match: twice in a
  repeated hour, never in a skipped one.

cronsim reads the expression and lists the matching wall-clock times (forwards and backwards);
this module turns wall times into instants by the rules above. cronsim's own DST handling is not
used: for a start inside a repeated hour it can return a time before the start, and in
half-hour zones (Australia/Lord_Howe) it skips fires of the hour after the change.

APScheduler 3 only runs the trigger: its own crontab reading numbers weekdays from Monday and
requires both day fields to match, and its maintainers keep that for all of 3.x.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

from apscheduler.triggers.base import BaseTrigger
from cronsim import CronSim, CronSimError

__all__ = ["CronSchedule", "parse_cron"]

# crontab(5): "These special time specification 'nicknames' ... are supported" with these meanings.
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")

# (name, allowed values as told to the user, names the field accepts)
_FIELDS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("minute", "0-59", ()),
    ("hour", "0-23", ()),
    ("day-of-month", "1-31", ()),
    ("month", "1-12 or jan-dec", _MONTHS),
    ("day-of-week", "0-7 or sun-sat; 0 and 7 are Sunday", _DAYS),
)
_FIELD_SYNTAX = re.compile(r"[0-9A-Za-z*,/-]+")

# Wall times and instants are out of order only across a clock change, by at most its size. The
# largest DST change in tzdata is 2 hours (Antarctica/Troll); most are 1 hour, Lord Howe's 30
# minutes. No zone changes its clock twice within this.
_MAX_SHIFT = timedelta(hours=3)
_SECOND = timedelta(seconds=1)


@dataclass(frozen=True)
class CronSchedule:
    """A crontab expression evaluated in a timezone, as cron evaluates it."""

    expression: str  # as written in the policy
    timezone: tzinfo
    fields: str  # the five fields (a macro expanded)

    @property
    def wildcard(self) -> bool:
        """Cron's "wildcard job": the minute or hour field starts with ``*``."""
        minute, hour = self.fields.split()[:2]
        return minute.startswith("*") or hour.startswith("*")

    @property
    def trigger(self) -> CronScheduleTrigger:
        """The APScheduler 3 trigger that fires on this schedule."""
        return CronScheduleTrigger(self)

    def next_fire_time(self, after: datetime) -> datetime | None:
        """The first fire time (UTC) strictly after ``after`` (aware), or None if there is none.

        UTC, not the policy's zone: an aware datetime inside a repeated hour never compares equal
        to one in another zone (PEP 495), and the slot it becomes is stored in UTC.
        """
        after = after.astimezone(UTC)
        best: datetime | None = None
        start = self._earliest_wall(after).replace(microsecond=0) - _SECOND
        for wall in CronSim(self.fields, start):
            if best is not None and wall > self._latest_wall(best):
                break  # this wall time and all later ones are instants after `best`
            for moment in self._instants(wall):
                if moment > after and (best is None or moment < best):
                    best = moment
        return best

    def next_fire_times(self, after: datetime, count: int) -> list[datetime]:
        """The next ``count`` fire times after ``after`` (fewer if the schedule ends)."""
        fires: list[datetime] = []
        while len(fires) < count and (fire := self.next_fire_time(after)) is not None:
            fires.append(fire)
            after = fire
        return fires

    def previous_fire_time(self, now: datetime) -> datetime | None:
        """The latest fire time (UTC) at or before ``now``: the slot a run at ``now`` belongs to."""
        now = now.astimezone(UTC)
        best: datetime | None = None
        # cronsim's reverse iteration starts one second before its start: this second included.
        start = self._latest_wall(now).replace(microsecond=0) + _SECOND
        for wall in CronSim(self.fields, start, reverse=True):
            if best is not None and wall < self._earliest_wall(best):
                break  # this wall time and all earlier ones are instants before `best`
            for moment in self._instants(wall):
                if moment <= now and (best is None or moment > best):
                    best = moment
        return best

    def _earliest_wall(self, moment: datetime) -> datetime:
        """The earliest wall time of any instant at or after ``moment`` (UTC)."""
        # Wall times run back only where the clocks fall back, by the change's size; one
        # change at most lies within _MAX_SHIFT.
        offset = min(self._offset(moment), self._offset(moment + _MAX_SHIFT))
        return moment.replace(tzinfo=None) + offset

    def _latest_wall(self, moment: datetime) -> datetime:
        """The latest wall time of any instant at or before ``moment`` (UTC)."""
        offset = max(self._offset(moment), self._offset(moment - _MAX_SHIFT))
        return moment.replace(tzinfo=None) + offset

    def _offset(self, moment: datetime) -> timedelta:
        offset = moment.astimezone(self.timezone).utcoffset()
        assert offset is not None  # an aware datetime in a tzinfo has one
        return offset

    def _wall(self, moment: datetime) -> datetime:
        """The naive wall-clock time of an instant in this schedule's zone."""
        # Through UTC: astimezone() to a datetime's own tzinfo returns it unchanged, even when
        # its wall time does not exist.
        return moment.astimezone(UTC).astimezone(self.timezone).replace(tzinfo=None)

    def _instants(self, wall: datetime) -> list[datetime]:
        """The instants (UTC) at which cron runs a job matching the wall time ``wall``.

        In UTC because Python compares two datetimes of the same tzinfo by wall time, ignoring
        ``fold``: the two 02:30 of a fall-back night would be equal.
        """
        first = wall.replace(tzinfo=self.timezone, fold=0).astimezone(UTC)
        if self._wall(first) == wall:
            second = wall.replace(tzinfo=self.timezone, fold=1).astimezone(UTC)
            if second != first and self.wildcard:
                return [first, second]  # a repeated time: wildcard jobs run in both hours
            return [first]  # fixed-time jobs run at the first occurrence only
        if self.wildcard:
            return []  # cron runs wildcard jobs for the current real minute only
        # A skipped time: cron runs a fixed-time job right after the change, at the first wall
        # minute that exists.
        moment = wall
        while self._wall(moment.replace(tzinfo=self.timezone)) != moment:
            moment += timedelta(minutes=1)
        return [moment.replace(tzinfo=self.timezone).astimezone(UTC)]


class CronScheduleTrigger(BaseTrigger):  # type: ignore[misc]  # APScheduler 3 is untyped
    """An APScheduler 3 trigger that fires when a ``CronSchedule`` says."""

    def __init__(self, schedule: CronSchedule) -> None:
        self.schedule = schedule

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        # As APScheduler's own CronTrigger: the first fire at or after `now`, or right after the
        # previous fire if that is earlier (the scheduler then coalesces the missed runs, or
        # drops them past the misfire grace time).
        after = now - timedelta(microseconds=1)
        if previous_fire_time is not None:
            after = min(after, previous_fire_time)
        return self.schedule.next_fire_time(after)

    def __str__(self) -> str:
        return f"cron[{self.schedule.expression!r}, {self.schedule.timezone}]"

    def __repr__(self) -> str:
        return f"<CronScheduleTrigger {self.schedule.expression!r} in {self.schedule.timezone}>"


def parse_cron(expression: str, timezone: tzinfo) -> CronSchedule:
    """Parse a crontab expression (five fields or a macro); ValueError if it is not cron."""
    if not isinstance(expression, str):
        raise ValueError(f"invalid cron expression {expression!r}: expected a string")
    fields = _expand(expression)
    # cronsim also reads Quartz-style extensions (L, W, #, seconds); cron does not.
    for value, (name, allowed, names) in zip(fields.split(), _FIELDS, strict=True):
        words = re.findall(r"[A-Za-z]+", value)
        if not _FIELD_SYNTAX.fullmatch(value) or any(w.lower() not in names for w in words):
            raise _bad_field(expression, name, value, allowed)
    try:
        CronSim(fields, datetime(2000, 1, 1))  # noqa: DTZ001  # a naive wall time, as cronsim reads them
    except CronSimError as exc:
        raise _explain(expression, fields, exc) from exc
    return CronSchedule(expression, timezone, fields)


def _expand(expression: str) -> str:
    text = expression.strip()
    if text.startswith("@"):
        if text.lower() == "@reboot":
            raise ValueError(
                f"invalid cron expression {expression!r}: @reboot is not a time; "
                "use five fields or @hourly, @daily, @weekly, @monthly, @yearly"
            )
        if text.lower() not in _MACROS:
            raise ValueError(
                f"invalid cron expression {expression!r}: unknown macro; "
                f"known: {', '.join(_MACROS)}"
            )
        return _MACROS[text.lower()]
    if len(text.split()) != 5:
        raise ValueError(
            f"invalid cron expression {expression!r}: expected 5 fields "
            "(minute hour day-of-month month day-of-week), e.g. '15 3 * * *'"
        )
    return " ".join(text.split())


def _bad_field(expression: str, name: str, value: str, allowed: str) -> ValueError:
    return ValueError(
        f"invalid cron expression {expression!r}: bad {name} {value!r} "
        f"(allowed: {allowed}, with *, lists a,b, ranges a-b and steps /n)"
    )


def _explain(expression: str, fields: str, exc: CronSimError) -> ValueError:
    """Name the field cronsim refused (its message names only the kind of field)."""
    values = fields.split()
    for index, (name, allowed, _) in enumerate(_FIELDS):
        alone = ["*"] * 5
        alone[index] = values[index]
        try:
            CronSim(" ".join(alone), datetime(2000, 1, 1))  # noqa: DTZ001  # naive, as above
        except CronSimError:
            return _bad_field(expression, name, values[index], allowed)
    # Every field is fine alone, so the days never occur: e.g. the 30th of February.
    return ValueError(
        f"invalid cron expression {expression!r}: day-of-month {values[2]!r} never occurs "
        f"in month {values[3]!r} ({exc})"
    )
