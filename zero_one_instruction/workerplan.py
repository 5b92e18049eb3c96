"""The worker processes a machine starts for a run: one per GPU group, each with its GPUs,
its tensor-parallel size, its environment and its command line; or, for an engine that holds
no GPU (one that talks to served models), as many thin workers as asked for, with none.

Planned apart from the launcher that supervises them: `machine.run` plans its workers and
says what it will start before it opens the run, and a plan is checked without starting one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ZoiError
from .gpus import cuda_environment
from .safepath import python_module

# What a thin worker is given instead of GPUs: none at all. Should anything in it touch CUDA
# (a library that initialises it on import), it cannot take memory on a GPU that a server
# beside it (`vllm serve` on the same node) needs.
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}
CUDA_VARIABLES = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")


class PlanError(ZoiError):
    """Options that do not fit the kind of worker the engine needs."""


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process: its GPUs (none: a CPU worker) and tensor-parallel size, or a thin
    worker, whose engine holds no GPU (it gets none, and no tensor-parallel size)."""

    name: str
    gpus: tuple[str, ...]
    tp: int
    thin: bool = False

    def environment(self, base: dict[str, str], redis_url: str | None) -> dict[str, str]:
        """Without a URL the worker joins the run's embedded server as a client of its own,
        so the last of the launcher and its workers to leave stops it, even when the launcher
        was killed."""
        env = {k: v for k, v in base.items() if k != "ZOI_REDIS_URL"}
        if redis_url:
            env["ZOI_REDIS_URL"] = redis_url  # never on the command line: passwords
        env["PYTHONSAFEPATH"] = "1"  # the engine's own processes skip the working directory too
        if self.thin:
            env = {k: v for k, v in env.items() if k not in CUDA_VARIABLES} | NO_GPU
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
        tp = [] if self.thin else ["--tp", str(self.tp)]
        return [
            *python_module("zero_one_instruction"),
            "worker",
            "--run",
            str(run),
            *watch,
            "--name",
            self.name,
            *tp,
            "--heartbeat",
            str(heartbeat),
            *hardware,
        ]


def plan(gpu_groups: list[list[str]]) -> list[WorkerSpec]:
    """Worker specs for GPU groups; no group at all means one CPU worker."""
    if not gpu_groups:
        return [WorkerSpec("cpu0", (), 1)]
    return [WorkerSpec("gpu" + "-".join(group), tuple(group), len(group)) for group in gpu_groups]


def plan_thin(count: int) -> list[WorkerSpec]:
    """`count` thin workers, `thin0` to `thin<count-1>`: each runs many records at once and
    waits on its servers, so one keeps many endpoints busy; more help where one process's
    parsing and scheduling cannot keep up with the fleet."""
    if count < 1:
        raise PlanError(f"--workers {count}: give at least 1")
    return [WorkerSpec(f"thin{i}", (), 1, thin=True) for i in range(count)]


def check_options(
    engine: str,
    holds_gpu: bool,
    workers: int | None,
    gpu_options: dict[str, object],
) -> None:
    """Refuse options that mean nothing for the engine's kind of worker, in one line: GPU
    options for an engine that holds no GPU, `--workers` for one whose GPU groups decide how
    many workers there are. `gpu_options` are the GPU options as given (None: not given)."""
    given = [f"--{name.replace('_', '-')}" for name, value in gpu_options.items() if value]
    if not holds_gpu and given:
        raise PlanError(
            f"{given[0]}: engine {engine} holds no GPU, so there are no GPU groups; "
            "choose the number of workers with --workers N"
        )
    if holds_gpu and workers is not None:
        raise PlanError(
            f"--workers: engine {engine} runs one worker per GPU group; choose the groups "
            "with --gpus, --num-gpus and --tp"
        )
