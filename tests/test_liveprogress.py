"""Live counters (`liveprogress`): the records of the chunks in hand, published by the workers
while the chunks run, so that the launcher's line and `zoi status` move with every record.
A done chunk is counted by its marker alone, and counters that expired or never came leave the
markers' figures."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from zero_one_instruction import machine, shards
from zero_one_instruction.liveprogress import LiveBoard, counters_key, index_key, read
from zero_one_instruction.pipeline import Outcome, Tally
from zero_one_instruction.progress import Progress
from zero_one_instruction.rundir import Run, create_or_open, open_run
from zero_one_instruction.runner import ChunkTimeout, _wait
from zero_one_instruction.status import status

from .conftest import make_pipeline
from .queue_helpers import ROOT, Broker, enqueue_run, wait_until, worker
from .queue_helpers import scripted_config as scripted_file
from .scripted_engine import scripted_config
from .test_progress import OUTCOMES, _outcome, _tally

KEPT = [_outcome(4)]  # a record kept in the chunk in hand


@pytest.fixture
def run(tmp_path: Path) -> Run:
    """Prompts [0, 6) in chunks of 2; the first two chunks are done, the third is not."""
    made = create_or_open(tmp_path / "run", scripted_config(), 0, 6, 2)
    for chunk, part in zip(made.chunks()[:2], (OUTCOMES[:2], OUTCOMES[2:4]), strict=True):
        shards.write_chunk(made, chunk, part, "system", {"finished_at": "2030-01-01T00:00:00"})
    return made


@pytest.fixture
def broker(run: Run) -> Iterator[Broker]:
    held = Broker(run.path)
    yield held
    held.close()


def _publish(board: LiveBoard, chunk_index: int, outcomes: list[Outcome]) -> None:
    counters = board.counters(board.run.chunks()[chunk_index])
    for outcome in outcomes:
        counters.add(outcome)
    counters.publish()


def test_pipeline_hands_over_each_outcome_as_its_prompt_ends() -> None:
    pipeline, engine = make_pipeline([f"prompt {i} case=ok" for i in range(5)])
    seen: list[tuple[Outcome, int]] = []  # each outcome, and the requests made by then

    def finished(outcome: Outcome) -> None:
        seen.append((outcome, len(engine.requests)))

    async def evolve() -> list[Outcome]:
        run = pipeline.run(range(5), asyncio.Semaphore(2), finished=finished)
        return [outcome async for outcome in run]

    outcomes = asyncio.run(evolve())
    assert sorted(o.index for o, _ in seen) == [o.index for o in outcomes] == list(range(5))
    assert all(any(o is outcome for o, _ in seen) for outcome in outcomes)
    assert seen[0][1] < len(engine.requests)  # the first came while others still ran


def test_counters_round_trip_expire_and_leave_out_what_no_worker_wrote(
    run: Run, broker: Broker
) -> None:
    board = LiveBoard(broker.client, run, ttl=1)
    assert board.every == pytest.approx(1 / 3)
    _publish(board, 2, OUTCOMES[4:5])
    broker.client.set(counters_key(run, "99-100"), "not json")
    broker.client.set(counters_key(run, "98-99"), json.dumps({"funnel": {"prompts": 1}}))
    funnel = Tally(prompts=2, kept=1, dropped={"x": 0})  # type: ignore[arg-type]
    broker.client.set(counters_key(run, "97-98"), json.dumps({"funnel": funnel.as_dict()}))
    broker.client.sadd(index_key(run), "99-100", "98-99", "97-98", "96-97")  # 96-97: no key
    live = read(broker.client, run)
    assert list(live) == [run.chunks()[2].id]
    assert live[run.chunks()[2].id].funnel == _tally(OUTCOMES[4:5])
    assert abs(live[run.chunks()[2].id].started - time.time()) < 60

    board.counters(run.chunks()[2]).clear()
    assert read(broker.client, run) == {}
    _publish(board, 2, OUTCOMES[4:])
    assert read(broker.client, run)[run.chunks()[2].id].funnel == _tally(OUTCOMES[4:])
    time.sleep(1.5)  # the worker died: nothing refreshes its counters
    assert read(broker.client, run) == {}


def test_a_redis_hiccup_is_logged_never_raised(
    run: Run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    no_retries = Retry(NoBackoff(), 0)  # a hiccup at once, not after redis-py's retries
    gone = redis.Redis(unix_socket_path=str(tmp_path / "no-server.sock"), retry=no_retries)
    board = LiveBoard(gone, run, ttl=30)
    counters = board.counters(run.chunks()[2])
    with caplog.at_level(logging.WARNING, logger="zero_one_instruction.liveprogress"):
        counters.add(OUTCOMES[4])
        counters.publish()
        counters.publish()
        counters.clear()
        assert read(gone, run) == {}
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if "could not publish" in m]) == 1, said  # once a spell
    assert any("could not clear" in m for m in said) is False  # the same spell of failures
    assert any("unreadable" in m for m in said)


def test_progress_adds_the_counters_of_chunks_not_done_and_no_others(run: Run) -> None:
    grid = {chunk.id: chunk for chunk in run.chunks()}
    done, in_hand = run.chunks()[0].id, run.chunks()[2].id
    progress = Progress(len(grid), run.end - run.start, began=time.time() - 3.0)
    stale = _tally(OUTCOMES)  # a done chunk's last counters: its marker wins
    progress.update(run, grid, {done: stale, in_hand: _tally(KEPT), "50-52": stale})
    assert progress.funnel == _tally(OUTCOMES[:4])  # the run's final figure: markers only
    assert progress.live == _tally(KEPT)
    assert progress.line().startswith("chunks 2/3 | records 3 (60% kept) |")

    progress.update(run, grid)  # the counters expired: the markers' figures
    assert progress.live == Tally()
    assert progress.line().startswith("chunks 2/3 | records 2 (50% kept) |")


def test_status_counts_a_done_chunk_by_its_marker_alone(run: Run, broker: Broker) -> None:
    board = LiveBoard(broker.client, run, ttl=30)
    without = status(run, broker.client)
    _publish(board, 0, OUTCOMES)  # stale counters of a done chunk
    _publish(board, 2, KEPT)
    live = status(run, broker.client)
    assert (without.prompts_done, without.records) == (4, 2)
    assert (live.prompts_done, live.records, live.dropped) == (
        5,
        3,
        {"answer_empty": 1, "final_rejected": 1},
    )
    assert live.recent.prompts_per_s > 0 and live.eta_seconds is not None
    assert live.chunks["done"] == 2 and live.missing_ranges == [(4, 6)]

    board.counters(run.chunks()[2]).clear()
    board.counters(run.chunks()[0]).clear()
    assert status(run, broker.client) == without


def _slow_config(tmp_path: Path) -> Path:
    """A scripted engine whose records end a few at a time, over several seconds."""
    config = scripted_file(tmp_path, delay=0.1)
    with config.open("a", encoding="utf-8") as handle:
        handle.write("pipeline:\n  concurrency: 2\n")
    return config


def test_status_moves_during_a_chunk_and_settles_on_the_marker(tmp_path: Path) -> None:
    config, run_dir = _slow_config(tmp_path), tmp_path / "run"
    enqueue_run(config, run_dir, 12, 12)
    run, broker = open_run(run_dir), Broker(run_dir)
    try:
        proc = worker(run_dir, "--burst")
        seen: list[int] = []

        def moved() -> bool:
            seen.append(status(run, broker.client).prompts_done)
            return 0 < seen[-1] < 12 and not list(run.shards.glob("*.done"))

        wait_until(moved, timeout=60, what="live counters before the chunk's marker")
        assert proc.wait(timeout=120) == 0
        final = status(run, broker.client)
        assert (final.chunks["done"], final.prompts_done) == (1, 12)
        assert not broker.client.exists(index_key(run))  # cleared with the marker
    finally:
        broker.close()


def test_a_worker_listening_for_its_next_chunk_while_one_runs_is_busy(tmp_path: Path) -> None:
    """Every prompt of the one chunk has its slot at once, so the worker goes back to RQ's
    loop to listen for the next chunk while this one runs: it is still busy, and idle again
    once the chunk is done."""
    config, run_dir = scripted_file(tmp_path, delay=1.0), tmp_path / "run"
    enqueue_run(config, run_dir, 4, 4)
    run, broker = open_run(run_dir), Broker(run_dir)
    try:
        proc = worker(run_dir, "--heartbeat", "0.3")
        wait_until(lambda: status(run, broker.client).chunks["running"], timeout=60, what="work")
        time.sleep(1.0)  # the prompts each have their slot; RQ's loop listens again
        now = status(run, broker.client)
        assert now.chunks["running"] == 1 and [w["state"] for w in now.workers] == ["busy"]
        wait_until(lambda: list(run.shards.glob("*.done")), timeout=60, what="the marker")
        wait_until(
            lambda: [w["state"] for w in status(run, broker.client).workers] == ["idle"],
            timeout=10,
            what="the worker idle again",
        )
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    finally:
        broker.close()


def test_the_launcher_line_moves_before_the_first_chunk_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    out = tmp_path / "out.jsonl"
    looks: list[tuple[int, int]] = []

    def look(progress: Progress) -> None:
        looks.append((len(progress.counted), progress.live.prompts))

    report = machine.run(_slow_config(tmp_path), out, 0, 12, chunk_size=12, on_progress=look)
    assert any(done == 0 and 0 < live < 12 for done, live in looks), looks
    assert looks[-1] == (1, 0)  # the marker counts, the counters are gone
    assert report.funnel.prompts == 12  # the summary: markers only


def test_the_runner_publishes_while_it_waits_and_still_keeps_the_job_timeout() -> None:
    pending: concurrent.futures.Future[int] = concurrent.futures.Future()
    beats: list[float] = []
    with pytest.raises(ChunkTimeout):
        _wait(pending, 0.35, 0.1, lambda: beats.append(time.monotonic()))
    assert 2 <= len(beats) <= 4 and pending.cancelled()

    failed: concurrent.futures.Future[int] = concurrent.futures.Future()
    failed.set_exception(TimeoutError("the engine's own"))  # not a wait that ran out
    with pytest.raises(TimeoutError, match="the engine's own"):
        _wait(failed, None, 0.1, lambda: beats.append(0.0))
    done: concurrent.futures.Future[int] = concurrent.futures.Future()
    done.set_result(7)
    assert _wait(done, None, 0.1, lambda: beats.append(0.0)) == 7
