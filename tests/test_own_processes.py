"""The real-engine tests check that no engine process outlives a command. They must look only
at the command's own processes: a neighbour's vLLM engine on a shared machine is none of the
test's business, and once made `make test` fail."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import psutil
import pytest

from .queue_helpers import ENV, scripted_config, wait_until
from .test_vllm_generate import zoi as checked_zoi


def test_a_neighbours_engine_process_does_not_fail_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process named `VLLM::Fake`, in its own session, starts while the command runs and
    outlives it: the check of the command's own engine processes must not count it."""
    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])  # the scripted engine, in the command
    impostor = tmp_path / "VLLM::Fake"  # a process's name is its executable's file name
    shutil.copy(shutil.which("sleep") or "/bin/sleep", impostor)
    log = tmp_path / "requests.log"
    config = scripted_config(tmp_path, delay=0.2, log=log)
    neighbours: list[subprocess.Popen[bytes]] = []

    def start_neighbour() -> None:
        wait_until(log.exists, timeout=120, what="the command to run")
        neighbours.append(subprocess.Popen([str(impostor), "600"], start_new_session=True))

    thread = threading.Thread(target=start_neighbour, daemon=True)
    thread.start()
    try:
        out = tmp_path / "out.jsonl"
        checked_zoi("generate", "-c", str(config), "--start", "0", "--end", "8", "-o", str(out))
        thread.join(timeout=120)
        (neighbour,) = neighbours
        assert neighbour.poll() is None, "the neighbour must outlive the command"
        assert psutil.Process(neighbour.pid).name() == "VLLM::Fake"
        assert out.exists()
    finally:
        thread.join(timeout=120)
        for neighbour in neighbours:
            neighbour.kill()
            neighbour.wait()
