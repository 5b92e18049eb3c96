"""Engines turn chat requests into completions; see `base` for the contract."""

from .base import (
    Completion,
    Engine,
    EngineDead,
    Message,
    Request,
    RequestError,
    Step,
    engine_class,
    load_engine,
)

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
