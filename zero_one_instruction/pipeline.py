"""Evolve one base prompt into zero or one question/answer pair.

`Pipeline.evolve` is the whole flow for one prompt, top to bottom, awaiting the engine at each
step. Many prompts run at once (`Pipeline.run`, the one scheduler of `zoi generate` and the
workers), so the engine batches requests from prompts at
different steps: nobody waits for the slowest prompt of a step, and no prompt is left out of a
last partial batch (the original tool's stage-by-stage batches did both).

Every prompt yields an `Outcome`: the record if kept, otherwise the reason it was dropped, plus
each step's text, verdict and token counts, so nothing disappears without a trace.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any

from .confidence import confident, rejection
from .config import Config
from .engines.base import Engine, Message, Request, RequestError, Step
from .filters import FILTER_REASONS, Filters
from .operators import TEMPLATES, draw
from .prompt_sources import PromptSource
from .records import lone_surrogate, writable
from .templates import JUDGE_REPLIES, Templates
from .window import Window

JUDGE_CHOICES = JUDGE_REPLIES  # the judge's examples are checked against the same two words
YES, NO = JUDGE_CHOICES


class JudgeKind(IntEnum):
    """Which of a prompt's judgements a judge request is: each gets its own seed, and the
    preview labels them. The values are the numbers traces have always recorded."""

    FIRST = 0
    AFTER_FIX = 1
    FINAL = 2
    SAME_REQUEST = 3  # the no-gain judge: is the prompt after depth the same request?


DROP_REASONS: dict[str, str] = {
    "width_failed": "the width request failed",
    "width_empty": "width returned nothing and the fixer is off",
    "judge_failed": "a judge request failed",
    "judge_invalid": "a judge answered neither はい nor いいえ",
    "judge_rejected": "the first judge said いいえ and the fixer is off",
    "judge_low_confidence": "the first judge's はい was below min_judge_confidence, fixer off",
    "fix_failed": "the fixer request failed",
    "fix_empty": "the fixer returned nothing",
    "fix_rejected": "the judge said いいえ again after the fixer",
    "fix_low_confidence": "the judge's はい after the fixer was below min_judge_confidence",
    "depth_failed": "a depth request failed",
    "depth_empty": "a depth step returned nothing",
    "depth_no_gain": "the depth steps left the same request (drop_depth_no_gain)",
    "flatten_failed": "the flatten request failed",
    "flatten_empty": "flatten returned nothing",
    "final_rejected": "the final judge said いいえ",
    "final_low_confidence": "the final judge's はい was below min_judge_confidence",
    "answer_failed": "the answer request failed",
    "answer_empty": "the answer was empty",
    **FILTER_REASONS,
    "bad_text": "a step returned text with a cut character (a lone surrogate)",
}


def request_number(judge: JudgeKind | None, depth: int | None) -> int:
    """The one number that tells a prompt's requests of one step apart: the judge kind or
    the depth index, else 0. Request seeds are derived from it and traces record it as
    `attempt`, as they did before the two had names, so seeds and traces stay as they were."""
    if judge is not None:
        return int(judge)
    return depth or 0


def request_seed(
    run_seed: int, index: int, step: str, judge: JudgeKind | None = None, depth: int | None = None
) -> int:
    """A seed per request, stable across reruns and machines, and distinct between requests
    (vLLM gives requests with equal seeds identical random streams)."""
    key = f"{run_seed}/{index}/{step}/{request_number(judge, depth)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 33


@dataclass
class StepTrace:
    """One request of one prompt; `judge` is set on judge steps, `depth` on depth steps, and
    `operator` on depth steps of a run that draws depth operators (a depth step without one
    is `constraints`, as every depth step was before operators existed)."""

    step: Step
    judge: JudgeKind | None = None
    depth: int | None = None
    operator: str | None = None
    text: str | None = None
    verdict: bool | None = None
    yes_probability: float | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The trace's JSON form, which has one number, `attempt`, for the judge kind and the
        depth index: traces written before and after the two had names read alike."""
        data = asdict(self)
        del data["judge"], data["depth"], data["operator"]
        if self.yes_probability is None:  # traces without it read as they always have
            del data["yes_probability"]
        head = {"step": data.pop("step"), "attempt": request_number(self.judge, self.depth)}
        if self.operator is not None:  # likewise the traces of runs without operators
            head["operator"] = self.operator
        return {**head, **data}


@dataclass
class Outcome:
    """One prompt's evolution. `retries` counts the requests its engine sent again after a
    transient failure: how the transport went, not what was computed, so it is in the funnel
    but never in a trace (a rerun through a flaky server writes the same trace)."""

    index: int
    base_prompt: str
    question: str | None = None
    answer: str | None = None
    drop_reason: str | None = None
    fixer_ran: bool = False
    steps: list[StepTrace] = field(default_factory=list)
    retries: int = 0

    @property
    def kept(self) -> bool:
        return self.drop_reason is None

    @property
    def prompt_tokens(self) -> int:
        return sum(s.prompt_tokens for s in self.steps)

    @property
    def completion_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.steps)

    @property
    def operators(self) -> list[str]:
        """The depth operators drawn for this prompt, in order (none where the run draws
        none: its depth steps are all `constraints`)."""
        return [step.operator for step in self.steps if step.operator is not None]

    def to_dict(self) -> dict[str, Any]:
        """The outcome as JSON data; `operators` is there only where operators were drawn,
        so outcomes of runs without them read as they always have."""
        data = asdict(self)
        del data["retries"]
        data["steps"] = [step.to_dict() for step in self.steps]
        if self.operators:
            steps = data.pop("steps")
            data["operators"] = self.operators
            data["steps"] = steps
        return {**data, "kept": self.kept}


# The funnel's counts besides `dropped`: what a done marker must hold for a Tally to be read back.
FUNNEL_COUNTS = ("prompts", "kept", "fixer_ran", "prompt_tokens", "completion_tokens")
# Counts a funnel holds only when they are not 0, so that funnels written before they existed
# (and every funnel of a run without them) read and write as they always have.
OPTIONAL_COUNTS = ("retries",)
# The funnel's counts by depth operator, held only by funnels of runs that draw operators.
OPERATOR_COUNTS = ("operators", "operators_kept")


@dataclass
class Tally:
    """The funnel: counts over many outcomes. The one place they are added up, whether from
    outcomes (a chunk, `zoi generate`) or from other funnels (the chunks' done markers, for
    `zoi run`'s progress and summary and for `zoi status`). `operators` counts the depth
    steps each operator ran, `operators_kept` those of them in kept records."""

    prompts: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    fixer_ran: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    operators: Counter[str] = field(default_factory=Counter)
    operators_kept: Counter[str] = field(default_factory=Counter)

    def add(self, outcome: Outcome) -> None:
        self.prompts += 1
        if outcome.kept:
            self.kept += 1
            self.operators_kept.update(outcome.operators)
        else:
            self.dropped[outcome.drop_reason or "unknown"] += 1
        self.operators.update(outcome.operators)
        self.fixer_ran += outcome.fixer_ran
        self.prompt_tokens += outcome.prompt_tokens
        self.completion_tokens += outcome.completion_tokens
        self.retries += outcome.retries

    def merge(self, other: Tally) -> None:
        """Add another funnel's counts. Drop reasons new to this funnel come after the ones it
        has, in `other`'s order: a summary lists equal counts in that order."""
        self.prompts += other.prompts
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.operators.update(other.operators)
        self.operators_kept.update(other.operators_kept)
        self.fixer_ran += other.fixer_ran
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.retries += other.retries

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def kept_percent(self) -> float:
        return 100.0 * self.kept / self.prompts if self.prompts else 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tally:
        """The funnel `as_dict` wrote, as a done marker holds it (`shards` checks it first)."""
        counts = {name: data[name] for name in FUNNEL_COUNTS}
        counts.update({name: data[name] for name in OPTIONAL_COUNTS if name in data})
        by_operator = {name: Counter(data.get(name, {})) for name in OPERATOR_COUNTS}
        return cls(**counts, dropped=Counter(data["dropped"]), **by_operator)

    def as_dict(self) -> dict[str, Any]:
        """The funnel as a done marker holds it; the operator counts only where operators
        were drawn, so a run without them writes the markers it always did."""
        data = asdict(self)
        data["dropped"] = dict(sorted(self.dropped.items()))
        for name in OPTIONAL_COUNTS:
            if not data[name]:
                del data[name]
        for name in OPERATOR_COUNTS:
            del data[name]  # asdict rebuilds a Counter from pairs: taken from self instead
            if self.operators:
                data[name] = dict(sorted(getattr(self, name).items()))
        return data


class _Dropped(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _drop_if(reason: str | None) -> None:
    if reason is not None:
        raise _Dropped(reason)


def _check_text(trace: StepTrace) -> None:
    """Drop the record whose step returned a lone surrogate (half of a character an API cut
    in two). Replacing it would put U+FFFD into training data, and keeping it would fail the
    whole chunk's shard on every retry; dropping costs one counted record. The trace keeps the
    text with U+FFFD in its place, so the rejects file can still be written."""
    position = lone_surrogate(trace.text or "")
    if position is None:
        return
    code = ord((trace.text or "")[position])
    trace.text = writable(trace.text or "")
    trace.error = f"lone surrogate U+{code:04X} at character {position}: not valid Unicode text"
    raise _Dropped("bad_text")


class Pipeline:
    """The evolution flow over one engine; holds no per-prompt state between calls."""

    def __init__(
        self, config: Config, templates: Templates, source: PromptSource, engine: Engine
    ) -> None:
        self.config = config
        self.settings = config.pipeline
        self.templates = templates
        self.source = source
        self.engine = engine
        self.filters = Filters.of(self.settings, templates)

    async def evolve(self, index: int) -> Outcome:
        outcome = Outcome(index=index, base_prompt=self.source.prompt(index))
        try:
            outcome.question, outcome.answer = await self._evolve(outcome)
        except _Dropped as drop:
            outcome.drop_reason = drop.reason
        return outcome

    async def _evolve(self, o: Outcome) -> tuple[str, str]:
        prompt = await self._generate(o, "width", prompt=o.base_prompt, allow_empty=True)
        if not prompt or not await self._judge(o, prompt, JudgeKind.FIRST):
            if not self.settings.fixer:
                raise _Dropped(rejection("judge", o.steps[-1].verdict) if prompt else "width_empty")
            o.fixer_ran = True
            prompt = await self._generate(o, "fix", prompt=prompt or o.base_prompt)
            if not await self._judge(o, prompt, JudgeKind.AFTER_FIX):
                raise _Dropped(rejection("fix", o.steps[-1].verdict))
        prompt = await self._depth_steps(o, prompt)
        question = await self._generate(o, "flatten", prompt=prompt)
        if not await self._judge(o, question, JudgeKind.FINAL):
            raise _Dropped(rejection("final", o.steps[-1].verdict))
        # The filters run off the event loop: the engine's output handling runs on it, and
        # their checks (loops, scripts, labels) go over every character of a long text.
        _drop_if(await asyncio.to_thread(self.filters.question, question))
        answer = await self._generate(
            o, "answer", question=question, refusal_marker=self.settings.refusal_marker
        )
        _drop_if(await asyncio.to_thread(self.filters.answer, answer, o.steps[-1].finish_reason))
        return question, answer

    async def _depth_steps(self, o: Outcome, prompt: str) -> str:
        """The depth steps, each with the operator drawn for it, then the elimination rules
        of the evolution that look at them: scaffolding a step copied (after each step) and
        no gain (after the last)."""
        before = prompt
        for depth in range(self.settings.depth_steps):
            operator = draw(self.settings.depth_operators, self.config.seed, o.index, depth)
            trace = StepTrace(step="depth", depth=depth)
            if not self.settings.default_operators:  # default traces name no operator
                trace.operator = operator
            text = await self._ask(o, trace, None, {"prompt": prompt}, TEMPLATES[operator])
            if not text:
                raise _Dropped("depth_empty")
            if self.settings.drop_depth_leaked:  # off the event loop, as the filters below
                _drop_if(await asyncio.to_thread(self.filters.depth, prompt, text))
            prompt = text
        if self.settings.drop_depth_no_gain and self.settings.depth_steps:
            await self._gain(o, before, prompt)
        return prompt

    async def _gain(self, o: Outcome, before: str, after: str) -> None:
        """The no-gain rule: drop the record whose depth steps left the same request. Text
        that came back unchanged needs no judge to say so."""
        if after == before:
            raise _Dropped("depth_no_gain")
        values = {"before": before, "after": after}
        if await self._verdict(o, JudgeKind.SAME_REQUEST, "same_request", values):
            raise _Dropped("depth_no_gain")

    async def _generate(
        self, o: Outcome, step: Step, allow_empty: bool = False, **values: str
    ) -> str:
        text = await self._ask(o, StepTrace(step=step), None, values)
        if not text and not allow_empty:
            raise _Dropped(f"{step}_empty")
        return text

    async def _judge(self, o: Outcome, prompt: str, kind: JudgeKind) -> bool:
        return await self._verdict(o, kind, "judge", {"prompt": prompt})

    async def _verdict(
        self, o: Outcome, kind: JudgeKind, template: str, values: dict[str, str]
    ) -> bool:
        """A judge's はい, if it is one and trusted (`min_judge_confidence`)."""
        trace = StepTrace(step="judge", judge=kind)
        verdict = await self._ask(o, trace, JUDGE_CHOICES, values, template)
        if verdict not in JUDGE_CHOICES:
            trace.error = f"not one of the choices: {verdict!r}"
            raise _Dropped("judge_invalid")
        trace.verdict = verdict == YES
        minimum = self.settings.min_judge_confidence
        return verdict == YES and confident(trace.yes_probability, minimum)

    async def _ask(
        self,
        o: Outcome,
        trace: StepTrace,
        choices: tuple[str, ...] | None,
        values: dict[str, str],
        template: str | None = None,
    ) -> str:
        """One request of the prompt, made from `template` (the step's own by default),
        traced in `trace`."""
        step = trace.step
        request = self.request(
            o.index, step, choices, values, judge=trace.judge, depth=trace.depth, template=template
        )
        o.steps.append(trace)
        try:
            completion = await self.engine.complete(request)
        except RequestError as exc:
            o.retries += exc.retries
            trace.error = writable(str(exc)) or type(exc).__name__
            raise _Dropped(f"{step}_failed") from None
        o.retries += completion.retries
        trace.text = completion.text
        trace.finish_reason = completion.finish_reason
        trace.prompt_tokens = completion.prompt_tokens
        trace.completion_tokens = completion.completion_tokens
        trace.yes_probability = (completion.choice_probabilities or {}).get(YES)
        _check_text(trace)
        return completion.text.strip()

    def request(
        self,
        index: int,
        step: Step,
        choices: tuple[str, ...] | None,
        values: dict[str, str],
        *,
        judge: JudgeKind | None = None,
        depth: int | None = None,
        template: str | None = None,
    ) -> Request:
        """The request of one step of prompt `index`: the step's sampling and seed, its
        messages from `template` (a depth operator's or the no-gain judge's), or else from
        the step's own."""
        override = getattr(self.config.sampling, step)
        messages = self.templates.step(template or step).messages(**values)

        def pick(name: str) -> Any:
            value = getattr(override, name)
            return getattr(self.config, name) if value is None else value

        return Request(
            step=step,
            messages=tuple(Message(role, content) for role, content in messages),
            max_tokens=pick("max_tokens"),
            temperature=pick("temperature"),
            top_p=pick("top_p"),
            seed=request_seed(self.config.seed, index, step, judge, depth),
            choices=choices,
            repetition_penalty=pick("repetition_penalty"),
        )

    async def run(
        self,
        indices: Iterable[int],
        slots: asyncio.Semaphore | None = None,
        started: Callable[[], None] = lambda: None,
        finished: Callable[[Outcome], None] = lambda outcome: None,
    ) -> AsyncIterator[Outcome]:
        """Outcomes in the order of `indices`, each prompt started as soon as one of `slots`
        frees up: the one scheduler, for `zoi generate` (its own `concurrency` slots) and for
        the worker (slots shared by every chunk in flight). `started` is called once the last
        prompt has its slot: from then on this batch only drains, and the worker may start
        its next chunk into the freed slots, so the engine never idles at a chunk boundary.
        `finished` gets each outcome as soon as its prompt is done, in no particular order, so
        a chunk's progress can be shown while it runs; it runs on the event loop, so it must
        be quick.

        Finished outcomes wait until those before them are done. A window of four times the
        concurrency bounds them, so memory stays bounded however long the range is. The first
        prompt to fail (a dead engine) fails the whole batch at once.
        """
        limit = self.config.concurrency()
        slots = asyncio.Semaphore(limit) if slots is None else slots
        window = Window(slots, finished)
        try:
            for index in indices:
                await slots.acquire()
                window.start(self.evolve(index))
                while window.ready() or len(window) > 4 * limit:
                    yield await window.next()
            started()
            while window:
                yield await window.next()
        finally:
            await window.cancel()
