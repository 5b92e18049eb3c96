"""The pipeline's filters (language, leakage, repetition): off by default, each dropping its
records with a named reason when on, and invisible to the fingerprint of runs made before them."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest

from zero_one_instruction import filters, render
from zero_one_instruction.config import load_config
from zero_one_instruction.errors import ConfigError
from zero_one_instruction.filters import FILTER_REASONS
from zero_one_instruction.pipeline import DROP_REASONS, Outcome, Tally
from zero_one_instruction.rundir import RunError, create_or_open

from .conftest import make_pipeline
from .queue_helpers import scripted_config
from .scripted_engine import ScriptedEngine

JAPANESE_QUESTION = "日本の四季について、それぞれの季節の特徴を説明してください。"
LOOP = "同じ説明をもう一度繰り返します。"
# case -> (the scripted responses, the reason its filter gives)
CASES: dict[str, tuple[dict[str, str], str]] = {
    "leak": (
        {"flatten": "新しい依頼文: 春の俳句を三つ作ってください。case=leak"},
        "question_leaked",
    ),
    "qforeign": (
        {"flatten": "Please explain the four seasons of Japan. case=qforeign"},
        "question_not_japanese",
    ),
    "aforeign": (
        {"flatten": JAPANESE_QUESTION + "case=aforeign", "answer": "Japan has four seasons."},
        "answer_not_japanese",
    ),
    "loop": ({"flatten": JAPANESE_QUESTION + "case=loop", "answer": LOOP * 4}, "answer_looping"),
}
FILTERS_ON: dict[str, object] = {
    "min_japanese_share": 0.5,
    "drop_leaked_questions": True,
    "drop_looping_answers": True,
}


def evolve(**pipeline: object) -> tuple[dict[str, Outcome], ScriptedEngine]:
    """Every case through one pipeline with these `pipeline:` settings, by case."""
    rules = {case: responses for case, (responses, _) in CASES.items()}
    made, engine = make_pipeline(
        [f"case={case}" for case in CASES],
        engine_kwargs={"rules": rules},
        pipeline=pipeline,
    )

    async def run() -> list[Outcome]:
        return [outcome async for outcome in made.run(range(len(CASES)))]

    return dict(zip(CASES, asyncio.run(run()), strict=True)), engine


def outcomes(**pipeline: object) -> dict[str, Outcome]:
    return evolve(**pipeline)[0]


def test_the_filters_are_off_by_default() -> None:
    """The control: every case below is kept without the settings."""
    assert all(outcome.kept for outcome in outcomes().values())


def test_each_filter_drops_its_records_with_its_reason() -> None:
    found = outcomes(**FILTERS_ON)
    assert {case: o.drop_reason for case, o in found.items()} == {
        case: reason for case, (_, reason) in CASES.items()
    }
    tally = Tally()
    for outcome in found.values():
        tally.add(outcome)
    assert tally.kept == 0 and sum(tally.dropped.values()) == len(CASES)


def test_a_dropped_question_costs_no_answer_request() -> None:
    found, engine = evolve(**FILTERS_ON)
    assert [s.step for s in found["leak"].steps][-2:] == ["flatten", "judge"]
    answered = [r for r in engine.requests if r.step == "answer"]
    assert len(answered) == 2  # aforeign and loop only


@pytest.mark.parametrize("setting", sorted(FILTERS_ON))
def test_each_setting_turns_on_only_its_own_filter(setting: str) -> None:
    found = outcomes(**{setting: FILTERS_ON[setting]})
    dropped = {o.drop_reason for o in found.values() if not o.kept}
    expected = {
        "min_japanese_share": {"question_not_japanese", "answer_not_japanese"},
        "drop_leaked_questions": {"question_leaked"},
        "drop_looping_answers": {"answer_looping"},
    }[setting]
    assert dropped == expected


def test_the_original_answer_checks_keep_their_reasons_first() -> None:
    """A refused answer that also loops is still `answer_refused`, as before the filters."""
    made, _ = make_pipeline(
        ["case=both"],
        engine_kwargs={"rules": {"both": {"answer": "不可能です。" + LOOP * 4}}},
        pipeline={"drop_looping_answers": True},
    )
    assert asyncio.run(made.evolve(0)).drop_reason == "answer_refused"


def test_the_filters_run_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's output handling runs on the event loop; a check over a long answer there
    would stall every request in flight."""
    threads: list[str] = []
    for name in ("question", "answer"):
        check = getattr(filters.Filters, name)

        def spy(self: filters.Filters, *args: object, _check=check, _name=name) -> object:
            threads.append(f"{_name} {threading.current_thread() is threading.main_thread()}")
            return _check(self, *args)

        monkeypatch.setattr(filters.Filters, name, spy)
    found = outcomes(**FILTERS_ON)
    assert sorted(threads) == ["answer False"] * 2 + ["question False"] * len(CASES)
    assert {case: o.drop_reason for case, o in found.items()} == {
        case: reason for case, (_, reason) in CASES.items()
    }


def test_every_filter_reason_is_described_and_shown_in_the_preview() -> None:
    assert all(DROP_REASONS[reason] == text for reason, text in FILTER_REASONS.items())
    outcome = outcomes(**FILTERS_ON)["loop"]
    shown = render.outcome(outcome)
    assert "=> dropped: answer_looping (the answer repeats itself in a loop" in shown


@pytest.mark.parametrize("share", ["0", "1.5", "true"])
def test_min_japanese_share_is_a_share(tmp_path: Path, share: str) -> None:
    path = tmp_path / "c.yml"
    path.write_text(f"model_name: m\npipeline: {{min_japanese_share: {share}}}\n", "utf-8")
    with pytest.raises(ConfigError, match=r"pipeline\.min_japanese_share"):
        load_config(path)


def _pipeline_spec(run: Path) -> dict[str, object]:
    return json.loads((run / "run.json").read_text(encoding="utf-8"))["spec"]["pipeline"]


def test_filters_left_at_off_stay_out_of_the_fingerprint(tmp_path: Path) -> None:
    """A run made before the filters existed has a spec without them: with the filters off
    its fingerprint is the same, so it can still be resumed."""
    config = load_config(scripted_config(tmp_path))
    run = create_or_open(tmp_path / "run", config, 0, 4, 2)
    assert sorted(_pipeline_spec(run.path)) == [
        "depth_steps",
        "drop_truncated_answers",
        "fixer",
        "min_answer_chars",
        "refusal_marker",
    ]
    path = run.path / "run.json"
    old = json.loads(path.read_text(encoding="utf-8"))
    for key in FILTERS_ON:
        del old["config"]["pipeline"][key]  # run.json as a zoi without the filters wrote it
    path.write_text(json.dumps(old), encoding="utf-8")
    again = create_or_open(run.path, config, 0, 4, 2)
    assert again.fingerprint == run.fingerprint


@pytest.mark.parametrize("setting", sorted(FILTERS_ON))
def test_a_filter_turned_on_is_another_run(tmp_path: Path, setting: str) -> None:
    config = load_config(scripted_config(tmp_path))
    run = create_or_open(tmp_path / "run", config, 0, 4, 2)
    pipeline = config.pipeline.model_copy(update={setting: FILTERS_ON[setting]})
    filtered = config.model_copy(update={"pipeline": pipeline})
    with pytest.raises(RunError, match=rf"pipeline\.{setting} differ"):
        create_or_open(run.path, filtered, 0, 4, 2)
    other = create_or_open(tmp_path / "other", filtered, 0, 4, 2)
    assert other.fingerprint != run.fingerprint
    assert _pipeline_spec(other.path)[setting] == FILTERS_ON[setting]
