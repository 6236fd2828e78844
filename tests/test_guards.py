"""Mass-deletion guards trip at their boundary, delete nothing when they do, and can be raised."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from conftest import EMPTY_POLICY_HASH, NOW, make_policy, sim_task

from reaper.audit import AuditStore, RunRecord, RunSummary
from reaper.guards import GuardOverrides, check_guards
from reaper.runner import PolicyRun, RunStatus, run_policy
from reaper.simulators import DataPipelineSimulator
from reaper.simulators.data_pipeline import SimTask

Start = Callable[..., tuple[DataPipelineSimulator, str]]


def inventory(old: int, young: int = 0) -> list[SimTask]:
    tasks = [
        sim_task(f"task_20260901_{i:06d}", age=timedelta(days=40, minutes=i)) for i in range(old)
    ]
    tasks += [
        sim_task(f"task_20261031_{i:06d}", age=timedelta(hours=5, minutes=i)) for i in range(young)
    ]
    return tasks


def run(url: str, store: AuditStore, delete: dict[str, Any], **kwargs: Any) -> PolicyRun:
    loaded = make_policy(url, delete={"batch_size": 10, "rate": "500/s", **delete})
    return asyncio.run(run_policy(loaded, store, now=NOW, **kwargs))


class TestMaxDeletions:
    def test_at_the_limit_goes_ahead(self, data_pipeline: Start, store: AuditStore) -> None:
        """Exactly max_deletions eligible tasks: all are deleted."""
        sim, url = data_pipeline(inventory(10))
        result = run(url, store, {"max_deletions": 10})
        assert result.status is RunStatus.SUCCEEDED
        assert len(sim.deleted_ids) == 10

    def test_one_above_trips_and_deletes_nothing(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """One more than max_deletions: nothing is deleted, the message gives the numbers."""
        sim, url = data_pipeline(inventory(11))
        result = run(url, store, {"max_deletions": 10})
        assert result.status is RunStatus.REFUSED
        assert "guard max_deletions tripped: 11 tasks are eligible, the limit is 10" in (
            result.error or ""
        )
        assert sim.stats["delete_requests"] == 0
        assert store.rows() == []

    def test_the_command_line_raises_it(self, data_pipeline: Start, store: AuditStore) -> None:
        """--max-deletions lets one reviewed run go ahead."""
        sim, url = data_pipeline(inventory(11))
        result = run(url, store, {"max_deletions": 10}, overrides=GuardOverrides(max_deletions=11))
        assert result.status is RunStatus.SUCCEEDED
        assert len(sim.deleted_ids) == 11


class TestMaxFraction:
    def test_at_the_fraction_goes_ahead(self, data_pipeline: Start, store: AuditStore) -> None:
        """Half of the listed inventory with max_fraction 0.5: deleted."""
        sim, url = data_pipeline(inventory(10, young=10))
        result = run(url, store, {"max_fraction": 0.5})
        assert result.status is RunStatus.SUCCEEDED
        assert len(sim.deleted_ids) == 10

    def test_above_trips_and_deletes_nothing(self, data_pipeline: Start, store: AuditStore) -> None:
        """11 of 21 listed (52%) with max_fraction 0.5: refused, nothing deleted."""
        sim, url = data_pipeline(inventory(11, young=10))
        result = run(url, store, {"max_fraction": 0.5})
        assert result.status is RunStatus.REFUSED
        assert "guard max_fraction tripped: 11 of 21 listed tasks (52.4%)" in (result.error or "")
        assert sim.stats["delete_requests"] == 0

    def test_safe_defaults(self) -> None:
        """Without settings: at most 1000 deletions and at most half of the inventory."""
        from reaper.policy import DeleteSettings

        assert DeleteSettings().max_fraction == 0.5
        assert DeleteSettings().max_deletions == 1000

    def test_the_command_line_raises_it(self, data_pipeline: Start, store: AuditStore) -> None:
        """--max-fraction lets one reviewed run go ahead."""
        sim, url = data_pipeline(inventory(11, young=10))
        result = run(url, store, {"max_fraction": 0.5}, overrides=GuardOverrides(max_fraction=0.6))
        assert result.status is RunStatus.SUCCEEDED
        assert len(sim.deleted_ids) == 11


def history(store: AuditStore, *eligible: int) -> None:
    """Record finished runs of test-policy with these eligible counts (oldest first)."""
    for count in eligible:
        run_id = store.start_run(
            RunRecord("test-policy", EMPTY_POLICY_HASH, "{}", "data_pipeline", "t", "run")
        )
        store.finish_run(run_id, "succeeded", RunSummary(eligible=count))


ANOMALY = {"anomaly": {"factor": 10, "floor": 20, "history": 3}}


class TestAnomaly:
    def test_far_above_the_median_trips(self, data_pipeline: Start, store: AuditStore) -> None:
        """31 eligible against a median of 3 (x10 = 30): refused until confirmed."""
        history(store, 2, 3, 4)
        sim, url = data_pipeline(inventory(31))
        result = run(url, store, ANOMALY)
        assert result.status is RunStatus.REFUSED
        assert "guard anomaly tripped: 31 tasks are eligible, more than 10x the median (3)" in (
            result.error or ""
        )
        assert sim.stats["delete_requests"] == 0

    def test_at_the_threshold_goes_ahead(self, data_pipeline: Start, store: AuditStore) -> None:
        """30 eligible against a median of 3 is not more than 10x: deleted."""
        history(store, 2, 3, 4)
        sim, url = data_pipeline(inventory(30))
        assert run(url, store, ANOMALY).status is RunStatus.SUCCEEDED
        assert len(sim.deleted_ids) == 30

    def test_floor_protects_small_numbers(self, data_pipeline: Start, store: AuditStore) -> None:
        """20 eligible after runs of 0 is at the floor: no anomaly."""
        history(store, 0, 0, 0)
        _, url = data_pipeline(inventory(20))
        assert run(url, store, ANOMALY).status is RunStatus.SUCCEEDED

    def test_confirmation_lifts_it(self, data_pipeline: Start, store: AuditStore) -> None:
        """--confirm-anomaly lets the run go ahead."""
        history(store, 2, 3, 4)
        sim, url = data_pipeline(inventory(31))
        result = run(url, store, ANOMALY, overrides=GuardOverrides(confirm_anomaly=True))
        assert result.status is RunStatus.SUCCEEDED
        assert len(sim.deleted_ids) == 31

    def test_refused_runs_are_not_history(self, data_pipeline: Start, store: AuditStore) -> None:
        """A refused run does not raise the median: the next run trips again."""
        history(store, 2, 3, 4)
        _, url = data_pipeline(inventory(31))
        assert run(url, store, ANOMALY).status is RunStatus.REFUSED
        assert store.recent_eligible("test-policy", 3) == [4, 3, 2]
        assert run(url, store, ANOMALY).status is RunStatus.REFUSED

    def test_only_recent_runs_count(self) -> None:
        """history limits the comparison to the newest runs."""
        policy = make_policy(
            "http://x", delete={"anomaly": {"factor": 2, "floor": 0, "history": 2}}
        ).policy
        # newest first: medians of [10, 10] -> 20 allowed; the old 1000 is outside the window
        assert check_guards(policy, 21, 100, [10, 10, 1000]) is not None
        assert check_guards(policy, 20, 100, [10, 10, 1000]) is None

    def test_no_history_no_anomaly(self) -> None:
        """A policy's first run has nothing to compare with."""
        policy = make_policy("http://x", delete={"anomaly": {"floor": 0}}).policy
        assert check_guards(policy, 900, 1000, []) is None


@pytest.mark.parametrize("guard", ["max_deletions", "max_fraction"])
def test_cli_exit_code_is_1(guard: str, data_pipeline: Start, tmp_path: Any) -> None:
    """A tripped guard makes `reaper run` exit 1 and say which guard."""
    import subprocess
    import sys

    import yaml
    from conftest import policy_doc

    _, url = data_pipeline(inventory(5))
    doc = policy_doc(url)
    doc["delete"] = {"max_deletions": 4} if guard == "max_deletions" else {"max_fraction": 0.5}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "reaper", "run", "--migrate", "--policies", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin", "REAPER_DATABASE_URL": f"sqlite:///{tmp_path}/a.db"},
    )
    assert result.returncode == 1
    assert f"guard {guard} tripped" in result.stdout


@pytest.mark.parametrize("guard", ["max_deletions", "max_fraction"])
def test_plan_says_a_run_would_be_refused(guard: str, data_pipeline: Start, tmp_path: Any) -> None:
    """`reaper plan` warns, before any run, that the guard would refuse this plan; it still
    exits 0 and deletes nothing. Within the limits it says nothing about guards."""
    import json
    import subprocess
    import sys

    import yaml
    from conftest import policy_doc

    sim, url = data_pipeline(inventory(5))

    def plan(delete: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        doc = policy_doc(url)
        doc["delete"] = delete
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "reaper",
                "plan",
                "--output",
                "json",
                "--policies",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={"PATH": "/usr/bin:/bin", "REAPER_DATABASE_URL": f"sqlite:///{tmp_path}/a.db"},
        )

    tight = {"max_deletions": 4} if guard == "max_deletions" else {"max_fraction": 0.5}
    result = plan(tight)
    assert result.returncode == 0, result.stderr
    [document] = json.loads(result.stdout)
    [warning] = document["warnings"]
    assert warning.startswith("`reaper run` would refuse this policy")
    assert f"guard {guard} tripped" in warning and "approve" in warning
    loose = plan({"max_deletions": 5, "max_fraction": 1.0})
    assert json.loads(loose.stdout)[0]["warnings"] == []
    assert sim.stats["delete_requests"] == 0
