"""Policy leases: replicas of `reaper serve` share the policies, and take over a dead one's.

The rules under test are the documented ones (reaper/leases.py, README "Fleets"): a replica holds
at most ceil(policies / live replicas), releases its extra idle ones first (then by name), claims
free or expired ones in name order, and gives everything back when it stops. A replica that died
is simulated by moving its expiry into the past, or, end to end, by SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import policy_doc, sim_task
from pgserver import PostgresServer
from pydantic import ValidationError
from sqlalchemy import select, text, update
from test_daemon import Process, query

from reaper.audit import AuditStore, ledger_table, runs_table
from reaper.daemon import Daemon, DaemonConfig
from reaper.db import make_engine, upgrade
from reaper.errors import AuditError
from reaper.leases import Leases, leases_table, replicas_table
from reaper.settings import Settings
from reaper.simulators import Faults

TTL = timedelta(seconds=30)
POLICIES = ["p1", "p2", "p3", "p4", "p5"]


@pytest.fixture
def replicas(store: AuditStore) -> Iterator[list[Leases]]:
    """Three replicas' leases on one database (each with its own engine, as processes have)."""
    engines = [make_engine(store.engine.url) for _ in range(3)]
    yield [Leases(engine, TTL, replica=f"r{i}") for i, engine in enumerate(engines)]
    for engine in engines:
        engine.dispose()


def expire(store: AuditStore, replica: str) -> None:
    """What a replica's death looks like once its lease time has passed."""
    past = datetime.now(UTC) - timedelta(minutes=5)
    with store.engine.begin() as connection:
        connection.execute(
            update(leases_table).where(leases_table.c.holder == replica).values(expires_at=past)
        )
        connection.execute(
            update(replicas_table)
            .where(replicas_table.c.replica == replica)
            .values(expires_at=past)
        )


class TestShares:
    def test_one_replica_holds_every_policy(self, replicas: list[Leases]) -> None:
        """Alone, a replica's fair share is everything."""
        state = replicas[0].tick(POLICIES)
        assert state.held == set(POLICIES)
        assert state.replicas == 1

    def test_a_second_replica_gets_its_share(self, replicas: list[Leases]) -> None:
        """r0 holds 5; r1 joins: r0 keeps ceil(5/2) = 3 and releases p1, p2, which r1 claims."""
        a, b = replicas[0], replicas[1]
        a.tick(POLICIES)
        assert b.tick(POLICIES).held == set()  # nothing free yet
        first = a.tick(POLICIES)
        assert (first.held, first.replicas) == ({"p3", "p4", "p5"}, 2)
        assert b.tick(POLICIES).held == {"p1", "p2"}
        assert a.holders() == {"p1": "r1", "p2": "r1", "p3": "r0", "p4": "r0", "p5": "r0"}

    def test_running_policies_are_released_last(self, replicas: list[Leases]) -> None:
        """A replica over its share keeps the policies it is running now."""
        a, b = replicas[0], replicas[1]
        a.tick(POLICIES)
        b.tick(POLICIES)
        assert a.tick(POLICIES, busy={"p1", "p3"}).held == {"p1", "p3", "p5"}
        assert b.tick(POLICIES).held == {"p2", "p4"}

    def test_a_dead_replicas_policies_are_taken_over(
        self, store: AuditStore, replicas: list[Leases]
    ) -> None:
        """Once r1's leases expire, r0 is alone again and claims them."""
        a, b = replicas[0], replicas[1]
        a.tick(POLICIES)
        b.tick(POLICIES)
        a.tick(POLICIES)
        assert b.tick(POLICIES).held == {"p1", "p2"}
        expire(store, "r1")
        state = a.tick(POLICIES)
        assert (state.held, state.replicas) == (set(POLICIES), 1)

    def test_unexpired_leases_are_not_taken(self, replicas: list[Leases]) -> None:
        """A replica that renews keeps its leases however often the others tick."""
        a, b = replicas[0], replicas[1]
        a.tick(POLICIES)
        b.tick(POLICIES)
        a.tick(POLICIES)
        b.tick(POLICIES)
        for _ in range(3):
            assert b.tick(POLICIES).held == {"p1", "p2"}
            assert a.tick(POLICIES).held == {"p3", "p4", "p5"}

    def test_a_stopping_replica_gives_its_leases_back(self, replicas: list[Leases]) -> None:
        """release() frees the leases at once and leaves the replica count."""
        a, b = replicas[0], replicas[1]
        a.tick(POLICIES)
        b.tick(POLICIES)
        a.tick(POLICIES)
        b.tick(POLICIES)
        b.release()
        assert b.holders() == {"p1": None, "p2": None, "p3": "r0", "p4": "r0", "p5": "r0"}
        state = a.tick(POLICIES)
        assert (state.held, state.replicas) == (set(POLICIES), 1)

    def test_no_renewal_after_release(self, store: AuditStore, replicas: list[Leases]) -> None:
        """A renewal that was queued when shutdown released neither renews nor heartbeats."""
        a = replicas[0]
        a.tick(POLICIES)
        a.release()
        assert a.tick(POLICIES).held == set()
        assert set(a.holders().values()) == {None}
        with store.engine.connect() as connection:
            assert connection.execute(select(replicas_table)).all() == []

    def test_a_policy_removed_on_reload_is_released(self, replicas: list[Leases]) -> None:
        """Leases of policies the replica no longer has go back."""
        a = replicas[0]
        a.tick(POLICIES)
        assert a.tick(["p1", "p2"]).held == {"p1", "p2"}
        assert a.holders()["p5"] is None

    def test_the_ledger_tells_a_claimed_slot(
        self, store: AuditStore, replicas: list[Leases]
    ) -> None:
        """slot_claimed reads the run ledger."""
        slot = datetime(2026, 12, 1, 3, 15, tzinfo=UTC)
        assert not replicas[0].slot_claimed("p1", slot)
        assert store.claim_slot("p1", slot)
        assert replicas[0].slot_claimed("p1", slot)
        assert not replicas[0].slot_claimed("p1", slot + timedelta(days=1))


class TestConcurrentClaims:
    def test_replicas_ticking_at_once_never_share_a_policy(self, pg_server: PostgresServer) -> None:
        """Four replicas renewing and claiming at the same moments (SKIP LOCKED on PostgreSQL):
        in every round no policy has two holders, and they settle on fair shares."""
        url = pg_server.create_database()
        engine = make_engine(url)
        upgrade(engine)
        policies = [f"policy-{i:02d}" for i in range(18)]
        engines = [make_engine(url) for _ in range(4)]
        leases = [Leases(e, TTL, replica=f"r{i}") for i, e in enumerate(engines)]
        barrier = threading.Barrier(4)
        rounds: list[list[frozenset[str]]] = [[] for _ in range(8)]
        errors: list[BaseException] = []

        def replica(own: Leases) -> None:
            try:
                for index in range(8):
                    barrier.wait(timeout=60)
                    state = own.tick(policies)
                    rounds[index].append(state.held)
            except BaseException as exc:
                errors.append(exc)
                barrier.abort()

        threads = [threading.Thread(target=replica, args=(own,)) for own in leases]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        for each in engines:
            each.dispose()
        engine.dispose()
        assert errors == []
        for held in rounds:
            assert len(held) == 4
            assert sum(len(h) for h in held) == len(frozenset().union(*held))  # disjoint
        last = rounds[-1]
        assert frozenset().union(*last) == set(policies)
        assert sorted(len(h) for h in last) == [3, 5, 5, 5]  # ceil(18 / 4) = 5, the rest 3


def pair_of_daemons(
    store: AuditStore, tmp_path: Path, schedules: dict[str, str]
) -> tuple[list[Daemon], list[list[str]], list[Any]]:
    """Two daemons (not started) on one database and one policy file, their fires recorded
    instead of run; plus an unscheduled policy 'manual'."""
    docs = [
        policy_doc("http://127.0.0.1:9", schedule=schedule) | {"name": name}
        for name, schedule in schedules.items()
    ]
    docs.append(policy_doc("http://127.0.0.1:9") | {"name": "manual"})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(docs), encoding="utf-8")
    config = DaemonConfig(policies=tmp_path / "p.yaml")
    engines = [make_engine(store.engine.url) for _ in range(2)]
    daemons = []
    fired: list[list[str]] = []
    for i, engine in enumerate(engines):
        daemon = Daemon(config, AuditStore(engine), leases=Leases(engine, TTL, replica=f"d{i}"))
        record: list[str] = []

        async def fire(name: str, record: list[str] = record) -> None:
            record.append(name)

        daemon._fire = fire  # type: ignore[method-assign]
        daemon.install(daemon.load())
        daemons.append(daemon)
        fired.append(record)
    return daemons, fired, engines


def jobs(daemon: Daemon) -> set[str]:
    return {job.id for job in daemon.scheduler.get_jobs()}


async def rounds(daemons: list[Daemon], count: int = 2) -> None:
    """Each daemon renews in turn, ``count`` times; then let the catch-up tasks run."""
    for _ in range(count):
        for daemon in daemons:
            await daemon.renew_leases()
    await asyncio.sleep(0)


class TestDaemon:
    @pytest.fixture
    def engines(self) -> Iterator[list[Any]]:
        made: list[Any] = []
        yield made
        for engine in made:
            engine.dispose()

    def test_each_replica_schedules_only_what_it_holds(
        self, store: AuditStore, tmp_path: Path, engines: list[Any]
    ) -> None:
        """Between them the two schedule every scheduled policy once; neither 'manual'."""
        names = {f"p{i}": "15 3 * * *" for i in range(1, 5)}
        (a, b), _, made = pair_of_daemons(store, tmp_path, names)
        engines.extend(made)
        asyncio.run(rounds([a, b]))
        assert jobs(a) == {"p3", "p4"}
        assert jobs(b) == {"p1", "p2"}
        assert a.metrics.registry.get_sample_value("reaper_policies_loaded") == 2

    def test_a_taken_over_policy_runs_its_missed_slot(
        self, store: AuditStore, tmp_path: Path, engines: list[Any]
    ) -> None:
        """Taking a policy over runs its current slot if nobody claimed it and it is within the
        misfire grace; a claimed slot, or one long past, is left alone."""
        names = {"p1": "* * * * *", "p2": "* * * * *", "p3": "0 0 1 1 *", "p4": "0 0 1 1 *"}
        (a, b), (fired_a, fired_b), made = pair_of_daemons(store, tmp_path, names)
        engines.extend(made)
        minute = store.db_now().replace(second=0, microsecond=0)
        for slot in (minute, minute + timedelta(minutes=1)):  # whichever minute the test is in
            assert store.claim_slot("p2", slot)
        asyncio.run(rounds([a]))
        # a took everything: p1's slot is unclaimed and this minute's; p3/p4's is January's.
        assert fired_a == ["p1"]
        asyncio.run(rounds([b, a, b]))
        assert jobs(b) == {"p1", "p2"}
        assert fired_b == ["p1"]

    def test_a_stopping_replica_keeps_only_its_running_policies(
        self, store: AuditStore, tmp_path: Path, engines: list[Any]
    ) -> None:
        """On SIGTERM the leases of idle policies go back at once; a running policy's lease is
        renewed until its run ends, so no other replica schedules it meanwhile."""
        names = {f"p{i}": "15 3 * * *" for i in range(1, 7)}
        (a, b), _, made = pair_of_daemons(store, tmp_path, names)
        engines.extend(made)
        assert a.leases is not None
        asyncio.run(rounds([a, b]))
        assert a.held == {"p4", "p5", "p6"}
        # Two runs going, two replicas live: both leases stay (a fair share would be one).
        a._running |= {"p4", "p5"}
        a.stop.set()
        asyncio.run(a.renew_leases())
        assert a.held == {"p4", "p5"}
        holders = a.leases.holders()
        assert {name for name, holder in holders.items() if holder == "d0"} == {"p4", "p5"}
        assert holders["p6"] is None
        a._running.clear()
        asyncio.run(a.renew_leases())
        assert a.held == frozenset()

    def test_a_replica_that_cannot_renew_stops_scheduling(
        self,
        store: AuditStore,
        tmp_path: Path,
        engines: list[Any],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Renewals failing for longer than the lease time: the replica drops its jobs."""
        names = {f"p{i}": "15 3 * * *" for i in range(1, 5)}
        (a, _), _, made = pair_of_daemons(store, tmp_path, names)
        engines.extend(made)
        asyncio.run(a.renew_leases())
        assert jobs(a) == {"p1", "p2", "p3", "p4"}
        assert a.leases is not None

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise AuditError("database unreachable")

        monkeypatch.setattr(a.leases, "tick", broken)
        asyncio.run(a.renew_leases())
        assert jobs(a) == {"p1", "p2", "p3", "p4"}  # still within the lease time
        a._renewed = time.monotonic() - TTL.total_seconds() - 1
        asyncio.run(a.renew_leases())
        assert jobs(a) == set()
        assert a.held == frozenset()


# --- end to end: real replicas, one killed ------------------------------------------------------


def tasks_now(n: int) -> list[Any]:
    now = datetime.now(UTC)
    return [
        sim_task(f"task_20260901_{i:06d}", age=timedelta(days=40, minutes=i), now=now)
        for i in range(n)
    ]


@pytest.mark.slow
def test_a_killed_replicas_policies_are_taken_over_and_no_slot_runs_twice(
    data_pipeline: Any, pg_server: PostgresServer, tmp_path: Path
) -> None:
    """Two `reaper serve` replicas split four every-minute policies. One is killed (SIGKILL)
    while it deletes; after its leases expire the other holds all four and runs the killed
    one's policies at their next slot. Each slot ran once; no task was deleted twice."""
    sims = {}
    rows = ["site,url"]
    for site in ("a", "b", "c", "d"):
        sim, url = data_pipeline(tasks_now(30), faults=Faults(latency_ms=20))
        sims[site] = sim
        rows.append(f"{site},{url}")
    (tmp_path / "sites.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "fleet.yaml").write_text(
        "name: fleet\n"
        "schedule: '* * * * *'\n"
        "for_each: sites.csv\n"
        "instance_key: ${site}\n"
        "target: {type: data_pipeline, base_url: '${url}', timestamps_timezone: UTC}\n"
        "select: {status: [completed, failed], older_than: 30d}\n"
        "delete: {batch_size: 1, rate: 3/s, concurrency: 1, max_fraction: 1.0}\n",
        encoding="utf-8",
    )
    database = pg_server.create_database()
    env = {
        "REAPER_DATABASE_URL": database,
        "REAPER_POLICIES": str(tmp_path / "fleet.yaml"),
        "REAPER_LEASE_TTL": "3s",
    }
    subprocess.run(
        [sys.executable, "-m", "reaper", "db", "upgrade"],
        check=True,
        env={**os.environ, **env},
        capture_output=True,
    )
    everything = {f"fleet[{site}]" for site in sims}
    first = Process("serve", "--metrics-port", "0", env=env)
    second: Process | None = None
    try:
        # Alone, the first replica holds all four and runs this minute's slot at once (nobody
        # ran it).
        assert set(first.wait_for("leases_changed")["held"]) == everything
        second = Process("serve", "--metrics-port", "0", env=env)
        taken = set(second.wait_for("leases_changed", timeout=30)["held"])
        kept = everything - taken
        assert len(taken) == len(kept) == 2
        # Kill it while it deletes (30 tasks at 3/s take 10s).
        busy = [sims[name[len("fleet[") : -1]] for name in sorted(kept)]
        deadline = time.monotonic() + 60
        while not any(3 <= len(sim.deleted_ids) for sim in busy):
            assert time.monotonic() < deadline, "the first replica never started deleting"
            time.sleep(0.05)
        assert all(len(sim.deleted_ids) < 30 for sim in busy)
        first.popen.kill()
        first.popen.wait(timeout=30)
        killed_at = datetime.now(UTC)
        takeover = second.wait_for("leases_changed", timeout=30)
        assert set(takeover["acquired"]) == kept
        assert set(takeover["held"]) == everything
        # The survivor finishes the work at the next slots (it takes at most two minutes).
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if all(len(sim.deleted_ids) == 30 for sim in sims.values()):
                break
            time.sleep(0.5)
        second.wait_for("run_finished", timeout=30)
        assert second.stop() == 0
    finally:
        first.close()
        if second is not None:
            second.close()
    for sim in sims.values():
        # Deleted once at most, and by the end all of them (the survivor finished the work).
        assert max(sim.delete_requests_by_id.values()) == 1
        assert len(sim.deleted_ids) == 30
    ledger = query(database, ledger_table)
    runs = query(database, runs_table)
    # Every run claimed its slot first, one run per claimed slot.
    run_ids = [row["run_id"] for row in ledger if row["run_id"] is not None]
    assert len(run_ids) == len(set(run_ids))
    assert {run["id"] for run in runs} == set(run_ids)
    # The killed replica's policies: a slot by the killed replica, a later one by the survivor.
    assert second is not None
    for policy in kept:
        mine = sorted((row for row in ledger if row["policy"] == policy), key=lambda r: r["slot"])
        assert mine[0]["pid"] == first.popen.pid
        assert mine[0]["slot"] < killed_at
        assert second.popen.pid in {row["pid"] for row in mine[1:]}
    engine = make_engine(database)
    with engine.connect() as connection:
        holders = connection.execute(select(leases_table.c.holder)).scalars().all()
        replicas_left = connection.execute(text("SELECT count(*) FROM reaper_replicas")).scalar()
    engine.dispose()
    # The survivor stopped cleanly: it gave its leases back and left the replica set.
    assert holders == [None] * 4
    assert replicas_left == 0


class TestSetting:
    def test_lease_time(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """REAPER_LEASE_TTL: 30s unless set; at least a second (renewed every third of it)."""
        assert Settings().lease_ttl == timedelta(seconds=30)
        monkeypatch.setenv("REAPER_LEASE_TTL", "2s")
        assert Settings().lease_ttl == timedelta(seconds=2)
        monkeypatch.setenv("REAPER_LEASE_TTL", "0s")
        with pytest.raises(ValidationError, match="a lease lasts at least 1s"):
            Settings()
