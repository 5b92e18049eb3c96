"""Every branch of the evolution flow, through the scripted engine."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from zero_one_instruction.engines.base import EngineDead
from zero_one_instruction.pipeline import (
    DROP_REASONS,
    JUDGE_CHOICES,
    JudgeKind,
    Outcome,
    StepTrace,
    Tally,
    request_seed,
)
from zero_one_instruction.rundir import Chunk
from zero_one_instruction.shards import write_chunk

from .conftest import make_pipeline


def evolve(case: str, **overrides: object) -> Outcome:
    pipeline, _ = make_pipeline([f"case={case}"], **overrides)
    return asyncio.run(pipeline.evolve(0))


# The steps of a prompt whose width text the first judge rejects, up to the fixer's judge.
REJECTED_THEN_FIXED = [
    ("width", None),
    ("judge", JudgeKind.FIRST),
    ("fix", None),
    ("judge", JudgeKind.AFTER_FIX),
]


def steps(outcome: Outcome) -> list[tuple[str, JudgeKind | int | None]]:
    """Each step with its judge kind or depth index, where it has one."""
    return [(s.step, s.judge if s.judge is not None else s.depth) for s in outcome.steps]


def rules(case: str, **responses: str) -> dict[str, object]:
    return {
        "engine_kwargs": {"rules": {case: {k.replace("__", "@"): v for k, v in responses.items()}}}
    }


def test_happy_path_walks_every_step_in_order() -> None:
    outcome = evolve("ok")
    assert outcome.kept
    assert steps(outcome) == [
        ("width", None),
        ("judge", JudgeKind.FIRST),
        ("depth", 0),
        ("flatten", None),
        ("judge", JudgeKind.FINAL),
        ("answer", None),
    ]
    assert outcome.question == outcome.steps[3].text.strip()
    assert outcome.question.startswith("flatten|case=ok")
    assert outcome.answer.startswith("回答です。")
    assert [s.verdict for s in outcome.steps if s.step == "judge"] == [True, True]
    assert not outcome.fixer_ran
    assert outcome.completion_tokens == sum(len(s.text) for s in outcome.steps)


def test_rejected_width_is_fixed_then_accepted() -> None:
    pipeline, engine = make_pipeline(["case=fixme"], **rules("fixme", judge__width="いいえ"))
    outcome = asyncio.run(pipeline.evolve(0))
    fix_request = next(r for r in engine.requests if r.step == "fix")
    assert "width|case=fixme" in fix_request.messages[-1].content  # the rejected width text
    assert outcome.kept and outcome.fixer_ran
    assert steps(outcome)[:4] == REJECTED_THEN_FIXED
    assert [s.verdict for s in outcome.steps if s.step == "judge"] == [False, True, True]
    assert outcome.question.startswith("flatten|")


def test_rejected_width_fixed_and_rejected_again_is_dropped() -> None:
    outcome = evolve("bad", **rules("bad", judge__width="いいえ", judge__fix="いいえ"))
    assert outcome.drop_reason == "fix_rejected"
    assert outcome.fixer_ran
    assert steps(outcome) == REJECTED_THEN_FIXED
    assert outcome.question is None and outcome.answer is None


def test_rejected_width_without_fixer_is_dropped() -> None:
    outcome = evolve("nofix", pipeline={"fixer": False}, **rules("nofix", judge__width="いいえ"))
    assert outcome.drop_reason == "judge_rejected"
    assert steps(outcome) == [("width", None), ("judge", JudgeKind.FIRST)]


def test_empty_width_goes_to_fixer_with_the_base_prompt() -> None:
    pipeline, engine = make_pipeline(["case=blank"], **rules("blank", width="!empty"))
    outcome = asyncio.run(pipeline.evolve(0))
    assert outcome.kept and outcome.fixer_ran
    assert steps(outcome)[:3] == [("width", None), ("fix", None), ("judge", JudgeKind.AFTER_FIX)]
    fix_request = next(r for r in engine.requests if r.step == "fix")
    assert "case=blank" in fix_request.messages[-1].content


def test_empty_width_without_fixer_is_dropped() -> None:
    outcome = evolve("blank", pipeline={"fixer": False}, **rules("blank", width="!empty"))
    assert outcome.drop_reason == "width_empty"


@pytest.mark.parametrize(
    ("key", "response", "reason"),
    [
        ("width", "!error", "width_failed"),
        ("judge__width", "!error", "judge_failed"),
        ("judge__width", "たぶん", "judge_invalid"),
        ("depth", "!error", "depth_failed"),
        ("depth", "!empty", "depth_empty"),
        ("flatten", "!error", "flatten_failed"),
        ("flatten", "   \n", "flatten_empty"),
        ("judge__flatten", "!error", "judge_failed"),
        ("answer", "!error", "answer_failed"),
        ("answer", "!empty", "answer_empty"),
    ],
)
def test_failed_and_empty_completions_drop_the_record(key: str, response: str, reason: str) -> None:
    outcome = evolve("x", **rules("x", **{key: response}))
    assert outcome.drop_reason == reason
    last = outcome.steps[-1]
    if response == "!error":
        assert last.error and "scripted failure" in last.error
    if response == "たぶん":
        assert "not one of the choices" in (last.error or "")


@pytest.mark.parametrize("key", ["width", "judge__width", "depth", "flatten", "answer"])
def test_cut_character_drops_only_that_record_as_bad_text(key: str, tmp_path: Path) -> None:
    """Half an emoji from the engine: the record is dropped and counted, and its trace (with
    U+FFFD in place of the half) can still be written with the rest of the chunk."""
    pipeline, _ = make_pipeline(
        ["case=ok", "case=cut"], **rules("cut", **{key: "!cut:回答です。ケースについて詳しく"})
    )
    ok, cut = asyncio.run(pipeline.evolve(0)), asyncio.run(pipeline.evolve(1))
    assert ok.kept and cut.drop_reason == "bad_text"
    assert "bad_text" in DROP_REASONS
    last = cut.steps[-1]
    assert last.text is not None and last.text.endswith("\ufffd")
    assert "lone surrogate U+D83D" in (last.error or "")
    run = SimpleNamespace(shards=tmp_path, fingerprint="test")  # all write_chunk reads of a run
    marker = write_chunk(run, Chunk(0, 2), [ok, cut], "system", {})  # type: ignore[arg-type]
    assert marker["funnel"]["kept"] == 1 and marker["funnel"]["dropped"] == {"bad_text": 1}
    rejects = (tmp_path / f"{Chunk(0, 2).id}.rejects.jsonl").read_text(encoding="utf-8")
    assert json.loads(rejects)["drop_reason"] == "bad_text"


def test_fixer_failures_are_their_own_reasons() -> None:
    failed = evolve("f", **rules("f", judge__width="いいえ", fix="!error"))
    empty = evolve("f", **rules("f", judge__width="いいえ", fix="!empty"))
    assert (failed.drop_reason, empty.drop_reason) == ("fix_failed", "fix_empty")


@pytest.mark.parametrize("depth_steps", [0, 1, 3])
def test_depth_steps(depth_steps: int) -> None:
    pipeline, engine = make_pipeline(["case=d"], pipeline={"depth_steps": depth_steps})
    outcome = asyncio.run(pipeline.evolve(0))
    assert outcome.kept
    depth = [s.depth for s in outcome.steps if s.step == "depth"]
    assert depth == list(range(depth_steps))
    flatten_input = next(r for r in engine.requests if r.step == "flatten").messages[-1].content
    assert ("depth|case=d" if depth_steps else "width|case=d") in flatten_input
    depth_inputs = [r.messages[-1].content for r in engine.requests if r.step == "depth"]
    for n, text in enumerate(depth_inputs):
        assert ("width|" if n == 0 else "depth|") in text


def test_final_judge_rejection() -> None:
    outcome = evolve("late", **rules("late", judge__flatten="いいえ"))
    assert outcome.drop_reason == "final_rejected"
    assert steps(outcome)[-1] == ("judge", JudgeKind.FINAL)


def test_answer_with_refusal_marker_is_dropped() -> None:
    assert evolve("r", **rules("r", answer="この質問に答えるのは不可能です。")).drop_reason == (
        "answer_refused"
    )
    custom = evolve("r", pipeline={"refusal_marker": "回答不能"}, **rules("r", answer="回答不能"))
    assert custom.drop_reason == "answer_refused"


def test_refusal_marker_reaches_the_answer_prompt() -> None:
    pipeline, engine = make_pipeline(["case=m"], pipeline={"refusal_marker": "回答不能"})
    asyncio.run(pipeline.evolve(0))
    answer = next(r for r in engine.requests if r.step == "answer")
    assert "「回答不能」" in answer.messages[0].content
    assert answer.messages[-1].content.startswith("flatten|case=m")


def test_answer_length_boundary() -> None:
    short = evolve("s", **rules("s", answer="短い答えです。"))  # 7 characters
    assert short.drop_reason == "answer_too_short"
    exact = evolve("s", **rules("s", answer="ちょうど十文字の答え"))
    assert exact.kept and len(exact.answer) == 10
    relaxed = evolve("s", pipeline={"min_answer_chars": 3}, **rules("s", answer="短い答えです。"))
    assert relaxed.kept


def test_truncated_answers_are_kept_unless_asked() -> None:
    text = "!length:途中で切れた長い回答の文章ですが"
    assert evolve("t", **rules("t", answer=text)).kept
    dropped = evolve("t", pipeline={"drop_truncated_answers": True}, **rules("t", answer=text))
    assert dropped.drop_reason == "answer_truncated"


def test_exact_counts_of_each_drop_reason() -> None:
    cases = {
        "ok": {},
        "fixed": {"judge@width": "いいえ"},
        "fixrej": {"judge@width": "いいえ", "judge@fix": "いいえ"},
        "final": {"judge@flatten": "いいえ"},
        "refused": {"answer": "不可能"},
        "short": {"answer": "短い"},
        "werr": {"width": "!error"},
    }
    plan = ["ok"] * 5 + ["fixed"] * 3 + ["fixrej"] * 2 + ["final"] * 4 + ["refused"] * 1
    plan += ["short"] * 6 + ["werr"] * 2
    pipeline, _ = make_pipeline(
        [f"case={c}" for c in plan], engine_kwargs={"rules": cases}, batch_size=3
    )

    async def collect() -> Tally:
        tally = Tally()
        async for outcome in pipeline.run(range(len(plan))):
            tally.add(outcome)
        return tally

    tally = asyncio.run(collect())
    assert tally.prompts == len(plan) == 23
    assert tally.kept == 8
    assert tally.fixer_ran == 5
    assert tally.dropped == Counter(
        fix_rejected=2, final_rejected=4, answer_refused=1, answer_too_short=6, width_failed=2
    )


def test_inserted_text_full_of_braces_arrives_verbatim() -> None:
    nasty = "case=br {prompt} {{prompt}} {question} {% raw %}{{ x }}{% endraw %} {0} {} } {" * 50
    pipeline, engine = make_pipeline([nasty])
    outcome = asyncio.run(pipeline.evolve(0))
    width = engine.requests[0]
    assert width.step == "width"
    assert nasty in width.messages[-1].content
    assert "{prompt}" not in width.messages[-1].content.replace(nasty, "")
    assert outcome.kept


def test_requests_carry_per_step_sampling_and_choices() -> None:
    pipeline, engine = make_pipeline(
        ["case=s"],
        temperature=0.7,
        top_p=0.8,
        max_tokens=300,
        repetition_penalty=1.05,
        sampling={"answer": {"max_tokens": 900, "temperature": 0.2, "repetition_penalty": 1.2}},
    )
    asyncio.run(pipeline.evolve(0))
    by_step = {r.step: r for r in engine.requests}
    assert {r.repetition_penalty for r in engine.requests if r.step != "answer"} == {1.05}
    assert by_step["answer"].repetition_penalty == 1.2
    judge = by_step["judge"]
    assert judge.choices == JUDGE_CHOICES == ("はい", "いいえ")
    assert (judge.temperature, judge.max_tokens, judge.top_p) == (0.0, 8, 0.8)
    width = by_step["width"]
    assert (width.temperature, width.top_p, width.max_tokens, width.choices) == (
        0.7,
        0.8,
        300,
        None,
    )
    answer = by_step["answer"]
    assert (answer.temperature, answer.max_tokens) == (0.2, 900)
    assert [m.role for m in answer.messages] == ["system", "user"]


def test_seeds_are_derived_per_request() -> None:
    pipeline, engine = make_pipeline(["case=a", "case=b"], seed=7, pipeline={"depth_steps": 2})
    asyncio.run(pipeline.evolve(0))
    asyncio.run(pipeline.evolve(1))
    seeds = [r.seed for r in engine.requests]
    assert len(set(seeds)) == len(seeds)
    assert engine.requests[0].seed == request_seed(7, 0, "width")
    assert request_seed(7, 0, "width") == request_seed(7, 0, "width")
    assert request_seed(8, 0, "width") != request_seed(7, 0, "width")
    assert all(0 <= s < 2**31 for s in seeds)


def test_request_seeds_are_those_of_the_attempt_numbers_they_replaced() -> None:
    """Seeds were keyed by one number, `attempt`, before the judge kind and the depth index
    had names; other seeds would change every record of a run made before."""
    assert request_seed(7, 0, "width") == 1789629207
    assert request_seed(7, 3, "judge", JudgeKind.AFTER_FIX) == 2076587295
    assert request_seed(7, 3, "judge", JudgeKind.FINAL) == 1585708529
    assert request_seed(7, 3, "depth", depth=1) == 6723688


def test_a_trace_keeps_its_attempt_number() -> None:
    """Traces (and the rejects and meta files of shards) have one field, `attempt`, for the
    judge kind and the depth index: readers of older traces read new ones alike."""
    judge = StepTrace("judge", judge=JudgeKind.AFTER_FIX, text="はい").to_dict()
    depth = StepTrace("depth", depth=2).to_dict()
    assert list(judge)[:3] == ["step", "attempt", "text"]
    assert (judge["attempt"], depth["attempt"]) == (1, 2)
    assert "judge" not in judge and "depth" not in depth
    outcome = Outcome(0, "p", steps=[StepTrace("width")]).to_dict()
    assert outcome["steps"][0]["attempt"] == 0


def test_same_seed_same_outcomes_different_seed_different() -> None:
    def texts(seed: int) -> list[str | None]:
        outcome = evolve("rep", seed=seed)
        return [s.text for s in outcome.steps]

    assert texts(3) == texts(3)
    assert texts(3) != texts(4)


def test_run_keeps_order_and_bounds_concurrency() -> None:
    n = 40
    pipeline, engine = make_pipeline(
        [f"case=p{i}" for i in range(n)],
        batch_size=2,
        engine_kwargs={"delay": 0.001, "rules": {"p3": {"width": "!error"}}},
    )

    async def collect() -> list[Outcome]:
        return [o async for o in pipeline.run(range(n))]

    outcomes = asyncio.run(collect())
    assert [o.index for o in outcomes] == list(range(n))
    assert outcomes[3].drop_reason == "width_failed"
    assert 4 < engine.max_in_flight <= 8  # concurrency defaults to 4 x batch_size


def test_batches_on_shared_slots_overlap_once_the_last_prompt_has_a_slot() -> None:
    """The worker's use of the one scheduler: chunks share the slots, and the next chunk
    starts when `started` says the current one only drains."""
    pipeline, engine = make_pipeline(
        [f"case=p{i}" for i in range(12)], engine_kwargs={"delay": 0.002}
    )
    seen: list[str] = []

    async def batch(indices: range, slots: asyncio.Semaphore, started: asyncio.Event) -> list[int]:
        return [o.index async for o in pipeline.run(indices, slots, started.set)]

    async def two_batches() -> tuple[list[int], list[int]]:
        slots, started = asyncio.Semaphore(3), asyncio.Event()
        first = asyncio.ensure_future(batch(range(0, 6), slots, started))
        await started.wait()
        seen.append("first still running" if not first.done() else "first done")
        second = await batch(range(6, 12), slots, asyncio.Event())
        return await first, second

    first, second = asyncio.run(two_batches())
    assert (first, second) == (list(range(6)), list(range(6, 12)))
    assert seen == ["first still running"]
    assert engine.max_in_flight == 3  # one request per prompt in flight, three slots


def test_dead_engine_fails_the_run_instead_of_dropping_records() -> None:
    pipeline, _ = make_pipeline(
        ["case=ok", "case=dead", "case=ok"], engine_kwargs={"rules": {"dead": {"flatten": "!dead"}}}
    )

    async def collect() -> list[Outcome]:
        return [o async for o in pipeline.run(range(3))]

    with pytest.raises(EngineDead):
        asyncio.run(collect())


def test_retries_are_counted_in_the_funnel_and_never_in_a_trace() -> None:
    """How the transport went is in the funnel (the chunk log shows it), not in the traces:
    a rerun through a flaky server writes the same traces and meta lines."""
    answer = "回答です。ケースrについて詳しく説明します。"
    pipeline, _ = make_pipeline(
        ["case=r", "case=f", "case=ok"],
        engine_kwargs={
            "rules": {
                "r": {"width": "!retried:2:width|case=r 質問", "answer": f"!retried:1:{answer}"},
                "f": {"flatten": "!retried:3:!error"},
            }
        },
    )

    async def collect() -> list[Outcome]:
        return [o async for o in pipeline.run(range(3))]

    outcomes = asyncio.run(collect())
    assert [(o.retries, o.drop_reason) for o in outcomes] == [
        (3, None),
        (3, "flatten_failed"),
        (0, None),
    ]
    assert all("retries" not in json.dumps(o.to_dict()) for o in outcomes)
    tally, clean = Tally(), Tally()
    for outcome in outcomes:
        tally.add(outcome)
    clean.add(outcomes[2])
    assert tally.retries == 6 and tally.as_dict()["retries"] == 6
    assert Tally.from_dict(tally.as_dict()) == tally
    assert "retries" not in clean.as_dict()  # funnels without retries read as they always have
    assert Tally.from_dict(clean.as_dict()) == clean
    clean.merge(tally)
    assert clean.retries == 6
