"""Shared pieces of the benchmarks: running zoi as a user would, timing, tables."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ZOI = str(Path(sys.executable).parent / "zoi")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SCRIPTED = "tests.scripted_engine:ScriptedEngine"


def zoi(*args: str, env: dict[str, str] | None = None) -> float:
    """Run a zoi command to completion; return its wall time in seconds."""
    began = time.perf_counter()
    done = subprocess.run([ZOI, *args], env=env or ENV, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"zoi {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - began


def enqueue(config: Path, run: Path, prompts: int, chunk: int) -> float:
    """`zoi enqueue` of prompts [0, prompts) in chunks; returns the command's wall time."""
    return zoi(
        "enqueue",
        "-c",
        str(config),
        "--run",
        str(run),
        "--num-prompts",
        str(prompts),
        "--chunk-size",
        str(chunk),
    )


def command_line(module: Any) -> None:
    """A benchmark module's `main`: `--smoke` for tiny sizes, then its table."""
    parser = argparse.ArgumentParser(description=(module.__doc__ or "").splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check it runs")
    print(module.report(module.run(parser.parse_args().smoke)))


def workers(run: Path, count: int, *extra: str) -> float:
    """Start `count` burst workers at once; return the wall time until the last exits."""
    began = time.perf_counter()
    procs = [
        subprocess.Popen(
            [ZOI, "worker", "--run", str(run), "--burst", *extra],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"worker failed:\n{err[-2000:]}")
    return time.perf_counter() - began


def scripted_config(directory: Path, delay: float = 0.0, batch_size: int = 32) -> Path:
    config = directory / "scripted.yml"
    config.write_text(
        f"model_name: scripted\nengine: '{SCRIPTED}'\nbatch_size: {batch_size}\n"
        f"hardware_kwargs: {{delay: {delay}}}\n",
        encoding="utf-8",
    )
    return config


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{platform.node()}: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
