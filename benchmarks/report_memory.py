"""`zoi report` alone at 100,000 and 1,000,000 records: is its peak memory flat?

The report half of `report_dedup`, in a third of its time (about 9 minutes here), for the one
figure that must not grow with the records. Same synthetic files, same child processes, the
same plain read as the baseline; it adds the duplicate counts, so a change that keeps the
memory flat but changes what is counted shows too.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from .common import command_line, table
from .report_dedup import _child
from .synthetic import write_file

COUNTS = ("exact_duplicate_questions", "near_duplicate_questions")


def _find(tree: object, key: str) -> object:
    """The first value under `key` anywhere in the report's JSON."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        tree = list(tree.values())
    if isinstance(tree, list):
        for item in tree:
            if (found := _find(item, key)) is not None:
                return found
    return None


def measure(records: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        data, out = Path(tmp) / "data.jsonl", Path(tmp) / "r.json"
        write_file(data, records)
        result: dict[str, float] = {"records": records}
        for what in ("read", "report"):
            result[f"{what}_s"], result[f"{what}_mb"] = _child(what, data, out)
        figures = json.loads(out.read_text(encoding="utf-8"))
        for key in COUNTS:
            result[key] = float(_find(figures, key) or 0)
    return result


def run(smoke: bool = False) -> list[dict[str, float]]:
    return [measure(2_000), measure(20_000)] if smoke else [measure(100_000), measure(1_000_000)]


def report(results: list[dict[str, float]]) -> str:
    header = ["records", "read records/s", "read peak MB", "report records/s", "report peak MB"]
    header += ["exact duplicate questions", "near duplicate questions"]
    rows = [
        [
            f"{r['records']:,.0f}",
            f"{r['records'] / r['read_s']:,.0f}",
            f"{r['read_mb']:.0f}",
            f"{r['records'] / r['report_s']:,.0f}",
            f"{r['report_mb']:.0f}",
            *(f"{r[key]:,.0f}" for key in COUNTS),
        ]
        for r in results
    ]
    small, large = results[0], results[-1]
    rows.append(["report peak, large ÷ small", f"{large['report_mb'] / small['report_mb']:.2f}"])
    return table(header, rows)


def main() -> None:
    command_line(sys.modules[__name__])


if __name__ == "__main__":
    main()
