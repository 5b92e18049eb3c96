"""The worker processes a machine starts for a run: one per GPU group, each with its GPUs,
its tensor-parallel size, its environment and its command line.

Planned apart from the launcher that supervises them: `machine.run` plans its workers and
says what it will start before it opens the run, and a plan is checked without starting one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .gpus import cuda_environment
from .safepath import python_module


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process: its GPUs (none: a CPU worker) and tensor-parallel size."""

    name: str
    gpus: tuple[str, ...]
    tp: int

    def environment(self, base: dict[str, str], redis_url: str | None) -> dict[str, str]:
        """Without a URL the worker joins the run's embedded server as a client of its own,
        so the last of the launcher and its workers to leave stops it, even when the launcher
        was killed."""
        env = {k: v for k, v in base.items() if k != "ZOI_REDIS_URL"}
        if redis_url:
            env["ZOI_REDIS_URL"] = redis_url  # never on the command line: passwords
        env["PYTHONSAFEPATH"] = "1"  # the engine's own processes skip the working directory too
        env.update(cuda_environment(self.gpus))
        return env

    def command(
        self, run: Path, heartbeat: float, parent: int | None = None, config: Path | None = None
    ) -> list[str]:
        """The worker's command line. With `parent`, the worker stops when that process (the
        launcher) is gone; `config` gives it this invocation's hardware settings (without it, a
        worker takes those frozen in run.json when the run was created)."""
        watch = ["--exit-with-parent", str(parent)] if parent is not None else []
        hardware = ["--config", str(config)] if config is not None else []
        return [
            *python_module("zero_one_instruction"),
            "worker",
            "--run",
            str(run),
            *watch,
            "--name",
            self.name,
            "--tp",
            str(self.tp),
            "--heartbeat",
            str(heartbeat),
            *hardware,
        ]


def plan(gpu_groups: list[list[str]]) -> list[WorkerSpec]:
    """Worker specs for GPU groups; no group at all means one CPU worker."""
    if not gpu_groups:
        return [WorkerSpec("cpu0", (), 1)]
    return [WorkerSpec("gpu" + "-".join(group), tuple(group), len(group)) for group in gpu_groups]
