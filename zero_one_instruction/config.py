"""Settings: the original `model_config.yml` keys plus the sections this tool adds.

The original keys stay flat at the top level so an existing `model_config.yml` loads unchanged.
Everything else lives in named sections. Unknown keys are errors, and values are not coerced
(`temperature: true` is not 1.0): a misspelt or mistyped setting that is silently accepted
produces a dataset nobody asked for.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .operators import DEFAULT_WEIGHTS, TEMPLATES, checked_weights
from .templates import placeholders
from .yamlfile import read_yaml

LaxPath = Annotated[Path, Field(strict=False)]
ENGINE_SPEC = re.compile(r"^(vllm|openai)$|^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
MAX_SEED = 2**32 - 1
# `follow_up` last: it asks only in runs of more than one turn (`pipeline.turns`).
STEPS = ("width", "judge", "fix", "depth", "flatten", "answer", "follow_up")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
INITIAL_IN_FLIGHT = 8  # an endpoint's starting limit on requests in flight, unless set


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class StepSampling(_Strict):
    """Per-step overrides; `None` inherits the top-level value."""

    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    repetition_penalty: float | None = Field(default=None, gt=0.0)


# Steps whose defaults differ from "inherit". The judge only picks a choice, greedily: a
# verdict that changed between reruns would make runs irreproducible.
STEP_DEFAULTS: dict[str, dict[str, Any]] = {"judge": {"temperature": 0.0, "max_tokens": 8}}


class Sampling(_Strict):
    width: StepSampling = StepSampling()
    judge: StepSampling = StepSampling(**STEP_DEFAULTS["judge"])
    fix: StepSampling = StepSampling()
    depth: StepSampling = StepSampling()
    flatten: StepSampling = StepSampling()
    answer: StepSampling = StepSampling()
    follow_up: StepSampling = StepSampling()  # the user's next question (`pipeline.turns`)

    @model_validator(mode="before")
    @classmethod
    def _keep_step_defaults(cls, data: Any) -> Any:
        """`judge: {max_tokens: 16}` keeps the judge greedy; only `temperature: null` would
        make it inherit the top-level temperature."""
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for step, defaults in STEP_DEFAULTS.items():
            if isinstance(data.get(step), dict):
                merged[step] = {**defaults, **data[step]}
        return merged


def _http_url(value: str) -> str:
    """An endpoint's base URL: http(s), with a host, without credentials (the key comes
    from `api_key_env`, so a URL can be shown and frozen), and one the HTTP client takes
    (no space or control character, a host name it can encode), so a URL that could only
    fail later fails here, in one line. The trailing slash is dropped so that
    `{base}/chat/completions` is one URL whichever way it was written."""
    for position, char in enumerate(value):
        if char.isspace() or not char.isprintable():
            raise ValueError(f"a space or control character at position {position}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ValueError("not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials do not belong in the URL: name them in api_key_env")
    if parts.query or parts.fragment:
        raise ValueError("a base URL takes no query or fragment")
    import httpx  # here: only a config with endpoints pays for importing it

    try:
        httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise ValueError(f"not a URL the HTTP client takes ({exc})") from None
    return value.rstrip("/")


def _distinct(urls: list[str]) -> list[str]:
    if len(set(urls)) != len(urls):
        raise ValueError("lists the same URL twice")
    return urls


def _env_name(value: str | None) -> str | None:
    """The *name* of the variable holding the key: the key itself never enters a config,
    so it never reaches run.json, a log or a message (and a value that is no name is never
    echoed back: it may be a key pasted in the wrong place)."""
    if value is not None and not ENV_NAME.match(value):
        raise ValueError(
            "not an environment variable name (name the variable that holds the key; "
            "never write the key itself)"
        )
    return value


Endpoints = Annotated[list[Annotated[str, AfterValidator(_http_url)]], AfterValidator(_distinct)]
EnvName = Annotated[str | None, AfterValidator(_env_name)]


class ServedModel(_Strict):
    """A model served somewhere else than `openai.endpoints` (a big judge on its own node)."""

    endpoints: Endpoints = Field(min_length=1)
    api_key_env: EnvName = None


class OpenAISettings(_Strict):
    """The `openai:` section: where `engine: openai` finds its servers and how hard it may
    push them. All of it is this machine's (like `hardware_kwargs`): URLs and keys are out
    of the run's fingerprint, so every worker may bring its own."""

    endpoints: Endpoints = Field(default_factory=list)
    api_key_env: EnvName = None
    models: dict[str, ServedModel] = Field(default_factory=dict)
    max_in_flight: int = Field(default=64, ge=1)
    initial_in_flight: int = Field(default=INITIAL_IN_FLIGHT, ge=1)  # at most max_in_flight
    request_timeout: float = Field(default=600.0, gt=0.0)
    connect_timeout: float = Field(default=10.0, gt=0.0)
    retry_deadline: float = Field(default=600.0, ge=0.0)
    startup_wait: float = Field(default=0.0, ge=0.0)
    judge_constraint: Literal["auto", "structured_outputs", "guided_choice", "json_schema"] = "auto"
    # Steer each endpoint's limit by its server's own queue where it reports one (vLLM's and
    # SGLang's Prometheus metrics at /metrics): `engines/serverqueue.py`.
    server_queue: bool = True

    @model_validator(mode="before")
    @classmethod
    def _initial_from_maximum(cls, data: Any) -> Any:
        """Left out, the starting limit is 8 or the maximum if that is lower: `max_in_flight:
        4` alone must not be refused for a default it never named."""
        if isinstance(data, dict) and "initial_in_flight" not in data:
            maximum = data.get("max_in_flight")
            if type(maximum) is int and maximum >= 1:
                return {**data, "initial_in_flight": min(INITIAL_IN_FLIGHT, maximum)}
        return data

    @model_validator(mode="after")
    def _initial_within_maximum(self) -> OpenAISettings:
        if self.initial_in_flight > self.max_in_flight:
            raise ValueError(
                f"initial_in_flight {self.initial_in_flight} is above max_in_flight "
                f"{self.max_in_flight}"
            )
        return self


class PipelineSettings(_Strict):
    """The `pipeline:` section: how a base prompt is evolved (not `pipeline.Pipeline`, the
    flow that reads these)."""

    depth_steps: int = Field(default=1, ge=0, le=20)
    # Which depth operator each depth step may draw, and how often (`operators`). The
    # default is the one depth step there was before the others.
    depth_operators: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    fixer: bool = True
    min_answer_chars: int = Field(default=10, ge=0)
    refusal_marker: str = Field(default="不可能", min_length=1)
    drop_truncated_answers: bool = False
    # The filters (`filters.Filters`): off by default, as README's "Filters" explains.
    min_japanese_share: float | None = Field(default=None, gt=0.0, le=1.0)
    drop_leaked_questions: bool = False
    drop_looping_answers: bool = False
    # The elimination rules after evolution (README, "Elimination rules"): off by default,
    # like the filters, for the same reasons.
    drop_depth_no_gain: bool = False
    drop_depth_leaked: bool = False
    drop_non_answers: bool = False
    # Multi-turn conversations (README, "Multi-turn conversations"): after the answer, up to
    # `turns - 1` follow-up questions, each judged, filtered and answered with the whole
    # conversation as context. A later turn that fails ends the conversation at its last good
    # turn (`keep`, the reason counted) or drops the record (`drop`, as `turn_<reason>`).
    turns: int = Field(default=1, ge=1, le=20)
    failed_turn: Literal["keep", "drop"] = "keep"
    # A judge's はい whose probability (where the engine gives one) is below this counts as a
    # いいえ (`confidence`). None is off.
    min_judge_confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    concurrency: int | None = Field(default=None, ge=1)

    @field_validator("depth_operators")
    @classmethod
    def _known_operators(cls, value: dict[str, float]) -> dict[str, float]:
        return checked_weights(value)

    @property
    def default_operators(self) -> bool:
        """Whether depth is the one step it always was: then traces, funnels and records
        name no operator, and read byte for byte as they did before operators existed."""
        return self.depth_operators == DEFAULT_WEIGHTS

    def optional_templates(self) -> tuple[str, ...]:
        """The templates beyond the original seven that these settings send: the drawn
        operators', the no-gain judge's and, with more than one turn, the follow-up's and its
        judge's. Only these are frozen with a run, so the
        fingerprint of a run that uses none of them is what it always was."""
        if not self.depth_steps:  # no depth step: no operator drawn, nothing to compare
            names = []
        else:
            names = [TEMPLATES[o] for o in self.depth_operators if TEMPLATES[o] != "depth"]
        if self.drop_depth_no_gain and self.depth_steps:
            names.append("same_request")
        if self.turns > 1:
            names += ["follow_up", "follow_up_judge"]
        return tuple(names)


class Prompts(_Strict):
    """Where base prompts come from.

    `builtin` crosses the shipped task and domain lists; `tasks_domains` crosses the user's own
    lists; `file` reads one prompt per line (`.txt`) or one JSON object per line (`.jsonl`).
    Left out, `source` follows from the files given.
    """

    source: Literal["builtin", "tasks_domains", "file"] = "builtin"
    tasks_file: LaxPath | None = None
    domains_file: LaxPath | None = None
    file: LaxPath | None = None
    field: str = Field(default="prompt", min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _infer_source(cls, data: Any) -> Any:
        if isinstance(data, dict) and "source" not in data:
            if data.get("file") is not None:
                return {**data, "source": "file"}
            if data.get("tasks_file") is not None or data.get("domains_file") is not None:
                return {**data, "source": "tasks_domains"}
        return data

    @model_validator(mode="after")
    def _files_match_source(self) -> Prompts:
        given = {k for k in ("tasks_file", "domains_file", "file") if getattr(self, k)}
        wanted = {
            "builtin": set(),
            "tasks_domains": {"tasks_file", "domains_file"},
            "file": {"file"},
        }[self.source]
        if given - wanted:
            raise ValueError(f"{sorted(given - wanted)[0]} is set but source is {self.source!r}")
        if wanted - given:
            raise ValueError(f"source {self.source!r} needs {' and '.join(sorted(wanted))}")
        if self.file is not None and self.file.suffix.lower() not in (".txt", ".jsonl"):
            raise ValueError(f"file {self.file.name}: use a .txt or a .jsonl file")
        return self


class Config(_Strict):
    # --- the original model_config.yml keys, same names and meaning ---
    model_name: str = Field(min_length=1, pattern=r"\S")
    quantization: str | None = Field(default=None, min_length=1)
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
    # Above 1.0, tokens already in the prompt or the text are made less likely: small models
    # otherwise loop (「価値は、価値があるためには…」 until max_tokens). 1.0 leaves sampling as is.
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    engine: str = "vllm"
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    hardware_kwargs: dict[str, Any] = Field(default_factory=dict)
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    sampling: Sampling = Sampling()
    pipeline: PipelineSettings = PipelineSettings()
    prompts: Prompts = Prompts()
    templates: LaxPath | None = None
    system_prompt: str | None = Field(default=None, pattern=r"\S")
    # Which served model each step asks (`engine: openai`); a step not named asks model_name.
    step_models: dict[str, str] = Field(default_factory=dict)
    openai: OpenAISettings = OpenAISettings()

    @field_validator("engine")
    @classmethod
    def _engine_form(cls, value: str) -> str:
        if not ENGINE_SPEC.match(value):
            raise ValueError("must be 'vllm', 'openai' or 'package.module:ClassName'")
        return value

    @field_validator("step_models")
    @classmethod
    def _known_steps(cls, value: dict[str, str]) -> dict[str, str]:
        for step, model in value.items():
            if step not in STEPS:
                raise ValueError(f"unknown step {step!r} (the steps: {', '.join(STEPS)})")
            if not model.strip():
                raise ValueError(f"{step}: empty model name")
        return value

    @model_validator(mode="after")
    def _engine_sections_fit(self) -> Config:
        """Settings only one engine reads are refused with another: silently ignored, they
        would make a dataset nobody asked for (a judge model that never judged)."""
        if self.engine == "vllm":
            if self.step_models:
                raise ValueError(
                    "step_models: only engine openai routes steps to other models "
                    "(engine vllm serves model_name alone)"
                )
            if self.openai != OpenAISettings():
                raise ValueError("openai: this section is for engine openai (engine is vllm)")
        if self.engine == "openai":
            self._check_openai()
        return self

    def _check_openai(self) -> None:
        if self.chat_template is not None:
            raise ValueError(
                "chat_template: engine openai cannot set it (the server applies its own chat "
                "template; chat_template_kwargs are passed to it)"
            )
        unserved = [m for m in self.served_models() if m not in self.openai.models]
        if unserved and not self.openai.endpoints:
            raise ValueError(
                f"openai.endpoints: required with engine openai (model {unserved[0]!r} is "
                "not in openai.models)"
            )

    def step_model(self, step: str) -> str:
        """The model a step asks: its `step_models` entry, else `model_name`."""
        return self.step_models.get(step, self.model_name)

    def served_models(self) -> list[str]:
        """Every model some step asks, in step order, each once."""
        return list(dict.fromkeys(self.step_model(step) for step in STEPS))

    @field_validator("system_prompt")
    @classmethod
    def _system_prompt_plain(cls, value: str | None) -> str | None:
        """Checked like a template, so `{{` and `}}` are literal braces here too."""
        if value is not None and placeholders(value):
            raise ValueError(
                "the output system prompt takes no {placeholders} "
                "(write '{{' and '}}' for literal braces)"
            )
        return value

    @model_validator(mode="after")
    def _lengths_fit(self) -> Config:
        if self.max_model_len is None:
            return self
        for step in STEPS:
            tokens = getattr(self.sampling, step).max_tokens or self.max_tokens
            if tokens >= self.max_model_len:
                raise ValueError(
                    f"{step} may generate {tokens} tokens, which leaves no room for its prompt "
                    f"within max_model_len {self.max_model_len}"
                )
        return self

    def engine_options(self) -> dict[str, Any]:
        """Engine arguments: `engine_kwargs` (they may shape the data, so a run freezes them)
        with this machine's `hardware_kwargs` (batching, memory, eager mode...) on top."""
        return {**self.engine_kwargs, **self.hardware_kwargs}

    def concurrency(self) -> int:
        """Records in flight at once. Four times the engine's slots keeps every slot fed
        while many records sit between their sequential requests, and leaves the engine a
        queue to refill its batch from (measured in docs/benchmarks.md)."""
        return self.pipeline.concurrency or 4 * self.batch_size


# Settings added after run format 2, with the value every config made before them has. At
# that value they are left out of a dump (`zoi config show`, run.json and its spec), so the
# files and fingerprints of configs that do not use them stay exactly as they were.
ADDED_SETTINGS: dict[str, Any] = {
    "step_models": {},
    "openai": OpenAISettings().model_dump(mode="json"),
}
# The same for pipeline settings added after `zoi config show` and run.json's config copy
# last changed (the depth operators and the elimination rules); `rundir` leaves them out of
# the spec too, with the older ones.
HIDDEN_PIPELINE_DEFAULTS: dict[str, Any] = {
    "depth_operators": DEFAULT_WEIGHTS,
    "drop_depth_no_gain": False,
    "drop_depth_leaked": False,
    "drop_non_answers": False,
    "turns": 1,
    "failed_turn": "keep",
}
# The same for sampling overrides of steps added since (the follow-up question's): left out
# of a dump, and of the spec, while they inherit everything.
HIDDEN_SAMPLING_DEFAULTS: dict[str, Any] = {"follow_up": StepSampling().model_dump(mode="json")}


def config_data(config: Config) -> dict[str, Any]:
    """The config as JSON data, the added settings left out where they are at their default."""
    data = config.model_dump(mode="json")
    for key, before in ADDED_SETTINGS.items():
        if data[key] == before:
            del data[key]
    for key, before in HIDDEN_PIPELINE_DEFAULTS.items():
        if data["pipeline"][key] == before:
            del data["pipeline"][key]
    hide_sampling_defaults(data)
    return data


def hide_sampling_defaults(data: dict[str, Any]) -> None:
    """Take out of a dumped config the step sampling overrides added since run.json's copy
    last changed, where they are at their default (`HIDDEN_SAMPLING_DEFAULTS`)."""
    for step, before in HIDDEN_SAMPLING_DEFAULTS.items():
        if data["sampling"][step] == before:
            del data["sampling"][step]


def _format_location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = _format_location(err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    message = err["msg"].removeprefix("Value error, ")
    shown = repr(_redacted(err.get("input")))
    secret = bool(err["loc"]) and err["loc"][-1] == "api_key_env"  # may be a key: never echo it
    if secret or len(shown) > 60 or isinstance(err.get("input"), dict):
        return f"{where}: {message}"
    return f"{where}: {message} (got {shown})"


def _redacted(value: Any) -> Any:
    """`value` as an error may show it: a URL's user, password, query and fragment (where
    keys are pasted: `http://user:KEY@host`, `?api_key=KEY`) become `***`, in a list too."""
    if isinstance(value, list):
        return [_redacted(item) for item in value]
    if not isinstance(value, str) or "://" not in value:
        return value
    scheme, _, rest = value.partition("://")
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    path, mark, _ = tail.partition("?") if "?" in tail else tail.partition("#")
    return f"{scheme}://{netloc}{path}{mark and mark + '***'}"


def _resolve(path: Path | None, base: Path) -> Path | None:
    if path is None:
        return None
    path = path.expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _resolve_chat_template(value: str | None, base: Path, source: str) -> str | None:
    """A `chat_template` without braces is a file path, relative to the config file."""
    if value is None or "{" in value:
        return value
    path = _resolve(Path(value), base)
    assert path is not None
    if not path.is_file():
        raise ConfigError(f"{source}: chat_template: file {path} not found")
    return str(path)


def _resolve_paths(config: Config, base: Path, source: str) -> Config:
    """Relative file paths in a config mean relative to the config file, not to the shell's
    working directory, so a run behaves the same wherever it is started from."""
    prompts = config.prompts.model_copy(
        update={
            "tasks_file": _resolve(config.prompts.tasks_file, base),
            "domains_file": _resolve(config.prompts.domains_file, base),
            "file": _resolve(config.prompts.file, base),
        }
    )
    update: dict[str, Any] = {
        "prompts": prompts,
        "templates": _resolve(config.templates, base),
        "chat_template": _resolve_chat_template(config.chat_template, base, source),
    }
    model = Path(config.model_name).expanduser()
    served = config.engine == "openai"  # a name the server knows, not a path of this machine
    if not served and (config.model_name.startswith((".", "~")) or (base / model).is_dir()):
        update["model_name"] = str(_resolve(model, base))
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
    check_engine_arguments(config, source)
    return _resolve_paths(config, base, source) if base is not None else config


def check_engine_arguments(config: Config, source: str) -> None:
    """The built-in engines' arguments are known, so they are checked when the config loads
    (and before a worker builds its engine from a run's frozen config); another engine
    reads its own `engine_kwargs` and `hardware_kwargs` and answers for them itself."""
    if config.engine == "vllm":
        from .engines.vllm import check_arguments
    elif config.engine == "openai":
        from .engines.openai import check_arguments
    else:
        return
    try:
        check_arguments(config.engine_kwargs, config.hardware_kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | Path) -> Config:
    path = Path(path)
    data = read_yaml(path, "config", ConfigError)
    return parse_config(data, str(path), base=path.resolve().parent)


def dump_config(config: Config) -> str:
    """The effective config as YAML, defaults included: what `zoi config show` prints."""
    import yaml

    data = config_data(config)
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
