"""The one funnel (`Tally`), the one rate and ETA (`Throughput`) and the launcher's incremental
reading of done markers (`Progress`), in-process."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

from zero_one_instruction import shards
from zero_one_instruction.pipeline import Outcome, StepTrace, Tally
from zero_one_instruction.progress import Progress, Throughput, per_second
from zero_one_instruction.rundir import Run, create_or_open

from .scripted_engine import scripted_config


def _outcome(index: int, drop: str | None = None, fixer: bool = False) -> Outcome:
    step = StepTrace("width", text="text", prompt_tokens=10 + index, completion_tokens=index)
    answer = None if drop else f"a{index}"
    return Outcome(index, "", f"q{index}", answer, drop, fixer, [step])


def _tally(outcomes: list[Outcome]) -> Tally:
    tally = Tally()
    for outcome in outcomes:
        tally.add(outcome)
    return tally


OUTCOMES = [
    _outcome(0),
    _outcome(1, "answer_empty", fixer=True),
    _outcome(2, "final_rejected"),
    _outcome(3),
    _outcome(4, "answer_empty"),
    _outcome(5, "width_failed"),
]


def test_merged_funnels_equal_the_funnel_of_all_outcomes() -> None:
    merged = Tally()
    for part in (OUTCOMES[:2], OUTCOMES[2:3], OUTCOMES[3:]):
        merged.merge(Tally.from_dict(_tally(part).as_dict()))  # as a done marker holds it
    whole = _tally(OUTCOMES)
    assert merged == whole
    assert list(merged.dropped) == ["answer_empty", "final_rejected", "width_failed"]
    assert (merged.kept, merged.fixer_ran, merged.tokens) == (2, 1, 90)
    assert merged.kept_percent == 100.0 * 2 / 6 and Tally().kept_percent == 0.0


def test_throughput_and_eta() -> None:
    pace = Throughput.of(_tally(OUTCOMES), 2.0)
    assert (pace.prompts_per_s, pace.records_per_s, pace.tokens_per_s) == (3.0, 1.0, 7.5)
    assert pace.eta(0) == 0.0 and pace.eta(30) == 10.0
    assert Throughput().eta(0) == 0.0 and Throughput().eta(1) is None
    assert per_second(5, 0.0) == 0.0 and per_second(5, -1.0) == 0.0  # no span, no rate


def _run(tmp_path: Path) -> Run:
    run = create_or_open(tmp_path / "run", scripted_config(), 0, 6, 2)
    for chunk, part in zip(run.chunks(), (OUTCOMES[:2], OUTCOMES[2:4], OUTCOMES[4:]), strict=True):
        info = {"finished_at": "2030-01-01T00:00:00+00:00"}
        shards.write_chunk(run, chunk, part, "system", info)
    return run


def test_progress_counts_each_marker_once_and_forgets_those_set_aside(tmp_path: Path) -> None:
    run = _run(tmp_path)
    grid = {chunk.id: chunk for chunk in run.chunks()}
    progress = Progress(len(grid), run.end - run.start, began=0.0)
    progress.update(run, grid)
    progress.update(run, grid)
    assert progress.funnel == _tally(OUTCOMES) and progress.recent == _tally(OUTCOMES)
    with mock.patch("time.time", return_value=3.0):
        assert progress.line() == (
            "chunks 3/3 | records 2 (33% kept) | 0.67 records/s | 5 tokens/s | ETA 0 min"
        )

    second = run.chunks()[1]
    shards.set_aside(run.shards, second)
    progress.update(run, grid)
    assert progress.funnel == _tally(OUTCOMES[:2] + OUTCOMES[4:])
    with mock.patch("time.time", return_value=3.0):
        assert progress.line().endswith("| ETA 0.0 min")  # 2 prompts left at 4 per 3 s

    first, third = run.chunks()[0], run.chunks()[2]
    marker = shards.marker_path(run.shards, first)
    copy = marker.with_name("copy")
    copy.write_bytes(marker.read_bytes())
    os.replace(copy, marker)  # the same marker written again: a new inode, counted once
    progress.update(run, grid)
    assert list(progress.counted) == [third.id, first.id]
    assert progress.funnel == _tally(OUTCOMES[:2] + OUTCOMES[4:])
    assert set(shards.present_markers(run)) == {first.id, third.id}
