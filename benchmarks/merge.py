"""Merge: 1,000,000 records in 1,000 shards, with full verification, against `cat`.

Both read the same record files and write one output file on the same disk, in the same run.
`zoi merge` also checks every marker, hashes every shard while streaming it, and gives each
record its id. Peak memory is measured at two sizes: it must not grow with the number of
records.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zero_one_instruction.config import load_config
from zero_one_instruction.pipeline import Outcome
from zero_one_instruction.rundir import create_or_open
from zero_one_instruction.shards import write_chunk

from .common import command_line, scripted_config, table

QUESTION = "日本の伝統的な和菓子の歴史と、季節ごとの代表的な種類について説明してください。" * 2
ANSWER = "和菓子は季節の移ろいを表現する菓子として発展してきました。" * 10


def build(base: Path, records: int, per_shard: int) -> Path:
    config = load_config(scripted_config(base))
    run = create_or_open(base / "run", config, 0, records, per_shard)
    system = run.templates.output_system_prompt
    info = {"worker": "bench", "seconds": 0.0}
    for chunk in run.chunks():
        outcomes = [
            Outcome(index=i, base_prompt="", question=f"{QUESTION}{i}", answer=f"{ANSWER}{i}")
            for i in range(chunk.start, chunk.end)
        ]
        write_chunk(run, chunk, outcomes, system, info)
    return run.path


_MERGE = """
import resource, sys, time
from pathlib import Path
from zero_one_instruction.merger import merge
from zero_one_instruction.rundir import open_run
began = time.perf_counter()
report = merge(open_run(Path(sys.argv[1])), Path(sys.argv[2]))
print(time.perf_counter() - began, report.records, report.bytes,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def measure(records: int, per_shard: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        base = Path(tmp)
        run = build(base, records, per_shard)
        files = sorted(str(p) for p in (run / "shards").glob("*[0-9].jsonl"))
        began = time.perf_counter()
        with (base / "cat.jsonl").open("wb") as out:
            subprocess.run(["cat", *files], stdout=out, check=True)
        cat_s = time.perf_counter() - began
        (base / "cat.jsonl").unlink()
        done = subprocess.run(
            [sys.executable, "-c", _MERGE, str(run), str(base / "out.jsonl")],
            capture_output=True,
            text=True,
            check=True,
        )
        seconds, count, size, rss_kb = done.stdout.split()
    return {
        "records": records,
        "shards": records // per_shard,
        "merge_s": float(seconds),
        "cat_s": cat_s,
        "mb": int(size) / 1e6,
        "rss_mb": int(rss_kb) / 1024,
        "count": int(count),
    }


def run(smoke: bool = False) -> list[dict[str, float]]:
    if smoke:
        return [measure(2_000, 200)]
    return [measure(100_000, 1_000), measure(1_000_000, 1_000)]


def report(results: list[dict[str, float]]) -> str:
    rows = [
        [
            f"{r['records']:,.0f}",
            f"{r['shards']:,.0f}",
            f"{r['mb']:,.0f}",
            f"{r['merge_s']:.2f}",
            f"{r['records'] / r['merge_s']:,.0f}",
            f"{r['mb'] / r['merge_s']:,.0f}",
            f"{r['cat_s']:.2f}",
            f"{r['cat_s'] / r['merge_s']:.2f}",
            f"{r['rss_mb']:.0f}",
        ]
        for r in results
    ]
    return table(
        [
            "records",
            "shards",
            "MB out",
            "merge s",
            "records/s",
            "MB/s",
            "cat s",
            "merge / cat throughput",
            "merge peak RSS MB",
        ],
        rows,
    )


def main() -> None:
    command_line(sys.modules[__name__])


if __name__ == "__main__":
    main()
