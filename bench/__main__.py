"""Run every benchmark in turn: ``python -m bench`` (``--quick``: scale and audit export at 10k
and 100k only, the fleet at 40 policies over 10 endpoints)."""

from __future__ import annotations

import runpy
import sys

BENCHMARKS = [
    ("bench.rate_limit", []),
    ("bench.batching", []),
    ("bench.audit_throughput", []),
    ("bench.scale", []),
    ("bench.audit_export", []),
    ("bench.recheck", []),
    ("bench.fleet", []),
]
QUICK = {
    "bench.scale": ["10000", "100000"],
    "bench.audit_export": ["10000", "100000"],
    "bench.recheck": ["20000"],
    "bench.fleet": ["--endpoints", "10", "--policies", "40"],
}

if __name__ == "__main__":
    quick = "--quick" in sys.argv[1:]
    for name, args in BENCHMARKS:
        print(f"\n### {name}", flush=True)
        sys.argv = [name, *(QUICK.get(name, args) if quick else args)]
        runpy.run_module(name, run_name="__main__")
