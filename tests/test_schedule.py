"""Cron schedules in the policy's timezone, across daylight-saving changes (controlled clock)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from reaper.schedule import parse_cron


def fires(expression: str, zone: str, start: datetime, count: int) -> list[datetime]:
    schedule = parse_cron(expression, ZoneInfo(zone))
    result, moment = [], start
    for _ in range(count):
        nxt = schedule.next_fire_time(moment)
        assert nxt is not None
        result.append(nxt)
        moment = nxt
    return result


class TestTimezones:
    def test_fires_at_local_wall_time_across_spring_forward(self) -> None:
        """03:15 in New York stays 03:15 local when DST starts: the UTC instant moves by 1h."""
        got = fires("15 3 * * *", "America/New_York", datetime(2026, 3, 7, tzinfo=UTC), 3)
        assert [f.astimezone(UTC).hour for f in got] == [8, 7, 7]
        assert all(f.astimezone(ZoneInfo("America/New_York")).hour == 3 for f in got)

    def test_fires_once_when_clocks_fall_back(self) -> None:
        """02:30 happens twice in Berlin on 2026-10-25; the policy runs once that night."""
        got = fires("30 2 * * *", "Europe/Berlin", datetime(2026, 10, 24, 12, tzinfo=UTC), 2)
        assert [f.astimezone(UTC) for f in got] == [
            datetime(2026, 10, 25, 0, 30, tzinfo=UTC),
            datetime(2026, 10, 26, 1, 30, tzinfo=UTC),
        ]

    def test_missing_wall_time_still_fires_that_day(self) -> None:
        """02:30 does not exist in Berlin on 2026-03-29; the job still runs once that day."""
        got = fires("30 2 * * *", "Europe/Berlin", datetime(2026, 3, 28, 12, tzinfo=UTC), 2)
        assert [f.astimezone(UTC).date().day for f in got] == [29, 30]

    def test_same_expression_different_zones(self) -> None:
        """The same cron in two zones fires at different instants."""
        start = datetime(2026, 6, 1, tzinfo=UTC)
        [utc] = fires("0 3 * * *", "UTC", start, 1)
        [tokyo] = fires("0 3 * * *", "Asia/Tokyo", start, 1)
        assert utc.astimezone(UTC).hour == 3
        assert tokyo.astimezone(UTC).hour == 18


class TestSlots:
    @pytest.mark.parametrize(
        ("expression", "now", "slot"),
        [
            (
                "15 3 * * *",
                datetime(2026, 5, 2, 10, 0, tzinfo=UTC),
                datetime(2026, 5, 2, 3, 15, tzinfo=UTC),
            ),
            (
                "15 3 * * *",
                datetime(2026, 5, 2, 3, 15, tzinfo=UTC),
                datetime(2026, 5, 2, 3, 15, tzinfo=UTC),
            ),
            (
                "15 3 * * *",
                datetime(2026, 5, 2, 3, 14, 59, tzinfo=UTC),
                datetime(2026, 5, 1, 3, 15, tzinfo=UTC),
            ),
            (
                "*/5 * * * *",
                datetime(2026, 5, 2, 10, 7, 30, tzinfo=UTC),
                datetime(2026, 5, 2, 10, 5, tzinfo=UTC),
            ),
            ("0 0 1 * *", datetime(2026, 5, 20, tzinfo=UTC), datetime(2026, 5, 1, tzinfo=UTC)),
            ("0 0 29 2 *", datetime(2027, 1, 1, tzinfo=UTC), datetime(2024, 2, 29, tzinfo=UTC)),
        ],
    )
    def test_previous_fire_time_is_the_slot(
        self, expression: str, now: datetime, slot: datetime
    ) -> None:
        """A run belongs to the latest fire time at or before now."""
        assert parse_cron(expression, UTC).previous_fire_time(now) == slot

    @pytest.mark.parametrize("expression", ["61 3 * * *", "* * *", "a b c d e", ""])
    def test_bad_cron(self, expression: str) -> None:
        """Invalid expressions raise ValueError naming the expression."""
        with pytest.raises(ValueError, match="invalid cron expression"):
            parse_cron(expression, UTC)
