"""The detectors the report counts with and the pipeline's filters will call: each finds what
it is for and stays quiet on ordinary Japanese text."""

from __future__ import annotations

import random
import re

import pytest

from zero_one_instruction import detectors
from zero_one_instruction.detectors import (
    leaked,
    looping,
    other_language,
    refusal,
    repeats,
    restates,
    scaffolding,
    script_share,
)
from zero_one_instruction.templates import load_templates

JAPANESE = "東京は日本の首都です。江戸時代から政治の中心で、明治維新の後に首都になりました。"


@pytest.fixture(scope="module")
def labels() -> tuple[str, ...]:
    return scaffolding(load_templates())


def test_script_share_counts_letters_by_script_and_leaves_code_out() -> None:
    share = script_share("ひらがなカタカナ漢字abc 123、。```\nprint('x' * 100)\n```")
    assert share.counts["hiragana"] == 4 and share.counts["katakana"] == 4
    assert share.counts["kanji"] == 2 and share.counts["latin"] == 3
    assert share.japanese == pytest.approx(10 / 13)


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("This answer is written in English from start to finish.", "latin"),
        ("请介绍一下日本的传统节日。日本有很多传统节日，比如新年和盂兰盆节。", "chinese"),
        ("한국어로 작성된 답변입니다. 일본어가 아닙니다.", "hangul"),
        (JAPANESE, None),
        ("Pythonのlistとtupleの違いは、変更できるかどうかです。", None),
        (
            "次のコードを使います。\n```python\n" + "values = [x for x in range(10)]\n" * 5 + "```",
            None,
        ),
        ("東京都", None),  # a few kanji are not Chinese
        ("12345", None),  # no letters: nothing to call another language
    ],
)
def test_other_language(text: str, language: str | None) -> None:
    assert other_language(text) == language


def test_scaffolding_comes_from_the_templates_in_use(labels: tuple[str, ...]) -> None:
    assert {"テーマ:", "タスク:", "新しい依頼文:", "手本の依頼文:", "元の文章:"} <= set(labels)
    templates = load_templates()
    width = templates.width
    own = type(width)(
        name="width", user="お題の文章:\n{prompt}\n\n別の依頼を書いて。", system=width.system
    )
    custom = scaffolding(type(templates)(**{**templates.__dict__, "width": own}))
    assert "お題の文章:" in custom and "別の依頼を書いて。" in custom
    assert "手本の依頼文:" not in custom


def test_a_short_line_of_a_template_is_no_scaffolding() -> None:
    """A custom template's line "質問" is a word, not a request: were it scaffolding,
    `drop_leaked_questions` would drop every question that holds the word."""
    templates = load_templates()
    own = type(templates.flatten)(
        name="flatten",
        user="質問\n{prompt}\n例\n質問として仕上げて。\n答え:",
        system=templates.flatten.system,
    )
    custom = scaffolding(type(templates)(**{**templates.__dict__, "flatten": own}))
    assert "質問" not in custom and "例" not in custom
    assert leaked("日本の質問の仕方について、例を挙げて説明してください。", custom) is None
    control = {"質問として仕上げて。", "答え:", "テーマ:", "手本の依頼文:"}
    assert control <= set(custom)


@pytest.mark.parametrize(
    ("question", "found"),
    [
        ("テーマ: 鉄道\n時刻表の読み方を教えてください。", "テーマ:"),
        ("新しい依頼文：梅雨の洗濯物を早く乾かす工夫を教えてください。", "新しい依頼文:"),
        ("手本の依頼文:\n将棋の囲いについて説明してください。", "手本の依頼文:"),
        ("将棋の囲いの種類と、それぞれの長所を説明してください。", None),
        ("次の会話のテーマを一言で答えてください。", None),  # the word alone is no label
    ],
)
def test_leaked(labels: tuple[str, ...], question: str, found: str | None) -> None:
    assert leaked(question, labels) == found


@pytest.mark.parametrize(
    ("answer", "loops"),
    [
        ("はじめに説明します。\n" + "同じ説明をもう一度繰り返します。\n" * 3, True),
        ("結論です。" + "この点が重要なポイントです。" * 3, True),
        ("答えは" + "とてもとても大切な" * 3 + "ことです。", True),
        (JAPANESE, False),
        ("- はい\n- はい\n- はい\n- いいえ", False),  # short list items are no loop
        ("```python\n" + "    total = total + value\n" * 4 + "```\n合計を求めます。", False),
    ],
)
def test_looping(answer: str, loops: bool) -> None:
    assert (looping(answer) is not None) == loops


def _long_answer(sentences: int) -> str:
    """A long answer that never repeats itself: every sentence has its own numbers."""
    return "".join(
        f"{n}番目の手順では、材料を{n * 7 % 97}グラム量って{n % 13 + 2}分ほど混ぜます。\n"
        for n in range(sentences)
    )


def test_looping_checks_few_places_in_a_long_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 50,000-character answer is checked only where a phrase could begin again, a couple of
    times per character even in a list of alike lines, not at each of the 193 lengths at
    every position as the regex this replaced did (it took seconds)."""
    checked: list[int] = []
    said_thrice = detectors._said_thrice

    def counted(text: str, start: int, length: int) -> bool:
        checked.append(start)
        return said_thrice(text, start, length)

    monkeypatch.setattr(detectors, "_said_thrice", counted)
    answer = _long_answer(1600)
    assert len(answer) > 50_000
    assert looping(answer) is None
    assert 0 < len(checked) < 2 * len(answer)
    assert looping(answer + "ずっと同じ言葉を繰り返す" * 3) == "ずっと同じ言葉を繰り返す"


def test_looping_finds_the_phrase_the_regex_found() -> None:
    """The phrase found is the one `(.{8,200}?)\\1{2,}` finds (the leftmost, then the
    shortest), on texts made of repeats of every length around the limits."""
    regex = re.compile(r"(.{8,200}?)\1{2,}", re.DOTALL)
    rng = random.Random(7)
    for _ in range(3000):
        alphabet = rng.choice(["ab", "あいう\n ", "abcdefgh"])
        text = "".join(
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) * rng.randint(1, 4)
            for _ in range(rng.randint(1, 6))
        )
        match = regex.search(text)
        assert detectors._phrase_loop(text) == (match.group(1) if match else None), text
    distinct = "".join(chr(0x4E00 + i) for i in range(201))
    for length, found in ((7, False), (8, True), (200, True), (201, False)):
        phrase = distinct[:length]
        assert detectors._phrase_loop("前置き" + phrase * 3) == (phrase if found else None)


def test_restates() -> None:
    question = "日本の首都はどこですか。その歴史も教えてください。"
    assert restates(question, question + "\n東京です。江戸時代から政治の中心でした。")
    assert restates(question, "日本の首都はどこですか、その歴史も教えて下さい。東京です。")
    assert not restates(question, "東京です。江戸時代から政治の中心で、明治に首都となりました。")
    assert not restates("短い質問", "短い質問への答えです。")  # too short to tell


def test_repeats() -> None:
    first = "釣り糸の太さは、狙う魚と釣る場所に合わせてどう選べばよいですか。"
    earlier = [first, "岩場で釣るときに気をつけることはありますか。"]
    assert repeats(first, earlier)  # word for word
    assert repeats("狙う魚と釣る場所に合わせて、釣り糸の太さはどう選べばよいですか。", earlier)
    assert repeats("岩場で釣るときに、気をつけることはありますか？", earlier)  # the second one
    assert not repeats("擦れに強い糸というのは、具体的にはどんな種類の糸ですか。", earlier)
    # Naming what the first question named is a follow-up, not a repeat.
    assert not repeats("釣り糸の太さを変えると、仕掛けの重さも変えるべきですか。", earlier)
    assert not repeats("釣り糸の太さは", earlier)  # too short to tell


@pytest.mark.parametrize(
    ("answer", "found"),
    [
        ("申し訳ありませんが、その質問にはお答えできません。", "お答えできません"),
        ("この質問には回答することができません。", "回答することができません"),
        ("答えるための情報が不足しています。", "情報が不足"),
        (
            "ご質問の意図がわかりません。もう少し詳しく教えてください。",
            "ご質問の意図がわかりません",
        ),
        ("I'm sorry, but I cannot help with that request.", "I'm sorry"),
        ("抱歉，我无法回答这个问题。", "抱歉"),
        ("不 可 能", "marker"),  # the marker with spaces inside: the pipeline's check misses it
    ],
)
def test_refusal_finds_a_kept_refusal(answer: str, found: str) -> None:
    assert refusal(answer, "不可能") == found


@pytest.mark.parametrize(
    "answer",
    [
        JAPANESE,
        "一度解凍した肉は再冷凍できません。使う分だけ解凍し、その日のうちに使い切りましょう。",
        "質問に回答することで理解が深まります。まず自分の言葉で説明してみましょう。",
        # A hedge that then answers at length is an answer.
        "申し訳ありませんが、正確な数は分かりません。" + JAPANESE * 10,
        # The phrase far into the answer is not how a refusal opens.
        JAPANESE * 3 + "それ以上の情報がないため、ここまでとします。",
    ],
)
def test_refusal_stays_quiet_on_answers(answer: str) -> None:
    assert refusal(answer, "不可能") is None


def test_refusal_takes_the_run_s_own_marker_in_any_width_and_case() -> None:
    assert refusal("Ｉｍｐｏｓｓｉｂｌｅ", "IMPOSSIBLE") == "marker"
    assert refusal("不可能", "IMPOSSIBLE") is None
