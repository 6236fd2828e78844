"""Planning: which listed tasks a policy deletes, which it keeps, and the reason for each."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from unittest import mock
from zoneinfo import ZoneInfo

import pytest
from conftest import NOW, make_policy
from hypothesis import given, settings
from hypothesis import strategies as st

from reaper.errors import ListingError
from reaper.http import TargetHttp
from reaper.plan import Candidate, Plan, Planner, Rule, Verdict, build_rules, make_plan
from reaper.policy import LoadedPolicy
from reaper.targets.base import BatchResult, DeleteOptions, ListRequest, Target, Task
from reaper.targets.data_pipeline import DataPipelineTarget

URL = "http://127.0.0.1:8084"
GUARD = "id does not match ^(task|manual)_[0-9]{8}_[0-9]{6}$ (path-traversal guard)"
SHANGHAI = ZoneInfo("Asia/Shanghai")


def tid(n: int) -> str:
    """A valid data_pipeline task id, unique per ``n``."""
    return f"task_20250101_{n:06d}"


def task(n: int, status: str = "completed", age: timedelta = timedelta(days=40), **kw: Any) -> Task:
    """A listed task ``age`` old at NOW."""
    return Task(tid(n), status, NOW - age, **kw)


def target_for(loaded: LoadedPolicy) -> DataPipelineTarget:
    """A data_pipeline target for planning only: the planner never does I/O."""
    return DataPipelineTarget(loaded.policy.target_config, cast(TargetHttp, None))


def plan_of(tasks: Iterable[Task], now: datetime = NOW, **sections: Any) -> Plan:
    """Plan ``tasks`` under a data_pipeline policy whose sections are replaced by ``sections``."""
    loaded = make_policy(URL, **sections)
    planner = Planner(loaded, target_for(loaded), now)
    for item in tasks:
        planner.add(item)
    return planner.finish()


def ids(plan: Plan) -> list[str]:
    return [candidate.task_id for candidate in plan.candidates()]


def counts(plan: Plan) -> dict[tuple[str, str], int]:
    """The plan's counts by (verdict, reason), with plain-string verdicts for readable diffs."""
    return {(str(verdict), reason): n for (verdict, reason), n in plan.counts.items()}


def example_ids(plan: Plan, verdict: Verdict, reason: str) -> list[str]:
    return [example.task_id for example in plan.examples[(verdict, reason)]]


def listed(raw: dict[str, Any], age_field: str = "created_at", zone: ZoneInfo = SHANGHAI) -> Task:
    """A raw data_pipeline listing entry read the way the target reads it."""
    loaded = make_policy(URL)
    request = ListRequest(age_field=age_field, match_fields=frozenset({"task_id", "task_name"}))
    return target_for(loaded)._reader(request, zone)(raw, "listing page 1 (offset 0)")


class TestStatusSelection:
    def test_only_selected_statuses_are_candidates(self) -> None:
        """Old tasks are candidates only if their status is selected."""
        plan = plan_of(
            [task(1, "completed"), task(2, "failed"), task(3, "partial_completed")],
        )
        assert ids(plan) == [tid(1), tid(2)]
        assert counts(plan)[("unselected", "status partial_completed not selected")] == 1

    def test_live_statuses_are_protected_by_default(self) -> None:
        """Running tasks are protected even though the policy never mentions them."""
        plan = plan_of([task(1, "pending"), task(2, "in_progress"), task(3)])
        assert ids(plan) == [tid(3)]
        assert counts(plan) == {
            ("protected", "protected: pending"): 1,
            ("protected", "protected: in_progress"): 1,
            ("delete", "older than 30d and status completed"): 1,
        }

    def test_allow_live_lifts_the_live_protection(self) -> None:
        """With allow_live a selected live status is deleted; an unselected one is unselected."""
        select = {"status": ["pending"], "older_than": "30d", "allow_live": True}
        plan = plan_of([task(1, "pending"), task(2, "in_progress")], select=select)
        assert ids(plan) == [tid(1)]
        assert counts(plan) == {
            ("delete", "older than 30d and status pending"): 1,
            ("unselected", "status in_progress not selected"): 1,
        }


class TestAge:
    def test_cutoff_is_now_minus_older_than(self) -> None:
        """The plan's cutoff is the planning instant minus select.older_than."""
        plan = plan_of([])
        assert plan.cutoff == NOW - timedelta(days=30)
        assert plan.created_at == NOW

    def test_a_task_exactly_at_the_cutoff_is_kept(self) -> None:
        """Eligible means strictly older than the cutoff."""
        cutoff = NOW - timedelta(days=30)
        plan = plan_of(
            [
                Task(tid(1), "completed", cutoff),
                Task(tid(2), "completed", cutoff - timedelta(microseconds=1)),
                Task(tid(3), "completed", cutoff + timedelta(microseconds=1)),
            ]
        )
        assert ids(plan) == [tid(2)]
        assert example_ids(plan, Verdict.KEEP, "kept: younger than 30d") == [tid(1), tid(3)]

    def test_a_task_without_the_age_field_is_kept(self) -> None:
        """A matching task with no timestamp cannot be aged, so it is kept."""
        plan = plan_of([Task(tid(1), "completed", None), task(2)])
        assert ids(plan) == [tid(2)]
        assert counts(plan)[("keep", "kept: no created_at")] == 1

    def test_the_reason_names_the_chosen_age_field(self) -> None:
        """With age_field completed_at a task lacking it is 'kept: no completed_at'."""
        select = {"status": ["completed"], "older_than": "7d", "age_field": "completed_at"}
        plan = plan_of([Task(tid(1), "completed", None)], select=select)
        assert counts(plan) == {("keep", "kept: no completed_at"): 1}

    def test_age_is_measured_on_the_chosen_field(self) -> None:
        """The listing reads the policy's age field: an old task finished yesterday is young."""
        raw = {
            "task_id": tid(1),
            "status": "completed",
            "created_at": "2026-08-01T10:00:00",
            "completed_at": "2026-10-31T10:00:00",
        }
        by_created = listed(raw, "created_at")
        by_completed = listed(raw, "completed_at")
        assert plan_of([by_created]).eligible == 1
        select = {"status": ["completed"], "older_than": "30d", "age_field": "completed_at"}
        plan = plan_of([by_completed], select=select)
        assert counts(plan) == {("keep", "kept: younger than 30d"): 1}


class TestMatch:
    def test_patterns_use_search_semantics(self) -> None:
        """A pattern matches anywhere in the field unless it is anchored."""
        anywhere = {"status": ["completed"], "older_than": "30d", "match": {"task_id": "0101"}}
        anchored = {"status": ["completed"], "older_than": "30d", "match": {"task_id": "^0101"}}
        assert ids(plan_of([task(1)], select=anywhere)) == [tid(1)]
        plan = plan_of([task(1)], select=anchored)
        assert plan.eligible == 0
        assert counts(plan) == {("unselected", "task_id does not match ^0101"): 1}

    def test_every_pattern_must_match(self) -> None:
        """A task failing any one pattern is not selected, naming the pattern that failed."""
        select = {
            "status": ["completed"],
            "older_than": "30d",
            "match": {"task_id": "^task_", "task_name": "^nightly-"},
        }
        tasks = [
            task(1, fields={"task_id": tid(1), "task_name": "nightly-etl"}),
            task(2, fields={"task_id": tid(2), "task_name": "adhoc-etl"}),
            task(3, fields={"task_id": tid(3)}),
        ]
        plan = plan_of(tasks, select=select)
        assert ids(plan) == [tid(1)]
        assert counts(plan)[("unselected", "task_name does not match ^nightly-")] == 2
        assert plan.reasons == {
            "completed": "older than 30d and status completed and task_id matches ^task_"
            " and task_name matches ^nightly-"
        }

    def test_task_id_is_matched_on_the_id_itself(self) -> None:
        """`task_id` patterns apply to the task's id even when fields do not carry it."""
        select = {"status": ["completed"], "older_than": "30d", "match": {"task_id": "_000002$"}}
        assert ids(plan_of([task(1), task(2)], select=select)) == [tid(2)]


class TestKeepNewest:
    def test_newest_counts_young_tasks_too(self) -> None:
        """With 3 young and 10 old matching tasks and newest: 5, only the 2 newest old ones stay."""
        young = [task(n, age=timedelta(days=1, hours=n)) for n in range(3)]
        old = [task(100 + n, age=timedelta(days=40 + n)) for n in range(10)]
        plan = plan_of(young + old, keep={"newest": 5})
        assert plan.eligible == 8
        assert ids(plan) == [tid(100 + n) for n in range(9, 1, -1)]
        assert example_ids(plan, Verdict.KEEP, "kept: newest 5") == [tid(101), tid(100)]
        assert counts(plan) == {
            ("keep", "kept: younger than 30d"): 3,
            ("keep", "kept: newest 5"): 2,
            ("delete", "older than 30d and status completed"): 8,
        }

    def test_only_matching_tasks_take_a_place(self) -> None:
        """Newer tasks of other statuses, protected or filtered out, do not use up keep.newest."""
        newer = [
            task(1, "partial_completed", timedelta(days=31)),
            task(2, "in_progress", timedelta(days=31)),
            task(3, age=timedelta(days=31), gone=True),
        ]
        older = [task(10 + n, age=timedelta(days=50 + n)) for n in range(4)]
        plan = plan_of(newer + older, keep={"newest": 2})
        assert ids(plan) == [tid(13), tid(12)]
        assert example_ids(plan, Verdict.KEEP, "kept: newest 2") == [tid(11), tid(10)]

    def test_more_places_than_tasks_deletes_nothing(self) -> None:
        """keep.newest larger than the matching set keeps all of it."""
        plan = plan_of([task(n) for n in range(3)], keep={"newest": 5})
        assert plan.eligible == 0
        assert counts(plan) == {("keep", "kept: newest 5"): 3}

    def test_zero_keeps_nothing(self) -> None:
        """The default keep.newest of 0 keeps no task for being newest."""
        plan = plan_of([task(n) for n in range(3)])
        assert plan.eligible == 3
        assert plan.count(Verdict.KEEP) == 0

    def test_tasks_without_timestamp_do_not_take_a_place(self) -> None:
        """An un-ageable task is kept for that reason and leaves the newest places to others."""
        plan = plan_of(
            [Task(tid(1), "completed", None), task(2), task(3, age=timedelta(days=50))],
            keep={"newest": 1},
        )
        assert ids(plan) == [tid(3)]
        assert example_ids(plan, Verdict.KEEP, "kept: newest 1") == [tid(2)]
        assert example_ids(plan, Verdict.KEEP, "kept: no created_at") == [tid(1)]


class TestProtect:
    def test_protected_ids(self) -> None:
        """An id in protect.ids is never deleted, however old and selected."""
        plan = plan_of([task(1), task(2)], protect={"ids": [tid(2)]})
        assert ids(plan) == [tid(1)]
        assert counts(plan)[("protected", "protected: id listed")] == 1

    def test_protected_match(self) -> None:
        """A task whose field matches a protect pattern is protected, naming the pattern."""
        protect = {"match": {"task_name": "(?i)keep"}}
        tasks = [
            task(1, fields={"task_name": "nightly KEEP me"}),
            task(2, fields={"task_name": "nightly"}),
        ]
        plan = plan_of(tasks, protect=protect)
        assert ids(plan) == [tid(2)]
        assert counts(plan)[("protected", "protected: task_name matches (?i)keep")] == 1

    def test_protected_status_is_reported_as_protected(self) -> None:
        """A protected status is reported as protected, not merely unselected."""
        select = {"status": ["completed"], "older_than": "30d"}
        plan = plan_of([task(1, "failed"), task(2)], select=select, protect={"status": ["failed"]})
        assert ids(plan) == [tid(2)]
        assert counts(plan)[("protected", "protected: failed")] == 1

    def test_protection_wins_over_keep_and_age(self) -> None:
        """Protected tasks are decided before age and keep-newest are looked at."""
        plan = plan_of([task(1, age=timedelta(days=1)), task(2)], protect={"ids": [tid(1), tid(2)]})
        assert counts(plan) == {("protected", "protected: id listed"): 2}


class TestUntrustedRecords:
    def test_gone_tasks_are_not_selected_again(self) -> None:
        """A task the target lists as already deleted is counted as gone, not deleted again."""
        plan = plan_of([task(1, gone=True), task(2)])
        assert ids(plan) == [tid(2)]
        assert counts(plan)[("gone", "already deleted on the target")] == 1

    def test_unparsable_timestamp_of_a_selected_task_stops_the_plan(self) -> None:
        """A task the policy is about whose timestamp did not parse: no plan, nothing deleted."""
        problem = "created_at does not parse: not an ISO-8601 timestamp: 'yesterday'"
        with pytest.raises(ListingError, match="cannot be planned: created_at does not parse"):
            plan_of([Task(tid(1), "completed", None, problem=problem), task(2)])

    def test_unparsable_timestamp_of_an_unselected_task_is_harmless(self) -> None:
        """A broken timestamp on a task the policy is not about does not stop the plan."""
        problem = "created_at does not parse: not an ISO-8601 timestamp: 'yesterday'"
        plan = plan_of([Task(tid(1), "in_progress", None, problem=problem), task(2)])
        assert ids(plan) == [tid(2)]
        assert counts(plan)[("protected", "protected: in_progress")] == 1

    def test_listing_marks_missing_directories_as_gone(self) -> None:
        """directory_exists: false makes a listed task gone; true or absent does not."""
        base = {"status": "completed", "created_at": "2025-01-01T00:00:00"}
        assert listed({"task_id": tid(1), "directory_exists": False, **base}).gone is True
        assert listed({"task_id": tid(2), "directory_exists": True, **base}).gone is False
        assert listed({"task_id": tid(3), **base}).gone is False

    def test_listing_reports_unparsable_timestamps(self) -> None:
        """A timestamp that does not parse becomes Task.problem, and no timestamp."""
        item = listed({"task_id": tid(1), "status": "completed", "created_at": "2025-13-01 00:00"})
        assert item.timestamp is None
        assert item.problem is not None
        assert item.problem.startswith("created_at does not parse: ")
        with pytest.raises(ListingError):
            plan_of([item])

    def test_listing_without_the_age_field(self) -> None:
        """A task without the age field has no timestamp and no problem: kept, not unusable."""
        item = listed({"task_id": tid(1), "status": "completed", "created_at": None})
        assert (item.timestamp, item.problem) == (None, None)
        assert counts(plan_of([item])) == {("keep", "kept: no created_at"): 1}


class TestIdGuard:
    @pytest.mark.parametrize(
        "task_id",
        [
            "task_20250702_223802\n",
            "../etc",
            "task_20250702_223802/../x",
            "task_20250702_22380",
            "TASK_20250702_223802",
            "job_20250702_223802",
            " task_20250702_223802",
            "task_20250702_223802 ",
        ],
        ids=repr,
    )
    def test_unsafe_ids_are_never_candidates(self, task_id: str) -> None:
        """An eligible task whose id fails the guard is reported as invalid, never planned."""
        when = NOW - timedelta(days=40)
        plan = plan_of([Task(task_id, "completed", when), task(1)])
        assert ids(plan) == [tid(1)]
        assert plan.invalid == [Candidate(task_id, "completed", when, f"refused: {GUARD}")]
        assert counts(plan)[("invalid_id", GUARD)] == 1

    def test_manual_ids_are_valid(self) -> None:
        """Ids of manually started tasks pass the guard."""
        plan = plan_of([Task("manual_20250702_223802", "completed", NOW - timedelta(days=40))])
        assert ids(plan) == ["manual_20250702_223802"]
        assert plan.invalid == []

    def test_the_guard_is_the_targets(self) -> None:
        """The planner asks the target instance which ids are unsafe."""

        class Picky(DataPipelineTarget):
            def invalid_id_reason(self, task_id: str) -> str | None:
                return "picky" if task_id.endswith("1") else None

        loaded = make_policy(URL)
        planner = Planner(loaded, Picky(loaded.policy.target_config, cast(TargetHttp, None)), NOW)
        for n in (1, 2):
            planner.add(task(n))
        plan = planner.finish()
        assert ids(plan) == [tid(2)]
        assert [(c.task_id, c.reason) for c in plan.invalid] == [(tid(1), "refused: picky")]


class TestMinimumAge:
    def test_younger_than_the_minimum_age_is_kept(self) -> None:
        """Whatever older_than says, tasks younger than the global minimum age are kept."""
        young = Task(tid(1), "completed", NOW - timedelta(minutes=30))
        old = Task(tid(2), "completed", NOW - timedelta(minutes=90))
        plan = plan_of([young, old], select={"status": ["completed"], "older_than": "1m"})
        assert ids(plan) == [tid(2)]
        assert counts(plan)[("keep", "kept: younger than the minimum age 1h")] == 1

    def test_the_minimum_age_is_configurable(self) -> None:
        """A larger minimum age (REAPER_MIN_AGE) keeps more."""
        loaded = make_policy(URL, select={"status": ["completed"], "older_than": "1d"})
        planner = Planner(loaded, target_for(loaded), NOW, timedelta(days=7))
        planner.add(Task(tid(1), "completed", NOW - timedelta(days=3)))
        planner.add(Task(tid(2), "completed", NOW - timedelta(days=8)))
        plan = planner.finish()
        assert ids(plan) == [tid(2)]
        assert counts(plan)[("keep", "kept: younger than the minimum age 7d")] == 1


class TestOrderAndBatches:
    def test_candidates_come_oldest_first(self) -> None:
        """Whatever the listing order, candidates are sorted by timestamp, oldest first."""
        ages = {1: 35, 2: 90, 3: 31, 4: 60}
        plan = plan_of([task(n, age=timedelta(days=d)) for n, d in ages.items()])
        assert ids(plan) == [tid(2), tid(4), tid(1), tid(3)]
        oldest, newest = plan.oldest(), plan.newest()
        assert oldest is not None
        assert newest is not None
        assert (oldest.task_id, newest.task_id) == (tid(2), tid(3))

    def test_candidates_carry_utc_timestamp_status_and_reason(self) -> None:
        """Each candidate has its aware UTC timestamp, its status and the reason in words."""
        when = datetime(2026, 9, 1, 8, 30, 15, 123456, tzinfo=UTC)
        plan = plan_of([Task(tid(1), "failed", when)])
        assert list(plan.candidates()) == [
            Candidate(tid(1), "failed", when, "older than 30d and status failed")
        ]
        [candidate] = plan.candidates()
        assert candidate.timestamp.tzinfo is UTC

    @pytest.mark.parametrize(
        ("n", "size", "sizes"),
        [(7, 3, [3, 3, 1]), (6, 3, [3, 3]), (2, 5, [2]), (0, 3, []), (3, 1, [1, 1, 1])],
    )
    def test_batches(self, n: int, size: int, sizes: list[int]) -> None:
        """batches() chunks the candidates in order into requests of at most ``size``."""
        plan = plan_of([task(i, age=timedelta(days=40 + i)) for i in range(n)])
        batches = list(plan.batches(size))
        assert [len(batch) for batch in batches] == sizes
        assert [c for batch in batches for c in batch] == list(plan.candidates())

    def test_empty_plan(self) -> None:
        """A plan with nothing to delete has no oldest or newest candidate."""
        plan = plan_of([task(1, age=timedelta(days=1))])
        assert (plan.eligible, plan.oldest(), plan.newest()) == (0, None, None)
        assert plan.listed == 1


class TestListing:
    def test_duplicate_ids_fail_the_listing(self) -> None:
        """A task listed twice means paging is inconsistent: planning stops."""
        loaded = make_policy(URL)
        planner = Planner(loaded, target_for(loaded), NOW)
        planner.add(task(1))
        planner.add(task(1, "failed", timedelta(days=90)))
        with pytest.raises(ListingError, match=r"the listing returned a task twice"):
            planner.finish()

    def test_make_plan_consumes_an_async_listing(self) -> None:
        """make_plan reads the whole listing and plans it."""
        loaded = make_policy(URL)

        async def listing() -> AsyncIterator[Task]:
            for n in range(5):
                yield task(n, age=timedelta(days=28 + n))

        plan = asyncio.run(make_plan(loaded, target_for(loaded), listing(), NOW))
        assert plan.listed == 5
        assert ids(plan) == [tid(4), tid(3)]
        assert plan.policy is loaded

    def test_make_plan_propagates_a_broken_listing(self) -> None:
        """A ListingError in the middle of the listing is not turned into a partial plan."""
        loaded = make_policy(URL)

        async def listing() -> AsyncIterator[Task]:
            yield task(1)
            raise ListingError("listing page 2 (offset 100): HTTP 500: boom")

        with pytest.raises(ListingError, match="HTTP 500"):
            asyncio.run(make_plan(loaded, target_for(loaded), listing(), NOW))


class TestTimezones:
    # NOW is 2026-11-01 12:00 UTC, so the 30d cutoff is 2026-10-02 12:00 UTC = 20:00 in Shanghai.

    @pytest.mark.parametrize(
        ("wall_time", "eligible"),
        [
            ("2026-10-02T20:00:00", False),
            ("2026-10-02T19:59:59.999999", True),
            ("2026-10-02T13:00:00", True),
            ("2026-10-03T03:00:00", False),
        ],
    )
    def test_naive_shanghai_timestamps_against_a_utc_cutoff(
        self, wall_time: str, eligible: bool
    ) -> None:
        """Naive server times are Shanghai wall time: 20:00 there is the UTC cutoff instant."""
        item = listed({"task_id": tid(1), "status": "completed", "created_at": wall_time})
        assert item.timestamp == datetime.fromisoformat(wall_time).replace(
            tzinfo=SHANGHAI
        ).astimezone(UTC)
        plan = plan_of([item])
        assert plan.eligible == int(eligible)

    def test_aware_timestamps_compare_as_instants(self) -> None:
        """Tasks built in another zone are compared by instant, not by wall time."""
        at_cutoff = datetime(2026, 10, 2, 20, 0, tzinfo=SHANGHAI)
        just_before = datetime(2026, 10, 2, 7, 59, 59, tzinfo=ZoneInfo("America/New_York"))
        plan = plan_of(
            [Task(tid(1), "completed", at_cutoff), Task(tid(2), "completed", just_before)]
        )
        assert ids(plan) == [tid(2)]
        [candidate] = plan.candidates()
        assert candidate.timestamp == datetime(2026, 10, 2, 11, 59, 59, tzinfo=UTC)

    def test_planning_instant_in_another_zone(self) -> None:
        """A planning instant given in a local zone yields the same cutoff as in UTC."""
        local_now = NOW.astimezone(ZoneInfo("Asia/Shanghai"))
        plan = plan_of([Task(tid(1), "completed", NOW - timedelta(days=30))], now=local_now)
        assert plan.cutoff == NOW - timedelta(days=30)
        assert plan.eligible == 0


class TestReasons:
    def test_every_listed_task_is_accounted_for(self) -> None:
        """Counts by reason add up to the listing, with each reason in words."""
        tasks = [
            task(1),
            task(2, "failed", timedelta(days=45)),
            task(3, age=timedelta(days=2)),
            task(4, "in_progress"),
            task(5, "partial_completed"),
            task(6, gone=True),
            Task(tid(7), "completed", None),
            Task("../x", "completed", NOW - timedelta(days=99)),
            task(9, age=timedelta(days=31)),
        ]
        plan = plan_of(tasks, keep={"newest": 2}, protect={"ids": [tid(1)]})
        assert counts(plan) == {
            ("protected", "protected: id listed"): 1,
            ("delete", "older than 30d and status failed"): 1,
            ("keep", "kept: younger than 30d"): 1,
            ("protected", "protected: in_progress"): 1,
            ("unselected", "status partial_completed not selected"): 1,
            ("gone", "already deleted on the target"): 1,
            ("keep", "kept: no created_at"): 1,
            ("invalid_id", GUARD): 1,
            ("keep", "kept: newest 2"): 1,
        }
        assert sum(plan.counts.values()) == plan.listed == len(tasks)
        assert ids(plan) == [tid(2)]
        assert example_ids(plan, Verdict.KEEP, "kept: newest 2") == [tid(9)]

    def test_examples_are_capped_per_reason(self) -> None:
        """The plan keeps at most ten example tasks per reason, the counts stay exact."""
        plan = plan_of([task(n, age=timedelta(days=1)) for n in range(25)])
        key = (Verdict.KEEP, "kept: younger than 30d")
        assert plan.counts[key] == 25
        assert len(plan.examples[key]) == Planner.EXAMPLES_PER_REASON == 10

    def test_deletion_examples_are_the_first_per_reason_in_deletion_order(self) -> None:
        """Each delete reason counts its tasks and shows the first ten to be deleted (oldest
        first); the reasons appear in the order their first task is deleted."""
        statuses = ["failed", "completed", "completed", "failed", "completed"] * 5
        tasks = [task(n, status, timedelta(days=100 - n)) for n, status in enumerate(statuses)]
        plan = plan_of(tasks)
        order = [(c.task_id, c.status) for c in plan.candidates()]
        assert [i for i, _ in order] == [tid(n) for n in range(25)]
        failed = (Verdict.DELETE, "older than 30d and status failed")
        completed = (Verdict.DELETE, "older than 30d and status completed")
        assert [key for key in plan.counts if key[0] is Verdict.DELETE] == [failed, completed]
        assert [key for key in plan.examples if key[0] is Verdict.DELETE] == [failed, completed]
        assert (plan.counts[failed], plan.counts[completed]) == (10, 15)
        assert example_ids(plan, *failed) == [i for i, s in order if s == "failed"]
        assert example_ids(plan, *completed) == [i for i, s in order if s == "completed"][:10]
        assert [e.timestamp for e in plan.examples[completed]] == [
            c.timestamp for c in plan.candidates() if c.status == "completed"
        ][:10]


class _NullTarget(Target):
    """A target kind with the base class's defaults, for the generic guard."""

    kind = "null"
    time_fields = ("created_at",)

    def list_tasks(self, request: ListRequest) -> AsyncIterator[Task]:
        raise NotImplementedError

    async def delete(self, task_ids: Sequence[str], options: DeleteOptions) -> BatchResult:
        raise NotImplementedError


class TestBaseGuard:
    @pytest.mark.parametrize(
        ("task_id", "reason"),
        [
            ("", "id is empty or contains a path separator or '..'"),
            ("../etc", "id is empty or contains a path separator or '..'"),
            ("a/b", "id is empty or contains a path separator or '..'"),
            ("a\\b", "id is empty or contains a path separator or '..'"),
            ("abc\n", "id contains control characters"),
            ("abc\x00", "id contains control characters"),
            ("job-42", None),
        ],
        ids=repr,
    )
    def test_generic_id_guard(self, task_id: str, reason: str | None) -> None:
        """Every target refuses empty ids, path separators, '..' and control characters."""
        target = _NullTarget(cast(Any, None), cast(TargetHttp, None))
        assert target.invalid_id_reason(task_id) == reason


# --- the planner's shortcuts decide as its rules do ----------------------------------------------

_AGES = [
    *(timedelta(days=30) + timedelta(microseconds=d) for d in (-1_000_000, -1, 0, 1, 1_000_000)),
    *(timedelta(hours=1) + timedelta(microseconds=d) for d in (-1_000_000, -1, 0, 1, 1_000_000)),
    timedelta(0),
    timedelta(days=400),
]
listed_tasks = st.lists(
    st.tuples(
        st.sampled_from(["completed", "failed", "partial_completed", "in_progress", "pending"]),
        st.booleans(),
        st.none() | st.sampled_from(_AGES) | st.timedeltas(timedelta(0), timedelta(days=60)),
        st.sampled_from(["", "", "", "bad id"]),
    ),
    max_size=40,
)


def _without_shortcuts(
    rules: tuple[list[Rule], list[Rule]],
) -> tuple[list[Rule], list[Rule]]:
    """The same rules as plain functions: no ``reads`` or ``passes_before`` to go by."""

    def plain(rule: Rule) -> Rule:
        return lambda task: rule(task)

    return [plain(r) for r in rules[0]], [plain(r) for r in rules[1]]


def _everything(plan: Plan) -> Any:
    return (
        plan.listed,
        [(c.task_id, c.status, c.timestamp, c.reason) for c in plan.candidates()],
        list(plan.counts.items()),
        [
            (key, [(e.task_id, e.status, e.timestamp) for e in v])
            for key, v in plan.examples.items()
        ],
        plan.invalid,
    )


class TestShortcuts:
    @settings(max_examples=200, deadline=None)
    @given(
        tasks=listed_tasks,
        newest_first=st.booleans(),
        keep=st.sampled_from([0, 1, 3]),
        protect_ids=st.booleans(),
        statuses=st.sampled_from([["completed"], ["completed", "failed"], ["partial_completed"]]),
    )
    def test_same_plan_as_asking_every_rule(
        self,
        tasks: list[tuple[str, bool, timedelta | None, str]],
        newest_first: bool,
        keep: int,
        protect_ids: bool,
        statuses: list[str],
    ) -> None:
        """Remembered status decisions and the old-enough shortcut change no verdict, count,
        example, order or invalid id, compared with every rule asked about every task."""
        listing = [
            Task(
                bad + tid(n) if bad else tid(n),
                status,
                None if age is None else NOW - age,
                gone=gone,
            )
            for n, (status, gone, age, bad) in enumerate(tasks)
        ]
        if newest_first:
            listing.sort(key=lambda t: (t.timestamp is None, -(t.timestamp or NOW).timestamp()))
        sections: dict[str, Any] = {
            "select": {"status": statuses, "older_than": "30d"},
            "keep": {"newest": keep},
        }
        if protect_ids and listing:
            sections["protect"] = {"ids": [listing[0].id]}
        loaded = make_policy(URL, **sections)
        fast = Planner(loaded, target_for(loaded), NOW)
        rules = build_rules(loaded.policy, NOW)
        with mock.patch("reaper.plan.build_rules", return_value=_without_shortcuts(rules)):
            slow = Planner(loaded, target_for(loaded), NOW)
        assert slow._selected is None
        assert slow._old_enough == -math.inf
        for item in listing:
            fast.add(item)
            slow.add(item)
        try:
            expected = _everything(slow.finish())
        except ListingError as exc:
            with pytest.raises(ListingError, match=str(exc)):
                fast.finish()
            return
        assert _everything(fast.finish()) == expected
