"""Every benchmark, one after another, each printing its table.

.venv/bin/python -m benchmarks.run_all            # the numbers in docs/benchmarks.md
.venv/bin/python -m benchmarks.run_all --smoke    # tiny sizes: checks that each still runs
.venv/bin/python -m benchmarks.run_all --only merge,enqueue
.venv/bin/python -m benchmarks.run_all --only quality   # opt-in: needs the real 1.5B model
.venv/bin/python -m benchmarks.run_all --only report_dedup   # opt-in: a million records, ~24 min
.venv/bin/python -m benchmarks.run_all --only report_memory  # opt-in: the report alone, ~9 min
.venv/bin/python -m benchmarks.run_all --only served   # opt-in: engine openai, vllm serve, ~10 min
"""

from __future__ import annotations

import argparse
import importlib
import time
from datetime import datetime, timezone

from .common import machine

BENCHMARKS = [
    "occupancy",
    "overhead",
    "real_engine",
    "merge",
    "enqueue",
    "scaling",
    "aimd_sim",
]
# Run only when named in --only: quality needs a real model, 12 GiB and several minutes per
# run; report_dedup reads and writes a million records twice, about 24 minutes here, and
# report_memory (its report half) about 9; served starts `vllm serve` twice and runs zoi and
# a plain client through it, about 10.
OPT_IN = ["quality", "report_dedup", "report_memory", "served"]


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the zoi benchmarks.")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check they run")
    parser.add_argument(
        "--only", help="comma-separated subset of " + ", ".join(BENCHMARKS + OPT_IN)
    )
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else BENCHMARKS
    print(f"{machine()}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    for name in chosen:
        module = importlib.import_module(f"benchmarks.{name}")
        began = time.perf_counter()
        results = module.run(args.smoke)
        print(f"\n## {name} ({time.perf_counter() - began:.0f} s)\n")
        print(module.report(results))


if __name__ == "__main__":
    main()
