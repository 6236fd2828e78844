"""Cron schedules, the one typed face of APScheduler 3.x (which ships no type hints)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
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
        fire: datetime | None = self.trigger.get_next_fire_time(
            None, after + timedelta(microseconds=1)
        )
        return fire


def parse_cron(expression: str, timezone: tzinfo) -> CronSchedule:
    """Parse a five-field crontab expression (minute hour day month weekday); ValueError if bad."""
    if not isinstance(expression, str) or len(expression.split()) != 5:
        raise ValueError(
            f"invalid cron expression {expression!r}: expected 5 fields "
            "(minute hour day-of-month month day-of-week), e.g. '15 3 * * *'"
        )
    try:
        trigger = CronTrigger.from_crontab(expression, timezone=timezone)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid cron expression {expression!r}: {exc}") from exc
    return CronSchedule(expression, timezone, trigger)
