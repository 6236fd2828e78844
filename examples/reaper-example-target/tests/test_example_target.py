"""The example_pipeline kind against reaper's data_pipeline simulator, over real HTTP.

How to test a target: start the simulator of its API on 127.0.0.1 (``reaper.simulators``), load a
policy through reaper's own loader, then list with ``build_target`` or run the whole policy with
``run_policy`` into a throwaway SQLite audit, and check what the simulator saw.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from reaper_example_target import ExamplePipelineTarget

from reaper.audit import AuditStore
from reaper.db import make_engine, upgrade
from reaper.errors import PolicyError
from reaper.policy import LoadedPolicy, load_policy_text
from reaper.runner import RunStatus, build_target, run_policy
from reaper.simulators import DataPipelineSimulator
from reaper.simulators.data_pipeline import SimTask
from reaper.targets import ListRequest

NOW = datetime.now(UTC).replace(microsecond=0)


def task(task_id: str, age: timedelta, status: str = "completed") -> SimTask:
    created = NOW - age
    return SimTask(task_id, f"name of {task_id}", status, None, created, completed_at=created)


TASKS = [
    task("task_20250101_000001", timedelta(days=40)),
    task("task_20250101_000002", timedelta(days=40), status="failed"),
    task("task_20250101_000003", timedelta(days=2)),
    task("manual_20250101_000004", timedelta(days=40)),
]


@pytest.fixture
def simulator() -> Iterator[tuple[DataPipelineSimulator, str]]:
    sim = DataPipelineSimulator(TASKS, timezone="UTC")
    url = sim.start()
    yield sim, url
    sim.stop()


def policy(url: str, **target: Any) -> LoadedPolicy:
    document = {
        "name": "scheduled-runs-30d",
        "target": {"type": "example_pipeline", "base_url": url, "timestamps_timezone": "UTC"}
        | target,
        "select": {"status": ["completed", "failed"], "older_than": "30d"},
        "delete": {"rate": "100/s", "max_fraction": 1.0},
    }
    [loaded] = load_policy_text(yaml.safe_dump(document))
    return loaded


class TestExamplePipeline:
    def test_the_kind_is_registered(self) -> None:
        """A policy of type example_pipeline loads, and gets this distribution's class."""
        assert policy("http://127.0.0.1:1").policy.target_class is ExamplePipelineTarget

    def test_id_prefix_is_checked_when_the_policy_loads(self) -> None:
        """An id_prefix other than task_ or manual_ is refused with the field's name."""
        with pytest.raises(PolicyError, match="id_prefix"):
            policy("http://127.0.0.1:1", id_prefix="job_")

    def test_lists_only_its_prefix(self, simulator: tuple[DataPipelineSimulator, str]) -> None:
        """Only tasks whose id starts with id_prefix are listed."""
        _, url = simulator

        async def ids(loaded: LoadedPolicy) -> list[str]:
            target, client = build_target(loaded)
            try:
                return sorted([t.id async for t in target.list_tasks(ListRequest("created_at"))])
            finally:
                await client.aclose()

        assert asyncio.run(ids(policy(url))) == [
            "task_20250101_000001",
            "task_20250101_000002",
            "task_20250101_000003",
        ]
        assert asyncio.run(ids(policy(url, id_prefix="manual_"))) == ["manual_20250101_000004"]

    def test_a_run_deletes_old_scheduled_tasks_only(
        self, simulator: tuple[DataPipelineSimulator, str], tmp_path: Path
    ) -> None:
        """A run deletes the old finished task_ ones, never the manual one; the audit agrees."""
        sim, url = simulator
        engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
        upgrade(engine)
        try:
            result = asyncio.run(run_policy(policy(url), AuditStore(engine)))
        finally:
            engine.dispose()
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert sorted(sim.deleted_ids) == ["task_20250101_000001", "task_20250101_000002"]
        assert result.summary.deleted == 2
