"""Planning: which listed tasks are eligible for deletion, and why each other one is kept.

Selection is a pipeline of small rules (in the manner of structlog's processors): each rule is
built from the policy and, called with a task, either decides it (returning a verdict and the
reason in words) or passes it on. Keep-newest-N is applied once the listing is complete; a plan
is never built from a partial listing, nor from one where a task the policy is about has a
timestamp that does not parse.

A plan holds only what deletion and the audit need: for a million listed tasks it keeps the
eligible ids, their timestamps and statuses in compact columns, counts for everything else, and a
few examples per reason for the report.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import operator
import re
from array import array
from collections import Counter
from collections.abc import (
    AsyncIterable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import orjson

from reaper.converters import format_duration
from reaper.errors import ListingError
from reaper.policy import LoadedPolicy, Policy
from reaper.snapshots import Snapshots
from reaper.targets.base import Target, Task

if TYPE_CHECKING:
    from reaper.clocks import ClockCheck

__all__ = [
    "DEFAULT_FUTURE_TOLERANCE",
    "Candidate",
    "Decision",
    "NotInFuture",
    "Notice",
    "Pinned",
    "Plan",
    "Planner",
    "Rule",
    "Verdict",
    "build_rules",
    "make_plan",
    "snapshot_of",
]


class Verdict(StrEnum):
    """What the plan says about one listed task."""

    DELETE = "delete"
    KEEP = "keep"  # matches the policy, but kept (too young, newest N, no timestamp)
    PROTECTED = "protected"  # never deleted, whatever select says
    UNSELECTED = "unselected"  # not what the policy is about
    GONE = "gone"  # the target reports it as already deleted
    INVALID_ID = "invalid_id"  # eligible, but its id fails the target's guard: never sent


Decision = tuple[Verdict, str]
Rule = Callable[[Task], Decision | None]

# A rule may say what it reads of a task, as a ``reads`` attribute (task field names), and an
# aging rule up to when it lets every task through, as ``passes_before`` (an instant: it passes
# every task with an earlier timestamp). The planner uses these to decide a million tasks without
# asking every rule about every task (see Planner.add); a rule without them is always asked.
_STATUS_ONLY = frozenset({"status", "gone"})
_ID_ONLY = frozenset({"id"})
_UNDECIDED = (Verdict.KEEP, "undecided")  # a sentinel: no rule returns this very tuple


# --- rules ------------------------------------------------------------------------------------


def _reads_only_status(rule: Rule) -> bool:
    reads = getattr(rule, "reads", None)
    return isinstance(reads, frozenset) and reads <= _STATUS_ONLY


def _reads_only_id(rule: Rule) -> bool:
    reads = getattr(rule, "reads", None)
    return isinstance(reads, frozenset) and reads <= _ID_ONLY


class Pinned:
    """Tasks under a pin (a legal hold, ``reaper pin``): first in the chain, so a pin wins over
    every other rule, and over any saved plan or approval (those only narrow the plan)."""

    reads = _ID_ONLY

    def __init__(self, pins: Mapping[str, str]) -> None:
        #: task id -> the pin's reason
        self.pins = dict(pins)

    def __call__(self, task: Task) -> Decision | None:
        reason = self.pins.get(task.id)
        return None if reason is None else (Verdict.PROTECTED, f"protected: pinned: {reason}")


class AlreadyGone:
    """Tasks the target lists as already deleted are not selected again."""

    reads = frozenset({"gone"})

    def __call__(self, task: Task) -> Decision | None:
        return (Verdict.GONE, "already deleted on the target") if task.gone else None


class ProtectIds:
    """Ids named in ``protect.ids``."""

    reads = frozenset({"id"})

    def __init__(self, ids: Sequence[str]) -> None:
        self.ids = frozenset(ids)

    def __call__(self, task: Task) -> Decision | None:
        return (Verdict.PROTECTED, "protected: id listed") if task.id in self.ids else None


class StillRunning:
    """Tasks an earlier delete request may still be working on (it timed out, or a gateway
    answered 502/504, on a target whose requests outlive their timeouts): not sent again until
    the target settles it, so that two requests never overlap."""

    reads = frozenset({"id"})

    def __init__(self, held: Mapping[str, str]) -> None:
        self.held = held

    def __call__(self, task: Task) -> Decision | None:
        why = self.held.get(task.id)
        return (Verdict.PROTECTED, why) if why is not None else None


class ProtectStatus:
    """Protected statuses: the policy's, plus the target's live ones unless opted in."""

    reads = frozenset({"status"})

    def __init__(self, statuses: frozenset[str]) -> None:
        self.statuses = statuses

    def __call__(self, task: Task) -> Decision | None:
        if task.status in self.statuses:
            return Verdict.PROTECTED, f"protected: {task.status}"
        return None


class NotDeletable:
    """Statuses the target's API refuses to delete: a hard rail no policy can lift."""

    reads = frozenset({"status"})

    def __init__(self, kind: str, deletable: frozenset[str]) -> None:
        self.kind = kind
        self.deletable = deletable

    def __call__(self, task: Task) -> Decision | None:
        if task.status not in self.deletable:
            return Verdict.PROTECTED, f"protected: {self.kind} cannot delete {task.status} tasks"
        return None


class ProtectMatch:
    """Tasks with a field matching one of ``protect.match``."""

    def __init__(self, patterns: dict[str, str]) -> None:
        self.patterns = [(name, re.compile(p)) for name, p in patterns.items()]

    def __call__(self, task: Task) -> Decision | None:
        for name, pattern in self.patterns:
            if pattern.search(_field(task, name)):
                return Verdict.PROTECTED, f"protected: {name} matches {pattern.pattern}"
        return None


class StatusFilter:
    """Only the statuses in ``select.status`` are considered."""

    reads = frozenset({"status"})

    def __init__(self, statuses: Sequence[str]) -> None:
        self.statuses = frozenset(statuses)

    def __call__(self, task: Task) -> Decision | None:
        if task.status not in self.statuses:
            return Verdict.UNSELECTED, f"status {task.status} not selected"
        return None


class MatchFilter:
    """Every ``select.match`` pattern must match its field (``re.search``)."""

    def __init__(self, patterns: dict[str, str]) -> None:
        self.patterns = [(name, re.compile(p)) for name, p in patterns.items()]

    def __call__(self, task: Task) -> Decision | None:
        for name, pattern in self.patterns:
            if not pattern.search(_field(task, name)):
                return Verdict.UNSELECTED, f"{name} does not match {pattern.pattern}"
        return None


class NeedsTimestamp:
    """A matching task without a value for the age field cannot be aged: it is kept."""

    #: Any timestamp passes.
    passes_before = datetime.max.replace(tzinfo=UTC)

    def __init__(self, age_field: str) -> None:
        self.age_field = age_field

    def __call__(self, task: Task) -> Decision | None:
        if task.timestamp is None:
            return Verdict.KEEP, f"kept: no {self.age_field}"
        return None


class NotInFuture:
    """A task whose age field lies in the future is never eligible: its age cannot be trusted.

    Beyond a small tolerance (clocks are never quite in step), a future timestamp means the
    zone its value is read in, or a clock, is wrong; and the same mistake then ages every other
    task wrongly too. The rule counts what it protects and the furthest it saw, for the run's
    warning (reaper.clocks).
    """

    def __init__(self, now: datetime, tolerance: timedelta, age_field: str) -> None:
        self.now = now
        self.limit = now + tolerance
        self.passes_before = self.limit
        self.reason = (
            f"protected: {age_field} lies more than {format_duration(tolerance)} in the future "
            "(check the zone of the target's timestamps and the host clock)"
        )
        #: How far ahead of ``now`` the furthest protected timestamp lay.
        self.furthest = timedelta(0)

    def __call__(self, task: Task) -> Decision | None:
        assert task.timestamp is not None
        if task.timestamp > self.limit:
            self.furthest = max(self.furthest, task.timestamp - self.now)
            return Verdict.PROTECTED, self.reason
        return None


class MinimumAge:
    """No policy deletes a task younger than the process-wide minimum age (default 1h)."""

    def __init__(self, now: datetime, min_age: timedelta) -> None:
        self.limit = now - min_age
        self.passes_before = self.limit
        self.reason = f"kept: younger than the minimum age {format_duration(min_age)}"

    def __call__(self, task: Task) -> Decision | None:
        assert task.timestamp is not None
        return (Verdict.KEEP, self.reason) if task.timestamp > self.limit else None


class OlderThan:
    """Tasks younger than ``select.older_than`` (at the cutoff instant) are kept."""

    def __init__(self, cutoff: datetime, older_than: str, age_field: str) -> None:
        self.cutoff = cutoff
        self.passes_before = cutoff
        self.older_than = older_than
        self.age_field = age_field

    def __call__(self, task: Task) -> Decision | None:
        assert task.timestamp is not None
        if task.timestamp >= self.cutoff:
            return Verdict.KEEP, f"kept: younger than {self.older_than}"
        return None


def _field(task: Task, name: str) -> str:
    return task.id if name == "task_id" else task.fields.get(name, "")


#: How far in the future a task's age field may lie before it is suspect (REAPER_FUTURE_TOLERANCE).
DEFAULT_FUTURE_TOLERANCE = timedelta(minutes=5)


def build_rules(
    policy: Policy,
    now: datetime,
    min_age: timedelta = timedelta(hours=1),
    future_tolerance: timedelta = DEFAULT_FUTURE_TOLERANCE,
    held: Mapping[str, str] | None = None,
    pins: Mapping[str, str] | None = None,
) -> tuple[list[Rule], list[Rule]]:
    """The rules before (selection) and after (aging) the point where a task 'matches'.

    Keep-newest-N counts the tasks that pass the first list, whatever their age. ``held``:
    tasks an earlier delete request may still be working on, with the reason. ``pins`` are
    the tasks pinned for the policy (id -> reason).
    """
    target = policy.target_class
    protected = set(policy.protect.status)
    if not policy.select.allow_live:
        protected |= target.live_statuses
    selection: list[Rule] = [Pinned(pins)] if pins else []
    selection.append(AlreadyGone())
    if held:
        selection.append(StillRunning(held))
    if policy.protect.ids:
        selection.append(ProtectIds(policy.protect.ids))
    selection.append(ProtectStatus(frozenset(protected)))
    if target.deletable_statuses is not None:
        selection.append(NotDeletable(target.kind, target.deletable_statuses))
    if policy.protect.match:
        selection.append(ProtectMatch(policy.protect.match))
    selection.append(StatusFilter(policy.select.status))
    if policy.select.match:
        selection.append(MatchFilter(policy.select.match))
    cutoff = now - policy.select.older_than
    aging: list[Rule] = [
        NeedsTimestamp(policy.age_field),
        NotInFuture(now, future_tolerance, policy.age_field),
        MinimumAge(now, min_age),
        OlderThan(cutoff, format_duration(policy.select.older_than), policy.age_field),
    ]
    return selection, aging


# --- the plan ---------------------------------------------------------------------------------

#: The largest snapshot kept of one task's record (UTF-8 bytes of its JSON).
SNAPSHOT_MAX_BYTES = 4096
#: The key naming the fields left out of a record too large to keep whole.
OMITTED = "__omitted__"


def snapshot_of(raw: Any, limit: int = SNAPSHOT_MAX_BYTES) -> bytes | None:
    """A task's record as listed, as compact ASCII JSON of at most ``limit`` bytes (None
    without one).

    A larger record keeps its smaller fields: the largest are left out, one by one, and named
    under ``__omitted__``; a record that still does not fit (or is not an object) is replaced by
    ``{"__omitted__": true, "bytes": N}``. A run keeps one per eligible task (a few hundred
    bytes for a typical record), so its plan's memory grows with the records' size.
    """
    if raw is None:
        return None
    encoded = _json_bytes(raw)
    if len(encoded) <= limit:
        return encoded
    if isinstance(raw, dict):
        sizes = sorted(((len(_json_bytes(value)), key) for key, value in raw.items()), reverse=True)
        kept = dict(raw)
        omitted: list[str] = []
        for _, key in sizes:
            del kept[key]
            omitted.append(str(key))
            smaller = _json_bytes({**kept, OMITTED: omitted})
            if len(smaller) <= limit:
                return smaller
    return _json_bytes({OMITTED: True, "bytes": len(encoded)})


def _json_bytes(value: Any) -> bytes:
    """Compact JSON in ASCII (other characters as ``\\u`` escapes): a snapshot then costs one
    byte per character wherever it is held as text, and keeps the audit's JSON batches ASCII."""
    try:
        encoded = orjson.dumps(value)
    except TypeError:  # integers beyond 64 bits, lone surrogates: the standard library
        return json.dumps(value, separators=(",", ":")).encode()
    if encoded.isascii():
        # A copy: orjson's own bytes object keeps a 4 KiB buffer, whatever its length.
        return bytes(memoryview(encoded))
    return json.dumps(value, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Candidate:
    """A task the plan deletes (or would delete), with what the audit records about it."""

    task_id: str
    status: str
    timestamp: datetime
    reason: str
    #: The task's record as listed (UTF-8 JSON, bounded), when the plan keeps snapshots.
    snapshot: bytes | None = None


@dataclass(frozen=True, slots=True)
class Example:
    task_id: str
    status: str
    timestamp: datetime | None


@dataclass(frozen=True)
class Notice:
    """How a plan stands with ``delete.notice``: which eligible tasks are due, which wait."""

    notice: timedelta
    #: Eligible tasks noticed by an earlier run, not due yet: id -> when they are due.
    waiting: dict[str, datetime]
    #: Eligible tasks no run had noticed: noticed now, due at ``new_due``.
    new: list[str]
    new_due: datetime
    #: Noticed tasks that are not eligible now: their notice is forgotten (it starts again if
    #: they become eligible again).
    forgotten: list[str]
    #: Tasks due now (the plan's eligible tasks).
    due: int

    @property
    def next_due(self) -> datetime | None:
        """When the earliest task that waits is due."""
        dues = [*self.waiting.values(), *([self.new_due] if self.new else [])]
        return min(dues, default=None)


@dataclass
class Plan:
    """The outcome of planning one policy over one complete listing."""

    policy: LoadedPolicy
    created_at: datetime
    cutoff: datetime
    listed: int
    #: (verdict, reason) -> number of tasks.
    counts: Counter[tuple[Verdict, str]]
    #: (verdict, reason) -> the first few tasks, for the report.
    examples: dict[tuple[Verdict, str], list[Example]]
    _ids: list[str] = field(repr=False)
    _stamps: array[float] = field(repr=False)
    _statuses: list[str] = field(repr=False)
    #: Eligible tasks whose ids fail the target's guard: recorded, never sent.
    invalid: list[Candidate] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    #: Listed tasks per status (every task, whatever its verdict).
    status_counts: Counter[str] = field(default_factory=Counter)
    #: The plan's rules for one task, keep-newest-N aside: None when it is eligible, else the
    #: verdict and reason. The send-time re-check decides fresh records with it.
    decide: Callable[..., Decision | None] | None = field(default=None, repr=False)
    #: Tasks the policy is about whose age field lay in the future (beyond the tolerance), and
    #: how far ahead the furthest one was.
    future_timestamps: int = 0
    future_furthest: timedelta = timedelta(0)
    #: What the target's answers said about its clock and zone (set by reaper.runner).
    clock: ClockCheck | None = None
    #: Set by :meth:`give_notice`: which eligible tasks were due, which wait.
    notice: Notice | None = None
    #: Each eligible task's snapshot (see :func:`snapshot_of`), when the plan keeps them.
    _snapshots: Snapshots | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def eligible(self) -> int:
        """Tasks the plan deletes in this run."""
        return len(self._ids)

    def count(self, verdict: Verdict) -> int:
        return sum(n for (v, _), n in self.counts.items() if v is verdict)

    def _candidate(self, index: int) -> Candidate:
        status = self._statuses[index]
        snapshots = self._snapshots
        return Candidate(
            self._ids[index],
            status,
            datetime.fromtimestamp(self._stamps[index], UTC),
            self.reasons[status],
            snapshots[index] if snapshots is not None else None,
        )

    def candidates(self) -> Iterator[Candidate]:
        """The tasks to delete, oldest first."""
        for index in range(len(self._ids)):
            yield self._candidate(index)

    def candidate(self, index: int) -> Candidate:
        """The ``index``-th task to delete (0: the oldest)."""
        return self._candidate(index)

    def id_and_timestamp(self, index: int) -> tuple[str, datetime]:
        """The id and listed age-field value of the ``index``-th task to delete."""
        return self._ids[index], datetime.fromtimestamp(self._stamps[index], UTC)

    def task_ids(self) -> Iterator[str]:
        """The ids to delete, oldest first."""
        return iter(self._ids)

    def batches(self, size: int) -> Iterator[list[Candidate]]:
        """The candidates in delete requests of at most ``size`` ids."""
        batch: list[Candidate] = []
        for candidate in self.candidates():
            batch.append(candidate)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    def oldest(self) -> Candidate | None:
        return self._candidate(0) if self._ids else None

    def newest(self) -> Candidate | None:
        return self._candidate(len(self._ids) - 1) if self._ids else None

    def restrict(self, approved: Collection[str]) -> Plan:
        """This plan limited to ``approved`` ids (a reviewed, saved plan).

        Tasks eligible now but not approved are kept, with that reason. Approved ids that are
        not eligible now are simply absent: the fresh listing and rules decided them.
        """
        not_approved = (Verdict.KEEP, "kept: not in the approved plan")
        return self._narrow(lambda task_id: None if task_id in approved else not_approved)

    def give_notice(
        self, first_seen: Mapping[str, datetime], now: datetime, notice: timedelta
    ) -> Plan:
        """This plan limited to the tasks due now under ``delete.notice``.

        ``first_seen`` holds when a run first found each noticed task eligible; a task is due
        once ``notice`` has passed since. A task eligible for the first time is noticed now and
        kept, as is one noticed but not due yet. The returned plan's :attr:`notice` says which.
        """
        new_due = now + notice
        waiting: dict[str, datetime] = {}
        new: list[str] = []
        wait = (
            Verdict.KEEP,
            f"kept: noticed, not due yet (delete.notice {format_duration(notice)})",
        )
        fresh = (Verdict.KEEP, f"kept: noticed now, due {new_due.isoformat()}")

        def due(task_id: str) -> Decision | None:
            seen = first_seen.get(task_id)
            if seen is None:
                new.append(task_id)
                return fresh
            if seen + notice > now:
                waiting[task_id] = seen + notice
                return wait
            return None

        narrowed = self._narrow(due)
        eligible = set(self._ids)
        forgotten = [task_id for task_id in first_seen if task_id not in eligible]
        state = Notice(notice, waiting, new, new_due, forgotten, narrowed.eligible)
        return replace(narrowed, notice=state)

    def _narrow(self, decide: Callable[[str], Decision | None]) -> Plan:
        """This plan with the eligible tasks ``decide`` returns a decision for taken out of it
        (counted and exampled under that decision); the rest stay, in order."""
        counts: Counter[tuple[Verdict, str]] = Counter(
            {key: n for key, n in self.counts.items() if key[0] is not Verdict.DELETE}
        )
        examples = {k: v for k, v in self.examples.items() if k[0] is not Verdict.DELETE}
        ids: list[str] = []
        stamps: array[float] = array("d")
        statuses: list[str] = []
        kept: list[int] = []
        for index, task_id in enumerate(self._ids):
            candidate = self._candidate(index)
            decision = decide(task_id)
            if decision is None:
                ids.append(task_id)
                stamps.append(self._stamps[index])
                statuses.append(self._statuses[index])
                kept.append(index)
                decision = (Verdict.DELETE, candidate.reason)
            _tally(
                counts, examples, decision, candidate.task_id, candidate.status, candidate.timestamp
            )
        return replace(
            self,
            counts=counts,
            examples=examples,
            _ids=ids,
            _stamps=stamps,
            _statuses=statuses,
            _snapshots=self._snapshots.take(kept) if self._snapshots is not None else None,
        )


def _tally(
    counts: Counter[tuple[Verdict, str]],
    examples: dict[tuple[Verdict, str], list[Example]],
    decision: Decision,
    task_id: str,
    status: str,
    timestamp: datetime | None,
) -> None:
    counts[decision] += 1
    listed = examples.setdefault(decision, [])
    if len(listed) < Planner.EXAMPLES_PER_REASON:
        listed.append(Example(task_id, status, timestamp))


class Planner:
    """Consumes a listing task by task and produces a :class:`Plan`."""

    EXAMPLES_PER_REASON = 10

    def __init__(
        self,
        loaded: LoadedPolicy,
        target: Target,
        now: datetime,
        min_age: timedelta = timedelta(hours=1),
        future_tolerance: timedelta = DEFAULT_FUTURE_TOLERANCE,
        held: Mapping[str, str] | None = None,
        *,
        pins: Mapping[str, str] | None = None,
        snapshots: bool = False,
    ) -> None:
        policy = loaded.policy
        self.loaded = loaded
        self.target = target
        self.now = now
        self.cutoff = now - policy.select.older_than
        self.selection, self.aging = build_rules(policy, now, min_age, future_tolerance, held, pins)
        self._future = next((rule for rule in self.aging if isinstance(rule, NotInFuture)), None)
        self.keep_newest = policy.keep.newest
        self.older_than = format_duration(policy.select.older_than)
        self.match = policy.select.match
        self.listed = 0
        self.counts: Counter[tuple[Verdict, str]] = Counter()
        self.examples: dict[tuple[Verdict, str], list[Example]] = {}
        self._seen: array[int] = array("q")  # hash of every listed id
        self._status_counts: dict[str, int] = {}
        self._statuses: dict[str, str] = {}  # one shared string per status value
        self._ids: list[str] = []
        self._stamps: array[float] = array("d")
        self._status_col: list[str] = []
        #: The eligible tasks' snapshots, kept only when the plan is for deleting.
        self._snapshot_col: Snapshots | None = Snapshots() if snapshots else None
        # The newest `keep_newest` matching tasks: a min-heap of (timestamp, id).
        self._newest: list[tuple[float, str]] = []
        # When every selection rule reads nothing but a task's status and gone flag (the usual
        # policy), the chain is asked once per (status, gone) pair and its answer remembered.
        # Leading rules on the id alone (pins) are asked about every task before that.
        lead = 0
        while lead < len(self.selection) and _reads_only_id(self.selection[lead]):
            lead += 1
        self._by_id, self._by_status = self.selection[:lead], self.selection[lead:]
        self._selected: dict[tuple[str, bool], Decision | None] | None = None
        if all(_reads_only_status(rule) for rule in self._by_status):
            self._selected = {}
        # Every aging rule passes a task this much older than the earliest of their limits (a
        # POSIX timestamp; the second of margin keeps float rounding out of the question).
        self._old_enough = -math.inf
        limits = [getattr(rule, "passes_before", None) for rule in self.aging]
        instants = [limit for limit in limits if isinstance(limit, datetime)]
        if instants and len(instants) == len(limits):
            self._old_enough = min(instant.timestamp() for instant in instants) - 1.0

    def add(self, task: Task) -> None:
        """Decide one listed task."""
        # 8 bytes a task; duplicates are found once the listing is complete (finish()).
        self._seen.append(hash(task.id))
        self.listed += 1
        status_counts = self._status_counts
        status_counts[task.status] = status_counts.get(task.status, 0) + 1
        selected = self._selected
        if selected is None:
            decision = self._select(task)
        else:
            decision = None
            if self._by_id:
                for rule in self._by_id:
                    decision = rule(task)
                    if decision is not None:
                        break
            if decision is None:
                key = (task.status, task.gone)
                decision = selected.get(key, _UNDECIDED)
                if decision is _UNDECIDED:
                    decision = selected[key] = self._select(task, self._by_status)
        if decision is not None:
            self._note(task, decision)
            return
        if task.problem is not None:
            # The policy is about this task but cannot age it; keep-newest-N and the cutoff
            # would be computed on a guess. The whole policy stops, nothing is deleted.
            raise ListingError(
                f"task {task.id!r} ({task.status}) cannot be planned: {task.problem}"
            )
        stamp = task.timestamp.timestamp() if task.timestamp is not None else None
        if self.keep_newest and stamp is not None:
            entry = (stamp, task.id)
            if len(self._newest) < self.keep_newest:
                heapq.heappush(self._newest, entry)
            elif entry > self._newest[0]:
                heapq.heapreplace(self._newest, entry)
        if stamp is None or stamp >= self._old_enough:  # else every aging rule would pass it
            for rule in self.aging:
                decision = rule(task)
                if decision is not None:
                    self._note(task, decision)
                    return
        assert stamp is not None
        status = self._statuses.setdefault(task.status, task.status)
        self._ids.append(task.id)
        self._stamps.append(stamp)
        self._status_col.append(status)
        if self._snapshot_col is not None:
            self._snapshot_col.append(snapshot_of(task.raw))

    def _select(self, task: Task, rules: Sequence[Rule] | None = None) -> Decision | None:
        for rule in self.selection if rules is None else rules:
            decision = rule(task)
            if decision is not None:
                return decision
        return None

    def decide(self, task: Task, *, fields: bool = True) -> Decision | None:
        """Every rule but keep-newest-N on one task: None when it is eligible.

        With ``fields=False`` the record carries only status and times (a per-task status
        answer): rules on other fields are not asked, and a missing timestamp is not judged.
        """
        for rule in self.selection:
            if not fields and not _reads_only_status(rule) and not _reads_only_id(rule):
                continue
            decision = rule(task)
            if decision is not None:
                return decision
        if not fields and task.timestamp is None:
            return None
        for rule in self.aging:
            decision = rule(task)
            if decision is not None:
                return decision
        return None

    def _note(self, task: Task, decision: Decision) -> None:
        _tally(self.counts, self.examples, decision, task.id, task.status, task.timestamp)

    def _reason(self, status: str) -> str:
        reason = f"older than {self.older_than} and status {status}"
        for name, pattern in self.match.items():
            reason += f" and {name} matches {pattern}"
        return reason

    def finish(self) -> Plan:
        """Apply keep-newest-N and the id guard; return the plan."""
        seen = sorted(self._seen)
        self._seen = array("q")
        # map() over two views: the comparisons run in C, not in a generator.
        if any(map(operator.eq, seen, itertools.islice(seen, 1, None))):
            # (A hash collision would also land here: astronomically rare, and it fails safe.)
            raise ListingError("the listing returned a task twice: paging is inconsistent")
        del seen
        ids, stamps, statuses = self._ids, self._stamps, self._status_col
        snapshots = self._snapshot_col
        chosen: array[int] = array("q")  # the listing positions kept, in deletion order
        kept_newest = {task_id for _, task_id in self._newest}
        n = len(ids)
        order: Iterable[int]
        if all(map(operator.gt, stamps, itertools.islice(stamps, 1, None))):
            # A newest-first listing (data_pipeline, DCS) is already in order; strictly, so that
            # ties keep the listing order as the stable sort below would.
            order = range(n - 1, -1, -1)
        else:
            order = sorted(range(n), key=stamps.__getitem__)
        final_ids: list[str] = []
        final_stamps: array[float] = array("d")
        final_statuses: list[str] = []
        invalid: list[Candidate] = []
        keep_reason = (Verdict.KEEP, f"kept: newest {self.keep_newest}")
        for index in order:
            task_id, status, stamp = ids[index], statuses[index], stamps[index]
            if task_id in kept_newest:
                when = datetime.fromtimestamp(stamp, UTC)
                _tally(self.counts, self.examples, keep_reason, task_id, status, when)
                continue
            why_invalid = self.target.invalid_id_reason(task_id)
            if why_invalid is not None:
                when = datetime.fromtimestamp(stamp, UTC)
                invalid.append(Candidate(task_id, status, when, f"refused: {why_invalid}"))
                _tally(
                    self.counts,
                    self.examples,
                    (Verdict.INVALID_ID, why_invalid),
                    task_id,
                    status,
                    when,
                )
                continue
            final_ids.append(task_id)
            final_stamps.append(stamp)
            final_statuses.append(status)
            if snapshots is not None:
                chosen.append(index)
        # The columns are rebuilt in deletion order; release the listing-order ones.
        self._ids, self._stamps, self._status_col = [], array("d"), []
        final_snapshots = snapshots.take(chosen) if snapshots is not None else None
        self._snapshot_col = Snapshots() if snapshots is not None else None
        reasons = {status: self._reason(status) for status in self._statuses.values()}
        # What _tally would do for each id, per status: Counter counts in C (its keys in order
        # of first appearance), and list.index finds each status's first examples.
        for status, number in Counter(final_statuses).items():
            decision = (Verdict.DELETE, reasons[status])
            self.counts[decision] += number
            examples = self.examples.setdefault(decision, [])
            index = -1
            for _ in range(min(number, self.EXAMPLES_PER_REASON - len(examples))):
                index = final_statuses.index(status, index + 1)
                when = datetime.fromtimestamp(final_stamps[index], UTC)
                examples.append(Example(final_ids[index], status, when))
        return Plan(
            policy=self.loaded,
            created_at=self.now,
            cutoff=self.cutoff,
            listed=self.listed,
            counts=self.counts,
            examples=self.examples,
            _ids=final_ids,
            _stamps=final_stamps,
            _statuses=final_statuses,
            _snapshots=final_snapshots,
            invalid=invalid,
            reasons=reasons,
            status_counts=Counter(self._status_counts),
            decide=self.decide,
            future_timestamps=(
                self.counts[(Verdict.PROTECTED, self._future.reason)] if self._future else 0
            ),
            future_furthest=self._future.furthest if self._future else timedelta(0),
        )


async def make_plan(
    loaded: LoadedPolicy,
    target: Target,
    tasks: AsyncIterable[Task],
    now: datetime,
    min_age: timedelta = timedelta(hours=1),
    future_tolerance: timedelta = DEFAULT_FUTURE_TOLERANCE,
    held: Mapping[str, str] | None = None,
    *,
    pins: Mapping[str, str] | None = None,
    snapshots: bool = False,
) -> Plan:
    """Consume a whole listing and plan it; a ListingError from the listing propagates.

    With ``snapshots``, the plan keeps each eligible task's record as listed (for the audit).
    """
    planner = Planner(
        loaded, target, now, min_age, future_tolerance, held, pins=pins, snapshots=snapshots
    )
    async for task in tasks:
        planner.add(task)
    return planner.finish()
