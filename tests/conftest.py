"""Shared fixtures. Tests that need the real vLLM engine are marked `vllm`; those that also
need `vllm serve` (tests/servedvllm.py) are marked `served` too."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from zero_one_instruction.pipeline import Pipeline
from zero_one_instruction.prompt_sources import PromptSource
from zero_one_instruction.templates import load_templates

from .scripted_engine import ScriptedEngine, scripted_config
from .servedvllm import (
    fault_proxy,
    tiny_config_file,
    vllm_reference,
    vllm_server,
    vllm_server_session,
)

__all__ = [
    "fault_proxy",
    "make_pipeline",
    "tiny_config_file",
    "vllm_reference",
    "vllm_server",
    "vllm_server_session",
]


def make_pipeline(prompts: list[str], **overrides: object) -> tuple[Pipeline, ScriptedEngine]:
    """A pipeline over the scripted engine and a fixed list of base prompts."""
    config = scripted_config(**overrides)
    engine = ScriptedEngine(config)
    source = PromptSource("test prompts", prompts, "test")
    return Pipeline(config, load_templates(), source, engine), engine


@pytest.fixture
def signals() -> Iterator[None]:
    """An in-process worker installs its own stop handlers: give the test runner its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from zero_one_instruction.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
