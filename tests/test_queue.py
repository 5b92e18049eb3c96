"""The resumable queue, end to end, with the scripted engine in separate worker processes:
enqueue, workers, crashes, a wiped Redis, damaged shards, hostile jobs, merge and status."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from zero_one_instruction.rundir import open_run

from .queue_helpers import (
    Broker,
    done_chunks,
    enqueue_run,
    ok,
    requests_per_seed,
    scripted_config,
    stop,
    wait_until,
    worker,
    zoi,
)
from .scripted_engine import ENGINE

N, CHUNK = 120, 10


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """config, run dir, request log, and the reference output of `zoi generate`."""
    log = tmp_path / "requests.log"
    config = scripted_config(tmp_path, delay=0.01, log=log)
    reference = tmp_path / "reference.jsonl"
    ok("generate", "-c", str(config), "--start", "0", "--end", str(N), "-o", str(reference))
    log.unlink()
    return config, tmp_path / "run", log, reference


def enqueue(config: Path, run: Path, *extra: str) -> str:
    return enqueue_run(config, run, N, CHUNK, *extra)


def merged(run: Path, tmp_path: Path, *extra: str) -> bytes:
    out = tmp_path / "merged.jsonl"
    ok("merge", "--run", str(run), "-o", str(out), *extra)
    return out.read_bytes()


def test_two_workers_give_exactly_the_generate_output(setup, tmp_path: Path) -> None:
    config, run, log, reference = setup
    assert "enqueued 12" in enqueue(config, run)
    workers = [worker(run, "--burst", "--name", f"w{i}") for i in range(2)]
    for proc in workers:
        assert proc.wait(timeout=120) == 0, stop(proc)
    assert merged(run, tmp_path) == reference.read_bytes()
    names = {
        json.loads(p.read_text())["worker"].split("-")[0] for p in (run / "shards").glob("*.done")
    }
    assert names == {"w0", "w1"}, "both workers should have taken chunks"
    assert set(requests_per_seed(log).values()) == {1}, "a prompt ran twice"
    again = enqueue(config, run)
    assert "done 12, already queued or running 0, enqueued 0" in again


def test_sigkill_mid_chunk_loses_nothing_and_duplicates_nothing(setup, tmp_path: Path) -> None:
    config, run, log, reference = setup
    enqueue(config, run)
    broker = Broker(run)
    try:
        rng = random.Random(7)
        for _ in range(3):
            proc = worker(run)
            wait_until(lambda: requests_per_seed(log), timeout=60, what="work to start")
            time.sleep(rng.uniform(0.05, 0.6))
            in_flight = set(open_run(run).chunks and _started_ids(broker, run))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            killed_at = time.time()
            if len(done_chunks(run)) == N // CHUNK:
                break
            assert in_flight, "the worker was killed with no chunk in hand"
            # a fresh worker must pick the abandoned chunks up within ttl + janitor + start-up
            # (seconds; RQ's own sweep would take minutes): generous for a loaded machine
            follower = worker(run)
            wait_until(
                lambda jobs=in_flight, t=killed_at: _started_since(run, jobs, t, broker),
                timeout=40,
                what="the abandoned chunk to run again",
            )
            os.kill(follower.pid, signal.SIGKILL)
            follower.wait(timeout=30)
        finisher = worker(run, "--burst")
        assert finisher.wait(timeout=120) == 0, stop(finisher)
    finally:
        broker.close()
    # Byte-identical although killed workers may leave half-written *.tmp files behind.
    assert merged(run, tmp_path) == reference.read_bytes()


def _started_ids(broker: Broker, run: Path) -> set[str]:
    key = f"rq:wip:{open_run(run).queue_name}"
    return {member.decode().split(":")[0] for member in broker.client.zrange(key, 0, -1)}


def _started_since(run: Path, job_ids: set[str], since: float, broker: Broker) -> bool:
    """Each job has started again after `since` (a new execution, not the killed one's
    leftover entry), or had finished before it."""
    from datetime import datetime, timezone

    def stamp(value: str | bytes | None) -> float:
        if not value:
            return 0.0
        text = value.decode() if isinstance(value, bytes) else value
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()

    for job_id in job_ids:
        marker = run / "shards" / (job_id.split("-", 2)[2] + ".done")
        if marker.exists():
            info = json.loads(marker.read_text(encoding="utf-8"))
            if stamp(info["finished_at"]) < since or stamp(info["started_at"]) >= since:
                continue
            return False
        if stamp(broker.client.hget(f"rq:job:{job_id}", "started_at")) < since:
            return False
    return True


def test_wiped_redis_is_rebuilt_from_the_markers(setup, tmp_path: Path) -> None:
    config, run, _, reference = setup
    enqueue(config, run)
    broker = Broker(run)
    try:
        proc = worker(run, "--burst")
        wait_until(lambda: len(done_chunks(run)) >= 3, timeout=60, what="3 chunks")
        broker.client.flushall()
        assert proc.wait(timeout=60) == 0, stop(proc)
        done = len(done_chunks(run))
        assert done < N // CHUNK
        report = enqueue(config, run)
        assert f"done {done}, already queued or running 0, enqueued {N // CHUNK - done}" in report
        finisher = worker(run, "--burst")
        assert finisher.wait(timeout=120) == 0, stop(finisher)
    finally:
        broker.close()
    assert merged(run, tmp_path) == reference.read_bytes()


def test_killed_embedded_server_keeps_its_queue(setup) -> None:
    config, run, _, _ = setup
    broker = Broker(run)
    try:
        enqueue(config, run)
        queue = open_run(run).queue_name
        assert broker.client.llen(f"rq:queue:{queue}") == N // CHUNK
        pid = int(broker.client.info("server")["process_id"])
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _alive(pid), timeout=10, what="the server to die")
    finally:
        broker.client.close()
    restarted = Broker(run)
    try:
        assert int(restarted.client.info("server")["process_id"]) != pid
        assert restarted.client.llen(f"rq:queue:{queue}") == N // CHUNK
    finally:
        restarted.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_damaged_shards_are_found_and_redone(setup, tmp_path: Path) -> None:
    config, run, _, reference = setup
    enqueue(config, run)
    assert worker(run, "--burst").wait(timeout=120) == 0
    shards = run / "shards"
    truncated = shards / "0000000010-0000000020.jsonl"
    truncated.write_bytes(truncated.read_bytes()[:-7])
    flipped = shards / "0000000030-0000000040.jsonl"
    data = bytearray(flipped.read_bytes())
    data[5] ^= 1
    flipped.write_bytes(bytes(data))
    (shards / "0000000050-0000000060.jsonl").unlink()

    refused = zoi("merge", "--run", str(run), "-o", str(tmp_path / "m.jsonl"))
    assert refused.returncode == 1
    assert "[10, 20)" in refused.stderr and "[50, 60)" in refused.stderr
    assert not (tmp_path / "m.jsonl").exists()
    state = json.loads(ok("status", "--run", str(run), "--json"))
    assert state["chunks"]["bad"] == 3 and state["chunks"]["done"] == N // CHUNK - 3
    assert len(state["problems"]) == 3
    assert any("checksum" in p for p in state["problems"])
    redo = zoi(
        "enqueue",
        "-c",
        str(config),
        "--run",
        str(run),
        "--num-prompts",
        str(N),
        "--chunk-size",
        str(CHUNK),
    )
    assert "enqueued 3" in redo.stdout and redo.stderr.count("bad shard set aside") == 3
    assert worker(run, "--burst").wait(timeout=120) == 0
    assert merged(run, tmp_path) == reference.read_bytes()
    assert list(shards.glob("0000000030-0000000040.jsonl.bad-*"))  # set aside, not deleted


def test_merge_refusal_names_missing_and_damaged_chunks(tmp_path: Path) -> None:
    run = tmp_path / "run"
    enqueue_run(scripted_config(tmp_path), run, 40, 10)
    assert worker(run, "--burst").wait(timeout=120) == 0
    shards = run / "shards"
    (shards / "0000000000-0000000010.done").unlink()
    flipped = shards / "0000000030-0000000040.jsonl"
    data = bytearray(flipped.read_bytes())
    data[5] ^= 1
    flipped.write_bytes(bytes(data))
    refused = zoi("merge", "--run", str(run), "-o", str(tmp_path / "m.jsonl"))
    assert refused.returncode == 1
    [line] = refused.stderr.strip().splitlines()
    assert "missing base-prompt ranges [0, 10);" in line
    damaged = "damaged shards [30, 40) (0000000030-0000000040.jsonl does not match its checksum)"
    assert damaged in line
    assert not (tmp_path / "m.jsonl").exists()


def test_partial_merge_and_formats(setup, tmp_path: Path) -> None:
    config, run, _, reference = setup
    enqueue(config, run)
    assert worker(run, "--burst").wait(timeout=120) == 0
    (run / "shards" / "0000000000-0000000010.done").unlink()
    partial = merged(run, tmp_path, "--allow-partial", "--id-start", "7").decode().splitlines()
    expected = [json.loads(line) for line in reference.read_text().splitlines()]
    kept_after_first_chunk = [r for r in expected if True][len(expected) - len(partial) :]
    assert json.loads(partial[0])["id"] == "record_7"
    assert [json.loads(p)["input"] for p in partial] == [r["input"] for r in kept_after_first_chunk]
    messages = merged(run, tmp_path, "--allow-partial", "--format", "messages", "--with-meta")
    first = json.loads(messages.decode().splitlines()[0])
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert first["meta"]["index"] == 10 and first["meta"]["steps"][0]["step"] == "width"


def test_dedup_drops_repeated_questions(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("同じ case=dup\n同じ case=dup\n", encoding="utf-8")
    config = tmp_path / "c.yml"
    config.write_text(
        f"model_name: m\nengine: '{ENGINE}'\nprompts: {{file: {prompts}}}\n"
        "engine_kwargs: {rules: {dup: {flatten: 'いつも同じ質問です'}}}\n",
        encoding="utf-8",
    )
    run = tmp_path / "run"
    enqueue_run(config, run, 6, 2)
    assert worker(run, "--burst").wait(timeout=120) == 0
    out = tmp_path / "d.jsonl"
    report = ok("merge", "--run", str(run), "-o", str(out), "--dedup")
    assert "5 duplicate questions dropped" in report
    assert len(out.read_text().splitlines()) == 1


def test_foreign_jobs_are_refused_and_never_run(setup, tmp_path: Path) -> None:
    config, run, _, _ = setup
    enqueue(config, run)
    evidence = tmp_path / "pwned"
    broker = Broker(run)
    try:
        queue = Queue(open_run(run).queue_name, connection=broker.client, serializer=JSONSerializer)
        hostile = queue.enqueue("os.system", f"touch {evidence}", job_id="hostile-1")
        sneaky = queue.enqueue(
            "zero_one_instruction.worker.run_chunk",
            open_run(run).key,
            0,
            CHUNK,
            job_id=open_run(run).job_id(open_run(run).chunks()[0]),
            on_failure=__import__("rq").Callback("os.getcwd"),
        )
        assert worker(run, "--burst").wait(timeout=120) == 0
        hostile = Job.fetch("hostile-1", connection=broker.client, serializer=JSONSerializer)
        assert hostile.get_status() == "failed"
        assert "refused" in (hostile.latest_result().exc_string or "")
        assert sneaky.get_status(refresh=True) == "finished"  # the chunk ran, its callback did not
    finally:
        broker.close()
    assert not evidence.exists()


def test_long_chunk_is_not_declared_abandoned_while_its_worker_lives(tmp_path: Path) -> None:
    log = tmp_path / "requests.log"
    config = scripted_config(tmp_path, delay=0.4, log=log)  # a chunk takes ~6 x 0.4 s x 2
    run = tmp_path / "run"
    enqueue_run(config, run, 24, 12)
    procs = [
        worker(run, "--burst", "--heartbeat", "0.2", "--heartbeat-ttl", "2", "--janitor", "0.2")
        for _ in range(2)
    ]
    for proc in procs:
        assert proc.wait(timeout=180) == 0, stop(proc)
    counts = requests_per_seed(log)
    assert len(counts) == 24 and set(counts.values()) == {1}, counts


def test_concurrent_enqueues_never_double_a_chunk(setup) -> None:
    config, run, log, _ = setup
    import subprocess

    from .queue_helpers import ENV, ZOI

    args = [
        ZOI,
        "enqueue",
        "-c",
        str(config),
        "--run",
        str(run),
        "--num-prompts",
        str(N),
        "--chunk-size",
        str(CHUNK),
    ]
    broker = Broker(run)
    try:
        procs = [
            subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, text=True) for _ in range(3)
        ]
        outs = [p.communicate(timeout=60)[0] for p in procs]
        queue = f"rq:queue:{open_run(run).queue_name}"
        ids = [i.decode() for i in broker.client.lrange(queue, 0, -1)]
        assert len(ids) == len(set(ids)) == N // CHUNK, outs
        proc = worker(run, "--burst")
        for _ in range(5):  # enqueue while the worker runs
            enqueue_run(config, run, N, CHUNK)
        assert proc.wait(timeout=120) == 0
        assert enqueue_run(config, run, N, CHUNK).count("enqueued 0") == 1
    finally:
        broker.close()
    assert set(requests_per_seed(log).values()) == {1}


def test_status_reports_progress_and_funnel(setup) -> None:
    config, run, _, _ = setup
    enqueue(config, run)
    before = json.loads(ok("status", "--run", str(run), "--json"))
    assert before["chunks"]["queued"] == N // CHUNK and before["records"] == 0
    assert before["missing_ranges"] == [[0, N]]
    assert worker(run, "--burst").wait(timeout=120) == 0
    after = json.loads(ok("status", "--run", str(run), "--json"))
    assert after["chunks"]["done"] == N // CHUNK and after["prompts_done"] == N
    assert after["records"] == N - sum(after["dropped"].values())
    assert after["recent"]["records_per_s"] > 0 and after["eta_seconds"] == 0.0
    text = ok("status", "--run", str(run))
    assert "chunks    total 12, done 12" in text


def test_warm_stop_finishes_the_chunks_in_hand_and_takes_no_more(tmp_path: Path) -> None:
    log = tmp_path / "requests.log"
    config = scripted_config(tmp_path, delay=0.5, log=log)
    run = tmp_path / "run"
    enqueue_run(config, run, 40, 8)
    proc = worker(run, "--name", "warm")
    wait_until(lambda: requests_per_seed(log), timeout=60, what="work to start")
    live = json.loads(ok("status", "--run", str(run), "--json"))
    assert [w["name"].split("-")[0] for w in live["workers"]] == ["warm"]
    assert live["chunks"]["running"] >= 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, stop(proc)
    done = done_chunks(run)
    assert 1 <= len(done) < 5
    started = set(requests_per_seed(log))
    state = json.loads(ok("status", "--run", str(run), "--json"))
    assert state["prompts_done"] == 8 * len(done)
    assert len(started) == 8 * len(done), "work was started on a chunk that was not finished"
    assert state["chunks"]["queued"] == 5 - len(done) and state["chunks"]["running"] == 0


def test_second_signal_releases_the_chunks_in_hand(setup, tmp_path: Path) -> None:
    config, run, _, reference = setup
    enqueue(config, run)
    (tmp_path / "slow").mkdir()
    slow = scripted_config(tmp_path / "slow", delay=0.3)
    broker = Broker(run)
    try:
        proc = worker(run, "-c", str(slow))  # this machine's engine settings: a slower engine
        wait_until(lambda: _started_ids(broker, run), timeout=60, what="a chunk to start")
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.2)  # RQ ignores a second signal within a second of the first
        in_hand = _started_ids(broker, run)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert in_hand
        for job_id in in_hand:
            status = broker.client.hget(f"rq:job:{job_id}", "status")
            assert status == b"queued", (job_id, status)
            assert not (run / "shards" / (job_id.split("-", 2)[2] + ".done")).exists()
        assert worker(run, "--burst").wait(timeout=120) == 0
    finally:
        broker.close()
    assert merged(run, tmp_path) == reference.read_bytes()
