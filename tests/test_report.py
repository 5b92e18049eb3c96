"""`zoi report`: a dataset built with a known number of each problem gives exactly those
counts, clean data gives zeros, and the command reads a merged file or a run's shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from zero_one_instruction import machine, samples
from zero_one_instruction.records import original_record
from zero_one_instruction.report import make_report
from zero_one_instruction.textstats import Distribution, Reservoir, TopCounter, shortened

from .clitools import assert_one_line_error, zoi
from .queue_helpers import ROOT, scripted_config

# Ten questions on unrelated subjects, with ordinary Japanese answers.
CLEAN = [
    (
        "将棋の序盤で居飛車と振り飛車のどちらを選ぶべきか、初心者向けに説明してください。",
        "初心者には居飛車をおすすめします。定跡が整理されていて、学ぶ順序が分かりやすいからです。",
    ),
    (
        "ベランダでミニトマトを育てるとき、実が割れるのを防ぐ水やりのコツを教えてください。",
        "雨の前後に水を控え、土の乾き具合を見ながら少しずつ与えると、実の割れを防げます。",
    ),
    (
        "二つの辞書を一つにまとめるPythonの関数を書き、同じキーの値は足し合わせてください。",
        "キーごとに値を足す関数を作ります。まず空の辞書を用意し、両方の辞書を順に加えます。",
    ),
    (
        "光合成はどのような材料から何を作る働きなのか、中学生にも分かるように教えてください。",
        "植物は光のエネルギーを使い、二酸化炭素と水から糖を作ります。そのとき酸素が出ます。",
    ),
    (
        "新幹線が長いあいだ大きな事故を起こさずに運行できている理由を、仕組みから述べてください。",
        "専用の線路と自動列車制御装置があり、地震を早く検知して止める仕組みも備えています。",
    ),
    (
        "味噌汁の出汁を昆布と鰹節で取るときの手順と、火加減の注意点をまとめてください。",
        "昆布は水から入れて沸騰直前に取り出し、鰹節を加えたら弱火で短く煮出して濾します。",
    ),
    (
        "梅雨の時期に部屋干しの洗濯物を早く乾かすための工夫を、三つ挙げて解説してください。",
        "除湿機を使う、衣類の間隔を空ける、扇風機で風を当てる、の三つが効果的な方法です。",
    ),
    (
        "江戸時代の寺子屋では、子どもたちがどのような内容を学んでいたのかを紹介してください。",
        "読み書きとそろばんが中心で、手紙の書き方や地理、道徳なども教えられていました。",
    ),
    (
        "住宅ローンの固定金利と変動金利の違いを、返済額の変わり方に注目して比べてください。",
        "固定金利は返済額が変わらず計画を立てやすく、変動金利は金利の動きで返済額が変わります。",
    ),
    (
        "猫が夜中に走り回る理由と、飼い主ができる対策について、獣医の視点から答えてください。",
        "猫は薄明薄暮性で、夕方や明け方に活発になります。寝る前に遊ばせると落ち着きます。",
    ),
]
# Of the clean questions: two repeated word for word, three with a character or two changed.
EXACT = [CLEAN[0][0], CLEAN[1][0]]
NEAR = [
    CLEAN[2][0].replace("書き", "作り"),
    CLEAN[3][0].replace("中学生", "小学生"),
    # Not 「整理して」: that rewording shares a band with the original at an estimated Jaccard
    # similarity of 0.68, below the threshold, so neither the report nor the merge counts it.
    CLEAN[5][0].replace("取るとき", "取る際"),
]
ENGLISH = [
    (
        "地図記号の成り立ちについて、身近な例を挙げながら教えてください。",
        "Map symbols in Japan were designed to be simple pictures of the places they mark.",
    ),
    (
        "雅楽で使われる楽器の種類と、それぞれの音の特徴を説明してください。",
        "雅乐使用的乐器有笙、篳篥和龙笛等，每种乐器的音色都各有特点，共同构成独特的合奏。",
    ),
]
LEAKED = [
    "テーマ: 天気\n明日の天気予報の読み方を分かりやすく説明してください。",
    "新しい依頼文：ゴミの分別を家族に守ってもらう方法を提案してください。",
]
LOOPING = [
    (
        "初めての登山で準備するべき持ち物を、優先順位をつけて挙げてください。",
        "まず雨具です。" + "水筒と地図とコンパスを必ず持っていきましょう。" * 4,
    ),
    (
        "俳句の季語はどのように選べばよいのか、初心者に向けて説明してください。",
        "季語は季節を表します。\n" + "季節に合った言葉を一つ選ぶことが大切です。\n" * 3,
    ),
]


def _write(path: Path, pairs: list[tuple[str, str]]) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i, (question, answer) in enumerate(pairs):
            record = original_record(f"record_{i}", question, answer, "system")
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _counts(figures: dict[str, Any]) -> dict[str, int]:
    return {
        "exact": figures["duplicates"]["exact_duplicate_questions"],
        "near": figures["duplicates"]["near_duplicate_questions"],
        "non_japanese": figures["language"]["non_japanese_answers"],
        "leaked": figures["flags"]["leaked_questions"],
        "looping": figures["flags"]["looping_answers"],
        "restating": figures["flags"]["restating_answers"],
    }


def test_clean_records_give_zero_counts(tmp_path: Path) -> None:
    figures = make_report(_write(tmp_path / "clean.jsonl", CLEAN)).figures
    assert figures["records"] == len(CLEAN)
    assert _counts(figures) == dict.fromkeys(
        ("exact", "near", "non_japanese", "leaked", "looping", "restating"), 0
    )
    assert figures["language"]["answer_scripts"]["japanese"] > 0.9


def test_known_problems_give_exactly_their_counts(tmp_path: Path) -> None:
    pairs = list(CLEAN)
    pairs += [(q, "別の答えです。内容は少し違いますが、意味は同じです。") for q in EXACT]
    pairs += [(q, f"言い換えた質問への答え、その{i}です。") for i, q in enumerate(NEAR)]
    pairs += ENGLISH + [(q, "答えの例です。詳しく説明します。") for q in LEAKED] + LOOPING
    pairs.append((CLEAN[9][0], CLEAN[9][0] + "猫は夕方に活発になります。"))  # restated
    path = _write(tmp_path / "mixed.jsonl", pairs)
    figures = make_report(path, json_path=tmp_path / "report.json").figures
    assert _counts(figures) == {
        "exact": 3,  # the restating record repeats a clean question too
        "near": 3,
        "non_japanese": 2,
        "leaked": 2,
        "looping": 2,
        "restating": 1,
    }
    assert json.loads((tmp_path / "report.json").read_text(encoding="utf-8")) == figures
    clusters = figures["duplicates"]["near"]["largest_clusters"]
    assert sorted(c["first_index"] for c in clusters) == [2, 3, 5]
    assert {e["found"] for e in figures["language"]["answers"]["examples"]} == {"latin", "chinese"}
    assert figures["flags"]["leaked"]["by_kind"] == {"テーマ:": 1, "新しい依頼文:": 1}
    lengths = figures["lengths"]["question"]["chars"]
    assert lengths["count"] == len(pairs) and lengths["min"] <= lengths["percentiles"]["p50"]
    assert sum(figures["lengths"]["answer"]["chars"]["histogram"]["counts"]) == len(pairs)


def test_distribution_percentiles_and_histogram() -> None:
    values = Distribution()
    for value in range(1, 101):
        values.add(value)
    assert values.percentile(50) == 50 and values.percentile(99) == 99
    assert values.percentile(100) == 100 and values.percentile(5) == 5
    assert values.histogram() == {"width": 10, "counts": [9] + [10] * 9 + [1]}


def test_top_counter_stays_bounded_and_keeps_the_frequent() -> None:
    top: TopCounter[str] = TopCounter(capacity=10)
    for i in range(5000):
        top.add("often" if i % 3 == 0 else f"rare{i}")
    assert len(top.counts) <= 20
    assert top.top(1)[0][0] == "often"
    exact: TopCounter[str] = TopCounter(capacity=10)
    for word in ["a", "b", "a", "c", "a", "b"]:
        exact.add(word)
    assert exact.top(3) == [("a", 3), ("b", 2), ("c", 1)]


def test_reservoir_is_a_fixed_size_sample_made_the_same_each_time() -> None:
    def sample() -> list[int]:
        reservoir: Reservoir[int] = Reservoir(10, seed=3)
        for i in range(1000):
            reservoir.add(i)
        return reservoir.items

    assert len(sample()) == 10 and sample() == sample() and max(sample()) >= 10


def test_a_shown_text_is_cut_at_its_limit_and_marked() -> None:
    assert shortened("あいう", 3) == "あいう"
    assert shortened("あいうえ", 3) == "あいう…"
    assert samples._cut("あいうえ", 2) == "あい…" and samples._cut(None, 2) is None


def test_cli_on_a_file_and_bad_inputs(tmp_path: Path) -> None:
    path = _write(tmp_path / "data.jsonl", [*CLEAN, (EXACT[0], "重複した質問への答えです。")])
    result = zoi("report", str(path), "--json", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.stderr
    assert "exact duplicate questions       1" in result.stdout
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["records"] == 11

    assert_one_line_error(zoi("report", str(tmp_path / "none.jsonl")), "no such file")
    (tmp_path / "bad.jsonl").write_text("{not json\n", encoding="utf-8")
    assert_one_line_error(zoi("report", str(tmp_path / "bad.jsonl")), "line 1 is not JSON")
    (tmp_path / "other.jsonl").write_text('{"a": 1}\n', encoding="utf-8")
    assert_one_line_error(zoi("report", str(tmp_path / "other.jsonl")), "not a zoi record")
    assert_one_line_error(zoi("report", "--run", str(tmp_path)), "not a run directory")
    assert_one_line_error(zoi("report", str(tmp_path)), "is a directory")
    assert_one_line_error(zoi("report"), "give a merged FILE.jsonl or --run RUN")
    assert_one_line_error(zoi("report", str(path), "--json", str(path)), "is the input")


def test_a_lone_surrogate_in_a_file_is_refused_naming_its_line(tmp_path: Path) -> None:
    """JSON's `\\ud800` escape parses to half a character, which the terminal cannot print:
    one line naming the file's line, not an encoding error after the analysis."""
    path = _write(tmp_path / "data.jsonl", CLEAN[:2])
    emoji = json.dumps(original_record("pair", "絵文字\U0001f600の質問", "答え", "s"))
    assert "\\ud83d\\ude00" in emoji  # an escaped pair reads as one whole character
    with path.open("a", encoding="utf-8") as handle:
        handle.write(emoji + "\n")
    assert zoi("report", str(path), "--no-tokens").exit_code == 0
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(original_record("cut", "質問\ud800です", "答え", "s")) + "\n")
    assert_one_line_error(
        zoi("report", str(path), "--no-tokens"), str(path), "line 4", "lone surrogate", "U+D800"
    )


@pytest.mark.parametrize("option", ["--json", "-o"])
def test_an_output_that_cannot_be_written_is_refused_before_reading(
    tmp_path: Path, option: str
) -> None:
    """The input here fails once read, so the output's refusal shows it came first: on a
    large run the pass takes hours, and a missing directory must not end it."""
    path = tmp_path / "data.jsonl"
    path.write_text("{not json\n", encoding="utf-8")
    missing = tmp_path / "missing" / "report.out"
    refused = zoi("report", str(path), option, str(missing), "--no-tokens")
    assert_one_line_error(refused, str(missing), "does not exist")
    assert_one_line_error(zoi("report", str(path), option, "/dev/null"), "/dev/null")
    assert_one_line_error(zoi("report", str(path), option, str(tmp_path)), "is a directory")
    assert_one_line_error(zoi("report", str(path)), "line 1 is not JSON")  # the control


def test_cli_on_a_run_matches_its_merged_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    config = scripted_config(tmp_path)
    out = tmp_path / "out.jsonl"
    ran = machine.run(config, out, 0, 12, chunk_size=4)
    run_dir = Path(f"{out}.run")

    result = zoi("report", "--run", str(run_dir), "--json", str(tmp_path / "run.json"))
    assert result.exit_code == 0, result.stderr
    assert f"prompts   12 ({ran.funnel.kept} kept)" in result.stdout
    from_run = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    from_file = make_report(out).figures
    assert from_run["source"] == {
        "kind": "run",
        "path": str(run_dir),
        "chunks": 3,
        "read": 3,
        "absent": 0,
        "damaged": [],
    }
    funnel = from_run["funnel"]
    assert (funnel["prompts"], funnel["kept"]) == (12, ran.funnel.kept)
    assert funnel["judges"]["first"]["asked"] == 12
    assert funnel["judges"]["final"]["accepted"] == ran.funnel.kept
    assert from_run["lengths"]["traced_records"] == ran.funnel.kept
    for section in ("records", "duplicates", "language", "flags", "diversity"):
        assert from_run[section] == from_file[section], section
    assert_one_line_error(
        zoi("report", "--run", str(run_dir), "--json", str(run_dir / "r.json")), "inside the run"
    )


REFUSING = [
    "申し訳ありませんが、その質問にはお答えできません。",
    "答えるための情報が不足しています。",
    "I'm sorry, but I cannot help with that request.",
]
# Answers with a refusal's words that are answers: the control.
NOT_REFUSING = [
    "一度解凍した肉は再冷凍できません。使う分だけ解凍し、その日のうちに使い切りましょう。",
    "申し訳ありませんが、正確な数は分かりません。" + CLEAN[4][1] * 10,
]


def test_refusals_kept_below_the_marker_are_flagged_and_their_look_alikes_not(
    tmp_path: Path,
) -> None:
    answers = REFUSING + NOT_REFUSING
    pairs = list(CLEAN) + [(f"{CLEAN[i][0]}（{i}）", a) for i, a in enumerate(answers)]
    figures = make_report(_write(tmp_path / "refusals.jsonl", pairs)).figures
    flags = figures["flags"]
    assert flags["refusing_answers"] == len(REFUSING)
    assert flags["refusal_marker"] == "不可能"
    assert [e["index"] for e in flags["refusing"]["examples"]] == [10, 11, 12]
    assert flags["refusing"]["by_kind"] == {"お答えできません": 1, "情報が不足": 1, "I'm sorry": 1}
    clean = make_report(_write(tmp_path / "clean.jsonl", CLEAN)).figures["flags"]
    assert clean["refusing_answers"] == 0 and clean["refusing"]["examples"] == []


def _tokens(tiny_model: Path, text: str) -> int:
    """The tiny tokenizer's count, read with the `tokenizers` library, not transformers."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def test_tokens_are_counted_with_the_tokenizer_asked_for(tmp_path: Path, tiny_model: Path) -> None:
    path = _write(tmp_path / "data.jsonl", CLEAN)
    result = zoi(
        "report", str(path), "--json", str(tmp_path / "r.json"), "--tokenizer", str(tiny_model)
    )
    assert result.exit_code == 0, result.stderr
    assert f"tokens    {tiny_model}" in result.stdout
    lengths = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["lengths"]
    assert lengths["tokenizer"] == str(tiny_model) and lengths["not_counted"] is None
    for side, position in (("question", 0), ("answer", 1)):
        counts = sorted(_tokens(tiny_model, pair[position]) for pair in CLEAN)
        tokens = lengths[side]["tokens"]
        assert (tokens["count"], tokens["min"], tokens["max"]) == (10, counts[0], counts[-1])
        assert tokens["percentiles"]["p50"] == counts[4]


def test_without_a_tokenizer_the_report_says_why(tmp_path: Path, tiny_model: Path) -> None:
    path = _write(tmp_path / "data.jsonl", CLEAN)
    lengths = make_report(path).figures["lengths"]
    assert lengths["question"]["tokens"] is None and lengths["tokenizer"] is None
    assert "does not name its model" in lengths["not_counted"]
    result = zoi("report", str(path), "--no-tokens")
    assert result.exit_code == 0 and "tokens    not counted: turned off" in result.stdout
    missing = tmp_path / "no-model"
    missing.mkdir()
    assert_one_line_error(zoi("report", str(path), "--tokenizer", str(missing)), "cannot load it")
    assert_one_line_error(
        zoi("report", str(path), "--tokenizer", str(tiny_model), "--no-tokens"),
        "--tokenizer or --no-tokens",
    )


def test_a_run_s_tokenizer_is_used_only_when_it_is_on_this_machine(tiny_model: Path) -> None:
    from types import SimpleNamespace

    from zero_one_instruction.tokens import AUTO, TokenRequest, choose

    def run(model: str, **engine_kwargs: str) -> Any:
        config = SimpleNamespace(model_name=model, engine_kwargs=engine_kwargs)
        return SimpleNamespace(config=config)

    here = choose(AUTO, run(str(tiny_model)))
    assert here.name == str(tiny_model) and here.count is not None and here.count("猫") >= 1
    via_kwargs = choose(AUTO, run("scripted", tokenizer=str(tiny_model)))
    assert via_kwargs.name == str(tiny_model)
    for model in ("scripted", "zoi-test/no-such-model-anywhere", "/no/such/dir"):
        absent = choose(AUTO, run(model))
        assert absent.count is None and absent.reason == (
            f"the run's tokenizer {model} is not on this machine"
        )
    off = choose(TokenRequest(auto=False), run(str(tiny_model)))
    assert off.count is None and off.reason == "turned off (--no-tokens)"
