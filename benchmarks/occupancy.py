"""Engine occupancy: our pipeline against the original tool's stage-by-stage batches, on the
same simulated continuous-batching engine (benchmarks/sim_engine.py).

Policies:
- `original`: every 32 base prompts go through each step as one batch that waits for its
  slowest item (width, judge, fixer and re-judge for the rejected, depth x N, flatten, judge,
  answer); then the next 32.
- `zoi, no overlap`: one coroutine per prompt, a chunk at a time; the next chunk starts when
  the last prompt of the previous one is done.
- `zoi`: what `zoi worker` does. A limit of 4 x S prompts in flight is shared by every chunk,
  and the next chunk starts once the current one's last prompt has started.

Reported: slot occupancy (busy slot-steps / all slot-steps) and makespan against the ideal
(every decode token in a full slot).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from zero_one_instruction.config import Config
from zero_one_instruction.generator import load_inputs
from zero_one_instruction.pipeline import JUDGE_CHOICES, YES, JudgeKind, Pipeline

from .common import command_line
from .sim_engine import SimEngine

ORIGINAL_BATCH = 32


@dataclass
class Result:
    policy: str
    slots: int
    chunk: int
    prompts: int
    occupancy: float
    makespan_over_ideal: float


def make(slots: int) -> tuple[Pipeline, SimEngine]:
    config = Config(
        model_name="simulated",
        engine="benchmarks.sim_engine:SimEngine",
        batch_size=slots,
        max_tokens=1024,
        max_model_len=8192,
    )
    engine = SimEngine(config)
    inputs = load_inputs(config)
    return Pipeline(config, inputs.templates, inputs.source, engine), engine


async def evolve_chunk(
    pipeline: Pipeline,
    chunk: range,
    slots: asyncio.Semaphore,
    started: Callable[[], None] = lambda: None,
) -> None:
    """One chunk on the shared slots, as the worker's engine host runs it."""
    async for _ in pipeline.run(chunk, slots, started):
        pass


async def zoi_overlap(pipeline: Pipeline, chunks: list[range]) -> None:
    slots = asyncio.Semaphore(pipeline.config.concurrency())
    tasks = []
    for chunk in chunks:
        started = asyncio.Event()
        tasks.append(asyncio.ensure_future(evolve_chunk(pipeline, chunk, slots, started.set)))
        await started.wait()
    await asyncio.gather(*tasks)


async def zoi_chunk_by_chunk(pipeline: Pipeline, chunks: list[range]) -> None:
    slots = asyncio.Semaphore(pipeline.config.concurrency())
    for chunk in chunks:
        await evolve_chunk(pipeline, chunk, slots)


async def _batch_step(
    pipeline: Pipeline,
    items: dict[int, str],
    step: Any,
    judge: JudgeKind | None = None,
    depth: int | None = None,
) -> dict[int, str]:
    choices = JUDGE_CHOICES if judge is not None else None
    values = {"refusal_marker": "不可能"}
    key = "prompt" if step != "answer" else "question"
    requests = {
        i: pipeline.request(i, step, choices, {key: text, **values}, judge=judge, depth=depth)
        for i, text in items.items()
    }
    done = await asyncio.gather(*(pipeline.engine.complete(r) for r in requests.values()))
    return {i: c.text for i, c in zip(requests, done, strict=True)}


async def original(pipeline: Pipeline, chunks: list[range]) -> None:
    """The original main.py: each step a batch over 32 prompts, waiting for its slowest item."""
    indices = [i for chunk in chunks for i in chunk]
    depth_steps = pipeline.config.pipeline.depth_steps
    for offset in range(0, len(indices), ORIGINAL_BATCH):
        group = indices[offset : offset + ORIGINAL_BATCH]
        items = await _batch_step(pipeline, {i: pipeline.source.prompt(i) for i in group}, "width")
        verdicts = await _batch_step(pipeline, items, "judge", JudgeKind.FIRST)
        rejected = {i: t for i, t in items.items() if verdicts[i] != YES}
        if rejected:
            fixed = await _batch_step(pipeline, rejected, "fix")
            again = await _batch_step(pipeline, fixed, "judge", JudgeKind.AFTER_FIX)
            items = {i: t for i, t in items.items() if verdicts[i] == YES}
            items.update({i: t for i, t in fixed.items() if again[i] == YES})
        for depth in range(depth_steps):
            items = await _batch_step(pipeline, items, "depth", depth=depth)
        items = await _batch_step(pipeline, items, "flatten")
        final = await _batch_step(pipeline, items, "judge", JudgeKind.FINAL)
        items = {i: t for i, t in items.items() if final[i] == YES}
        await _batch_step(pipeline, items, "answer")


POLICIES: dict[str, Callable[[Pipeline, list[range]], Awaitable[None]]] = {
    "original (batches of 32)": original,
    "zoi, no chunk overlap": zoi_chunk_by_chunk,
    "zoi (worker policy)": zoi_overlap,
}


def measure(policy: str, slots: int, chunk: int, chunks: int) -> Result:
    pipeline, engine = make(slots)
    ranges = [range(c * chunk, (c + 1) * chunk) for c in range(chunks)]
    asyncio.run(POLICIES[policy](pipeline, ranges))
    return Result(
        policy,
        slots,
        chunk,
        chunk * chunks,
        engine.occupancy(),
        engine.clock_ms / engine.ideal_ms(),
    )


def run(smoke: bool = False) -> list[Result]:
    slots_list = [8] if smoke else [32, 64]
    results = []
    for slots in slots_list:
        for multiple in [1, 4] if smoke else [1, 4, 16]:
            chunk = multiple * slots
            chunks = 2 if smoke else max(3, 2048 // chunk)
            for policy in POLICIES:
                results.append(measure(policy, slots, chunk, chunks))
    return results


def report(results: list[Result]) -> str:
    lines = [
        "| policy | slots S | chunk | prompts | occupancy | makespan / ideal |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.policy} | {r.slots} | {r.chunk} ({r.chunk // r.slots}×S) | {r.prompts} | "
            f"{100 * r.occupancy:.1f}% | {r.makespan_over_ideal:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    command_line(sys.modules[__name__])


if __name__ == "__main__":
    main()
