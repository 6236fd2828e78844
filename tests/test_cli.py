"""The command line as a user runs it: real processes, exit codes, output formats."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import migrate_to, policy_doc, sim_task

from reaper.db import head_revision
from reaper.simulators import DataPipelineSimulator

Start = Callable[..., tuple[DataPipelineSimulator, str]]
COMMANDS = [
    [],
    ["run"],
    ["plan"],
    ["validate"],
    ["audit"],
    ["db"],
    ["db", "upgrade"],
    ["db", "current"],
    ["schema"],
    ["targets"],
]


def reaper(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("REAPER_")}
    return subprocess.run(
        [sys.executable, "-m", "reaper", *args],
        capture_output=True,
        text=True,
        env={**base, "REAPER_LOG_FORMAT": "json", **(env or {})},
        cwd=cwd,
        timeout=120,
        check=False,
    )


@pytest.fixture
def workspace(tmp_path: Path, database_url: str) -> dict[str, Any]:
    """A policy directory and an audit database URL (SQLite and PostgreSQL)."""
    (tmp_path / "policies").mkdir()
    return {
        "dir": tmp_path,
        "env": {
            "REAPER_DATABASE_URL": database_url,
            "REAPER_POLICIES": str(tmp_path / "policies"),
        },
    }


def write_policy(workspace: dict[str, Any], doc: Any, name: str = "p.yaml") -> Path:
    path = workspace["dir"] / "policies" / name
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def old(n: int) -> list[Any]:
    return [sim_task(f"task_20260901_{i:06d}", age=timedelta(days=40, minutes=i)) for i in range(n)]


class TestHelp:
    @pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "reaper")
    def test_help_everywhere(self, command: list[str]) -> None:
        """Every command answers --help with exit 0."""
        result = reaper(*command, "--help")
        assert result.returncode == 0, result.stderr
        assert "Usage:" in result.stdout


class TestExitCodes:
    def test_run_deletes_and_exits_0(self, data_pipeline: Start, workspace: dict[str, Any]) -> None:
        """`reaper run --migrate` deletes all that is eligible, exits 0, prints a JSON summary."""
        sim, url = data_pipeline(old(7))
        write_policy(workspace, policy_doc(url))
        result = reaper("run", "--migrate", "--output", "json", env=workspace["env"])
        assert result.returncode == 0, result.stderr
        [summary] = json.loads(result.stdout)
        assert summary["status"] == "succeeded"
        assert summary["deleted"] == 7
        assert len(sim.deleted_ids) == 7
        # one structured log line per batch when stderr is not a TTY
        events = [json.loads(line)["event"] for line in result.stderr.splitlines() if line]
        assert "batch_done" in events

    def test_failures_exit_1(self, data_pipeline: Start, workspace: dict[str, Any]) -> None:
        """Failed deletions make the exit code 1."""
        from reaper.simulators import Faults

        _, url = data_pipeline(old(5), faults=Faults(partial_failure_rate=1.0))
        write_policy(workspace, policy_doc(url))
        result = reaper("run", "--migrate", env=workspace["env"])
        assert result.returncode == 1

    def test_invalid_policy_exits_2_and_touches_nothing(
        self, data_pipeline: Start, workspace: dict[str, Any]
    ) -> None:
        """A broken policy among good ones: exit 2, nothing listed or deleted by any of them."""
        sim, url = data_pipeline(old(5))
        write_policy(workspace, policy_doc(url), "a-good.yaml")
        bad = policy_doc(url)
        bad["name"] = "bad"
        bad["select"]["older_then"] = "30d"
        path = write_policy(workspace, bad, "b-bad.yaml")
        result = reaper("run", "--migrate", env=workspace["env"])
        assert result.returncode == 2
        assert str(path) in result.stderr
        assert "select.older_then" in result.stderr
        assert "policy 'bad'" in result.stderr
        assert sim.stats["requests"] == 0

    def test_unknown_policy_name_exits_2(self, workspace: dict[str, Any]) -> None:
        """--policy with a name no file defines is a configuration error."""
        write_policy(workspace, policy_doc("http://127.0.0.1:9"))
        result = reaper("run", "--policy", "nope", env=workspace["env"])
        assert result.returncode == 2
        assert "no policy named 'nope'" in result.stderr

    def test_bad_settings_exit_2_without_echoing_secrets(self, tmp_path: Path) -> None:
        """An invalid REAPER_DATABASE_URL is refused with exit 2, never echoing its value."""
        result = reaper("validate", env={"REAPER_DATABASE_URL": "mysql://root:hunter2-secret@db/x"})
        assert result.returncode == 2
        assert "REAPER_DATABASE_URL" in result.stderr
        assert "hunter2-secret" not in result.stderr + result.stdout

    def test_unreachable_audit_database_exits_1_and_lists_nothing(
        self, data_pipeline: Start, tmp_path: Path
    ) -> None:
        """No audit, no delete: with the database down, nothing is listed; exit 1."""
        sim, url = data_pipeline(old(3))
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(policy_doc(url)), encoding="utf-8")
        result = reaper(
            "run",
            "--policies",
            str(tmp_path / "p.yaml"),
            env={"REAPER_DATABASE_URL": "postgresql://reaper:pw-secret-9@127.0.0.1:9/x"},
        )
        assert result.returncode == 1
        assert "nothing was listed or deleted" in result.stderr
        assert "pw-secret-9" not in result.stderr
        assert sim.stats["requests"] == 0


class TestCommands:
    def test_validate(self, tmp_path: Path) -> None:
        """`reaper validate` accepts the shipped example policies."""
        result = reaper("validate", str(Path(__file__).parent.parent / "policies"))
        assert result.returncode == 0, result.stderr
        assert "ok  pipeline-finished-30d" in result.stdout

    def test_plan_reports_reasons_and_deletes_nothing(
        self, data_pipeline: Start, workspace: dict[str, Any]
    ) -> None:
        """`reaper plan --output json` lists counts per reason; no delete request is sent."""
        tasks = [*old(4), sim_task("task_20261030_000000", status="in_progress")]
        sim, url = data_pipeline(tasks)
        write_policy(workspace, policy_doc(url, keep={"newest": 1}))
        result = reaper("plan", "--output", "json", env=workspace["env"])
        assert result.returncode == 0, result.stderr
        [plan] = json.loads(result.stdout)
        reasons = {(r["verdict"], r["reason"]): r["count"] for r in plan["reasons"]}
        assert reasons == {
            ("delete", "older than 30d and status completed"): 3,
            ("keep", "kept: newest 1"): 1,
            ("protected", "protected: in_progress"): 1,
        }
        assert plan["oldest_to_delete"]["task_id"] == "task_20260901_000003"
        assert sim.stats["delete_requests"] == 0

    def test_dry_run_and_audit_query(self, data_pipeline: Start, workspace: dict[str, Any]) -> None:
        """--dry-run records dry_run rows; `reaper audit` returns them as JSON and CSV."""
        sim, url = data_pipeline(old(3))
        write_policy(workspace, policy_doc(url))
        env = workspace["env"]
        assert reaper("db", "upgrade", env=env).returncode == 0
        assert reaper("run", "--dry-run", env=env).returncode == 0
        assert sim.stats["delete_requests"] == 0
        rows = json.loads(reaper("audit", "--output", "json", env=env).stdout)
        assert sorted(r["task_id"] for r in rows) == [f"task_20260901_00000{i}" for i in range(3)]
        assert {r["outcome"] for r in rows} == {"dry_run"}
        one = json.loads(
            reaper("audit", "--task-id", "task_20260901_000001", "--output", "json", env=env).stdout
        )
        assert [r["task_id"] for r in one] == ["task_20260901_000001"]
        table = list(
            csv.DictReader(
                io.StringIO(reaper("audit", "--since", "1h", "--output", "csv", env=env).stdout)
            )
        )
        assert len(table) == 3 and table[0]["outcome"] == "dry_run"

    def test_run_requires_migrated_database(self, workspace: dict[str, Any]) -> None:
        """At an older revision, without `db upgrade` (or --migrate) a run refuses and says what
        to do (an empty database is set up instead: tests/test_first_run.py)."""
        write_policy(workspace, policy_doc("http://127.0.0.1:9"))
        migrate_to(workspace["env"]["REAPER_DATABASE_URL"], "0001")
        result = reaper("run", env=workspace["env"])
        assert result.returncode == 1
        assert "reaper db upgrade" in result.stderr

    def test_db_commands(self, workspace: dict[str, Any]) -> None:
        """`db upgrade` is idempotent and `db current` reports the head revision."""
        env = workspace["env"]
        first = reaper("db", "upgrade", env=env)
        second = reaper("db", "upgrade", env=env)
        assert first.returncode == second.returncode == 0
        assert "upgraded from empty" in first.stdout
        assert "already at" in second.stdout
        assert f"revision {head_revision()}" in reaper("db", "current", env=env).stdout

    def test_schema_is_published_and_current(self) -> None:
        """`reaper schema --no-plugins` prints the JSON Schema committed in reaper/schema/."""
        committed = Path(__file__).parent.parent / "reaper" / "schema" / "policy.schema.json"
        result = reaper("schema", "--no-plugins")
        assert json.loads(result.stdout) == json.loads(committed.read_text(encoding="utf-8"))
