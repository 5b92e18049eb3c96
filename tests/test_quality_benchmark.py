"""The quality benchmark's metrics on hand-made records, and one scripted run through
`zoi generate --trace`, so that a metric that stops seeing what it claims to see fails here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks import quality
from zero_one_instruction.templates import load_templates


def step(name: str, attempt: int = 0, **fields: Any) -> dict[str, Any]:
    return {
        "step": name,
        "attempt": attempt,
        "text": "",
        "verdict": None,
        "finish_reason": "stop",
        **fields,
    }


def outcome(
    index: int,
    steps: list[dict[str, Any]],
    drop: str | None = None,
    question: str | None = None,
    answer: str | None = None,
) -> dict[str, Any]:
    return {
        "index": index,
        "steps": steps,
        "drop_reason": drop,
        "kept": drop is None,
        "question": question,
        "answer": answer,
    }


def test_japanese_share_counts_letters_only() -> None:
    assert quality.japanese_share("東京は晴れ。2026年!") == 1.0
    assert quality.japanese_share("Pythonで書く") == 3 / 9
    assert quality.japanese_share("123 !?") == 0.0


def test_mostly_japanese_needs_kana_so_chinese_is_not_japanese() -> None:
    assert quality.mostly_japanese("光合成とは、植物が光を使って養分を作る仕組みです。")
    assert not quality.mostly_japanese("这两种方法都可以使用。")  # all Han, no kana
    assert not quality.mostly_japanese("This answer is written in English, sorry.")


def test_chinese_only_characters_are_found_once_each() -> None:
    assert quality.chinese_chars("この二氧化碳は这两种方法で这样") == "氧碳这两种样"
    assert quality.chinese_chars("二酸化炭素の話を説明します。") == ""


def test_leaks_find_template_labels() -> None:
    assert quality.leaks("テーマ: 数学\nタスク: 小論文を書く") == ["テーマ:", "タスク:"]
    assert quality.leaks("【新しいプロンプト】夏の俳句を作って") == ["【新しいプロンプト】"]
    assert quality.leaks("依頼文：夏の俳句を一句作ってください。") == ["依頼文："]
    assert quality.leaks("夏の季語を使った俳句を一句作ってください。") == []


def test_looks_like_answer() -> None:
    assert not quality.looks_like_answer("俳句と短歌の違いを説明してください。")
    assert not quality.looks_like_answer("なぜ空は青いのですか？")
    assert quality.looks_like_answer("俳句は五七五、短歌は五七五七七の形式です。")
    assert quality.looks_like_answer("以下に手順を示します。まず材料をそろえてください。")
    assert quality.looks_like_answer("## 手順\n1. 材料を用意する")


def test_funnel_places_each_drop_at_its_step() -> None:
    outcomes = [
        outcome(
            0,
            [
                step("width"),
                step("judge", verdict=False),
                step("fix"),
                step("judge", 1, verdict=False),
            ],
            drop="fix_rejected",
        ),
        outcome(
            1,
            [
                step("width"),
                step("judge", verdict=True),
                step("depth"),
                step("flatten"),
                step("judge", 2, verdict=False),
            ],
            drop="final_rejected",
        ),
        outcome(
            2,
            [
                step("width"),
                step("judge", verdict=True),
                step("depth"),
                step("flatten"),
                step("judge", 2, verdict=True),
                step("answer", finish_reason="length"),
            ],
            question="雨の日の過ごし方を教えてください。",
            answer="家で本を読む",
        ),
    ]
    rows = {r["stage"]: r for r in quality.funnel(outcomes)}
    assert rows["width"]["reached"] == 3 and rows["width"]["passed"] == 3
    assert rows["judge (width)"]["said_no"] == 1 and rows["judge (width)"]["passed"] == 3
    assert rows["judge (after fix)"]["dropped"] == {"fix_rejected": 1}
    assert rows["judge (final)"] == {
        "stage": "judge (final)",
        "reached": 2,
        "passed": 1,
        "said_no": 1,
        "dropped": {"final_rejected": 1},
    }
    summary = quality.summarize(outcomes)
    assert summary["kept"] == 1 and summary["kept_truncated"] == [2]
    assert summary["kept_mostly_japanese"] == 1 and summary["kept_answer_like"] == []


def test_builtin_indices_spread_tasks_and_domains() -> None:
    indices = quality.builtin_indices(32, 54, 54)
    assert len(set(i // 54 for i in indices)) == 32
    assert len(set(i % 54 for i in indices)) == 32
    assert len(set(quality.builtin_indices(120, 54, 54))) == 120


def test_scripted_run_reports_what_each_record_did(tmp_path: Path) -> None:
    rules = {
        "good": {"flatten": "雨の日に家で楽しめる過ごし方を教えてください。"},
        "bad": {"judge@width": "いいえ", "judge@fix": "いいえ"},
        "leak": {"flatten": "【新しいプロンプト】テーマ: 数学の問題を作ってください。"},
        "answerlike": {"flatten": "光合成は植物が光から養分を作る仕組みです。"},
        "trunc": {"answer": "!length:长い回答が途中で切れ"},
        "chinese": {"answer": "这两种方法都可以使用，回答します。"},
    }
    prompts = [f"case={name} 質問です" for name in rules]
    result = quality.run_set(
        tmp_path, "t", prompts, None, None, {"engine_kwargs": {"rules": rules}}
    )
    assert result["prompts"] == 6 and result["kept"] == 5
    assert result["dropped"] == {"fix_rejected": 1}
    assert list(result["kept_with_leaks"].values()) == [["【新しいプロンプト】", "テーマ:"]]
    assert 3 in result["kept_answer_like"]  # the scripted default questions ask nothing either
    assert 0 not in result["kept_answer_like"] and 2 not in result["kept_answer_like"]
    assert result["kept_truncated"] == [4]
    assert result["kept_with_chinese"] == {4: "长", 5: "这两种"}
    text = quality.report([result])
    assert "| judge (after fix) | 1 | 0/1 (0%) | 1 | fix_rejected 1 |" in text


def test_sets_share_one_run_and_are_summarized_apart(tmp_path: Path) -> None:
    rules = {"no": {"judge@width": "いいえ", "judge@fix": "いいえ"}}
    sets = {"a": ["case=yes 一", "case=no 二"], "b": ["case=no 三", "case=no 四", "case=yes 五"]}
    first, second = quality.run_sets(
        tmp_path, sets, None, None, {"engine_kwargs": {"rules": rules}}
    )
    assert (first["set"], first["prompts"], first["kept"]) == ("a", 2, 1)
    assert (second["set"], second["prompts"], second["kept"]) == ("b", 3, 1)
    assert second["offset"] == 2 and second["dropped"] == {"fix_rejected": 2}


def test_judge_check_counts_verdicts_against_the_labels(tmp_path: Path) -> None:
    """The scripted judge says いいえ only to texts marked case=no: every good text passes,
    and only the marked bad text counts as rejected; the others are listed as misjudged."""
    labelled = tmp_path / "judge.json"
    good, bad = ["case=yes 良い依頼です。"], ["case=no 答えです。", "case=yes 見出し:"]
    labelled.write_text(json.dumps({"good": good, "bad": bad}), encoding="utf-8")
    rules = {"no": {"judge@base": "いいえ"}}
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n", encoding="utf-8")
    config = quality.write_config(
        tmp_path, "q", prompts, None, None, {"engine_kwargs": {"rules": rules}}
    )
    check = quality.judge_check(config, labelled)
    assert check == {
        "good": 1,
        "good_passed": 1,
        "bad": 2,
        "bad_rejected": 1,
        "misjudged": ["case=yes 見出し:"],
    }
    assert "rejected 1/2 (50%) of bad texts" in quality.judge_line(check)


def test_copied_template_sentences_count_as_leaks(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        "width:\n  user: |-\n    手本:\n    {prompt}\n"
        "    手本と同じ分野で、新しい依頼文を一つだけ書いてください。\n",
        encoding="utf-8",
    )
    fragments = quality.template_fragments(load_templates(path))
    assert "手本:" in fragments
    copied = "猫の飼い方を教えてください。手本と同じ分野で、新しい依頼文を一つ"
    assert quality.leaks(copied, fragments) == [
        "手本と同じ分野で、新しい依頼文を一つだけ書いてください。"
    ]
    assert quality.leaks("猫の飼い方を分野ごとに教えてください。", fragments) == []


def test_operators_and_turns_are_measured_per_turn(tmp_path: Path) -> None:
    """Settings given as dotted keys reach the run; each depth step counts under its
    operator; a later turn that the follow-up judge rejects ends its conversation (kept, with
    its first turn) and is counted at that turn's judge, not at the first turn's; the first
    turn's checks look at the first answer only."""
    rules = {
        "ok": {"flatten": "雨の日に家で楽しめる過ごし方を教えてください。"},
        "cut": {"answer#2": "!length:二つ目の回答が途中で切れ"},
        "no": {"judge@follow_up#2": "いいえ"},
    }
    settings = {
        "engine_kwargs": {"rules": rules},
        "pipeline.turns": 2,
        "pipeline.depth_steps": 2,
        "pipeline.depth_operators": {"deepen": 1, "reasoning": 1},
    }
    prompts = [f"case={name} 質問です" for name in rules]
    result = quality.run_set(tmp_path, "t", prompts, None, None, settings)
    assert result["kept"] == 3 and result["kept_truncated"] == []
    assert set(result["operators"]) <= {"deepen", "reasoning"}
    assert sum(row["ran"] for row in result["operators"].values()) == 6
    rows = {r["stage"]: r for r in result["funnel"]}
    assert rows["turn 2 judge"]["dropped"] == {"follow_up_rejected": 1}
    assert rows["turn 2 judge"]["said_no"] == 1 and rows["judge (final)"]["said_no"] == 0
    later = result["later_turns"]
    assert (later["records_with_more_turns"], later["turns"], later["truncated"]) == (2, 2, 1)
    assert later["ended"] == {"follow_up_rejected": 1}
    assert result["diversity"]["exact_duplicate_questions"] == 0
    assert "| turn 2 judge | 3 | 2/3 (67%) | 1 | follow_up_rejected 1 |" in quality.report([result])


def test_a_setting_is_key_equals_yaml_value() -> None:
    assert quality.parse_setting("pipeline.depth_operators={deepen: 1}") == (
        "pipeline.depth_operators",
        {"deepen": 1},
    )
    assert quality.parse_setting("pipeline.turns=2") == ("pipeline.turns", 2)
