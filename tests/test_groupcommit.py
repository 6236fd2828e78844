"""Group commit: many workers' intents and outcomes, one audit transaction per group."""

from __future__ import annotations

import asyncio

import pytest

from reaper.audit import AuditEntry
from reaper.errors import AuditError
from reaper.groupcommit import GroupCommit
from reaper.targets.base import DeleteResult, Outcome


def entries(*ids: str) -> list[AuditEntry]:
    return [AuditEntry(task_id, "old", "completed", None) for task_id in ids]


def deleted(*ids: str) -> list[DeleteResult]:
    return [DeleteResult(task_id, Outcome.DELETED, 200) for task_id in ids]


class Database:
    """Records each transaction; can be slowed down or made to fail."""

    def __init__(self, delay: float = 0.01) -> None:
        self.delay = delay
        self.transactions: list[tuple[list[str], list[str]]] = []
        self.fail_with: Exception | None = None
        self.durable: set[str] = set()

    async def write(self, intents: list[AuditEntry], results: list[DeleteResult]) -> None:
        await asyncio.sleep(self.delay)
        if self.fail_with is not None:
            raise self.fail_with
        self.transactions.append(([e.task_id for e in intents], [r.task_id for r in results]))
        self.durable.update(e.task_id for e in intents)


def run(coroutine: object) -> None:
    asyncio.run(coroutine)  # type: ignore[arg-type]


class TestGrouping:
    def test_intend_returns_only_once_the_intents_are_durable(self) -> None:
        db = Database()

        async def main() -> None:
            journal = GroupCommit(db.write)
            await journal.intend(entries("a", "b"))
            assert {"a", "b"} <= db.durable

        run(main())

    def test_concurrent_workers_share_commits(self) -> None:
        db = Database(delay=0.02)

        async def worker(journal: GroupCommit, n: int) -> None:
            for i in range(5):
                await journal.intend(entries(f"w{n}-{i}"))
                journal.settle(deleted(f"w{n}-{i}"))

        async def main() -> GroupCommit:
            journal = GroupCommit(db.write)
            await asyncio.gather(*(worker(journal, n) for n in range(10)))
            await journal.flush()
            return journal

        journal = asyncio.run(main())
        intents = [i for tx, _ in db.transactions for i in tx]
        outcomes = [r for _, tx in db.transactions for r in tx]
        assert sorted(intents) == sorted(f"w{n}-{i}" for n in range(10) for i in range(5))
        assert sorted(outcomes) == sorted(intents)
        # 50 batches, 100 writes: grouped into far fewer transactions.
        assert len(db.transactions) <= 12
        assert journal.stats.commits == len(db.transactions)
        assert journal.stats.intents == journal.stats.outcomes == 50

    def test_an_outcome_is_never_written_before_its_intent(self) -> None:
        db = Database(delay=0.001)

        async def worker(journal: GroupCommit, n: int) -> None:
            for i in range(20):
                await journal.intend(entries(f"{n}-{i}"))
                journal.settle(deleted(f"{n}-{i}"))

        async def main() -> None:
            journal = GroupCommit(db.write)
            await asyncio.gather(*(worker(journal, n) for n in range(4)))
            await journal.flush()

        run(main())
        seen: set[str] = set()
        for intents, outcomes in db.transactions:
            assert set(outcomes) <= seen  # intents of earlier, committed transactions
            seen.update(intents)

    def test_groups_are_capped_in_rows(self) -> None:
        db = Database(delay=0.02)

        async def main() -> None:
            journal = GroupCommit(db.write, max_rows=4)
            await asyncio.gather(*(journal.intend(entries(f"{n}a", f"{n}b")) for n in range(6)))

        run(main())
        assert [len(intents) for intents, _ in db.transactions] == [4, 4, 4]

    def test_flush_waits_for_queued_outcomes(self) -> None:
        db = Database(delay=0.02)

        async def main() -> None:
            journal = GroupCommit(db.write)
            journal.settle(deleted("x", "y"))
            await journal.flush()
            assert [outcomes for _, outcomes in db.transactions] == [["x", "y"]]
            await journal.flush()  # nothing queued: returns at once

        run(main())


class TestFailClosed:
    def test_a_failed_write_fails_its_intents_and_every_later_one(self) -> None:
        db = Database()
        db.fail_with = AuditError("audit database: connection refused")
        failures: list[AuditError] = []

        async def main() -> None:
            journal = GroupCommit(db.write, on_failure=failures.append)
            results = await asyncio.gather(
                *(journal.intend(entries(f"t{n}")) for n in range(3)), return_exceptions=True
            )
            assert all(isinstance(r, AuditError) for r in results)
            db.fail_with = None  # even once the database is back: this run is over
            with pytest.raises(AuditError, match="connection refused"):
                await journal.intend(entries("later"))
            journal.settle(deleted("t0"))
            with pytest.raises(AuditError):
                await journal.flush()

        run(main())
        assert len(failures) == 1
        assert db.transactions == []

    def test_a_failed_outcome_write_stops_new_intents(self) -> None:
        db = Database()

        async def main() -> None:
            journal = GroupCommit(db.write)
            await journal.intend(entries("a"))
            db.fail_with = AuditError("disk full")
            journal.settle(deleted("a"))
            with pytest.raises(AuditError, match="disk full"):
                await journal.flush()
            with pytest.raises(AuditError):
                await journal.intend(entries("b"))

        run(main())
        assert db.durable == {"a"}

    def test_any_exception_in_a_write_fails_closed_as_an_audit_error(self) -> None:
        db = Database()
        db.fail_with = RuntimeError("driver bug")

        async def main() -> None:
            journal = GroupCommit(db.write)
            with pytest.raises(AuditError, match="driver bug"):
                await journal.intend(entries("a"))

        run(main())


def test_stats_count_commits_and_waits() -> None:
    db = Database(delay=0.01)

    async def main() -> GroupCommit:
        journal = GroupCommit(db.write)
        await journal.intend(entries("a"))
        journal.settle(deleted("a"))
        await journal.flush()
        return journal

    journal = asyncio.run(main())
    assert journal.stats.intent_wait > 0
    assert journal.stats.commits == 2
    assert journal.stats.batches == 1  # the intent in the first, the outcome alone in the second
    assert journal.stats.intents == journal.stats.outcomes == 1
