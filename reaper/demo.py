"""``make demo``: the whole pipeline against the data_pipeline simulator, on an embedded SQLite.

It starts the simulator on 127.0.0.1 with a few hundred realistic tasks, copies the example
policies with their ``base_url`` pointed at it, and runs the real command line: ``db upgrade``,
``validate``, ``plan``, ``run``, ``audit``. Finally it compares the audit log with the simulator's
own record of deleted directories.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from reaper.audit import audit_table
from reaper.db import make_engine
from reaper.simulators import DataPipelineSimulator, generate_tasks

DEMO_DIR = Path("reaper-demo")
EXAMPLE = Path("policies/data_pipeline.yaml")


def _step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def _reaper(*args: str, env: dict[str, str]) -> int:
    print(f"$ reaper {' '.join(args)}", flush=True)
    return subprocess.call([sys.executable, "-m", "reaper", *args], env=env)


def main() -> int:
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    (DEMO_DIR / "policies").mkdir(parents=True)
    database = DEMO_DIR / "audit.db"
    tasks = generate_tasks(
        n=400,
        seed=7,
        now=datetime.now(UTC),
        timezone="Asia/Shanghai",
        span=timedelta(days=90),
        cleaned_rate=0.05,
    )
    sim = DataPipelineSimulator(tasks, timezone="Asia/Shanghai")
    with sim.serve() as url:
        text = EXAMPLE.read_text(encoding="utf-8").replace("http://127.0.0.1:8084", url)
        (DEMO_DIR / "policies" / EXAMPLE.name).write_text(text, encoding="utf-8")
        env = {
            **os.environ,
            "REAPER_DATABASE_URL": f"sqlite:///{database}",
            "REAPER_POLICIES": str(DEMO_DIR / "policies"),
            "REAPER_LOG_FORMAT": "console",
            "REAPER_LOG_LEVEL": "warning",
        }
        statuses = Counter(task.status for task in tasks)
        _step(f"data_pipeline simulator at {url} with {len(tasks)} tasks: {dict(statuses)}")
        print(f"policies: {EXAMPLE} (copied to {DEMO_DIR}/policies with base_url={url})")
        _step("create the audit database (SQLite)")
        _reaper("db", "upgrade", env=env)
        _step("validate the policies")
        _reaper("validate", env=env)
        _step("plan: what would be deleted and kept, and why")
        _reaper("plan", "--examples", "3", env=env)
        _step("run: delete, in batches, under the rate limit")
        code = _reaper("run", env=env)
        _step("audit: the last rows recorded")
        _reaper("audit", "--limit", "8", env=env)

        engine = make_engine(f"sqlite:///{database}")
        with engine.connect() as connection:
            audited = {
                row.task_id
                for row in connection.execute(
                    select(audit_table.c.task_id).where(audit_table.c.outcome == "deleted")
                )
            }
        engine.dispose()
        deleted = set(sim.deleted_ids)
        _step("check: the audit log against the simulator's own record")
        print(
            f"simulator deleted {len(deleted)} task directories; the audit records "
            f"{len(audited)} deletions; "
            + ("they match exactly." if deleted == audited else "MISMATCH!")
        )
        print(
            f"audit database: {database}  (try: REAPER_DATABASE_URL=sqlite:///{database} "
            "reaper audit --output json)"
        )
        return 0 if deleted == audited and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
