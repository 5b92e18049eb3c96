"""A watchdog for an engine's child processes: when their parent dies, they die too.

vLLM's EngineCore process does not notice its parent's death, so a worker killed with
SIGKILL (or by the OOM killer) leaves the engine running and holding GPU memory, and the
replacement worker then fails to start. The parent gives this small process the read end of a
pipe and the list of its engine processes. When the pipe reads EOF (the parent closed it or
died), every listed process that is still the same process gets SIGKILL.

Run as `python -m zero_one_instruction.engines.reaper FD PID:START_TIME ...`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys


def _same_process(pid: int, start_time: float) -> bool:
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - start_time) < 0.01
    except psutil.Error:
        return False


def watch(fd: int, targets: list[tuple[int, float]]) -> None:
    while os.read(fd, 1):  # blocks until the parent closes the pipe or dies
        continue
    for pid, start_time in targets:
        if _same_process(pid, start_time):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class Reaper:
    """The parent's handle on its reaper."""

    def __init__(self, fd: int, process: subprocess.Popen[bytes]) -> None:
        self._fd, self._process = fd, process

    def release(self) -> None:
        """Call after the children exited normally: the reaper finds nothing left to kill."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._process.wait(timeout=30)


def guard_children() -> Reaper:
    """Start a reaper for this process's current children."""
    import psutil

    children = psutil.Process().children(recursive=True)
    targets = [f"{p.pid}:{p.create_time()!r}" for p in children if p.is_running()]
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        [sys.executable, "-m", __name__, str(read_end), *targets],
        pass_fds=(read_end,),
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the worker's group must not kill the reaper
    )
    os.close(read_end)
    return Reaper(write_end, process)


if __name__ == "__main__":
    pipe_fd = int(sys.argv[1])
    watch(pipe_fd, [(int(p), float(t)) for p, t in (a.split(":") for a in sys.argv[2:])])
