"""A test's own engine processes, told apart from anyone else's on the machine.

vLLM renames its processes (`VLLM::EngineCore`, `VLLM::Worker`), which also overwrites their
environment, and the engines of `zoi run` live in their workers' sessions. Neither a
machine-wide scan by name nor one session tells whose an engine is: a neighbour's engine
made the check fail. So a command runs under a small wrapper that is a child subreaper
(prctl PR_SET_CHILD_SUBREAPER): a process orphaned by its parent's death is re-parented to
the wrapper instead of init, so every process the command starts, in any session, orphans
included, stays a descendant of the wrapper, and only those are looked at.

Run as `python own_processes.py REPORT GRACE COMMAND...`: it runs COMMAND, then waits up to
GRACE seconds for the engine processes among its descendants to end. Those still alive are
written to REPORT (JSON) and killed, and the wrapper exits with COMMAND's code.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

PR_SET_CHILD_SUBREAPER = 36
ENGINE_PREFIX = "VLLM::"
WRAPPER = str(Path(__file__).resolve())


def engine_processes(root: int) -> list[psutil.Process]:
    """Live vLLM engine processes among `root`'s descendants."""
    found = []
    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process(root).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if proc.status() != psutil.STATUS_ZOMBIE and proc.name().startswith(ENGINE_PREFIX):
                    found.append(proc)
    return found


def tracked(report: Path, grace: float, command: list[str]) -> list[str]:
    """`command` under the wrapper (for `subprocess`): see the module docstring."""
    return [sys.executable, WRAPPER, str(report), str(grace), *command]


def leftovers(report: Path) -> list[str]:
    """The engine processes the command left behind, as `name (pid)`."""
    return json.loads(report.read_text(encoding="utf-8"))


def stop_wrapper(wrapper: subprocess.Popen[Any], timeout: float = 300) -> None:
    """End a wrapped command that a failed or timed-out test leaves running. SIGTERM reaches
    the command through the wrapper, which then kills its engines; a SIGKILLed wrapper would
    instead orphan them (a 12 GiB real-model engine kept running beside the next test)."""
    if wrapper.poll() is None:
        wrapper.terminate()
        try:
            wrapper.communicate(timeout=timeout)  # drains its pipes, if any, so it can end
        except subprocess.TimeoutExpired:
            wrapper.kill()
            wrapper.communicate()


def run_checked(
    command: list[str], grace: float, timeout: float
) -> subprocess.CompletedProcess[str]:
    """`run_tracked`, asserting the command exited 0 and left none of its engines behind."""
    done, left = run_tracked(command, grace, timeout)
    assert left == [], f"engine processes outlived {Path(command[0]).name} {command[1]}: {left}"
    assert done.returncode == 0, (command, done.stdout, done.stderr[-3000:])
    return done


def run_tracked(
    command: list[str], grace: float, timeout: float
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run `command` under the wrapper: its result, and the engine processes it left behind.
    Interrupted (a timeout, pytest's own timeout, Ctrl-C), it stops the command cleanly."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "leftovers.json"
        wrapper = subprocess.Popen(
            tracked(report, grace, command),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = wrapper.communicate(timeout=timeout)
        finally:
            stop_wrapper(wrapper)
        done = subprocess.CompletedProcess(command, wrapper.returncode, out, err)
        return done, leftovers(report)


def _become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def _reap_orphans() -> None:
    """Orphans re-parented here are our children now: collect the ones that have ended."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.name()} ({proc.pid})"
    except psutil.Error:
        return f"ended ({proc.pid})"


def main(argv: list[str]) -> int:
    report, grace, command = Path(argv[0]), float(argv[1]), argv[2:]
    _become_subreaper()
    child = subprocess.Popen(command)

    def forward(signum: int, _: FrameType | None) -> None:
        child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    code = child.wait()
    deadline = time.monotonic() + grace
    while engine_processes(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = engine_processes(os.getpid())
    described = [_describe(p) for p in left]
    for proc in left:  # first, so that a report that cannot be written leaves nothing behind
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=30)
    _reap_orphans()
    report.write_text(json.dumps(described), encoding="utf-8")
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
