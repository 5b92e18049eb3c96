"""The embedded Valkey server's life: started once per run, reused across processes and
environments, stopped by the last zoi process to leave, and never doubled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from zero_one_instruction.embeddedredis import SERVER_FILE, embedded, release, url_path
from zero_one_instruction.worker import worker_name

from .queue_helpers import ENV

HOLD = """
import sys, time
from pathlib import Path
from zero_one_instruction.embeddedredis import embedded
client = embedded(Path(sys.argv[1]), "holder")
print(client.info("server")["process_id"], flush=True)
time.sleep(float(sys.argv[2]))
"""


def holder(
    run: Path, seconds: float, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run), str(seconds)],
        env=env or ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def alive(pid: int) -> bool:
    try:
        return "valkey" in Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return False


def test_reused_across_processes_and_stopped_by_the_last(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc, pid = holder(run, 30)
    try:
        mine = embedded(run, "test")
        assert int(mine.info("server")["process_id"]) == pid  # reused, not a second server
        release(mine, run)
        assert alive(pid), "another zoi process is connected: the server must stay"
    finally:
        proc.kill()
        proc.wait()
    last = embedded(run, "test")
    sock = Path(url_path(last))
    release(last, run)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid) and not sock.exists()
    assert not (run / "redis" / SERVER_FILE).exists()


def test_a_connection_renamed_by_rq_does_not_keep_the_server_running(tmp_path: Path) -> None:
    """RQ names one pooled connection after its worker (`zoi-<host>-<pid>-<random>`): still
    open when the worker leaves, it must not count as another zoi process."""
    run = tmp_path / "run"
    client = embedded(run, "worker")
    pid = int(client.info("server")["process_id"])
    sock = Path(url_path(client))
    renamed = client.connection_pool.get_connection()
    renamed.send_command("CLIENT", "SETNAME", worker_name(None))
    assert renamed.read_response() in (b"OK", "OK")
    client.connection_pool.release(renamed)
    client.ping()  # another connection of the pool stays open with the renamed one
    release(client, run)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid) and not sock.exists()


def test_another_environment_finds_the_same_server(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc, pid = holder(run, 30)
    try:
        other = tmp_path / "xdg"
        other.mkdir(mode=0o700)
        env = {**ENV, "XDG_RUNTIME_DIR": str(other)}
        second, second_pid = holder(run, 1, env)
        second.wait()
        assert second_pid == pid, "a different socket directory must not start a second server"
    finally:
        proc.kill()
        proc.wait()
        release(embedded(run, "test"), run)


def test_a_stale_record_starts_a_fresh_server(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "redis").mkdir(parents=True)
    stale = {"host": os.uname().nodename, "pid": 999999, "socket": str(tmp_path / "gone.sock")}
    (run / "redis" / SERVER_FILE).write_text(json.dumps(stale), encoding="utf-8")
    client = embedded(run, "test")
    try:
        assert client.ping()
        record = json.loads((run / "redis" / SERVER_FILE).read_text(encoding="utf-8"))
        assert record["pid"] == int(client.info("server")["process_id"]) != 999999
    finally:
        release(client, run)


def test_a_worker_restarts_an_embedded_server_that_died_under_it(tmp_path: Path) -> None:
    from .queue_helpers import FAST, ZOI, enqueue_run, ok, scripted_config, wait_until

    config = scripted_config(tmp_path, delay=0.05)
    reference = tmp_path / "reference.jsonl"
    ok("generate", "-c", str(config), "--start", "0", "--end", "60", "-o", str(reference))
    run = tmp_path / "run"
    enqueue_run(config, run, 60, 5)
    worker = subprocess.Popen(
        [ZOI, "worker", "--run", str(run), "--burst", *FAST],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    record = run / "redis" / SERVER_FILE
    wait_until(lambda: any(run.glob("shards/*.done")), timeout=60, what="a first chunk")
    first = json.loads(record.read_text())["pid"]
    os.kill(int(first), 9)
    _, err = worker.communicate(timeout=180)
    assert worker.returncode == 0, err
    assert "Redis is unreachable" in err
    merged = tmp_path / "merged.jsonl"
    ok("merge", "--run", str(run), "-o", str(merged))
    assert merged.read_bytes() == reference.read_bytes()


def test_run_paths_with_spaces_quotes_and_odd_bytes(tmp_path: Path) -> None:
    """The server's config names the run directory: every byte of it must survive."""
    names = ["a b", "q\"uo'te", "back\\slash x", "new\nline", "日本 語 #x", os.fsdecode(b"b\xffd")]
    for name in names:
        run = tmp_path / name / "run"
        client = embedded(run, "test")
        try:
            assert client.ping()  # its append-only data and log landed in this very directory
            assert (run / "redis" / "appendonlydir").is_dir()
            assert (run / "redis" / "valkey.log").stat().st_size > 0
        finally:
            release(client, run)


def test_enqueue_into_a_run_directory_with_a_space(tmp_path: Path) -> None:
    from .queue_helpers import enqueue_run, scripted_config

    run = tmp_path / "my runs" / "first run"
    out = enqueue_run(scripted_config(tmp_path), run, 10, 5)
    assert "enqueued 2" in out


def test_zoi_run_with_an_output_path_with_a_space_and_a_hash(tmp_path: Path) -> None:
    from .queue_helpers import ok, scripted_config

    config = str(scripted_config(tmp_path))
    reference = tmp_path / "reference.jsonl"
    ok("generate", "-c", config, "--start", "0", "--end", "10", "-o", str(reference))
    (tmp_path / "my runs #1").mkdir()
    output = tmp_path / "my runs #1" / "out put.jsonl"
    ok("run", "-c", config, "-o", str(output), "--num-prompts", "10", "--chunk-size", "5")
    assert output.read_bytes() == reference.read_bytes()


def _fake_record(run: Path, host: str, pid: int, sock: Path) -> None:
    record = {"host": host, "pid": pid, "socket": str(sock)}
    (run / "redis" / SERVER_FILE).write_text(json.dumps(record), encoding="utf-8")


def test_resume_in_a_new_container_starts_a_fresh_server(tmp_path: Path) -> None:
    """The record names a host (a container) that is gone, and its server with it."""
    run = tmp_path / "run"
    (run / "redis").mkdir(parents=True)
    _fake_record(run, "old-container-4f2a", 4242, tmp_path / "gone.sock")
    client = embedded(run, "test")
    try:
        assert client.ping()
        record = json.loads((run / "redis" / SERVER_FILE).read_text(encoding="utf-8"))
        assert record["host"] == os.uname().nodename
        assert record["pid"] == int(client.info("server")["process_id"])
    finally:
        release(client, run)


def test_after_a_reboot_a_reused_pid_is_not_taken_for_the_server(tmp_path: Path) -> None:
    """This host, but the recorded pid now belongs to another valkey (another run's)."""
    other = tmp_path / "other"
    stranger = embedded(other, "test")
    try:
        stranger_pid = int(stranger.info("server")["process_id"])
        run = tmp_path / "run"
        first = embedded(run, "test")
        release(first, run)  # a previous life of the run: its lock file exists, its server is gone
        _fake_record(run, os.uname().nodename, stranger_pid, tmp_path / "gone.sock")
        client = embedded(run, "test")
        try:
            assert int(client.info("server")["process_id"]) != stranger_pid
        finally:
            release(client, run)
    finally:
        release(stranger, other)


def test_a_live_server_on_another_host_is_never_doubled(tmp_path: Path) -> None:
    """A server that holds the run's lock but cannot be reached from here (another host on
    a shared file system): refused, not a second server on its append-only file."""
    from zero_one_instruction.brokererrors import BrokerError

    run = tmp_path / "run"
    proc, pid = holder(run, 30)
    real = (run / "redis" / SERVER_FILE).read_text(encoding="utf-8")
    try:
        _fake_record(run, "node-17", pid, tmp_path / "elsewhere.sock")
        try:
            embedded(run, "test")
        except BrokerError as exc:
            assert "node-17" in str(exc) and "--redis-url" in str(exc)
        else:
            raise AssertionError("a second server was started beside a live one")
        assert alive(pid)
    finally:
        proc.kill()
        proc.wait()
        (run / "redis" / SERVER_FILE).write_text(real, encoding="utf-8")
        release(embedded(run, "test"), run)
    assert not (run / "redis" / SERVER_FILE).exists(), "the one server was stopped"


def _damage_append_only_file(run: Path) -> Path:
    incr = next((run / "redis" / "appendonlydir").glob("*.incr.aof"))
    data = bytearray(incr.read_bytes())
    command = data.index(b"\r\n*", len(data) // 2) + 2  # a command's header, mid-file
    data[command] = ord("X")
    incr.write_bytes(bytes(data))
    return incr


def test_a_damaged_append_only_file_is_set_aside_and_the_queue_rebuilt(tmp_path: Path) -> None:
    from .queue_helpers import FAST, ZOI, enqueue_run, ok, scripted_config, zoi

    config = scripted_config(tmp_path)
    run = tmp_path / "run"
    enqueue_run(config, run, 20, 5)
    damaged = _damage_append_only_file(run).read_bytes()
    status = zoi("status", "--run", str(run))
    assert status.returncode == 0, status.stderr
    warnings = [line for line in status.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and "set aside" in warnings[0], status.stderr
    assert "valkey-check-aof" not in warnings[0] and "zoi enqueue" in warnings[0]
    aside = list((run / "redis").glob("appendonlydir.damaged-*"))
    assert len(aside) == 1 and next(aside[0].glob("*.incr.aof")).read_bytes() == damaged
    assert "missing 4" in status.stdout
    assert "enqueued 4" in enqueue_run(config, run, 20, 5)
    burst = subprocess.run(
        [ZOI, "worker", "--run", str(run), "--burst", *FAST],
        env=ENV,
        capture_output=True,
        timeout=180,
    )
    assert burst.returncode == 0, burst.stderr
    ok("merge", "--run", str(run), "-o", str(tmp_path / "out.jsonl"))


def test_a_start_failure_that_is_not_the_data_leaves_it_alone(tmp_path: Path) -> None:
    from zero_one_instruction.brokererrors import BrokerError

    run = tmp_path / "run"
    release(embedded(run, "test"), run)
    before = sorted(p.name for p in (run / "redis" / "appendonlydir").iterdir())
    (run / "redis" / "valkey.log").unlink()
    (run / "redis" / "valkey.log").mkdir()  # the server cannot open its log: not a data problem
    try:
        embedded(run, "test")
    except BrokerError as exc:
        assert "did not start" in str(exc)
    else:
        raise AssertionError("the server started without its log file")
    assert sorted(p.name for p in (run / "redis" / "appendonlydir").iterdir()) == before
    assert not list((run / "redis").glob("appendonlydir.damaged-*"))
