"""Shards: every policy in exactly one shard, for any N, the same in every process.

The reference for a policy's shard is coreutils' ``sha256sum`` of its name read as one
big-endian number, modulo N (README, "Fleets"), never reaper's own hashing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import sim_task
from hypothesis import given, settings
from hypothesis import strategies as st
from test_metrics_push import Pushgateway, samples

from reaper import cli as cli_module
from reaper.errors import ConfigError
from reaper.shards import Shard, parse_shard, shard_of

FLEET = """\
- name: fleet
  for_each:
    size: [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
  target: {type: data_pipeline, base_url: 'URL', page_size: '${size}', timestamps_timezone: UTC}
  select: {status: [completed], older_than: 30d}
  delete: {rate: 200/s, max_fraction: 1.0}
- name: solo
  target: {type: data_pipeline, base_url: 'URL', timestamps_timezone: UTC}
  select: {status: [completed], older_than: 30d}
  delete: {max_fraction: 1.0}
"""
NAMES = [f"fleet[{size}]" for size in range(10, 22)] + ["solo"]


def sha256sum(name: str) -> int:
    """The name's SHA-256 as computed by coreutils, as a number."""
    result = subprocess.run(
        ["sha256sum"], input=name.encode(), capture_output=True, check=True, timeout=30
    )
    return int(result.stdout.split()[0], 16)


class TestShardOf:
    @pytest.mark.parametrize("name", ["solo", "fleet[a]", "dcs-finished-30d[cn-north-4/p1]", "ü"])
    def test_agrees_with_sha256sum(self, name: str) -> None:
        """shard_of(name, N) is sha256sum(name) mod N for N from 1 to 50."""
        digest = sha256sum(name)
        assert [shard_of(name, n) for n in range(1, 51)] == [digest % n for n in range(1, 51)]

    @settings(max_examples=200, deadline=None)
    @given(
        names=st.sets(st.text(min_size=1, max_size=40), min_size=1, max_size=60),
        count=st.integers(min_value=1, max_value=64),
    )
    def test_the_shards_partition_the_policies(self, names: set[str], count: int) -> None:
        """Over K = 0..N-1, every name is selected by exactly one shard."""

        class Named:
            def __init__(self, name: str) -> None:
                self.name = name

        items = [Named(name) for name in sorted(names)]
        picked = [item.name for k in range(count) for item in Shard(k, count).select(items)]
        assert sorted(picked) == sorted(names)

    def test_the_shards_share_the_work(self) -> None:
        """1,000 names over 4 shards: none gets fewer than 150 (the mean is 250, sd 14)."""
        sizes = [0] * 4
        for i in range(1000):
            sizes[shard_of(f"policy-{i}", 4)] += 1
        assert min(sizes) >= 150

    def test_no_shards(self) -> None:
        """N = 0 is not a number of shards."""
        with pytest.raises(ValueError, match="at least 1"):
            shard_of("solo", 0)


class TestParse:
    @pytest.mark.parametrize(
        ("text", "expected"), [("0/1", (0, 1)), ("3/4", (3, 4)), ("09/10", (9, 10))]
    )
    def test_k_of_n(self, text: str, expected: tuple[int, int]) -> None:
        """K/N counts K from 0."""
        shard = parse_shard(text, {})
        assert (shard.index, shard.count) == expected

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("3/2", "shards are numbered from 0, so K must be below N (0/2 to 1/2)"),
            ("4/4", "shards are numbered from 0, so K must be below N (0/4 to 3/4)"),
            ("0/0", "N must be at least 1"),
            ("1", "expected K/N (e.g. 0/4) or auto"),
            ("-1/3", "expected K/N"),
            ("1/2/3", "expected K/N"),
            ("a/b", "expected K/N"),
            (" 1/2", "expected K/N"),
        ],
    )
    def test_refused(self, text: str, message: str) -> None:
        """A shard that does not exist is a configuration error saying why."""
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_shard(text, {})

    def test_auto_reads_the_indexed_job(self) -> None:
        """auto: K from JOB_COMPLETION_INDEX, N from the shard count setting."""
        shard = parse_shard("auto", {"JOB_COMPLETION_INDEX": "2"}, 3)
        assert (shard.index, shard.count) == (2, 3)

    @pytest.mark.parametrize(
        ("environ", "count", "message"),
        [
            ({}, 3, "JOB_COMPLETION_INDEX, which is not set"),
            ({"JOB_COMPLETION_INDEX": "x"}, 3, "is not a completion index"),
            ({"JOB_COMPLETION_INDEX": "0"}, None, "set REAPER_SHARD_COUNT"),
            ({"JOB_COMPLETION_INDEX": "3"}, 3, "JOB_COMPLETION_INDEX=3 is not below"),
        ],
    )
    def test_auto_refused(self, environ: dict[str, str], count: int | None, message: str) -> None:
        """Outside an Indexed Job, or without the count, auto is a configuration error."""
        with pytest.raises(ConfigError, match=message):
            parse_shard("auto", environ, count)


def policies(tmp_path: Path, url: str = "http://127.0.0.1:9") -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET.replace("URL", url), encoding="utf-8")
    return path


def validate_shard(path: Path, shard: str, seed: str) -> list[str]:
    """The policy names `reaper validate --shard` lists, in a process with this hash seed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REAPER_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "reaper",
            "validate",
            "--output",
            "json",
            "--shard",
            shard,
            str(path),
        ],
        env={**env, "PYTHONHASHSEED": seed},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [entry["name"] for entry in json.loads(result.stdout)]


class TestCommandLine:
    @pytest.mark.slow
    def test_stable_across_processes_and_hash_seeds(self, tmp_path: Path) -> None:
        """Processes with different hash seeds pick the same shards, which sha256sum predicts."""
        path = policies(tmp_path)
        digests = {name: sha256sum(name) for name in NAMES}
        for count in (1, 3):
            for k in range(count):
                expected = [name for name in NAMES if digests[name] % count == k]
                for seed in ("1", "2"):
                    assert validate_shard(path, f"{k}/{count}", seed) == expected

    def test_a_shard_that_does_not_exist_exits_2(self, tmp_path: Path) -> None:
        """`run --shard 3/2` is a usage error: nothing is loaded, listed or written."""
        result = CliRunner().invoke(
            cli_module.cli,
            ["run", "--shard", "3/2", "--policies", str(policies(tmp_path))],
            env={"REAPER_DATABASE_URL": f"sqlite:///{tmp_path / 'audit.db'}"},
        )
        assert result.exit_code == 2
        assert result.stderr == (
            "reaper: --shard 3/2: shards are numbered from 0, so K must be below N (0/2 to 1/2)\n"
        )
        assert not (tmp_path / "audit.db").exists()

    def test_auto_outside_an_indexed_job_exits_2(self, tmp_path: Path) -> None:
        """`run --shard auto` without JOB_COMPLETION_INDEX names what is missing."""
        result = CliRunner().invoke(
            cli_module.cli,
            ["run", "--shard", "auto", "--policies", str(policies(tmp_path))],
            env={
                "REAPER_DATABASE_URL": f"sqlite:///{tmp_path / 'audit.db'}",
                "REAPER_SHARD_COUNT": "3",
            },
        )
        assert result.exit_code == 2
        assert "JOB_COMPLETION_INDEX, which is not set" in result.stderr

    def test_every_policy_runs_in_exactly_one_shard(
        self, tmp_path: Path, data_pipeline: Any
    ) -> None:
        """Three `run --shard auto` pods (indexes 0, 1, 2) run each policy once between them."""
        now = datetime.now(UTC)
        _, url = data_pipeline([sim_task("task_20260901_000001", age=timedelta(days=40), now=now)])
        path = policies(tmp_path, url)
        ran: list[str] = []
        for index in range(3):
            result = CliRunner().invoke(
                cli_module.cli,
                [
                    "run",
                    "--dry-run",
                    "--shard",
                    "auto",
                    "--output",
                    "json",
                    "--policies",
                    str(path),
                ],
                env={
                    "REAPER_DATABASE_URL": f"sqlite:///{tmp_path / 'audit.db'}",
                    "REAPER_SHARD_COUNT": "3",
                    "JOB_COMPLETION_INDEX": str(index),
                },
            )
            assert result.exit_code == 0, result.output
            names = [run["policy"] for run in json.loads(result.stdout)]
            assert names == [n for n in NAMES if sha256sum(n) % 3 == index]
            ran.extend(names)
        assert sorted(ran) == sorted(NAMES)

    def test_policy_then_shard(self, tmp_path: Path, data_pipeline: Any) -> None:
        """--policy narrows first; --shard then keeps that selection's share."""
        _, url = data_pipeline([])
        result = CliRunner().invoke(
            cli_module.cli,
            [
                "run",
                "--dry-run",
                "--output",
                "json",
                "--policies",
                str(policies(tmp_path, url)),
                "--policy",
                "fleet[*",
                "--shard",
                "1/2",
            ],
            env={"REAPER_DATABASE_URL": f"sqlite:///{tmp_path / 'audit.db'}"},
        )
        assert result.exit_code == 0, result.output
        expected = [n for n in NAMES if n.startswith("fleet[") and sha256sum(n) % 2 == 1]
        assert [run["policy"] for run in json.loads(result.stdout)] == expected


class TestMetrics:
    @pytest.fixture
    def gateway(self) -> Iterator[Pushgateway]:
        """test_metrics_push's stand-in Pushgateway, serving on a thread."""
        server = Pushgateway()
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield server
        server.shutdown()
        server.server_close()
        thread.join()

    def test_each_shard_pushes_to_its_own_group(
        self, tmp_path: Path, data_pipeline: Any, gateway: Pushgateway
    ) -> None:
        """A push replaces its group: shard K pushes to job/reaper/shard/K, so the shards of one
        Indexed Job keep each other's metrics."""
        _, url = data_pipeline([])
        result = CliRunner().invoke(
            cli_module.cli,
            ["run", "--dry-run", "--shard", "1/2", "--policies", str(policies(tmp_path, url))],
            env={
                "REAPER_DATABASE_URL": f"sqlite:///{tmp_path / 'audit.db'}",
                "REAPER_PUSHGATEWAY_URL": gateway.url,
            },
        )
        assert result.exit_code == 0, result.output
        [(method, path, body)] = gateway.pushes
        assert (method, path) == ("PUT", "/metrics/job/reaper/shard/1")
        expected = {n for n in NAMES if sha256sum(n) % 2 == 1}
        assert set(samples(body, "reaper_runs_total")) == expected
