"""The elimination rules of the evolution: no information gain (a judge), scaffolding a depth
step copied, and answers that answer nothing. Each off by default, each its own named drop
reason when on, counted in the funnel."""

from __future__ import annotations

import asyncio

import pytest

from zero_one_instruction import render
from zero_one_instruction.config import PipelineSettings
from zero_one_instruction.detectors import filler, scaffolding
from zero_one_instruction.filters import Filters
from zero_one_instruction.pipeline import DROP_REASONS, JudgeKind, Outcome, Tally, request_seed
from zero_one_instruction.templates import load_templates

from .conftest import make_pipeline
from .scripted_engine import ScriptedEngine

RULES_ON: dict[str, object] = {
    "drop_depth_no_gain": True,
    "drop_depth_leaked": True,
    "drop_non_answers": True,
}
# The no-gain judge's "not the same request", so a case reaches the rules after it.
GAIN = {"judge@depth": "いいえ"}
SAME = "width|case=same 同じ依頼です"
# case -> (the scripted responses, the reason the rules give, or None: kept)
CASES: dict[str, tuple[dict[str, str], str | None]] = {
    "gain": (GAIN, None),
    "nogain": ({"judge@depth": "はい"}, "depth_no_gain"),
    "same": ({"width": SAME, "depth": SAME}, "depth_no_gain"),
    "leak": ({**GAIN, "depth": "元の依頼文:\ndepth|case=leak 鉄道の歴史を教えて"}, "depth_leaked"),
    "sorry": ({**GAIN, "answer": "申し訳ありませんが、お答えできません。"}, "answer_apology"),
    "filler": ({**GAIN, "answer": "はい、はい。えーと……了解しました！！"}, "answer_filler"),
}


def evolve(**pipeline: object) -> tuple[dict[str, Outcome], ScriptedEngine]:
    """Every case through one pipeline with these `pipeline:` settings, by case."""
    rules = {case: responses for case, (responses, _) in CASES.items()}
    made, engine = make_pipeline(
        [f"case={case}" for case in CASES],
        seed=9,
        engine_kwargs={"rules": rules},
        pipeline=pipeline,
    )

    async def run() -> list[Outcome]:
        return [outcome async for outcome in made.run(range(len(CASES)))]

    return dict(zip(CASES, asyncio.run(run()), strict=True)), engine


def test_the_rules_are_off_by_default() -> None:
    outcomes, engine = evolve()
    assert all(o.kept for o in outcomes.values()), {c: o.drop_reason for c, o in outcomes.items()}
    same_request = load_templates().same_request.system
    assert not any(r.messages[0].content == same_request for r in engine.requests)
    assert not [s for o in outcomes.values() for s in o.steps if s.judge == JudgeKind.SAME_REQUEST]


def test_each_rule_drops_its_records_with_its_reason_and_is_counted() -> None:
    outcomes, _ = evolve(**RULES_ON)
    tally = Tally()
    for case, outcome in outcomes.items():
        assert outcome.drop_reason == CASES[case][1], case
        tally.add(outcome)
    assert tally.kept == 1
    assert tally.dropped == {
        "depth_no_gain": 2,
        "depth_leaked": 1,
        "answer_apology": 1,
        "answer_filler": 1,
    }
    for reason in tally.dropped:
        assert DROP_REASONS[reason]
        shown = render.summary(tally, 1.0)
        assert f"{reason}" in shown and DROP_REASONS[reason] in shown


@pytest.mark.parametrize("setting", sorted(RULES_ON))
def test_each_setting_turns_on_only_its_own_rule(setting: str) -> None:
    outcomes, _ = evolve(**{setting: True})
    dropped = {case: o.drop_reason for case, o in outcomes.items() if not o.kept}
    own = {
        "drop_depth_no_gain": {"nogain": "depth_no_gain", "same": "depth_no_gain"},
        "drop_depth_leaked": {"leak": "depth_leaked"},
        "drop_non_answers": {"sorry": "answer_apology", "filler": "answer_filler"},
    }[setting]
    assert dropped == own


def test_the_no_gain_judge_compares_before_and_after_the_depth_steps() -> None:
    """One constrained judge after the last depth step, with the prompt before the first
    depth step and after the last, its own seed and its own template; はい drops."""
    outcomes, engine = evolve(drop_depth_no_gain=True, depth_steps=2)
    outcome = outcomes["nogain"]
    assert [(s.step, s.judge if s.judge is not None else s.depth) for s in outcome.steps[-3:]] == [
        ("depth", 0),
        ("depth", 1),
        ("judge", JudgeKind.SAME_REQUEST),
    ]
    judge = outcome.steps[-1]
    assert judge.verdict is True and judge.to_dict()["attempt"] == 3
    width, last_depth = outcome.steps[0].text, outcome.steps[-2].text
    index = list(CASES).index("nogain")
    request = next(
        r
        for r in engine.requests
        if r.step == "judge" and r.seed == request_seed(9, index, "judge", JudgeKind.SAME_REQUEST)
    )
    assert request.choices == ("はい", "いいえ") and request.temperature == 0.0
    templates = load_templates()
    assert request.messages[0].content == templates.same_request.system
    assert (
        request.messages[-1].content
        == templates.same_request.messages(before=width, after=last_depth)[-1][1]
    )


def test_unchanged_text_is_dropped_without_asking_the_judge() -> None:
    outcomes, _ = evolve(drop_depth_no_gain=True)
    assert outcomes["same"].drop_reason == "depth_no_gain"
    assert outcomes["same"].steps[-1].step == "depth"  # no judge request was made


def test_a_doubtful_same_request_verdict_keeps_the_record() -> None:
    """min_judge_confidence: a はい below it counts as いいえ, here "not the same request"."""
    rules = {"doubt": {"judge@depth": "!prob:0.4:はい"}, "sure": {"judge@depth": "!prob:0.9:はい"}}
    pipeline, _ = make_pipeline(
        ["case=doubt", "case=sure"],
        engine_kwargs={"rules": rules},
        pipeline={"drop_depth_no_gain": True, "min_judge_confidence": 0.5},
    )
    doubt, sure = asyncio.run(pipeline.evolve(0)), asyncio.run(pipeline.evolve(1))
    assert doubt.kept and doubt.steps[-4].yes_probability == pytest.approx(0.4)
    assert sure.drop_reason == "depth_no_gain"


def test_no_depth_steps_no_gain_judge() -> None:
    outcomes, _ = evolve(drop_depth_no_gain=True, depth_steps=0)
    assert outcomes["nogain"].kept
    assert not any(s.judge == JudgeKind.SAME_REQUEST for s in outcomes["nogain"].steps)


def test_a_label_the_prompt_already_had_is_not_blamed_on_depth() -> None:
    """Only scaffolding new in a depth step's text is its copy; what width let in is the
    question filter's (`drop_leaked_questions`)."""
    text = "元の依頼文:\ndepth|case=kept 鉄道の歴史を教えて"
    rules = {"kept": {"width": text.replace("depth|", "width|"), "depth": text}}
    pipeline, _ = make_pipeline(
        ["case=kept"], engine_kwargs={"rules": rules}, pipeline={"drop_depth_leaked": True}
    )
    assert asyncio.run(pipeline.evolve(0)).kept


def test_a_leaked_depth_step_costs_no_further_request() -> None:
    outcomes, engine = evolve(drop_depth_leaked=True)
    assert outcomes["leak"].steps[-1].step == "depth"
    index = list(CASES).index("leak")
    flatten_seed = request_seed(9, index, "flatten")
    assert not [r for r in engine.requests if r.step == "flatten" and r.seed == flatten_seed]


def test_the_operators_templates_are_scaffolding_only_where_they_are_sent() -> None:
    """A run that sends the deepen template is checked for its request line; one that does
    not is checked for exactly what it was before operators existed."""
    templates = load_templates()
    line = templates.deepen.user.splitlines()[-1]  # the one-line request after the material
    assert line not in scaffolding(templates)
    assert line in scaffolding(templates, ("deepen",))
    assert "書き直した依頼文:" in scaffolding(templates, ("same_request",))
    rules = {"op": {"judge@depth": "いいえ", "depth": f"depth|case=op {line}"}}
    for weights, reason in (({"constraints": 1}, None), ({"deepen": 1}, "depth_leaked")):
        pipeline, _ = make_pipeline(
            ["case=op"],
            engine_kwargs={"rules": rules},
            pipeline={"drop_depth_leaked": True, "depth_operators": weights},
        )
        assert asyncio.run(pipeline.evolve(0)).drop_reason == reason


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("。。。！？……", True),
        ("はい、了解しました。", True),
        ("えーと、うーん……なるほど。", True),
        ("OK! Sure.", True),
        ("   ", True),
        ("はい。東京です。", False),
        ("42", False),
        ("はい、そうです。理由は三つあります。", False),
        ("Yes, Python 3.11 supports it.", False),
    ],
)
def test_filler_is_an_answer_without_a_word_of_content(answer: str, expected: bool) -> None:
    assert filler(answer) is expected


def test_an_answer_that_declines_at_length_is_an_answer() -> None:
    """The report's refusal check: a long answer that opens with a hedge and then answers
    is kept (only a short apology is dropped)."""
    long = (
        "申し訳ありませんが、正確にはお答えできません。" + "ただし一般的には次のとおりです。" * 30
    )
    rules = {"long": {"answer": long}}
    pipeline, _ = make_pipeline(
        ["case=long"], engine_kwargs={"rules": rules}, pipeline={"drop_non_answers": True}
    )
    assert asyncio.run(pipeline.evolve(0)).kept


def test_the_depth_rule_alone_leaves_final_questions_unchecked() -> None:
    """Each rule is switched on its own: the depth rule loads the labels for depth's text,
    which must not switch on the question filter (`drop_leaked_questions`) with it."""
    labelled = "元の依頼文:\n東京の観光地を三つ紹介してください。"
    depth_only = Filters.of(PipelineSettings(drop_depth_leaked=True), load_templates())
    assert depth_only.depth("東京の観光地を紹介してください。", labelled) == "depth_leaked"
    assert depth_only.question(labelled) is None
    both = PipelineSettings(drop_depth_leaked=True, drop_leaked_questions=True)
    assert Filters.of(both, load_templates()).question(labelled) == "question_leaked"
