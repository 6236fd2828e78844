"""The commands people use (reaper.people): every one answers --help, and `reaper pin TASK_ID`
reads as `reaper pin add TASK_ID` unless the first word is another subcommand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import policy_doc
from test_cli import reaper

COMMANDS = [
    ["pin"],
    ["pin", "add"],
    ["pin", "list"],
    ["unpin"],
    ["held"],
    ["held", "list"],
    ["held", "show"],
    ["approve"],
    ["reject"],
    ["apply"],
]


class TestHelp:
    @pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
    def test_help_everywhere(self, command: list[str]) -> None:
        """Every people command answers --help with exit 0."""
        result = reaper(*command, "--help")
        assert result.returncode == 0, result.stderr
        assert "Usage:" in result.stdout

    def test_apply_names_both_ways(self) -> None:
        """`apply --help` offers a plan file and --held RUN_ID."""
        assert "--held RUN_ID" in reaper("apply", "--help").stdout


class TestPinWords:
    def test_pin_list_and_a_task_named_list(self, tmp_path: Path, database_url: str) -> None:
        """`reaper pin list` lists; `reaper pin add list ...` pins a task whose id is 'list'."""
        (tmp_path / "policies").mkdir()
        (tmp_path / "policies" / "p.yaml").write_text(
            yaml.safe_dump(policy_doc("http://127.0.0.1:9")), encoding="utf-8"
        )
        env = {"REAPER_DATABASE_URL": database_url, "REAPER_POLICIES": str(tmp_path / "policies")}
        assert reaper("pin", "list", "--output", "json", env=env).stdout.strip() == "[]"
        pinned = reaper("pin", "add", "list", "--policy", "test-policy", env=env)
        assert pinned.returncode == 0, pinned.stderr
        assert reaper("pin", "t2", "--target", "data_pipeline", env=env).returncode == 0
        listed = json.loads(reaper("pin", "list", "--output", "json", env=env).stdout)
        assert [(p["task_id"], p["scope"], p["name"]) for p in listed] == [
            ("list", "policy", "test-policy"),
            ("t2", "target", "data_pipeline"),
        ]
