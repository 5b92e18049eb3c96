"""Orchestration overhead: everything zoi does around the engine, per record and per chunk.

An engine that answers instantly (the scripted test engine, zero delay) goes through the
whole worker path: queue, pipeline, shards, markers. The baseline is the same worker on the
same run with nothing to do, measured in the same run. It is subtracted, so start-up (Python
imports, Redis, the engine) does not count. The rest is then compared with the engine time
of a realistic record: 7 requests of about 300 tokens at 5,000 tokens/s is 0.42 s.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from .common import command_line, enqueue, scripted_config, table, workers

REQUESTS_PER_RECORD, TOKENS_PER_REQUEST, ENGINE_TOKENS_PER_S = 7, 300, 5000.0
ENGINE_SECONDS_PER_RECORD = REQUESTS_PER_RECORD * TOKENS_PER_REQUEST / ENGINE_TOKENS_PER_S


def measure(prompts: int, chunk: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        config = scripted_config(base, delay=0.0, batch_size=32)
        run = base / "run"
        enqueue(config, run, prompts, chunk)
        full = workers(run, 1)
        empty = workers(run, 1)  # the same worker, nothing left to do: start-up and exit
    work = max(full - empty, 1e-9)
    per_record = work / prompts
    return {
        "prompts": prompts,
        "chunk": chunk,
        "worker_s": full,
        "startup_s": empty,
        "records_per_s": prompts / work,
        "per_chunk_ms": 1000 * work / (prompts / chunk),
        "per_record_ms": 1000 * per_record,
        "fraction": per_record / ENGINE_SECONDS_PER_RECORD,
    }


def run(smoke: bool = False) -> list[dict[str, float]]:
    sizes = [(200, 100)] if smoke else [(20_000, 100), (20_000, 500)]
    return [measure(prompts, chunk) for prompts, chunk in sizes]


def report(results: list[dict[str, float]]) -> str:
    rows = [
        [
            f"{r['prompts']:.0f}",
            f"{r['chunk']:.0f}",
            f"{r['worker_s']:.1f}",
            f"{r['startup_s']:.1f}",
            f"{r['records_per_s']:.0f}",
            f"{r['per_chunk_ms']:.1f}",
            f"{r['per_record_ms']:.2f}",
            f"{100 * r['fraction']:.2f}%",
        ]
        for r in results
    ]
    return table(
        [
            "prompts",
            "chunk",
            "worker s",
            "of which start-up s",
            "records/s",
            "ms per chunk",
            "ms per record",
            "of a 0.42 s record's engine time",
        ],
        rows,
    )


def main() -> None:
    command_line(sys.modules[__name__])


if __name__ == "__main__":
    main()
