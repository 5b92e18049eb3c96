"""Settings: the original `model_config.yml` keys plus the sections this tool adds.

The original keys stay flat at the top level so an existing `model_config.yml` loads unchanged.
Everything else lives in named sections. Unknown keys are errors, because a misspelt key that is
silently ignored produces a dataset nobody asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .yamlfile import read_yaml

STEPS = ("width", "judge", "fix", "depth", "flatten", "answer")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StepSampling(_Strict):
    """Per-step overrides; `None` inherits the top-level value."""

    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)


class Sampling(_Strict):
    """Overrides per pipeline step. The judge is greedy and short by default: it only picks a
    choice, and a verdict that changes between reruns would make runs irreproducible."""

    width: StepSampling = StepSampling()
    judge: StepSampling = StepSampling(temperature=0.0, max_tokens=8)
    fix: StepSampling = StepSampling()
    depth: StepSampling = StepSampling()
    flatten: StepSampling = StepSampling()
    answer: StepSampling = StepSampling()


class Pipeline(_Strict):
    depth_steps: int = Field(default=1, ge=0, le=20)
    fixer: bool = True
    min_answer_chars: int = Field(default=10, ge=0)
    refusal_marker: str = Field(default="不可能", min_length=1)
    drop_truncated_answers: bool = False
    concurrency: int | None = Field(default=None, ge=1)


class Prompts(_Strict):
    """Where base prompts come from.

    `builtin` crosses the shipped task and domain lists; `tasks_domains` crosses the user's own
    lists; `file` reads one prompt per line (`.txt`) or one JSON object per line (`.jsonl`).
    """

    source: Literal["builtin", "tasks_domains", "file"] = "builtin"
    tasks_file: Path | None = None
    domains_file: Path | None = None
    file: Path | None = None
    field: str = Field(default="prompt", min_length=1)


class Config(_Strict):
    # --- the original model_config.yml keys, same names and meaning ---
    model_name: str = Field(min_length=1)
    quantization: str | None = None
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    tensor_parallel_size: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=32, ge=1)
    max_tokens: int = Field(default=512, ge=1)
    max_model_len: int | None = Field(default=4096, ge=16)
    trust_remote_code: bool = False
    dtype: str = "auto"
    temperature: float = Field(default=0.9, ge=0.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    # --- added by this tool ---
    seed: int = Field(default=0, ge=0)
    engine: str = "vllm"
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    sampling: Sampling = Sampling()
    pipeline: Pipeline = Pipeline()
    prompts: Prompts = Prompts()
    templates: Path | None = None
    system_prompt: str | None = None

    @field_validator("engine")
    @classmethod
    def _engine_form(cls, value: str) -> str:
        if value != "vllm" and ":" not in value:
            raise ValueError("must be 'vllm' or 'package.module:ClassName'")
        return value

    def concurrency(self) -> int:
        """Records in flight at once. Twice the engine's slots keeps every slot fed while
        some records wait between their sequential requests."""
        return self.pipeline.concurrency or 2 * self.batch_size


def _format_location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = _format_location(err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    return f"{where}: {err['msg']} (got {err.get('input')!r})"


def _resolve_paths(config: Config, base: Path) -> Config:
    """Relative file paths in a config mean relative to the config file, not to the shell's
    working directory, so a run behaves the same wherever it is started from."""

    def fix(path: Path | None) -> Path | None:
        return None if path is None or path.is_absolute() else (base / path).resolve()

    prompts = config.prompts.model_copy(
        update={
            "tasks_file": fix(config.prompts.tasks_file),
            "domains_file": fix(config.prompts.domains_file),
            "file": fix(config.prompts.file),
        }
    )
    update: dict[str, Any] = {"prompts": prompts, "templates": fix(config.templates)}
    model = Path(config.model_name)
    if config.model_name.startswith((".", "~")) or (base / model).is_dir():
        update["model_name"] = str((base / model.expanduser()).resolve())
    return config.model_copy(update=update)


def parse_config(data: Any, source: str, base: Path | None = None) -> Config:
    """Validate already-parsed YAML data; `source` names it in error messages."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_first_error(exc)}") from None
    return _resolve_paths(config, base) if base is not None else config


def load_config(path: str | Path) -> Config:
    path = Path(path)
    data = read_yaml(path, "config", ConfigError)
    return parse_config(data, str(path), base=path.resolve().parent)


def dump_config(config: Config) -> str:
    """The effective config as YAML, defaults included: what `zoi config show` prints."""
    data = config.model_dump(mode="json")
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
