"""`reaper validate`: each policy checked, with its next fire times as cron would run them.

Expected fire times are written by hand from cron's rules and a 2026 calendar (2026-05-01 is a
Friday; Berlin's clocks go forward on 2026-03-29 at 01:00Z), never computed by reaper.schedule.
"""

from __future__ import annotations

import json
import re
import textwrap
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from reaper import cli as cli_module
from reaper.policy import load_policies

EXAMPLES = Path(__file__).resolve().parent.parent / "policies"
UTC_ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:00Z$")


def policy(name: str, schedule: str | None = None, timezone: str | None = None) -> str:
    """A minimal valid policy, as one item of a YAML list."""
    text = f"- name: {name}\n"
    if schedule is not None:
        text += f'  schedule: "{schedule}"\n'
    if timezone is not None:
        text += f"  timezone: {timezone}\n"
    return text + textwrap.indent(
        "target: {type: data_pipeline, base_url: 'http://127.0.0.1:8084'}\n"
        "select: {status: [completed], older_than: 30d}\n",
        "  ",
    )


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A CLI runner in an empty directory (validate touches no database and no target)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REAPER_DATABASE_URL", f"sqlite:///{tmp_path / 'audit.db'}")
    return CliRunner()


def validate(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(cli_module.cli, ["validate", *args])


def as_json(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    entries: list[dict[str, Any]] = json.loads(result.stdout)
    return entries


class TestJson:
    def test_one_entry_per_example_policy_with_five_utc_times(self, runner: CliRunner) -> None:
        """Every example policy has an entry with exactly the four documented keys."""
        entries = as_json(validate(runner, "--output", "json", str(EXAMPLES)))
        assert [e["name"] for e in entries] == [p.name for p in load_policies([EXAMPLES])]
        for entry in entries:
            assert set(entry) == {"name", "schedule", "timezone", "next_runs"}
            assert len(entry["next_runs"]) == 5
            assert all(UTC_ISO.match(t) for t in entry["next_runs"])

    def test_the_weekly_dcs_policy_runs_on_sundays(self, runner: CliRunner) -> None:
        """policies/huawei_dcs.yaml's "45 2 * * 0" runs on Sundays (it ran on Mondays)."""
        entries = as_json(
            validate(runner, "--output", "json", "--after", "2026-05-01T00:00Z", str(EXAMPLES))
        )
        [weekly] = [e for e in entries if e["name"] == "dcs-tasks-token-90d"]
        assert weekly == {
            "name": "dcs-tasks-token-90d",
            "schedule": "45 2 * * 0",
            "timezone": "UTC",
            "next_runs": [
                "2026-05-03T02:45:00Z",
                "2026-05-10T02:45:00Z",
                "2026-05-17T02:45:00Z",
                "2026-05-24T02:45:00Z",
                "2026-05-31T02:45:00Z",
            ],
        }
        [daily] = [e for e in entries if e["name"] == "pipeline-finished-30d"]
        assert daily["next_runs"] == [
            "2026-05-01T03:15:00Z",
            "2026-05-02T03:15:00Z",
            "2026-05-03T03:15:00Z",
            "2026-05-04T03:15:00Z",
            "2026-05-05T03:15:00Z",
        ]

    def test_times_are_utc_for_a_policy_in_a_dst_zone(
        self, runner: CliRunner, tmp_path: Path
    ) -> None:
        """02:30 Berlin: 01:30Z in winter, 00:30Z in summer; the skipped 29 March run happens
        right after the change (03:00 CEST, 01:00Z)."""
        path = tmp_path / "p.yaml"
        path.write_text(policy("berlin", "30 2 * * *", "Europe/Berlin"))
        [entry] = as_json(
            validate(runner, "--output", "json", "--after", "2026-03-27T12:00Z", str(path))
        )
        assert entry == {
            "name": "berlin",
            "schedule": "30 2 * * *",
            "timezone": "Europe/Berlin",
            "next_runs": [
                "2026-03-28T01:30:00Z",
                "2026-03-29T01:00:00Z",
                "2026-03-30T00:30:00Z",
                "2026-03-31T00:30:00Z",
                "2026-04-01T00:30:00Z",
            ],
        }

    def test_a_policy_without_schedule(self, runner: CliRunner, tmp_path: Path) -> None:
        """No schedule: "schedule" is null and "next_runs" is empty."""
        path = tmp_path / "p.yaml"
        path.write_text(policy("manual") + policy("weekdays", "0 9 * * 1-5"))
        entries = as_json(
            validate(runner, "--output", "json", "--after", "2026-05-01T09:00Z", str(path))
        )
        assert entries == [
            {"name": "manual", "schedule": None, "timezone": "UTC", "next_runs": []},
            {
                "name": "weekdays",
                "schedule": "0 9 * * 1-5",
                "timezone": "UTC",
                # Friday 09:00 is not after 09:00; then Monday to Friday.
                "next_runs": [
                    "2026-05-04T09:00:00Z",
                    "2026-05-05T09:00:00Z",
                    "2026-05-06T09:00:00Z",
                    "2026-05-07T09:00:00Z",
                    "2026-05-08T09:00:00Z",
                ],
            },
        ]

    def test_default_is_after_now(self, runner: CliRunner, tmp_path: Path) -> None:
        """Without --after the times follow the current time: every minute, from the next."""
        path = tmp_path / "p.yaml"
        path.write_text(policy("minutely", "* * * * *"))
        before = datetime.now(UTC)
        [entry] = as_json(validate(runner, "--output", "json", str(path)))
        after = datetime.now(UTC)
        runs = [datetime.fromisoformat(t) for t in entry["next_runs"]]
        assert before < runs[0] <= after + timedelta(minutes=1)
        assert [b - a for a, b in pairwise(runs)] == [timedelta(minutes=1)] * 4

    @pytest.mark.parametrize(
        ("schedule", "message"),
        [
            ("61 * * * *", "bad minute '61'"),
            ("* * * * 8", "bad day-of-week '8'"),
            ("0 0 * * * *", "expected 5 fields"),
            ("@reboot", "@reboot is not a time"),
        ],
    )
    def test_bad_cron_is_a_located_config_error(
        self, runner: CliRunner, tmp_path: Path, schedule: str, message: str
    ) -> None:
        """A bad schedule exits 2 naming file, line, policy and field; stdout stays empty."""
        path = tmp_path / "p.yaml"
        path.write_text(policy("good") + policy("broken", schedule))
        result = validate(runner, "--output", "json", str(path))
        assert result.exit_code == 2
        assert result.stdout == ""
        assert f"{path}:5:" in result.stderr  # the second policy's schedule line
        assert "policy 'broken' field 'schedule'" in result.stderr
        assert message in result.stderr

    def test_bad_after_is_a_usage_error(self, runner: CliRunner) -> None:
        """--after takes a full ISO-8601 time."""
        result = validate(runner, "--after", "yesterday", str(EXAMPLES))
        assert result.exit_code == 2
        assert "--after" in result.stderr


class TestTable:
    def test_ok_line_then_times_in_the_zone_and_utc(
        self, runner: CliRunner, tmp_path: Path
    ) -> None:
        """The `ok` line stays; three fire times follow, local with the UTC time beside."""
        path = tmp_path / "p.yaml"
        path.write_text(policy("berlin", "30 2 * * *", "Europe/Berlin") + policy("manual"))
        result = validate(runner, "--after", "2026-03-27T12:00Z", str(path))
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines() == [
            f"ok  berlin  ({path}:1, data_pipeline)",
            "    schedule '30 2 * * *' in Europe/Berlin:",
            "      Sat 2026-03-28 02:30 CET  (2026-03-28 01:30 UTC)",
            "      Sun 2026-03-29 03:00 CEST  (2026-03-29 01:00 UTC)",
            "      Mon 2026-03-30 02:30 CEST  (2026-03-30 00:30 UTC)",
            f"ok  manual  ({path}:6, data_pipeline)",
            "    no schedule: runs only when `reaper run` is started",
        ]

    def test_utc_policies_show_one_time(self, runner: CliRunner) -> None:
        """In UTC the local time is the UTC time: no second column."""
        result = validate(runner, "--after", "2026-05-01T00:00Z", str(EXAMPLES / "huawei_dcs.yaml"))
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        start = lines.index("    schedule '45 2 * * 0' in UTC:")
        assert lines[start + 1 : start + 4] == [
            "      Sun 2026-05-03 02:45 UTC",
            "      Sun 2026-05-10 02:45 UTC",
            "      Sun 2026-05-17 02:45 UTC",
        ]
