"""Run a simulator standalone: ``python -m reaper.simulators data_pipeline --port 0 --tasks 1000``.

The aparavi simulator accepts the API key read from the variable named by ``--key-env`` (bare or
as a bearer token) and prints the tokens and types of its generated tasks, for ``reaper track``.
The Huawei simulators (``huawei_dcs``, ``huawei_iotda``) accept the AK given by ``--ak`` with the
SK read from the environment variable named by ``--sk-env`` (and a token from ``--token-env``), so
that no secret appears on a command line.

Once listening it writes one JSON line to stdout (``{"url": ..., "tasks": ...}``) so that a parent
process can read the URL, then serves until SIGTERM or SIGINT and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import timedelta
from types import FrameType
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from reaper.simulators.aparavi import AparaviSimulator, generate_aparavi_tasks
from reaper.simulators.base import Faults, SimulatorBase
from reaper.simulators.data_pipeline import DataPipelineSimulator, generate_tasks
from reaper.simulators.huawei_dcs import HuaweiDcsSimulator, generate_dcs_tasks
from reaper.simulators.huawei_iotda import HuaweiIotdaSimulator, generate_iotda_tasks

TARGETS = ("data_pipeline", "huawei_dcs", "huawei_iotda", "aparavi")


def _timezone(text: str) -> str:
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown timezone {text!r}") from None
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reaper.simulators", description="Serve a simulated target API."
    )
    parser.add_argument("target", choices=TARGETS, help="which API to simulate")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--tasks", type=int, default=1000, help="how many tasks to generate")
    parser.add_argument("--seed", type=int, default=0, help="seed for tasks and faults")
    parser.add_argument(
        "--span-days", type=float, default=None, help="spread tasks over this many days"
    )
    parser.add_argument("--timezone", type=_timezone, default="Asia/Shanghai")
    huawei = parser.add_argument_group("huawei_dcs and huawei_iotda")
    huawei.add_argument("--project-id", default="0123456789abcdef0123456789abcdef")
    huawei.add_argument("--ak", default="SIMULATORACCESSKEY00", help="the accepted access key")
    huawei.add_argument(
        "--sk-env", default="HUAWEI_SIM_SK", help="variable holding the SK (default: a dev SK)"
    )
    huawei.add_argument("--token-env", default=None, help="variable holding an accepted token")
    huawei.add_argument("--instance-id", default=None, help="IoTDA: required Instance-Id")
    huawei.add_argument(
        "--task-types",
        default="firmwareUpgrade,createCommands",
        help="IoTDA: comma-separated task types of the generated tasks",
    )
    aparavi = parser.add_argument_group("aparavi")
    aparavi.add_argument(
        "--key-env", default="APARAVI_SIM_KEY", help="variable holding the accepted API key"
    )
    aparavi.add_argument(
        "--refuse-completed",
        action="store_true",
        help="answer 'Cannot delete completed task' like self-cleaning deployments",
    )
    faults = parser.add_argument_group("faults (all off by default)")
    faults.add_argument("--latency-ms", type=float, default=0.0)
    faults.add_argument("--latency-jitter-ms", type=float, default=0.0)
    faults.add_argument("--spike-rate", type=float, default=0.0)
    faults.add_argument("--spike-ms", type=float, default=0.0)
    faults.add_argument("--rate-limit", type=float, default=0.0, help="requests per second")
    faults.add_argument("--rate-limit-burst", type=int, default=0)
    faults.add_argument("--error-rate", type=float, default=0.0)
    faults.add_argument("--partial-failure-rate", type=float, default=0.0)
    faults.add_argument("--drop-before-rate", type=float, default=0.0)
    faults.add_argument("--drop-after-rate", type=float, default=0.0)
    faults.add_argument("--malformed-rate", type=float, default=0.0)
    faults.add_argument(
        "--act-then-504-rate", type=float, default=0.0, help="deletes carried out, answered 504"
    )
    faults.add_argument(
        "--ack-without-effect-rate",
        type=float,
        default=0.0,
        help="deletions acknowledged without being carried out",
    )
    faults.add_argument(
        "--reexecute-rate",
        type=float,
        default=0.0,
        help="data_pipeline: finished tasks re-executed right after a listing shows them",
    )
    faults.add_argument(
        "--db-update-failure-rate",
        type=float,
        default=0.0,
        help="data_pipeline: row updates that fail after the directory was removed",
    )
    faults.add_argument(
        "--delete-ms-per-id",
        type=float,
        default=0.0,
        help="data_pipeline: synchronous work per id of a delete request",
    )
    faults.add_argument("--down", action="store_true", help="close every API connection")
    parser.add_argument(
        "--old-live-share",
        type=float,
        default=None,
        help="data_pipeline: share of tasks older than 2h still pending/in progress (0.2)",
    )
    return parser


def _build(args: argparse.Namespace, faults: Faults) -> tuple[SimulatorBase, int]:
    if args.target in ("huawei_dcs", "huawei_iotda"):
        return _build_huawei(args, faults)
    if args.target == "aparavi":
        aparavi_tasks = generate_aparavi_tasks(args.tasks, seed=args.seed)
        aparavi = AparaviSimulator(
            aparavi_tasks,
            api_keys=[os.environ.get(args.key_env) or "sim-aparavi-key"],
            refuse_completed=args.refuse_completed,
            faults=faults,
            seed=args.seed,
        )
        return aparavi, len(aparavi_tasks)
    span = timedelta(days=args.span_days) if args.span_days is not None else None
    tasks = generate_tasks(
        args.tasks,
        seed=args.seed,
        timezone=args.timezone,
        span=span,
        old_live_share=args.old_live_share,
    )
    simulator = DataPipelineSimulator(tasks, timezone=args.timezone, faults=faults, seed=args.seed)
    return simulator, len(tasks)


def _build_huawei(args: argparse.Namespace, faults: Faults) -> tuple[SimulatorBase, int]:
    credentials = {args.ak: os.environ.get(args.sk_env) or "simulator-secret-key"}
    token = os.environ.get(args.token_env) if args.token_env else None
    tokens = [token] if token else []
    simulator: SimulatorBase
    if args.target == "huawei_dcs":
        dcs_tasks = generate_dcs_tasks(args.tasks, seed=args.seed)
        simulator = HuaweiDcsSimulator(
            dcs_tasks,
            project_id=args.project_id,
            credentials=credentials,
            tokens=tokens,
            faults=faults,
            seed=args.seed,
        )
        return simulator, len(dcs_tasks)
    types = [t for t in args.task_types.split(",") if t]
    iotda_tasks = generate_iotda_tasks(args.tasks, seed=args.seed, task_types=types)
    simulator = HuaweiIotdaSimulator(
        iotda_tasks,
        project_id=args.project_id,
        instance_id=args.instance_id,
        credentials=credentials,
        tokens=tokens,
        faults=faults,
        seed=args.seed,
    )
    return simulator, len(iotda_tasks)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, serve until SIGTERM/SIGINT, return the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    # Handlers first: a parent may send SIGTERM while a million tasks are still being generated.
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        faults = Faults(
            latency_ms=args.latency_ms,
            latency_jitter_ms=args.latency_jitter_ms,
            spike_rate=args.spike_rate,
            spike_ms=args.spike_ms,
            error_rate=args.error_rate,
            rate_limit=args.rate_limit,
            rate_limit_burst=args.rate_limit_burst,
            drop_before_rate=args.drop_before_rate,
            drop_after_rate=args.drop_after_rate,
            malformed_rate=args.malformed_rate,
            partial_failure_rate=args.partial_failure_rate,
            act_then_504_rate=args.act_then_504_rate,
            ack_without_effect_rate=args.ack_without_effect_rate,
            reexecute_rate=args.reexecute_rate,
            db_update_failure_rate=args.db_update_failure_rate,
            delete_ms_per_id=args.delete_ms_per_id,
            down=args.down,
        )
    except ValueError as exc:
        parser.error(str(exc))
    simulator, count = _build(args, faults)

    url = simulator.start(args.host, args.port)
    try:
        info: dict[str, object] = {"url": url, "tasks": count, "target": args.target}
        if isinstance(simulator, AparaviSimulator):
            # No list endpoint: whoever registers the tasks needs their tokens.
            info["tokens"] = [{"token": t.token, "type": t.type} for t in simulator.tasks]
        sys.stdout.write(json.dumps(info) + "\n")
        sys.stdout.flush()
        # Event.wait with a timeout lets the main thread run the signal handler promptly.
        while not stop.wait(0.5):
            pass
    finally:
        simulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
