"""The command line's shared options: declared once, so the commands that share them stay in
step, and the base-prompt range as the commands take it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .detectors import NEAR_THRESHOLD
from .encoder import DEDUPS, FORMATS
from .policy import HEARTBEAT_SECONDS, SWEEP_SECONDS, JobPolicy

if TYPE_CHECKING:
    from .tokens import TokenRequest

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_CONFIG = "model_config.yml"


def config_option(func: F) -> F:
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


range_options = _options(
    click.option("--num-prompts", type=click.IntRange(min=1), help="Base prompts [0, N)."),
    click.option("--start", type=click.IntRange(min=0), help="First base-prompt index."),
    click.option("--end", type=click.IntRange(min=1), help="End of the range (exclusive)."),
)
chunk_size_option = click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Base prompts per queue job (and per shard).",
)
id_start_option = click.option(
    "--id-start",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="First id N of record_N.",
)

encoding_options = _options(
    id_start_option,
    click.option(
        "--format",
        "fmt",
        type=click.Choice(FORMATS),
        default="original",
        show_default=True,
        help="original: id/input/output/conversation; messages: id and role/content "
        "messages, as TRL-style trainers load them.",
    ),
    click.option(
        "--with-meta",
        is_flag=True,
        help="Add each record's source index and evolution trace under 'meta'.",
    ),
    click.option(
        "--dedup",
        type=click.Choice(DEDUPS),
        is_flag=False,
        flag_value="exact",
        default=None,
        help="Drop records whose question repeats an earlier one: exact (plain --dedup), or "
        "near: also nearly (MinHash over character trigrams), listing what it drops in "
        "OUTPUT's .duplicates.jsonl sidecar.",
    ),
    click.option(
        "--near-threshold",
        type=click.FloatRange(0.0, 1.0, min_open=True),
        help=f"With --dedup near: the estimated Jaccard similarity of two questions' "
        f"character trigrams from which the later one is dropped. [default: {NEAR_THRESHOLD}]",
    ),
)

token_options = _options(
    click.option(
        "--tokenizer",
        metavar="PATH|HUB_ID",
        help="Count tokens with this tokenizer (a model directory, or a hub id already in the "
        "local cache; never downloaded). Default: the run's model's, if it is on this machine.",
    ),
    click.option(
        "--no-tokens", is_flag=True, help="Count lengths in characters only (load no tokenizer)."
    ),
)


def take_tokens(options: dict[str, Any]) -> TokenRequest:
    """What `zoi report` is asked to count tokens with, taken out of its options."""
    from .tokens import TokenRequest  # here: the command line starts without the report's imports

    name, off = options.pop("tokenizer"), options.pop("no_tokens")
    if name is not None and off:
        raise click.UsageError("give --tokenizer or --no-tokens, not both")
    return TokenRequest(name, auto=not off)


ENCODING = ("id_start", "fmt", "with_meta", "dedup", "near_threshold")


def take_encoding(options: dict[str, Any]) -> dict[str, Any]:
    """The `EncodeOptions` fields, taken out of a command's options (the rest are for the
    command itself); --near-threshold only with --dedup near."""
    chosen = {key: options.pop(key) for key in ENCODING}
    if chosen["near_threshold"] is None:
        del chosen["near_threshold"]
    elif chosen["dedup"] != "near":
        raise click.UsageError("--near-threshold goes with --dedup near")
    return chosen


report_outputs = _options(
    click.option(
        "--json",
        "json_path",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Write every figure to this JSON file.",
    ),
    click.option(
        "-o",
        "--output",
        "html_path",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Write the report as a self-contained HTML page (plots inline, opens offline).",
    ),
)

job_policy_options = _options(
    click.option(
        "--retries",
        type=click.IntRange(min=0),
        default=JobPolicy.retries,
        show_default=True,
        help="How often a failed or abandoned chunk is retried.",
    ),
    click.option(
        "--job-timeout",
        type=click.IntRange(min=60),
        default=JobPolicy.timeout,
        show_default=True,
        help="Seconds a chunk may run before it is failed (and retried).",
    ),
)

heartbeat_options = _options(
    click.option(
        "--heartbeat",
        type=click.FloatRange(min=0.1),
        default=HEARTBEAT_SECONDS,
        show_default=True,
        help="Seconds between heartbeats of running chunks.",
    ),
    click.option(
        "--heartbeat-ttl",
        type=click.IntRange(min=1),
        help="Seconds without a heartbeat after which a chunk counts as abandoned "
        "[default: 3 x heartbeat + 5; at least heartbeat + 2].",
    ),
    click.option(
        "--janitor",
        type=click.FloatRange(min=0.1),
        default=SWEEP_SECONDS,
        show_default=True,
        help="Seconds between sweeps that return abandoned chunks to the queue.",
    ),
)

_RUN_HELP = "Run directory: run.json, the shards, and the embedded Redis's data."


def run_option(func: F) -> F:
    return click.option(
        "--run", "run_dir", required=True, type=click.Path(path_type=Path), help=_RUN_HELP
    )(func)


def redis_option(func: F) -> F:
    return click.option(
        "--redis-url",
        envvar="ZOI_REDIS_URL",
        help="redis://[:password@]host:port/db, rediss://... or unix://path (also "
        "ZOI_REDIS_URL). Without it, the run's own embedded Valkey server is used.",
    )(func)


overwrite_option = click.option(
    "--overwrite",
    is_flag=True,
    help="Replace OUTPUT if it exists and is not the file this run wrote last time.",
)


def validate_range(start: int, end: int) -> None:
    if end <= start:
        raise click.BadParameter(f"must be greater than --start ({start})", param_hint="--end")


def index_range(num_prompts: int | None, start: int | None, end: int | None) -> tuple[int, int]:
    """The base-prompt range [start, end) from `--num-prompts N` or `--start/--end`."""
    if num_prompts is not None:
        if start is not None or end is not None:
            raise click.UsageError("give --num-prompts or --start/--end, not both")
        return 0, num_prompts
    if start is None or end is None:
        raise click.UsageError("give --num-prompts N, or both --start and --end")
    validate_range(start, end)
    return start, end
