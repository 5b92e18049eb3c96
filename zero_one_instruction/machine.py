"""What one machine does for a run, one call each: queue the run's chunks (`enqueue`, behind
`zoi enqueue`), serve them as one worker holding one engine (`work`, behind `zoi worker`), or
the whole job at once (`run`, behind `zoi run`): GPU groups, the run, workers, merge.

Each call takes what the command line gives (paths, ranges, GPU ids, a Redis URL or none) and
returns what it did (a report; for `work`, whether any chunk ran); none prints. Without a
Redis URL, every call uses the run's own embedded server, started if it is not running. A
multi-node run is `enqueue` once, `work` on every GPU group of every node and
`merger.merge_run` at the end; `run` is the same on one machine.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import redis

from .broker import connect
from .config import Config, load_config
from .embeddedredis import revive
from .encoder import EncodeOptions, duplicates_path
from .engines import check_servers, holds_gpu
from .gpus import cuda_environment, groups, select, visible_gpus
from .launcher import Launcher
from .merger import MergeOptions, MergeReport, merge
from .outputs import check_output, remember_output
from .pipeline import Tally
from .policy import HEARTBEAT_SECONDS, SWEEP_SECONDS, JobPolicy
from .producer import EnqueueReport
from .producer import enqueue as enqueue_chunks
from .progress import Progress
from .rundir import Run, create_or_open, open_run
from .shards import present_markers
from .worker import exit_with_parent, serve
from .workerplan import WorkerSpec, check_options, plan, plan_thin

log = logging.getLogger(__name__)

# Thin workers `run` starts by default. One is enough for most fleets: it runs many records at
# once (`pipeline.concurrency`) and its engine spreads their requests over every endpoint, so
# the servers, not the worker, set the pace. More help only when one process's parsing and
# scheduling cannot keep up with many servers.
DEFAULT_THIN_WORKERS = 1


@dataclass(frozen=True)
class RunReport:
    """What `run` did: the workers it planned, the funnel of every chunk (those done before a
    resume included) and the merged output. `seconds` runs from the run's creation or
    reopening to the merged output."""

    run: Path
    output: Path
    workers: list[WorkerSpec]
    funnel: Tally
    merge: MergeReport
    seconds: float


def _revival(redis_url: str | None, run: Run, connection: redis.Redis) -> Callable[[], None] | None:
    """How to restart the run's embedded server if it dies; a server given by URL is the
    user's to restart."""
    if redis_url:
        return None
    return lambda: revive(run.path, connection)


def enqueue(
    config_path: Path,
    run_dir: Path,
    start: int,
    end: int,
    *,
    chunk_size: int = 100,
    policy: JobPolicy | None = None,
    redis_url: str | None = None,
) -> tuple[Run, EnqueueReport]:
    """Create (or reopen) the run in `run_dir` for base prompts [start, end) and queue every
    chunk that is not done. Safe to repeat; a run directory made for other settings is
    refused, naming the settings that differ."""
    run = create_or_open(run_dir, load_config(config_path), start, end, chunk_size)
    with connect(redis_url, run.path, "enqueue") as connection:
        return run, enqueue_chunks(connection, run, policy or JobPolicy())


def work(
    run_dir: Path,
    *,
    config_path: Path | None = None,
    redis_url: str | None = None,
    gpus: str | None = None,
    tp: int | None = None,
    name: str | None = None,
    burst: bool = False,
    parent: int | None = None,
    heartbeat: float = HEARTBEAT_SECONDS,
    heartbeat_ttl: int | None = None,
    janitor: float = SWEEP_SECONDS,
) -> bool:
    """Serve the run in `run_dir` as one worker until stopped (with `burst`, until no chunk
    is queued or running); whether any chunk ran.

    `config_path` brings this machine's hardware settings (the settings that shape the data
    must match the run's). `gpus` ("0,1") selects this worker's GPUs, in this process's
    environment, before anything touches CUDA; the tensor-parallel size `tp` defaults to
    their number. With `parent`, the worker stops at once when that process is gone."""
    if parent is not None:
        exit_with_parent(parent)
    run = open_run(run_dir)
    if config_path is not None:
        run = run.with_hardware(load_config(config_path))
    check_options(run.config.engine, holds_gpu(run.config), None, {"gpus": gpus, "tp": tp})
    if gpus is not None:
        chosen = select(visible_gpus(), gpus, None)
        os.environ.update(cuda_environment(chosen))
        tp = tp or len(chosen)
    if tp is not None:
        run = run.with_tensor_parallel(tp)
    with connect(redis_url, run.path, "worker") as connection:
        return serve(
            connection,
            run,
            name=name,
            burst=burst,
            heartbeat_interval=heartbeat,
            heartbeat_ttl=heartbeat_ttl,
            janitor_interval=janitor,
            revive=_revival(redis_url, run, connection),
        )


def _plan(
    config: Config,
    gpus: str | None,
    num_gpus: int | None,
    tp: int | None,
    workers: int | None,
    on_event: Callable[[str], None],
) -> list[WorkerSpec]:
    """The workers `run` starts: thin ones for an engine that holds no GPU (no GPU is looked
    for), else one per GPU group, saying which GPUs stay idle."""
    gpu = holds_gpu(config)
    check_options(config.engine, gpu, workers, {"gpus": gpus, "num_gpus": num_gpus, "tp": tp})
    if not gpu:
        return plan_thin(workers or DEFAULT_THIN_WORKERS)
    gpu_groups, idle = groups(select(visible_gpus(), gpus, num_gpus), tp)
    if not gpu_groups:
        on_event("no GPU found: one CPU worker (needs a CPU build of vLLM or another engine)")
    if idle:
        on_event(f"GPUs {','.join(idle)} stay idle: they do not fill a group of {tp}")
    return plan(gpu_groups)


def _describe(specs: list[WorkerSpec], config: Config) -> str:
    """The workers, as `run` announces them."""
    if specs and specs[0].thin:
        many = "worker" if len(specs) == 1 else "workers"
        return f"{len(specs)} {many} (engine {config.engine}, no GPU)"
    return "workers: " + ", ".join(f"{s.name} (tp {s.tp})" for s in specs)


def _work_left(run: Run) -> bool:
    """Whether some chunk has no marker yet, so that workers will start: a finished run only
    merges, and needs no server to do it."""
    if not run.shards.is_dir():
        return True
    return bool({chunk.id for chunk in run.chunks()} - set(present_markers(run)))


def _outputs(output: Path, encoding: EncodeOptions) -> list[Path]:
    """The files the merge writes: the output, and with a near dedup its sidecar."""
    return [output, duplicates_path(output)] if encoding.dedup == "near" else [output]


def run(
    config_path: Path,
    output: Path,
    start: int,
    end: int,
    *,
    run_dir: Path | None = None,
    gpus: str | None = None,
    num_gpus: int | None = None,
    tp: int | None = None,
    workers: int | None = None,
    encoding: EncodeOptions | None = None,
    chunk_size: int = 100,
    redis_url: str | None = None,
    overwrite: bool = False,
    on_event: Callable[[str], None] = log.info,
    on_progress: Callable[[Progress], None] = lambda progress: None,
) -> RunReport:
    """Generate base prompts [start, end) into `output` on this machine: check the output,
    split the GPUs into groups (`gpus` ids or the first `num_gpus`, `tp` per group; by
    default every visible GPU in power-of-two groups; none: one CPU worker), create or resume
    the run in `run_dir` (default: OUTPUT.run), launch and supervise one worker per group
    until every chunk is done, and merge as `encoding` says (as `zoi merge` would). An engine
    that holds no GPU (`engines.holds_gpu`) gets `workers` thin workers instead (default 1),
    and GPU options are refused for it, as `workers` is for an engine that holds GPUs.

    Rerun after an interrupt, a crash or a reboot, it resumes; on a finished run it only
    merges. `on_event` gets one line per thing worth saying (idle GPUs, the plan, restarts),
    `on_progress` the progress after every look at the done markers. Raises
    `KeyboardInterrupt` after stopping the workers, `launcher.LaunchError` if the run cannot
    complete."""
    config = load_config(config_path)
    encoding = encoding or EncodeOptions()
    run_dir = run_dir or Path(f"{output}.run")
    outputs = _outputs(output, encoding)
    for path in outputs:
        check_output(path, config, config_path=config_path, run=run_dir, overwrite=overwrite)
    specs = _plan(config, gpus, num_gpus, tp, workers, on_event)
    run = create_or_open(run_dir, config, start, end, chunk_size)
    if _work_left(run):
        check_servers(run.engine_config())
    began = time.monotonic()
    with connect(redis_url, run.path, "launcher") as connection:
        launcher = Launcher(
            run,
            connection,
            redis_url,
            specs,
            on_event,
            on_progress,
            revive=_revival(redis_url, run, connection),
            output=output,
            config_path=config_path.resolve(),  # this invocation's hardware settings
        )
        on_event(f"run {run.path}: {len(run.chunks())} chunks, {_describe(specs, config)}")
        progress = launcher.execute()
    merged = merge(run, output, MergeOptions(**asdict(encoding)))
    for path in outputs:
        remember_output(run.path, path)
    return RunReport(run.path, output, specs, progress.funnel, merged, time.monotonic() - began)
