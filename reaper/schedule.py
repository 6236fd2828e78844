"""Cron schedules, the one typed face of APScheduler 3.x (which ships no type hints)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from apscheduler.triggers.cron import CronTrigger

__all__ = ["CronSchedule", "parse_cron"]


@dataclass(frozen=True)
class CronSchedule:
    """A five-field crontab expression evaluated in a timezone."""

    expression: str
    timezone: tzinfo
    trigger: Any  # apscheduler.triggers.cron.CronTrigger

    def next_fire_time(self, after: datetime) -> datetime | None:
        """The first fire time strictly after ``after`` (aware), or None if there is none."""
        after = after.astimezone(UTC)  # see _WallClockCronTrigger: step in UTC
        fire: datetime | None = self.trigger.get_next_fire_time(
            after, after + timedelta(microseconds=1)
        )
        return fire

    def previous_fire_time(self, now: datetime) -> datetime | None:
        """The latest fire time at or before ``now``: the slot a run at ``now`` belongs to."""
        for back in (
            timedelta(minutes=1),
            timedelta(hours=1),
            timedelta(days=1),
            timedelta(days=32),
            timedelta(days=367),
            timedelta(days=366 * 5),
        ):
            fire = self.next_fire_time(now - back)
            if fire is not None and fire <= now:
                while (after := self.next_fire_time(fire)) is not None and after <= now:
                    fire = after
                return fire
        return None


class _WallClockCronTrigger(CronTrigger):  # type: ignore[misc]  # APScheduler 3 is untyped
    """A cron trigger that fires once per wall-clock time, as cron does.

    When clocks fall back, APScheduler 3 fires a daily "30 2 * * *" twice (02:30 CEST and 02:30
    CET); a retention job should run once that night. A fire whose local wall time equals the
    previous fire's is skipped.
    """

    def get_next_fire_time(self, previous: datetime | None, now: datetime) -> datetime | None:
        fire: datetime | None = super().get_next_fire_time(previous, now)
        if (
            fire is not None
            and previous is not None
            and _wall(fire) == _wall(previous.astimezone(fire.tzinfo))
        ):
            # Step in UTC: wall-clock arithmetic on the repeated hour would land on its first
            # occurrence again (PEP 495: arithmetic drops `fold`).
            after = fire.astimezone(UTC) + timedelta(microseconds=1)
            fire = super().get_next_fire_time(after, after)
        return fire


def _wall(moment: datetime) -> datetime:
    return moment.replace(tzinfo=None)


def parse_cron(expression: str, timezone: tzinfo) -> CronSchedule:
    """Parse a five-field crontab expression (minute hour day month weekday); ValueError if bad."""
    if not isinstance(expression, str) or len(expression.split()) != 5:
        raise ValueError(
            f"invalid cron expression {expression!r}: expected 5 fields "
            "(minute hour day-of-month month day-of-week), e.g. '15 3 * * *'"
        )
    try:
        trigger = _WallClockCronTrigger.from_crontab(expression, timezone=timezone)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid cron expression {expression!r}: {exc}") from exc
    return CronSchedule(expression, timezone, trigger)
