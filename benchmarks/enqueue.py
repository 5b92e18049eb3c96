"""Enqueue: 1,000,000 base prompts in chunks of 100 (10,000 jobs) into the embedded server.

Measured from the command line, as a user runs `zoi enqueue`: the Python start-up, the
embedded Valkey start, run.json, the marker scan, the job-state reads and the pipelined job
writes are all included. The baseline, in the same run against the same server, is the floor
for any RQ-based producer: the same 10,000 jobs created by RQ's own `enqueue_many` in one
pipeline, with nothing else around them.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from rq import Queue
from rq.serializers import JSONSerializer

from zero_one_instruction.embeddedredis import embedded, release

from .common import command_line, enqueue, scripted_config, table


def measure(prompts: int, chunk: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        config = scripted_config(base)
        run = base / "run"
        first = enqueue(config, run, prompts, chunk)
        again = enqueue(config, run, prompts, chunk)
        client = embedded(run, "bench")
        try:
            queue = Queue("bench-baseline", connection=client, serializer=JSONSerializer)
            jobs = [
                Queue.prepare_data(
                    "zero_one_instruction.worker.run_chunk",
                    args=["k", s, s + chunk],
                    job_id=f"b-{s}",
                    timeout=86400,
                )
                for s in range(0, prompts, chunk)
            ]
            began = time.perf_counter()
            for offset in range(0, len(jobs), 1000):
                queue.enqueue_many(jobs[offset : offset + 1000])
            baseline = time.perf_counter() - began
        finally:
            release(client, run)
    return {
        "prompts": prompts,
        "jobs": prompts // chunk,
        "first": first,
        "again": again,
        "baseline": baseline,
    }


def run(smoke: bool = False) -> list[dict[str, float]]:
    return [measure(2_000 if smoke else 1_000_000, 100)]


def report(results: list[dict[str, float]]) -> str:
    rows = [
        [
            f"{r['prompts']:,.0f}",
            f"{r['jobs']:,.0f}",
            f"{r['first']:.2f}",
            f"{r['again']:.2f}",
            f"{r['baseline']:.2f}",
            f"{r['first'] / r['baseline']:.2f}×",
        ]
        for r in results
    ]
    return table(
        [
            "prompts",
            "jobs",
            "zoi enqueue s (whole command)",
            "again, nothing to do s",
            "RQ enqueue_many alone s",
            "zoi / RQ alone",
        ],
        rows,
    )


def main() -> None:
    command_line(sys.modules[__name__])


if __name__ == "__main__":
    main()
