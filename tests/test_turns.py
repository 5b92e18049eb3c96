"""Multi-turn conversations (`pipeline.turns`): the shape and order of the turns in records,
traces and requests, the first turn asked exactly as a single-turn run asks it, each way a
later turn can fail ending the conversation (kept and counted, or dropped), seeds per turn,
the funnel's turn counts, and the follow-up templates."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from zero_one_instruction import render
from zero_one_instruction.config import Config, config_data
from zero_one_instruction.detectors import scaffolding
from zero_one_instruction.encoder import EncodeOptions, Encoder, meta_line, record_line
from zero_one_instruction.errors import TemplateError
from zero_one_instruction.pipeline import (
    DROP_REASONS,
    TURN_REASONS,
    JudgeKind,
    Outcome,
    Tally,
    request_seed,
)
from zero_one_instruction.shards import readable_funnel
from zero_one_instruction.templates import SPEAKERS, conversation_text, load_templates

from .conftest import make_pipeline
from .scripted_engine import ScriptedEngine, scripted_config

SYSTEM = "システム"
APOLOGY = "申し訳ありませんが、お答えできません。"
# case -> (the scripted responses, the settings it needs beyond turns, the turn that fails,
# and why). Rules keyed `KEY#N` hold in turn N only.
FAILURES: dict[str, tuple[dict[str, str], dict[str, Any], int, str]] = {
    "fuerror": ({"follow_up": "!error"}, {}, 2, "follow_up_failed"),
    "fuempty": ({"follow_up#3": "!empty"}, {}, 3, "follow_up_empty"),
    "furepeat": (
        {
            "flatten": "flatten|case=furepeat 自転車のチェーンに油を差す理由を教えてください。",
            "follow_up": "follow_up|case=furepeat 自転車のチェーンに油を差す理由を教えてください。",
        },
        {},
        2,
        "follow_up_repeated",
    ),
    "fucopy": (
        {"follow_up": "回答です。ケースfucopyについて詳しく説明します。"},
        {},
        2,
        "follow_up_repeated",
    ),
    "funo": ({"judge@follow_up": "いいえ"}, {}, 2, "follow_up_rejected"),
    "fudoubt": (
        {"judge@follow_up": "!prob:0.2:はい"},
        {"min_judge_confidence": 0.5},
        2,
        "follow_up_low_confidence",
    ),
    "fujudgeerror": ({"judge@follow_up#3": "!error"}, {}, 3, "judge_failed"),
    "fuinvalid": ({"judge@follow_up": "たぶん"}, {}, 2, "judge_invalid"),
    "fuleak": (
        {"follow_up": "ユーザー: follow_up|case=fuleak 続きの質問"},
        {"drop_leaked_questions": True},
        2,
        "question_leaked",
    ),
    "fucut": ({"follow_up": "!cut:follow_up|case=fucut 質問"}, {}, 2, "bad_text"),
    "anerror": ({"answer#2": "!error"}, {}, 2, "answer_failed"),
    "anempty": ({"answer#3": "!empty"}, {}, 3, "answer_empty"),
    "anshort": ({"answer#2": "短い"}, {}, 2, "answer_too_short"),
    "anrefused": ({"answer#2": "それは不可能です。ほかの質問をどうぞ。"}, {}, 2, "answer_refused"),
    "antruncated": (
        {"answer#3": "!length:途中で切れた長い回答の続きがあります"},
        {"drop_truncated_answers": True},
        3,
        "answer_truncated",
    ),
    "anrepeat": (
        {"answer#3": "回答です。ケースanrepeatについて詳しく説明します。"},
        {},
        3,
        "answer_repeated",
    ),
    "anapology": ({"answer#2": APOLOGY}, {"drop_non_answers": True}, 2, "answer_apology"),
}


def run_cases(cases: list[str], rules: dict[str, dict[str, str]], **pipeline: Any) -> Any:
    """Each case through one pipeline with these `pipeline:` settings: outcomes and engine."""
    made, engine = make_pipeline(
        [f"case={case}" for case in cases],
        seed=5,
        engine_kwargs={"rules": rules},
        pipeline=pipeline,
    )

    async def run() -> list[Outcome]:
        return [outcome async for outcome in made.run(range(len(cases)))]

    return asyncio.run(run()), engine


def test_a_conversation_holds_every_turn_in_order() -> None:
    """Three turns: the record's conversation is system, then question and answer of each
    turn in order; `input`/`output` are the first turn; `--format messages` and the trace
    carry every turn; the later questions are the follow-up step's text, judged."""
    (outcome,), _ = run_cases(["a"], {}, turns=3)
    assert outcome.kept and outcome.turns == 3 and outcome.ended is None
    record = json.loads(record_line(outcome, SYSTEM))
    turns = record["conversation"]
    assert [t["from"] for t in turns] == ["system", *["human", "gpt"] * 3]
    assert record["input"] == turns[1]["value"] == outcome.question
    assert record["output"] == turns[2]["value"] == outcome.answer
    later = [s for s in outcome.steps if s.turn is not None]
    assert [(s.turn, s.step, s.judge) for s in later] == [
        (turn, step, judge)
        for turn in (2, 3)
        for step, judge in (("follow_up", None), ("judge", JudgeKind.FOLLOW_UP), ("answer", None))
    ]
    questions = [s.text for s in later if s.step == "follow_up"]
    answers = [s.text for s in later if s.step == "answer"]
    assert [t["value"] for t in turns[3::2]] == questions
    assert [t["value"] for t in turns[4::2]] == answers
    assert len(set(questions + answers)) == 4  # each request had its own seed
    messages = json.loads(Encoder(EncodeOptions(fmt="messages")).outcome(outcome, SYSTEM) or b"")
    assert [m["role"] for m in messages["messages"]] == ["system", *["user", "assistant"] * 3]
    assert [m["content"] for m in messages["messages"]] == [t["value"] for t in turns]
    meta = json.loads(meta_line(outcome))
    assert meta["turns"] == 3 and "later_turns" not in meta and "ended" not in meta
    trace = outcome.to_dict()
    assert trace["later_turns"] == [
        {"question": q, "answer": a} for q, a in zip(questions, answers, strict=True)
    ]
    assert [s["turn"] for s in trace["steps"] if "turn" in s] == [2, 2, 2, 3, 3, 3]


def test_a_later_answer_is_asked_with_the_whole_conversation() -> None:
    (outcome,), engine = run_cases(["a"], {}, turns=3)
    answers = [r for r in engine.requests if r.step == "answer"]
    assert len(answers) == 3
    q1, a1 = outcome.question, outcome.answer
    (q2, a2), (q3, _) = outcome.later_turns
    last = answers[-1].messages
    assert [m.role for m in last] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert [m.content for m in last[1:]] == [q1, a1, q2, a2, q3]
    assert last[0] == answers[0].messages[0]  # the answer step's system prompt, marker in it
    follow_ups = [r for r in engine.requests if r.step == "follow_up"]
    assert conversation_text([(q1, a1)]) in follow_ups[0].messages[-1].content
    assert conversation_text([(q1, a1), (q2, a2)]) in follow_ups[1].messages[-1].content
    judged = [r for r in engine.requests if r.step == "judge"][-1].messages[-1].content
    assert conversation_text([(q1, a1), (q2, a2)]) in judged and q3 in judged
    assert judged.index(q3) > judged.index(a2)  # the question comes after the conversation


def test_the_first_turn_is_asked_as_a_single_turn_run_asks_it() -> None:
    """The same requests, seeds and trace for the first turn, whatever `turns` is."""
    (single,), one = run_cases(["a"], {}, turns=1)
    (multi,), three = run_cases(["a"], {}, turns=3)
    first = [r for r in three.requests if r.step != "follow_up"][: len(one.requests)]
    assert first == one.requests
    assert [s for s in multi.steps if s.turn is None] == single.steps
    assert (multi.question, multi.answer) == (single.question, single.answer)
    assert single.to_dict().keys() == {
        "index", "base_prompt", "question", "answer", "drop_reason", "fixer_ran", "steps", "kept"
    }  # fmt: skip
    assert record_line(single, SYSTEM) == record_line(
        Outcome(0, "", single.question, single.answer), SYSTEM
    )


def test_a_later_turns_requests_have_seeds_of_their_own() -> None:
    assert request_seed(7, 3, "answer") == request_seed(7, 3, "answer", turn=1)
    seeds = {request_seed(7, 3, "answer", turn=t) for t in (1, 2, 3)}
    seeds |= {request_seed(7, 3, "follow_up", turn=t) for t in (2, 3)}
    seeds |= {request_seed(7, 3, "judge", JudgeKind.FOLLOW_UP, turn=t) for t in (2, 3)}
    assert len(seeds) == 7
    (outcome,), engine = run_cases(["a"], {}, turns=3)
    later = [s for s in outcome.steps if s.turn is not None]
    sent = [r.seed for r in engine.requests][-len(later) :]
    assert sent == [
        request_seed(5, 0, s.step, s.judge, turn=s.turn) for s in later
    ]  # the pipeline's seeds are these


@pytest.mark.parametrize("case", list(FAILURES))
def test_each_way_a_later_turn_fails_ends_the_conversation_and_is_counted(case: str) -> None:
    """`failed_turn: keep` (the default): the record keeps its good turns and says why its
    conversation ended, and the funnel counts it; `drop`: the record is dropped as
    `turn_<reason>`, a described reason. Either way the funnel adds up."""
    rules, settings, turn, reason = FAILURES[case]
    assert reason in TURN_REASONS
    cases = [case, "fine"]
    (kept, fine), _ = run_cases(cases, {case: rules}, turns=3, **settings)
    assert kept.kept and kept.ended == reason, (kept.drop_reason, kept.ended)
    assert kept.turns == turn - 1 and len(kept.later_turns) == turn - 2
    assert fine.kept and fine.turns == 3 and fine.ended is None
    record = json.loads(record_line(kept, SYSTEM))
    assert len(record["conversation"]) == 1 + 2 * (turn - 1)
    assert json.loads(meta_line(kept))["ended"] == reason
    failed = [s for s in kept.steps if s.turn == turn]
    assert failed  # the failed turn's requests stay in the trace
    tally = Tally()
    tally.add(kept)
    tally.add(fine)
    assert tally.turns_ended == {reason: 1}
    assert tally.turns == Counter({str(turn - 1): 1, "3": 1})
    assert readable_funnel(tally.as_dict())
    assert f"ended early: {reason} 1" in render.summary(tally, 1.0)

    (dropped, fine), _ = run_cases(cases, {case: rules}, turns=3, failed_turn="drop", **settings)
    assert dropped.drop_reason == f"turn_{reason}" and dropped.ended is None
    assert dropped.question is None and dropped.later_turns == []
    assert DROP_REASONS[dropped.drop_reason].startswith("a later turn: ")
    assert fine.kept and fine.turns == 3
    tally = Tally()
    tally.add(dropped)
    tally.add(fine)
    assert tally.kept + sum(tally.dropped.values()) == tally.prompts == 2
    assert tally.dropped == {f"turn_{reason}": 1} and not tally.turns_ended
    assert readable_funnel(tally.as_dict())


def test_a_first_turn_that_fails_drops_the_record_as_it_always_did() -> None:
    (outcome,), engine = run_cases(["a"], {"a": {"answer#1": "!empty"}}, turns=3)
    assert outcome.drop_reason == "answer_empty"
    assert not [r for r in engine.requests if r.step == "follow_up"]


def test_reruns_make_the_same_conversations() -> None:
    cases = ["a", "b", "funo", "anshort"]
    rules = {case: FAILURES[case][0] for case in cases if case in FAILURES}
    first, _ = run_cases(cases, rules, turns=3)
    again, _ = run_cases(cases, rules, turns=3)
    assert [o.to_dict() for o in first] == [o.to_dict() for o in again]
    assert [record_line(o, SYSTEM) for o in first] == [record_line(o, SYSTEM) for o in again]


def test_the_turn_counts_of_a_funnel_read_back_and_are_checked() -> None:
    tally = Tally(prompts=4, kept=3, dropped=Counter({"answer_empty": 1}))
    tally.turns.update({"2": 2, "1": 1})
    tally.turns_ended.update({"follow_up_rejected": 1})
    data = tally.as_dict()
    assert data["turns"] == {"1": 1, "2": 2} and data["turns_ended"] == {"follow_up_rejected": 1}
    assert readable_funnel(data)
    assert Tally.from_dict(json.loads(json.dumps(data))) == tally
    assert "turns" not in Tally(prompts=1, kept=1).as_dict()
    assert not readable_funnel({**data, "turns": {"1": 1, "2": 1}})  # fewer than it kept
    assert not readable_funnel({**data, "turns": {"0": 3}})
    assert not readable_funnel({**data, "turns_ended": {"follow_up_rejected": 4}})
    assert not readable_funnel({**data, "turns_ended": ["follow_up_rejected"]})
    assert not readable_funnel({k: v for k, v in data.items() if k != "turns_ended"})


def test_turn_counts_are_in_the_order_of_their_numbers() -> None:
    """JSON keys are strings: sorted as such, ten turns came before two in the marker's
    funnel and `zoi status --json`."""
    tally = Tally(prompts=6, kept=6)
    tally.turns.update({"10": 1, "2": 3, "1": 2})
    tally.turns_ended.update({"follow_up_rejected": 1, "answer_repeated": 1})
    data = tally.as_dict()
    assert list(data["turns"]) == ["1", "2", "10"]
    assert list(data["turns_ended"]) == ["answer_repeated", "follow_up_rejected"]
    assert readable_funnel(data)


def test_turns_and_failed_turn_are_checked_and_hidden_at_their_defaults() -> None:
    default = config_data(scripted_config())
    assert "turns" not in default["pipeline"] and "failed_turn" not in default["pipeline"]
    assert "follow_up" not in default["sampling"]
    shown = config_data(
        scripted_config(
            pipeline={"turns": 2, "failed_turn": "drop"},
            sampling={"follow_up": {"temperature": 0.7}},
        )
    )
    assert shown["pipeline"]["turns"] == 2 and shown["pipeline"]["failed_turn"] == "drop"
    assert shown["sampling"]["follow_up"]["temperature"] == 0.7
    for bad in ({"turns": 0}, {"turns": 21}, {"failed_turn": "retry"}, {"turns": "2"}):
        with pytest.raises(ValueError):
            scripted_config(pipeline=bad)
    served = Config.model_validate(
        {
            "model_name": "m",
            "engine": "openai",
            "openai": {"endpoints": ["http://127.0.0.1:1/v1"]},
            "step_models": {"follow_up": "big"},
        }
    )
    assert served.step_model("follow_up") == "big" and "big" in served.served_models()


def test_the_follow_up_sampling_reaches_its_requests() -> None:
    made, engine = make_pipeline(
        ["case=a"],
        pipeline={"turns": 2},
        sampling={"follow_up": {"temperature": 0.3, "max_tokens": 77}},
    )

    async def run() -> list[Outcome]:
        return [o async for o in made.run(range(1))]

    asyncio.run(run())
    (follow_up,) = [r for r in engine.requests if r.step == "follow_up"]
    assert (follow_up.temperature, follow_up.max_tokens) == (0.3, 77)
    answers = [r for r in engine.requests if r.step == "answer"]
    assert answers[0].temperature == answers[1].temperature != 0.3


def test_the_follow_up_templates_are_shipped_checked_and_overridable(tmp_path: Path) -> None:
    templates = load_templates()
    assert templates.follow_up.examples and "{conversation}" in templates.follow_up.user
    judge = templates.follow_up_judge
    assert {e.reply for e in judge.examples} == {"はい", "いいえ"}
    assert judge.user.index("{conversation}") < judge.user.index("{question}")
    for text, fragment in [
        ("follow_up: '次の質問'", "lacks placeholder {conversation}"),
        ("follow_up_judge: '{conversation}'", "lacks placeholder {question}"),
        ("follow_up: '{conversation} {prompt}'", "unknown placeholder {prompt}"),
        (
            "follow_up_judge:\n  user: '{conversation} {question}'\n  examples:\n"
            "    - {conversation: a, question: b, reply: 合格}",
            "a judge example replies はい or いいえ",
        ),
    ]:
        own = tmp_path / "own.yml"
        own.write_text(text + "\n", encoding="utf-8")
        with pytest.raises(TemplateError, match=fragment.replace("{", r"\{")):
            load_templates(own)
    own = tmp_path / "own.yml"
    own.write_text("follow_up: '会話: {conversation} 次は？'\n", encoding="utf-8")
    assert load_templates(own).follow_up.user == "会話: {conversation} 次は？"


def test_the_follow_up_scaffolding_counts_only_where_it_is_sent() -> None:
    templates = load_templates()
    single = scaffolding(templates, scripted_config().pipeline.optional_templates())
    optional = scripted_config(pipeline={"turns": 2}).pipeline.optional_templates()
    assert optional == ("follow_up", "follow_up_judge")
    multi = scaffolding(templates, optional)
    speakers = {label.strip() for label in SPEAKERS}
    assert speakers <= set(multi) and not speakers & set(single)
    assert "これまでの会話:" in multi and "これまでの会話:" not in single


def test_a_scripted_engine_tells_the_turn_of_a_request() -> None:
    """The test double's `KEY#TURN` rules rest on this: a sanity check of the double."""
    engine = ScriptedEngine(scripted_config())
    (_, made) = run_cases(["a"], {}, turns=3)
    turns = [engine._turn(r) for r in made.requests if r.step in ("follow_up", "answer")]
    assert turns == [1, 2, 2, 3, 3]
