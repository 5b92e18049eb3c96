"""How tests/servedvllm.py starts, awaits, stops and restarts a server, with stand-in servers
(a few lines of Python each) instead of vLLM: a server that exits at once, one that never
becomes healthy, one whose child ignores SIGTERM. Its vLLM flags are checked here too; the
real `vllm serve` is in tests/test_servedvllm.py."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import httpx
import psutil
import pytest

from .queue_helpers import _free_port
from .servedvllm import Restart, ServerFailed, ServerProcess, group_members, serve_flags

STANDIN = """
import http.server, signal, subprocess, sys
port, mode = int(sys.argv[1]), sys.argv[2]
print("stand-in: starting in mode", mode, flush=True)
if mode == "exit":
    print("stand-in: unknown flag --frobnicate", flush=True)
    sys.exit(3)
if mode == "stubborn":  # a child that ignores SIGTERM, as a hung engine process might
    subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503 if mode == "sick" else 200)
        self.end_headers()
    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def standin(
    tmp_path: Path, mode: str, startup_timeout: float = 60, stop_grace: float = 60
) -> ServerProcess:
    port = _free_port()
    command = [sys.executable, "-c", STANDIN, str(port), mode]
    return ServerProcess(
        command,
        port,
        tmp_path / "server.log",
        startup_timeout=startup_timeout,
        stop_grace=stop_grace,
    )


def test_a_healthy_server_stops_cleanly_and_leaves_no_process(tmp_path: Path) -> None:
    server = standin(tmp_path, "ok")
    server.start()
    assert server.running
    assert httpx.get(server.url + "/health").status_code == 200
    pgid = server.pgid
    assert pgid is not None and [p.pid for p in group_members(pgid)] == [pgid]
    assert server.stop() == []  # SIGTERM was enough
    assert not server.running
    assert group_members(pgid) == []
    server.stop()  # twice is fine


def test_a_stopped_server_forgets_its_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the group is seen empty its id may be given to another group: a second stop()
    or kill() must signal nothing."""
    server = standin(tmp_path, "ok")
    server.start()
    server.stop()
    assert server.pgid is None and server.processes() == []
    signalled: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "killpg", lambda pgid, sig: signalled.append((pgid, sig)))
    server.stop()
    server.kill()
    assert signalled == []


def test_a_server_that_exits_fails_with_its_code_and_log(tmp_path: Path) -> None:
    server = standin(tmp_path, "exit")
    with pytest.raises(ServerFailed, match="exited with code 3") as failed:
        server.start()
    assert "stand-in: unknown flag --frobnicate" in str(failed.value)
    assert server.processes() == []


def test_a_server_that_never_gets_healthy_times_out_with_its_log(tmp_path: Path) -> None:
    server = standin(tmp_path, "sick", startup_timeout=2)
    with pytest.raises(ServerFailed, match="not healthy after 2 s") as failed:
        server.start()
    assert "stand-in: starting in mode sick" in str(failed.value)
    assert server.processes() == []  # the failed start stopped what it started


def test_stop_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    server = standin(tmp_path, "stubborn", stop_grace=1)
    server.start()
    members = server.processes()
    assert len(members) == 2  # the server and its stubborn child, one process group
    (child,) = [p for p in members if p.pid != server.pgid]
    forced = server.stop()
    assert forced == [f"{child.name()} ({child.pid})"]
    assert server.processes() == []
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_kill_then_start_serves_again_on_the_same_port(tmp_path: Path) -> None:
    server = standin(tmp_path, "stubborn")
    server.start()
    first, port = server.pgid, server.port
    assert first is not None
    server.kill()  # SIGKILL to the whole group: the stubborn child too
    assert not server.running
    assert group_members(first) == []
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")
    server.start()
    assert (server.port, server.starts) == (port, 2)
    assert server.pgid != first
    assert httpx.get(server.url + "/health").status_code == 200
    server.kill()
    assert server.processes() == []
    assert server.log_tail().count("stand-in: starting in mode stubborn") == 2


def test_kill_waits_until_the_server_itself_is_reaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed process with many threads (vLLM's API server) shows as a zombie, so its group
    looks empty, while its threads still exit; until then it cannot be reaped, and a start
    found it "already running" (a restart test hung on a server that never came back).
    Here the group always looks empty and SIGKILL lands half a second late."""
    server = standin(tmp_path, "ok")
    server.start()
    pgid = server.pgid
    assert pgid is not None
    kill = os.killpg
    monkeypatch.setattr(server, "processes", list)
    monkeypatch.setattr(
        os, "killpg", lambda group, sig: threading.Timer(0.5, kill, (group, sig)).start()
    )
    server.kill()
    assert not server.running and server.pgid is None
    monkeypatch.undo()
    server.start()
    assert httpx.get(server.url + "/health").status_code == 200
    server.stop()
    assert group_members(pgid) == []


def test_restart_waits_for_its_condition_then_kills_and_starts(tmp_path: Path) -> None:
    server = standin(tmp_path, "ok")
    server.start()
    first = server.pgid
    go = threading.Event()
    restart = Restart(server, go.is_set)
    assert not restart.killed.wait(0.3)  # the condition does not hold yet: nothing happens
    assert server.pgid == first and server.running
    go.set()
    restart.join()
    assert restart.killed.is_set()
    assert server.running and server.pgid != first and server.starts == 2
    server.stop()


def test_a_failed_restart_is_raised_by_join(tmp_path: Path) -> None:
    server = standin(tmp_path, "ok")
    server.start()
    server.command = [sys.executable, "-c", "raise SystemExit(4)"]  # the restart cannot start
    restart = Restart(server, lambda: True)
    with pytest.raises(ServerFailed, match="exited with code 4"):
        restart.join()
    assert server.processes() == []


def test_engine_arguments_become_vllm_serve_flags() -> None:
    arguments = {
        "model": "/models/tiny",
        "quantization": None,
        "max_num_seqs": 16,
        "enforce_eager": True,
        "enable_chunked_prefill": False,
        "hf_overrides": {"rope_theta": 1.0},
    }
    assert serve_flags(arguments) == [
        "--model",
        "/models/tiny",
        "--max-num-seqs",
        "16",
        "--enforce-eager",
        "--no-enable-chunked-prefill",
        "--hf-overrides",
        '{"rope_theta": 1.0}',
    ]
