"""`zoi report` and `zoi merge --dedup near` on synthetic Japanese records, against a read.

The baseline is a plain streaming read of the same merged file (`json.loads` of every line),
measured in the same run; the near-dedup merge is also set beside a plain merge of the same
run. Each command runs in a child process, which reports its peak RSS. The report's peak must
not grow with the records; the near-dedup merge keeps an index of every kept question, so
its growth per record between the two sizes is its memory per record.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from zero_one_instruction.config import load_config
from zero_one_instruction.pipeline import Outcome
from zero_one_instruction.rundir import create_or_open
from zero_one_instruction.shards import write_chunk

from .common import command_line, scripted_config, table
from .synthetic import questions_and_answers, write_file

_CHILD = """
import json, resource, sys, time
from pathlib import Path
what, source, out = sys.argv[1:4]
began = time.perf_counter()
if what == "read":
    with open(source, "rb") as handle:
        for line in handle:
            json.loads(line)
elif what == "report":
    from zero_one_instruction.report import make_report
    make_report(Path(source), json_path=Path(out))
else:
    from zero_one_instruction.merger import MergeOptions, merge
    from zero_one_instruction.rundir import open_run
    dedup = "near" if what == "near" else None
    merge(open_run(Path(source)), Path(out), MergeOptions(dedup=dedup))
print(time.perf_counter() - began, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _child(what: str, source: Path, out: Path) -> tuple[float, float]:
    """Seconds and peak RSS in MB of one command in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, what, str(source), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-2000:]}")
    seconds, rss_kb = done.stdout.split()
    return float(seconds), int(rss_kb) / 1024


def _build_run(base: Path, records: int, per_shard: int) -> Path:
    config = load_config(scripted_config(base))
    run = create_or_open(base / "run", config, 0, records, per_shard)
    system = run.templates.output_system_prompt
    info = {"worker": "bench", "seconds": 0.0}
    pairs = questions_and_answers(records)
    for chunk in run.chunks():
        outcomes = [
            Outcome(index=i, base_prompt="", question=q, answer=a)
            for i, (q, a) in zip(range(chunk.start, chunk.end), pairs, strict=False)
        ]
        write_chunk(run, chunk, outcomes, system, info)
    return run.path


def measure(records: int, per_shard: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        base = Path(tmp)
        data = base / "data.jsonl"
        write_file(data, records)
        result: dict[str, float] = {"records": records}
        for what in ("read", "report"):
            result[f"{what}_s"], result[f"{what}_mb"] = _child(what, data, base / "r.json")
        data.unlink()
        run = _build_run(base, records, per_shard)
        for what in ("plain", "near"):
            result[f"{what}_s"], result[f"{what}_mb"] = _child(what, run, base / f"{what}.jsonl")
    return result


def run(smoke: bool = False) -> list[dict[str, float]]:
    if smoke:
        return [measure(2_000, 200)]
    return [measure(100_000, 1_000), measure(1_000_000, 1_000)]


def report(results: list[dict[str, float]]) -> str:
    rows = []
    for r in results:
        n = r["records"]
        rows.append(
            [
                f"{n:,.0f}",
                f"{n / r['read_s']:,.0f}",
                f"{r['read_mb']:.0f}",
                f"{n / r['report_s']:,.0f}",
                f"{r['read_s'] / r['report_s']:.3f}",
                f"{r['report_mb']:.0f}",
                f"{n / r['plain_s']:,.0f}",
                f"{n / r['near_s']:,.0f}",
                f"{r['plain_s'] / r['near_s']:.3f}",
                f"{r['plain_mb']:.0f}",
                f"{r['near_mb']:.0f}",
            ]
        )
    if len(results) > 1:
        small, large = results[0], results[-1]
        grown = (large["near_mb"] - small["near_mb"]) * 2**20
        per = grown / (large["records"] - small["records"])
        rows.append(["near-dedup index, bytes a record (growth between sizes)", f"{per:,.0f}"])
    header = [
        "records",
        "read records/s",
        "read peak MB",
        "report records/s",
        "report / read",
        "report peak MB",
        "merge records/s",
        "merge near records/s",
        "near / plain merge",
        "merge peak MB",
        "merge near peak MB",
    ]
    return table(header, rows)


def main() -> None:
    command_line(sys.modules[__name__])


if __name__ == "__main__":
    main()
