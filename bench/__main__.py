"""Run every benchmark in turn: ``python -m bench``."""

from __future__ import annotations

import runpy
import sys

BENCHMARKS = ["bench.rate_limit", "bench.huawei_rate"]

if __name__ == "__main__":
    for name in BENCHMARKS:
        print(f"\n### {name}", flush=True)
        sys.argv = [name]
        runpy.run_module(name, run_name="__main__")
