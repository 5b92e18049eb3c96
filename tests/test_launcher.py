"""`zoi run`: GPU groups, spawned workers' environment, supervision, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from zero_one_instruction.gpus import GpuError, cuda_environment, groups, select
from zero_one_instruction.workerplan import plan

from . import queue_helpers
from .clitools import assert_one_line_error, zoi
from .queue_helpers import (
    ENV,
    ZOI,
    ok,
    requests_per_seed,
    scripted_config,
    wait_until,
    workers_of,
)

GPUS = [str(i) for i in range(8)]


@pytest.mark.parametrize(
    ("count", "sizes"),
    [(1, [1]), (2, [2]), (3, [2, 1]), (4, [4]), (5, [4, 1]), (6, [4, 2]), (7, [4, 2, 1]), (8, [8])],
)
def test_default_groups_follow_the_original_power_of_two_split(
    count: int, sizes: list[int]
) -> None:
    found, idle = groups(GPUS[:count], None)
    assert [len(g) for g in found] == sizes and idle == []
    assert [gpu for group in found for gpu in group] == GPUS[:count]  # contiguous, each once


@pytest.mark.parametrize(
    ("count", "tp", "sizes", "idle"),
    [
        (1, 1, [1], 0),
        (4, 1, [1, 1, 1, 1], 0),
        (4, 2, [2, 2], 0),
        (5, 2, [2, 2], 1),
        (7, 2, [2, 2, 2], 1),
        (8, 3, [3, 3], 2),
        (6, 4, [4], 2),
        (8, 8, [8], 0),
    ],
)
def test_tp_groups_leave_the_remainder_idle(
    count: int, tp: int, sizes: list[int], idle: int
) -> None:
    found, left = groups(GPUS[:count], tp)
    assert [len(g) for g in found] == sizes
    assert left == GPUS[count - idle : count]


def test_plans_give_each_worker_its_gpus_and_tp() -> None:
    specs = plan(groups(GPUS[:7], None)[0])
    assert [(s.gpus, s.tp) for s in specs] == [
        (("0", "1", "2", "3"), 4),
        (("4", "5"), 2),
        (("6",), 1),
    ]
    env = specs[1].environment({"PATH": "/bin"}, "unix:///tmp/x.sock")
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5" and env["ZOI_REDIS_URL"] == "unix:///tmp/x.sock"
    assert "--tp" in specs[1].command(Path("run"), 10.0)
    assert (
        specs[1].command(Path("run"), 10.0)[specs[1].command(Path("run"), 10.0).index("--tp") + 1]
        == "2"
    )
    cpu = plan([])
    assert [(s.name, s.gpus, s.tp) for s in cpu] == [("cpu0", (), 1)]
    assert "CUDA_VISIBLE_DEVICES" not in cpu[0].environment({}, "redis://h")


def test_a_gpu_group_environment_numbers_gpus_as_nvidia_smi_does() -> None:
    """One definition for the launcher's workers and `zoi worker --gpus`: PCI bus order, the
    order `visible_gpus` lists (CUDA's own default is fastest first)."""
    assert cuda_environment(["4", "5"]) == {
        "CUDA_VISIBLE_DEVICES": "4,5",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }
    assert cuda_environment(()) == {}  # a CPU worker keeps what it was given
    spec = plan([["4", "5"]])[0]
    env = spec.environment({"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}, None)
    assert env.items() >= cuda_environment(["4", "5"]).items()


def test_gpu_selection_errors() -> None:
    with pytest.raises(GpuError, match="GPU 9 does not exist"):
        select(GPUS[:2], "0,9", None)
    with pytest.raises(GpuError, match="only 2 GPUs visible"):
        select(GPUS[:2], None, 3)
    with pytest.raises(GpuError, match="listed twice"):
        select(GPUS[:2], "1,1", None)
    with pytest.raises(GpuError, match="--tp 4 is larger than the GPU count"):
        groups(GPUS[:2], 4)
    assert select(GPUS[:4], "2,0", None) == ["2", "0"]
    assert select(GPUS[:4], None, 3) == ["0", "1", "2"]


N = 60


@pytest.fixture
def reference(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """A scripted config that logs requests and worker environments, and `zoi generate`'s
    output for [0, N)."""
    log, env_log = tmp_path / "requests.log", tmp_path / "env.log"
    config = scripted_config(tmp_path, delay=0.08, log=log, env_log=env_log)
    out = tmp_path / "reference.jsonl"
    ok("generate", "-c", str(config), "--start", "0", "--end", str(N), "-o", str(out))
    log.unlink()
    env_log.unlink()
    return config, out, log, env_log


def run_args(config: Path, out: Path, *extra: str) -> list[str]:
    return queue_helpers.run_args(config, out, N, 5, *extra)


def test_run_spawns_one_worker_per_group_with_its_environment(reference, tmp_path: Path) -> None:
    config, expected, _, env_log = reference
    out = tmp_path / "out.jsonl"
    env = {**ENV, "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6"}
    done = subprocess.run(
        [ZOI, *run_args(config, out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == expected.read_bytes()
    seen = sorted((e["cuda"], e["tp"]) for e in map(json.loads, env_log.read_text().splitlines()))
    assert seen == [("0,1,2,3", 4), ("4,5", 2), ("6", 1)]
    assert f"wrote     {len(expected.read_text().splitlines())} records" in done.stdout
    env_log.unlink()
    again = subprocess.run(
        [ZOI, *run_args(config, tmp_path / "b.jsonl", "--tp", "2")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert "GPUs 6 stay idle" in again.stderr
    seen = sorted((e["cuda"], e["tp"]) for e in map(json.loads, env_log.read_text().splitlines()))
    assert seen == [("0,1", 2), ("2,3", 2), ("4,5", 2)]


def test_killed_worker_is_restarted_and_the_run_completes(reference, tmp_path: Path) -> None:
    config, expected, log, _ = reference
    out = tmp_path / "out.jsonl"
    launcher = subprocess.Popen(
        [ZOI, *run_args(config, out)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(lambda: requests_per_seed(log), timeout=60, what="work to start")
    victim = workers_of(launcher.pid)[0]
    victim.send_signal(signal.SIGKILL)
    wait_until(
        lambda: (
            any(p.pid != victim.pid for p in workers_of(launcher.pid))
            or launcher.poll() is not None
        ),
        timeout=30,
        what="a new worker",
    )
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err
    assert "exited with code -9; restarting" in err
    assert out.read_bytes() == expected.read_bytes()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupt_then_rerun_resumes_without_redoing_chunks(reference, tmp_path: Path) -> None:
    config, expected, log, _ = reference
    out = tmp_path / "out.jsonl"
    launcher = subprocess.Popen(
        [ZOI, *run_args(config, out)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as a terminal sends it: a test run started in the background (nohup, `&`
        # in a script) ignores SIGINT, and its children would inherit that and never stop.
        preexec_fn=_default_sigint,
    )
    run = Path(f"{out}.run")
    wait_until(lambda: len(list((run / "shards").glob("*.done"))) >= 2, timeout=60, what="2 chunks")
    launcher.send_signal(signal.SIGINT)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, err
    assert "stopping: the chunks in hand finish" in err
    assert not out.exists()
    done_before = len(list((run / "shards").glob("*.done")))
    assert 2 <= done_before < N // 5
    assert ok(*run_args(config, out))
    assert out.read_bytes() == expected.read_bytes()
    counts = requests_per_seed(log)
    assert len(counts) == N and set(counts.values()) == {1}, "a done chunk ran again"
    began = time.monotonic()
    assert "wrote" in ok(*run_args(config, out))  # a finished run merges and returns at once
    assert time.monotonic() - began < 10


def test_run_never_overwrites_an_input_a_run_or_a_file_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("一つ目\n二つ目\n", encoding="utf-8")
    (tmp_path / "t.yml").write_text("{}\n", encoding="utf-8")
    config = scripted_config(tmp_path)
    config.write_text(
        config.read_text() + "prompts: {file: prompts.txt}\ntemplates: t.yml\n", encoding="utf-8"
    )
    precious = tmp_path / "precious.jsonl"
    precious.write_text("precious\n", encoding="utf-8")
    base = ["run", "-c", str(config), "--num-prompts", "4", "--chunk-size", "2"]
    victims = {
        config: "is the config file",
        tmp_path / "prompts.txt": "is the base-prompt file",
        tmp_path / "t.yml": "is the templates file",
    }
    before = {path: path.read_bytes() for path in [*victims, precious]}
    for victim, label in victims.items():
        for extra in ([], ["--overwrite"]):
            assert_one_line_error(zoi(*base, "-o", str(victim), *extra), label)
    assert_one_line_error(zoi(*base, "-o", str(precious)), "already exists", "--overwrite")
    run = tmp_path / "r"
    inside = zoi(*base, "--run", str(run), "-o", str(run / "out.jsonl"))
    assert_one_line_error(inside, "is inside the run directory")
    assert {path: path.read_bytes() for path in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["scripted.yml", "prompts.txt", "t.yml", "precious.jsonl"]
    )


def test_rerun_replaces_only_the_output_the_run_wrote(tmp_path: Path) -> None:
    config, out = scripted_config(tmp_path), tmp_path / "out.jsonl"
    args = ["run", "-c", str(config), "--num-prompts", "6", "--chunk-size", "3", "-o", str(out)]
    ok(*args)
    first = out.read_bytes()
    assert "wrote" in ok(*args)  # a finished run merges again over its own output
    assert out.read_bytes() == first
    out.write_bytes(first + b"edited by hand\n")
    assert_one_line_error(zoi(*args), "already exists", "--overwrite")
    assert out.read_bytes() == first + b"edited by hand\n"
    ok(*args, "--overwrite")
    assert out.read_bytes() == first


def test_bad_run_input_writes_nothing(tmp_path: Path) -> None:
    config, out = scripted_config(tmp_path), tmp_path / "out.jsonl"
    base = ["run", "-c", str(config), "-o", str(out)]
    assert_one_line_error(zoi(*base, "--num-prompts", "0"), "'--num-prompts'")
    missing = [
        "run",
        "-c",
        str(config),
        "-o",
        str(tmp_path / "no" / "o.jsonl"),
        "--num-prompts",
        "5",
    ]
    assert_one_line_error(zoi(*missing), "does not exist")
    os.environ["CUDA_VISIBLE_DEVICES"] = "0,1"
    try:
        assert_one_line_error(
            zoi(*base, "--num-prompts", "5", "--gpus", "0,7"), "GPU 7 does not exist"
        )
        assert_one_line_error(zoi(*base, "--num-prompts", "5", "--tp", "4"), "--tp 4 is larger")
        assert_one_line_error(zoi(*base, "--num-prompts", "5", "--num-gpus", "3"), "only 2 GPUs")
    finally:
        del os.environ["CUDA_VISIBLE_DEVICES"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scripted.yml"]
