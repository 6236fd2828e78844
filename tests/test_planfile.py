"""Saved plans: review, then apply exactly that, and only what is still eligible (real CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import policy_doc, sim_task

from reaper.simulators import DataPipelineSimulator

Start = Callable[..., tuple[DataPipelineSimulator, str]]


def reaper(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("REAPER_")}
    return subprocess.run(
        [sys.executable, "-m", "reaper", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**base, "REAPER_LOG_FORMAT": "json", **env},
    )


@pytest.fixture
def setup(data_pipeline: Start, tmp_path: Path, database_url: str) -> dict[str, Any]:
    """A simulator with 10 old tasks, a policy for it, and a saved plan of that policy."""
    now = datetime.now(UTC)
    tasks = [
        sim_task(f"task_20260901_{i:06d}", age=timedelta(days=40, minutes=i), now=now)
        for i in range(10)
    ]
    sim, url = data_pipeline(tasks)
    (tmp_path / "policies").mkdir()
    policy = tmp_path / "policies" / "p.yaml"
    policy.write_text(yaml.safe_dump(policy_doc(url)), encoding="utf-8")
    env = {"REAPER_DATABASE_URL": database_url, "REAPER_POLICIES": str(tmp_path / "policies")}
    plan = tmp_path / "plan.json"
    saved = reaper("plan", "--save", str(plan), env=env)
    assert saved.returncode == 0, saved.stderr
    return {
        "sim": sim,
        "url": url,
        "env": env,
        "plan": plan,
        "policy": policy,
        "ids": [t.task_id for t in tasks],
        "now": now,
    }


class TestSave:
    def test_the_file_holds_ids_reasons_hash_and_time(self, setup: dict[str, Any]) -> None:
        """The saved plan lists each id with its reason, the policy hash and when it was made."""
        document = json.loads(setup["plan"].read_text())
        [entry] = document["plans"]
        assert document["format"] == "reaper-plan/1"
        assert entry["policy"] == "test-policy"
        assert len(entry["policy_hash"]) == 64
        assert sorted(i["task_id"] for i in entry["items"]) == sorted(setup["ids"])
        assert {i["reason"] for i in entry["items"]} == {"older than 30d and status completed"}
        made = datetime.fromisoformat(entry["created_at"])
        assert abs((made - datetime.now(UTC)).total_seconds()) < 60
        assert setup["sim"].stats["delete_requests"] == 0


class TestApply:
    def test_applies_exactly_the_plan(self, setup: dict[str, Any]) -> None:
        """Unchanged target: every planned id is deleted, nothing else."""
        result = reaper(
            "apply", str(setup["plan"]), "--migrate", "--output", "json", env=setup["env"]
        )
        assert result.returncode == 0, result.stderr
        assert sorted(setup["sim"].deleted_ids) == sorted(setup["ids"])
        [run] = json.loads(result.stdout)
        assert run["mode"] == "apply"
        assert run["not_eligible"] == []

    def test_the_summary_table_counts_what_apply_deleted(self, setup: dict[str, Any]) -> None:
        """The table after `apply` shows the tasks deleted (an apply is not a dry run)."""
        result = reaper("apply", str(setup["plan"]), "--migrate", env=setup["env"])
        assert result.returncode == 0, result.stderr
        assert len(setup["sim"].deleted_ids) == 10
        [row] = [line for line in result.stdout.splitlines() if "test-policy" in line]
        cells = [cell.strip() for cell in row.strip("│┃ ").split("│")]
        assert cells[:4] == ["test-policy", "succeeded", "10", "10"]
        assert "dry run" not in result.stdout

    def test_only_what_is_still_eligible(self, setup: dict[str, Any]) -> None:
        """A task that became protected and one that vanished are not deleted; a new one is not."""
        sim = setup["sim"]
        protected, vanished = setup["ids"][0], setup["ids"][1]
        sim.task(protected).status = "in_progress"
        sim.reindex()
        httpx.request(
            "DELETE",
            f"{setup['url']}/api/v0/data_pipeline/tasks",
            json={"task_ids": [vanished], "confirm": True, "delete_database_records": True},
        ).raise_for_status()
        sim.add_tasks([sim_task("task_20260801_000000", age=timedelta(days=60), now=setup["now"])])
        result = reaper(
            "apply", str(setup["plan"]), "--migrate", "--output", "json", env=setup["env"]
        )
        assert result.returncode == 0, result.stderr
        [run] = json.loads(result.stdout)
        assert sorted(run["not_eligible"]) == sorted([protected, vanished])
        assert set(sim.deleted_ids) == set(setup["ids"][1:])  # the vanished one by someone else
        assert sim.delete_requests_by_id[vanished] == 1
        assert protected not in sim.delete_requests_by_id
        assert "task_20260801_000000" not in sim.delete_requests_by_id

    def test_refuses_a_changed_policy(self, setup: dict[str, Any]) -> None:
        """Editing the policy after review invalidates the plan: refused, nothing deleted."""
        doc = yaml.safe_load(setup["policy"].read_text())
        doc["select"]["older_than"] = "20d"
        setup["policy"].write_text(yaml.safe_dump(doc))
        result = reaper("apply", str(setup["plan"]), "--migrate", env=setup["env"])
        assert result.returncode == 1
        assert "changed since the plan was made" in result.stderr
        assert setup["sim"].stats["delete_requests"] == 0

    def test_refuses_an_old_plan(self, setup: dict[str, Any]) -> None:
        """A plan older than --max-age is refused."""
        document = json.loads(setup["plan"].read_text())
        document["plans"][0]["created_at"] = (datetime.now(UTC) - timedelta(hours=3)).isoformat()
        setup["plan"].write_text(json.dumps(document))
        result = reaper("apply", str(setup["plan"]), "--max-age", "2h", env=setup["env"])
        assert result.returncode == 1
        assert "more than the maximum 2.0h" in result.stderr
        assert setup["sim"].stats["delete_requests"] == 0
        ok = reaper("apply", str(setup["plan"]), "--max-age", "4h", "--migrate", env=setup["env"])
        assert ok.returncode == 0, ok.stderr

    def test_refuses_a_plan_for_an_unknown_policy(self, setup: dict[str, Any]) -> None:
        """A plan naming a policy no file defines is refused."""
        document = json.loads(setup["plan"].read_text())
        document["plans"][0]["policy"] = "gone-policy"
        setup["plan"].write_text(json.dumps(document))
        result = reaper("apply", str(setup["plan"]), env=setup["env"])
        assert result.returncode == 1
        assert "no policy file defines" in result.stderr

    def test_a_malformed_file_is_a_configuration_error(self, setup: dict[str, Any]) -> None:
        """Not a saved plan: exit 2."""
        setup["plan"].write_text('{"format": "something-else"}')
        result = reaper("apply", str(setup["plan"]), env=setup["env"])
        assert result.returncode == 2
        assert "not a saved plan" in result.stderr


class TestDiff:
    def test_diff_shows_what_changed(self, setup: dict[str, Any]) -> None:
        """--diff lists ids newly eligible and no longer eligible since the saved plan."""
        sim = setup["sim"]
        sim.task(setup["ids"][3]).status = "pending"
        sim.reindex()
        sim.add_tasks([sim_task("task_20260801_000000", age=timedelta(days=60), now=setup["now"])])
        result = reaper("plan", "--diff", str(setup["plan"]), "--output", "json", env=setup["env"])
        assert result.returncode == 0, result.stderr
        [plan] = json.loads(result.stdout)
        assert plan["diff"] == {
            "policy": "test-policy",
            "added": ["task_20260801_000000"],
            "removed": [setup["ids"][3]],
            "unchanged": 9,
        }
        table = reaper("plan", "--diff", str(setup["plan"]), env=setup["env"])
        assert "+1 newly eligible" in table.stdout
        assert "-1 no longer eligible" in table.stdout
