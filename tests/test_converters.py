"""Durations, rates, timezones and timestamps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reaper.converters import (
    as_aware_utc,
    format_duration,
    parse_duration,
    parse_rate,
    parse_size,
    parse_timestamp,
    parse_timezone,
    timestamp_parser,
)


class TestDurations:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("30d", timedelta(days=30)),
            ("12h", timedelta(hours=12)),
            ("90m", timedelta(minutes=90)),
            ("45s", timedelta(seconds=45)),
            ("2w", timedelta(weeks=2)),
            ("1w2d", timedelta(days=9)),
            ("1d12h", timedelta(hours=36)),
            ("0s", timedelta(0)),
        ],
    )
    def test_units(self, text: str, expected: timedelta) -> None:
        """Every unit s, m, h, d, w parses, alone and combined."""
        assert parse_duration(text) == expected

    @pytest.mark.parametrize("text", ["", "30", "30x", "d30", "30 d", "-5d", "1.5d", "30dd", "30D"])
    def test_bad_durations(self, text: str) -> None:
        """Anything that is not number+unit is refused with a message that shows the form."""
        with pytest.raises(ValueError, match="duration"):
            parse_duration(text)

    def test_units_in_any_order(self) -> None:
        """Units may come in any order; each is read once."""
        assert parse_duration("2d1w") == timedelta(days=9)
        assert parse_duration("30s1m") == timedelta(seconds=90)

    def test_largest_duration(self) -> None:
        """Each unit's largest count, together: about 630 years, still a timedelta."""
        assert parse_duration("9999w99999d999999h9999999m999999999s") == timedelta(
            weeks=9999, days=99999, hours=999999, minutes=9999999, seconds=999999999
        )

    @pytest.mark.parametrize(
        "text",
        [
            "1d1d",
            "12h1d3h",
            " 30d",
            "30d ",
            "30d\n",
            "10000w",
            "100000d",
            "1000000h",
            "10000000m",
            "1000000000s",
            "99999999999999999999d",
            "\u0663\u0660d",  # Arabic-Indic digits are digits to Python, not to the schema
        ],
    )
    def test_refused_beyond_the_grammar(self, text: str) -> None:
        """A repeated unit, spaces, too many digits or non-ASCII digits: a ValueError, never an
        OverflowError."""
        with pytest.raises(ValueError, match="duration"):
            parse_duration(text)

    def test_format_round_trips(self) -> None:
        """Formatted durations read back to the same value, in days rather than weeks."""
        for value in ("30d", "14d", "1d12h", "90m", "0s"):
            assert parse_duration(format_duration(parse_duration(value))) == parse_duration(value)
        assert format_duration(timedelta(days=7)) == "7d"


class TestRates:
    @pytest.mark.parametrize(
        ("text", "per_second"),
        [
            ("5/s", 5.0),
            ("300/m", 5.0),
            ("3600/h", 1.0),
            ("0.5/s", 0.5),
            (20, 20.0),
            ("0.5/sec", 0.5),
            ("2/second", 2.0),
            ("300/min", 5.0),
            ("120/minute", 2.0),
            ("7200/hour", 2.0),
            ("999999999/s", 999999999.0),
            ("0.000000001/s", 1e-9),
            (0.25, 0.25),
        ],
    )
    def test_rates(self, text: str | int, per_second: float) -> None:
        """Rates per second, minute and hour all become requests per second."""
        assert parse_rate(text).per_second == pytest.approx(per_second)

    @pytest.mark.parametrize(
        "text",
        [
            "5",
            "0/s",
            "5/d",
            "fast",
            "-1/s",
            "0.0/s",
            "5 / s",
            " 5/s",
            "5/s\n",
            ".5/s",
            "5./s",
            "1e3/s",
            "5/S",
            "1000000000/s",
            "0.0000000001/s",
            "9" * 400 + "/s",
        ],
    )
    def test_bad_rates(self, text: str) -> None:
        """Unitless strings, zero, unknown units and counts beyond nine digits are refused."""
        with pytest.raises(ValueError, match="rate"):
            parse_rate(text)

    @pytest.mark.parametrize(
        "number", [0, -1, 1e-10, 1_000_000_000, float("inf"), float("nan"), True]
    )
    def test_bad_bare_numbers(self, number: float) -> None:
        """A bare number is per second, from 1e-9 up to (not including) 1e9; never a boolean."""
        with pytest.raises(ValueError, match="rate"):
            parse_rate(number)


class TestTimestamps:
    def test_naive_is_read_in_the_configured_zone(self) -> None:
        """A naive server timestamp is wall time in the target's zone, not UTC or local time."""
        parsed = parse_timestamp("2025-07-02T22:57:21.317708", ZoneInfo("Asia/Shanghai"))
        assert parsed == datetime(2025, 7, 2, 14, 57, 21, 317708, tzinfo=UTC)

    def test_aware_keeps_its_offset(self) -> None:
        """An explicit offset or Z wins over the configured zone."""
        zone = ZoneInfo("Asia/Shanghai")
        assert parse_timestamp("2020-06-17T07:38:42.503Z", zone) == datetime(
            2020, 6, 17, 7, 38, 42, 503000, tzinfo=UTC
        )
        assert parse_timestamp("2020-06-17T09:38:42+02:00", zone).hour == 7

    def test_dst_gap_and_fold(self) -> None:
        """Wall times in a DST gap or fold resolve deterministically (fold=0)."""
        zone = ZoneInfo("America/New_York")
        # 2025-11-02 01:30 happens twice; fold=0 is the first (EDT, UTC-4).
        assert parse_timestamp("2025-11-02T01:30:00", zone).hour == 5
        # 2025-03-09 02:30 does not exist; zoneinfo maps it with the pre-gap offset (UTC-5).
        assert parse_timestamp("2025-03-09T02:30:00", zone).hour == 7

    @pytest.mark.parametrize("text", ["", "yesterday", "2025-07-02", "2025-13-02T00:00:00", "17"])
    def test_garbage_is_refused(self, text: str) -> None:
        """Dates without a time and non-timestamps raise ValueError."""
        with pytest.raises(ValueError, match="timestamp"):
            parse_timestamp(text)

    @given(
        value=st.datetimes(),
        zone=st.sampled_from(["UTC", "Asia/Shanghai", "America/New_York", "Europe/Dublin"]),
        sep=st.sampled_from(["T", " "]),
    )
    def test_naive_values_in_any_zone(self, value: datetime, zone: str, sep: str) -> None:
        """A naive timestamp is the wall time in the zone: the same instant, in UTC, as the
        zone-attached value, through parse_timestamp and timestamp_parser alike."""
        text = value.isoformat(sep=sep)
        expected = value.replace(tzinfo=ZoneInfo(zone)).astimezone(UTC)
        for parsed in (
            parse_timestamp(text, ZoneInfo(zone)),
            timestamp_parser(ZoneInfo(zone))(text),
        ):
            assert parsed == expected
            assert parsed.tzinfo is UTC
            assert parsed.replace(tzinfo=None) == expected.replace(tzinfo=None)

    @given(
        value=st.datetimes(
            timezones=st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m)))
        )
    )
    def test_aware_values_keep_their_instant(self, value: datetime) -> None:
        """A timestamp with an offset is that instant, whatever the configured zone."""
        text = value.isoformat()
        for zone in (UTC, ZoneInfo("UTC"), ZoneInfo("Asia/Shanghai")):
            parsed = timestamp_parser(zone)(text)
            assert parsed == value
            assert parsed.tzinfo is UTC

    @given(value=st.datetimes())
    def test_as_aware_utc_of_naive_values(self, value: datetime) -> None:
        """as_aware_utc reads a naive value in UTC as the same wall time, aware."""
        for zone in (UTC, ZoneInfo("UTC")):
            converted = as_aware_utc(value, zone)
            assert converted == value.replace(tzinfo=UTC)
            assert converted.tzinfo is UTC

    def test_parser_refuses_what_parse_timestamp_refuses(self) -> None:
        """A fixed-zone parser raises the same ValueError for garbage and bare dates."""
        parse = timestamp_parser(ZoneInfo("UTC"))
        for text in ("", "yesterday", "2025-07-02", "2025-13-02T00:00:00", 17):
            with pytest.raises(ValueError, match="timestamp"):
                parse(text)  # type: ignore[arg-type]

    def test_unknown_zone(self) -> None:
        """Unknown zone names are refused."""
        with pytest.raises(ValueError, match="unknown timezone"):
            parse_timezone("Mars/Olympus")


class TestSizes:
    @pytest.mark.parametrize(
        ("text", "size"),
        [
            ("2.5 MB", int(2.5 * 1024**2)),
            ("512.0 B", 512),
            ("0 B", 0),
            ("1 GB", 1024**3),
            (42, 42),
            ("garbage", None),
            (None, None),
        ],
    )
    def test_sizes(self, text: str | int | None, size: int | None) -> None:
        """The server's formatted sizes become bytes (1024-based); unknown forms become None."""
        assert parse_size(text) == size
