"""Engines turn chat requests into completions; see `base` for the contract.

The engine a config names is found here, not in `base`: the default engine (`vllm`) builds on
the contract, so the contract must not import it.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import (
    Completion,
    Engine,
    EngineDead,
    Message,
    Request,
    RequestError,
    Step,
)

if TYPE_CHECKING:
    from ..config import Config

__all__ = [
    "Completion",
    "Engine",
    "EngineDead",
    "Message",
    "Request",
    "RequestError",
    "Step",
    "check_servers",
    "close_engine",
    "engine_class",
    "holds_gpu",
    "load_engine",
    "start_engine",
]

# Built-in engines by name, and whether their workers need GPUs of their own: vLLM loads the
# model into its process; `openai` only talks to servers that hold the model elsewhere.
BUILTIN_HOLDS_GPU = {"vllm": True, "openai": False}


def engine_class(spec: str) -> type:
    """`vllm`, `openai` or `package.module:ClassName` -> the class, with import errors as
    config errors."""
    if spec == "vllm":
        from .vllm import VLLMEngine

        return VLLMEngine
    if spec == "openai":
        from .openai import OpenAIEngine

        return OpenAIEngine
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, ValueError, TypeError) as exc:
        raise ConfigError(f"engine: cannot import module {module_name!r} ({exc})") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ConfigError(f"engine: {module_name!r} has no class {class_name!r}")
    for method in ("complete", "close"):
        if not callable(getattr(cls, method, None)):
            raise ConfigError(f"engine: {spec} has no {method}() method (see docs/engines.md)")
    return cls


def holds_gpu(config: Config) -> bool:
    """Whether the engine the config names loads a model onto this machine's GPUs. It decides
    what `zoi run` starts: one worker per GPU group (True), or `--workers N` thin workers that
    get no GPU (False). A plug-in engine says so with a class attribute `holds_gpu`; without
    one it is planned as vLLM is, since an engine that loads a model is the safe guess."""
    if config.engine in BUILTIN_HOLDS_GPU:
        return BUILTIN_HOLDS_GPU[config.engine]
    return bool(getattr(engine_class(config.engine), "holds_gpu", True))


def load_engine(config: Config) -> Engine:
    """Build the engine the config names. This is where a model gets loaded: call it once."""
    return engine_class(config.engine)(config)


async def start_engine(config: Config) -> Engine:
    """Build the engine and await its `start()`, if it has one, on the loop it will serve
    from: an engine that talks to servers checks them there, before any record starts, and
    a failed start closes what was built."""
    engine = load_engine(config)
    start = getattr(engine, "start", None)
    if start is not None:
        try:
            await start()
        except BaseException:
            await close_engine(engine)
            raise
    return engine


async def close_engine(engine: Engine) -> None:
    """Close the engine, awaiting its `aclose()` where it has one (connections close on the
    loop), else calling `close()`."""
    aclose = getattr(engine, "aclose", None)
    if aclose is not None:
        await aclose()
    else:
        engine.close()


def check_servers(config: Config) -> None:
    """Start the engine the config names and close it again, if it is one that holds no GPU
    and has a `start()`: an engine that talks to servers, whose start checks them and loads
    nothing. `zoi run` calls it before it starts any worker, so that a wrong URL, key or
    model is the run's one line at once, not each worker's refusal after the queue was set
    up; for any other engine it does nothing."""
    if holds_gpu(config) or getattr(engine_class(config.engine), "start", None) is None:
        return

    async def start_and_close() -> None:
        await close_engine(await start_engine(config))

    asyncio.run(start_and_close())
