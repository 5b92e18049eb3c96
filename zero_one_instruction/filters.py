"""The pipeline's filters: checks on a finished question or answer that drop its record with a
named reason, counted in the funnel like every other drop.

They call the same detectors `zoi report` counts with, so a flag in the report and a drop
reason in the funnel mean the same thing: a user who sees 3% looping answers in the report
turns on `drop_looping_answers` and sees about that many `answer_looping` drops. The language,
leakage and repetition filters are off by default (README, "Filters" says why); the refusal,
length and truncation checks are the pipeline's original ones, moved here. Two of the
elimination rules of the evolution are here too, off by default: a depth step that copied
scaffolding (the leakage check, earlier) and an answer that answers nothing (the report's
refusal check, and filler).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import PipelineSettings
from .detectors import (
    filler,
    leaked,
    looping,
    normalized,
    other_language,
    refusal,
    scaffolding,
)
from .templates import Templates

# The drop reasons the filters give, with what each means (`pipeline.DROP_REASONS` has all).
FILTER_REASONS: dict[str, str] = {
    "question_leaked": "template scaffolding leaked into the question (drop_leaked_questions)",
    "question_not_japanese": "the question is mostly not Japanese (min_japanese_share)",
    "answer_refused": "the answer contains the refusal marker",
    "answer_too_short": "the answer is shorter than min_answer_chars",
    "answer_truncated": "the answer hit max_tokens (drop_truncated_answers is on)",
    "answer_looping": "the answer repeats itself in a loop (drop_looping_answers)",
    "answer_not_japanese": "the answer is mostly not Japanese (min_japanese_share)",
    # The elimination rules of the evolution (Evol-Instruct's), here those on one text.
    "depth_leaked": "a depth step copied template scaffolding (drop_depth_leaked)",
    "answer_apology": "the answer is a short apology or refusal (drop_non_answers)",
    "answer_filler": "the answer is only punctuation and filler words (drop_non_answers)",
}


@dataclass(frozen=True)
class Filters:
    """The checks `settings` turn on, with the scaffolding of the templates in use worked out
    once: every question of a run is checked against the same labels."""

    settings: PipelineSettings
    labels: tuple[str, ...] = ()

    @classmethod
    def of(cls, settings: PipelineSettings, templates: Templates) -> Filters:
        wanted = settings.drop_leaked_questions or settings.drop_depth_leaked
        labels = scaffolding(templates, settings.optional_templates()) if wanted else ()
        return cls(settings, labels)

    def depth(self, before: str, after: str) -> str | None:
        """Why a depth step's prompt is dropped, or None: the leakage filter's check on what
        the depth operator wrote, for scaffolding its input did not hold, so a copied label
        is dropped where it came in (and costs no further request), under a reason that
        names the step that copied it."""
        if not self.settings.drop_depth_leaked:
            return None
        already = normalized(before)
        fresh = [label for label in self.labels if label not in already]
        return "depth_leaked" if leaked(after, fresh) is not None else None

    def question(self, question: str) -> str | None:
        """Why the final question is dropped, or None: checked before its answer is asked
        for, so a dropped question costs no answer request."""
        leak_check = self.settings.drop_leaked_questions and self.labels
        if leak_check and leaked(question, self.labels) is not None:
            return "question_leaked"
        if self._foreign(question):
            return "question_not_japanese"
        return None

    def answer(self, answer: str, finish_reason: str | None) -> str | None:
        """Why the answer is dropped, or None. The original checks come first, so a record
        they drop keeps the reason it always had."""
        s = self.settings
        if s.refusal_marker in answer:
            return "answer_refused"
        if len(answer) < s.min_answer_chars:
            return "answer_too_short"
        if s.drop_truncated_answers and finish_reason == "length":
            return "answer_truncated"
        if s.drop_non_answers:
            if refusal(answer, s.refusal_marker) is not None:
                return "answer_apology"
            if filler(answer):
                return "answer_filler"
        if s.drop_looping_answers and looping(answer) is not None:
            return "answer_looping"
        if self._foreign(answer):
            return "answer_not_japanese"
        return None

    def _foreign(self, text: str) -> bool:
        share = self.settings.min_japanese_share
        return share is not None and other_language(text, share) is not None
