"""A watchdog for an engine's child processes: when their parent dies, they die too.

vLLM's EngineCore process does not notice its parent's death. A worker killed with SIGKILL,
or by the OOM killer, therefore leaves the engine running and holding GPU memory, and the
replacement worker then fails to start.

The reaper is started before the engine and holds the read end of a pipe. Every second it
notes the parent's descendants, with their start times. When the pipe reads EOF, the parent
has died, and every noted process that is still the same process gets SIGKILL. A parent that
closes its engine normally writes one byte first, and the reaper then leaves quietly.

Run as `python -m zero_one_instruction.engines.reaper FD PARENT_PID`.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys

from ..safepath import python_module

POLL_SECONDS = 1.0


def _descendants(parent: int, known: dict[int, float]) -> None:
    import psutil

    try:
        for child in psutil.Process(parent).children(recursive=True):
            if child.pid != os.getpid():
                with contextlib.suppress(psutil.Error):
                    known.setdefault(child.pid, child.create_time())
    except psutil.Error:
        pass


def _kill(known: dict[int, float]) -> None:
    import psutil

    for pid, started in known.items():
        try:
            if abs(psutil.Process(pid).create_time() - started) < 0.01:
                os.kill(pid, signal.SIGKILL)
        except (psutil.Error, ProcessLookupError):
            continue


def watch(fd: int, parent: int) -> None:
    known: dict[int, float] = {}
    while True:
        _descendants(parent, known)
        ready, _, _ = select.select([fd], [], [], POLL_SECONDS)
        if not ready:
            continue
        if os.read(fd, 1):
            return  # the parent closed its engine itself: nothing to clean up
        _kill(known)  # EOF without the byte: the parent died
        return


class Reaper:
    """The parent's handle on its reaper."""

    def __init__(self, fd: int, process: subprocess.Popen[bytes]) -> None:
        self._fd, self._process = fd, process

    def release(self) -> None:
        """The engine was shut down normally: dismiss the reaper."""
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self._fd, b"q")
        os.close(self._fd)
        self._fd = -1
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def guard_children() -> Reaper:
    """Start a reaper for this process's present and future children."""
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        [*python_module(__name__), str(read_end), str(os.getpid())],
        pass_fds=(read_end,),
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the worker's group must not kill the reaper
    )
    os.close(read_end)
    return Reaper(write_end, process)


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]))
