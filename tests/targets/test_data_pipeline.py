"""The data_pipeline target against the project's simulator (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from conftest import NOW, make_policy, sim_task

from reaper.errors import ListingError, TargetResponseError
from reaper.runner import build_target
from reaper.simulators import DataPipelineSimulator, Faults
from reaper.targets.base import ListRequest, Outcome, Task
from reaper.targets.data_pipeline import DataPipelineOptions, DataPipelineTarget

Start = Callable[..., tuple[DataPipelineSimulator, str]]


def list_all(url: str, request: ListRequest | None = None, **target: Any) -> list[Task]:
    loaded = make_policy(
        url,
        target={"type": "data_pipeline", "base_url": url, "timestamps_timezone": "UTC", **target},
    )

    async def main() -> list[Task]:
        t, client = build_target(loaded)
        try:
            return [task async for task in t.list_tasks(request or ListRequest("created_at"))]
        finally:
            await client.aclose()

    return asyncio.run(main())


def delete(url: str, ids: list[str], **options: Any) -> Any:
    loaded = make_policy(url)

    async def main() -> Any:
        t, client = build_target(loaded)
        try:
            return await t.delete(ids, DataPipelineOptions(**options))
        finally:
            await client.aclose()

    return asyncio.run(main())


class TestListing:
    def test_pages_until_a_short_page(self, data_pipeline: Start) -> None:
        """250 tasks come back in three pages (100, 100, 50), each exactly once."""
        sim, url = data_pipeline(n=250)
        tasks = list_all(url, verify_total=False)
        assert len(tasks) == 250
        assert len({t.id for t in tasks}) == 250
        assert sim.stats["list_requests"] == 3

    def test_exact_multiple_of_page_size(self, data_pipeline: Start) -> None:
        """200 tasks need a third, empty page to prove the end: `total` is never trusted."""
        sim, url = data_pipeline(n=200)
        assert len(list_all(url, verify_total=False)) == 200
        assert sim.stats["list_requests"] == 3

    def test_small_pages(self, data_pipeline: Start) -> None:
        """A configured page size below the server's cap is honoured."""
        sim, url = data_pipeline(n=35)
        assert len(list_all(url, page_size=10, verify_total=False)) == 35
        assert sim.stats["list_requests"] == 4

    def test_naive_timestamps_in_configured_zone(self, data_pipeline: Start) -> None:
        """The server's naive local timestamps are read in timestamps_timezone."""
        created = datetime(2026, 1, 1, 0, 0, tzinfo=UTC)
        task = sim_task("task_20260101_080000", age=timedelta(0), now=created)
        _, url = data_pipeline([task], timezone="Asia/Shanghai")
        [listed] = list_all(url, timestamps_timezone="Asia/Shanghai")
        assert listed.timestamp == created
        [misread] = list_all(url, timestamps_timezone="UTC")
        assert misread.timestamp == created + timedelta(hours=8)

    def test_age_field_and_match_fields(self, data_pipeline: Start) -> None:
        """Only the requested timestamp is parsed; requested match fields are carried."""
        task = sim_task("task_20261001_120000", status="completed", task_name="nightly")
        _, url = data_pipeline([task])
        [listed] = list_all(url, ListRequest("completed_at", frozenset({"task_name"})))
        assert listed.timestamp == task.completed_at
        assert listed.fields == {"task_name": "nightly"}

    def test_directory_gone_is_reported(self, data_pipeline: Start) -> None:
        """A task listed with directory_exists false is marked gone."""
        task = sim_task("task_20261001_120000", directory_exists=False)
        _, url = data_pipeline([task])
        [listed] = list_all(url)
        assert listed.gone is True

    def test_listing_error_on_5xx(self, data_pipeline: Start) -> None:
        """A page that still fails after retries makes the listing fail, naming the page."""
        _, url = data_pipeline(n=10, faults=Faults(error_rate=1.0))
        with pytest.raises(ListingError, match="listing page 1"):
            list_all(
                url,
                retries={"attempts": 2, "backoff": "0s", "max_backoff": "0s"},
                verify_total=False,
            )

    def test_listing_error_on_malformed_body(self, data_pipeline: Start) -> None:
        """A body that is not JSON makes the listing fail."""
        _, url = data_pipeline(n=10, faults=Faults(malformed_rate=1.0))
        with pytest.raises(ListingError, match=r"not JSON|not a JSON"):
            list_all(url, verify_total=False)

    def test_page_requests(self) -> None:
        """Each page is a GET of the tasks path with limit and offset, until a short page."""
        seen: list[tuple[str, str, dict[str, str]]] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append((request.method, request.url.path, dict(request.url.params)))
            offset = int(request.url.params["offset"])
            tasks = [
                {"task_id": f"task_20261001_{n:06d}", "status": "completed"}
                for n in range(offset, min(offset + 2, 5))
            ]
            return httpx.Response(200, json={"success": True, "data": {"tasks": tasks}})

        loaded = make_policy(
            "http://target.invalid/base/",
            target={
                "type": "data_pipeline",
                "base_url": "http://target.invalid/base/",
                "page_size": 2,
                "verify_total": False,
            },
        )

        async def main() -> list[Task]:
            t, client = build_target(loaded, transport=httpx.MockTransport(handler))
            try:
                return [task async for task in t.list_tasks(ListRequest("created_at"))]
            finally:
                await client.aclose()

        assert len(asyncio.run(main())) == 5
        path = "/base/api/v0/data_pipeline/tasks"
        assert seen == [
            ("GET", path, {"limit": "2", "offset": str(offset)}) for offset in (0, 2, 4)
        ]

    def test_unparseable_timestamp_is_a_problem_not_a_crash(self) -> None:
        """A record whose age field does not parse is returned with `problem` set."""
        target = DataPipelineTarget.__new__(DataPipelineTarget)
        raw = {"task_id": "task_20261001_120000", "status": "completed", "created_at": "soon"}
        task = target._reader(ListRequest("created_at"), ZoneUTC)(raw, "page 1")
        assert task.problem is not None
        assert task.timestamp is None

    @pytest.mark.parametrize(("exists", "gone"), [(True, False), (None, False), (False, True)])
    def test_only_directory_exists_false_is_gone(self, exists: bool | None, gone: bool) -> None:
        """Only an explicit ``directory_exists: false`` marks a listed task as already gone."""
        target = DataPipelineTarget.__new__(DataPipelineTarget)
        raw: dict[str, Any] = {"task_id": "task_20261001_120000", "status": "completed"}
        if exists is not None:
            raw["directory_exists"] = exists
        task = target._reader(ListRequest("created_at"), ZoneUTC)(raw, "page 1")
        assert task.gone is gone
        assert task.timestamp is None
        assert dict(task.fields) == {}

    @pytest.mark.parametrize(
        "raw",
        [{"status": "completed"}, {"task_id": "task_20261001_120000"}, "not an object"],
    )
    def test_entries_without_id_or_status_fail_the_listing(self, raw: Any) -> None:
        """An entry without task_id or status makes the listing incomplete: ListingError."""
        target = DataPipelineTarget.__new__(DataPipelineTarget)
        with pytest.raises(ListingError):
            target._reader(ListRequest("created_at"), ZoneUTC)(raw, "page 1")


ZoneUTC = __import__("zoneinfo").ZoneInfo("UTC")


class TestDelete:
    def test_batch_outcomes_per_id(self, data_pipeline: Start) -> None:
        """Each id's outcome is read from deleted_tasks; sizes become reclaimed bytes."""
        tasks = [sim_task(f"task_20261001_12000{i}", size_bytes=1024 * (i + 1)) for i in range(3)]
        sim, url = data_pipeline(tasks)
        result = delete(url, [t.task_id for t in tasks])
        assert [r.outcome for r in result.results] == [Outcome.DELETED] * 3
        assert [r.reclaimed_bytes for r in result.results] == [1024, 2048, 3072]
        assert sorted(sim.deleted_ids) == sorted(t.task_id for t in tasks)

    def test_already_gone(self, data_pipeline: Start) -> None:
        """An unknown id is 'deleted' by the idempotent server with directory_deleted false."""
        _, url = data_pipeline([])
        [result] = delete(url, ["task_20200101_000000"]).results
        assert result.outcome is Outcome.ALREADY_GONE

    def test_partial_failure(self, data_pipeline: Start) -> None:
        """A partly failed batch is a normal 200: failed ids carry the server's error."""
        tasks = [sim_task(f"task_20261001_12000{i}") for i in range(6)]
        sim, url = data_pipeline(tasks, faults=Faults(partial_failure_rate=0.5))
        result = delete(url, [t.task_id for t in tasks])
        failed = [r for r in result.results if r.outcome is Outcome.FAILED]
        deleted = [r for r in result.results if r.outcome is Outcome.DELETED]
        assert failed and deleted
        assert {r.task_id for r in deleted} == set(sim.deleted_ids)
        assert all(r.error_code == "DELETE_FAILED" and r.error_message for r in failed)

    def test_delete_database_records_option(self, data_pipeline: Start) -> None:
        """delete_database_records is passed through: the record disappears from listings."""
        task = sim_task("task_20261001_120000")
        sim, url = data_pipeline([task])
        delete(url, [task.task_id], delete_database_records=True)
        assert sim.task(task.task_id) is None

    def test_keeps_records_by_default(self, data_pipeline: Start) -> None:
        """By default the record stays, listed with directory_exists false."""
        task = sim_task("task_20261001_120000")
        sim, url = data_pipeline([task])
        delete(url, [task.task_id])
        kept = sim.task(task.task_id)
        assert kept is not None and kept.directory_exists is False

    def test_unrequested_ids_in_the_answer_are_ignored(self) -> None:
        """An answer naming an id we did not send never produces an outcome for it."""

        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(
                200,
                json={
                    "success": True,
                    "data": {
                        "deleted_tasks": [
                            {"task_id": "task_20261001_120000", "directory_deleted": True},
                            {"task_id": "task_19990101_000000", "directory_deleted": True},
                        ],
                        "failed_tasks": [],
                    },
                },
            )

        result = _mock_delete(handler, ["task_20261001_120000", "task_20261001_120001"])
        assert [(r.task_id, r.outcome) for r in result.results] == [
            ("task_20261001_120000", Outcome.DELETED),
            ("task_20261001_120001", Outcome.UNKNOWN),
        ]

    def test_error_body_is_kept(self) -> None:
        """A 400 answer raises with the server's specific message (data.response)."""

        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(
                400,
                json={
                    "success": False,
                    "code": 400,
                    "message": "bad",
                    "data": {
                        "response": "task_ids必须是非空的任务ID列表",
                        "error_type": "INVALID_PARAMS",
                    },
                },
            )

        with pytest.raises(TargetResponseError) as info:
            _mock_delete(handler, ["task_20261001_120000"])
        assert info.value.http_status == 400
        assert info.value.error_code == "INVALID_PARAMS"
        assert info.value.error_message == "task_ids必须是非空的任务ID列表"

    def test_request_body_is_the_documented_one(self) -> None:
        """The request carries task_ids, confirm: true and the delete options."""
        seen: list[bytes] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request.content)
            return httpx.Response(200, json={"data": {"deleted_tasks": [], "failed_tasks": []}})

        _mock_delete(handler, ["task_20261001_120000"])
        import json

        assert json.loads(seen[0]) == {
            "task_ids": ["task_20261001_120000"],
            "confirm": True,
            "delete_database_records": False,
            "continue_on_error": True,
        }


def _mock_delete(handler: Callable[[httpx.Request], httpx.Response], ids: list[str]) -> Any:
    loaded = make_policy("http://target.invalid")

    async def main() -> Any:
        t, client = build_target(loaded, transport=httpx.MockTransport(handler))
        try:
            return await t.delete(ids, DataPipelineOptions())
        finally:
            await client.aclose()

    return asyncio.run(main())


class TestIdGuard:
    @pytest.mark.parametrize(
        "task_id",
        ["task_20250702_223802", "manual_20250702_223802"],
    )
    def test_valid_ids(self, task_id: str) -> None:
        """Documented id forms pass the guard."""
        assert DataPipelineTarget.invalid_id_reason(None, task_id) is None  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        "task_id",
        [
            "task_20250702_223802\n",
            "../../etc",
            "task_20250702_223802/../../x",
            "task_2025070_223802",
            "TASK_20250702_223802",
            "task_20250702_223802 ",
            "",
        ],
    )
    def test_invalid_ids(self, task_id: str) -> None:
        """Anything else is refused, including a trailing newline (fullmatch, not $)."""
        assert DataPipelineTarget.invalid_id_reason(None, task_id) is not None  # type: ignore[arg-type]


_ = NOW
