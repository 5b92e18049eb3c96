"""`zoi run` under faults: it never hangs, never leaves processes behind, and says what it did.

Each test starts `zoi run` as a subprocess and breaks something underneath it: Redis wiped or
killed, a shard damaged, a stray marker, the launcher itself killed or hung up, a worker that
refuses its input, a prompt that breaks the engine, a hostile module in the working directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from zero_one_instruction import shards
from zero_one_instruction.pipeline import Outcome
from zero_one_instruction.rundir import Chunk, open_run

from . import queue_helpers
from .queue_helpers import ENV, ZOI, enqueue_run, ok, scripted_config, thin_config, wait_until

N = 60
CHUNK = 5


@pytest.fixture
def reference(tmp_path: Path) -> tuple[Path, Path]:
    """A slow scripted config (so a run lasts long enough to break things under it) and
    `zoi generate`'s output for [0, N)."""
    config = scripted_config(tmp_path, delay=0.08)
    out = tmp_path / "reference.jsonl"
    ok("generate", "-c", str(config), "--start", "0", "--end", str(N), "-o", str(out))
    return config, out


def run_args(config: Path, out: Path, *extra: str) -> list[str]:
    return queue_helpers.run_args(config, out, N, CHUNK, *extra)


_launched: list[subprocess.Popen[str]] = []


def launch(*args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [ZOI, *args],
        env=ENV,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _launched.append(process)
    return process


@pytest.fixture(autouse=True)
def no_launcher_left(tmp_path: Path) -> Iterator[None]:
    """A launcher that hung (the bug a test is about) is stopped with its workers and its
    run's server, so a failing test leaves nothing running."""
    yield
    for record in tmp_path.glob("**/redis/server.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, psutil.Error):
            server = psutil.Process(int(json.loads(record.read_text())["pid"]))
            if "valkey" in server.name():
                server.kill()
    while _launched:
        process = _launched.pop()
        if process.poll() is None:
            workers = workers_of(process)
            process.kill()
            process.communicate()
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def markers(run: Path) -> list[Path]:
    return sorted((run / "shards").glob("*.done"))


def server_pid(run: Path) -> int:
    return int(json.loads((run / "redis" / "server.json").read_text())["pid"])


def server_socket(run: Path) -> str:
    return str(json.loads((run / "redis" / "server.json").read_text())["socket"])


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def strays() -> Iterator[list[int]]:
    """Processes a test started indirectly (workers, servers): killed at the end if a test
    failed to see them stop, so a failure never leaves them running."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue


def workers_of(launcher: subprocess.Popen[str]) -> list[int]:
    found = []
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(launcher.pid).children():
            with contextlib.suppress(psutil.Error):
                if child.status() != psutil.STATUS_ZOMBIE:
                    found.append(child.pid)
    return found


# --- B9-B11: the launcher reconciles the queue with the shards ---------------------------------
def test_redis_wiped_mid_run_is_requeued_and_the_run_completes(reference, tmp_path: Path) -> None:
    config, expected = reference
    out = tmp_path / "out.jsonl"
    run = Path(f"{out}.run")
    launcher = launch(*run_args(config, out))
    wait_until(lambda: len(markers(run)) >= 2, timeout=90, what="2 chunks")
    client = redis.Redis(unix_socket_path=server_socket(run))
    client.flushall()
    client.close()
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, err
    assert "chunks again that the queue had lost" in err
    assert out.read_bytes() == expected.read_bytes()


def test_shard_damaged_mid_run_is_set_aside_named_and_redone(reference, tmp_path: Path) -> None:
    config, expected = reference
    out = tmp_path / "out.jsonl"
    run = Path(f"{out}.run")
    launcher = launch(*run_args(config, out))
    wait_until(lambda: len(markers(run)) >= 1, timeout=90, what="a chunk")
    victim = markers(run)[0].name.removesuffix(".done")
    records = run / "shards" / f"{victim}.jsonl"
    records.write_bytes(records.read_bytes()[:-10])
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, err
    assert f"set aside damaged chunk {victim}: {victim}.jsonl has" in err
    assert out.read_bytes() == expected.read_bytes()


def test_damaged_shard_found_on_resume_is_named(reference, tmp_path: Path) -> None:
    config, expected = reference
    out = tmp_path / "out.jsonl"
    run = Path(f"{out}.run")
    ok(*run_args(config, out))
    victim = markers(run)[3].name.removesuffix(".done")
    (run / "shards" / f"{victim}.meta.jsonl").write_text("", encoding="utf-8")
    again = tmp_path / "again.jsonl"
    done = subprocess.run(
        [ZOI, *run_args(config, again, "--run", str(run))],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"set aside damaged chunk {victim}: {victim}.meta.jsonl has 0 bytes" in done.stderr
    assert again.read_bytes() == expected.read_bytes()


def test_markers_outside_the_chunk_grid_are_not_counted(reference, tmp_path: Path) -> None:
    """Valid shards of this very run (its fingerprint, files that match their checksums) for
    chunks that are not in its grid: only the grid check can keep them out of the count, and
    counting them ("chunks 3/2") made the launcher wait forever."""
    config, expected = reference
    out = tmp_path / "out.jsonl"
    run = Path(f"{out}.run")
    enqueue_run(config, run, N, CHUNK)
    opened = open_run(run)
    for start in (N, 2):  # past the end, and off the grid
        chunk = Chunk(start, start + CHUNK)
        outcomes = [
            Outcome(index=i, base_prompt="", question=f"q{i}", answer=f"a{i}")
            for i in range(chunk.start, chunk.end)
        ]
        shards.write_chunk(opened, chunk, outcomes, "system", {"worker": "stray"})
        assert shards.read_marker(opened, chunk)[1] is None  # valid but for the grid
    done = subprocess.run(
        [ZOI, *run_args(config, out)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == expected.read_bytes()


# --- B12, B13: the launcher's death stops its workers; the server's death does not stop it ---
def _midrun(
    config: Path, out: Path, strays: list[int]
) -> tuple[subprocess.Popen[str], list[int], int]:
    """`zoi run` with its first chunk done: the launcher, its workers and its server (all
    noted as strays, killed at the end if the test fails to see them stop)."""
    run = Path(f"{out}.run")
    launcher = launch(*run_args(config, out))
    wait_until(lambda: len(markers(run)) >= 1, timeout=90, what="a chunk")
    workers, server = workers_of(launcher), server_pid(run)
    strays += [*workers, server]
    return launcher, workers, server


def _wait_all_gone(workers: list[int], server: int) -> None:
    wait_until(lambda: all(gone(pid) for pid in workers), timeout=60, what="workers to stop")
    wait_until(lambda: gone(server), timeout=60, what="the embedded server to stop")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP])
def test_launcher_killed_or_hung_up_leaves_no_worker_or_server(
    reference, tmp_path: Path, sig: int, strays: list[int]
) -> None:
    config, expected = reference
    out = tmp_path / "out.jsonl"
    launcher, workers, server = _midrun(config, out, strays)
    assert workers
    launcher.send_signal(sig)
    _, err = launcher.communicate(timeout=120)
    _wait_all_gone(workers, server)
    if sig == signal.SIGHUP:
        assert launcher.returncode == 129, err
        assert "zoi: error: hung up" in err
    assert not out.exists()
    assert ok(*run_args(config, out))  # and the run resumes
    assert out.read_bytes() == expected.read_bytes()


def test_launcher_killed_while_requests_wait_stops_its_workers_at_once(
    tmp_path: Path, strays: list[int]
) -> None:
    """A cold stop abandons the chunks in hand: workers whose requests wait on a server that
    does not answer (a gate, here) stop when their launcher dies, not when the requests give
    up (with engine openai, after the retry deadline: ten minutes by default). The chunks go
    back to the queue, and the run resumes."""
    gate = tmp_path / "gate"
    config = thin_config(tmp_path, gate=gate)
    reference = tmp_path / "reference.jsonl"
    ok("generate", "-c", str(config), "--start", "0", "--end", str(N), "-o", str(reference))
    gate.touch()
    out = tmp_path / "out.jsonl"
    launcher = launch(*run_args(config, out, "--workers", "2"))
    met = Path(f"{gate}.met")
    wait_until(met.exists, timeout=90, what="a request waiting at the gate")
    workers, server = workers_of(launcher), server_pid(Path(f"{out}.run"))
    strays += [*workers, server]
    assert workers
    launcher.kill()
    launcher.communicate(timeout=60)
    wait_until(lambda: all(gone(pid) for pid in workers), timeout=60, what="workers to stop")
    wait_until(lambda: gone(server), timeout=30, what="the embedded server to stop")
    gate.unlink()
    assert ok(*run_args(config, out))
    assert out.read_bytes() == reference.read_bytes()


FINALISER_STOP = """
import os, signal, time, weakref
from zero_one_instruction import worker
worker.exit_with_parent(os.getppid())
class Thing:
    pass
def finaliser(_):
    os.kill(os.getpid(), signal.SIGHUP)  # the stop lands in a weakref callback, which drops it
    time.sleep(0.2)
thing = Thing()
ref = weakref.ref(thing, finaliser)
del thing
try:
    time.sleep(20)
except SystemExit:
    print("stopped", flush=True)
    raise
print("ran on")
"""


def test_a_stop_that_lands_in_a_finaliser_is_sent_again() -> None:
    """A signal's handler runs wherever the main thread is; in a finaliser Python drops the
    SystemExit it raises, and a worker in CI ran on with its launcher gone, waiting for its
    chunks without end. The dropped stop is sent again."""
    done = subprocess.run(
        [sys.executable, "-c", FINALISER_STOP], env=ENV, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout) == (1, "stopped\n"), done.stderr
    assert "the stop landed in a finaliser, which dropped it: stopping again" in done.stderr


def test_run_directory_removed_mid_run_is_one_line_and_leaves_nothing_running(
    reference, tmp_path: Path, strays: list[int]
) -> None:
    config, _ = reference
    out = tmp_path / "out.jsonl"
    run = Path(f"{out}.run")
    launcher, workers, server = _midrun(config, out, strays)
    shutil.rmtree(run)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 1, err
    lines = [line for line in err.splitlines() if line.startswith("zoi: error:")]
    assert lines == [f"zoi: error: {run}: the run directory was removed during the run"], err
    assert "Traceback" not in err
    _wait_all_gone(workers, server)


def test_killed_embedded_server_is_revived_and_the_run_completes(reference, tmp_path: Path) -> None:
    config, expected = reference
    out = tmp_path / "out.jsonl"
    run = Path(f"{out}.run")
    launcher = launch(*run_args(config, out))
    wait_until(lambda: len(markers(run)) >= 1, timeout=90, what="a chunk")
    os.kill(server_pid(run), signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, err
    assert out.read_bytes() == expected.read_bytes()


# --- C15: the working directory is not on the workers' import path ------------------------
HOSTILE = "import pathlib\npathlib.Path({sentinel!r}).write_text('ran')\nraise SystemExit(3)\n"


def test_a_module_in_the_working_directory_does_not_reach_the_workers(
    reference, tmp_path: Path
) -> None:
    config, expected = reference
    cwd, sentinel = tmp_path / "cwd", tmp_path / "hostile-code-ran"
    cwd.mkdir()
    (cwd / "yaml.py").write_text(HOSTILE.format(sentinel=str(sentinel)), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    launcher = launch(*run_args(config, out), cwd=cwd)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, err
    assert not sentinel.exists()
    assert out.read_bytes() == expected.read_bytes()


@pytest.mark.parametrize("version", [(3, 10), (3, 11)])
def test_worker_command_skips_the_working_directory_on_every_python(
    tmp_path: Path, version: tuple[int, int]
) -> None:
    """The 3.10 bootstrap is exercised on whatever Python runs the tests."""
    from zero_one_instruction.safepath import python_module

    sentinel = tmp_path / "hostile-code-ran"
    (tmp_path / "click.py").write_text(HOSTILE.format(sentinel=str(sentinel)), encoding="utf-8")
    done = subprocess.run(
        [*python_module("zero_one_instruction", version), "--version"],
        env=ENV,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("zoi, version")
    assert not sentinel.exists()


def test_the_engine_reaper_does_not_import_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reaper that a worker starts for its engine is a process of its own, too."""
    from zero_one_instruction.engines.reaper import guard_children

    sentinel = tmp_path / "hostile-code-ran"
    (tmp_path / "psutil.py").write_text(HOSTILE.format(sentinel=str(sentinel)), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])
    guard_children().release()  # returns once the reaper has looked at the children and left
    assert not sentinel.exists()


# --- E: clear errors, not restarts and riddles ---------------------------------------------
def test_worker_user_error_stops_the_run_with_its_own_message(tmp_path: Path) -> None:
    config = tmp_path / "refused.yml"
    config.write_text(
        "model_name: m\nengine: 'tests.scripted_engine:ScriptedEngine'\n"
        "engine_kwargs: {refuse: 'unknown argument max_num_seq'}\n",
        encoding="utf-8",
    )
    out = tmp_path / "out.jsonl"
    launcher = launch("run", "-c", str(config), "--num-prompts", "4", "-o", str(out))
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 2, err
    lines = err.strip().splitlines()
    assert lines[-1] == "zoi: error: worker cpu0: engine_kwargs: unknown argument max_num_seq"
    assert "restarting" not in err
    assert not any(line.startswith("zoi: error:") for line in lines[:-1])


def test_one_group_refusing_leaves_the_other_groups_working(tmp_path: Path) -> None:
    """A refusal may be one group's own trouble (its GPU): that group is given up with its
    line, and the other groups finish the run."""
    config = tmp_path / "one-refuses.yml"
    config.write_text(
        "model_name: m\nengine: 'tests.scripted_engine:ScriptedEngine'\n"
        "engine_kwargs: {refuse: 'this GPU is broken', refuse_on: '1', delay: 0.3}\n",
        encoding="utf-8",
    )
    out = tmp_path / "out.jsonl"
    env = {**ENV, "CUDA_VISIBLE_DEVICES": "0,1"}
    done = subprocess.run(
        [
            ZOI,
            "run",
            "-c",
            str(config),
            "--num-prompts",
            "16",
            "--chunk-size",
            "2",
            "--tp",
            "1",
            "-o",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "engine_kwargs: this GPU is broken; giving worker" in done.stderr
    assert len(out.read_text(encoding="utf-8").splitlines()) == 16


def _run_with_a_bad_prompt(
    tmp_path: Path, bad: int, rule: str, extra: str = ""
) -> tuple[Path, str]:
    """`zoi run` over 15 prompts in chunks of 5 where prompt `bad` meets the scripted `rule`;
    the output path and the run's last line, which must be a failure (exit 1)."""
    config = tmp_path / "bug.yml"
    config.write_text(
        "model_name: m\nengine: 'tests.scripted_engine:ScriptedEngine'\n"
        f"prompts: {{file: p.txt}}\n{extra}engine_kwargs: {{rules: {{bug: {rule}}}}}\n",
        encoding="utf-8",
    )
    cases = ["case=ok"] * 15
    cases[bad] = "case=bug"
    (tmp_path / "p.txt").write_text("\n".join(cases) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    launcher = launch(
        "run", "-c", str(config), "--num-prompts", "15", "--chunk-size", "5", "-o", str(out)
    )
    _, err = launcher.communicate(timeout=240)
    assert launcher.returncode == 1, err
    return out, err.strip().splitlines()[-1]


def test_a_chunk_that_keeps_failing_is_named_with_the_way_out(tmp_path: Path) -> None:
    out, last = _run_with_a_bad_prompt(tmp_path, 7, "{depth: '!raise'}")
    assert last.startswith("zoi: error: chunks [5, 10) keep failing"), last
    assert "2 of 3 chunks are done" in last
    assert f"zoi merge --run {out}.run -o {out} --allow-partial" in last
    partial = tmp_path / "partial.jsonl"
    ok("merge", "--run", f"{out}.run", "-o", str(partial), "--allow-partial")
    assert len(partial.read_text(encoding="utf-8").splitlines()) == 10


def test_a_prompt_that_kills_the_engine_is_named_with_the_way_out(tmp_path: Path) -> None:
    """Every worker dies on the chunk before it runs out of retries, so the group is given
    up: the message gives the dying worker's own line, which names the chunks it had in hand,
    and the merge that writes the rest."""
    extra = "pipeline: {concurrency: 5}\n"
    out, last = _run_with_a_bad_prompt(tmp_path, 12, "{width: '!dead'}", extra)
    assert last.startswith("zoi: error: every worker kept failing"), last
    held = re.search(r"the engine died: .*\(chunks in hand: (.*)\)", last)
    assert held, last
    ranges = [tuple(map(int, r)) for r in re.findall(r"\[(\d+), (\d+)\)", held.group(1))]
    assert any(a <= 12 < b for a, b in ranges), last  # the deadly prompt's chunk is named
    assert f"zoi merge --run {out}.run -o {out} --allow-partial" in last


def test_two_launchers_never_share_a_worker_log(reference, tmp_path: Path) -> None:
    config, expected = reference
    run = tmp_path / "shared.run"
    first = launch(*run_args(config, tmp_path / "a.jsonl", "--run", str(run)))
    second = launch(*run_args(config, tmp_path / "b.jsonl", "--run", str(run)))
    for launcher in (first, second):
        _, err = launcher.communicate(timeout=120)
        assert launcher.returncode == 0, err
    logs = sorted((run / "logs").glob("worker-*.log"))
    assert len(logs) == 2, logs
    assert (tmp_path / "a.jsonl").read_bytes() == expected.read_bytes()
    assert (tmp_path / "b.jsonl").read_bytes() == expected.read_bytes()
