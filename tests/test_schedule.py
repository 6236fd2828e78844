"""Cron schedules mean what cron means: fields, days, the policy's timezone and DST changes.

Every expected fire time below was written by hand from crontab(5) and Vixie/ISC cron's rules
(Debian's cron), with a 2026 calendar, never computed by the code under test. The rules:

- 0 and 7 are Sunday; names are accepted; ranges, steps and lists work;
- if day-of-month and day-of-week are both restricted (neither starts with ``*``), a day matching
  either one runs; otherwise both must match (``*/10`` starts with ``*``: crontab(5)'s test);
- across DST, a job with a fixed minute and hour runs at the first occurrence of a repeated wall
  time only, and right after the change when its wall time is skipped; a wildcard job (minute or
  hour starts with ``*``) runs at every real instant that matches its fields.

2026 clock changes used:
  Europe/Berlin       2026-03-29 02:00 CET -> 03:00 CEST (01:00Z); 2026-10-25 03:00 CEST -> 02:00 CET (01:00Z)
  America/New_York    2026-03-08 02:00 EST -> 03:00 EDT (07:00Z); 2026-11-01 02:00 EDT -> 01:00 EST (06:00Z)
  Australia/Lord_Howe 2026-04-05 02:00 +11 -> 01:30 +10:30 (04-04 15:00Z); 2026-10-04 02:00 +10:30 -> 02:30 +11 (10-03 15:30Z)
"""  # noqa: E501  # the table of clock changes reads better unwrapped

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise, takewhile
from zoneinfo import ZoneInfo

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from cronsim import CronSim
from hypothesis import given, settings
from hypothesis import strategies as st

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


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


# (expression, zone, start, next five fire times as local wall time with the zone's offset)
TABLE = [
    # -- fields ------------------------------------------------------------------------------
    # 0 is Sunday (APScheduler 3 read it as Monday). 2026-05-01 is a Friday.
    pytest.param(
        "45 2 * * 0", "UTC", "2026-05-01T00:00Z",
        ["2026-05-03T02:45+00:00", "2026-05-10T02:45+00:00", "2026-05-17T02:45+00:00",
         "2026-05-24T02:45+00:00", "2026-05-31T02:45+00:00"],
        id="0-is-sunday",
    ),
    # 7 is Sunday too (APScheduler 3 refused it).
    pytest.param(
        "0 0 * * 7", "UTC", "2026-05-01T00:00Z",
        ["2026-05-03T00:00+00:00", "2026-05-10T00:00+00:00", "2026-05-17T00:00+00:00",
         "2026-05-24T00:00+00:00", "2026-05-31T00:00+00:00"],
        id="7-is-sunday",
    ),
    # 1-5 is Monday to Friday (APScheduler 3: Tuesday to Saturday).
    pytest.param(
        "0 9 * * 1-5", "UTC", "2026-05-01T00:00Z",
        ["2026-05-01T09:00+00:00", "2026-05-04T09:00+00:00", "2026-05-05T09:00+00:00",
         "2026-05-06T09:00+00:00", "2026-05-07T09:00+00:00"],
        id="weekdays",
    ),
    # Day names in any case, in a list. Friday 1 May 08:30 has passed at 09:00.
    pytest.param(
        "30 8 * * MON,wed,Fri", "UTC", "2026-05-01T09:00Z",
        ["2026-05-04T08:30+00:00", "2026-05-06T08:30+00:00", "2026-05-08T08:30+00:00",
         "2026-05-11T08:30+00:00", "2026-05-13T08:30+00:00"],
        id="day-names",
    ),
    # Month names.
    pytest.param(
        "0 12 1 jan,jul *", "UTC", "2026-05-01T00:00Z",
        ["2026-07-01T12:00+00:00", "2027-01-01T12:00+00:00", "2027-07-01T12:00+00:00",
         "2028-01-01T12:00+00:00", "2028-07-01T12:00+00:00"],
        id="month-names",
    ),
    # Friday to Sunday, Sunday written as 7.
    pytest.param(
        "0 18 * * 5-7", "UTC", "2026-05-01T00:00Z",
        ["2026-05-01T18:00+00:00", "2026-05-02T18:00+00:00", "2026-05-03T18:00+00:00",
         "2026-05-08T18:00+00:00", "2026-05-09T18:00+00:00"],
        id="range-ending-on-7",
    ),
    # Steps over the whole range, over a range, and over months (1,4,7,10).
    pytest.param(
        "*/15 * * * *", "UTC", "2026-05-01T10:07:30Z",
        ["2026-05-01T10:15+00:00", "2026-05-01T10:30+00:00", "2026-05-01T10:45+00:00",
         "2026-05-01T11:00+00:00", "2026-05-01T11:15+00:00"],
        id="step",
    ),
    pytest.param(
        "5-20/5 3 * * *", "UTC", "2026-05-01T03:12Z",
        ["2026-05-01T03:15+00:00", "2026-05-01T03:20+00:00", "2026-05-02T03:05+00:00",
         "2026-05-02T03:10+00:00", "2026-05-02T03:15+00:00"],
        id="range-step",
    ),
    pytest.param(
        "0 6 1 */3 *", "UTC", "2026-05-01T00:00Z",
        ["2026-07-01T06:00+00:00", "2026-10-01T06:00+00:00", "2027-01-01T06:00+00:00",
         "2027-04-01T06:00+00:00", "2027-07-01T06:00+00:00"],
        id="month-step",
    ),
    # Sunday..Saturday stepped by 2 is Sunday, Tuesday, Thursday, Saturday.
    pytest.param(
        "0 0 * * */2", "UTC", "2026-05-01T00:00Z",
        ["2026-05-02T00:00+00:00", "2026-05-03T00:00+00:00", "2026-05-05T00:00+00:00",
         "2026-05-07T00:00+00:00", "2026-05-09T00:00+00:00"],
        id="weekday-step",
    ),
    # -- day-of-month and day-of-week ----------------------------------------------------------
    # Both restricted: the 1st, the 15th, or any Wednesday (APScheduler 3: only when both,
    # i.e. a 1st or 15th that is a Wednesday, next on 2026-07-01).
    pytest.param(
        "0 0 1,15 * 3", "UTC", "2026-05-01T00:00Z",
        ["2026-05-06T00:00+00:00", "2026-05-13T00:00+00:00", "2026-05-15T00:00+00:00",
         "2026-05-20T00:00+00:00", "2026-05-27T00:00+00:00"],
        id="day-fields-or",
    ),
    # "Friday the 13th" in cron is every 13th and every Friday; 13 May 2026 is a Wednesday.
    pytest.param(
        "0 0 13 * fri", "UTC", "2026-05-01T00:00Z",
        ["2026-05-08T00:00+00:00", "2026-05-13T00:00+00:00", "2026-05-15T00:00+00:00",
         "2026-05-22T00:00+00:00", "2026-05-29T00:00+00:00"],
        id="friday-13th-is-or",
    ),
    # Day-of-month starts with "*": not "restricted" for crontab(5), so both must match:
    # a 1st, 11th, 21st or 31st that is a Monday.
    pytest.param(
        "0 0 */10 * 1", "UTC", "2026-01-01T00:00Z",
        ["2026-05-11T00:00+00:00", "2026-06-01T00:00+00:00", "2026-08-31T00:00+00:00",
         "2026-09-21T00:00+00:00", "2026-12-21T00:00+00:00"],
        id="star-step-day-is-and",
    ),
    # The 29th of February, leap years only.
    pytest.param(
        "0 0 29 2 *", "UTC", "2026-01-01T00:00Z",
        ["2028-02-29T00:00+00:00", "2032-02-29T00:00+00:00", "2036-02-29T00:00+00:00",
         "2040-02-29T00:00+00:00", "2044-02-29T00:00+00:00"],
        id="leap-day",
    ),
    # -- macros (crontab(5): @weekly = "0 0 * * 0", @monthly = "0 0 1 * *", ...) ---------------
    pytest.param(
        "@weekly", "UTC", "2026-05-01T00:00Z",
        ["2026-05-03T00:00+00:00", "2026-05-10T00:00+00:00", "2026-05-17T00:00+00:00",
         "2026-05-24T00:00+00:00", "2026-05-31T00:00+00:00"],
        id="at-weekly",
    ),
    pytest.param(
        "@monthly", "UTC", "2026-05-01T00:00Z",
        ["2026-06-01T00:00+00:00", "2026-07-01T00:00+00:00", "2026-08-01T00:00+00:00",
         "2026-09-01T00:00+00:00", "2026-10-01T00:00+00:00"],
        id="at-monthly",
    ),
    pytest.param(
        "@yearly", "UTC", "2026-05-01T00:00Z",
        ["2027-01-01T00:00+00:00", "2028-01-01T00:00+00:00", "2029-01-01T00:00+00:00",
         "2030-01-01T00:00+00:00", "2031-01-01T00:00+00:00"],
        id="at-yearly",
    ),
    # -- Europe/Berlin ---------------------------------------------------------------------------
    # Spring forward: 02:30 does not exist on 29 March; cron runs the job right after the
    # change, at 03:00 CEST.
    pytest.param(
        "30 2 * * *", "Europe/Berlin", "2026-03-27T12:00Z",
        ["2026-03-28T02:30+01:00", "2026-03-29T03:00+02:00", "2026-03-30T02:30+02:00",
         "2026-03-31T02:30+02:00", "2026-04-01T02:30+02:00"],
        id="berlin-spring-fixed",
    ),
    # A weekly Sunday job in the skipped hour still runs that Sunday.
    pytest.param(
        "15 2 * * 0", "Europe/Berlin", "2026-03-22T12:00Z",
        ["2026-03-29T03:00+02:00", "2026-04-05T02:15+02:00", "2026-04-12T02:15+02:00",
         "2026-04-19T02:15+02:00", "2026-04-26T02:15+02:00"],
        id="berlin-spring-weekly",
    ),
    # Hours 1, 2 and 3 on the spring-forward night: 02:00 is skipped and runs at 03:00 CEST,
    # the minute 03:00 itself runs. Cron starts the job twice in that minute; here it is one
    # fire, the same slot (and a policy runs once at a time anyway).
    pytest.param(
        "0 1-3 * * *", "Europe/Berlin", "2026-03-28T23:30Z",
        ["2026-03-29T01:00+01:00", "2026-03-29T03:00+02:00", "2026-03-30T01:00+02:00",
         "2026-03-30T02:00+02:00", "2026-03-30T03:00+02:00"],
        id="berlin-spring-hours-into-the-gap",
    ),
    # Wildcard job on the spring-forward night: every 30 real minutes (00:30Z, 01:00Z, ...).
    pytest.param(
        "*/30 * * * *", "Europe/Berlin", "2026-03-29T00:10Z",
        ["2026-03-29T01:30+01:00", "2026-03-29T03:00+02:00", "2026-03-29T03:30+02:00",
         "2026-03-29T04:00+02:00", "2026-03-29T04:30+02:00"],
        id="berlin-spring-wildcard",
    ),
    # Fall back: 02:30 happens twice on 25 October; a fixed-time job runs at the first only.
    pytest.param(
        "30 2 * * *", "Europe/Berlin", "2026-10-23T12:00Z",
        ["2026-10-24T02:30+02:00", "2026-10-25T02:30+02:00", "2026-10-26T02:30+01:00",
         "2026-10-27T02:30+01:00", "2026-10-28T02:30+01:00"],
        id="berlin-fall-fixed",
    ),
    # Wildcard jobs keep their real interval through the repeated hour: 00:30Z, 01:00Z, ...
    pytest.param(
        "*/30 * * * *", "Europe/Berlin", "2026-10-25T00:10Z",
        ["2026-10-25T02:30+02:00", "2026-10-25T02:00+01:00", "2026-10-25T02:30+01:00",
         "2026-10-25T03:00+01:00", "2026-10-25T03:30+01:00"],
        id="berlin-fall-wildcard",
    ),
    pytest.param(
        "0 * * * *", "Europe/Berlin", "2026-10-24T23:30Z",
        ["2026-10-25T02:00+02:00", "2026-10-25T02:00+01:00", "2026-10-25T03:00+01:00",
         "2026-10-25T04:00+01:00", "2026-10-25T05:00+01:00"],
        id="berlin-fall-hourly",
    ),
    # -- America/New_York ------------------------------------------------------------------------
    pytest.param(
        "30 2 * * *", "America/New_York", "2026-03-07T00:00Z",
        ["2026-03-07T02:30-05:00", "2026-03-08T03:00-04:00", "2026-03-09T02:30-04:00",
         "2026-03-10T02:30-04:00", "2026-03-11T02:30-04:00"],
        id="new-york-spring-fixed",
    ),
    # Weekdays at 09:00 local across the change: 14:00Z before, 13:00Z after. 5 March: Thursday.
    pytest.param(
        "0 9 * * 1-5", "America/New_York", "2026-03-05T00:00Z",
        ["2026-03-05T09:00-05:00", "2026-03-06T09:00-05:00", "2026-03-09T09:00-04:00",
         "2026-03-10T09:00-04:00", "2026-03-11T09:00-04:00"],
        id="new-york-weekdays-across-spring",
    ),
    # A wildcard job whose only hour is skipped does not run that day (cron runs wildcard jobs
    # for the real current minute only).
    pytest.param(
        "*/20 2 * * *", "America/New_York", "2026-03-07T12:00Z",
        ["2026-03-09T02:00-04:00", "2026-03-09T02:20-04:00", "2026-03-09T02:40-04:00",
         "2026-03-10T02:00-04:00", "2026-03-10T02:20-04:00"],
        id="new-york-spring-wildcard-in-gap",
    ),
    # 01:30 happens twice on 1 November: once, at the first (EDT).
    pytest.param(
        "30 1 * * *", "America/New_York", "2026-10-31T12:00Z",
        ["2026-11-01T01:30-04:00", "2026-11-02T01:30-05:00", "2026-11-03T01:30-05:00",
         "2026-11-04T01:30-05:00", "2026-11-05T01:30-05:00"],
        id="new-york-fall-fixed",
    ),
    # A wildcard minute in the repeated hour runs in both: 05:00Z, 05:20Z, 05:40Z, 06:00Z, 06:20Z.
    pytest.param(
        "*/20 1 * * *", "America/New_York", "2026-11-01T04:30Z",
        ["2026-11-01T01:00-04:00", "2026-11-01T01:20-04:00", "2026-11-01T01:40-04:00",
         "2026-11-01T01:00-05:00", "2026-11-01T01:20-05:00"],
        id="new-york-fall-wildcard",
    ),
    # -- Australia/Lord_Howe: a 30-minute shift ------------------------------------------------
    # 02:15 is skipped on 4 October (02:00 -> 02:30): runs right after, at 02:30 +11:00.
    pytest.param(
        "15 2 * * *", "Australia/Lord_Howe", "2026-10-02T12:00Z",
        ["2026-10-03T02:15+10:30", "2026-10-04T02:30+11:00", "2026-10-05T02:15+11:00",
         "2026-10-06T02:15+11:00", "2026-10-07T02:15+11:00"],
        id="lord-howe-spring-fixed",
    ),
    # The hour after the change is whole: 03:00, 03:20 and 03:40 all run.
    pytest.param(
        "*/20 3 * * *", "Australia/Lord_Howe", "2026-10-03T12:00Z",
        ["2026-10-04T03:00+11:00", "2026-10-04T03:20+11:00", "2026-10-04T03:40+11:00",
         "2026-10-05T03:00+11:00", "2026-10-05T03:20+11:00"],
        id="lord-howe-spring-hour-after",
    ),
    # 01:45 happens twice on 5 April (02:00 +11 -> 01:30 +10:30): once, at the first.
    pytest.param(
        "45 1 * * *", "Australia/Lord_Howe", "2026-04-03T12:00Z",
        ["2026-04-04T01:45+11:00", "2026-04-05T01:45+11:00", "2026-04-06T01:45+10:30",
         "2026-04-07T01:45+10:30", "2026-04-08T01:45+10:30"],
        id="lord-howe-fall-fixed",
    ),
    # Every 15 real minutes through the repeated half hour: 14:30Z, 14:45Z, 15:00Z, ...
    pytest.param(
        "*/15 * * * *", "Australia/Lord_Howe", "2026-04-04T14:20Z",
        ["2026-04-05T01:30+11:00", "2026-04-05T01:45+11:00", "2026-04-05T01:30+10:30",
         "2026-04-05T01:45+10:30", "2026-04-05T02:00+10:30"],
        id="lord-howe-fall-wildcard",
    ),
]  # fmt: skip


HYPOTHESIS_EXPRESSIONS = [
    "30 2 * * *", "*/15 * * * *", "0 * * * *", "45 1 * * 0", "*/20 1-3 * * *", "0 0 1,15 * 3",
    "15 2,3 * * *", "@daily",
]  # fmt: skip


class TestCronTable:
    @pytest.mark.parametrize(("expression", "zone", "start", "expected"), TABLE)
    def test_next_five_fire_times(
        self, expression: str, zone: str, start: str, expected: list[str]
    ) -> None:
        """The next five fire times are cron's, as wall time and offset in the policy's zone."""
        got = fires(expression, zone, at(start), 5)
        assert all(f.tzinfo is UTC for f in got)
        local = [f.astimezone(ZoneInfo(zone)).isoformat() for f in got]
        assert local == [at(e).isoformat() for e in expected]

    @pytest.mark.parametrize(("expression", "zone", "start", "expected"), TABLE)
    def test_previous_fire_time_walks_the_table_back(
        self, expression: str, zone: str, start: str, expected: list[str]
    ) -> None:
        """Just before each fire the slot is the fire before it; at the fire it is the fire."""
        schedule = parse_cron(expression, ZoneInfo(zone))
        moments = [at(e) for e in expected]
        for before, fire in pairwise(moments):
            assert schedule.previous_fire_time(fire) == fire
            previous = schedule.previous_fire_time(fire - timedelta(microseconds=1))
            assert previous is not None
            assert previous.astimezone(ZoneInfo(zone)).isoformat() == before.isoformat()


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

    def test_start_inside_the_repeated_hour_never_goes_back(self) -> None:
        """From 02:45 CET (the second pass), a fixed 02:50 job next runs tomorrow, not at
        02:50 CEST, which is already past."""
        after = datetime(2026, 10, 25, 1, 45, tzinfo=UTC)  # 02:45 CET
        nxt = parse_cron("50 2 * * *", ZoneInfo("Europe/Berlin")).next_fire_time(after)
        assert nxt == datetime(2026, 10, 26, 1, 50, tzinfo=UTC)

    def test_datetime_utc_and_zoneinfo_utc_agree(self) -> None:
        """The validator's datetime.UTC and a policy's ZoneInfo('UTC') give the same fires."""
        start = datetime(2026, 5, 1, tzinfo=UTC)
        a = parse_cron("*/7 */5 * * 0", UTC).next_fire_times(start, 5)
        b = parse_cron("*/7 */5 * * 0", ZoneInfo("UTC")).next_fire_times(start, 5)
        assert a == b and len(a) == 5


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
            # 2026-05-20 is a Wednesday; the last Sunday was the 17th (APScheduler 3: Monday).
            (
                "45 2 * * 0",
                datetime(2026, 5, 20, tzinfo=UTC),
                datetime(2026, 5, 17, 2, 45, tzinfo=UTC),
            ),
        ],
    )
    def test_previous_fire_time_is_the_slot(
        self, expression: str, now: datetime, slot: datetime
    ) -> None:
        """A run belongs to the latest fire time at or before now."""
        assert parse_cron(expression, UTC).previous_fire_time(now) == slot

    @pytest.mark.parametrize(
        ("expression", "zone", "now", "slot"),
        [
            # 02:45 CET, the second pass: 02:50 CEST ran an hour ago (00:50Z).
            ("50 2 * * *", "Europe/Berlin", "2026-10-25T01:45Z", "2026-10-25T00:50Z"),
            # 02:05 CET: the wildcard job ran at 02:00 CET (01:00Z); at 01:59Z, at 02:45 CEST.
            ("*/15 * * * *", "Europe/Berlin", "2026-10-25T01:05Z", "2026-10-25T01:00Z"),
            ("*/15 * * * *", "Europe/Berlin", "2026-10-25T00:59Z", "2026-10-25T00:45Z"),
            # 03:10 CEST on the spring-forward day: the skipped 02:30 ran at 03:00 CEST (01:00Z).
            ("30 2 * * *", "Europe/Berlin", "2026-03-29T01:10Z", "2026-03-29T01:00Z"),
            # 01:59 CET, just before the change: the slot is yesterday's 02:30 CET.
            ("30 2 * * *", "Europe/Berlin", "2026-03-29T00:59Z", "2026-03-28T01:30Z"),
            # The 8 March run was skipped (wildcard minute in the lost hour): 7 March 02:40 EST.
            ("*/20 2 * * *", "America/New_York", "2026-03-08T12:00Z", "2026-03-07T07:40Z"),
        ],
    )
    def test_slot_across_dst(self, expression: str, zone: str, now: str, slot: str) -> None:
        """The slot on a clock-change night is the fire cron made, not a wall-clock guess."""
        assert parse_cron(expression, ZoneInfo(zone)).previous_fire_time(at(now)) == at(slot)

    @settings(max_examples=200, deadline=None)
    @given(
        expression=st.sampled_from(HYPOTHESIS_EXPRESSIONS),
        zone=st.sampled_from(["Europe/Berlin", "America/New_York", "Australia/Lord_Howe"]),
        moment=st.datetimes(
            min_value=datetime(2026, 1, 1),  # noqa: DTZ001 - hypothesis bounds are naive
            max_value=datetime(2027, 1, 1),  # noqa: DTZ001
            timezones=st.just(UTC),
        ),
    )
    def test_next_and_previous_agree(self, expression: str, zone: str, moment: datetime) -> None:
        """The slot of any moment is at or before it, and the next fire after the slot is
        after the moment: no fire lies between them."""
        schedule = parse_cron(expression, ZoneInfo(zone))
        slot = schedule.previous_fire_time(moment)
        assert slot is not None and slot <= moment
        nxt = schedule.next_fire_time(slot)
        assert nxt is not None and nxt > moment
        assert schedule.next_fire_time(moment) == nxt
        assert schedule.previous_fire_time(nxt) == nxt


# The 2026 clock changes of each zone (UTC), as listed in the module docstring; Antarctica/Troll
# changes by 2 hours (+00 <-> +02) at the EU's dates.
CHANGES = {
    "Europe/Berlin": ["2026-03-29T01:00Z", "2026-10-25T01:00Z"],
    "America/New_York": ["2026-03-08T07:00Z", "2026-11-01T06:00Z"],
    "Australia/Lord_Howe": ["2026-04-04T15:00Z", "2026-10-03T15:30Z"],
    "Antarctica/Troll": ["2026-03-29T01:00Z", "2026-10-25T01:00Z"],
}


class TestSearch:
    @pytest.mark.parametrize("zone", sorted(CHANGES))
    @pytest.mark.parametrize(
        "expression",
        ["*/7 * * * *", "0 * * * *", "30 2 * * *", "15,45 0-3 * * *", "*/20 1-3 * * *"],
    )
    def test_search_finds_every_fire_around_each_change(self, zone: str, expression: str) -> None:
        """next/previous_fire_time step through exactly the fires found by mapping every
        matching wall time of three days around each clock change to its instants."""
        schedule = parse_cron(expression, ZoneInfo(zone))
        for change in map(at, CHANGES[zone]):
            first = (change - timedelta(hours=36)).astimezone(ZoneInfo(zone)).replace(tzinfo=None)
            walls = takewhile(
                lambda w, last=first + timedelta(hours=72): w <= last,
                CronSim(schedule.fields, first - timedelta(seconds=1)),
            )
            instants = sorted({i for w in walls for i in schedule._instants(w)})
            inner = [i for i in instants if abs(i - change) < timedelta(hours=30)]
            assert len(inner) > 1
            assert [inner[0], *schedule.next_fire_times(inner[0], len(inner) - 1)] == inner
            slots = [schedule.previous_fire_time(i - timedelta(seconds=1)) for i in inner[1:]]
            assert slots == inner[:-1]


class TestParsing:
    @pytest.mark.parametrize(
        ("macro", "fields"),
        [
            ("@yearly", "0 0 1 1 *"),
            ("@annually", "0 0 1 1 *"),
            ("@monthly", "0 0 1 * *"),
            ("@weekly", "0 0 * * 0"),
            ("@daily", "0 0 * * *"),
            ("@midnight", "0 0 * * *"),
            ("@hourly", "0 * * * *"),
            ("@DAILY", "0 0 * * *"),
        ],
    )
    def test_macros_mean_their_crontab_5_definition(self, macro: str, fields: str) -> None:
        """Each @macro fires exactly when the five fields crontab(5) gives for it fire."""
        zone = ZoneInfo("Europe/Berlin")
        start = datetime(2026, 3, 20, tzinfo=UTC)
        assert parse_cron(macro, zone).next_fire_times(start, 5) == parse_cron(
            fields, zone
        ).next_fire_times(start, 5)

    @pytest.mark.parametrize(
        "expression",
        # "5/15" is read as 5-59/15 (cronsim, like croniter); some crons refuse it instead.
        ["0 0 * jan *", "0 0 * * sun,7", "*/5 1-3,22 1,15 */2 mon-fri", "5/15 * * * *",
         "0\t3 * * *", "@hourly"],
    )  # fmt: skip
    def test_good_cron(self, expression: str) -> None:
        """Names, lists, ranges, steps, tabs and macros are cron."""
        assert parse_cron(expression, UTC).expression == expression

    @pytest.mark.parametrize(
        ("expression", "message"),
        [
            ("61 3 * * *", "bad minute '61' (allowed: 0-59"),
            ("61 * * * *", "bad minute '61'"),
            ("0 24 * * *", "bad hour '24' (allowed: 0-23"),
            ("0 0 0 * *", "bad day-of-month '0' (allowed: 1-31"),
            ("0 0 32 * *", "bad day-of-month '32'"),
            ("0 0 * 13 *", "bad month '13' (allowed: 1-12 or jan-dec"),
            ("* * * * 8", "bad day-of-week '8' (allowed: 0-7 or sun-sat; 0 and 7 are Sunday"),
            ("0 0 * * monday", "bad day-of-week 'monday'"),
            ("0 0 * * mon-sun", "bad day-of-week 'mon-sun'"),  # sun is 0: a backwards range
            ("5-1 * * * *", "bad minute '5-1'"),
            ("*/0 * * * *", "bad minute '*/0'"),
            # Quartz extensions that cron does not have
            ("0 0 L * *", "bad day-of-month 'L'"),
            ("0 0 * * 5L", "bad day-of-week '5L'"),
            ("0 0 * * 5#2", "bad day-of-week '5#2'"),
            ("0 0 ? * 1", "bad day-of-month '?'"),
            ("0 0 15W * *", "bad day-of-month '15W'"),
            ("0 0 30 2 *", "day-of-month '30' never occurs in month '2'"),
            ("* * * * * *", "expected 5 fields"),
            ("* * *", "expected 5 fields"),
            ("", "expected 5 fields"),
            ("a b c d e", "bad minute 'a'"),
            ("@reboot", "@reboot is not a time"),
            ("@every 5m", "unknown macro"),
        ],
    )
    def test_bad_cron(self, expression: str, message: str) -> None:
        """Invalid expressions raise ValueError naming the expression and the bad field."""
        with pytest.raises(ValueError, match="invalid cron expression") as caught:
            parse_cron(expression, UTC)
        assert message in str(caught.value)
        assert repr(expression) in str(caught.value)


class TestTrigger:
    def test_first_fire_is_at_or_after_now(self) -> None:
        """Without a previous fire, the trigger fires at now if now is a fire time."""
        trigger = parse_cron("0 3 * * *", ZoneInfo("Europe/Berlin")).trigger
        now = datetime(2026, 5, 1, 1, 0, tzinfo=UTC)  # 03:00 CEST
        assert trigger.get_next_fire_time(None, now) == now
        later = now + timedelta(seconds=1)
        assert trigger.get_next_fire_time(None, later) == datetime(2026, 5, 2, 1, tzinfo=UTC)

    def test_missed_fires_are_reported_from_the_previous_one(self) -> None:
        """After a pause the next fire follows the previous one, so APScheduler can coalesce
        the missed runs (or drop them past the misfire grace time)."""
        trigger = parse_cron("0 * * * *", UTC).trigger
        previous = datetime(2026, 5, 1, 1, tzinfo=UTC)
        now = datetime(2026, 5, 1, 6, 30, tzinfo=UTC)
        assert trigger.get_next_fire_time(previous, now) == datetime(2026, 5, 1, 2, tzinfo=UTC)

    def test_apscheduler_runs_it_on_sunday(self) -> None:
        """A real APScheduler 3 scheduler takes the trigger; a Sunday job is due on Sunday."""
        scheduler = BackgroundScheduler(timezone=UTC)
        scheduler.start(paused=True)
        try:
            job = scheduler.add_job(print, parse_cron("45 2 * * 0", UTC).trigger, id="sunday")
            due = job.next_run_time
            assert due is not None and due.weekday() == 6  # Monday is 0, Sunday 6
            assert (due.hour, due.minute) == (2, 45)
            assert "45 2 * * 0" in str(job.trigger)
        finally:
            scheduler.shutdown(wait=False)
