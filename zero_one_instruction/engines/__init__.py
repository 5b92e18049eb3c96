"""Engines turn chat requests into completions; see `base` for the contract.

The engine a config names is found here, not in `base`: the default engine (`vllm`) builds on
the contract, so the contract must not import it.
"""

from __future__ import annotations

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
    "engine_class",
    "load_engine",
]


def engine_class(spec: str) -> type:
    """`vllm` or `package.module:ClassName` -> the class, with import errors as config errors."""
    if spec == "vllm":
        from .vllm import VLLMEngine

        return VLLMEngine
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


def load_engine(config: Config) -> Engine:
    """Build the engine the config names. This is where a model gets loaded: call it once."""
    return engine_class(config.engine)(config)
