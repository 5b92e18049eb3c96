"""The model-hub source of the real model: Qwen2.5-1.5B-Instruct (Apache-2.0) by its hub id.

It is the better model (a general small instruct model with good Japanese) where the hub can
be reached; whether it can is looked at cheaply here before anything is downloaded, so that
`auto` can fall back to the registry without waiting on a download that cannot start.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import EnvironmentFailure


@dataclass(frozen=True)
class HubModel:
    """A model on the hub, fetched by its id (the resolved commit goes into the stamp)."""

    name: str
    repo_id: str
    licence: str
    origin: str
    revision: str = "main"


HUB_MODEL = HubModel(
    name="Qwen2.5-1.5B-Instruct",
    repo_id="Qwen/Qwen2.5-1.5B-Instruct",
    licence="Apache-2.0 (Alibaba Cloud, Qwen team)",
    origin="Hugging Face hub: Qwen/Qwen2.5-1.5B-Instruct",
)

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "merges.txt", "vocab.json", "LICENSE"]


def hub_offline() -> bool:
    """Whether the environment says the hub is off limits (the hub libraries' own switches)."""
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_reachable(timeout: float = 2.0) -> bool:
    """A cheap look before any download: not offline by setting, huggingface_hub installed,
    and one TCP connection to the hub endpoint within `timeout` seconds. No request is sent."""
    if hub_offline():
        return False
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


HubFetcher = Callable[[HubModel, Path], str]


def hub_fetch(model: HubModel, work: Path) -> str:
    """Download the model's weights, tokenizer and configs into `work`; returns the commit."""
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:
        raise EnvironmentFailure(
            "hub: needs huggingface_hub: pip install 'zero-one-instruction[real]'"
        ) from None
    try:
        commit = HfApi().model_info(model.repo_id, revision=model.revision).sha or model.revision
        snapshot_download(
            model.repo_id, revision=commit, local_dir=work, allow_patterns=_HUB_PATTERNS
        )
    except Exception as exc:  # HTTP, connection and disk errors of several libraries
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EnvironmentFailure(f"hub: cannot download {model.repo_id}: {first}") from None
    shutil.rmtree(work / ".cache", ignore_errors=True)
    return commit


def build_from_hub(
    model: HubModel, work: Path, fetch: HubFetcher, report: Callable[[str], None]
) -> dict[str, Any]:
    """Download the model into `work` with `fetch`; returns the stamp's fields for this source."""
    report(f"downloading {model.repo_id} from the model hub")
    commit = fetch(model, work)
    return {
        "model": model.name,
        "source": "hub",
        "licence": model.licence,
        "origin": model.origin,
        "revision": commit,
    }
