"""`zoi generate` as a user runs it: a process, the shipped demo config, the real engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(os.environ.get("ZOI_SKIP_VLLM") == "1", reason="ZOI_SKIP_VLLM=1"),
]
ROOT = Path(__file__).resolve().parent.parent


def engine_processes() -> set[int]:
    """Live vLLM engine processes anywhere on the machine. vLLM renames them (VLLM::EngineCore,
    VLLM::Worker), which also overwrites their environment, so they are found by name; an
    orphan is one that appears during a run and outlives it."""
    found = set()
    for proc in psutil.process_iter(["name", "status"]):
        if proc.info["name"].startswith("VLLM::") and proc.info["status"] != "zombie":
            found.add(proc.pid)
    return found


def generate(config: Path, out: Path) -> subprocess.CompletedProcess[str]:
    before = engine_processes()
    zoi = Path(sys.executable).parent / "zoi"
    command = [str(zoi), "generate", "-c", str(config), "--start", "0", "--end", "10"]
    done = subprocess.run(
        [*command, "-o", str(out)], capture_output=True, text=True, timeout=600, check=False
    )
    assert engine_processes() - before == set(), "engine processes outlived zoi generate"
    return done


def test_generate_on_vllm_is_valid_reproducible_and_leaves_nothing(
    tiny_model: Path, tmp_path: Path
) -> None:
    data = yaml.safe_load((ROOT / "examples" / "tiny_cpu.yml").read_text(encoding="utf-8"))
    data["model_name"] = str(tiny_model)
    config = tmp_path / "tiny.yml"
    config.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")

    first = generate(config, tmp_path / "a.jsonl")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "prompts   10" in first.stdout and "kept" in first.stdout
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text("utf-8").splitlines()]
    assert records, first.stdout
    assert [r["id"] for r in records] == [f"record_{i}" for i in range(len(records))]
    for record in records:
        assert [turn["from"] for turn in record["conversation"]] == ["system", "human", "gpt"]
        assert record["conversation"][1]["value"] == record["input"]
        assert record["conversation"][2]["value"] == record["output"]

    second = generate(config, tmp_path / "b.jsonl")
    assert second.returncode == 0, second.stderr[-3000:]
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
