"""Several policies in one `reaper run`: concurrency, its bound, signals, logs, bounded runs."""

from __future__ import annotations

import asyncio
import io
import json
import os
import queue
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import certifi
import pytest
import yaml
from conftest import make_policy, policy_doc, sim_task
from rich.console import Console
from sqlalchemy import select

from reaper.audit import AuditStore, audit_table, runs_table
from reaper.daemon import JitteredTrigger
from reaper.db import make_engine
from reaper.metrics import Metrics
from reaper.parallel import Turns, run_spread
from reaper.progress import BatchReporter, ProgressBars
from reaper.runner import RunStatus, run_policy, tls_context
from reaper.schedule import parse_cron
from reaper.simulators import DataPipelineSimulator, Faults

Start = Callable[..., tuple[DataPipelineSimulator, str]]


def reaper(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("REAPER_")}
    return subprocess.run(
        [sys.executable, "-m", "reaper", *args],
        capture_output=True,
        text=True,
        env={**base, "REAPER_LOG_FORMAT": "json", **env},
        timeout=180,
        check=False,
    )


def old_tasks(prefix: str, n: int, status: str = "completed") -> list[Any]:
    now = datetime.now(UTC)
    return [
        sim_task(f"task_2026090{prefix}_{i:06d}", status, timedelta(days=40, minutes=i), now=now)
        for i in range(n)
    ]


@pytest.fixture
def fleet(tmp_path: Path) -> dict[str, Any]:
    """A policy directory and a SQLite audit database for `reaper run`."""
    (tmp_path / "policies").mkdir()
    return {
        "dir": tmp_path / "policies",
        "db": f"sqlite:///{tmp_path / 'audit.db'}",
        "env": {
            "REAPER_DATABASE_URL": f"sqlite:///{tmp_path / 'audit.db'}",
            "REAPER_POLICIES": str(tmp_path / "policies"),
        },
    }


def write(fleet: dict[str, Any], name: str, url: str, **sections: Any) -> None:
    doc = policy_doc(url, name=name, **sections)
    (fleet["dir"] / f"{name}.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")


def slow(batch: int = 1, rate: str = "100/s", **delete: Any) -> dict[str, Any]:
    return {"batch_size": batch, "rate": rate, "concurrency": 1, "verify": "never", **delete}


def events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def query(url: str, table: Any) -> list[dict[str, Any]]:
    engine = make_engine(url)
    with engine.connect() as connection:
        rows = [dict(r._mapping) for r in connection.execute(select(table))]
    engine.dispose()
    return rows


def overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two runs' [started_at, finished_at] intervals overlap."""
    return bool(a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"])


class TestConcurrentRun:
    def test_policies_on_different_endpoints_run_at_the_same_time(
        self, data_pipeline: Start, fleet: dict[str, Any]
    ) -> None:
        """Policies of different endpoints run at once: their run intervals overlap."""
        for name in ("a", "b", "c"):
            _, url = data_pipeline(old_tasks("1", 8), faults=Faults(latency_ms=60))
            write(fleet, name, url, delete=slow())
        result = reaper("run", "--output", "json", env=fleet["env"])
        assert result.returncode == 0, result.stderr
        runs = json.loads(result.stdout)
        assert [r["policy"] for r in runs] == ["a", "b", "c"]
        assert all(r["deleted"] == 8 for r in runs)
        assert overlap(runs[0], runs[1]) and overlap(runs[1], runs[2]) and overlap(runs[0], runs[2])

    def test_policies_over_the_same_tasks_take_turns(
        self, data_pipeline: Start, fleet: dict[str, Any]
    ) -> None:
        """Two policies of one target (overlapping selections) never run at once, and no id
        is sent twice; a third policy at another target runs beside them."""
        sim, url = data_pipeline(
            old_tasks("1", 6) + old_tasks("2", 6, "failed"), faults=Faults(latency_ms=60)
        )
        write(fleet, "a", url, delete=slow())
        write(fleet, "b", url, select={"status": ["failed"], "older_than": "30d"}, delete=slow())
        _, other = data_pipeline(old_tasks("3", 8), faults=Faults(latency_ms=60))
        write(fleet, "c", other, delete=slow())
        result = reaper("run", "--output", "json", env=fleet["env"])
        assert result.returncode == 0, result.stderr
        a, b, c = json.loads(result.stdout)
        assert not overlap(a, b)
        assert overlap(a, c) or overlap(b, c)
        # "a" selects completed and failed tasks, "b" failed ones: whichever ran second found
        # the shared ones gone already, and the target saw every id deleted once.
        assert a["deleted"] + b["deleted"] == 12 and c["deleted"] == 8
        assert sorted(sim.deleted_ids) == sorted(set(sim.deleted_ids))
        assert sim.overlapping_deletes == 0

    def test_the_bound_holds(self, data_pipeline: Start, fleet: dict[str, Any]) -> None:
        """REAPER_MAX_PARALLEL_POLICIES=1: one policy after another, none overlapping."""
        for name in ("a", "b"):
            _, url = data_pipeline(old_tasks("1", 5), faults=Faults(latency_ms=60))
            write(fleet, name, url, delete=slow())
        result = reaper(
            "run", "--output", "json", env={**fleet["env"], "REAPER_MAX_PARALLEL_POLICIES": "1"}
        )
        assert result.returncode == 0, result.stderr
        a, b = json.loads(result.stdout)
        assert not overlap(a, b)

    def test_exit_codes_and_json_are_unchanged(
        self, data_pipeline: Start, fleet: dict[str, Any]
    ) -> None:
        """Several policies, one failing: exit 1, one JSON entry per policy in the order they
        were loaded, each with its own counts; all succeeding: exit 0."""
        _, good = data_pipeline(old_tasks("1", 6))
        _, bad = data_pipeline(old_tasks("2", 4), faults=Faults(partial_failure_rate=1.0))
        _, other = data_pipeline(old_tasks("3", 3))
        write(fleet, "b-fails", bad)
        write(fleet, "a-good", good)
        write(fleet, "c-good", other)
        result = reaper("run", "--output", "json", env=fleet["env"])
        assert result.returncode == 1, result.stderr
        runs = json.loads(result.stdout)
        assert [(r["policy"], r["status"], r["deleted"], r["failed"]) for r in runs] == [
            ("a-good", "succeeded", 6, 0),
            ("b-fails", "partial", 0, 4),
            ("c-good", "succeeded", 3, 0),
        ]
        assert set(runs[0]) == set(runs[1])  # same fields as one policy's entry
        (fleet["dir"] / "b-fails.yaml").unlink()
        _, more = data_pipeline(old_tasks("4", 2))
        write(fleet, "d-good", more)
        result = reaper("run", env=fleet["env"])
        assert result.returncode == 0, result.stderr
        assert "reaper run summary" in result.stdout

    def test_every_log_line_of_a_run_names_it(
        self, data_pipeline: Start, fleet: dict[str, Any]
    ) -> None:
        """Runs going at once keep their own log context: every line of a run carries its
        run_id and policy, and one run_id always goes with one policy."""
        for name in ("a", "b", "c"):
            _, url = data_pipeline(old_tasks("1", 6), faults=Faults(latency_ms=20))
            write(fleet, name, url, delete=slow())
        result = reaper("run", env=fleet["env"])
        assert result.returncode == 0, result.stderr
        lines = events(result.stderr)
        per_run = {"run_started", "plan_ready", "deleting", "batch_done", "run_finished"}
        assert {e["event"] for e in lines} >= per_run
        owners: dict[str, set[str]] = {}
        for line in lines:
            if line["event"] in per_run:
                assert line.get("run_id") and line.get("policy"), line
            if "run_id" in line:
                owners.setdefault(line["run_id"], set()).add(line["policy"])
        assert sorted(p for names in owners.values() for p in names) == ["a", "b", "c"]
        assert all(len(names) == 1 for names in owners.values())
        batches = {e["policy"] for e in lines if e["event"] == "batch_done"}
        assert batches == {"a", "b", "c"}

    def test_one_policy_stopping_on_error_leaves_the_others_running(
        self, data_pipeline: Start, fleet: dict[str, Any]
    ) -> None:
        """A policy that stops on its first failure stops only itself: the policy beside it
        deletes everything."""
        _, bad = data_pipeline(old_tasks("1", 20), faults=Faults(partial_failure_rate=1.0))
        _, good = data_pipeline(old_tasks("2", 30), faults=Faults(latency_ms=20))
        write(fleet, "a-stops", bad, delete=slow(continue_on_error=False))
        write(fleet, "b-goes-on", good, delete=slow())
        result = reaper("run", "--output", "json", env=fleet["env"])
        assert result.returncode == 1
        stops, goes_on = json.loads(result.stdout)
        assert stops["status"] == "aborted"
        assert "stop-on-error" in stops["error"]
        assert (goes_on["status"], goes_on["deleted"]) == ("succeeded", 30)


class Process:
    """`reaper run` in a subprocess whose JSON log lines are read on a thread."""

    def __init__(self, env: dict[str, str]) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("REAPER_")}
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "reaper", "run", "--output", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**base, "REAPER_LOG_FORMAT": "json", **env},
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            if line.startswith("{"):
                self.lines.put(json.loads(line))

    def wait_for_batches(self, policies: set[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        while seen != policies:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if line["event"] == "batch_done":
                seen.add(line["policy"])


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        if process.popen.poll() is None:
            process.popen.kill()
        process.popen.communicate()


class TestSignals:
    def test_sigterm_interrupts_every_running_policy(
        self, data_pipeline: Start, fleet: dict[str, Any], processes: list[Process]
    ) -> None:
        """SIGTERM with several policies deleting: no batch starts in any of them, each run is
        recorded interrupted with a true audit, and the command exits 0."""
        sims = {}
        for name in ("a", "b"):
            sims[name], url = data_pipeline(old_tasks("1", 200), faults=Faults(latency_ms=50))
            write(fleet, name, url, delete={**slow(batch=2, rate="20/s"), "concurrency": 2})
        process = Process({**fleet["env"], "REAPER_SHUTDOWN_GRACE": "10s"})
        processes.append(process)
        process.wait_for_batches({"a", "b"})
        process.popen.send_signal(signal.SIGTERM)
        stdout, _ = process.popen.communicate(timeout=60)
        assert process.popen.returncode == 0
        reported = {r["policy"]: r for r in json.loads(stdout)}
        runs = {r["policy"]: r for r in query(fleet["db"], runs_table)}
        rows = query(fleet["db"], audit_table)
        for name, sim in sims.items():
            assert reported[name]["status"] == runs[name]["status"] == "interrupted"
            assert 0 < runs[name]["deleted"] < 200
            mine = [r for r in rows if r["run_id"] == runs[name]["id"]]
            assert {r["outcome"] for r in mine} <= {"deleted", "not_deleted"}
            deleted = {r["task_id"] for r in mine if r["outcome"] == "deleted"}
            assert deleted == set(sim.deleted_ids)
            never_sent = {r["task_id"] for r in mine if r["outcome"] == "not_deleted"}
            assert not never_sent & set(sim.delete_requests_by_id)


def remaining(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("reaper_eligible_remaining", {"policy": "test-policy"})


class TestBoundedRuns:
    def test_max_run_time_stops_starting_batches_and_the_next_run_continues(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """Once delete.max_run_time is up no batch starts: the run is partial with the reason
        and what is left; the next run deletes the rest, each task once."""
        sim, url = data_pipeline(old_tasks("1", 50))
        loaded = make_policy(url, delete={"batch_size": 5, "concurrency": 1, "max_run_time": "10s"})
        clock = [0.0]

        def tick(_: object) -> None:
            clock[0] += 4.0  # each batch "takes" 4 s

        first = asyncio.run(run_policy(loaded, store, on_batch=tick, monotonic=lambda: clock[0]))
        # Batches start at 0, 4 and 8 s; at 12 s the time is up. The worker had written the
        # fourth batch's intents while the third was in flight: it is recorded never sent.
        assert first.status is RunStatus.PARTIAL
        assert first.time_up and first.ok
        assert first.summary.deleted == 15
        assert first.remaining == 35
        assert "max_run_time (10s) was up after 15 of 50 deletions; 35 left" in (first.error or "")
        metrics = Metrics()
        metrics.observe(first, "data_pipeline")
        assert remaining(metrics) == 35
        rows = store.rows(run_id=first.run_id, limit=None)
        never = [r for r in rows if r.outcome == "not_deleted"]
        assert len(never) == 5
        assert all("max_run_time" in (r.note or "") for r in never)

        second = asyncio.run(run_policy(loaded, store))
        assert second.status is RunStatus.SUCCEEDED
        assert (second.summary.deleted, second.remaining) == (35, 0)
        assert len(sim.deleted_ids) == 50
        assert max(sim.delete_requests_by_id.values()) == 1
        metrics.observe(second, "data_pipeline")
        assert remaining(metrics) == 0

    def test_time_up_before_deleting_sends_nothing(
        self, data_pipeline: Start, store: AuditStore
    ) -> None:
        """A listing that outlasts max_run_time: nothing is sent, everything is left."""
        sim, url = data_pipeline(old_tasks("1", 12))
        loaded = make_policy(url, delete={"batch_size": 5, "max_run_time": "30s"})
        clock = [0.0]

        def listing_took_long(_: object) -> None:
            clock[0] = 31.0

        run = asyncio.run(
            run_policy(loaded, store, on_plan=listing_took_long, monotonic=lambda: clock[0])
        )
        assert run.status is RunStatus.PARTIAL and run.time_up
        assert (run.summary.deleted, run.remaining) == (0, 12)
        assert "before deleting started" in (run.error or "")
        assert sim.stats["delete_requests"] == 0

    def test_a_run_that_ran_out_of_time_exits_0(
        self, data_pipeline: Start, fleet: dict[str, Any]
    ) -> None:
        """`reaper run`: a run stopped by max_run_time is partial, and exits 0 when nothing
        failed (the rest is the next run's, as after a SIGTERM)."""
        _, url = data_pipeline(old_tasks("1", 40), faults=Faults(latency_ms=200))
        write(fleet, "bounded", url, delete=slow(max_run_time="1s"))
        result = reaper("run", "--output", "json", env=fleet["env"])
        assert result.returncode == 0, result.stderr
        [run] = json.loads(result.stdout)
        assert run["status"] == "partial"
        assert run["deleted"] < 40
        assert "max_run_time" in run["error"]


class TestValidateWarnings:
    def test_validate_warns_about_differing_rates_on_one_endpoint(self, tmp_path: Path) -> None:
        """`reaper validate` names the policies of one endpoint whose rates differ and the
        rate they will share; it still exits 0."""
        policies = tmp_path / "policies"
        policies.mkdir()
        for name, url, rate in (
            ("fast", "http://127.0.0.1:8084", "20/s"),
            ("slow", "http://127.0.0.1:8084/", "5/s"),
            ("elsewhere", "http://127.0.0.1:8085", "1/s"),
        ):
            doc = policy_doc(url, name=name, delete={"rate": rate})
            (policies / f"{name}.yaml").write_text(yaml.safe_dump(doc))
        result = reaper("validate", str(policies), env={})
        assert result.returncode == 0, result.stderr
        [warning] = [line for line in result.stderr.splitlines() if "warning" in line]
        assert "http://127.0.0.1:8084" in warning
        assert "fast 20/s" in warning and "slow 5/s" in warning
        assert "the lowest, 5/s" in warning
        assert "elsewhere" not in warning


class TestJitter:
    def test_each_policy_starts_at_its_own_offset_within_the_jitter(self) -> None:
        """Policies on one cron line start spread over the jitter, each at a fixed offset, and
        each run still belongs to its scheduled slot."""
        schedule = parse_cron("0 3 * * *", UTC)
        slot = datetime(2026, 11, 2, 3, 0, tzinfo=UTC)
        before = datetime(2026, 11, 2, 2, 0, tzinfo=UTC)
        jitter = timedelta(minutes=10)
        fires = []
        for index in range(40):
            trigger = JitteredTrigger(schedule, jitter, f"tenant-{index}")
            fire = trigger.get_next_fire_time(None, before)
            assert slot <= fire < slot + jitter
            assert schedule.previous_fire_time(fire) == slot  # the slot `--slot auto` claims
            # The next slot's fire (asked for just after this one, as the scheduler does) has
            # the same offset.
            following = trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
            assert following - fire == timedelta(days=1)
            fires.append(fire)
        assert len(set(fires)) == 40
        assert max(fires) - min(fires) > jitter / 2

    def test_validate_shows_when_each_run_starts(self, tmp_path: Path) -> None:
        """`validate --output json` gives the jittered start of each slot: what `serve`'s
        trigger fires at, one fixed offset within the jitter, another for another name."""
        docs = [
            {
                **policy_doc("http://127.0.0.1:9", name=name),
                "schedule": "0 3 * * *",
                "timezone": "Europe/Berlin",
                "schedule_jitter": "30m",
            }
            for name in ("tenant-a", "tenant-b")
        ]
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(docs), encoding="utf-8")
        result = reaper(
            "validate",
            str(tmp_path / "p.yaml"),
            "--output",
            "json",
            "--after",
            "2026-12-06T00:00:00Z",
            env={},
        )
        assert result.returncode == 0, result.stderr
        offsets = []
        for entry in json.loads(result.stdout):
            assert entry["schedule_jitter"] == "30m"
            # 03:00 in Berlin in December is 02:00 UTC.
            assert entry["next_runs"][0] == "2026-12-06T02:00:00Z"
            slots = [datetime.fromisoformat(t) for t in entry["next_runs"]]
            starts = [datetime.fromisoformat(t) for t in entry["starts"]]
            [offset] = {start - slot for slot, start in zip(slots, starts, strict=True)}
            assert timedelta(0) <= offset < timedelta(minutes=30)
            trigger = JitteredTrigger(
                parse_cron("0 3 * * *", ZoneInfo("Europe/Berlin")),
                timedelta(minutes=30),
                entry["name"],
            )
            fire = trigger.get_next_fire_time(None, slots[0] - timedelta(hours=1))
            assert fire.replace(microsecond=0) == starts[0]
            offsets.append(offset)
        assert offsets[0] != offsets[1]

    def test_the_offset_stays_below_half_the_gap_to_the_next_slot(self) -> None:
        """With a jitter longer than the schedule's interval a run still starts before the next
        slot (within half the gap), so slots never run out of order."""
        schedule = parse_cron("*/10 * * * *", UTC)
        now = datetime(2026, 11, 2, 3, 1, tzinfo=UTC)
        for index in range(20):
            trigger = JitteredTrigger(schedule, timedelta(hours=2), f"p{index}")
            fire = trigger.get_next_fire_time(None, now)
            slot = schedule.previous_fire_time(fire)
            assert slot is not None
            assert timedelta(0) <= fire - slot < timedelta(minutes=5)

    def test_a_slot_whose_start_is_still_ahead_is_not_skipped(self) -> None:
        """Started after a slot's time but before its jittered start, the scheduler still runs
        that slot."""
        schedule = parse_cron("0 3 * * *", UTC)
        trigger = JitteredTrigger(schedule, timedelta(minutes=30), "p")
        slot = datetime(2026, 11, 2, 3, 0, tzinfo=UTC)
        fire = trigger.fire_time(slot)
        assert fire > slot  # this name's offset is not zero
        assert trigger.get_next_fire_time(None, slot + (fire - slot) / 2) == fire


class TestProgressBars:
    def test_one_bar_per_running_policy(self) -> None:
        """On a terminal each policy deleting has its own bar, gone when its run ends."""
        console = Console(file=io.StringIO(), force_terminal=True)
        bars = ProgressBars(console)
        first, second = BatchReporter(console, bars), BatchReporter(console, bars)
        for reporter, name in ((first, "a"), (second, "b")):
            reporter.plan(SimpleNamespace(eligible=10, policy=SimpleNamespace(name=name)))  # type: ignore[arg-type]
        assert bars.progress is not None
        assert [task.description for task in bars.progress.tasks] == ["a", "b"]
        first.close()
        assert [task.description for task in bars.progress.tasks] == ["b"]
        second.close()
        bars.close()
        assert bars.progress is None


class TestRunSpread:
    def test_bound_order_and_spread(self) -> None:
        """At most `limit` at once; the first runs started cover distinct groups; results
        come back in the order given."""
        going, peak, started = 0, 0, []

        async def run(item: tuple[str, int]) -> str:
            nonlocal going, peak
            started.append(item)
            going += 1
            peak = max(peak, going)
            await asyncio.sleep(0.01)
            going -= 1
            return f"{item[0]}{item[1]}"

        items = [("x", 1), ("x", 2), ("x", 3), ("y", 1), ("z", 1), ("z", 2)]
        results = asyncio.run(run_spread(items, run, limit=3, group=lambda item: item[0]))
        assert results == ["x1", "x2", "x3", "y1", "z1", "z2"]
        assert peak == 3
        assert {group for group, _ in started[:3]} == {"x", "y", "z"}

    def test_stop_starts_no_more_and_an_error_waits_for_the_others(self) -> None:
        """After stop no further item starts; an exception is raised once the others end."""
        stop = asyncio.Event()
        finished: list[int] = []

        async def run(item: int) -> int:
            if item == 0:
                stop.set()
            await asyncio.sleep(0.01)
            finished.append(item)
            return item

        assert asyncio.run(run_spread([0, 1, 2, 3], run, limit=2, group=str, stop=stop)) == [0, 1]

        async def failing(item: int) -> int:
            if item == 0:
                raise ValueError("boom")
            await asyncio.sleep(0.02)
            finished.append(item)
            return item

        finished.clear()
        with pytest.raises(ValueError, match="boom"):
            asyncio.run(run_spread([0, 1, 2], failing, limit=2, group=str))
        assert finished == [1]  # the run going on ended; none started after the error

    def test_items_of_one_exclusive_key_take_turns(self) -> None:
        """Items sharing an exclusive key never run at once; the others fill the free places
        meanwhile, and every item runs."""
        going: dict[str, int] = {}
        clash: list[str] = []
        started: list[str] = []

        async def run(item: str) -> str:
            key = item[0]
            started.append(item)
            going[key] = going.get(key, 0) + 1
            if going[key] > 1:
                clash.append(item)
            await asyncio.sleep(0.01 if key != "t" else 0.03)
            going[key] -= 1
            return item

        items = ["t1", "t2", "t3", "u1", "v1"]
        results = asyncio.run(
            run_spread(
                items, run, limit=3, group=lambda item: "one endpoint", exclusive=lambda i: i[0]
            )
        )
        assert results == items
        assert not clash
        assert started[:3] == ["t1", "u1", "v1"]  # t2 waits for t1; u1 and v1 do not wait

    def test_turns_in_the_daemon(self) -> None:
        """Turns.of: one holder per key at a time, other keys unaffected, nothing kept after."""
        turns = Turns()
        log: list[str] = []

        async def hold(key: str, name: str) -> None:
            async with turns.of(key):
                log.append(f"+{name}")
                await asyncio.sleep(0.01)
                log.append(f"-{name}")

        async def main() -> None:
            await asyncio.gather(hold("k", "a"), hold("k", "b"), hold("j", "c"))

        asyncio.run(main())
        assert log.index("-a") < log.index("+b")
        assert log.index("+c") < log.index("-a")
        assert not turns._locks


class TestTlsContext:
    def test_one_context_per_trust_setting(self, tmp_path: Path) -> None:
        """Clients share a TLS context per trust setting (loading a CA bundle per client cost
        a fleet seconds of CPU); a bundle file that changes is read again."""
        assert tls_context(True, None) is tls_context(True, None)
        assert tls_context(False, None) is tls_context(False, None)
        assert tls_context(False, None).verify_mode is ssl.CERT_NONE
        assert tls_context(True, None).verify_mode is ssl.CERT_REQUIRED
        bundle = tmp_path / "ca.pem"
        bundle.write_text(_ca_pem())
        first = tls_context(True, str(bundle))
        assert tls_context(True, str(bundle)) is first
        os.utime(bundle, ns=(0, 10**18))
        assert tls_context(True, str(bundle)) is not first


def _ca_pem() -> str:
    """One CA certificate, taken from certifi's bundle."""
    text = Path(certifi.where()).read_text()
    end = "-----END CERTIFICATE-----"
    return text[text.index("-----BEGIN CERTIFICATE-----") : text.index(end) + len(end)] + "\n"


class TestAuditThreads:
    def test_runs_on_sqlite_share_one_audit_thread(self, database_url: str) -> None:
        """On SQLite every run of a process writes through one thread (SQLite takes one writer
        at a time); on PostgreSQL each run has its own. The thread ends with its last user."""
        from reaper.db import make_engine, upgrade
        from reaper.execute import AsyncAudit

        engine = make_engine(database_url)
        upgrade(engine)
        store = AuditStore(engine)
        first, second = AsyncAudit(store), AsyncAudit(store)

        async def thread_of(audit: AsyncAudit) -> threading.Thread:
            return await audit.call(threading.current_thread)

        async def both() -> tuple[threading.Thread, threading.Thread]:
            return await thread_of(first), await thread_of(second)

        one, two = asyncio.run(both())
        assert (one is two) == (engine.dialect.name == "sqlite")
        first.close()
        first.close()  # a second close changes nothing
        assert asyncio.run(thread_of(second)) is two
        second.close()
        assert not two.is_alive()
        third = AsyncAudit(store)
        assert asyncio.run(thread_of(third)) is not two
        third.close()
        engine.dispose()

    def test_audit_calls_keep_the_runs_log_context(self, tmp_path: Path) -> None:
        """A line logged inside an audit call (reconciliation's, say) carries the run_id and
        policy of the run that made the call, even on the thread the runs share."""
        import structlog

        from reaper.db import make_engine, upgrade
        from reaper.execute import AsyncAudit

        engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
        upgrade(engine)
        audit = AsyncAudit(AuditStore(engine))

        async def in_run(name: str) -> dict[str, Any]:
            with structlog.contextvars.bound_contextvars(run_id=f"run-{name}", policy=name):
                return await audit.call(structlog.contextvars.get_contextvars)

        async def both() -> list[dict[str, Any]]:
            return list(await asyncio.gather(in_run("a"), in_run("b")))

        assert asyncio.run(both()) == [
            {"run_id": "run-a", "policy": "a"},
            {"run_id": "run-b", "policy": "b"},
        ]
        audit.close()
        engine.dispose()

    def test_workers_cover_the_audit_round_trip(self) -> None:
        """A worker's next intents commit while its request is in flight: when an audit call
        takes longer than the request, the cycle is the audit's (Little's law, 1.5 headroom)."""
        from reaper.execute import auto_concurrency

        assert auto_concurrency(5, 0.02) == 2  # a 100 ms cycle: 5 x 0.1 x 1.5 -> 1, plus one
        assert auto_concurrency(5, 0.02, 0.6) == 6  # 5 x 0.6 x 1.5 = 4.5 -> 5, plus one
        assert auto_concurrency(5, 0.8, 0.6) == 7  # the request is the longer: 6, plus one


class TestPostgresql:
    def test_more_runs_than_the_default_pool_on_postgresql(
        self, data_pipeline: Start, pg_server: Any, tmp_path: Path
    ) -> None:
        """20 policies at once on PostgreSQL (each holds a connection for its run lock and
        uses another for its audit; SQLAlchemy's default pool has 15): all succeed."""
        policies = tmp_path / "policies"
        policies.mkdir()
        now = datetime.now(UTC)
        tasks = []
        for k in range(20):
            tasks += [
                sim_task(f"task_{20260900 + k:08d}_{i:06d}", age=timedelta(days=40), now=now)
                for i in range(3)
            ]
        _, url = data_pipeline(tasks, faults=Faults(latency_ms=30))
        for k in range(20):
            doc = policy_doc(
                url,
                name=f"p{k:02d}",
                select={
                    "status": ["completed"],
                    "older_than": "30d",
                    "match": {"task_id": f"^task_{20260900 + k:08d}_"},
                },
                delete=slow(rate="50/s"),
            )
            (policies / f"p{k:02d}.yaml").write_text(yaml.safe_dump(doc))
        env = {
            "REAPER_DATABASE_URL": pg_server.create_database(),
            "REAPER_POLICIES": str(policies),
        }
        result = reaper("run", "--output", "json", env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        runs = json.loads(result.stdout)
        assert [(r["status"], r["deleted"]) for r in runs] == [("succeeded", 3)] * 20
