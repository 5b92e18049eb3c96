"""GPUs and GPU groups, found without initialising CUDA: the launcher must stay free of CUDA
so the workers it starts can each pick their own devices."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

from .errors import ZoiError


class GpuError(ZoiError):
    """A GPU selection that this machine cannot satisfy."""


def visible_gpus() -> list[str]:
    """GPU ids this process may use: `CUDA_VISIBLE_DEVICES` if set, else nvidia-smi's list
    (NVML's order, PCI bus order). Empty on a machine without NVIDIA GPUs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def cuda_environment(group: Sequence[str]) -> dict[str, str]:
    """The environment variables that give a worker process the GPUs `group` (ids as
    `visible_gpus` lists them), for the launcher's workers and `zoi worker --gpus` alike.

    CUDA numbers devices fastest first unless told otherwise, while nvidia-smi (and so
    `visible_gpus`) numbers them in PCI bus order: on a machine with mixed cards, `--gpus 1`
    would be one card to the user and another to CUDA. An empty group (a CPU worker) sets
    nothing."""
    if not group:
        return {}
    return {"CUDA_VISIBLE_DEVICES": ",".join(group), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def visible_gpu_count() -> int:
    return len(visible_gpus())


def largest_power_of_two(n: int) -> int:
    """The original tool's tensor-parallel default: the largest power of two not above n."""
    return 1 << (max(n, 1).bit_length() - 1)


def default_tensor_parallel_size() -> int:
    return largest_power_of_two(visible_gpu_count())


def select(available: list[str], gpus: str | None, num_gpus: int | None) -> list[str]:
    """The GPUs a run may use: `--gpus 0,2` (ids that must exist), `--num-gpus G` (the first
    G), or every visible one."""
    if gpus is not None and num_gpus is not None:
        raise GpuError("give --gpus or --num-gpus, not both")
    shown = ", ".join(available) or "none"
    if gpus is not None:
        wanted = [g.strip() for g in gpus.split(",") if g.strip()]
        if not wanted:
            raise GpuError("--gpus: give GPU ids such as 0,1")
        if len(set(wanted)) != len(wanted):
            raise GpuError(f"--gpus {gpus}: a GPU is listed twice")
        for gpu in wanted:
            if gpu not in available:
                raise GpuError(f"--gpus: GPU {gpu} does not exist (visible GPUs: {shown})")
        return wanted
    if num_gpus is not None:
        if num_gpus > len(available):
            raise GpuError(f"--num-gpus {num_gpus}: only {len(available)} GPUs visible ({shown})")
        return available[:num_gpus]
    return list(available)


def groups(gpus: list[str], tp: int | None) -> tuple[list[list[str]], list[str]]:
    """GPU groups, one worker each, and the GPUs left idle.

    Without `tp`, as the original tool did: a power-of-two count is one group of all GPUs,
    otherwise descending powers of two (7 -> 4+2+1). With `tp`, groups of `tp` GPUs, and what
    does not fill a group stays idle.
    """
    if tp is not None:
        if tp < 1:
            raise GpuError("--tp must be at least 1")
        if tp > len(gpus):
            raise GpuError(f"--tp {tp} is larger than the GPU count ({len(gpus)})")
        full = len(gpus) // tp * tp
        return [gpus[i : i + tp] for i in range(0, full, tp)], gpus[full:]
    out, rest = [], list(gpus)
    while rest:
        size = largest_power_of_two(len(rest))
        out.append(rest[:size])
        rest = rest[size:]
    return out, []
