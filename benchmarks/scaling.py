"""Scaling: records/s with 1, 2 and 4 workers on an engine with a fixed latency per request.

Each worker's engine (the scripted test engine) answers every request after a fixed delay,
so one worker's throughput is bounded by its concurrency and that latency, not by the CPU.
More workers should then give proportionally more records/s. If they did not, the queue or
the shared run directory would be the bottleneck. The baseline is one worker, measured in
the same run.
"""

from __future__ import annotations

import json
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from .common import command_line, enqueue, scripted_config, table, workers


def _span(run: Path) -> float:
    """From the first chunk's start to the last one's end: start-up is not counted."""
    markers = [json.loads(p.read_text()) for p in (run / "shards").glob("*.done")]
    first = min(datetime.fromisoformat(m["started_at"]) for m in markers)
    last = max(datetime.fromisoformat(m["finished_at"]) for m in markers)
    return (last - first).total_seconds()


def measure(count: int, prompts: int, delay: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        config = scripted_config(base, delay=delay, batch_size=8)
        run = base / "run"
        enqueue(config, run, prompts, 20)
        workers(run, count)
        return prompts / _span(run)


def run(smoke: bool = False) -> list[tuple[int, float]]:
    prompts, delay = (80, 0.01) if smoke else (1600, 0.05)
    return [(count, measure(count, prompts, delay)) for count in (1, 2, 4)]


def report(results: list[tuple[int, float]]) -> str:
    base = results[0][1]
    rows = [[str(n), f"{rate:.1f}", f"{rate / base:.2f}×"] for n, rate in results]
    return table(["workers", "records/s", "vs 1 worker"], rows)


def main() -> None:
    command_line(sys.modules[__name__])


if __name__ == "__main__":
    main()
