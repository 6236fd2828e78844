"""The data_pipeline simulator, exercised over real HTTP on 127.0.0.1 with httpx."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from reaper.simulators import DataPipelineSimulator, Faults, SimTask, generate_tasks
from reaper.simulators.data_pipeline import format_size

NOW = datetime(2026, 11, 1, 4, 0, tzinfo=UTC)
TASKS = "/api/v0/data_pipeline/tasks"
QUERY = TASKS + "/query"
ROOT = Path(__file__).resolve().parents[2]
TASK_FIELDS = [
    "task_id",
    "task_name",
    "status",
    "step_status",
    "created_at",
    "started_at",
    "completed_at",
    "created_by",
    "db_name",
    "business_context",
    "directory_exists",
    "updated_at",
]
ID_RE = re.compile(r"^(task|manual)_\d{8}_\d{6}$")


def make_task(
    task_id: str, created_at: datetime, status: str = "completed", **extra: Any
) -> SimTask:
    """A finished task with a small directory."""
    return SimTask(
        task_id=task_id,
        task_name=extra.pop("task_name", "name"),
        status=status,
        step_status=extra.pop("step_status", None),
        created_at=created_at,
        files_count=extra.pop("files_count", 3),
        size_bytes=extra.pop("size_bytes", 2560),
        **extra,
    )


def newest_first(tasks: list[SimTask]) -> list[str]:
    """Task ids in the order the service lists them."""
    ordered = sorted(tasks, key=lambda task: (task.created_at, task.task_id), reverse=True)
    return [task.task_id for task in ordered]


def delete(client: httpx.Client, task_ids: list[str], **options: Any) -> httpx.Response:
    """Send a batch delete with confirm: true."""
    return client.request("DELETE", TASKS, json={"task_ids": task_ids, "confirm": True, **options})


def list_all(client: httpx.Client, limit: int = 100, **params: Any) -> list[dict[str, Any]]:
    """Page through the list endpoint until a short page, as a client must."""
    tasks: list[dict[str, Any]] = []
    while True:
        response = client.get(TASKS, params={"limit": limit, "offset": len(tasks), **params})
        assert response.status_code == 200
        page = response.json()["data"]["tasks"]
        tasks.extend(page)
        if len(page) < limit:
            return tasks


@pytest.fixture
def tasks() -> list[SimTask]:
    return generate_tasks(n=230, seed=7, now=NOW, timezone="Asia/Shanghai")


@pytest.fixture
def sim(tasks: list[SimTask]) -> Iterator[DataPipelineSimulator]:
    simulator = DataPipelineSimulator(tasks, timezone="Asia/Shanghai", seed=5)
    with simulator.serve():
        yield simulator
    assert simulator.handler_errors == []


@pytest.fixture
def client(sim: DataPipelineSimulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=10) as http:
        yield http


class TestGenerateTasks:
    def test_deterministic(self) -> None:
        """The same seed and now give the same tasks; another seed gives others."""
        first = generate_tasks(300, seed=1, now=NOW)
        assert first == generate_tasks(300, seed=1, now=NOW)
        assert first != generate_tasks(300, seed=2, now=NOW)

    def test_ids_unique_and_derived_from_local_creation_time(self) -> None:
        """Ids are unique and name the creation second in the service's timezone."""
        zone = ZoneInfo("Asia/Shanghai")
        tasks = generate_tasks(5000, seed=3, now=NOW, timezone="Asia/Shanghai")
        assert len({task.task_id for task in tasks}) == len(tasks)
        for task in tasks:
            assert ID_RE.match(task.task_id)
            stamp = task.task_id.split("_", 1)[1]
            assert stamp == task.created_at.astimezone(zone).strftime("%Y%m%d_%H%M%S")
        manual = sum(task.task_id.startswith("manual_") for task in tasks)
        assert 0.01 * len(tasks) < manual < 0.06 * len(tasks)

    def test_ids_unique_across_a_clock_change(self) -> None:
        """Ids stay unique when the span crosses a change back from daylight saving time."""
        tasks = generate_tasks(
            20_000, seed=4, now=NOW, timezone="Europe/Berlin", span=timedelta(days=14)
        )
        assert len({task.task_id for task in tasks}) == len(tasks)
        assert len({task.created_at for task in tasks}) == len(tasks)

    def test_oldest_first_within_span(self) -> None:
        """Tasks come oldest first, spread over about 3 minutes each, before now."""
        tasks = generate_tasks(1000, seed=5, now=NOW)
        created = [task.created_at for task in tasks]
        assert created == sorted(created)
        assert created[-1] < NOW
        span = NOW - created[0]
        assert timedelta(hours=40) < span < timedelta(hours=60)
        assert all(task.created_at.tzinfo is not None for task in tasks)

    def test_span_capped_at_about_180_days(self) -> None:
        """A large population spreads over about 180 days, not years."""
        tasks = generate_tasks(200_000, seed=5, now=NOW)
        assert timedelta(days=170) < NOW - tasks[0].created_at < timedelta(days=190)

    def test_status_mix(self) -> None:
        """Statuses follow the documented weights; recent tasks are mostly live."""
        tasks = generate_tasks(20_000, seed=6, now=NOW, span=timedelta(days=90))
        counts = Counter(task.status for task in tasks)
        expected = {
            "completed": 0.60,
            "failed": 0.15,
            "partial_completed": 0.05,
            "pending": 0.10,
            "in_progress": 0.10,
        }
        for status, share in expected.items():
            assert abs(counts[status] / len(tasks) - share) < 0.02, status
        recent = [task for task in tasks if NOW - task.created_at < timedelta(hours=2)]
        assert recent
        live = sum(task.status in ("pending", "in_progress") for task in recent)
        assert live / len(recent) > 0.7

    def test_timestamps_consistent_with_status(self) -> None:
        """Pending tasks never started, running ones never finished, finished ones did both."""
        for task in generate_tasks(3000, seed=8, now=NOW):
            assert task.updated_at is not None
            if task.status == "pending":
                assert task.started_at is None and task.completed_at is None
            elif task.status == "in_progress":
                assert task.started_at is not None and task.completed_at is None
            else:
                assert task.started_at is not None and task.completed_at is not None
                assert task.created_at <= task.started_at <= task.completed_at <= NOW
            assert task.files_count >= 1 and task.size_bytes >= 1024
            assert task.directory_exists

    def test_cleaned_rate(self) -> None:
        """cleaned_rate marks a share of finished tasks as already deleted, never live ones."""
        tasks = generate_tasks(2000, seed=9, now=NOW, cleaned_rate=0.5)
        gone = [task for task in tasks if not task.directory_exists]
        assert 0.3 * len(tasks) < len(gone) < 0.5 * len(tasks)
        assert all(task.status not in ("pending", "in_progress") for task in gone)

    def test_refuses_naive_now(self) -> None:
        """A naive now is refused rather than guessed."""
        with pytest.raises(ValueError, match="aware"):
            generate_tasks(10, now=datetime(2026, 1, 1))  # noqa: DTZ001 - the point of the test

    def test_a_million(self) -> None:
        """A million tasks can be generated (benchmarks use that many)."""
        tasks = generate_tasks(1_000_000, seed=1, now=NOW)
        assert len(tasks) == 1_000_000
        assert tasks[0].created_at < tasks[-1].created_at


class TestListing:
    def test_default_page(self, client: httpx.Client) -> None:
        """Without parameters a page holds 50 tasks, newest first, in the envelope."""
        body = client.get(TASKS).json()
        assert body["success"] is True
        assert body["code"] == 200
        assert body["message"] == "获取任务列表成功"
        data = body["data"]
        assert len(data["tasks"]) == 50
        assert (data["limit"], data["offset"], data["total"]) == (50, 0, 50)
        assert set(data) >= {"tasks", "total", "limit", "offset", "response", "timestamp"}

    def test_limit_capped_at_100(self, client: httpx.Client) -> None:
        """A limit over 100 is served as 100."""
        data = client.get(TASKS, params={"limit": 500}).json()["data"]
        assert len(data["tasks"]) == 100
        assert data["limit"] == 100

    def test_total_is_the_page_length(self, client: httpx.Client) -> None:
        """total counts the page, not the matching tasks; the last page is short."""
        data = client.get(TASKS, params={"limit": 100, "offset": 200}).json()["data"]
        assert data["total"] == len(data["tasks"]) == 30
        assert client.get(TASKS, params={"offset": 1000}).json()["data"]["tasks"] == []

    def test_paging_covers_every_task_newest_first(
        self, client: httpx.Client, tasks: list[SimTask]
    ) -> None:
        """Paging until a short page yields every task once, by created_at descending."""
        listed = list_all(client, limit=37)
        assert [task["task_id"] for task in listed] == newest_first(tasks)

    def test_ties_ordered_by_task_id(self) -> None:
        """Tasks created at the same instant are ordered by task_id descending."""
        created = datetime(2026, 1, 1, tzinfo=UTC)
        tasks = [
            make_task("manual_20260101_080000", created),
            make_task("task_20260101_080000", created),
        ]
        sim = DataPipelineSimulator(tasks)
        with sim.serve() as url, httpx.Client(base_url=url) as http:
            listed = http.get(TASKS).json()["data"]["tasks"]
        assert [task["task_id"] for task in listed] == [
            "task_20260101_080000",
            "manual_20260101_080000",
        ]

    def test_task_fields(self, client: httpx.Client) -> None:
        """Each task carries exactly the service's fields."""
        task = client.get(TASKS, params={"limit": 1}).json()["data"]["tasks"][0]
        assert list(task) == TASK_FIELDS

    @pytest.mark.parametrize(
        ("timezone", "expected"),
        [
            ("Asia/Shanghai", "2026-01-15T08:30:00.123456"),
            ("America/New_York", "2026-01-14T19:30:00.123456"),
            ("UTC", "2026-01-15T00:30:00.123456"),
        ],
    )
    def test_naive_local_timestamps(self, timezone: str, expected: str) -> None:
        """Timestamps are naive ISO strings in the configured timezone, with microseconds."""
        created = datetime(2026, 1, 15, 0, 30, 0, 123456, tzinfo=UTC)
        sim = DataPipelineSimulator([make_task("task_20260115_083000", created)], timezone=timezone)
        with sim.serve() as url, httpx.Client(base_url=url) as http:
            data = http.get(TASKS).json()["data"]
        task = data["tasks"][0]
        assert task["created_at"] == expected
        assert task["started_at"] is None
        assert datetime.fromisoformat(data["timestamp"]).tzinfo is None

    def test_zero_microseconds_omitted(self) -> None:
        """Like Python's isoformat() in the service, a whole second has no fraction."""
        created = datetime(2026, 1, 15, 0, 30, tzinfo=UTC)
        sim = DataPipelineSimulator([make_task("task_20260115_003000", created)], timezone="UTC")
        with sim.serve() as url, httpx.Client(base_url=url) as http:
            task = http.get(TASKS).json()["data"]["tasks"][0]
        assert task["created_at"] == "2026-01-15T00:30:00"

    def test_status_filter(self, client: httpx.Client, tasks: list[SimTask]) -> None:
        """status filters by exact match; an unknown status matches nothing."""
        listed = list_all(client, status="failed")
        expected = newest_first([task for task in tasks if task.status == "failed"])
        assert expected
        assert [task["task_id"] for task in listed] == expected
        assert list_all(client, status="FAILED") == []

    @pytest.mark.parametrize("params", [{"limit": "ten"}, {"limit": -1}, {"offset": "1.5"}])
    def test_bad_paging_parameters(self, client: httpx.Client, params: dict[str, Any]) -> None:
        """A non-integer or negative limit or offset is a 400 in the error shape."""
        response = client.get(TASKS, params=params)
        assert response.status_code == 400
        body = response.json()
        assert body["success"] is False
        assert body["code"] == 400
        assert body["data"]["error_type"] == "INVALID_PARAMS"

    def test_unknown_route(self, client: httpx.Client) -> None:
        """Unknown paths are a JSON 404; a known path with another method a JSON 405."""
        response = client.get("/api/v0/nothing")
        assert response.status_code == 404
        assert response.json()["success"] is False
        assert client.put(TASKS).status_code == 405

    def test_concurrent_clients(self, sim: DataPipelineSimulator) -> None:
        """Several clients at once are all served."""

        def fetch(offset: int) -> int:
            with httpx.Client(base_url=sim.url, timeout=10) as http:
                codes = {http.get(TASKS, params={"offset": offset}).status_code for _ in range(10)}
            return codes.pop() if codes == {200} else 0

        with ThreadPoolExecutor(max_workers=8) as pool:
            assert list(pool.map(fetch, range(0, 80, 10))) == [200] * 8
        assert sim.stats["list_requests"] == 80


class TestQuery:
    def test_pagination_has_a_true_total(self, client: httpx.Client, tasks: list[SimTask]) -> None:
        """The query form reports the number of matches and the pages."""
        data = client.post(QUERY, json={"page": 2, "page_size": 100}).json()["data"]
        assert data["pagination"] == {
            "page": 2,
            "page_size": 100,
            "total": 230,
            "total_pages": 3,
            "has_next": True,
            "has_prev": True,
        }
        assert [task["task_id"] for task in data["tasks"]] == newest_first(tasks)[100:200]

    def test_defaults_and_caps(self, client: httpx.Client) -> None:
        """An empty body means page 1 of 20; page_size is capped at 100."""
        pagination = client.post(QUERY).json()["data"]["pagination"]
        assert (pagination["page"], pagination["page_size"]) == (1, 20)
        assert pagination["has_prev"] is False
        capped = client.post(QUERY, json={"page_size": 1000}).json()["data"]["pagination"]
        assert capped["page_size"] == 100

    def test_created_time_window_and_status(
        self, client: httpx.Client, tasks: list[SimTask]
    ) -> None:
        """created_time_start/end are inclusive naive local times; status narrows further."""
        zone = ZoneInfo("Asia/Shanghai")
        start, end = tasks[20].created_at, tasks[120].created_at
        body = {
            "status": "completed",
            "created_time_start": start.astimezone(zone).replace(tzinfo=None).isoformat(),
            "created_time_end": end.astimezone(zone).replace(tzinfo=None).isoformat(),
            "sort_order": "asc",
            "page_size": 100,
        }
        data = client.post(QUERY, json=body).json()["data"]
        expected = [
            task.task_id
            for task in tasks[20:121]
            if task.status == "completed"  # generated tasks are oldest first
        ]
        assert [task["task_id"] for task in data["tasks"]] == expected
        assert data["pagination"]["total"] == len(expected)

    def test_sort_by_other_field(self, client: httpx.Client, tasks: list[SimTask]) -> None:
        """Sorting by completed_at descending puts unfinished tasks (NULLs) first, as PostgreSQL."""
        data = client.post(
            QUERY, json={"sort_by": "completed_at", "page_size": 100, "page": 1}
        ).json()["data"]
        unfinished = sum(task.completed_at is None for task in tasks)
        listed = data["tasks"]
        assert all(task["completed_at"] is None for task in listed[:unfinished])
        finished = [task["completed_at"] for task in listed[unfinished:]]
        assert finished == sorted(finished, reverse=True)

    def test_bad_query(self, client: httpx.Client) -> None:
        """A non-integer page, a bad time or a non-JSON body is a 400."""
        assert client.post(QUERY, json={"page": "x"}).status_code == 400
        assert client.post(QUERY, json={"created_time_end": "yesterday"}).status_code == 400
        assert client.post(QUERY, content=b"{not json").status_code == 400


class TestDelete:
    def test_deletes_directory_and_keeps_record(
        self, client: httpx.Client, sim: DataPipelineSimulator, tasks: list[SimTask]
    ) -> None:
        """A delete reports what it removed; the task stays listed with directory_exists false."""
        target = tasks[0]
        files, size = target.files_count, target.size_bytes
        response = delete(client, [target.task_id])
        assert response.status_code == 200
        body = response.json()
        assert body["success"] is True
        assert body["message"] == "任务目录删除成功"
        data = body["data"]
        assert data["failed_tasks"] == []
        assert data["summary"] == {"total_requested": 1, "successfully_deleted": 1, "failed": 0}
        entry = data["deleted_tasks"][0]
        assert entry == {
            "success": True,
            "task_id": target.task_id,
            "directory_deleted": True,
            "database_records_deleted": False,
            "deleted_files_count": files,
            "deleted_size": format_size(size),
            "deleted_at": data["deleted_at"],
            # The real server's delete_task_directory_simple adds this (the seed does not show it).
            "operation_message": "目录删除成功",
        }
        assert datetime.fromisoformat(data["deleted_at"]).tzinfo is None
        assert sim.deleted_ids == [target.task_id]
        listed = {task["task_id"]: task for task in list_all(client)}
        assert listed[target.task_id]["directory_exists"] is False
        assert listed[target.task_id]["updated_at"] == data["deleted_at"]

    def test_idempotent(
        self, client: httpx.Client, sim: DataPipelineSimulator, tasks: list[SimTask]
    ) -> None:
        """Deleting again, or an unknown id, succeeds without deleting anything."""
        task_id = tasks[1].task_id
        delete(client, [task_id])
        entries = delete(client, [task_id, "task_19990101_000000"]).json()["data"]["deleted_tasks"]
        for entry in entries:
            assert entry["success"] is True
            assert entry["directory_deleted"] is False
            assert entry["deleted_files_count"] == 0
            assert entry["deleted_size"] == "0 B"
        assert sim.deleted_ids == [task_id]
        assert sim.delete_requests_by_id[task_id] == 2
        assert sim.delete_requests_by_id["task_19990101_000000"] == 1

    def test_delete_database_records(
        self, client: httpx.Client, sim: DataPipelineSimulator, tasks: list[SimTask]
    ) -> None:
        """With delete_database_records the task disappears from listings too."""
        first, second = tasks[2].task_id, tasks[3].task_id
        delete(client, [first])  # directory first, record later: the record still goes
        data = delete(client, [first, second], delete_database_records=True).json()["data"]
        assert [entry["database_records_deleted"] for entry in data["deleted_tasks"]] == [
            True,
            True,
        ]
        assert [entry["directory_deleted"] for entry in data["deleted_tasks"]] == [False, True]
        listed = {task["task_id"] for task in list_all(client)}
        assert first not in listed and second not in listed
        assert len(listed) == 228
        assert sim.task(first) is None
        assert sim.deleted_ids == [first, second]

    def test_removals_keep_listing_consistent(
        self, client: httpx.Client, sim: DataPipelineSimulator, tasks: list[SimTask]
    ) -> None:
        """After removing most records, pages, filters and query totals still agree."""
        list_all(client, status="completed")  # build the status index before removals
        doomed = [task.task_id for index, task in enumerate(tasks) if index % 10 < 7]
        for start in range(0, len(doomed), 25):
            delete(client, doomed[start : start + 25], delete_database_records=True)
            remaining = [task for task in tasks if sim.task(task.task_id) is not None]
            page = client.get(TASKS, params={"limit": 10, "offset": 5}).json()["data"]["tasks"]
            assert [task["task_id"] for task in page] == newest_first(remaining)[5:15]
        remaining = [task for task in tasks if sim.task(task.task_id) is not None]
        assert len(remaining) == len(tasks) - len(doomed)
        assert [task["task_id"] for task in list_all(client, limit=7)] == newest_first(remaining)
        completed = [task for task in remaining if task.status == "completed"]
        listed = list_all(client, status="completed")
        assert [task["task_id"] for task in listed] == newest_first(completed)
        pagination = client.post(QUERY, json={"status": "completed"}).json()["data"]["pagination"]
        assert pagination["total"] == len(completed)

    def test_continue_on_error_false_stops_at_first_failure(
        self, client: httpx.Client, sim: DataPipelineSimulator, tasks: list[SimTask]
    ) -> None:
        """continue_on_error false stops at the first failed id; the rest appear nowhere."""
        sim.set_faults(Faults(partial_failure_rate=1.0))
        ids = [task.task_id for task in tasks[:3]]
        body = delete(client, ids, continue_on_error=False).json()
        assert body["message"] == "批量删除部分完成"
        data = body["data"]
        assert data["deleted_tasks"] == []
        assert data["failed_tasks"] == [
            {"task_id": ids[0], "error": "删除任务目录失败", "error_code": "DELETE_FAILED"}
        ]
        assert data["summary"] == {"total_requested": 3, "successfully_deleted": 0, "failed": 1}
        assert sim.deleted_ids == []

    def test_missing_confirm(self, client: httpx.Client) -> None:
        """Without confirm the service names the missing parameter."""
        response = client.request("DELETE", TASKS, json={"task_ids": ["task_20260101_000000"]})
        assert response.status_code == 400
        assert response.json() == {
            "success": False,
            "code": 400,
            "message": "缺少必需参数: confirm",
            "data": {
                "response": "缺少必需参数: confirm",
                "error_type": "MISSING_PARAMS",
                "missing_params": ["confirm"],
            },
        }

    @pytest.mark.parametrize(
        "body",
        [
            {"confirm": True},
            {"task_ids": [], "confirm": True},
            {"task_ids": "task_20260101_000000", "confirm": True},
            {"task_ids": [1, 2], "confirm": True},
        ],
    )
    def test_bad_task_ids(self, client: httpx.Client, body: dict[str, Any]) -> None:
        """task_ids must be a non-empty list of strings."""
        response = client.request("DELETE", TASKS, json=body)
        assert response.status_code == 400
        assert response.json()["message"] == "task_ids必须是非空的任务ID列表"

    @pytest.mark.parametrize(
        "body",
        [
            {"task_ids": ["task_20260101_000000"], "confirm": False},
            {"task_ids": ["task_20260101_000000"], "confirm": "true"},
            {"task_ids": ["task_20260101_000000"], "confirm": True, "continue_on_error": "no"},
            ["task_20260101_000000"],
        ],
    )
    def test_other_bad_bodies(
        self, client: httpx.Client, sim: DataPipelineSimulator, body: Any
    ) -> None:
        """confirm must be exactly true; options must be booleans; the body an object."""
        assert client.request("DELETE", TASKS, json=body).status_code == 400
        assert sim.delete_requests_by_id == Counter()

    def test_invalid_json(self, client: httpx.Client) -> None:
        """A body that is not JSON is a 400 in the error shape."""
        response = client.request("DELETE", TASKS, content=b'{"task_ids": [')
        assert response.status_code == 400
        assert response.json()["success"] is False

    def test_traversal_recorded(self, client: httpx.Client, sim: DataPipelineSimulator) -> None:
        """Ids the real server would join into a path outside its directory are recorded."""
        ids = ["../etc", "task_1/x", "a\\b", "task_20260101_000000"]
        entries = delete(client, ids).json()["data"]["deleted_tasks"]
        assert all(entry["directory_deleted"] is False for entry in entries)
        assert sim.traversal_attempts == ids[:3]

    def test_format_size(self) -> None:
        """Sizes as the real server formats them: whole bytes below 1 KB, else one decimal."""
        assert format_size(0) == "0 B"
        assert format_size(512) == "512 B"
        assert format_size(1023) == "1023 B"
        assert format_size(2560) == "2.5 KB"
        assert format_size(int(2.5 * 1024 * 1024)) == "2.5 MB"
        assert format_size(3 * 1024**3) == "3.0 GB"
        assert format_size(2048 * 1024**3) == "2048.0 GB"  # no TB unit


class TestFaults:
    def test_partial_failures(
        self, client: httpx.Client, sim: DataPipelineSimulator, tasks: list[SimTask]
    ) -> None:
        """partial_failure_rate fails ids in the batch; they are not deleted."""
        sim.set_faults(Faults(partial_failure_rate=1.0))
        ids = [task.task_id for task in tasks[:2]]
        response = delete(client, ids)
        assert response.status_code == 200
        data = response.json()["data"]
        assert [entry["task_id"] for entry in data["failed_tasks"]] == ids
        assert {entry["error_code"] for entry in data["failed_tasks"]} == {"DELETE_FAILED"}
        assert sim.deleted_ids == []
        assert all(task.directory_exists for task in tasks[:2])

    def test_error_rate(
        self, client: httpx.Client, sim: DataPipelineSimulator, tasks: list[SimTask]
    ) -> None:
        """error_rate answers 500 in the service's shape without acting."""
        sim.set_faults(Faults(error_rate=1.0))
        response = delete(client, [tasks[0].task_id])
        assert response.status_code == 500
        body = response.json()
        assert body["success"] is False
        assert body["code"] == 500
        assert body["message"] == "删除任务失败,请稍后重试"
        assert body["data"]["error_type"] == "INTERNAL_ERROR"
        assert client.get(TASKS).status_code == 500
        assert sim.deleted_ids == []
        assert sim.stats["status_5xx"] == 2

    def test_rate_limit(self, client: httpx.Client, sim: DataPipelineSimulator) -> None:
        """Beyond the bucket the server answers 429 with Retry-After in whole seconds."""
        sim.set_faults(Faults(rate_limit=0.5, rate_limit_burst=2))
        codes = [client.get(TASKS).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        response = client.get(TASKS)
        assert response.status_code == 429
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["code"] == 429
        assert sim.stats["status_429"] == 2
        assert client.get("/_sim/stats").status_code == 200  # admin is never limited

    def test_default_burst(self) -> None:
        """The bucket holds max(2, ceil(rate / 10)) requests unless told otherwise."""
        assert Faults(rate_limit=5).effective_burst == 2
        assert Faults(rate_limit=100).effective_burst == 10
        assert Faults(rate_limit=100, rate_limit_burst=3).effective_burst == 3

    def test_latency(self, client: httpx.Client, sim: DataPipelineSimulator) -> None:
        """latency_ms delays every API response."""
        sim.set_faults(Faults(latency_ms=150))
        started = time.monotonic()
        client.get(TASKS)
        assert time.monotonic() - started >= 0.15

    def test_drop_before(
        self, client: httpx.Client, sim: DataPipelineSimulator, tasks: list[SimTask]
    ) -> None:
        """drop_before closes the connection without a response and without deleting."""
        sim.set_faults(Faults(drop_before_rate=1.0))
        with pytest.raises(httpx.TransportError):
            delete(client, [tasks[0].task_id])
        assert sim.deleted_ids == []
        assert tasks[0].directory_exists
        assert sim.stats["dropped"] == 1

    def test_drop_after(
        self, client: httpx.Client, sim: DataPipelineSimulator, tasks: list[SimTask]
    ) -> None:
        """drop_after deletes, then closes the connection without a response."""
        sim.set_faults(Faults(drop_after_rate=1.0))
        with pytest.raises(httpx.TransportError):
            delete(client, [tasks[0].task_id])
        assert sim.deleted_ids == [tasks[0].task_id]
        assert not tasks[0].directory_exists
        assert client.get(TASKS).status_code == 200  # lists are not dropped after acting

    def test_malformed(
        self, client: httpx.Client, sim: DataPipelineSimulator, tasks: list[SimTask]
    ) -> None:
        """malformed_rate answers 200 with a body that is not JSON, and does not act."""
        sim.set_faults(Faults(malformed_rate=1.0))
        for _ in range(5):
            response = delete(client, [tasks[0].task_id])
            assert response.status_code == 200
            with pytest.raises(json.JSONDecodeError):
                json.loads(response.content)
        assert sim.deleted_ids == []
        assert sim.stats["malformed"] == 5

    def test_down(self, client: httpx.Client, sim: DataPipelineSimulator) -> None:
        """down closes every API connection; the admin endpoints still answer."""
        sim.set_faults(Faults(down=True))
        with pytest.raises(httpx.TransportError):
            client.get(TASKS)
        assert client.get("/_sim/stats").json()["dropped"] == 1
        sim.set_faults(Faults())
        assert client.get(TASKS).status_code == 200

    def test_seeded_faults_reproducible(self, tasks: list[SimTask]) -> None:
        """The same seed gives the same sequence of injected failures."""

        def outcomes() -> list[int]:
            sim = DataPipelineSimulator(tasks, faults=Faults(error_rate=0.5), seed=42)
            with sim.serve() as url, httpx.Client(base_url=url) as http:
                return [http.get(TASKS).status_code for _ in range(20)]

        first = outcomes()
        assert set(first) == {200, 500}
        assert outcomes() == first

    @pytest.mark.parametrize(
        "kwargs",
        [{"error_rate": 1.5}, {"latency_ms": -1}, {"down": 1}, {"error_rate": True}],
    )
    def test_invalid_faults(self, kwargs: dict[str, Any]) -> None:
        """Out-of-range or mistyped fault values are refused."""
        with pytest.raises(ValueError):
            Faults(**kwargs)


class TestAdmin:
    def test_stats_and_deletions(
        self, client: httpx.Client, sim: DataPipelineSimulator, tasks: list[SimTask]
    ) -> None:
        """The admin endpoints report counters and the deletion log."""
        client.get(TASKS)
        delete(client, [tasks[0].task_id, tasks[0].task_id, "../x"])
        stats = client.get("/_sim/stats").json()
        assert stats["requests"] == 2
        assert stats["list_requests"] == 1
        assert stats["delete_requests"] == 1
        assert stats["deleted"] == 1
        assert stats == sim.stats
        deletions = client.get("/_sim/deletions").json()
        assert deletions == {
            "deleted_ids": [tasks[0].task_id],
            "delete_requests_by_id": {tasks[0].task_id: 2, "../x": 1},
            "traversal_attempts": ["../x"],
            "acknowledged_not_done": [],
            # The server deletes live tasks too (TARGETS.md): the simulator records each one.
            "live_deleted": (
                [tasks[0].task_id] if tasks[0].status in ("pending", "in_progress") else []
            ),
        }

    def test_put_faults(self, client: httpx.Client, sim: DataPipelineSimulator) -> None:
        """PUT /_sim/faults replaces the faults; unknown fields are refused."""
        response = client.put("/_sim/faults", json={"error_rate": 1.0})
        assert response.status_code == 200
        assert sim.faults == Faults(error_rate=1.0)
        assert client.get(TASKS).status_code == 500
        assert client.put("/_sim/faults", json={"eror_rate": 1}).status_code == 400
        assert client.put("/_sim/faults", json={}).status_code == 200
        assert sim.faults == Faults()

    def test_post_tasks(self, client: httpx.Client, sim: DataPipelineSimulator) -> None:
        """POST /_sim/tasks adds tasks given with aware timestamps; they are listed at once."""
        new = make_task("task_20261101_115900", NOW + timedelta(minutes=1), size_bytes=512)
        response = client.post("/_sim/tasks", json=[new.to_dict()])
        assert response.json() == {"added": 1}
        assert sim.task(new.task_id) == new
        assert client.get(TASKS, params={"limit": 1}).json()["data"]["tasks"][0]["task_id"] == (
            new.task_id
        )
        assert client.post("/_sim/tasks", json=[new.to_dict()]).status_code == 400
        naive = {**new.to_dict(), "task_id": "task_20261101_115901", "created_at": "2026-11-01"}
        assert client.post("/_sim/tasks", json=[naive]).status_code == 400

    def test_python_api(self, sim: DataPipelineSimulator, tasks: list[SimTask]) -> None:
        """add_tasks refuses duplicates; tasks lists the records."""
        with pytest.raises(ValueError, match="already exists"):
            sim.add_tasks([tasks[0]])
        assert len(sim.tasks) == len(tasks)
        assert sim.task("task_19990101_000000") is None


class TestServer:
    def test_stop_closes_keep_alive_connections(self, tasks: list[SimTask]) -> None:
        """After stop, even a pooled keep-alive connection gets no answer."""
        sim = DataPipelineSimulator(tasks)
        url = sim.start()
        with httpx.Client(base_url=url) as http:
            assert http.get(TASKS).status_code == 200
            sim.stop()
            with pytest.raises(httpx.TransportError):
                http.get(TASKS)
        sim.stop()  # a second stop is harmless

    def test_start_twice(self, sim: DataPipelineSimulator) -> None:
        """A running simulator cannot be started again."""
        with pytest.raises(RuntimeError):
            sim.start()


@pytest.mark.slow
class TestCli:
    def test_serves_until_sigterm(self) -> None:
        """The CLI prints its URL as one JSON line, serves, and exits 0 on SIGTERM."""
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        command = [sys.executable, "-m", "reaper.simulators", "data_pipeline"]
        command += ["--port", "0", "--tasks", "50", "--error-rate", "0"]
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        ) as process:
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], 30)
            assert ready, "the simulator did not report its URL"
            line = json.loads(process.stdout.readline())
            assert line["tasks"] == 50
            with httpx.Client(base_url=line["url"]) as http:
                data = http.get(TASKS).json()["data"]
            assert len(data["tasks"]) == 50
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=15)
        assert process.returncode == 0, stderr.decode()


class TestRealServerBehaviours:
    """The real server's behaviours behind the delete-time truth issue (TARGETS.md section 1),
    each a switchable fault, each shown to happen."""

    @staticmethod
    def finished(tasks: list[SimTask]) -> SimTask:
        return next(t for t in tasks if t.status == "completed" and t.directory_exists)

    def test_get_one_task(
        self, client: httpx.Client, sim: DataPipelineSimulator, tasks: list[SimTask]
    ) -> None:
        """GET .../tasks/{task_id}: status, times and steps, no directory_exists; 404 for an id
        without a row (get_data_pipeline_task_status)."""
        task = self.finished(tasks)
        response = client.get(f"{TASKS}/{task.task_id}")
        assert response.status_code == 200
        data = response.json()["data"]
        assert data["task_id"] == task.task_id
        assert data["status"] == "completed"
        assert "directory_exists" not in data
        assert isinstance(data["step_status"], dict)
        assert [s["step_status"] for s in data["steps"]] == ["completed"] * 4
        local = task.created_at.astimezone(ZoneInfo("Asia/Shanghai")).replace(tzinfo=None)
        assert data["created_at"] == local.isoformat()
        missing = client.get(f"{TASKS}/task_20000101_000000")
        assert missing.status_code == 404
        assert missing.json()["success"] is False
        assert sim.stats["get_requests"] == 2

    def test_reexecuted_right_after_a_listing(
        self, client: httpx.Client, sim: DataPipelineSimulator
    ) -> None:
        """reexecute_rate: finished tasks on a served page go back to in_progress; started_at,
        completed_at and directory_exists are kept (update_task_status sets started_at only
        when empty, and completed_at only on completion); live ones are untouched."""
        before = {t.task_id: (t.started_at, t.completed_at) for t in sim.tasks}
        sim.set_faults(Faults(reexecute_rate=1.0))
        page = client.get(TASKS, params={"limit": 20, "offset": 100}).json()["data"]["tasks"]
        shown_finished = [
            t["task_id"]
            for t in page
            if t["status"] not in ("pending", "in_progress") and t["directory_exists"]
        ]
        assert shown_finished
        assert sorted(sim.reexecuted) == sorted(shown_finished)
        for task_id in shown_finished:
            task = sim.task(task_id)
            assert task is not None
            assert (task.status, task.directory_exists) == ("in_progress", True)
            assert (task.started_at, task.completed_at) == before[task_id]
        live = {t["task_id"] for t in list_all(client, status="in_progress")}
        assert set(shown_finished) <= live

    def test_finishing_again_sets_completed_at(self, sim: DataPipelineSimulator) -> None:
        """A re-executed task that completes or fails gets a new completed_at; one that ends
        partial_completed keeps the old one (the server sets it for completed/failed only)."""
        done = [t for t in sim.tasks if t.status == "completed"][:3]
        old = [t.completed_at for t in done]
        for task, status in zip(done, ("completed", "failed", "partial_completed"), strict=True):
            sim.reexecute(task.task_id)
            sim.finish(task.task_id, status)
        assert done[0].completed_at is not None and old[0] is not None
        assert done[0].completed_at > old[0]
        assert done[1].completed_at is not None and done[1].completed_at > (old[1] or NOW)
        assert done[2].completed_at == old[2]
        assert [t.status for t in done] == ["completed", "failed", "partial_completed"]

    def test_database_update_failure_is_still_reported_deleted(
        self, client: httpx.Client, sim: DataPipelineSimulator, tasks: list[SimTask]
    ) -> None:
        """db_update_failure_rate: the directory goes, the id is reported deleted, the row
        still says directory_exists: true; deleting again finds no directory and fixes the row."""
        task = self.finished(tasks)
        sim.set_faults(Faults(db_update_failure_rate=1.0))
        entry = delete(client, [task.task_id]).json()["data"]["deleted_tasks"][0]
        assert entry["directory_deleted"] is True
        assert sim.deleted_ids == [task.task_id]
        assert sim.db_update_failed == [task.task_id]
        listed = {t["task_id"]: t for t in list_all(client)}
        assert listed[task.task_id]["directory_exists"] is True
        sim.set_faults(Faults())
        again = delete(client, [task.task_id]).json()["data"]["deleted_tasks"][0]
        assert again["directory_deleted"] is False
        assert {t["task_id"]: t for t in list_all(client)}[task.task_id][
            "directory_exists"
        ] is False

    def test_acknowledged_without_effect(
        self, client: httpx.Client, sim: DataPipelineSimulator, tasks: list[SimTask]
    ) -> None:
        """ack_without_effect_rate: reported deleted with its files, nothing done."""
        task = self.finished(tasks)
        sim.set_faults(Faults(ack_without_effect_rate=1.0))
        entry = delete(client, [task.task_id]).json()["data"]["deleted_tasks"][0]
        assert entry["directory_deleted"] is True
        assert entry["deleted_files_count"] == task.files_count
        assert sim.deleted_ids == []
        assert sim.acknowledged_not_done == [task.task_id]
        assert {t["task_id"]: t for t in list_all(client)}[task.task_id]["directory_exists"] is True

    def test_acted_then_504(
        self, client: httpx.Client, sim: DataPipelineSimulator, tasks: list[SimTask]
    ) -> None:
        """act_then_504_rate: the deletion happens, the answer is a 504."""
        task = self.finished(tasks)
        sim.set_faults(Faults(act_then_504_rate=1.0))
        assert delete(client, [task.task_id]).status_code == 504
        assert sim.deleted_ids == [task.task_id]

    def test_slow_synchronous_batches_and_overlapping_requests(
        self, sim: DataPipelineSimulator, tasks: list[SimTask]
    ) -> None:
        """delete_ms_per_id: a batch takes its ids' time; a second request for the same ids
        while the first runs is counted as overlapping."""
        ids = [t.task_id for t in tasks[100:104]]
        present = sorted(t.task_id for t in tasks[100:104] if t.directory_exists)
        sim.set_faults(Faults(delete_ms_per_id=150))
        with ThreadPoolExecutor(2) as pool, httpx.Client(base_url=sim.url, timeout=10) as http:
            first = pool.submit(delete, http, ids)
            time.sleep(0.2)
            second = pool.submit(delete, http, ids)
            assert first.result().status_code == second.result().status_code == 200
        assert sim.overlapping_deletes == 1
        assert sorted(sim.deleted_ids) == present

    def test_live_deletions_are_recorded(
        self, client: httpx.Client, sim: DataPipelineSimulator, tasks: list[SimTask]
    ) -> None:
        """The server deletes live tasks too; the simulator keeps them in live_deleted."""
        running = next(t for t in tasks if t.status == "in_progress")
        delete(client, [running.task_id])
        assert sim.live_deleted == [running.task_id]
