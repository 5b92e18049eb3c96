"""Synthetic Japanese records for the report and near-dedup benchmarks, made fast.

Questions are a task opening, two to four topic phrases and an ending, so their lengths vary
(about 30 to 130 characters) and most share phrasing as a model's output does. Answers are
one to twelve sentences. About 3% of the questions repeat an earlier one exactly and 3% are a
small rewording of an earlier one (a few characters changed or an ending swapped), so the
duplicate counters and the LSH index do real work. Seeded: the same `n` gives the same data.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from zero_one_instruction.records import dumps, original_record

OPENINGS = [
    "次の点について",
    "初心者にもわかるように",
    "具体例を挙げて",
    "歴史的な背景を踏まえて",
    "専門家の立場から",
    "簡潔に",
    "",
]
TOPICS = [
    "日本の伝統的な和菓子",
    "季節ごとの行事",
    "量子コンピュータの基本原理",
    "江戸時代の商人文化",
    "機械学習の過学習",
    "地方自治体の財政",
    "発酵食品と健康",
    "俳句の季語",
    "再生可能エネルギーの課題",
    "中小企業の事業承継",
    "睡眠の質を高める習慣",
    "プログラミング言語Pythonの型ヒント",
    "気候変動と農業",
    "城の建築様式",
    "外国語学習の方法",
    "高齢化社会の医療",
    "鉄道網の発達",
    "茶道の作法",
    "宇宙探査の最新動向",
    "著作権と生成AI",
]
MODIFIERS = [
    "現代の",
    "地方の",
    "海外の",
    "若者の",
    "企業の",
    "家庭での",
    "学校での",
    "戦後の",
    "都市部の",
    "将来の",
    "身近な",
    "伝統的な",
    "最新の",
    "小規模な",
    "国際的な",
    "日常の",
]
JOINS = ["と", "における", "に関する", "を支える", "から見た", "の"]
ENDINGS = [
    "について説明してください。",
    "の違いを教えてください。",
    "はなぜ重要なのですか？",
    "の利点と欠点を比較してください。",
    "を三つの観点から論じてください。",
    "について、よくある誤解を挙げて解説してください。",
]
SENTENCES = [
    "この点については、いくつかの見方があります。",
    "まず、歴史的な経緯を確認しておきましょう。",
    "具体的には、地域や時代によって大きな違いが見られます。",
    "一般に、長期的な視点で考えることが大切だとされています。",
    "ただし、例外も少なくないため注意が必要です。",
    "近年の研究では、新しい知見が次々と報告されています。",
    "実践する際には、小さな一歩から始めるのがよいでしょう。",
    "以上をまとめると、バランスの取れた理解が求められます。",
    "たとえば、身近な例として日常生活の中での工夫が挙げられます。",
    "専門家の間でも意見が分かれている部分があります。",
]
EXACT_SHARE, NEAR_SHARE = 0.03, 0.03
SYSTEM = "あなたは日本語で丁寧に答えるアシスタントです。"
KEEP = 5_000  # earlier questions a repeat may copy: a window, so memory stays small


def _question(rng: random.Random, index: int) -> str:
    parts = [rng.choice(OPENINGS)]
    for _ in range(rng.randint(2, 4)):
        parts += [rng.choice(MODIFIERS), rng.choice(TOPICS), rng.choice(JOINS)]
    # The index makes each fresh question distinct, as real questions are.
    return "".join(parts[:-1]) + f"（第{index}問）" + rng.choice(ENDINGS)


def _reword(rng: random.Random, question: str) -> str:
    """A small edit: one or two characters replaced, or the ending swapped."""
    if rng.random() < 0.5:
        for _ in range(rng.randint(1, 2)):
            at = rng.randrange(len(question))
            question = question[:at] + rng.choice("はがをにでもの") + question[at + 1 :]
        return question
    for ending in ENDINGS:
        if question.endswith(ending):
            return question[: -len(ending)] + rng.choice(ENDINGS)
    return question + "詳しく。"


def questions_and_answers(n: int, seed: int = 12) -> Iterator[tuple[str, str]]:
    """`n` (question, answer) pairs with a known share of exact and near repeats."""
    rng = random.Random(seed)
    recent: list[str] = []
    for index in range(n):
        roll = rng.random()
        if recent and roll < EXACT_SHARE:
            question = rng.choice(recent)
        elif recent and roll < EXACT_SHARE + NEAR_SHARE:
            question = _reword(rng, rng.choice(recent))
        else:
            question = _question(rng, index)
        if len(recent) < KEEP:
            recent.append(question)
        else:
            recent[index % KEEP] = question
        answer = "".join(rng.choices(SENTENCES, k=rng.randint(1, 12)))
        yield question, answer


def write_file(path: Path, n: int, system: str = SYSTEM) -> None:
    """`n` records as a merged file in the original format, as `zoi merge` writes it."""
    with path.open("w", encoding="utf-8") as out:
        for index, (question, answer) in enumerate(questions_and_answers(n)):
            record = original_record(f"record_{index}", question, answer, system)
            out.write(dumps(record))
