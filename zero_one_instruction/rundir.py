"""The run directory: the unit of resumption.

`run.json` freezes everything that shapes the data: the model and sampling, the pipeline
settings, the templates' text, the base prompts' content hash, the index range and the chunk
size. Its fingerprint names the run. Hardware settings (`gpu_memory_utilization`,
`tensor_parallel_size`, `batch_size`, `pipeline.concurrency`, `hardware_kwargs`, and the
`openai` section's URLs, keys and limits) stay out of it, so each machine can size its own
engine, or reach its own servers, and still work on the same run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import (
    ADDED_SETTINGS,
    HIDDEN_PIPELINE_DEFAULTS,
    Config,
    check_engine_arguments,
    config_data,
    hide_sampling_defaults,
)
from .errors import ZoiError
from .prompt_sources import PromptSource, load_source
from .records import temporary_name
from .templates import Templates, load_templates, templates_from_dict

RUN_FILE = "run.json"
# Only the owner may enter a new run directory: it holds the Redis data (every job's arguments),
# the frozen config and the shards. An existing directory keeps the mode its owner gave it.
RUN_DIR_MODE = 0o700
# 2: the base prompts' hash became length-prefixed and templates are checked exactly, so a run
# of format 1 cannot be reopened as it was made.
FORMAT = 2
# `openai` holds URLs, key names, limits and timeouts: where the records are computed and how
# fast, never what they are (the models that shape them are `model_name` and `step_models`).
HARDWARE_KEYS = (
    "gpu_memory_utilization",
    "tensor_parallel_size",
    "batch_size",
    "hardware_kwargs",
    "openai",
)
# Each chunk is a queue job (about 1.2 KB of Redis memory) and four files in one directory.
# 100,000 chunks measured 122 MB in Redis, a 57 s enqueue and a 13 s status on two cores;
# a million is ten times that, about as far as one run directory should go. Past it, a
# larger --chunk-size does the same work with fewer, larger shards.
MAX_CHUNKS = 1_000_000
# Pipeline settings added after run format 2, with the value that behaves as runs made before
# them did. At that value they are left out of the spec, so those runs keep their fingerprint
# and can be resumed; set otherwise, they shape the data and are in it.
ADDED_PIPELINE_SETTINGS: dict[str, object] = {
    "min_japanese_share": None,
    "drop_leaked_questions": False,
    "drop_looping_answers": False,
    "min_judge_confidence": None,
    **HIDDEN_PIPELINE_DEFAULTS,
}


class RunError(ZoiError):
    """The run directory is missing, corrupt, or belongs to another configuration."""


@dataclass(frozen=True, order=True)
class Chunk:
    """A half-open range of base-prompt indices; its id orders like its start."""

    start: int
    end: int

    @property
    def id(self) -> str:
        return f"{self.start:010d}-{self.end:010d}"

    def __len__(self) -> int:
        return self.end - self.start


def split(start: int, end: int, size: int) -> list[Chunk]:
    return [Chunk(s, min(s + size, end)) for s in range(start, end, size)]


def check_chunk_count(start: int, end: int, size: int) -> None:
    """Refuse a range that makes more than MAX_CHUNKS chunks, before anything is written:
    listing 10^12 chunks would exhaust memory long after `run.json` had been created."""
    count = -(-(end - start) // size)
    if count > MAX_CHUNKS:
        least = -(-(end - start) // MAX_CHUNKS)
        raise RunError(
            f"[{start}, {end}) in chunks of {size} makes {count:,} chunks, more than the "
            f"{MAX_CHUNKS:,} a run can hold (each is a queue job and a shard); use "
            f"--chunk-size {least} or more, or a smaller range"
        )


def _chat_template_text(value: str | None) -> str | None:
    from .engines.vllm import read_chat_template

    return read_chat_template(value)


def data_spec(
    config: Config, templates: Templates, source: PromptSource, start: int, end: int, size: int
) -> dict[str, Any]:
    """What the records depend on, and nothing else: paths are replaced by content."""
    spec = config.model_dump(
        mode="json", exclude={*HARDWARE_KEYS, "templates", "system_prompt", "chat_template"}
    )
    spec["pipeline"].pop("concurrency")
    for key, before in ADDED_SETTINGS.items():
        if spec.get(key) == before:
            del spec[key]
    for key, before in ADDED_PIPELINE_SETTINGS.items():
        if spec["pipeline"][key] == before:
            del spec["pipeline"][key]
    hide_sampling_defaults(spec)
    spec["prompts"] = {
        "source": config.prompts.source,
        "field": config.prompts.field,
        "count": len(source),
        "content_hash": source.content_hash,
    }
    spec["chat_template"] = _chat_template_text(config.chat_template)
    spec["templates"] = templates.as_dict(config.pipeline.optional_templates())
    spec["range"] = {"start": start, "end": end}
    spec["chunk_size"] = size
    return spec


def fingerprint(spec: dict[str, Any]) -> str:
    canonical = json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def differing_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))


@dataclass(frozen=True)
class Run:
    path: Path
    config: Config
    spec: dict[str, Any]
    fingerprint: str

    @property
    def key(self) -> str:
        """Short, stable, Redis-safe name of this run: its queue and job ids derive from it."""
        return self.fingerprint[:16]

    @property
    def queue_name(self) -> str:
        return f"zoi-{self.key}"

    @property
    def start(self) -> int:
        return int(self.spec["range"]["start"])

    @property
    def end(self) -> int:
        return int(self.spec["range"]["end"])

    @property
    def chunk_size(self) -> int:
        return int(self.spec["chunk_size"])

    @property
    def shards(self) -> Path:
        return self.path / "shards"

    @property
    def templates(self) -> Templates:
        return templates_from_dict(self.spec["templates"], str(self.path / RUN_FILE))

    def chunks(self) -> list[Chunk]:
        return split(self.start, self.end, self.chunk_size)

    def job_id(self, chunk: Chunk) -> str:
        return f"zoi-{self.key}-{chunk.id}"

    def owns(self, chunk: Chunk) -> bool:
        """Whether `chunk` is one of this run's chunks: inside its range, on its chunk grid,
        and as long as the grid makes it. Anyone who can write to the queue can name a range;
        only these are ever computed."""
        start, end, size = chunk.start, chunk.end, self.chunk_size
        return (
            self.start <= start < self.end
            and (start - self.start) % size == 0
            and end == min(start + size, self.end)
        )

    def chunk_of_job(self, job_id: str) -> Chunk | None:
        """The chunk whose job id this is, `None` for any other job: jobs someone else put on
        the queue are not the run's, whatever becomes of them."""
        start, _, end = job_id.removeprefix(f"zoi-{self.key}-").partition("-")
        if not (start.isascii() and start.isdigit() and end.isascii() and end.isdigit()):
            return None
        chunk = Chunk(int(start), int(end))
        return chunk if self.owns(chunk) and self.job_id(chunk) == job_id else None

    def source(self) -> PromptSource:
        """The base prompts, checked against the content the run was created with."""
        source = load_source(self.config.prompts, self.templates.base_prompt)
        frozen = self.spec["prompts"]
        if (source.content_hash, len(source)) != (frozen["content_hash"], frozen["count"]):
            raise RunError(
                f"{self.path}: base prompts ({source.description}) changed since the run was "
                "created; restore them or start a new run"
            )
        return source

    def engine_config(self) -> Config:
        """The config to build the engine from: the chat template as frozen in run.json, not
        the file as it reads now. A template edited after enqueue would otherwise fail (or
        change) every record of the chunks still to run, under the same fingerprint. The
        engine arguments are checked here too: a worker without `-c` takes them from run.json,
        which a config load never saw (a run made by another version, or edited by hand)."""
        config = self.config.model_copy(update={"chat_template": self.spec["chat_template"]})
        check_engine_arguments(config, str(self.path / RUN_FILE))
        return config

    def with_tensor_parallel(self, size: int) -> Run:
        config = self.config.model_copy(update={"tensor_parallel_size": size})
        return Run(self.path, config, self.spec, self.fingerprint)

    def with_hardware(self, config: Config) -> Run:
        """This run with another machine's hardware settings, if `config` shapes the same data."""
        templates = load_templates(config.templates, config.system_prompt)
        source = load_source(config.prompts, templates.base_prompt)
        spec = data_spec(config, templates, source, self.start, self.end, self.chunk_size)
        _check_same(self.path, self.spec, spec)
        return Run(self.path, config, self.spec, self.fingerprint)


def _check_same(path: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    if fingerprint(old) != fingerprint(new):
        keys = differing_keys(old, new)
        shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
        raise RunError(f"{path} belongs to another configuration: {shown} differ")


def _read(path: Path) -> dict[str, Any]:
    file = path / RUN_FILE
    if not path.exists():
        raise RunError(f"{path}: run directory does not exist")
    if not file.exists():
        raise RunError(f"{path}: not a run directory (no {RUN_FILE})")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        if (
            isinstance(data, dict)
            and isinstance(data.get("format"), int)
            and data["format"] < FORMAT
        ):
            raise RunError(
                f"{file}: made by an older zoi (run format {data['format']}, this one reads "
                f"{FORMAT}); finish or merge it with the version that made it, or start a new run"
            )
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(
                f"unknown format {data.get('format') if isinstance(data, dict) else data!r}"
            )
        return data
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunError(f"{file}: corrupt run file ({exc})") from None


def open_run(path: Path) -> Run:
    """An existing run, as `zoi worker`, `zoi merge` and `zoi status` see it."""
    data = _read(path)
    try:
        config = Config.model_validate(data["config"])
        spec = data["spec"]
        if fingerprint(spec) != data["fingerprint"]:
            raise ValueError("fingerprint does not match its settings")
    except (KeyError, TypeError, ValueError) as exc:
        raise RunError(f"{path / RUN_FILE}: corrupt run file ({exc})") from None
    return Run(path, config, spec, data["fingerprint"])


def _reopen(path: Path, config: Config, spec: dict[str, Any]) -> Run:
    """The existing run, if `spec` is its data, with `config`'s hardware settings: the
    frozen spec still decides the data, this invocation decides the machine."""
    run = open_run(path)
    _check_same(path, run.spec, spec)
    return Run(path, config, run.spec, run.fingerprint)


def create_or_open(path: Path, config: Config, start: int, end: int, chunk_size: int) -> Run:
    """The run for this config and range: created on first use, reused after, refused when the
    directory was made for different data. A reused run takes this config's hardware
    settings: they are this invocation's to choose (a lower gpu_memory_utilization after an
    out-of-memory, say)."""
    check_chunk_count(start, end, chunk_size)
    templates = load_templates(config.templates, config.system_prompt)
    source = load_source(config.prompts, templates.base_prompt)
    spec = data_spec(config, templates, source, start, end, chunk_size)
    if (path / RUN_FILE).exists():
        return _reopen(path, config, spec)
    if path.exists() and not path.is_dir():
        raise RunError(f"{path}: exists and is not a directory")
    path.mkdir(mode=RUN_DIR_MODE, parents=True, exist_ok=True)
    (path / "shards").mkdir(exist_ok=True)
    digest = fingerprint(spec)
    record = {
        "format": FORMAT,
        "fingerprint": digest,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "created_by": f"{os.uname().nodename}:{os.getpid()}",
        "spec": spec,
        "config": config_data(config),
    }
    tmp = temporary_name(path / RUN_FILE)
    tmp.write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    try:
        os.link(tmp, path / RUN_FILE)  # create only if absent: two first enqueues, one run.json
    except FileExistsError:
        return _reopen(path, config, spec)
    finally:
        tmp.unlink()
    return Run(path, config, spec, digest)
