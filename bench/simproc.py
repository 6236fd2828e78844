"""Start a simulator in its own process, so its CPU time is not reaper's."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx


@contextmanager
def simulator(kind: str, *args: str) -> Iterator[str]:
    """Run ``python -m reaper.simulators KIND ARGS`` and yield its base URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "reaper.simulators", kind, "--port", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {kind} simulator did not start")
        yield json.loads(line)["url"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def sim_stats(url: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{url}/_sim/stats", timeout=30).json()
    return stats


def sim_deletions(url: str) -> dict[str, Any]:
    deletions: dict[str, Any] = httpx.get(f"{url}/_sim/deletions", timeout=60).json()
    return deletions
