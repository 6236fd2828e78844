"""The independent server does what TARGETS.md section 1 says the real service does."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest

from .independent_server import PREFIX, Behaviour, IndependentServer

OLD = timedelta(days=40)


@pytest.fixture
def server() -> Iterator[IndependentServer]:
    s = IndependentServer("America/Los_Angeles")
    yield s
    s.stop()


def delete(url: str, ids: list[str], **extra: object) -> httpx.Response:
    body = {"task_ids": ids, "confirm": True, "delete_database_records": False, **extra}
    return httpx.request("DELETE", url + PREFIX, json=body, timeout=10)


class TestListing:
    def test_total_is_the_page_length_and_limit_is_capped(self, server: IndependentServer) -> None:
        """`total` counts the page, not the matches; limit is capped at 100."""
        for n in range(130):
            server.add(f"task_20250101_{n:06d}", "completed", OLD + timedelta(minutes=n))
        url = server.start()
        data = httpx.get(url + PREFIX, params={"limit": 500, "offset": 100}).json()["data"]
        assert (data["limit"], data["total"], len(data["tasks"])) == (100, 30, 30)

    def test_newest_first_with_naive_local_timestamps(self, server: IndependentServer) -> None:
        """Ordered by created_at descending; timestamps have no offset."""
        server.add("task_20250101_000001", "completed", OLD)
        server.add("task_20250101_000002", "failed", OLD - timedelta(hours=1))
        url = server.start()
        tasks = httpx.get(url + PREFIX).json()["data"]["tasks"]
        assert [t["task_id"] for t in tasks] == ["task_20250101_000002", "task_20250101_000001"]
        assert "+" not in tasks[0]["created_at"] and not tasks[0]["created_at"].endswith("Z")
        assert tasks[0]["directory_exists"] is True

    def test_query_rejects_real_statuses_with_500(self, server: IndependentServer) -> None:
        """POST /tasks/query answers 500 for in_progress, partial_completed and page_size > 100."""
        url = server.start()
        for body in (
            {"status": "in_progress"},
            {"status": "partial_completed"},
            {"page_size": 101},
        ):
            assert httpx.post(url + PREFIX + "/query", json=body).status_code == 500

    def test_query_time_filter_ignores_offsets(self, server: IndependentServer) -> None:
        """A time bound with an offset is read as a naive local time (PostgreSQL's cast)."""
        row = server.add("task_20250101_000001", "completed", OLD)
        assert row.completed_at is not None
        url = server.start()
        local = row.completed_at.isoformat()
        for suffix, count in (("", 1), ("+08:00", 1), ("Z", 1)):
            body = {"completed_time_start": local + suffix, "page_size": 100}
            data = httpx.post(url + PREFIX + "/query", json=body).json()["data"]
            assert data["pagination"]["total"] == count
        later = (row.completed_at + timedelta(seconds=1)).isoformat()
        body = {"completed_time_start": later}
        assert httpx.post(url + PREFIX + "/query", json=body).json()["data"]["tasks"] == []

    def test_get_one_and_404(self, server: IndependentServer) -> None:
        """GET one task answers its status, or 404 without a row."""
        server.add("task_20250101_000001", "failed", OLD)
        url = server.start()
        assert (
            httpx.get(url + PREFIX + "/task_20250101_000001").json()["data"]["status"] == "failed"
        )
        assert httpx.get(url + PREFIX + "/task_20250101_000009").status_code == 404


class TestDelete:
    def test_deletes_live_tasks_and_unknown_ids_alike(self, server: IndependentServer) -> None:
        """The server checks no status: a live task is deleted, an unknown id acknowledged."""
        server.add("task_20250101_000001", "in_progress", OLD)
        url = server.start()
        data = delete(url, ["task_20250101_000001", "task_20250101_000009"]).json()["data"]
        assert [d["directory_deleted"] for d in data["deleted_tasks"]] == [True, False]
        assert server.record.deleted_while_live() == {"task_20250101_000001"}
        listed = httpx.get(url + PREFIX).json()["data"]["tasks"][0]
        assert listed["directory_exists"] is False and listed["updated_at"] is not None

    def test_refuses_without_confirm(self, server: IndependentServer) -> None:
        """400 without confirm: true; nothing done."""
        server.add("task_20250101_000001", "completed", OLD)
        url = server.start()
        assert delete(url, ["task_20250101_000001"], confirm="yes").status_code == 400
        assert server.record.processed == []

    def test_row_update_failure_is_acknowledged(self) -> None:
        """The directory goes, the row update fails, the id is still in deleted_tasks."""
        behaviour = Behaviour(row_update_fails={"task_20250101_000001": 1})
        server = IndependentServer(behaviour=behaviour)
        server.add("task_20250101_000001", "completed", OLD)
        url = server.start()
        try:
            data = delete(url, ["task_20250101_000001"]).json()["data"]
            assert data["deleted_tasks"][0]["directory_deleted"] is True
            assert httpx.get(url + PREFIX).json()["data"]["tasks"][0]["directory_exists"] is True
            assert server.record.acknowledged_not_done() == {"task_20250101_000001"}
            again = delete(url, ["task_20250101_000001"]).json()["data"]["deleted_tasks"][0]
            assert again["directory_deleted"] is False
            assert httpx.get(url + PREFIX).json()["data"]["tasks"][0]["directory_exists"] is False
        finally:
            server.stop()

    def test_act_then_504(self) -> None:
        """The batch is carried out, then a gateway answers 504, once."""
        server = IndependentServer(behaviour=Behaviour(act_then_504={"task_20250101_000001"}))
        server.add("task_20250101_000001", "completed", OLD)
        url = server.start()
        try:
            assert delete(url, ["task_20250101_000001"]).status_code == 504
            assert server.record.acted_then_5xx() == {"task_20250101_000001"}
            assert delete(url, ["task_20250101_000001"]).status_code == 200
        finally:
            server.stop()

    def test_gateway_timeout_leaves_the_server_working(self) -> None:
        """A slow batch is answered 504 by the gateway and finished in the background."""
        behaviour = Behaviour(gateway_timeout=0.05, per_id_seconds=0.1)
        server = IndependentServer(behaviour=behaviour)
        ids = [f"task_20250101_00000{n}" for n in range(3)]
        for n, task_id in enumerate(ids):
            server.add(task_id, "completed", OLD + timedelta(minutes=n))
        url = server.start()
        try:
            assert delete(url, ids).status_code == 504
        finally:
            server.stop()  # waits for the background work
        assert set(server.record.directories_removed()) == set(ids)
        assert server.record.acted_then_5xx() == set(ids)

    def test_overlapping_requests_are_recorded(self) -> None:
        """Two requests for the same id at once are recorded as overlapping."""
        server = IndependentServer(behaviour=Behaviour(per_id_seconds=0.2))
        server.add("task_20250101_000001", "completed", OLD)
        url = server.start()
        try:
            threads = [
                threading.Thread(target=delete, args=(url, ["task_20250101_000001"]))
                for _ in range(2)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            server.stop()
        assert [o[2] for o in server.record.overlapping()] == [frozenset({"task_20250101_000001"})]


class TestRerun:
    def test_rerun_after_listing(self) -> None:
        """A finished task listed once is in_progress afterwards; completed_at is kept."""
        server = IndependentServer(
            behaviour=Behaviour(rerun_on_list={"task_20250101_000001": None})
        )
        row = server.add("task_20250101_000001", "completed", OLD)
        finished = row.completed_at
        url = server.start()
        try:
            first = httpx.get(url + PREFIX).json()["data"]["tasks"][0]
            second = httpx.get(url + PREFIX).json()["data"]["tasks"][0]
        finally:
            server.stop()
        assert (first["status"], second["status"]) == ("completed", "in_progress")
        assert second["completed_at"] == first["completed_at"] == finished.isoformat()  # type: ignore[union-attr]

    def test_rerun_and_finish_moves_completed_at(self) -> None:
        """A re-run that finishes at once is completed again, with completed_at now."""
        server = IndependentServer(
            behaviour=Behaviour(rerun_on_list={"task_20250101_000001": "completed"})
        )
        row = server.add("task_20250101_000001", "completed", OLD)
        url = server.start()
        try:
            httpx.get(url + PREFIX)
        finally:
            server.stop()
        assert row.status == "completed"
        assert row.completed_at is not None and row.completed_at > server.now() - timedelta(
            minutes=1
        )
