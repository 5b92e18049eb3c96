"""`zoi report`: what a dataset is like, from a merged file or a run directory, as figures.

The input is read once (`dataset`), every item goes through the analyses (`analysis`), and
the figures come back as one JSON-ready dict, written to `--json` if asked. The terminal
summary (`render.data_report`) and the HTML page read the same dict, so they cannot
disagree with the JSON.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .analysis import FunnelAnalysis, RecordAnalysis, Tokenizer
from .dataset import DatasetError, Item, open_reader, read_file
from .detectors import scaffolding
from .neardup import THRESHOLD, NearDuplicates
from .outputs import enclosing_run
from .pipeline import DROP_REASONS
from .records import atomic_file
from .templates import load_templates

FORMAT = 1


@dataclass(frozen=True)
class DataReport:
    """The figures, and where they were written."""

    figures: dict[str, Any]
    json_path: Path | None
    seconds: float


def _check_json_output(path: Path, inputs: list[Path], run_dir: Path | None) -> None:
    """Refuse a JSON output that would replace the input or land inside a run directory (the
    run's files are the run's own). Any other existing file is replaced: a report is cheap to
    make again and is meant to be refreshed."""
    for source in inputs:
        if path.resolve() == source.resolve() or (
            path.exists() and source.exists() and path.samefile(source)
        ):
            raise DatasetError(f"{path}: is the input; write the report to another file")
    run = enclosing_run(path, [run_dir] if run_dir is not None else [])
    if run is not None:
        raise DatasetError(f"{path}: is inside the run directory {run}; write it elsewhere")
    if path.is_dir():
        raise DatasetError(f"{path}: is a directory; give a file name for the JSON report")


def _analyse(items: Iterator[Item], records: RecordAnalysis, funnel: FunnelAnalysis | None) -> None:
    for item in items:
        if funnel is not None:
            funnel.add(item)
        if item.kept:
            records.add(item)


def _run_figures(run_dir: Path, analysis: RecordAnalysis) -> dict[str, Any]:
    reader = open_reader(run_dir)
    analysis.labels = scaffolding(reader.run.templates)
    traces = FunnelAnalysis()
    _analyse(reader.items(), analysis, traces)
    tally = reader.funnel
    funnel = {
        "prompts": tally.prompts,
        "kept": tally.kept,
        "dropped": dict(tally.dropped.most_common()),
        "reasons": {reason: DROP_REASONS.get(reason, "") for reason in tally.dropped},
        **traces.figures(),
    }
    source = {"kind": "run", "path": str(run_dir), **reader.coverage.figures()}
    return {"source": source, "funnel": funnel}


def make_report(
    file: Path | None = None,
    run_dir: Path | None = None,
    json_path: Path | None = None,
    *,
    tokenizer: Tokenizer | None = None,
    near_threshold: float = THRESHOLD,
) -> DataReport:
    """The report on a merged `file` or on the run in `run_dir` (exactly one), written to
    `json_path` if given. A file is checked for the shipped templates' scaffolding; a run for
    the templates it was made with."""
    if (file is None) == (run_dir is None):
        raise DatasetError("give a merged FILE.jsonl or --run RUN, not both and not neither")
    if json_path is not None:
        _check_json_output(json_path, [p for p in (file, run_dir) if p is not None], run_dir)
    began = time.monotonic()
    analysis = RecordAnalysis(
        labels=(), tokenizer=tokenizer, near=NearDuplicates(threshold=near_threshold)
    )
    if run_dir is not None:
        head = _run_figures(run_dir, analysis)
    else:
        assert file is not None
        analysis.labels = scaffolding(load_templates())
        _analyse(read_file(file), analysis, None)
        head = {"source": {"kind": "file", "path": str(file)}, "funnel": None}
    figures = {"format": FORMAT, **head, **analysis.figures()}
    if json_path is not None:
        with atomic_file(json_path, follow_links=True) as handle:
            json.dump(figures, handle, ensure_ascii=False, indent=1)
            handle.write("\n")
    return DataReport(figures, json_path, time.monotonic() - began)
