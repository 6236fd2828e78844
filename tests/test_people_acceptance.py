"""People in the loop, end to end on the command line (SQLite and PostgreSQL): pin a task, trip a
guard, approve the held run, and check what was deleted, the approver on the record, and that
every webhook names the policy and carries a valid signature (standardwebhooks' verifier)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import policy_doc, sim_task
from test_cli import reaper
from webhooks import SECRET, Receiver

from reaper.simulators import DataPipelineSimulator

Start = Callable[..., tuple[DataPipelineSimulator, str]]
IDS = [f"task_20260901_{i:06d}" for i in range(6)]
PINNED = IDS[2]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver().start()
    yield started
    started.stop()


class TestPinHoldApprove:
    def test_the_review_loop(
        self, data_pipeline: Start, receiver: Receiver, tmp_path: Path, database_url: str
    ) -> None:
        """Six eligible tasks, one pinned, a guard at three: the run is refused and held; after
        approval the next run deletes the five approved and unpinned ones; explain names the
        approver; every webhook verifies and names the policy and its run."""
        sim, url = data_pipeline(
            [sim_task(task_id, age=timedelta(days=40, minutes=i)) for i, task_id in enumerate(IDS)]
        )
        (tmp_path / "policies").mkdir()
        doc = policy_doc(url, delete={"max_deletions": 3})
        (tmp_path / "policies" / "p.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
        notify = tmp_path / "notify.yaml"
        notify.write_text(
            yaml.safe_dump([{"type": "webhook", "url": receiver.url, "secret_env": "HOOK_SECRET"}]),
            encoding="utf-8",
        )
        env = {
            "REAPER_DATABASE_URL": database_url,
            "REAPER_POLICIES": str(tmp_path / "policies"),
            "REAPER_NOTIFY_FILE": str(notify),
            "HOOK_SECRET": SECRET,
        }

        def ok(*args: str) -> Any:
            result = reaper(*args, env=env)
            assert result.returncode == 0, (args, result.stderr)
            assert SECRET not in result.stdout + result.stderr
            return result

        ok("pin", PINNED, "--policy", "test-policy", "--reason", "legal hold 12", "--by", "lee")
        refused = reaper("run", "--output", "json", env=env)
        assert refused.returncode == 1
        [first] = json.loads(refused.stdout)
        assert (first["status"], first["held"], sim.deleted_ids) == ("refused", True, [])
        [held] = json.loads(ok("held", "list", "--output", "json").stdout)
        assert (held["run_id"], held["eligible"], held["guard"]) == (
            first["run_id"],
            5,
            "max_deletions",
        )
        ok("approve", held["run_id"], "--by", "alice", "--comment", "quarterly cleanup")
        [second] = json.loads(ok("run", "--output", "json").stdout)
        assert second["status"] == "succeeded" and second["approval_id"]
        expected = sorted(set(IDS) - {PINNED})
        assert sorted(sim.deleted_ids) == expected
        assert PINNED not in sim.deleted_ids

        for task_id in expected:
            entries = json.loads(ok("explain", task_id, "--output", "json").stdout)
            deleted = [e for e in entries if e["outcome"] == "deleted"]
            assert len(deleted) == 1
            approval = deleted[0]["approval"]
            assert (approval["approved_by"], approval["comment"], approval["held_run"]) == (
                "alice",
                "quarterly cleanup",
                first["run_id"],
            )
            assert deleted[0]["snapshot"]["task_id"] == task_id
        pinned = json.loads(ok("explain", PINNED, "--output", "json").stdout)
        assert [e["outcome"] for e in pinned] == ["pinned"]
        assert "pinned by lee" in pinned[0]["note"]
        assert "audit chains verified" in ok("audit", "verify").stdout

        runs = {first["run_id"], second["run_id"]}
        kinds = [request.json["type"] for request in receiver]
        assert kinds.count("plan.held") == 1 and kinds.count("run.summary") == 2
        for request in receiver:
            assert request.error is None, request.error
            assert request.verified["data"]["policy"] == "test-policy"
            assert request.verified["data"]["run_id"] in runs
        [held_event] = receiver.of_type("plan.held")
        assert held_event.verified["data"]["run_id"] == first["run_id"]
