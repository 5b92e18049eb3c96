"""The figures of `zoi report`, gathered in one pass over the items of a file or a run.

`RecordAnalysis` looks at kept records (lengths, duplicates, diversity, language, flags) and
`FunnelAnalysis` at every prompt's trace (where prompts were dropped, how the judges and the
fixer did). Both take one item at a time and keep counters, never the items; the duplicate
counts spill their keys to temporary files and count them at the end (`dupcount`), so memory
does not grow with the records. `figures` returns plain JSON data: the JSON file, the
terminal summary and the HTML page all read it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import PipelineSettings
from .dataset import Item
from .detectors import (
    JAPANESE_SCRIPTS,
    SCRIPTS,
    leaked,
    looping,
    other_language,
    refusal,
    restates,
    script_share,
)
from .dupcount import Counts, DuplicateCounter
from .neardup import Bands
from .pipeline import JudgeKind
from .textstats import Distribution, Reservoir, TopCounter, distinct_ngram_ratio, shortened

# Counts a text's tokens, e.g. with the run's tokenizer; None leaves tokens out.
Tokenizer = Callable[[str], int]
EXAMPLES = 5
EXAMPLE_CHARS = 300
SAMPLE = 2000
TOP = 10
CLUSTERS = 10
OPENING, ENDING = 6, 8
# The marker the pipeline drops refusals by, where the input does not say which it used.
REFUSAL_MARKER = PipelineSettings().refusal_marker
JUDGES = {JudgeKind.FIRST: "first", JudgeKind.AFTER_FIX: "after_fixer", JudgeKind.FINAL: "final"}
# Judges only some runs ask (`drop_depth_no_gain`): in the figures only where one was asked.
# The no-gain judge's はい ("the same request") drops its record.
OPTIONAL_JUDGES = {JudgeKind.SAME_REQUEST: "same_request", JudgeKind.FOLLOW_UP: "follow_up"}


def _short(text: str) -> str:
    return shortened(text, EXAMPLE_CHARS)


@dataclass
class Flag:
    """One kind of finding: how many records have it, and the first few as examples."""

    count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)

    def add(self, index: int, text: str, found: str | None = None) -> None:
        self.count += 1
        if found is not None:
            self.kinds[found] += 1
        if len(self.examples) < EXAMPLES:
            example = {"index": index, "text": _short(text)}
            self.examples.append(example if found is None else {**example, "found": found})

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {"count": self.count, "examples": self.examples}
        if self.kinds:
            out["by_kind"] = dict(self.kinds.most_common(TOP))
        return out


@dataclass
class Side:
    """Figures of one side of the records, the questions or the answers."""

    chars: Distribution = field(default_factory=Distribution)
    tokens: Distribution = field(default_factory=Distribution)
    script_sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SCRIPTS, 0.0))
    other_language: Flag = field(default_factory=Flag)

    def add(self, index: int, text: str, tokenizer: Tokenizer | None) -> None:
        self.chars.add(len(text))
        if tokenizer is not None:
            self.tokens.add(tokenizer(text))
        share = script_share(text)
        for script in SCRIPTS:
            self.script_sums[script] += share.share(script)
        language = other_language(text)
        if language is not None:
            self.other_language.add(index, text, language)

    def scripts(self) -> dict[str, float]:
        """The mean share of each script over the texts (each text weighs the same)."""
        n = self.chars.total
        means = {s: round(v / n, 4) if n else 0.0 for s, v in self.script_sums.items()}
        return {**means, "japanese": round(sum(means[s] for s in JAPANESE_SCRIPTS), 4)}


class RecordAnalysis:
    """Figures over kept records, in the order given (earlier means lower in that order)."""

    def __init__(
        self,
        labels: tuple[str, ...],
        tokenizer: Tokenizer | None = None,
        bands: Bands | None = None,
        refusal_marker: str = REFUSAL_MARKER,
    ) -> None:
        self.labels = labels
        self.refusal_marker = refusal_marker
        self.tokenizer = tokenizer
        self.bands = bands or Bands()
        self.duplicates = DuplicateCounter(self.bands, CLUSTERS, EXAMPLES)
        self._counts: Counts | None = None
        self.records = 0
        self.question, self.answer = Side(), Side()
        self.truncated = 0
        self.traced = 0
        self.leaked, self.looping, self.restating = Flag(), Flag(), Flag()
        self.refusing = Flag()
        self.openings: TopCounter[str] = TopCounter()
        self.endings: TopCounter[str] = TopCounter()
        self.sample: Reservoir[tuple[str, str]] = Reservoir(SAMPLE)
        self.turns: Counter[int] = Counter()

    def add(self, item: Item) -> None:
        question, answer = item.question or "", item.answer or ""
        self.records += 1
        self.turns[item.turns] += 1
        self.question.add(item.index, question, self.tokenizer)
        self.answer.add(item.index, answer, self.tokenizer)
        self.duplicates.add(item.index, question, answer, _short(question))
        self._trace(item)
        self._flags(item.index, question, answer)
        stripped = question.strip()
        self.openings.add(stripped[:OPENING])
        self.endings.add(stripped[-ENDING:])
        self.sample.add((question, answer))

    def _trace(self, item: Item) -> None:
        if item.steps is None:
            return
        self.traced += 1
        # the first turn's answer, the record's `output` (a later turn's steps have `turn`)
        answers = [s for s in item.steps if s.get("step") == "answer" and "turn" not in s]
        if answers and answers[-1].get("finish_reason") == "length":
            self.truncated += 1

    def _flags(self, index: int, question: str, answer: str) -> None:
        label = leaked(question, self.labels)
        if label is not None:
            self.leaked.add(index, question, label)
        unit = looping(answer)
        if unit is not None:
            self.looping.add(index, answer, _short(unit))
        if restates(question, answer):
            self.restating.add(index, answer)
        declined = refusal(answer, self.refusal_marker)
        if declined is not None:
            self.refusing.add(index, answer, declined)

    def _duplicates(self) -> dict[str, Any]:
        if self._counts is None:  # counted once: counting removes the spilled keys
            self._counts = self.duplicates.count()
        counts = self._counts
        return {
            "exact_duplicate_questions": counts.exact_questions,
            "exact_duplicate_answers": counts.exact_answers,
            "near_duplicate_questions": counts.near_questions,
            "near": {
                "method": "MinHash LSH over character n-grams (datasketch)",
                "shingle": self.bands.shingle,
                "threshold": self.bands.threshold,
                "num_perm": self.bands.num_perm,
                "clusters": counts.clusters,
                "largest_clusters": counts.largest,
            },
        }

    def _diversity(self) -> dict[str, Any]:
        questions = [q for q, _ in self.sample.items]
        answers = [a for _, a in self.sample.items]
        return {
            "sample": len(self.sample.items),
            "distinct_ngrams": {
                side: {f"{n}": distinct_ngram_ratio(texts, n) for n in (1, 2, 3)}
                for side, texts in (("question", questions), ("answer", answers))
            },
            "question_openings": [[t, n] for t, n in self.openings.top(TOP)],
            "question_endings": [[t, n] for t, n in self.endings.top(TOP)],
        }

    def _lengths(self) -> dict[str, Any]:
        def side(s: Side) -> dict[str, Any]:
            tokens = s.tokens.figures() if self.tokenizer is not None else None
            return {"chars": s.chars.figures(), "tokens": tokens}

        return {
            "question": side(self.question),
            "answer": side(self.answer),
            "truncated_answers": self.truncated if self.traced else None,
            "traced_records": self.traced,
        }

    def figures(self) -> dict[str, Any]:
        """The figures; `turns` (records by how many turns their conversation holds) only
        where some record holds more than one, so a single-turn report reads as before. The
        other figures are of the first turn, `input` and `output`."""
        turns = {"turns": {str(n): c for n, c in sorted(self.turns.items())}}
        return {
            "records": self.records,
            **(turns if any(n > 1 for n in self.turns) else {}),
            "lengths": self._lengths(),
            "duplicates": self._duplicates(),
            "diversity": self._diversity(),
            "language": {
                "question_scripts": self.question.scripts(),
                "answer_scripts": self.answer.scripts(),
                "non_japanese_questions": self.question.other_language.count,
                "non_japanese_answers": self.answer.other_language.count,
                "questions": self.question.other_language.figures(),
                "answers": self.answer.other_language.figures(),
            },
            "flags": {
                "leaked_questions": self.leaked.count,
                "looping_answers": self.looping.count,
                "restating_answers": self.restating.count,
                "refusing_answers": self.refusing.count,
                "refusal_marker": self.refusal_marker,
                "leaked": self.leaked.figures(),
                "looping": self.looping.figures(),
                "restating": self.restating.figures(),
                "refusing": self.refusing.figures(),
            },
        }


def judge_name(step: dict[str, Any]) -> str:
    """Which judgement a traced judge step is (first, after_fixer, final): the trace's
    `attempt` number says it."""
    attempt = step.get("attempt", -1)
    return JUDGES.get(attempt) or OPTIONAL_JUDGES.get(attempt, "unknown")


def step_name(step: dict[str, Any]) -> str:
    """A trace step as the funnel names it: the judges apart by which judgement they are."""
    name = str(step.get("step"))
    return f"judge_{judge_name(step)}" if name == "judge" else name


@dataclass
class FunnelAnalysis:
    """Where a run's prompts went, from their traces: the step each drop happened at, each
    judge's acceptance and the fixer's rescues."""

    dropped_at: Counter[str] = field(default_factory=Counter)
    asked: Counter[str] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)
    fixer_ran: int = 0
    rescued: int = 0

    def add(self, item: Item) -> None:
        steps = item.steps or []
        if not item.kept and steps:
            self.dropped_at[step_name(steps[-1])] += 1
        for step in steps:
            if step.get("step") != "judge":
                continue
            judge = judge_name(step)
            self.asked[judge] += 1
            self.accepted[judge] += step.get("verdict") is True
            if judge == "after_fixer" and step.get("verdict") is True:
                # a はい doubted by min_judge_confidence rescued nothing
                self.rescued += item.drop_reason != "fix_low_confidence"
        self.fixer_ran += bool(item.fixer_ran)

    def figures(self) -> dict[str, Any]:
        def rate(part: int, whole: int) -> float | None:
            return round(part / whole, 4) if whole else None

        return {
            "dropped_at": dict(self.dropped_at.most_common()),
            "fixer": {
                "ran": self.fixer_ran,
                "rescued": self.rescued,
                "rescue_rate": rate(self.rescued, self.fixer_ran),
            },
            "judges": {
                judge: {
                    "asked": self.asked[judge],
                    "accepted": self.accepted[judge],
                    "acceptance": rate(self.accepted[judge], self.asked[judge]),
                }
                for judge in [*JUDGES.values(), *OPTIONAL_JUDGES.values()]
                if judge in JUDGES.values() or self.asked[judge]
            },
        }
