"""A fleet (issue #17, item 6): 200 policies over 50 rate-limited endpoints in one `reaper run`.

Each endpoint is a data_pipeline simulator with a server-side token bucket of ``RATE`` requests per
second (burst 2) and ``LATENCY_MS`` per request. 5/s over 50 endpoints is 250 requests/s in all:
at ~3 ms of reaper's CPU per request (httpx, JSON, planning, the audit) plus the simulators', that
is what two cores sustain; ``--rate 10`` (500/s) shows that ceiling.

Four policies reach each endpoint, each deleting its own share of the endpoint's tasks
(``select.match`` on the id) at the endpoint's rate. The policies share the endpoint's budget, so
the endpoint's limit, not the number of policies, sets the pace: the run cannot finish before the
busiest endpoint has served its requests at its limit.

Printed: the wall time of the `reaper run` process (interpreter start to exit) over the *ideal*,
the busiest endpoint's requests (as its simulator counted them: listings, re-checks and deletes)
divided by its limit; the server's 429 answers; reaper's peak RSS and CPU per deleted task (its
own process, ``wait4``); and whether every eligible task was deleted (reaper's count and the
simulators' agree). Goals: wall / ideal <= 1.15, 0 429s, peak RSS <= 300 MB. The audit database
is set up before the run is timed (`reaper db upgrade`): a fleet's exists already.

The simulators run in ``SIM_PROCESSES`` processes of their own (10 endpoints each), so their CPU
is not reaper's. The audit is SQLite, as by default.

``python -m bench.fleet [--endpoints 50] [--policies 200] [--rate 5] [--latency-ms 20]``;
``python -m bench.fleet serve ...`` is the simulator process it starts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from bench.common import NO_GUARDS, machine
from bench.simproc import sim_stats
from reaper.simulators import DataPipelineSimulator, Faults
from reaper.simulators.data_pipeline import SimTask

ENDPOINTS = 50
POLICIES = 200
RATE = 5.0
LATENCY_MS = 20.0
BATCH = 10
#: Eligible tasks per policy, drawn uniformly (seeded): endpoints differ in load.
SHARE = (100, 700)
#: Tasks per endpoint that no policy selects (recent ones), listed by every policy.
KEPT = 50
SIM_PROCESSES = 5
RATIO_TARGET, RSS_TARGET_MB = 1.15, 300


def endpoint_tasks(endpoint: int, policies: int, seed: int) -> list[SimTask]:
    """The tasks of one endpoint: policy k's are ``task_2026090k_*`` (k from 1)."""
    rng = random.Random(seed * 1000 + endpoint)
    now = datetime.now(UTC)
    tasks = []
    for k in range(1, policies + 1):
        for i in range(rng.randint(*SHARE)):
            created = now - timedelta(days=40, seconds=i)
            tasks.append(_task(f"task_2026090{k}_{i:06d}", created))
    recent = now - timedelta(days=1)
    tasks.extend(
        _task(f"task_20261201_{i:06d}", recent - timedelta(seconds=i)) for i in range(KEPT)
    )
    return tasks


def _task(task_id: str, created: datetime) -> SimTask:
    return SimTask(
        task_id=task_id,
        task_name=f"bench {task_id}",
        status="completed",
        step_status=None,
        created_at=created,
        started_at=created + timedelta(seconds=5),
        completed_at=created + timedelta(minutes=10),
        updated_at=created + timedelta(minutes=10),
        files_count=1,
        size_bytes=1024,
    )


def serve(argv: list[str]) -> None:
    """The simulator process: serve endpoints ``first`` .. ``first + count - 1``."""
    parser = argparse.ArgumentParser(prog="python -m bench.fleet serve")
    for name in ("--first", "--count", "--policies", "--seed"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--latency-ms", type=float, required=True)
    parser.add_argument("--arrivals", type=Path, required=True)
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    faults = Faults(rate_limit=args.rate, rate_limit_burst=2, latency_ms=args.latency_ms)
    sims, arrivals = [], []
    for endpoint in range(args.first, args.first + args.count):
        tasks = endpoint_tasks(endpoint, args.policies, args.seed)
        sim = DataPipelineSimulator(tasks, timezone="UTC", faults=faults, seed=endpoint)
        arrivals.append(_record_arrivals(sim))
        sims.append(sim)
    urls = [sim.start() for sim in sims]
    sys.stdout.write(json.dumps(urls) + "\n")
    sys.stdout.flush()
    while not stop.wait(0.5):
        pass
    for sim in sims:
        sim.stop()
    args.arrivals.write_text(json.dumps(dict(zip(urls, arrivals, strict=True))))


def _record_arrivals(sim: DataPipelineSimulator) -> list[float]:
    """Keep the monotonic time (one clock for every process) of each API request to ``sim``."""
    times: list[float] = []
    handle = sim.handle

    def recording(request: Any) -> Any:
        if not request.path.startswith("/_sim/"):
            times.append(time.monotonic())
        return handle(request)

    sim.handle = recording  # type: ignore[method-assign]
    return times


def policy(name: str, url: str, k: int, rate: float) -> dict[str, Any]:
    return {
        "name": name,
        "target": {"type": "data_pipeline", "base_url": url, "timestamps_timezone": "UTC"},
        "select": {
            "status": ["completed"],
            "older_than": "30d",
            "match": {"task_id": f"^task_2026090{k}_"},
        },
        "delete": {"batch_size": BATCH, "rate": f"{rate:g}/s", **NO_GUARDS},
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet")
    parser.add_argument("--endpoints", type=int, default=ENDPOINTS)
    parser.add_argument("--policies", type=int, default=POLICIES)
    parser.add_argument("--rate", type=float, default=RATE)
    parser.add_argument("--latency-ms", type=float, default=LATENCY_MS)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--keep", type=Path, help="Keep the policies and audit database here.")
    parser.add_argument(
        "--parallel", type=int, help="REAPER_MAX_PARALLEL_POLICIES (default: reaper's own)"
    )
    args = parser.parse_args(argv)
    per_endpoint = args.policies // args.endpoints
    if per_endpoint * args.endpoints != args.policies or not 1 <= per_endpoint <= 9:
        raise SystemExit("--policies must be 1 to 9 times --endpoints")
    print(machine())
    print(f"load average before: {_load()}")
    print(
        f"{args.policies} policies over {args.endpoints} data_pipeline endpoints "
        f"({per_endpoint} each); each endpoint limited to {args.rate:g} requests/s (burst 2), "
        f"{args.latency_ms:g} ms per request; policies at {args.rate:g}/s, batch {BATCH}; "
        "SQLite audit; REAPER_MAX_PARALLEL_POLICIES="
        + (str(args.parallel) if args.parallel else "unset (64)"),
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        processes, urls, logs = [], [], []
        chunk = -(-args.endpoints // SIM_PROCESSES)
        try:
            for first in range(0, args.endpoints, chunk):
                count = min(chunk, args.endpoints - first)
                logs.append(work / f"arrivals-{first}.json")
                process = subprocess.Popen(
                    [sys.executable, "-m", "bench.fleet", "serve", "--first", str(first),
                     "--count", str(count), "--policies", str(per_endpoint), "--seed",
                     str(args.seed), "--rate", f"{args.rate:g}", "--latency-ms",
                     f"{args.latency_ms:g}", "--arrivals", str(logs[-1])],
                    stdout=subprocess.PIPE,
                    text=True,
                )  # fmt: skip
                processes.append(process)
            for process in processes:
                assert process.stdout is not None
                urls.extend(json.loads(process.stdout.readline()))
            report = measure(urls, per_endpoint, args.rate, work, args.parallel)
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            sim_cpu = 0.0
            for process in processes:
                _, status, usage = os.wait4(process.pid, 0)
                process.returncode = os.waitstatus_to_exitcode(status)
                sim_cpu += usage.ru_utime + usage.ru_stime
        arrivals: dict[str, list[float]] = {}
        for log in logs:
            arrivals.update(json.loads(log.read_text()))
    print_report(report, args.rate)
    print_busiest(report, arrivals, args.rate)
    print(
        f"CPU: reaper {report['cpu']:.1f} s ({report['cpu'] / report['requests'] * 1e3:.2f} ms "
        f"per request), the simulators {sim_cpu:.1f} s, over {report['wall']:.1f} s on "
        f"{os.cpu_count()} cores"
    )
    print(f"load average after: {_load()}")


def measure(
    urls: list[str], per_endpoint: int, rate: float, tmp: Path, parallel: int | None
) -> dict[str, Any]:
    (tmp / "policies").mkdir()
    for index, url in enumerate(urls):
        documents = [policy(f"e{index:02d}-p{k}", url, k, rate) for k in range(1, per_endpoint + 1)]
        (tmp / "policies" / f"e{index:02d}.yaml").write_text(yaml.safe_dump_all(documents))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REAPER_")}
    env.update(
        REAPER_DATABASE_URL=f"sqlite:///{tmp / 'audit.db'}",
        REAPER_POLICIES=str(tmp / "policies"),
        REAPER_LOG_FORMAT="json",
        REAPER_LOG_LEVEL="warning",
    )
    if parallel is not None:
        env["REAPER_MAX_PARALLEL_POLICIES"] = str(parallel)
    # A fleet's database exists already: its setup is not part of a scheduled run.
    subprocess.run(
        [sys.executable, "-m", "reaper", "db", "upgrade"], env=env, check=True, capture_output=True
    )
    started = time.perf_counter()
    started_monotonic = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "reaper", "run", "--output", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    output: dict[str, str] = {}
    readers = [
        threading.Thread(target=lambda n=name, s=stream: output.__setitem__(n, s.read()))
        for name, stream in (("stdout", process.stdout), ("stderr", process.stderr))
    ]
    for reader in readers:
        reader.start()
    # wait4, not wait: the child's own CPU time and peak RSS.
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    ended_monotonic = time.monotonic()
    process.returncode = os.waitstatus_to_exitcode(status)
    for reader in readers:
        reader.join()
    stdout, stderr = output["stdout"], output["stderr"]
    runs = json.loads(stdout) if stdout.strip() else []
    stats = [sim_stats(url) for url in urls]
    api = [s["requests"] for s in stats]  # API requests only: /_sim/ ones are counted apart
    busiest = max(range(len(urls)), key=lambda index: api[index])
    starts = [datetime.fromisoformat(r["started_at"]) for r in runs]
    ends = [datetime.fromisoformat(r["finished_at"]) for r in runs]
    return {
        "exit": process.returncode,
        "stderr": stderr,
        "runs": runs,
        "wall": wall,
        "span": (max(ends) - min(starts)).total_seconds() if runs else 0.0,
        "busiest": urls[busiest],
        "busiest_requests": api[busiest],
        "requests": sum(api),
        "started": started_monotonic,
        "ended": ended_monotonic,
        "status_429": sum(s["status_429"] for s in stats),
        "deleted_sim": sum(s["deleted"] for s in stats),
        "eligible": sum(r["eligible"] for r in runs),
        "deleted": sum(r["deleted"] for r in runs),
        "statuses": sorted({r["status"] for r in runs}),
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss_mb": usage.ru_maxrss / 1024,
    }


def print_busiest(r: dict[str, Any], arrivals: dict[str, list[float]], rate: float) -> None:
    """Where the busiest endpoint's time went: waiting for its first request, idle between
    requests (beyond its limit's spacing), and after its last one until reaper exited."""
    times = sorted(arrivals[r["busiest"]])
    if not times:
        return
    spacing = 1 / rate
    idle = sum(max(0.0, b - a - spacing) for a, b in itertools.pairwise(times))
    print(
        f"busiest endpoint: {len(times)} requests; first {times[0] - r['started']:.1f} s after "
        f"reaper started, last {r['ended'] - times[-1]:.1f} s before it exited; idle beyond "
        f"its limit's spacing between them: {idle:.1f} s"
    )


def _load() -> str:
    """The 1, 5 and 15 minute load averages: the machine is shared."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def print_report(r: dict[str, Any], rate: float) -> None:
    ideal = r["busiest_requests"] / rate
    ratio = r["wall"] / ideal
    per_task = r["cpu"] / max(r["deleted"], 1) * 1e6
    met = (
        r["exit"] == 0
        and ratio <= RATIO_TARGET
        and r["status_429"] == 0
        and r["rss_mb"] <= RSS_TARGET_MB
        and r["deleted"] == r["eligible"] == r["deleted_sim"]
    )
    print(
        f"{'runs':>5} {'status':>10} {'eligible':>8} {'deleted':>8} {'sim deleted':>11} "
        f"{'requests':>8} {'busiest':>7} {'ideal s':>7} {'wall s':>6} {'wall/ideal':>10} "
        f"{'runs span s':>11} {'429s':>4} {'peak MB':>7} {'cpu s':>6} {'us/deleted':>10} "
        f"{'met':>3}"
    )
    print(
        f"{len(r['runs']):>5} {','.join(r['statuses']):>10} {r['eligible']:>8} "
        f"{r['deleted']:>8} {r['deleted_sim']:>11} {r['requests']:>8} "
        f"{r['busiest_requests']:>7} {ideal:>7.1f} {r['wall']:>6.1f} {ratio:>10.3f} "
        f"{r['span']:>11.1f} {r['status_429']:>4} {r['rss_mb']:>7.0f} {r['cpu']:>6.1f} "
        f"{per_task:>10.1f} {'yes' if met else 'NO':>3}",
        flush=True,
    )
    if r["exit"] != 0:
        print(f"reaper run exited {r['exit']}:\n{r['stderr'][-4000:]}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2:])
    else:
        main(sys.argv[1:])
