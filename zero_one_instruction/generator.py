"""The single-process generator behind `zoi generate` and `zoi preview`: one engine, one range
of base prompts, records in index order. No queue; the queue-based run builds on the same
pipeline."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack, aclosing
from pathlib import Path

from .config import Config
from .engines import load_engine
from .pipeline import Outcome, Pipeline, Tally
from .records import atomic_file, dumps, original_record
from .seeds import PromptSource, load_source
from .templates import Templates, load_templates

Progress = Callable[[Outcome], None]


def load_inputs(config: Config) -> tuple[Templates, PromptSource]:
    """Templates and base prompts, validated before any model is loaded: a typo should cost
    a second, not an engine start."""
    templates = load_templates(config.templates, config.system_prompt)
    return templates, load_source(config.prompts, templates.seed)


async def evolve_range(
    config: Config,
    inputs: tuple[Templates, PromptSource],
    start: int,
    end: int,
    on_outcome: Progress,
) -> Tally:
    """Run prompts [start, end) through a fresh engine, handing each outcome over in order."""
    templates, source = inputs
    tally = Tally()
    engine = load_engine(config)
    try:
        pipeline = Pipeline(config, templates, source, engine)
        async with aclosing(pipeline.run(range(start, end))) as outcomes:
            async for outcome in outcomes:
                tally.add(outcome)
                on_outcome(outcome)
    finally:
        engine.close()
    return tally


async def generate(
    config: Config,
    inputs: tuple[Templates, PromptSource],
    start: int,
    end: int,
    output: Path,
    id_start: int = 0,
    trace: Path | None = None,
    progress: Progress | None = None,
) -> Tally:
    """Write kept records to `output` (ids `record_<id_start>`...) and, if asked, every
    outcome with its full trace to `trace`. Both files appear only if the run completes."""
    system = inputs[0].output_system_prompt
    next_id = id_start
    with ExitStack() as stack:
        out = stack.enter_context(atomic_file(output, follow_links=True))
        trace_out = stack.enter_context(atomic_file(trace, follow_links=True)) if trace else None

        def write(outcome: Outcome) -> None:
            nonlocal next_id
            if outcome.kept:
                record = original_record(
                    f"record_{next_id}", outcome.question or "", outcome.answer or "", system
                )
                out.write(dumps(record))
                next_id += 1
            if trace_out is not None:
                trace_out.write(dumps(outcome.to_dict()))
            if progress is not None:
                progress(outcome)

        return await evolve_range(config, inputs, start, end, write)
