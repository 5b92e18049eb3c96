"""Every benchmark at tiny sizes, so none of them rots. The numbers are in docs/benchmarks.md;
here only that each runs and reports what it claims to measure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def smoke(name: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run_all", "--smoke", "--only", name],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize(
    "name",
    [
        "occupancy",
        "overhead",
        "merge",
        "report_dedup",
        "report_memory",
        "enqueue",
        "scaling",
        "aimd_sim",
    ],
)
def test_benchmark_smoke(name: str) -> None:
    out = smoke(name)
    assert f"## {name}" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table) >= 2, out  # a header and at least one row of numbers


@pytest.mark.vllm
@pytest.mark.skipif(os.environ.get("ZOI_SKIP_VLLM") == "1", reason="ZOI_SKIP_VLLM=1")
def test_real_engine_benchmark_smoke() -> None:
    out = smoke("real_engine")
    row = [line for line in out.splitlines() if line.startswith("| 8 ")]
    assert row, out
    ratio = float(row[0].strip("| ").split("|")[-1])
    assert ratio > 0


@pytest.mark.vllm
@pytest.mark.served
@pytest.mark.skipif(os.environ.get("ZOI_SKIP_VLLM") == "1", reason="ZOI_SKIP_VLLM=1")
def test_served_benchmark_smoke() -> None:
    """zoi worker (engine openai) and a plain client through the same `vllm serve`: both
    generated tokens, and the server left no process (its stop asserts that)."""
    out = smoke("served")
    row = [line for line in out.splitlines() if line.startswith("| 8 ")]
    assert row, out
    cells = [cell.strip() for cell in row[0].strip("| ").split("|")]
    ours = [float(rate.replace(",", "")) for rate in cells[4].split(", ")]
    plain, ratio = float(cells[5].replace(",", "")), float(cells[6])
    assert len(ours) == 2 and min(ours) > 0 and plain > 0 and ratio > 0
