"""The send-time re-check (reaper.recheck.SendCheck), with a scripted target and clock."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import NOW, make_policy

from reaper.errors import ListingError
from reaper.plan import Candidate, Planner
from reaper.recheck import RecheckTooSlow, SendCheck
from reaper.targets.base import ListRequest, Outcome, Recheck, RecheckRequest, Task
from reaper.targets.data_pipeline import DataPipelineTarget

OLD = NOW - timedelta(days=40)
SELECT = {"status": ["completed", "failed"], "older_than": "30d"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeStats:
    requests = 0


class FakeHttp:
    stats = FakeStats()


class ScriptedTarget:
    """A target whose re-check answers are scripted; it records what it was asked."""

    server_refuses_live: str | None = None

    def __init__(self, answer: Any, clock: Clock, takes: float = 0.0) -> None:
        self.answer = answer
        self.clock = clock
        self.takes = takes
        self.calls: list[tuple[list[str], list[str], RecheckRequest]] = []
        self.http = FakeHttp()

    async def recheck(
        self, ids: Sequence[str], upcoming: Sequence[str], request: RecheckRequest
    ) -> Recheck:
        self.calls.append((list(ids), list(upcoming), request))
        self.clock.now += self.takes
        self.http.stats.requests += 1
        result: Recheck = self.answer(list(ids), list(upcoming))
        return result


def candidate(task_id: str, status: str = "completed") -> Candidate:
    return Candidate(task_id, status, OLD, "older than 30d and status completed")


def decide_for(**sections: Any) -> Any:
    """The plan's own decision function for a data_pipeline policy (select completed, failed)."""
    loaded = make_policy("http://sim.invalid", **sections)
    return Planner(loaded, DataPipelineTarget.__new__(DataPipelineTarget), NOW).decide


def make_check(target: ScriptedTarget, clock: Clock, **sections: Any) -> SendCheck:
    request = RecheckRequest(
        listing=ListRequest("created_at"),
        eligible_statuses=frozenset({"completed", "failed"}),
    )
    return SendCheck(
        target,  # type: ignore[arg-type]
        request,
        decide_for(**sections),
        60.0,
        ids_per_second=100.0,
        remaining=lambda: 1000,
        clock=clock,
    )


def no_upcoming(count: int) -> tuple[list[str], dict[str, datetime]]:
    return [], {}


def clear(check: SendCheck, batch: list[Candidate], upcoming: Any = no_upcoming) -> Any:
    return asyncio.run(check.clear(batch, upcoming))


def snapshot(seen: dict[str, Task]) -> Any:
    return lambda ids, upcoming: Recheck(seen, None, means="re-listed")


class TestSnapshot:
    """A re-listing of the statuses that exclude a task speaks for every task while fresh."""

    def test_first_batch_is_checked_and_unchanged_tasks_are_sent(self) -> None:
        """Tasks absent from the re-listing of excluded statuses are still deletable."""
        clock = Clock()
        target = ScriptedTarget(snapshot({}), clock)
        check = make_check(target, clock)
        cleared = clear(check, [candidate("task_20260901_000001")])
        assert [c.task_id for c in cleared.send] == ["task_20260901_000001"]
        assert cleared.dropped == []
        assert cleared.not_after == 1000.0 + 60.0
        assert len(target.calls) == 1

    def test_a_task_now_live_is_dropped_with_what_was_seen(self) -> None:
        """A task re-listed as in_progress is not sent: skipped_changed, status and time noted."""
        clock = Clock()
        live = Task("task_20260901_000001", "in_progress", OLD)
        target = ScriptedTarget(snapshot({live.id: live}), clock)
        check = make_check(target, clock)
        cleared = clear(check, [candidate(live.id), candidate("task_20260901_000002")])
        assert [c.task_id for c in cleared.send] == ["task_20260901_000002"]
        [dropped] = cleared.dropped
        assert dropped.outcome is Outcome.SKIPPED_CHANGED
        assert dropped.note is not None
        assert "status in_progress" in dropped.note
        assert "protected: in_progress" in dropped.note
        assert "re-checked at" in dropped.note

    def test_a_task_now_in_an_unselected_status_is_dropped(self) -> None:
        """Status now outside select.status: not eligible any more, not sent."""
        clock = Clock()
        moved = Task("task_20260901_000001", "partial_completed", OLD)
        target = ScriptedTarget(snapshot({moved.id: moved}), clock)
        check = make_check(target, clock)
        cleared = clear(check, [candidate(moved.id)])
        assert cleared.send == []
        assert "status partial_completed not selected" in (cleared.dropped[0].note or "")

    def test_one_check_serves_later_batches_while_fresh(self) -> None:
        """Within max_staleness minus the margin, no further request is made."""
        clock = Clock()
        target = ScriptedTarget(snapshot({}), clock)
        check = make_check(target, clock)
        clear(check, [candidate("task_20260901_000001")])
        clock.now += 44.0  # margin is min(60/4, 15) = 15 s
        cleared = clear(check, [candidate("task_20260901_000002")])
        assert len(target.calls) == 1
        assert cleared.not_after == 1000.0 + 60.0

    def test_a_check_about_to_go_stale_is_made_again(self) -> None:
        """Less than the margin left: the batch is checked anew, and its deadline moves on."""
        clock = Clock()
        target = ScriptedTarget(snapshot({}), clock)
        check = make_check(target, clock)
        clear(check, [candidate("task_20260901_000001")])
        clock.now += 46.0
        cleared = clear(check, [candidate("task_20260901_000002")])
        assert len(target.calls) == 2
        assert cleared.not_after == 1046.0 + 60.0

    def test_a_check_slower_than_the_staleness_allows_fails(self) -> None:
        """A re-check that takes longer than max_staleness minus the margin cannot clear."""
        clock = Clock()
        target = ScriptedTarget(snapshot({}), clock, takes=50.0)
        check = make_check(target, clock)
        with pytest.raises(RecheckTooSlow):
            clear(check, [candidate("task_20260901_000001")])

    def test_a_failing_check_raises(self) -> None:
        """A re-check that fails (ListingError) propagates: the executor sends nothing."""
        clock = Clock()

        def broken(ids: list[str], upcoming: list[str]) -> Recheck:
            raise ListingError("page 2: HTTP 500")

        check = make_check(ScriptedTarget(broken, clock), clock)
        with pytest.raises(ListingError):
            clear(check, [candidate("task_20260901_000001")])


class TestCoveredIds:
    """A check by id or time window speaks for the ids it covered, and only those."""

    def test_upcoming_ids_are_offered_and_covered_ones_need_no_second_request(self) -> None:
        """The target is asked about the batch and the ids due next; a covered id is not asked
        again while fresh."""
        clock = Clock()

        def by_id(ids: list[str], upcoming: list[str]) -> Recheck:
            wanted = frozenset(ids) | frozenset(upcoming)
            seen = {i: Task(i, "completed", OLD) for i in wanted}
            return Recheck(seen, wanted, means="window")

        target = ScriptedTarget(by_id, clock)
        check = make_check(target, clock)
        upcoming = (["task_20260901_000002"], {"task_20260901_000002": OLD})
        clear(check, [candidate("task_20260901_000001")], lambda n: upcoming)
        cleared = clear(check, [candidate("task_20260901_000002")])
        assert len(target.calls) == 1
        assert target.calls[0][1] == ["task_20260901_000002"]
        assert [c.task_id for c in cleared.send] == ["task_20260901_000002"]

    def test_gone_since_the_listing_is_already_gone_and_not_sent(self) -> None:
        """An id the check found absent is recorded already_gone, never sent."""
        clock = Clock()
        gone = "task_20260901_000001"
        target = ScriptedTarget(
            lambda ids, up: Recheck({}, frozenset(ids), frozenset(ids), means="get"), clock
        )
        cleared = clear(make_check(target, clock), [candidate(gone)])
        assert cleared.send == []
        assert cleared.dropped[0].outcome is Outcome.ALREADY_GONE
        assert "no longer on the target" in (cleared.dropped[0].note or "")

    def test_an_id_the_target_did_not_speak_for_is_never_sent(self) -> None:
        """A check that leaves an asked id uncovered fails safe: the id is not sent."""
        clock = Clock()
        target = ScriptedTarget(lambda ids, up: Recheck({}, frozenset(), means="bad"), clock)
        cleared = clear(make_check(target, clock), [candidate("task_20260901_000001")])
        assert cleared.send == []

    def test_records_without_match_fields_are_judged_on_status_and_age(self) -> None:
        """A per-task status answer lacks the fields select.match reads: the task is judged on
        its status and age only, not dropped for a field the answer does not carry."""
        clock = Clock()
        task_id = "task_20260901_000001"
        target = ScriptedTarget(
            lambda ids, up: Recheck(
                {task_id: Task(task_id, "completed", OLD)},
                frozenset(ids),
                means="get",
                fields=False,
            ),
            clock,
        )
        check = make_check(target, clock, select={**SELECT, "match": {"db_name": "^highway"}})
        cleared = clear(check, [candidate(task_id)])
        assert [c.task_id for c in cleared.send] == [task_id]

    def test_status_only_records_are_still_judged_on_age(self) -> None:
        """A fresh age field younger than the cutoff (the task ran again) drops the task."""
        clock = Clock()
        task_id = "task_20260901_000001"
        young = NOW - timedelta(days=1)
        target = ScriptedTarget(
            lambda ids, up: Recheck(
                {task_id: Task(task_id, "completed", young)},
                frozenset(ids),
                means="get",
                fields=False,
            ),
            clock,
        )
        check = make_check(target, clock, select={**SELECT, "age_field": "completed_at"})
        cleared = clear(check, [candidate(task_id)])
        assert cleared.send == []
        assert "younger than 30d" in (cleared.dropped[0].note or "")


class TestServerRefusesLive:
    def test_no_check_when_the_server_refuses_live_tasks(self) -> None:
        """A target whose server refuses unfinished tasks is not asked; nothing is dropped."""
        clock = Clock()
        target = ScriptedTarget(snapshot({}), clock)
        target.server_refuses_live = "the server refuses"
        check = make_check(target, clock)
        cleared = clear(check, [candidate("task_20260901_000001")])
        assert target.calls == []
        assert len(cleared.send) == 1
        assert cleared.not_after is None


def test_candidate_timestamps_are_aware() -> None:
    """The window a target re-lists is built from aware UTC timestamps."""
    assert candidate("task_20260901_000001").timestamp.tzinfo is UTC


class TestExecutorStopsOnSlowChecks:
    def test_a_too_slow_check_stops_the_run(self, data_pipeline: Any, store: Any) -> None:
        """A re-check slower than max_staleness allows fails its batch unsent and stops the run:
        every further check would be as slow."""
        from conftest import sim_task

        import reaper.recheck
        from reaper.runner import RunStatus, run_policy

        tasks = [
            sim_task(f"task_20260901_{i:06d}", age=timedelta(days=40, minutes=i)) for i in range(30)
        ]
        sim, url = data_pipeline(tasks)
        loaded = make_policy(
            url,
            target={"type": "data_pipeline", "base_url": url, "timestamps_timezone": "UTC"},
            delete={"batch_size": 5, "rate": "200/s", "concurrency": 1},
        )
        original = reaper.recheck.SendCheck._check

        async def slow(self: SendCheck, stale: Any, upcoming: Any) -> None:
            raise RecheckTooSlow("re-checking took 50 s")

        reaper.recheck.SendCheck._check = slow  # type: ignore[method-assign]
        try:
            result = asyncio.run(run_policy(loaded, store, now=NOW))
        finally:
            reaper.recheck.SendCheck._check = original  # type: ignore[method-assign]
        assert result.status is RunStatus.ABORTED
        assert "re-checking took 50 s" in (result.error or "")
        assert sim.stats["delete_requests"] == 0
