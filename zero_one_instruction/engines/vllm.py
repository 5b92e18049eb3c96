"""The vLLM engine: one `AsyncLLM` for the life of the process.

vLLM is imported here and only here, lazily, so that every other command (config, merge,
status, the producer) starts in a fraction of a second and runs where vLLM is not installed.
The engine must be used from one event loop for its whole life (its output handler is bound to
the loop of the first request), and shut down explicitly: its EngineCore child process does
not notice when its parent dies.
"""

from __future__ import annotations

import ast
import asyncio
import difflib
import importlib.util
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, EnvironmentFailure, ZoiError
from ..gpus import default_tensor_parallel_size
from .base import Completion, EngineDead, Request, RequestError
from .choices import choice_probabilities
from .constraint import choice_room
from .reaper import guard_children

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger(__name__)

_QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",  # `zoi -v` sets INFO
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# The vLLM arguments a machine may set for itself in `hardware_kwargs`. They decide where and
# how fast the same computation runs (memory, batching, scheduling, parallelism, graphs),
# never what is computed: the model and its weights, tokenizer, dtype, quantization, lengths,
# seed and sampling all shape the records, so they belong in `engine_kwargs`, which the
# run's fingerprint covers. Left out on purpose: `kv_cache_dtype` (a lossier KV cache changes
# the text), `compilation_config` (it can swap kernels and fuse ops), `speculative_config`,
# `attention_backend`. Floating-point results may still differ between batch shapes and GPU
# counts, as they do between machines; the run never promised bit-identical logits.
HARDWARE_KEYS = frozenset(
    {
        "gpu_memory_utilization",
        "kv_cache_memory_bytes",
        "num_gpu_blocks_override",
        "swap_space",
        "cpu_offload_gb",
        "block_size",
        "max_num_seqs",
        "max_num_batched_tokens",
        "enable_chunked_prefill",
        "enable_prefix_caching",
        "enforce_eager",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "data_parallel_size",
        "distributed_executor_backend",
        "disable_custom_all_reduce",
        "max_parallel_loading_workers",
        "download_dir",
        "disable_log_stats",
    }
)


@lru_cache(maxsize=1)
def argument_names() -> frozenset[str] | None:
    """The field names of vLLM's `AsyncEngineArgs`, or None when vLLM is not installed (or its
    source is not laid out as expected). Read from vLLM's source, not imported: importing its
    argument module takes about ten seconds, and `zoi config check` must stay instant."""
    try:
        spec = importlib.util.find_spec("vllm")  # finds the package without importing it
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "engine" / "arg_utils.py"
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        names = _dataclass_fields(tree, "AsyncEngineArgs")
        return frozenset(names) if "model" in names else None
    return None


def _dataclass_fields(tree: ast.Module, name: str) -> set[str]:
    """Annotated class attributes of `name` and of its base classes in the same module."""
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    names: set[str] = set()
    todo, seen = [name], set()
    while todo:
        cls = classes.get(todo.pop())
        if cls is None or cls.name in seen:
            continue
        seen.add(cls.name)
        names |= {
            stmt.target.id
            for stmt in cls.body
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
        }
        todo += [base.id for base in cls.bases if isinstance(base, ast.Name)]
    return names


def check_arguments(engine_kwargs: dict[str, Any], hardware_kwargs: dict[str, Any]) -> None:
    """Refuse, before any model loads, what would otherwise fail only in a worker, after it
    was frozen into a run: a key vLLM does not know, and a `hardware_kwargs` key that could
    change the records without changing the run's fingerprint."""
    known = argument_names()  # first: a misspelt hardware key is a typo, not a data key
    for section, kwargs in (("engine_kwargs", engine_kwargs), ("hardware_kwargs", hardware_kwargs)):
        for key in kwargs:
            if known is not None and key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"{section}.{key}: not a vLLM engine argument{hint}")
    for key in hardware_kwargs:
        if key not in HARDWARE_KEYS:
            raise ConfigError(
                f"hardware_kwargs.{key}: not a hardware setting (it can change the records); "
                "set it in engine_kwargs, which the run's fingerprint covers"
            )


def engine_args(config: Config) -> dict[str, Any]:
    """The keyword arguments for vLLM's `AsyncEngineArgs`, from the original config keys.

    `engine_kwargs` and `hardware_kwargs` come last, so users can set any engine argument this
    tool does not name.
    """
    args: dict[str, Any] = {
        "model": config.model_name,
        "quantization": config.quantization,
        "tensor_parallel_size": config.tensor_parallel_size or default_tensor_parallel_size(),
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "max_model_len": config.max_model_len,
        "trust_remote_code": config.trust_remote_code,
        "dtype": config.dtype,
        "max_num_seqs": config.batch_size,
        "seed": config.seed,
    }
    args.update(config.engine_options())
    return args


def _choice_params() -> Any:
    """Constrained-choice decoding across vLLM versions: the API was renamed in 0.11 and the
    old name removed in 0.12."""
    try:
        from vllm.sampling_params import StructuredOutputsParams

        return lambda choices: {"structured_outputs": StructuredOutputsParams(choice=choices)}
    except ImportError:  # vLLM <= 0.10
        from vllm.sampling_params import GuidedDecodingParams

        return lambda choices: {"guided_decoding": GuidedDecodingParams(choice=choices)}


def read_chat_template(value: str | None) -> str | None:
    """`chat_template` may be a path to a Jinja file or the template text itself (text has
    braces, a path has none). A file without a single brace is refused: it cannot render a
    message, and its text, frozen into a run, would later read as a path."""
    if value is None or "{" in value:
        return value
    try:
        text = Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"chat_template: cannot read {value} ({exc})") from None
    if "{" not in text:
        raise ConfigError(f"chat_template: {value} is not a Jinja chat template (no tags)")
    return text


RENDER_THREADS = 4
# Candidates per position for a choice's probability: vLLM's default `max_logprobs` (-1 lifts
# it, 0 turns log-probabilities off and the probability with them), and more than the few
# tokens a constraint between two words leaves allowed.
CHOICE_LOGPROBS = 20


class LengthGuard:
    """Refuses a prompt that cannot fit the context before it is tokenised.

    A token stands for at most `max_chars_per_token` characters (the longest entry of the
    vocabulary, special tokens included), so a prompt whose messages hold more than
    `max_model_len * max_chars_per_token` characters needs more than `max_model_len` tokens
    whatever the template adds: it is bound to fail, and tokenising it first took minutes and
    gigabytes for a 10 MB prompt. This is the bound vLLM itself applies to text prompts; it
    holds for tokenizers that keep every input character (byte-level BPE, SentencePiece with
    byte fallback), and is loose by a wide margin (real text averages a few characters per
    token). Characters, not bytes: a byte-level token's string has one character per byte, and
    a character is at least one byte.
    """

    def __init__(self, max_model_len: int, max_chars_per_token: int) -> None:
        self.max_model_len = max_model_len
        self.max_chars_per_token = max_chars_per_token
        self.max_chars = max_model_len * max_chars_per_token

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, max_model_len: int) -> LengthGuard:
        return cls(max_model_len, max(map(len, tokenizer.get_vocab()), default=1))

    def check(self, request: Request) -> None:
        """Raise `RequestError` for a prompt that is certainly too long; cost: one pass."""
        chars = sum(len(message.content.strip()) for message in request.messages)
        if chars > self.max_chars:
            raise RequestError(
                f"prompt of {chars} characters exceeds the maximum context length of "
                f"{self.max_model_len} tokens (at most {self.max_chars} characters fit, "
                f"{self.max_chars_per_token} per token); not tokenised"
            )


class VLLMEngine:
    """An engine over vLLM's async engine, applying the model's chat template itself.

    The chat template and the tokenizer run in threads: rendering a long prompt takes seconds
    of CPU, and on the event loop it would stall every other request in flight (vLLM's own
    output handling included). vLLM tokenises from a thread pool the same way.
    """

    def __init__(self, config: Config) -> None:
        for key, value in _QUIET_ENV.items():
            os.environ.setdefault(key, value)
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams
            from vllm.inputs import TokensPrompt
            from vllm.sampling_params import RequestOutputKind
            from vllm.v1.engine.exceptions import EngineDeadError
        except ImportError as exc:
            raise ZoiError(
                f"engine vllm: cannot import vLLM ({exc}); install 'zero-one-instruction[vllm]' "
                "on GPU machines or run scripts/setup_venv.sh on CPU machines"
            ) from None
        self._sampling_params = SamplingParams
        self._tokens_prompt = TokensPrompt
        self._final_only = RequestOutputKind.FINAL_ONLY
        self._dead_error = EngineDeadError
        self._choice = _choice_params()
        self._chat_template = read_chat_template(config.chat_template)
        self._template_kwargs = dict(config.chat_template_kwargs)
        self._render_pool = ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="zoi-render")
        self._probability_failed = False  # warned once: the probabilities are an extra
        self._choice_logprobs = 0
        try:
            engine_arguments = AsyncEngineArgs(**engine_args(config))
        except TypeError as exc:
            raise ConfigError(
                f"engine_kwargs/hardware_kwargs: not a vLLM engine argument ({exc})"
            ) from None
        log.info("starting vLLM engine for %s", config.model_name)
        # Before the engine exists: a worker killed while a large model loads must not leave
        # a half-started engine holding GPU memory.
        self._reaper = guard_children()
        try:
            self._engine: Any = AsyncLLMEngine.from_engine_args(engine_arguments)
        except BaseException as exc:
            self._reaper.release()
            if not isinstance(exc, Exception):
                raise
            raise EnvironmentFailure(  # out of memory, a busy GPU: not the input's fault
                f"engine vllm: could not start on {config.model_name}: {exc} "
                "(vLLM's log above has the cause)"
            ) from None
        try:
            self._tokenizer = self._engine.get_tokenizer()
            self._length = LengthGuard.for_tokenizer(
                self._tokenizer, self._engine.model_config.max_model_len
            )
            limit = getattr(self._engine.model_config, "max_logprobs", CHOICE_LOGPROBS)
            self._choice_logprobs = CHOICE_LOGPROBS if limit < 0 else min(CHOICE_LOGPROBS, limit)
        except Exception:
            self.close()
            raise
        if self._chat_template is None and not getattr(self._tokenizer, "chat_template", None):
            self.close()
            raise ConfigError(
                f"model_name: {config.model_name} has no chat template; set chat_template "
                "to a Jinja file for it"
            )

    def render(self, request: Request) -> list[int]:
        """The prompt token ids: the messages through the model's own chat template."""
        ids = self._tokenizer.apply_chat_template(
            [m.as_dict() for m in request.messages],
            chat_template=self._chat_template,
            tokenize=True,
            add_generation_prompt=True,
            return_dict=False,
            **self._template_kwargs,
        )
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def _params(self, request: Request) -> Any:
        extra = self._choice(list(request.choices)) if request.choices else {}
        if request.choices and self._choice_logprobs:
            # The structured-output mask is applied to the logits before vLLM takes their
            # log-probabilities, so these are the constrained distribution's (and asking for
            # them changes nothing that is sampled).
            extra["logprobs"] = self._choice_logprobs
        return self._sampling_params(
            temperature=request.temperature,
            top_p=request.top_p,
            repetition_penalty=request.repetition_penalty,
            max_tokens=choice_room(request.max_tokens, request.choices or ()),
            seed=request.seed,
            output_kind=self._final_only,
            **extra,
        )

    async def complete(self, request: Request) -> Completion:
        if self._engine is None:
            raise EngineDead("the vLLM engine was closed")
        self._length.check(request)
        try:
            loop = asyncio.get_running_loop()
            ids = await loop.run_in_executor(self._render_pool, self.render, request)
            prompt = self._tokens_prompt(prompt_token_ids=ids)
            final = None
            async for output in self._engine.generate(
                prompt, self._params(request), uuid.uuid4().hex
            ):
                final = output
        except self._dead_error as exc:
            raise EngineDead(f"vLLM engine died: {exc}") from exc
        except Exception as exc:
            if getattr(self._engine, "errored", False):
                raise EngineDead(f"vLLM engine failed: {exc}") from exc
            raise RequestError(f"{type(exc).__name__}: {exc}") from exc
        if final is None or not final.outputs:
            raise RequestError("vLLM returned no output")
        out = final.outputs[0]
        if out.finish_reason == "abort":
            # vLLM aborts what is in flight when its engine process is signalled: a cut-off
            # text must never become a record. The chunk fails and is retried instead.
            raise EngineDead("vLLM aborted the request (its engine is shutting down)")
        if out.finish_reason == "error":
            raise RequestError("vLLM reported an error for this request")
        text = out.text.strip() if request.choices else out.text
        probabilities = None
        if request.choices and out.logprobs:
            probabilities = await asyncio.get_running_loop().run_in_executor(
                self._render_pool, self._choice_probabilities, request.choices, out
            )
        return Completion(
            text=text,
            finish_reason=out.finish_reason,
            prompt_tokens=len(final.prompt_token_ids or ()),
            completion_tokens=len(out.token_ids),
            choice_probabilities=probabilities,
        )

    def _choice_probabilities(self, choices: tuple[str, ...], out: Any) -> dict[str, float] | None:
        """In a thread, like the chat template: it decodes a few dozen short token lists.
        The probabilities are an extra: whatever goes wrong reading them (an unexpected
        logprob shape, a tokenizer error) leaves them out, and the verdict stands."""
        try:
            positions = [
                {token: entry.logprob for token, entry in (position or {}).items()}
                for position in out.logprobs
            ]
            return choice_probabilities(
                choices,
                list(out.token_ids),
                positions,
                lambda ids: self._tokenizer.decode(list(ids), skip_special_tokens=True),
            )
        except Exception as exc:
            if not self._probability_failed:
                self._probability_failed = True
                log.warning("judge probabilities left out: %s: %s", type(exc).__name__, exc)
            return None

    def close(self) -> None:
        """Stop EngineCore and its workers; safe to call twice."""
        engine, self._engine = self._engine, None
        self._render_pool.shutdown(wait=False, cancel_futures=True)
        if engine is not None:
            engine.shutdown()
            self._reaper.release()
