"""The embedded Valkey server's life: started once per run, reused across processes and
environments, stopped by the last zoi process to leave, and never doubled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from zero_one_instruction.broker import SERVER_FILE, embedded, release, url_path

from .queue_helpers import ENV

HOLD = """
import sys, time
from pathlib import Path
from zero_one_instruction.broker import embedded
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
