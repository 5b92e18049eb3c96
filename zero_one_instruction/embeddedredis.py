"""The run's own Redis, for runs without a URL: started by the first command that needs it,
shared by the later ones, and stopped by the last zoi client to leave.

Its data sits in `RUN/redis` and it listens on a private unix socket only. A record
(`server.json`) names the host, pid and socket of the server that runs, so that a command in
another shell or environment finds that server instead of starting a second one on the same
append-only file; the lock the server holds for life (`valkeyserver`) tells a live record
from a stale one. Every zoi client is named after its process, so the last one to leave can
tell that it is the last and shut the server down, which flushes the append-only file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from .brokererrors import BrokerEnvironmentError, BrokerError, unwritable
from .valkeyserver import ALIVE_FILE, START_TIMEOUT, alive_lock, answers, shutdown, start, wait_for

# one logger for the broker, whichever of its modules warns (`zoi` shows the name)
log = logging.getLogger(__package__ + ".broker")

SERVER_FILE = "server.json"
CLIENT_PREFIX = "zoi"


def url_path(client: redis.Redis) -> str:
    """The unix socket a client talks to."""
    return str(client.connection_pool.connection_kwargs["path"])


# What `client_name` gives, and nothing else: the pid of the process that named it.
CLIENT_NAME = re.compile(rf"{CLIENT_PREFIX}-[a-z_]+-(\d+)")


def client_name(role: str) -> str:
    """The name every zoi client gives Redis, by which the last one to leave counts the others."""
    return f"{CLIENT_PREFIX}-{role}-{os.getpid()}"


def socket_path(run_path: Path) -> Path:
    """A short socket path for the run: unix sockets must be under 108 bytes, which a path
    inside a deep run directory easily is not."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"zoi-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    info = base.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        # a predictable name in a shared directory: someone else's would let them swap sockets
        raise BrokerError(f"{base} must be a directory owned by you with mode 700")
    digest = hashlib.sha256(os.fsencode(run_path.resolve())).hexdigest()[:16]
    return base / f"{digest}.sock"


@contextmanager
def _start_lock(data_dir: Path) -> Iterator[None]:
    """Serialises starting and stopping, so two commands never run two servers on one
    append-only file."""
    with (data_dir / "server.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _client(sock: Path, role: str) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(sock), client_name=client_name(role))


def _alive(pid: int) -> bool:
    """Whether `pid` is still a valkey server (not a stranger that reused the pid)."""
    try:
        return "valkey" in Path(f"/proc/{pid}/comm").read_text(encoding="utf-8")
    except OSError:
        try:
            os.kill(pid, 0)  # no /proc (macOS): trust the pid
        except (ProcessLookupError, PermissionError):
            return False
        return True


def _read_record(data_dir: Path) -> tuple[str, int, Path] | None:
    try:
        info = json.loads((data_dir / SERVER_FILE).read_text(encoding="utf-8"))
        return str(info["host"]), int(info["pid"]), Path(info["socket"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _recorded_server(data_dir: Path, run_path: Path, held: bool, legacy: bool) -> Path | None:
    """The socket of the server recorded for this run, if it still runs. Recorded, not
    recomputed: another shell's environment (XDG_RUNTIME_DIR, TMPDIR) would compute another
    socket path and start a second server on the same append-only file.

    `held`: a live server holds the alive lock. `legacy`: the lock file did not exist, so a
    server of an older zoi (which never took it) may be running: then the pid decides."""
    record = _read_record(data_dir)
    if held:
        if record is not None and (record[0] == socket.gethostname() or answers(record[2])):
            return record[2]
        if record is None:
            raise BrokerEnvironmentError(
                f"the embedded Redis of {run_path} is still running or shutting down but left "
                f"no {SERVER_FILE}; try again in a moment"
            )
        raise BrokerError(
            f"the embedded Redis of {run_path} is running on host {record[0]} (pid "
            f"{record[1]}) and cannot be reached from here; runs shared between hosts need "
            "--redis-url"
        )
    if record is None:
        return None
    host, pid, sock = record
    if answers(sock) is not False:
        return sock
    return sock if legacy and host == socket.gethostname() and _alive(pid) else None


def embedded(run_path: Path, role: str) -> redis.Redis:
    """A client of the run's own server, starting the server if nobody has."""
    data_dir = run_path.resolve() / "redis"
    try:
        return _embedded(data_dir, run_path, role)
    except OSError as exc:
        raise unwritable(data_dir, exc) from None


def _embedded(data_dir: Path, run_path: Path, role: str) -> redis.Redis:
    data_dir.mkdir(parents=True, exist_ok=True)
    with _start_lock(data_dir):
        legacy = not (data_dir / ALIVE_FILE).exists()
        with alive_lock(data_dir) as alive_fd:
            running = _recorded_server(data_dir, run_path, alive_fd is None, legacy)
        if running is not None:
            if wait_for(running, START_TIMEOUT):
                return _client(running, role)
            raise BrokerEnvironmentError(
                f"the embedded Redis of {run_path} ({running}) does not answer"
            )
        sock = socket_path(run_path)
        start(data_dir, sock, run_path)
        client = _client(sock, role)
        record = {
            "host": socket.gethostname(),
            "pid": client.info("server")["process_id"],
            "socket": str(sock),
        }
        (data_dir / SERVER_FILE).write_text(json.dumps(record), encoding="utf-8")
        return client


def _other_zoi_processes(client: redis.Redis) -> int:
    """Other zoi processes connected, by the pids in the names `client_name` gives.
    Connections of this process do not count: it is leaving, and a process's extra
    connections (RQ's pub/sub, say) leave with it. Only names of exactly that form count:
    RQ renames one pooled connection to its worker's name (`zoi-<host>-<pid>-<random>`),
    and a worker whose live-progress thread held that one counted itself as another
    process and left its server running (about 4 in 10 `zoi worker --burst` runs with
    engine openai)."""
    pids = set()
    for entry in client.client_list():
        match = CLIENT_NAME.fullmatch(entry.get("name") or "")
        if match:
            pids.add(int(match[1]))
    pids.discard(os.getpid())
    return len(pids)


def release(client: redis.Redis, run_path: Path) -> None:
    """Leave the embedded server; the last zoi client shuts it down (flushing its
    append-only file) so no server is left running after the work is done. The record goes
    only once the server is gone: a server still flushing keeps its record, so the next
    command finds it rather than a lock held by nobody it knows."""
    data_dir = run_path.resolve() / "redis"
    if not data_dir.is_dir():
        _stop_orphan(client)
        return
    with _start_lock(data_dir):
        try:
            if _other_zoi_processes(client) == 0 and shutdown(Path(url_path(client)), data_dir):
                (data_dir / SERVER_FILE).unlink(missing_ok=True)
        except (redis.ConnectionError, OSError):
            pass
        finally:
            client.close()


def _stop_orphan(client: redis.Redis) -> None:
    """The run directory was deleted under a running command: its server has nothing left to
    keep (its append-only file is gone), and no later command could find it to stop it, so
    the last client stops it without saving rather than leave it running forever."""
    try:
        if _other_zoi_processes(client) == 0:
            client.execute_command("SHUTDOWN", "NOSAVE")
    except (redis.RedisError, OSError):
        pass  # SHUTDOWN answers by closing the connection
    finally:
        client.close()


def revive(run_path: Path, client: redis.Redis) -> None:
    """Start the run's embedded server again if it died under a long-lived client (a
    worker). The client's connection pool reconnects by itself once the socket answers."""
    try:
        fresh = embedded(run_path, "revive")
    except BrokerError as exc:
        log.warning("could not restart the embedded Redis: %s", exc)
        return
    if url_path(fresh) != url_path(client):
        log.warning("the embedded Redis came back on %s, not %s", url_path(fresh), url_path(client))
    fresh.close()
