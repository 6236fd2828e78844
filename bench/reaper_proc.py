"""reaper alone in a process, reporting its own CPU time and peak RSS (used by bench.scale).

``python -m bench.reaper_proc plan POLICY_FILE`` does what ``reaper plan --output json`` does
(list, plan, render the JSON report); ``python -m bench.reaper_proc run POLICY_FILE DB_URL`` what
``reaper run`` does (list, plan, delete, audit). Either prints one JSON line of figures: CPU
(user+sys, all threads) after the imports, when the plan is ready, and at the end; wall times;
peak RSS; and for ``run`` the seconds the audit thread spent in AuditStore calls.
"""

from __future__ import annotations

import resource
import time

_WALL0 = time.perf_counter()

import asyncio  # noqa: E402 - the clock above starts before the imports on purpose
import json  # noqa: E402
import sys  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from bench.common import AuditTimer, load, quiet_logs  # noqa: E402
from reaper.audit import AuditStore  # noqa: E402
from reaper.db import make_engine, upgrade  # noqa: E402
from reaper.plan import Plan  # noqa: E402
from reaper.report import plan_dict  # noqa: E402
from reaper.runner import build_target, plan_policy, run_policy  # noqa: E402


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _mark(figures: dict[str, Any], name: str) -> None:
    figures[f"{name}_cpu"] = _cpu()
    figures[f"{name}_wall"] = time.perf_counter() - _WALL0
    figures[f"{name}_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def _plan(policy_file: Path, figures: dict[str, Any]) -> None:
    loaded = load(policy_file.read_text())
    target, client = build_target(loaded)
    try:
        plan = await plan_policy(loaded, target, datetime.now(UTC))
    finally:
        await client.aclose()
    _mark(figures, "plan")
    figures["listed"] = plan.listed
    figures["eligible"] = plan.eligible
    figures["report_bytes"] = len(json.dumps([plan_dict(plan, 5)], indent=2, ensure_ascii=False))


def _run(policy_file: Path, database_url: str, figures: dict[str, Any]) -> None:
    loaded = load(policy_file.read_text())
    engine = make_engine(database_url)
    upgrade(engine)
    timer = AuditTimer()

    def on_plan(plan: Plan) -> None:
        _mark(figures, "plan")
        figures["plan_audit_busy"] = timer.busy

    with timer:
        result = asyncio.run(run_policy(loaded, AuditStore(engine), on_plan=on_plan))
    engine.dispose()
    figures["audit_busy"] = timer.busy
    figures["audit_calls"] = timer.calls
    figures["listed"] = result.summary.listed
    figures["eligible"] = result.summary.eligible
    figures["deleted"] = result.summary.deleted
    figures["error"] = result.error


def main(argv: list[str]) -> None:
    quiet_logs()
    figures: dict[str, Any] = {}
    _mark(figures, "imported")
    if argv[0] == "plan":
        asyncio.run(_plan(Path(argv[1]), figures))
    elif argv[0] == "run":
        _run(Path(argv[1]), argv[2], figures)
    else:
        raise SystemExit(f"unknown mode {argv[0]!r}: plan or run")
    _mark(figures, "end")
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
