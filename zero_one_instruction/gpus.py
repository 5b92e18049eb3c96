"""Counting GPUs without initialising CUDA, so the counting process can still fork or spawn
workers that each pick their own devices."""

from __future__ import annotations

import os
import shutil
import subprocess


def visible_gpu_count() -> int:
    """GPUs this process may use: `CUDA_VISIBLE_DEVICES` if set, else what nvidia-smi lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return len([line for line in out.splitlines() if line.strip()])


def largest_power_of_two(n: int) -> int:
    """The original tool's tensor-parallel default: the largest power of two not above n."""
    return 1 << (max(n, 1).bit_length() - 1)


def default_tensor_parallel_size() -> int:
    return largest_power_of_two(visible_gpu_count())
