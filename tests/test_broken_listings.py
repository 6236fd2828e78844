"""Broken listings delete nothing and name the cause (simulator over real HTTP).

Each case breaks one page of an otherwise healthy data_pipeline simulator; the policy would
otherwise delete 250 tasks. The simulator's own record proves that nothing was deleted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from conftest import NOW, make_policy, sim_task

from reaper.audit import AuditStore
from reaper.runner import RunStatus, run_policy
from reaper.simulators import DataPipelineSimulator
from reaper.simulators.base import Request, Response

Breaker = Callable[[int, dict[str, Any], "Broken"], Response | None]


class Broken(DataPipelineSimulator):
    """A simulator whose listing page at a given offset is broken by a function."""

    breaker: Breaker
    calls: int = 0

    def _list(self, request: Request) -> Response:
        response = super()._list(request)
        offset = int(request.arg("offset") or 0)
        body = json.loads(response.body)
        replaced = self.breaker(offset, body, self)
        if replaced is not None:
            return replaced
        return Response.json(body, status=response.status)


def tasks() -> list[Any]:
    return [
        sim_task(f"task_20260901_{i:06d}", age=timedelta(days=40, minutes=i)) for i in range(250)
    ]


@pytest.fixture
def broken() -> Iterator[Callable[[Breaker], tuple[Broken, str]]]:
    started: list[Broken] = []

    def start(breaker: Breaker) -> tuple[Broken, str]:
        sim = Broken(tasks(), timezone="UTC")
        sim.breaker = breaker
        url = sim.start()
        started.append(sim)
        return sim, url

    yield start
    for sim in started:
        sim.stop()


def at(offset: int, change: Callable[[dict[str, Any]], Response | None]) -> Breaker:
    def breaker(page_offset: int, body: dict[str, Any], sim: Broken) -> Response | None:
        return change(body) if page_offset == offset else None

    return breaker


def server_error(body: dict[str, Any]) -> Response:
    return Response.json({"success": False, "code": 500, "message": "boom"}, status=500)


def not_json(body: dict[str, Any]) -> Response:
    return Response(status=200, body=b"<html>502 Bad Gateway</html>", content_type="text/html")


def missing_id(body: dict[str, Any]) -> None:
    del body["data"]["tasks"][7]["task_id"]


def bad_timestamp(body: dict[str, Any]) -> None:
    body["data"]["tasks"][3]["created_at"] = "2026-02-30T25:61:00"


def empty(body: dict[str, Any]) -> None:
    body["data"]["tasks"] = []
    body["data"]["total"] = 0


def short(body: dict[str, Any]) -> None:
    body["data"]["tasks"] = body["data"]["tasks"][:50]
    body["data"]["total"] = 50


def duplicate_inside(body: dict[str, Any]) -> None:
    body["data"]["tasks"][10] = body["data"]["tasks"][60]


def no_tasks_key(body: dict[str, Any]) -> None:
    del body["data"]["tasks"]


def repeat_previous_page(page_offset: int, body: dict[str, Any], sim: Broken) -> Response | None:
    if page_offset == 200:
        previous = sim._list(
            Request(
                "GET", "/api/v0/data_pipeline/tasks", {"offset": ["100"], "limit": ["100"]}, {}, b""
            )
        )
        return previous
    return None


CASES = {
    "500 on page 3": (at(200, server_error), "listing page 3 (offset 200)"),
    "non-JSON page 2": (at(100, not_json), "listing page 2 (offset 100): the body is not JSON"),
    "a page that repeats": (repeat_previous_page, "the page repeats the previous one"),
    "missing id field": (at(100, missing_id), "listing page 2 (offset 100): a task has no task_id"),
    "timestamp that does not parse": (
        at(0, bad_timestamp),
        "cannot be planned: created_at does not parse",
    ),
    "empty page in the middle": (
        at(100, empty),
        "the listing returned 100 task(s) but the server holds 250",
    ),
    "short page in the middle": (
        at(100, short),
        "the listing returned 150 task(s) but the server holds 250",
    ),
    "duplicate id inside a page": (at(0, duplicate_inside), "twice"),
    "no tasks list": (at(100, no_tasks_key), "the body has no data.tasks list"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_listing_deletes_nothing(
    case: str, broken: Callable[[Breaker], tuple[Broken, str]], store: AuditStore
) -> None:
    """Whatever breaks in the listing, the policy aborts with the cause and deletes nothing."""
    breaker, cause = CASES[case]
    sim, url = broken(breaker)
    loaded = make_policy(
        url,
        target={
            "type": "data_pipeline",
            "base_url": url,
            "retries": {"attempts": 2, "backoff": "0s", "max_backoff": "0s"},
        },
        delete={"max_deletions": 1000, "max_fraction": 1.0},
    )
    result = asyncio.run(run_policy(loaded, store, now=NOW))
    assert result.status is RunStatus.ABORTED
    assert cause in (result.error or ""), result.error
    assert "nothing deleted" in (result.error or "")
    assert sim.stats["delete_requests"] == 0
    assert sim.deleted_ids == []
    assert store.rows() == []


def test_the_healthy_listing_deletes(
    broken: Callable[[Breaker], tuple[Broken, str]], store: AuditStore
) -> None:
    """The same simulator unbroken: all 250 are deleted (the cases above are not vacuous)."""
    sim, url = broken(lambda offset, body, sim: None)
    loaded = make_policy(url, delete={"max_deletions": 1000})
    result = asyncio.run(run_policy(loaded, store, now=NOW))
    assert result.status is RunStatus.SUCCEEDED, result.error
    assert len(sim.deleted_ids) == 250


def test_tasks_arriving_during_the_listing_are_tolerated(
    broken: Callable[[Breaker], tuple[Broken, str]], store: AuditStore
) -> None:
    """New tasks at the head shift pages by one: the repeated record is skipped, not an error."""
    arrived: list[bool] = []

    def arrive(offset: int, body: dict[str, Any], sim: Broken) -> None:
        if offset == 100 and not arrived:
            arrived.append(True)
            sim.add_tasks([sim_task("task_20261101_115900", age=timedelta(minutes=1))])
            # this page was rendered before the arrival; the next one will be shifted
        return None

    sim, url = broken(arrive)
    loaded = make_policy(url, delete={"max_deletions": 1000})
    result = asyncio.run(run_policy(loaded, store, now=NOW))
    assert result.status is RunStatus.SUCCEEDED, result.error
    assert arrived
    # the new task arrived behind the listing's position: each old task was listed once
    assert result.summary.listed == 250
    assert len(sim.deleted_ids) == 250
    assert "task_20261101_115900" not in sim.deleted_ids
