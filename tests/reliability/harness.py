"""Running the real command line as a subprocess, and reading the audit it leaves behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from reaper.audit import audit_table, runs_table
from reaper.db import make_engine


@dataclass
class Result:
    """One finished ``python -m reaper`` process."""

    args: tuple[str, ...]
    code: int
    stdout: str
    stderr: str
    seconds: float

    def output(self) -> str:
        return self.stdout + self.stderr


class Hung(AssertionError):
    """A reaper process outlived the bound derived from its limits and timeouts."""


def reaper(*args: str, env: Mapping[str, str], timeout: float = 120.0, **extra: Any) -> Result:
    """Run ``python -m reaper ARGS`` with only the given REAPER_* settings; kill it at timeout."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("REAPER_")}
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "reaper", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**base, "REAPER_LOG_FORMAT": "json", **env},
        **extra,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise Hung(
            f"reaper {' '.join(args)} did not finish within {timeout:.0f}s\n{err[-4000:]}"
        ) from None
    return Result(tuple(args), process.returncode, out, err, time.monotonic() - started)


@dataclass
class AuditState:
    """Every audit row and run of one database, by outcome."""

    rows: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    by_outcome: dict[str, set[str]] = field(default_factory=dict)

    def ids(self, outcome: str) -> set[str]:
        return self.by_outcome.get(outcome, set())


def audit_state(url: str) -> AuditState:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            rows = [dict(r._mapping) for r in connection.execute(select(audit_table))]
            runs = [dict(r._mapping) for r in connection.execute(select(runs_table))]
    finally:
        engine.dispose()
    state = AuditState(rows, runs)
    for row in rows:
        state.by_outcome.setdefault(row["outcome"], set()).add(row["task_id"])
    return state
