"""Evolve one base prompt into zero or one question/answer pair (or conversation).

`Pipeline.evolve` is the whole flow for one prompt, top to bottom, awaiting the engine at each
step. Many prompts run at once (`Pipeline.run`, the one scheduler of `zoi generate` and the
workers), so the engine batches requests from prompts at
different steps: nobody waits for the slowest prompt of a step, and no prompt is left out of a
last partial batch (the original tool's stage-by-stage batches did both).

With `pipeline.turns` above 1, a kept pair is the first turn of a conversation: follow-up
questions, each judged and filtered as the first question is, are answered with the whole
conversation before them, until the conversation has its turns or a turn fails.

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
from .detectors import repeats
from .engines.base import Engine, Message, Request, RequestError, Step
from .filters import FILTER_REASONS, Filters
from .operators import TEMPLATES, draw
from .prompt_sources import PromptSource
from .records import lone_surrogate, writable
from .templates import JUDGE_REPLIES, Templates, conversation_text
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
    FOLLOW_UP = 4  # a later turn's judge: is the follow-up question a good next question?


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
# Why a later turn of a conversation (`pipeline.turns`) failed: with `failed_turn: keep` the
# reason its conversation ended early, counted in the funnel's `turns_ended`; with `drop` the
# record's drop reason, as `turn_<reason>`. The follow-up's own failures, then those the first
# turn can have too (its judge, the question filters, the answer and the answer filters), then
# the later answer's own.
TURN_REASONS: dict[str, str] = {
    "follow_up_failed": "the follow-up request failed",
    "follow_up_empty": "the follow-up question was empty",
    "follow_up_repeated": "the follow-up copied an earlier question or answer",
    "follow_up_rejected": "the follow-up judge said いいえ",
    "follow_up_low_confidence": "the follow-up judge's はい was below min_judge_confidence",
    **{
        reason: DROP_REASONS[reason]
        for reason in (
            "judge_failed",
            "judge_invalid",
            "question_leaked",
            "question_not_japanese",
            "answer_failed",
            "answer_empty",
            *(name for name in FILTER_REASONS if name.startswith("answer_")),
            "bad_text",
        )
    },
    "answer_repeated": "the answer copied an earlier answer",
}
for _name, _text in TURN_REASONS.items():
    DROP_REASONS[f"turn_{_name}"] = f"a later turn: {_text} (failed_turn: drop)"


def request_number(judge: JudgeKind | None, depth: int | None) -> int:
    """The one number that tells a prompt's requests of one step apart: the judge kind or
    the depth index, else 0. Request seeds are derived from it and traces record it as
    `attempt`, as they did before the two had names, so seeds and traces stay as they were."""
    if judge is not None:
        return int(judge)
    return depth or 0


def request_seed(
    run_seed: int,
    index: int,
    step: str,
    judge: JudgeKind | None = None,
    depth: int | None = None,
    turn: int | None = None,
) -> int:
    """A seed per request, stable across reruns and machines, and distinct between requests
    (vLLM gives requests with equal seeds identical random streams). A request of a later
    turn (`turn` 2 or more) has the turn in its key; the first turn's keys are as they were."""
    key = f"{run_seed}/{index}/{step}/{request_number(judge, depth)}"
    if turn is not None and turn > 1:
        key += f"/turn/{turn}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 33


@dataclass
class StepTrace:
    """One request of one prompt; `judge` is set on judge steps, `depth` on depth steps, and
    `operator` on depth steps of a run that draws depth operators (a depth step without one
    is `constraints`, as every depth step was before operators existed). `turn` is set on the
    requests of a conversation's later turns (2 and on), never on the first turn's."""

    step: Step
    judge: JudgeKind | None = None
    depth: int | None = None
    operator: str | None = None
    turn: int | None = None
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
        del data["judge"], data["depth"], data["operator"], data["turn"]
        if self.yes_probability is None:  # traces without it read as they always have
            del data["yes_probability"]
        head = {"step": data.pop("step"), "attempt": request_number(self.judge, self.depth)}
        if self.operator is not None:  # likewise the traces of runs without operators
            head["operator"] = self.operator
        if self.turn is not None:  # and the first turn's steps
            head["turn"] = self.turn
        return {**head, **data}


@dataclass
class Outcome:
    """One prompt's evolution. `retries` counts the requests its engine sent again after a
    transient failure: how the transport went, not what was computed, so it is in the funnel
    but never in a trace (a rerun through a flaky server writes the same trace).

    `question` and `answer` are the first turn. In a run of more than one turn
    (`multi_turn`), `later_turns` holds the kept turns after it, in order, and `ended` why the
    conversation stopped short of `pipeline.turns` (`TURN_REASONS`; None if it did not)."""

    index: int
    base_prompt: str
    question: str | None = None
    answer: str | None = None
    drop_reason: str | None = None
    fixer_ran: bool = False
    steps: list[StepTrace] = field(default_factory=list)
    retries: int = 0
    multi_turn: bool = False
    later_turns: list[tuple[str, str]] = field(default_factory=list)
    ended: str | None = None

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
    def turns(self) -> int:
        """How many turns the record holds (0 for a dropped one)."""
        return 1 + len(self.later_turns) if self.kept and self.question is not None else 0

    @property
    def operators(self) -> list[str]:
        """The depth operators drawn for this prompt, in order (none where the run draws
        none: its depth steps are all `constraints`)."""
        return [step.operator for step in self.steps if step.operator is not None]

    def to_dict(self) -> dict[str, Any]:
        """The outcome as JSON data; `operators` is there only where operators were drawn,
        and the turns (`later_turns`, the count `turns`, `ended` where a conversation ended
        early) only in runs of more than one turn, so outcomes of runs without them read as
        they always have."""
        data = asdict(self)
        del data["retries"], data["multi_turn"], data["later_turns"], data["ended"]
        del data["steps"]  # after what this run's outcomes hold besides
        if self.multi_turn:
            data["later_turns"] = [{"question": q, "answer": a} for q, a in self.later_turns]
            data["turns"] = self.turns
            if self.ended is not None:
                data["ended"] = self.ended
        if self.operators:
            data["operators"] = self.operators
        data["steps"] = [step.to_dict() for step in self.steps]
        return {**data, "kept": self.kept}


# The funnel's counts besides `dropped`: what a done marker must hold for a Tally to be read back.
FUNNEL_COUNTS = ("prompts", "kept", "fixer_ran", "prompt_tokens", "completion_tokens")
# Counts a funnel holds only when they are not 0, so that funnels written before they existed
# (and every funnel of a run without them) read and write as they always have.
OPTIONAL_COUNTS = ("retries",)
# The funnel's counts by depth operator, held only by funnels of runs that draw operators.
OPERATOR_COUNTS = ("operators", "operators_kept")
# The funnel's counts of conversations, held only by funnels of runs of more than one turn
# that kept a record or ended a conversation early: kept records by how many turns they hold
# ("1", "2", ...), and conversations that ended early (`failed_turn: keep`) by reason.
TURN_COUNTS = ("turns", "turns_ended")


@dataclass
class Tally:
    """The funnel: counts over many outcomes. The one place they are added up, whether from
    outcomes (a chunk, `zoi generate`) or from other funnels (the chunks' done markers, for
    `zoi run`'s progress and summary and for `zoi status`). `operators` counts the depth
    steps each operator ran, `operators_kept` those of them in kept records; `turns` counts
    the kept records of a multi-turn run by their number of turns, `turns_ended` the
    conversations among them that ended early, by the reason (`TURN_REASONS`)."""

    prompts: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    fixer_ran: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    operators: Counter[str] = field(default_factory=Counter)
    operators_kept: Counter[str] = field(default_factory=Counter)
    turns: Counter[str] = field(default_factory=Counter)
    turns_ended: Counter[str] = field(default_factory=Counter)

    def add(self, outcome: Outcome) -> None:
        self.prompts += 1
        if outcome.kept:
            self.kept += 1
            self.operators_kept.update(outcome.operators)
            if outcome.multi_turn:
                self.turns[str(outcome.turns)] += 1
            if outcome.ended is not None:
                self.turns_ended[outcome.ended] += 1
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
        self.turns.update(other.turns)
        self.turns_ended.update(other.turns_ended)
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
        by_name = {name: Counter(data.get(name, {})) for name in OPERATOR_COUNTS + TURN_COUNTS}
        return cls(**counts, dropped=Counter(data["dropped"]), **by_name)

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
        for name in TURN_COUNTS:  # likewise, for a run of one turn
            del data[name]
            if self.turns or self.turns_ended:
                data[name] = dict(sorted(getattr(self, name).items(), key=turn_order))
        return data


def turn_order(item: tuple[str, int]) -> tuple[int, str]:
    """Sort key of a turn count: a number of turns by its value ("2" before "10", as JSON
    keys are strings), then any other key (an end reason) by its name."""
    key = item[0]
    return (int(key), "") if key.isdigit() else (0, key)


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
        outcome.multi_turn = self.settings.turns > 1
        try:
            question, answer = await self._evolve(outcome)
            if outcome.multi_turn:
                outcome.later_turns = await self._later_turns(outcome, question, answer)
            outcome.question, outcome.answer = question, answer
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

    async def _later_turns(self, o: Outcome, question: str, answer: str) -> list[tuple[str, str]]:
        """The turns after the first, until the conversation has `pipeline.turns` or one
        fails: then the conversation ends at its last good turn, the reason in `o.ended`
        (`failed_turn: keep`), or the record is dropped as `turn_<reason>` (`drop`)."""
        turns = [(question, answer)]
        for turn in range(2, self.settings.turns + 1):
            try:
                turns.append(await self._turn(o, turns, turn))
            except _Dropped as failed:
                if self.settings.failed_turn == "drop":
                    raise _Dropped(f"turn_{failed.reason}") from None
                o.ended = failed.reason
                break
        return turns[1:]

    async def _turn(self, o: Outcome, turns: list[tuple[str, str]], turn: int) -> tuple[str, str]:
        """Turn `turn` of the conversation `turns`: the user's next question, judged with the
        conversation and filtered as the first question is, then its answer, asked with
        every earlier turn as chat messages and filtered as the first answer is."""
        conversation = conversation_text(turns)
        trace = StepTrace(step="follow_up", turn=turn)
        question = await self._ask(o, trace, None, {"conversation": conversation})
        if not question:
            raise _Dropped("follow_up_empty")
        if repeats(question, (text for turn_texts in turns for text in turn_texts)):
            raise _Dropped("follow_up_repeated")  # caught before a judge request is spent
        values = {"conversation": conversation, "question": question}
        if not await self._verdict(o, JudgeKind.FOLLOW_UP, "follow_up_judge", values, turn):
            raise _Dropped(rejection("follow_up", o.steps[-1].verdict))
        _drop_if(await asyncio.to_thread(self.filters.question, question))
        trace = StepTrace(step="answer", turn=turn)
        values = {"question": question, "refusal_marker": self.settings.refusal_marker}
        answer = await self._ask(o, trace, None, values, earlier=turns)
        if not answer:
            raise _Dropped("answer_empty")
        _drop_if(await asyncio.to_thread(self.filters.answer, answer, trace.finish_reason))
        if repeats(answer, (earlier for _, earlier in turns)):
            raise _Dropped("answer_repeated")
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
        self,
        o: Outcome,
        kind: JudgeKind,
        template: str,
        values: dict[str, str],
        turn: int | None = None,
    ) -> bool:
        """A judge's はい, if it is one and trusted (`min_judge_confidence`)."""
        trace = StepTrace(step="judge", judge=kind, turn=turn)
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
        earlier: list[tuple[str, str]] | None = None,
    ) -> str:
        """One request of the prompt, made from `template` (the step's own by default),
        traced in `trace`; `earlier`, the conversation before a later turn's answer."""
        step = trace.step
        request = self.request(
            o.index,
            step,
            choices,
            values,
            judge=trace.judge,
            depth=trace.depth,
            template=template,
            turn=trace.turn,
            earlier=earlier,
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
        turn: int | None = None,
        earlier: list[tuple[str, str]] | None = None,
    ) -> Request:
        """The request of one step of prompt `index`: the step's sampling and seed, its
        messages from `template` (a depth operator's, the no-gain judge's, the follow-up
        judge's), or else from the step's own, after the `earlier` turns of a conversation
        (a later turn's answer)."""
        override = getattr(self.config.sampling, step)
        chosen = self.templates.step(template or step)
        messages = chosen.continued(earlier, **values) if earlier else chosen.messages(**values)

        def pick(name: str) -> Any:
            value = getattr(override, name)
            return getattr(self.config, name) if value is None else value

        return Request(
            step=step,
            messages=tuple(Message(role, content) for role, content in messages),
            max_tokens=pick("max_tokens"),
            temperature=pick("temperature"),
            top_p=pick("top_p"),
            seed=request_seed(self.config.seed, index, step, judge, depth, turn),
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
