"""The single-process generator behind `zoi generate` and `zoi preview`: one engine, one range
of base prompts, records in index order. No queue; the queue-based run builds on the same
pipeline.

`generate` and `preview` are the calls the commands make: each checks its inputs before a model
loads, runs the engine in one event loop and returns what happened; `write_range` and
`evolve_range` are the same work for a caller that already has a loop and its inputs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import ExitStack, aclosing
from dataclasses import dataclass
from pathlib import Path

from .config import Config, load_config
from .encoder import EncodeOptions, Encoder, duplicates_path
from .engines import close_engine, engine_class, start_engine
from .errors import ZoiError
from .outputs import check_output
from .pipeline import Outcome, Pipeline, Tally
from .prompt_sources import PromptSource, load_source
from .records import atomic_file, dumps
from .templates import Templates, load_templates

# The caller's hook for each outcome, in index order (a progress bar, the preview printer).
OnOutcome = Callable[[Outcome], None]


@dataclass(frozen=True)
class Inputs:
    """What a config makes the pipeline read, loaded together: the base prompts of a cross
    product are written by one of the templates."""

    templates: Templates
    source: PromptSource


def load_inputs(config: Config) -> Inputs:
    """Templates and base prompts, validated before any model is loaded: a typo should cost
    a second, not an engine start."""
    templates = load_templates(config.templates, config.system_prompt)
    return Inputs(templates, load_source(config.prompts, templates.base_prompt))


def prepare(config: Config) -> Inputs:
    """Everything that can be checked before a model loads: templates, base prompts and the
    engine class (`zoi config check` promises a usable config)."""
    inputs = load_inputs(config)
    engine_class(config.engine)
    return inputs


@dataclass(frozen=True)
class GenerateReport:
    """What `generate` did: every prompt's outcome added up, and the time from the engine's
    start (included: it is what a user waits for) to the last record; the records written,
    which `dedup` may make fewer than the kept ones, and the sidecar listing what a near
    dedup dropped."""

    funnel: Tally
    seconds: float
    output: Path
    records: int
    duplicates: int = 0
    near_duplicates: int = 0
    dedup: str | None = None
    sidecar: Path | None = None


def generate(
    config_path: Path,
    start: int,
    end: int,
    output: Path,
    options: EncodeOptions | None = None,
    *,
    trace: Path | None = None,
    overwrite: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_outcome: OnOutcome | None = None,
) -> GenerateReport:
    """Evolve base prompts [start, end) of the config at `config_path` into `output`, in one
    process, without Redis, written as `options` say (the way `zoi merge` writes a run). The
    output (and `trace`) is checked first and appears only when the run completes.
    `on_start(prompts)` is called once the inputs are checked, before the engine loads;
    `on_outcome` gets each prompt's outcome in index order."""
    config = load_config(config_path)
    target = check_output(output, config, config_path=config_path, overwrite=overwrite)
    traced = trace and check_output(trace, config, config_path=config_path, overwrite=overwrite)
    if traced == target:
        raise ZoiError(f"{trace}: --trace must not be the output file")
    options = options or EncodeOptions()
    sidecar = duplicates_path(output) if options.dedup == "near" else None
    if (
        sidecar
        and check_output(sidecar, config, config_path=config_path, overwrite=overwrite) == traced
    ):
        raise ZoiError(f"{trace}: --trace must not be {sidecar}, the duplicates dropped")
    inputs = prepare(config)
    began = time.monotonic()
    if on_start is not None:
        on_start(end - start)
    encoder = Encoder(options)
    funnel = asyncio.run(
        write_range(config, inputs, start, end, output, encoder, trace, on_outcome, sidecar)
    )
    seconds = time.monotonic() - began
    counts = (encoder.records, encoder.duplicates, encoder.near_duplicates)
    return GenerateReport(funnel, seconds, output, *counts, options.dedup, sidecar)


def preview(config_path: Path, start: int, end: int, on_outcome: OnOutcome) -> Tally:
    """Run base prompts [start, end) and hand over each outcome with its every step, writing
    nothing: the quick loop for tuning templates and sampling."""
    config = load_config(config_path)
    return asyncio.run(evolve_range(config, prepare(config), start, end, on_outcome))


async def evolve_range(
    config: Config,
    inputs: Inputs,
    start: int,
    end: int,
    on_outcome: OnOutcome,
) -> Tally:
    """Run prompts [start, end) through a fresh engine, handing each outcome over in order."""
    tally = Tally()
    engine = await start_engine(config)
    try:
        pipeline = Pipeline(config, inputs.templates, inputs.source, engine)
        async with aclosing(pipeline.run(range(start, end))) as outcomes:
            async for outcome in outcomes:
                tally.add(outcome)
                on_outcome(outcome)
    finally:
        await close_engine(engine)
    return tally


async def write_range(
    config: Config,
    inputs: Inputs,
    start: int,
    end: int,
    output: Path,
    encoder: Encoder | None = None,
    trace: Path | None = None,
    on_outcome: OnOutcome | None = None,
    sidecar: Path | None = None,
) -> Tally:
    """Write kept records to `output` through `encoder` (the default: the original format,
    ids from `record_0`) and, if asked, every outcome with its full trace to `trace` and
    the records `encoder` drops as duplicates to `sidecar`. The files appear only if the run
    completes."""
    encoder = encoder or Encoder()
    system = inputs.templates.output_system_prompt
    with ExitStack() as stack:
        out = stack.enter_context(atomic_file(output, binary=True, follow_links=True))
        trace_out = stack.enter_context(atomic_file(trace, follow_links=True)) if trace else None
        if sidecar is not None:
            removed = stack.enter_context(atomic_file(sidecar, binary=True, follow_links=True))
            encoder.removed = removed.write

        def write(outcome: Outcome) -> None:
            line = encoder.outcome(outcome, system) if outcome.kept else None
            if line is not None:
                out.write(line)
            if trace_out is not None:
                trace_out.write(dumps(outcome.to_dict()))
            if on_outcome is not None:
                on_outcome(outcome)

        tally = await evolve_range(config, inputs, start, end, write)
    encoder.commit()
    return tally
