"""Configured timestamp formats: every value becomes aware UTC or is refused."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from reaper.timeformats import TimeFormat, check_format

WHEN = datetime(2025, 7, 2, 14, 57, 21, tzinfo=UTC)


class TestTimeFormat:
    @pytest.mark.parametrize(
        ("fmt", "zone", "value"),
        [
            ("iso8601", "UTC", "2025-07-02T14:57:21Z"),
            ("iso8601", "Asia/Shanghai", "2025-07-02T22:57:21"),
            ("epoch_s", "UTC", WHEN.timestamp()),
            ("epoch_s", "UTC", str(int(WHEN.timestamp()))),
            ("epoch_ms", "UTC", int(WHEN.timestamp() * 1000)),
            ("%Y%m%dT%H%M%SZ", "UTC", "20250702T145721Z"),
            ("%d/%m/%Y %H:%M:%S", "Europe/Berlin", "02/07/2025 16:57:21"),
        ],
    )
    def test_parses_to_aware_utc(self, fmt: str, zone: str, value: object) -> None:
        """Each format, naive values read in the configured zone."""
        assert TimeFormat(fmt, zone).parse(value) == WHEN

    @pytest.mark.parametrize(
        ("fmt", "value"),
        [
            ("iso8601", "2025-07-02"),
            ("iso8601", 1751468241),
            ("epoch_s", True),
            ("epoch_s", "soon"),
            ("epoch_s", 1751468241000),  # milliseconds read as seconds: implausible
            ("epoch_ms", 1751468241),  # seconds read as milliseconds: 1970
            ("%Y%m%dT%H%M%SZ", "2025-07-02T14:57:21Z"),
        ],
    )
    def test_refuses_what_does_not_fit(self, fmt: str, value: object) -> None:
        """A value that does not fit its format is a ValueError, never a guess."""
        with pytest.raises(ValueError):
            TimeFormat(fmt).parse(value)

    def test_unknown_format(self) -> None:
        """Only the named formats or a strftime pattern are accepted."""
        with pytest.raises(ValueError, match="unknown timestamp format"):
            check_format("unix")
