"""`machine.run`, `machine.work` and `machine.enqueue` called in-process, as a script would:
the library behind `zoi run`, `zoi worker` and `zoi enqueue`, with the scripted engine."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from zero_one_instruction import generator, machine
from zero_one_instruction.errors import ZoiError
from zero_one_instruction.merger import MergeOptions, merge_run
from zero_one_instruction.status import status_of

from .clitools import zoi
from .queue_helpers import ROOT, scripted_config
from .test_cli import write_config

N, CHUNK = 30, 5


@pytest.fixture
def reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    """A scripted config that logs each engine's environment, and what `generator.generate`
    writes for [0, N). Workers started from this process find the scripted engine too."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    env_log = tmp_path / "env.log"
    config = scripted_config(tmp_path, env_log=env_log)
    expected = tmp_path / "reference.jsonl"
    report = generator.generate(config, 0, N, expected)
    assert report.output == expected and report.funnel.prompts == N
    env_log.unlink()
    return config, expected, env_log


def _engines(env_log: Path) -> list[tuple[str | None, str | None, int]]:
    seen = [json.loads(line) for line in env_log.read_text(encoding="utf-8").splitlines()]
    return sorted((e["cuda"], e["order"], e["tp"]) for e in seen)


def test_run_plans_launches_merges_and_reports(
    reference: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, expected, env_log = reference
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    out = tmp_path / "out.jsonl"
    events: list[str] = []
    looks: list[int] = []
    report = machine.run(
        config,
        out,
        0,
        N,
        tp=2,
        chunk_size=CHUNK,
        on_event=events.append,
        on_progress=lambda progress: looks.append(len(progress.counted)),
    )
    assert out.read_bytes() == expected.read_bytes()
    run_dir = Path(f"{out}.run")
    assert report.run == run_dir.resolve() and report.output == out
    assert [(w.name, w.gpus, w.tp) for w in report.workers] == [("gpu0-1", ("0", "1"), 2)]
    assert report.funnel.prompts == N and report.merge.records == report.funnel.kept > 0
    assert report.merge.merged == report.merge.chunks == N // CHUNK
    assert report.seconds > 0
    assert events[:2] == [
        "GPUs 2 stay idle: they do not fill a group of 2",
        f"run {report.run}: {N // CHUNK} chunks, workers: gpu0-1 (tp 2)",
    ]
    assert looks and looks == sorted(looks)  # progress only moves forward
    assert _engines(env_log) == [("0,1", "PCI_BUS_ID", 2)]

    env_log.unlink()
    began = time.monotonic()
    again = machine.run(config, out, 0, N, tp=2, chunk_size=CHUNK, on_event=events.append)
    assert time.monotonic() - began < 10  # a finished run only merges
    assert not env_log.exists()  # no worker was started
    assert again.funnel == report.funnel and again.merge.records == report.merge.records
    assert out.read_bytes() == expected.read_bytes()  # the run's own output is replaced

    other = tmp_path / "other.jsonl"
    other.write_text("not the run's\n", encoding="utf-8")
    with pytest.raises(ZoiError, match="already exists"):
        machine.run(config, other, 0, N, run_dir=run_dir, chunk_size=CHUNK)
    assert other.read_text(encoding="utf-8") == "not the run's\n"


def test_work_serves_a_queued_run_with_its_gpus_in_pci_bus_order(
    reference: tuple[Path, Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    signals: None,
) -> None:
    config, expected, env_log = reference
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    run_dir = tmp_path / "run"
    run, queued = machine.enqueue(config, run_dir, 0, N, chunk_size=CHUNK)
    assert (queued.chunks, queued.enqueued, queued.done) == (N // CHUNK, N // CHUNK, 0)
    assert run.path == run_dir.resolve() and (run.start, run.end) == (0, N)

    fast = {"heartbeat": 0.3, "heartbeat_ttl": 2, "janitor": 0.5}
    assert machine.work(run_dir, gpus="1", burst=True, **fast)
    assert (os.environ["CUDA_VISIBLE_DEVICES"], os.environ["CUDA_DEVICE_ORDER"]) == (
        "1",
        "PCI_BUS_ID",
    )
    assert _engines(env_log) == [("1", "PCI_BUS_ID", 1)]  # tp: the number of GPUs given
    assert status_of(run_dir).chunks["done"] == N // CHUNK

    out = tmp_path / "out.jsonl"
    merged = merge_run(run_dir, out)
    assert out.read_bytes() == expected.read_bytes()
    assert merged.records == len(expected.read_bytes().splitlines())
    _, again = machine.enqueue(config, run_dir, 0, N, chunk_size=CHUNK)
    assert (again.done, again.enqueued) == (N // CHUNK, 0)
    with pytest.raises(ZoiError, match="already exists"):
        merge_run(run_dir, expected)  # not this run's file
    assert merge_run(run_dir, out, MergeOptions(id_start=7)).records == merged.records
    assert out.read_text(encoding="utf-8").startswith('{"id":"record_7",')  # its own file, again


def test_generate_writes_what_merge_writes_with_every_output_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signals: None
) -> None:
    """`zoi generate`, `zoi merge` of a run of the same config and `zoi run`, each with
    `--format messages --with-meta --dedup --id-start 3`: the same bytes (one encoder)."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    same = "flatten|case=dup 何度も出てくる同じ質問です"
    config = write_config(tmp_path, f"    dup: {{flatten: '{same}'}}\n")
    cases = ["ok", "dup", "final", "dup", "short", "ok"]  # `dup`: the same question every time
    lines = (f"質問 {i} case={case}\n" for i, case in enumerate(cases))
    (tmp_path / "prompts.txt").write_text("".join(lines), encoding="utf-8")
    chosen = ["--format", "messages", "--with-meta", "--dedup", "--id-start", "3"]
    generated, merged = tmp_path / "generated.jsonl", tmp_path / "merged.jsonl"
    base = ["-c", str(config)]
    said = cli("generate", *base, "--start", "0", "--end", str(N), "-o", str(generated), *chosen)
    run_dir = tmp_path / "run"
    cli("enqueue", *base, "--run", str(run_dir), "--num-prompts", str(N), "--chunk-size", "4")
    assert machine.work(run_dir, burst=True, heartbeat=0.3, heartbeat_ttl=2, janitor=0.5)
    told = cli("merge", "--run", str(run_dir), "-o", str(merged), *chosen)
    ran = tmp_path / "ran.jsonl"
    run_said = cli(
        "run", *base, "--num-prompts", str(N), "--chunk-size", "4", "-o", str(ran), *chosen
    )

    assert generated.read_bytes() == merged.read_bytes() == ran.read_bytes()
    records = [json.loads(line) for line in generated.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == [f"record_{3 + i}" for i in range(len(records))]
    assert all(list(r) == ["id", "messages", "meta"] for r in records)
    questions = [r["messages"][1]["content"] for r in records]
    assert len(set(questions)) == len(questions)
    assert questions.count(same) == 1 and len(questions) > 1
    dropped = N // 3 - 1  # two of every six prompts are dup; each after the first repeats
    assert f"wrote     {len(records)} records to {generated} ({dropped} duplicate" in said
    assert f"{len(records)} records," in told and f"({dropped} duplicate questions" in told
    assert f"wrote     {len(records)} records to {ran} (run directory" in run_said
    assert f"({dropped} duplicate questions dropped)" in run_said


def cli(*args: str) -> str:
    """A command in this process; its stdout."""
    result = zoi(*args)
    assert result.exit_code == 0, (args, result.stdout, result.stderr)
    return result.stdout
