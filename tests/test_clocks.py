"""Clocks and zones: an age is only as right as the clock and the zone behind it (reaper.clocks).

Expected offsets come from the zones' rules and from RFC 9110, never from the code under test:
New York is UTC-4 until the first Sunday of November (2026-11-01 06:00 UTC) and UTC-5 after it
until the second Sunday of March; Shanghai is UTC+8 and Kolkata UTC+5:30 all year; RFC 9110's
example date ``Sun, 06 Nov 1994 08:49:37 GMT`` is POSIX time 784111777.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml
from conftest import NOW, make_policy, policy_doc, sim_task
from structlog.testing import capture_logs
from test_plan import target_for

from reaper.audit import AuditStore, runs_table
from reaper.clocks import ClockLimits, check_clocks
from reaper.http import HttpStats
from reaper.metrics import Metrics
from reaper.plan import Plan, Planner, Verdict
from reaper.policy import LoadedPolicy
from reaper.runner import Mode, PolicyRun, RunStatus, build_target, plan_policy, run_policy
from reaper.simulators import DataPipelineSimulator, Faults
from reaper.simulators.data_pipeline import SimTask
from reaper.targets.base import Task

Start = Callable[..., tuple[DataPipelineSimulator, str]]

RFC_DATE = "Sun, 06 Nov 1994 08:49:37 GMT"
RFC_POSIX = 784111777
FUTURE_REASON = (
    "protected: created_at lies more than 5m in the future "
    "(check the zone of the target's timestamps and the host clock)"
)
#: 2026-10-02 15:00 UTC: 29 days 21 hours before NOW, so younger than a 30d policy. New York is
#: on EDT (UTC-4) then, so the server writes it as 2026-10-02T11:00:00.
NEARLY_30D = timedelta(days=30) - timedelta(hours=3)


def policy(url: str, zone: str = "UTC") -> LoadedPolicy:
    return make_policy(
        url, target={"type": "data_pipeline", "base_url": url, "timestamps_timezone": zone}
    )


def plan(loaded: LoadedPolicy, limits: ClockLimits | None = None) -> Plan:
    async def go() -> Plan:
        target, client = build_target(loaded)
        try:
            return await plan_policy(loaded, target, NOW, clock=limits)
        finally:
            await client.aclose()

    return asyncio.run(go())


def run(loaded: LoadedPolicy, store: AuditStore, **options: Any) -> PolicyRun:
    return asyncio.run(run_policy(loaded, store, now=NOW, **options))


def run_row(store: AuditStore, run_id: str | None) -> dict[str, Any]:
    with store.engine.connect() as connection:
        row = connection.execute(sa.select(runs_table).where(runs_table.c.id == run_id)).one()
    return dict(row._mapping)


def warnings_of(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == event]


def old_and_recent(now: datetime = NOW) -> list[SimTask]:
    """A task 40 days old and one 2 hours old at ``now``."""
    return [
        sim_task("task_20260922_120000", age=timedelta(days=40), now=now),
        sim_task("task_20261101_100000", age=timedelta(hours=2), now=now),
    ]


class TestClockOffsets:
    """Each answer's Date against our clock around the exchange (``HttpStats.observe_date``)."""

    def test_a_date_within_the_exchange_is_no_offset(self) -> None:
        """A Date (to the second) that a clock in step with ours could have written: 0."""
        stats = HttpStats()
        stats.observe_date(RFC_DATE, RFC_POSIX + 0.2, RFC_POSIX + 0.9)
        assert stats.date_offsets.median() == 0.0

    def test_a_date_ahead_is_the_middle_of_its_bounds(self) -> None:
        """Sent 300 s before the Date's second, answered 0.7 s later: the middle of that second
        minus the middle of the exchange, 299.95 s ahead."""
        stats = HttpStats()
        stats.observe_date(RFC_DATE, RFC_POSIX - 300 + 0.2, RFC_POSIX - 300 + 0.9)
        assert stats.date_offsets.median() == pytest.approx(299.95)

    def test_a_date_behind_is_negative(self) -> None:
        """Sent 300.2 s after the Date's second began: 300.05 s behind."""
        stats = HttpStats()
        stats.observe_date(RFC_DATE, RFC_POSIX + 300.2, RFC_POSIX + 300.9)
        assert stats.date_offsets.median() == pytest.approx(-300.05)

    def test_the_median_outvotes_an_odd_answer(self) -> None:
        """Two answers in step and one an hour old (a cache, say): the median is 0, the
        extremes show the odd one."""
        stats = HttpStats()
        stats.observe_date(RFC_DATE, RFC_POSIX + 0.1, RFC_POSIX + 0.2)
        stats.observe_date(RFC_DATE, RFC_POSIX + 0.3, RFC_POSIX + 0.4)
        stats.observe_date(RFC_DATE, RFC_POSIX + 3600.5, RFC_POSIX + 3600.6)
        offsets = stats.date_offsets
        assert offsets.median() == 0.0
        assert offsets.count == 3
        assert offsets.smallest == pytest.approx(-3600.05)
        assert offsets.largest == 0.0

    def test_answers_without_a_usable_date_are_ignored(self) -> None:
        """No Date, an empty one or one that does not parse: nothing is measured."""
        stats = HttpStats()
        for header in (None, "", "yesterday", "Sun, 99 Nov 1994 08:49:37 GMT"):
            stats.observe_date(header, RFC_POSIX, RFC_POSIX)
        assert stats.date_offsets.count == 0
        assert stats.date_offsets.median() is None


class TestSimulatorClockFault:
    """The simulators' ``clock_skew_s`` fault shifts the Date header they send."""

    @pytest.mark.parametrize("skew", [-86400.0, 0.0, 420.0])
    def test_the_date_header_is_shifted(self, data_pipeline: Start, skew: float) -> None:
        """The Date of an answer lies ``skew`` seconds from the client's clock, to the second."""
        _, url = data_pipeline([], faults=Faults(clock_skew_s=skew))
        before = datetime.now(UTC).timestamp()
        response = httpx.get(url + "/api/v0/data_pipeline/tasks")
        after = datetime.now(UTC).timestamp()
        date = response.headers["Date"].replace("GMT", "+0000")
        sent = datetime.strptime(date, "%a, %d %b %Y %H:%M:%S %z").timestamp()
        assert before + skew - 1 <= sent <= after + skew

    def test_a_skew_must_be_finite(self) -> None:
        """Negative skews are allowed (a clock behind); infinity or NaN are refused."""
        assert Faults(clock_skew_s=-5).clock_skew_s == -5
        for value in (math.inf, math.nan):
            with pytest.raises(ValueError, match="clock_skew_s"):
                Faults(clock_skew_s=value)


class TestDateHeader:
    """The target's clock against ours: a warning past 5 minutes, a refusal past the maximum."""

    def test_a_target_on_this_host_shows_no_skew(self, data_pipeline: Start) -> None:
        """The simulator shares our clock: skew 0, no warning."""
        _, url = data_pipeline(old_and_recent())
        result = plan(policy(url))
        assert result.clock is not None
        assert result.clock.skew == 0.0
        assert result.clock.warnings == ()
        assert result.clock.trip is None

    def test_past_the_warning_the_run_goes_ahead_and_says_so(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """A target 7 minutes ahead: deleted as planned, one clock_skew warning in the log and
        the run's output, the skew stored with the run."""
        sim, url = data_pipeline(old_and_recent(), faults=Faults(clock_skew_s=420))
        with capture_logs() as logs:
            result = run(policy(url), store)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert sim.deleted_ids == ["task_20260922_120000"]
        [event] = warnings_of(logs, "clock_skew")
        assert event["log_level"] == "warning"
        assert "is 7m ahead of this host's" in event["message"]
        assert result.warnings == [event["message"]]
        # 420 s, give or take the header's second and the latency.
        assert 419 < (result.summary.clock_skew_seconds or 0) < 421
        assert run_row(store, result.run_id)["clock_skew_seconds"] == pytest.approx(
            result.summary.clock_skew_seconds
        )

    def test_a_host_clock_a_day_fast_refuses_the_run(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """Our clock a day ahead of the target's: refused as a guard refuses, nothing deleted or
        recorded as deleted, the numbers in the error."""
        sim, url = data_pipeline(old_and_recent(), faults=Faults(clock_skew_s=-86400))
        with capture_logs() as logs:
            result = run(policy(url), store)
        assert result.status is RunStatus.REFUSED
        assert not result.ok
        assert (
            "guard clock_skew tripped: the target's clock (HTTP Date) is 1d behind this host's "
            "(median of " in (result.error or "")
        )
        assert "more than REAPER_MAX_CLOCK_SKEW (1h); every task would look 1d older" in (
            result.error or ""
        )
        assert sim.stats["delete_requests"] == 0
        assert store.rows() == []
        [tripped] = warnings_of(logs, "guard_tripped")
        assert tripped["guard"] == "clock_skew"
        row = run_row(store, result.run_id)
        assert row["status"] == "refused"
        assert -86401 < row["clock_skew_seconds"] < -86399

    def test_a_dry_run_is_refused_too(self, data_pipeline: Start, store: AuditStore) -> None:
        """No age can be trusted, so not even what would be deleted is recorded."""
        _, url = data_pipeline(old_and_recent(), faults=Faults(clock_skew_s=-86400))
        result = run(policy(url), store, mode=Mode.DRY_RUN)
        assert result.status is RunStatus.REFUSED
        assert store.rows() == []

    def test_the_maximum_is_configurable(self, data_pipeline: Start, store: AuditStore) -> None:
        """Two hours off: refused under the default 1h, deleted (with a warning) under 3h."""
        sim, url = data_pipeline(old_and_recent(), faults=Faults(clock_skew_s=-7200))
        assert run(policy(url), store).status is RunStatus.REFUSED
        result = run(policy(url), store, clock=ClockLimits(max_skew=timedelta(hours=3)))
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert sim.deleted_ids == ["task_20260922_120000"]
        assert "is 2h behind this host's" in result.warnings[0]

    def test_plan_warns_and_says_the_run_would_refuse(self, data_pipeline: Start) -> None:
        """`reaper plan` refuses nothing, but carries the guard and its numbers."""
        _, url = data_pipeline(old_and_recent(), faults=Faults(clock_skew_s=-86400))
        with capture_logs() as logs:
            result = plan(policy(url))
        assert result.clock is not None and result.clock.trip is not None
        assert result.clock.trip.guard == "clock_skew"
        assert "1d behind this host's" in result.clock.trip.message
        [event] = warnings_of(logs, "clock_skew")
        assert event["log_level"] == "warning"
        assert event["message"] == result.clock.trip.message
        assert warnings_of(logs, "guard_tripped") == []  # planning is not refused


class TestFutureTimestamps:
    """A task whose age field lies in the future is never eligible, and is counted."""

    def planner(self, tolerance: timedelta | None = None) -> Planner:
        loaded = make_policy("http://127.0.0.1:8084")
        if tolerance is None:
            return Planner(loaded, target_for(loaded), NOW)
        return Planner(loaded, target_for(loaded), NOW, future_tolerance=tolerance)

    def test_beyond_the_tolerance_it_is_protected_with_its_reason(self) -> None:
        """6 h ahead: protected and counted, the furthest noted; 4 minutes ahead is within the
        5m tolerance (the minimum age keeps it)."""
        planner = self.planner()
        planner.add(Task("task_20261101_180000", "completed", NOW + timedelta(hours=6)))
        planner.add(Task("task_20261101_120400", "completed", NOW + timedelta(minutes=4)))
        planner.add(Task("task_20260922_120000", "completed", NOW - timedelta(days=40)))
        result = planner.finish()
        assert result.counts[(Verdict.PROTECTED, FUTURE_REASON)] == 1
        assert result.counts[(Verdict.KEEP, "kept: younger than the minimum age 1h")] == 1
        assert list(result.task_ids()) == ["task_20260922_120000"]
        assert result.future_timestamps == 1
        assert result.future_furthest == timedelta(hours=6)

    def test_the_tolerance_is_a_setting(self) -> None:
        """With a 7h tolerance, 6 h ahead is not suspect (but still too young to delete)."""
        planner = self.planner(timedelta(hours=7))
        planner.add(Task("task_20261101_180000", "completed", NOW + timedelta(hours=6)))
        result = planner.finish()
        assert result.future_timestamps == 0
        assert result.counts[(Verdict.KEEP, "kept: younger than the minimum age 1h")] == 1

    def test_a_fresh_record_in_the_future_is_not_eligible_at_send_time(self) -> None:
        """The send-time re-check decides fresh records with the plan's rules: a task re-read
        with a future timestamp is not sent, whatever the record carries."""
        planner = self.planner()
        planner.add(Task("task_20260922_120000", "completed", NOW - timedelta(days=40)))
        result = planner.finish()
        assert result.decide is not None
        fresh = Task("task_20260922_120000", "completed", NOW + timedelta(hours=6))
        assert result.decide(fresh) == (Verdict.PROTECTED, FUTURE_REASON)
        assert result.decide(fresh, fields=False) == (Verdict.PROTECTED, FUTURE_REASON)

    def test_a_zone_east_of_the_configured_one_is_counted_and_explained(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """A server writing Shanghai time (UTC+8) read as UTC: a task 2 h old looks 6 h in the
        future. Counted in the summary, the run row and the metric; one warning names the zone."""
        sim, url = data_pipeline(old_and_recent(), timezone="Asia/Shanghai")
        with capture_logs() as logs:
            result = run(policy(url), store)
        assert result.status is RunStatus.SUCCEEDED, result.error
        # 40 days old looks 8 h younger: still past 30d, deleted (late, never early).
        assert sim.deleted_ids == ["task_20260922_120000"]
        assert result.summary.future_timestamps == 1
        assert run_row(store, result.run_id)["future_timestamps"] == 1
        [event] = warnings_of(logs, "future_timestamps")
        assert event["tasks"] == 1
        assert event["furthest_seconds"] == 6 * 3600
        assert "1 task(s) have a created_at in the future, up to 6h ahead" in event["message"]
        assert (
            "Likely cause: target.timestamps_timezone (UTC) is west of the zone the target "
            "writes its timestamps in (this host's clock is not behind the target's"
        ) in event["message"]
        assert event["message"] in result.warnings
        metrics = Metrics()
        metrics.observe(result, "data_pipeline")
        assert (
            metrics.registry.get_sample_value("reaper_future_timestamps", {"policy": "test-policy"})
            == 1
        )

    def test_a_host_clock_behind_the_target_is_named_as_the_cause(
        self, data_pipeline: Start
    ) -> None:
        """Tasks in the future and a target whose Date is 30 minutes ahead: the host clock."""
        tasks = [sim_task("task_20261101_113000", age=timedelta(minutes=-30))]
        _, url = data_pipeline(tasks, faults=Faults(clock_skew_s=1800))
        result = plan(policy(url))
        assert result.future_timestamps == 1
        assert result.clock is not None
        [future] = [w for w in result.clock.warnings if w.event == "future_timestamps"]
        assert "Likely cause: this host's clock is 30m behind the target's (HTTP Date)" in (
            future.message
        )


class TestServerLocalTime:
    """data_pipeline's ``data.timestamp`` (naive local time) against the configured zone."""

    def test_new_york_read_as_utc_is_a_warning(self, data_pipeline: Start) -> None:
        """The UTC-5 database read as UTC: every task looks hours older (a task 29d21h old
        becomes eligible under a 30d policy); plan warns with the zone it sees."""
        tasks = [sim_task("task_20261002_150000", age=NEARLY_30D)]
        _, url = data_pipeline(tasks, timezone="America/New_York")
        listed = httpx.get(url + "/api/v0/data_pipeline/tasks").json()["data"]["tasks"]
        assert listed[0]["created_at"] == "2026-10-02T11:00:00"  # EDT, UTC-4
        with capture_logs() as logs:
            result = plan(policy(url))
        assert list(result.task_ids()) == ["task_20261002_150000"]  # the harm a wrong zone does
        [event] = warnings_of(logs, "server_local_time_mismatch")
        # data.timestamp is the server's time now: EST (UTC-5) in winter, EDT (UTC-4) in summer.
        hours = -event["offset_seconds"] / 3600
        assert (hours, event["server_utc_offset"]) in {(5, "UTC-05:00"), (4, "UTC-04:00")}
        assert (
            f"the target's local time (data.timestamp) is {hours:.0f}h behind the time now in "
            f"target.timestamps_timezone UTC: its timestamps are likely written at "
            f"{event['server_utc_offset']}, not UTC+00:00, so every task looks {hours:.0f}h older"
        ) in event["message"]
        assert result.clock is not None
        assert [w.message for w in result.clock.warnings] == [event["message"]]

    def test_the_right_zone_keeps_the_task_and_warns_nothing(self, data_pipeline: Start) -> None:
        """timestamps_timezone America/New_York: the task is 29d21h old, kept; no warning."""
        tasks = [sim_task("task_20261002_150000", age=NEARLY_30D)]
        _, url = data_pipeline(tasks, timezone="America/New_York")
        result = plan(policy(url, "America/New_York"))
        assert result.eligible == 0
        assert result.clock is not None and result.clock.warnings == ()

    def test_a_half_hour_zone_is_named(self, data_pipeline: Start) -> None:
        """Kolkata (UTC+5:30, no DST) read as UTC: 5h30m ahead, its offset named."""
        _, url = data_pipeline(old_and_recent(), timezone="Asia/Kolkata")
        result = plan(policy(url))
        assert result.clock is not None
        [warning] = [w for w in result.clock.warnings if w.event == "server_local_time_mismatch"]
        assert warning.fields["offset_seconds"] == pytest.approx(5.5 * 3600, abs=2)
        assert warning.fields["server_utc_offset"] == "UTC+05:30"
        assert "is 5h30m ahead of the time now" in warning.message
        assert "every task looks 5h30m younger than it is" in warning.message

    def test_the_run_carries_the_warning(self, data_pipeline: Start, store: AuditStore) -> None:
        """A zone mismatch warns in `run` too; it does not refuse the run."""
        _, url = data_pipeline(old_and_recent(), timezone="America/New_York")
        result = run(policy(url), store)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert len(result.warnings) == 1
        assert "(data.timestamp) is" in result.warnings[0]

    @pytest.mark.parametrize(("minutes", "warned"), [(44, False), (46, True), (-46, True)])
    def test_under_45_minutes_is_not_a_zone(self, minutes: int, warned: bool) -> None:
        """Zones differ by whole hours (a few by half or three quarters): from 45 minutes on,
        whatever the latency, a whole hour is caught; less is a clock matter (the Date check)."""
        loaded = make_policy("http://127.0.0.1:8084")
        stats = HttpStats()
        stats.local_time_offsets.add(minutes * 60, minutes * 60)
        empty = Planner(loaded, target_for(loaded), NOW).finish()
        check = check_clocks(loaded.policy, stats, empty, ClockLimits())
        assert bool(check.warnings) is warned


# --- the command line -----------------------------------------------------------------------


def reaper(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("REAPER_")}
    return subprocess.run(
        [sys.executable, "-m", "reaper", *args],
        capture_output=True,
        text=True,
        env={**base, "REAPER_LOG_FORMAT": "json", **env},
        timeout=120,
        check=False,
    )


def workspace(tmp_path: Path, url: str, database_url: str | None = None) -> dict[str, str]:
    """A policy file for ``url``; the audit database (plan uses none: a SQLite file)."""
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(policy_doc(url)), encoding="utf-8")
    return {
        "REAPER_DATABASE_URL": database_url or f"sqlite:///{tmp_path / 'audit.db'}",
        "REAPER_POLICIES": str(tmp_path / "p.yaml"),
    }


class TestCommandLine:
    """`reaper plan` and `reaper run` show the warnings; the settings reach the checks."""

    def test_plan_json_carries_the_warnings(self, data_pipeline: Start, tmp_path: Path) -> None:
        """A zone mismatch: exit 0, the warning in the plan's JSON and in the log (stderr)."""
        # The command plans at the real time: a task 2 h old now, shown 8 h ahead.
        _, url = data_pipeline(old_and_recent(datetime.now(UTC)), timezone="Asia/Shanghai")
        result = reaper("plan", "--output", "json", env=workspace(tmp_path, url))
        assert result.returncode == 0, result.stderr
        [document] = json.loads(result.stdout)
        assert any("(data.timestamp) is 8h ahead of" in w for w in document["warnings"])
        assert any("1 task(s) have a created_at in the future" in w for w in document["warnings"])
        events = [json.loads(line)["event"] for line in result.stderr.splitlines()]
        assert "server_local_time_mismatch" in events and "future_timestamps" in events

    def test_a_plan_with_nothing_to_delete_is_a_plan_too(
        self, data_pipeline: Start, tmp_path: Path
    ) -> None:
        """Nothing eligible: still the plan's document, with its (empty) warnings."""
        recent = sim_task("task_20261101_100000", age=timedelta(hours=2), now=datetime.now(UTC))
        _, url = data_pipeline([recent])
        result = reaper("plan", "--output", "json", env=workspace(tmp_path, url))
        assert result.returncode == 0, result.stderr
        [document] = json.loads(result.stdout)
        assert document["to_delete"] == 0
        assert document["listed"] == 1
        assert document["warnings"] == []

    def test_plan_table_says_the_run_would_refuse(
        self, data_pipeline: Start, tmp_path: Path
    ) -> None:
        """A day of skew: the table output says `reaper run` would refuse, with the numbers."""
        _, url = data_pipeline(old_and_recent(), faults=Faults(clock_skew_s=-86400))
        result = reaper("plan", env=workspace(tmp_path, url))
        assert result.returncode == 0, result.stderr
        assert "test-policy: warning: `reaper run` would refuse this policy: guard clock_skew " in (
            result.stdout
        )

    def test_run_refuses_and_exits_1(
        self, data_pipeline: Start, tmp_path: Path, database_url: str
    ) -> None:
        """`reaper run --output json`: status refused, the guard's numbers, exit 1."""
        sim, url = data_pipeline(old_and_recent(), faults=Faults(clock_skew_s=-86400))
        result = reaper("run", "--output", "json", env=workspace(tmp_path, url, database_url))
        assert result.returncode == 1
        [document] = json.loads(result.stdout)
        assert document["status"] == "refused"
        assert "the target's clock (HTTP Date) is 1d behind this host's" in document["error"]
        assert document["warnings"] == []
        assert sim.stats["delete_requests"] == 0

    def test_the_maximum_skew_comes_from_the_environment(
        self, data_pipeline: Start, tmp_path: Path, database_url: str
    ) -> None:
        """REAPER_MAX_CLOCK_SKEW=3h lets a 2h skew through, with the warning in the output."""
        tasks = old_and_recent(datetime.now(UTC))  # the command runs at the real time
        sim, url = data_pipeline(tasks, faults=Faults(clock_skew_s=-7200))
        env = {**workspace(tmp_path, url, database_url), "REAPER_MAX_CLOCK_SKEW": "3h"}
        result = reaper("run", "--output", "json", env=env)
        assert result.returncode == 0, result.stderr
        [document] = json.loads(result.stdout)
        assert document["status"] == "succeeded"
        assert "is 2h behind this host's" in document["warnings"][0]
        assert -7201 < document["clock_skew_seconds"] < -7199
        assert document["future_timestamps"] == 0
        assert sim.deleted_ids == ["task_20260922_120000"]

    def test_a_warning_limit_above_the_maximum_is_a_configuration_error(
        self, tmp_path: Path
    ) -> None:
        """REAPER_CLOCK_SKEW_WARN above REAPER_MAX_CLOCK_SKEW: exit 2, naming both."""
        env = {"REAPER_CLOCK_SKEW_WARN": "2h", "REAPER_DATABASE_URL": f"sqlite:///{tmp_path}/a.db"}
        result = reaper("plan", env=env)
        assert result.returncode == 2
        assert (
            "REAPER_MAX_CLOCK_SKEW: must not be below REAPER_CLOCK_SKEW_WARN (2h)" in result.stderr
        )
