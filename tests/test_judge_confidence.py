"""The judge's confidence: the probability of はい from the engine, in the trace, the
`min_judge_confidence` threshold, and its figures in the report (issue 12, item 4)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from zero_one_instruction.analysis import FunnelAnalysis
from zero_one_instruction.dataset import Item
from zero_one_instruction.engines.choices import choice_probabilities
from zero_one_instruction.engines.vllm import VLLMEngine
from zero_one_instruction.pipeline import DROP_REASONS, JudgeKind, Outcome, Tally
from zero_one_instruction.rundir import RUN_FILE, RunError, create_or_open
from zero_one_instruction.samples import JudgeConfidence

from .conftest import make_pipeline
from .scripted_engine import scripted_config

CHOICES = ("はい", "いいえ")


# --- the probability of a choice, from token log-probabilities -------------------------------

WORDS = {1: "は", 2: "はい", 3: "い", 4: "いい", 5: "いいえ", 6: "え"}


def decode_words(ids: Any) -> str:
    return "".join(WORDS[i] for i in ids)


def test_every_spelling_of_a_choice_adds_to_its_probability() -> None:
    """「は」 and 「はい」 both lead to はい: the model's probability of はい is their sum,
    normalised over the tokens the constraint allowed."""
    position = {2: math.log(0.5), 1: math.log(0.1), 3: math.log(0.3), 4: math.log(0.1)}
    assert choice_probabilities(CHOICES, [2], [position], decode_words) == {
        "はい": 0.6,
        "いいえ": 0.4,
    }


def test_the_probability_is_read_where_the_text_commits_to_a_choice() -> None:
    """A byte-level tokenizer spells は and い with the same first two bytes: those positions
    decide nothing, the third does (and the generated path may be いいえ)."""
    pieces = {10: b"\xe3", 11: b"\x81", 12: b"\xaf", 13: b"\x84", 14: "いえ".encode()}

    def decode(ids: Any) -> str:
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    positions = [
        {10: 0.0},
        {11: 0.0},
        {12: math.log(0.25), 13: math.log(0.75), 10: -math.inf},
        {14: 0.0},
    ]
    found = choice_probabilities(CHOICES, [10, 11, 13, 14], positions, decode)
    assert found == {"はい": 0.25, "いいえ": 0.75}


def test_no_probability_where_the_log_probabilities_cannot_tell() -> None:
    masked = {2: -math.inf, 3: -math.inf}
    assert choice_probabilities(CHOICES, [2], [masked], decode_words) is None
    assert choice_probabilities(CHOICES, [2], [], decode_words) is None
    # the text never commits: one choice is the beginning of the other
    assert choice_probabilities(("はい", "はいはい"), [2], [{2: 0.0}], decode_words) is None


def test_a_failure_reading_the_probabilities_leaves_them_out_and_the_verdict_stands(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The probabilities are an extra: a tokenizer that fails, or log-probabilities of an
    unexpected shape, must not fail the request (and so the chunk)."""

    class Broken:
        def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
            raise RuntimeError("Already borrowed")

    class Entry:
        logprob = 0.0

    engine = object.__new__(VLLMEngine)
    engine._tokenizer, engine._probability_failed = Broken(), False
    out = SimpleNamespace(token_ids=[2], logprobs=[{2: Entry(), 1: Entry()}])
    with caplog.at_level(logging.WARNING):
        assert engine._choice_probabilities(CHOICES, out) is None
        assert (
            engine._choice_probabilities(CHOICES, SimpleNamespace(token_ids=[2], logprobs=[7]))
            is None
        )
    warnings = [r for r in caplog.records if "judge probabilities left out" in r.getMessage()]
    assert len(warnings) == 1 and "Already borrowed" in warnings[0].getMessage()
    engine._tokenizer = SimpleNamespace(
        decode=lambda ids, skip_special_tokens=True: decode_words(ids)
    )
    assert engine._choice_probabilities(CHOICES, out) == {"はい": 1.0, "いいえ": 0.0}


# --- the trace and the threshold, through the scripted engine --------------------------------


def evolve(case: str, responses: dict[str, str], **pipeline: Any) -> Outcome:
    rules = {"engine_kwargs": {"rules": {case: responses}}}
    overrides: dict[str, Any] = {**rules, "pipeline": pipeline} if pipeline else rules
    evolver, _ = make_pipeline([f"case={case}"], **overrides)
    return asyncio.run(evolver.evolve(0))


def judges(outcome: Outcome) -> list[tuple[JudgeKind | None, bool | None, float | None]]:
    return [(s.judge, s.verdict, s.yes_probability) for s in outcome.steps if s.step == "judge"]


def test_the_probability_of_yes_is_recorded_on_each_judge_step() -> None:
    outcome = evolve("p", {"judge@width": "!prob:0.8:はい", "judge@flatten": "!prob:0.3:いいえ"})
    assert judges(outcome) == [(JudgeKind.FIRST, True, 0.8), (JudgeKind.FINAL, False, 0.3)]
    assert outcome.drop_reason == "final_rejected"  # a いいえ stays a rejection
    traced = outcome.to_dict()["steps"]
    assert [s.get("yes_probability") for s in traced] == [None, 0.8, None, None, 0.3]
    assert "yes_probability" not in traced[0]  # only judge steps carry it


def test_an_engine_without_probabilities_leaves_the_trace_as_it_was() -> None:
    outcome = evolve("plain", {}, min_judge_confidence=0.99)
    assert outcome.kept  # the threshold cannot doubt what the engine did not measure
    assert [p for _, _, p in judges(outcome)] == [None, None]
    judge = outcome.to_dict()["steps"][1]
    assert list(judge) == [
        "step",
        "attempt",
        "text",
        "verdict",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "error",
    ]


@pytest.mark.parametrize(
    ("responses", "pipeline", "reason"),
    [
        ({"judge@flatten": "!prob:0.49:はい"}, {}, "final_low_confidence"),
        ({"judge@width": "!prob:0.2:はい"}, {"fixer": False}, "judge_low_confidence"),
        (
            {"judge@width": "いいえ", "judge@fix": "!prob:0.1:はい"},
            {},
            "fix_low_confidence",
        ),
    ],
)
def test_a_yes_below_the_threshold_is_dropped_with_its_reason(
    responses: dict[str, str], pipeline: dict[str, Any], reason: str
) -> None:
    outcome = evolve("low", responses, min_judge_confidence=0.5, **pipeline)
    assert outcome.drop_reason == reason and reason in DROP_REASONS
    assert outcome.steps[-1].step == "judge" and outcome.steps[-1].verdict is True
    tally = Tally()
    tally.add(outcome)
    assert tally.dropped == {reason: 1}


def test_a_doubted_first_yes_goes_to_the_fixer_as_a_no_does() -> None:
    outcome = evolve("doubt", {"judge@width": "!prob:0.2:はい"}, min_judge_confidence=0.5)
    assert outcome.kept and outcome.fixer_ran
    assert [s.step for s in outcome.steps][:4] == ["width", "judge", "fix", "judge"]


def test_a_yes_at_the_threshold_stands_and_without_one_nothing_is_doubted() -> None:
    at = evolve("at", {"judge@flatten": "!prob:0.5:はい"}, min_judge_confidence=0.5)
    off = evolve("off", {"judge@flatten": "!prob:0.01:はい"})
    assert at.kept and off.kept


# --- the setting and the run's fingerprint -----------------------------------------------


def test_the_setting_left_off_keeps_runs_and_their_fingerprint_as_they_were(
    tmp_path: Path,
) -> None:
    """The run's spec, so its fingerprint, leaves the setting out while it is off: runs made
    before it existed reopen, and a threshold is another run."""
    run = create_or_open(tmp_path / "run", scripted_config(), 0, 10, 5)
    written = json.loads((run.path / RUN_FILE).read_text(encoding="utf-8"))
    assert "min_judge_confidence" not in written["spec"]["pipeline"]
    assert written["config"]["pipeline"]["min_judge_confidence"] is None
    explicit = scripted_config(pipeline={"min_judge_confidence": None})
    assert create_or_open(run.path, explicit, 0, 10, 5).fingerprint == run.fingerprint
    strict = scripted_config(pipeline={"min_judge_confidence": 0.7})
    with pytest.raises(RunError, match=r"pipeline\.min_judge_confidence"):
        create_or_open(run.path, strict, 0, 10, 5)
    assert strict.model_dump()["pipeline"]["min_judge_confidence"] == 0.7


@pytest.mark.parametrize("value", [-0.1, 1.5, "0.5"])
def test_the_threshold_is_a_probability(value: object) -> None:
    with pytest.raises(ValueError, match="min_judge_confidence"):
        scripted_config(pipeline={"min_judge_confidence": value})


# --- the report's figures ------------------------------------------------------------------


def as_item(outcome: Outcome) -> Item:
    """An outcome as the report reads it back from a shard: its trace in JSON form."""
    data = json.loads(json.dumps(outcome.to_dict(), ensure_ascii=False))
    return Item(
        outcome.index,
        outcome.question,
        outcome.answer,
        outcome.drop_reason,
        outcome.fixer_ran,
        data["steps"],
    )


def test_the_report_plots_the_probabilities_the_trace_recorded() -> None:
    outcomes = [
        evolve("r1", {"judge@width": "!prob:0.97:はい", "judge@flatten": "!prob:0.42:いいえ"}),
        evolve("r2", {"judge@width": "!prob:0.12:いいえ", "judge@fix": "!prob:0.93:はい"}),
        evolve("r3", {}),  # an engine without probabilities adds nothing
    ]
    confidence = JudgeConfidence()
    for outcome in outcomes:
        confidence.add(as_item(outcome))
    judges = confidence.figures()["judges"]
    assert {name: j["count"] for name, j in judges.items()} == {
        "first": 2,
        "after_fixer": 1,
        "final": 1,  # r2's final judge had no probability
    }
    assert judges["first"]["histogram"]["counts"][19] == 1  # 0.97
    assert judges["first"]["histogram"]["counts"][2] == 1  # 0.12
    assert judges["final"]["histogram"]["counts"][8] == 1  # 0.42


def test_a_doubted_yes_after_the_fixer_is_not_a_rescue() -> None:
    responses = {"judge@width": "いいえ", "judge@fix": "!prob:0.3:はい"}
    doubted = evolve("d", responses, min_judge_confidence=0.5)
    rescued = evolve("r", responses)
    funnel = FunnelAnalysis()
    funnel.add(as_item(doubted))
    funnel.add(as_item(rescued))
    assert doubted.drop_reason == "fix_low_confidence" and rescued.kept
    assert funnel.figures()["fixer"] == {"ran": 2, "rescued": 1, "rescue_rate": 0.5}
