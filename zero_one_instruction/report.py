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
from .coverage import TaskCoverage, coverage_of, not_available
from .dataset import DatasetError, Item, RunReader, open_reader, read_file
from .detectors import scaffolding
from .neardup import THRESHOLD, Bands
from .outputs import check_destination
from .page import write_page
from .pipeline import DROP_REASONS
from .records import atomic_file
from .samples import JudgeConfidence, Samples
from .templates import load_templates
from .tokens import AUTO, TokenRequest, choose

FORMAT = 1


@dataclass(frozen=True)
class DataReport:
    """The figures, and where they were written."""

    figures: dict[str, Any]
    json_path: Path | None
    seconds: float
    html_path: Path | None = None


def _check_output(path: Path, inputs: list[Path], run_dir: Path | None, kind: str) -> None:
    """Refuse an output that would replace the input, or that no command may write
    (`outputs.check_destination`: a run's files are the run's own, a missing directory fails
    the write), before the input is read, not after a pass of hours. Any other existing file
    is replaced: a report is cheap to make again and is meant to be refreshed."""
    for source in inputs:
        if path.resolve() == source.resolve() or (
            path.exists() and source.exists() and path.samefile(source)
        ):
            raise DatasetError(f"{path}: is the input; write the report to another file")
    if path.is_dir():
        raise DatasetError(f"{path}: is a directory; give a file name for the {kind} report")
    check_destination(path, [run_dir] if run_dir is not None else [])


@dataclass
class _Extras:
    """What only the page shows: samples, judge confidence and task coverage."""

    samples: Samples
    confidence: JudgeConfidence
    coverage: TaskCoverage | None = None

    def add(self, item: Item) -> None:
        self.samples.add(item)
        self.confidence.add(item)
        if self.coverage is not None:
            self.coverage.add(item)


def _analyse(
    items: Iterator[Item],
    records: RecordAnalysis,
    funnel: FunnelAnalysis | None,
    extras: _Extras,
) -> None:
    for item in items:
        if funnel is not None:
            funnel.add(item)
        extras.add(item)
        if item.kept:
            records.add(item)


def _run_figures(
    run_dir: Path, reader: RunReader, analysis: RecordAnalysis, extras: _Extras
) -> dict[str, Any]:
    run = reader.run
    analysis.labels = scaffolding(run.templates, run.config.pipeline.optional_templates())
    analysis.refusal_marker = reader.run.config.pipeline.refusal_marker
    extras.coverage, why_not = coverage_of(reader.run)
    traces = FunnelAnalysis()
    _analyse(reader.items(), analysis, traces, extras)
    tally = reader.funnel
    funnel = {
        "prompts": tally.prompts,
        "kept": tally.kept,
        "dropped": dict(tally.dropped.most_common()),
        "reasons": {reason: DROP_REASONS.get(reason, "") for reason in tally.dropped},
        **traces.figures(),
    }
    if tally.operators:  # the depth steps by operator, for a run that draws operators
        funnel["operators"] = dict(tally.operators.most_common())
        funnel["operators_kept"] = dict(tally.operators_kept.most_common())
    if tally.turns or tally.turns_ended:  # the conversations, for a run of several turns
        funnel["turns"] = dict(sorted(tally.turns.items()))
        funnel["turns_ended"] = dict(tally.turns_ended.most_common())
    source = {"kind": "run", "path": str(run_dir), **reader.coverage.figures()}
    tasks = extras.coverage.figures() if extras.coverage is not None else not_available(why_not)
    return {"source": source, "funnel": funnel, "task_coverage": tasks}


def _file_figures(file: Path, analysis: RecordAnalysis, extras: _Extras) -> dict[str, Any]:
    analysis.labels = scaffolding(load_templates())
    _analyse(read_file(file), analysis, None, extras)
    return {
        "source": {"kind": "file", "path": str(file)},
        "funnel": None,
        "task_coverage": not_available("a merged file does not say which base prompts it had"),
    }


def make_report(
    file: Path | None = None,
    run_dir: Path | None = None,
    json_path: Path | None = None,
    *,
    html_path: Path | None = None,
    tokenizer: Tokenizer | None = None,
    tokens: TokenRequest = AUTO,
    near_threshold: float = THRESHOLD,
) -> DataReport:
    """The report on a merged `file` or on the run in `run_dir` (exactly one), written to
    `json_path` and as a page to `html_path` if given. A file is checked for the shipped
    templates' scaffolding and refusal marker; a run for the templates and marker it was made
    with. Tokens are counted with `tokenizer` if given, else as `tokens` asks (`tokens.choose`)."""
    if (file is None) == (run_dir is None):
        raise DatasetError("give a merged FILE.jsonl or --run RUN, not both and not neither")
    _check_outputs(json_path, html_path, [p for p in (file, run_dir) if p is not None], run_dir)
    began = time.monotonic()
    reader = open_reader(run_dir) if run_dir is not None else None
    counting = choose(tokens, reader.run if reader is not None else None, tokenizer)
    analysis = RecordAnalysis(labels=(), tokenizer=counting.count, bands=Bands(near_threshold))
    extras = _Extras(Samples(), JudgeConfidence())
    if run_dir is not None and reader is not None:
        head = _run_figures(run_dir, reader, analysis, extras)
    else:
        assert file is not None
        head = _file_figures(file, analysis, extras)
    body = analysis.figures()
    body["lengths"].update(counting.figures())
    figures = {
        "format": FORMAT,
        **head,
        **body,
        "judge_confidence": extras.confidence.figures(),
        "samples": extras.samples.figures(),
    }
    if json_path is not None:
        with atomic_file(json_path, follow_links=True) as handle:
            json.dump(figures, handle, ensure_ascii=False, indent=1)
            handle.write("\n")
    if html_path is not None:
        write_page(figures, html_path)
    return DataReport(figures, json_path, time.monotonic() - began, html_path)


def _check_outputs(
    json_path: Path | None, html_path: Path | None, inputs: list[Path], run_dir: Path | None
) -> None:
    if json_path is not None:
        _check_output(json_path, inputs, run_dir, "JSON")
    if html_path is not None:
        _check_output(html_path, inputs, run_dir, "HTML")
        if json_path is not None and json_path.resolve() == html_path.resolve():
            raise DatasetError(f"{html_path}: is the JSON output too; give two file names")
