"""What the commands print: the reports of the library calls as the terminal text `zoi` shows.

Pure functions from a report to text; `cli.py` decides where the text goes (stdout, or stderr
behind `zoi: warning: `). Keeping the words here lets the library return figures, and a
script that calls the library render them the same way or not at all.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING

import click

from .engines.endpointstats import EndpointFigures, headline
from .merger import describe_ranges
from .operators import OPERATORS
from .pipeline import DROP_REASONS, JudgeKind, Outcome, Tally
from .progress import per_second

if TYPE_CHECKING:  # the queue's modules load RQ: `zoi --help` does without them
    from .generator import GenerateReport
    from .machine import RunReport
    from .merger import MergeReport
    from .producer import EnqueueReport
    from .prompt_sources import PromptSource
    from .realmodel import Ready
    from .report import DataReport
    from .rundir import Run
    from .status import RunStatus


def summary(tally: Tally, seconds: float, timing: str = "") -> str:
    """The funnel and its pace; `timing` says what `seconds` includes."""
    lines = [
        f"prompts   {tally.prompts}",
        f"kept      {tally.kept} ({tally.kept_percent:.1f}%)",
        f"dropped   {sum(tally.dropped.values())}",
    ]
    width = max((len(r) for r in tally.dropped), default=0)
    for reason, count in sorted(tally.dropped.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {reason:<{width}}  {count:>6}  {DROP_REASONS.get(reason, '')}")
    lines += [
        f"fixer ran {tally.fixer_ran}",
        *operators(tally.operators, tally.operators_kept),
        *turns(tally.turns, tally.turns_ended),
        f"tokens    {tally.prompt_tokens} prompt + {tally.completion_tokens} generated",
        f"time      {seconds:.1f} s ({per_second(tally.kept, seconds):.2f} records/s, "
        f"{per_second(tally.tokens, seconds):.0f} tokens/s{timing})",
    ]
    return "\n".join(lines)


def operators(ran: Mapping[str, int], kept: Mapping[str, int]) -> list[str]:
    """The depth steps each operator ran and how many of them are in kept records: a line
    only for a run that draws operators."""
    if not ran:
        return []
    names = sorted(ran, key=lambda name: OPERATORS.index(name) if name in OPERATORS else 99)
    shown = ", ".join(f"{name} {ran[name]} ({kept.get(name, 0)} kept)" for name in names)
    return [f"operators {shown}"]


def turns(records: Mapping[str, int], ended: Mapping[str, int]) -> list[str]:
    """The kept records of a multi-turn run by how many turns they hold, and why those
    whose conversation ended early ended: a line only for a run of more than one turn."""
    if not records and not ended:
        return []
    counts = sorted(records.items(), key=lambda item: -int(item[0]) if item[0].isdigit() else 0)
    shown = ", ".join(f"{n} turn{'' if n == '1' else 's'} {count}" for n, count in counts)
    lines = [f"turns     {shown} (kept records by their turns)"]
    if ended:
        shown = ", ".join(f"{reason} {n}" for reason, n in Counter(ended).most_common())
        lines.append(f"  ended early: {shown}")
    return lines


def all_failed(tally: Tally) -> str | None:
    """A warning when every prompt failed at a request: then the summary alone looks like a
    bad template, while the cause is almost always the engine or its limits."""
    failed = sum(n for reason, n in tally.dropped.items() if reason.endswith("_failed"))
    if tally.prompts and failed == tally.prompts:
        return (
            "every prompt failed at a request; check max_tokens, max_model_len "
            "and the engine (--trace FILE shows each error)"
        )
    return None


def generated(report: GenerateReport) -> str:
    return (
        summary(report.funnel, report.seconds, " incl. engine start")
        + f"\nwrote     {report.records} records to {report.output}"
        + _duplicates(report, report.dedup)
    )


def ran(report: RunReport, dedup: str | None = None) -> str:
    return (
        summary(report.funnel, report.seconds)
        + f"\nwrote     {report.merge.records} records to {report.output} "
        f"(run directory {report.run})" + _duplicates(report.merge, dedup)
    )


def real_model(ready: Ready, seconds: float) -> str:
    """The model, where it came from and how long it took (or that it was already there)."""
    stamp = ready.stamp
    state = "already there" if ready.cached else f"made in {seconds:.0f} s"
    return (
        f"{stamp['model']} ({stamp['source']}, {state}) in {ready.directory}\n"
        f"licence: {stamp['licence']}"
    )


def config_ok(file: object, source: PromptSource) -> str:
    return f"{file}: ok ({len(source)} base prompts from {source.description})"


_JUDGE_LABELS = {
    JudgeKind.FIRST: "judge",
    JudgeKind.AFTER_FIX: "judge after fix",
    JudgeKind.FINAL: "final judge",
    JudgeKind.SAME_REQUEST: "no-gain judge",
    JudgeKind.FOLLOW_UP: "follow-up judge",
}


def outcome(outcome: Outcome) -> str:
    """One base prompt's way through the pipeline, step by step, for `zoi preview`."""
    lines = [click.style(f"=== base prompt {outcome.index}", bold=True), outcome.base_prompt]
    for step in outcome.steps:
        if step.judge is not None:
            label = _JUDGE_LABELS[step.judge]
        elif step.depth is not None:
            label = f"depth {step.depth + 1}" + (f" {step.operator}" if step.operator else "")
        else:
            label = step.step.replace("_", "-")
        if step.turn is not None:  # a later turn of a conversation
            label = f"turn {step.turn} {label}"
        tokens = f"{step.prompt_tokens}+{step.completion_tokens} tokens"
        head = f"--- {label} ({tokens}, {step.finish_reason or 'no finish reason'})"
        lines.append(click.style(head, fg="cyan"))
        lines.append(f"ERROR: {step.error}" if step.error else step.text or "(empty)")
    if outcome.kept:
        lines.append(click.style("=> kept", fg="green", bold=True))
    else:
        reason = outcome.drop_reason or ""
        lines.append(
            click.style(
                f"=> dropped: {reason} ({DROP_REASONS.get(reason, '')})", fg="red", bold=True
            )
        )
    return "\n".join(lines) + "\n"


def outcome_json(outcome: Outcome) -> str:
    return json.dumps(outcome.to_dict(), ensure_ascii=False)


def preview_total(tally: Tally) -> str:
    return f"kept {tally.kept} of {tally.prompts}"


def enqueued(run: Run, report: EnqueueReport) -> str:
    replaced = ", ".join(f"{n} {state}" for state, n in sorted(report.replaced.items()))
    return (
        f"run {run.path} ({run.key}): {report.chunks} chunks of {run.chunk_size} over "
        f"[{run.start}, {run.end})\n"
        f"done {report.done}, already queued or running {report.active}, "
        f"enqueued {report.enqueued}"
        + (f" (replacing {replaced})" if replaced else "")
        + f" in {report.seconds:.2f} s"
    )


def enqueue_warnings(report: EnqueueReport) -> list[str]:
    return [f"bad shard set aside and queued again: {problem}" for problem in report.bad_shards]


def merged(report: MergeReport, output: object, dedup: str | None) -> str:
    return (
        f"merged {report.merged}/{report.chunks} chunks: {report.records} records, "
        f"{report.bytes / 1e6:.1f} MB in {report.seconds:.2f} s -> {output}"
        + _duplicates(report, dedup)
    )


def _duplicates(report: GenerateReport | MergeReport, dedup: str | None) -> str:
    """What --dedup dropped, said only when it was asked for (as before near dedup existed,
    for plain --dedup)."""
    if dedup != "near":
        return f" ({report.duplicates} duplicate questions dropped)" if dedup else ""
    return (
        f" ({report.duplicates} duplicate and {report.near_duplicates} near-duplicate "
        f"questions dropped, listed in {report.sidecar})"
    )


def merge_warnings(report: MergeReport) -> list[str]:
    """What the merge left out: damaged chunks by name, then the missing index ranges."""
    warnings = list(report.problems)
    if report.missing:
        warnings.append(f"missing base-prompt ranges {describe_ranges(report.missing)}")
    return warnings


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s"


def status(state: RunStatus, as_json: bool = False) -> str:
    """`zoi status`: a page for people, or one JSON object for scripts."""
    if as_json:
        return json.dumps(state.as_dict(), ensure_ascii=False)
    chunks = state.chunks
    lines = [
        f"run       {state.run} [{state.range[0]}, {state.range[1]})",
        "chunks    " + ", ".join(f"{k} {v}" for k, v in chunks.items()),
        f"prompts   {state.prompts_done} done, {state.records} records kept, "
        f"fixer ran {state.fixer_ran}",
    ]
    width = max([18, *map(len, state.dropped)])  # the filters' reasons are longer than 18
    for reason, count in state.dropped.items():
        lines.append(f"  {reason:<{width}} {count:>8}  {DROP_REASONS.get(reason, '')}")
    lines += operators(state.operators, state.operators_kept)
    lines += turns(state.turns, state.turns_ended)
    recent = state.recent
    lines += [
        f"tokens    {state.tokens['prompt']} prompt + {state.tokens['completion']} generated",
        f"recent    {recent.records_per_s:.2f} records/s, {recent.tokens_per_s:.0f} "
        f"tokens/s; ETA {duration(state.eta_seconds)}",
        f"workers   {len(state.workers)}"
        + "".join(f"\n  {w['name']} {w['state']}" for w in state.workers),
    ]
    lines += _endpoints(state.endpoints)
    if state.missing_ranges:
        lines.append(f"to do     {describe_ranges(state.missing_ranges)}")
    lines += [f"problem   {p}" for p in state.problems]
    return "\n".join(lines)


# What moves an endpoint's limit, as `zoi status` says it.
STEERED = {"queue": "its queue", "latency": "latency", "mixed": "queue and latency"}


def _endpoints(endpoints: list[EndpointFigures]) -> list[str]:
    """Each served endpoint, added up over the workers: the concurrency its controllers
    allow now, what is in flight and what steers it, requests sent, retries and errors
    (none for vLLM)."""
    if not endpoints:
        return []
    lines = ["endpoints " + headline(endpoints).removeprefix("endpoints: ")]
    for e in endpoints:
        kinds = ", ".join(f"{kind} {count}" for kind, count in e.errors.items() if count)
        down = "" if e.up else " DOWN"
        workers = "worker" if e.workers == 1 else "workers"
        steered = f", by {STEERED[e.steered_by]}" if e.steered_by else ""
        lines.append(
            f"  {e.url}{down}  conc {e.limit:.0f} ({e.in_flight} in flight, {e.workers} "
            f"{workers}{steered})  requests {e.requests}  retries {e.retries}  errors "
            f"{100 * e.error_rate:.1f}%" + (f" ({kinds})" if kinds else "")
        )
    return lines


def data_report(report: DataReport) -> str:
    """The headline figures of `zoi report`; the JSON (and the page) hold the rest."""
    figures = report.figures
    records = figures["records"]
    lines = [f"records   {records} ({figures['source']['kind']} {figures['source']['path']})"]
    funnel = figures.get("funnel")
    if funnel:
        lines.append(f"prompts   {funnel['prompts']} ({funnel['kept']} kept)")
    conversations = turns(figures.get("turns", {}), (funnel or {}).get("turns_ended", {}))
    if conversations:  # a multi-turn file: the figures below look at the first turn
        lines += [*conversations, "  (the figures below are the first turn's)"]
    duplicates, language, flags = figures["duplicates"], figures["language"], figures["flags"]
    counts = {
        "exact duplicate questions": duplicates["exact_duplicate_questions"],
        "near-duplicate questions": duplicates["near_duplicate_questions"],
        "non-Japanese answers": language["non_japanese_answers"],
        "leaked scaffolding": flags["leaked_questions"],
        "looping answers": flags["looping_answers"],
        "restating answers": flags["restating_answers"],
        "refusals below the marker": flags["refusing_answers"],
    }
    width = max(len(name) for name in counts)
    for name, count in counts.items():
        share = f" ({100 * count / records:.1f}%)" if records else ""
        lines.append(f"  {name:<{width}}  {count:>6}{share}")
    lengths = figures["lengths"]
    counted = lengths["tokenizer"] or f"not counted: {lengths['not_counted']}"
    lines.append(f"tokens    {counted}")
    source = figures["source"]
    if source["kind"] == "run" and source["read"] < source["chunks"]:
        covered = f"{source['read']} of {source['chunks']} chunks"
        lines.append(f"covers    {covered} (the rest not done or damaged)")
    for path in (report.json_path, report.html_path):
        if path is not None:
            lines.append(f"wrote     {path}")
    return "\n".join(lines)
