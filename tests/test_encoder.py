"""The record encoder: each format with and without meta, ids, dedup and its rollback."""

from __future__ import annotations

import json
from typing import Any

import pytest

from zero_one_instruction.encoder import (
    FORMATS,
    EncodeOptions,
    Encoder,
    Format,
    meta_line,
    record_line,
)
from zero_one_instruction.pipeline import Outcome, StepTrace
from zero_one_instruction.records import dumps, original_record

SYSTEM = "あなたは日本語で答えるアシスタントです。"


def kept(index: int, question: str = "質問です", answer: str = "回答です。") -> Outcome:
    step = StepTrace(step="answer", text=answer, finish_reason="stop")
    return Outcome(index, f"基本 {index}", question, answer, steps=[step])


def decode(line: bytes | None) -> dict[str, Any]:
    assert line is not None and line.endswith(b"\n") and line.count(b"\n") == 1
    return json.loads(line)


@pytest.mark.parametrize("with_meta", [False, True], ids=["plain", "meta"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_with_and_without_meta(fmt: Format, with_meta: bool) -> None:
    encoder = Encoder(EncodeOptions(id_start=5, fmt=fmt, with_meta=with_meta))
    first, second = (decode(encoder.outcome(kept(i), SYSTEM)) for i in (3, 4))
    assert (first["id"], second["id"]) == ("record_5", "record_6")
    turns = [("system", SYSTEM), ("human", "質問です"), ("gpt", "回答です。")]
    if fmt == "original":
        assert list(first)[:4] == ["id", "input", "output", "conversation"]
        assert (first["input"], first["output"]) == ("質問です", "回答です。")
        assert first["conversation"] == [{"from": f, "value": v} for f, v in turns]
    else:
        assert list(first)[:2] == ["id", "messages"]
        roles = ["system", "user", "assistant"]
        assert first["messages"] == [
            {"role": r, "content": v} for r, (_, v) in zip(roles, turns, strict=True)
        ]
    if with_meta:
        assert list(first)[-1] == "meta"
        assert first["meta"] == json.loads(meta_line(kept(3)))
        assert first["meta"]["index"] == 3 and first["meta"]["kept"] is True
        assert "question" not in first["meta"] and "base_prompt" not in first["meta"]
    else:
        assert "meta" not in first
    assert encoder.records == 2


def test_the_default_line_is_the_original_record_byte_for_byte() -> None:
    """The fast path splices the id into the shard line: the bytes `zoi generate` wrote before
    the encoder existed, without parsing JSON."""
    encoder = Encoder(EncodeOptions(id_start=100))
    assert encoder.fast
    outcome = kept(0, "「引用」と\\バックスラッシュ", "回答\n二行目")
    expected = dumps(original_record("record_100", outcome.question, outcome.answer, SYSTEM))
    assert encoder.outcome(outcome, SYSTEM) == expected.encode("utf-8")


def test_a_shard_line_and_its_outcome_encode_alike() -> None:
    """What a merge makes of a worker's shard lines equals what generate makes of the outcome."""
    for options in (EncodeOptions(), EncodeOptions(fmt="messages", with_meta=True)):
        outcome = kept(9)
        raw, meta = record_line(outcome, SYSTEM).encode(), meta_line(outcome).encode()
        assert Encoder(options).line(raw, meta) == Encoder(options).outcome(outcome, SYSTEM)


def test_splice_writes_what_line_writes() -> None:
    lines = [record_line(kept(i, f"質問{i}"), SYSTEM).encode() for i in range(3)]
    spliced: list[bytes] = []
    encoder = Encoder(EncodeOptions(id_start=7))
    encoder.splice(b"".join(lines), lambda part: spliced.append(bytes(part)))
    one_by_one = Encoder(EncodeOptions(id_start=7))
    assert b"".join(spliced) == b"".join(one_by_one.line(raw) or b"" for raw in lines)
    assert encoder.next_id == 10


def test_dedup_drops_repeated_questions_and_keeps_ids_consecutive() -> None:
    encoder = Encoder(EncodeOptions(dedup="exact"))
    questions = ["同じ質問", "別の質問", "同じ質問", "三つ目", "別の質問"]
    lines = [encoder.outcome(kept(i, q), SYSTEM) for i, q in enumerate(questions)]
    assert [decode(line)["input"] for line in lines if line is not None] == [
        "同じ質問",
        "別の質問",
        "三つ目",
    ]
    assert [line is None for line in lines] == [False, False, True, False, True]
    assert [decode(line)["id"] for line in lines if line] == ["record_0", "record_1", "record_2"]
    assert encoder.duplicates == 0  # counted once committed
    encoder.commit()
    assert (encoder.duplicates, encoder.records) == (2, 3)


def test_rollback_forgets_the_ids_and_questions_since_the_last_commit() -> None:
    encoder = Encoder(EncodeOptions(dedup="exact", id_start=1))
    encoder.outcome(kept(0, "残る質問"), SYSTEM)
    encoder.commit()
    assert encoder.outcome(kept(1, "消える質問"), SYSTEM) is not None
    assert encoder.outcome(kept(2, "残る質問"), SYSTEM) is None
    encoder.rollback()
    assert encoder.next_id == 2 and encoder.duplicates == 0
    again = decode(encoder.outcome(kept(3, "消える質問"), SYSTEM))  # not a duplicate any more
    assert again["id"] == "record_2"
    encoder.commit()
    assert (encoder.records, encoder.duplicates) == (2, 0)


# Two pairs of questions, each a rewording of the other (estimated trigram Jaccard 0.8 and
# 0.9, found by LSH at the default 0.7), and far from the other pair.
SEASONS = "日本の四季それぞれの特徴と、季節ごとの代表的な行事について詳しく説明してください。"
SEASONS_AGAIN = SEASONS.replace("説明", "解説")
PYTHON = "Pythonでリストの重複を取り除き、元の順序を保ったまま返す関数を書いてください。"
PYTHON_AGAIN = PYTHON.replace("関数", "関数を")


def near_encoder(**options: Any) -> tuple[Encoder, list[dict[str, Any]]]:
    """An encoder with near dedup whose dropped records are collected, decoded."""
    encoder = Encoder(EncodeOptions(dedup="near", **options))
    removed: list[dict[str, Any]] = []
    encoder.removed = lambda line: removed.append(decode(line))
    return encoder, removed


def test_near_dedup_drops_rewordings_and_lists_them_with_the_record_they_repeat() -> None:
    encoder, removed = near_encoder(id_start=10)
    questions = [SEASONS, PYTHON, SEASONS_AGAIN, SEASONS, PYTHON_AGAIN, "短い別の質問"]
    lines = [encoder.outcome(kept(i, q), SYSTEM) for i, q in enumerate(questions)]
    written = [decode(line) for line in lines if line is not None]
    assert [(r["id"], r["input"]) for r in written] == [
        ("record_10", SEASONS),
        ("record_11", PYTHON),
        ("record_12", "短い別の質問"),
    ]
    assert [(r["duplicate_of"], r["kind"], r["input"]) for r in removed] == [
        ("record_10", "near", SEASONS_AGAIN),
        ("record_10", "exact", SEASONS),
        ("record_11", "near", PYTHON_AGAIN),
    ]
    assert removed[0]["output"] == "回答です。" and removed[0]["conversation"][1]["value"]
    encoder.commit()
    assert (encoder.records, encoder.duplicates, encoder.near_duplicates) == (3, 1, 2)


def test_exact_dedup_keeps_rewordings() -> None:
    """The control: the same questions without near dedup lose only the exact repeat."""
    encoder = Encoder(EncodeOptions(dedup="exact"))
    questions = [SEASONS, PYTHON, SEASONS_AGAIN, SEASONS, PYTHON_AGAIN]
    lines = [encoder.outcome(kept(i, q), SYSTEM) for i, q in enumerate(questions)]
    assert [line is None for line in lines] == [False, False, False, True, False]


def test_a_lower_threshold_drops_more() -> None:
    loose = "日本の季節ごとの代表的な行事と、それぞれの季節の特徴を教えてください。"
    dropped = []
    for threshold in (0.7, 0.3):
        encoder, _ = near_encoder(near_threshold=threshold)
        encoder.outcome(kept(0, SEASONS), SYSTEM)
        dropped.append(encoder.outcome(kept(1, loose), SYSTEM) is None)
    assert dropped == [False, True]


def test_a_record_is_dropped_only_for_repeating_a_kept_one() -> None:
    """No chains: the second of three questions, each a rewording of the one before, is
    dropped, and the third is compared with the first, which it does not repeat."""
    middle = SEASONS_AGAIN
    last = middle.replace("代表的な", "主な")  # about 0.8 from the middle one, 0.6 from the first
    encoder, removed = near_encoder()
    kept_ones = [encoder.outcome(kept(i, q), SYSTEM) for i, q in enumerate([SEASONS, middle])]
    assert kept_ones[1] is None and removed[0]["duplicate_of"] == "record_0"
    assert encoder.outcome(kept(2, last), SYSTEM) is not None
    control, _ = near_encoder()  # the middle one kept: then the last one repeats it
    assert control.outcome(kept(0, middle), SYSTEM) is not None
    assert control.outcome(kept(1, last), SYSTEM) is None


def test_rollback_takes_questions_back_out_of_the_near_index() -> None:
    encoder, removed = near_encoder()
    encoder.outcome(kept(0, SEASONS), SYSTEM)
    encoder.commit()
    assert encoder.outcome(kept(1, PYTHON), SYSTEM) is not None
    assert encoder.outcome(kept(2, SEASONS_AGAIN), SYSTEM) is None
    encoder.rollback()
    assert encoder.next_id == 1 and encoder.near_duplicates == 0
    assert decode(encoder.outcome(kept(3, PYTHON_AGAIN), SYSTEM))["id"] == "record_1"
    assert encoder.outcome(kept(4, SEASONS_AGAIN), SYSTEM) is None  # the committed one stays
    encoder.commit()
    assert (encoder.records, encoder.duplicates, encoder.near_duplicates) == (2, 0, 1)
    assert [r["duplicate_of"] for r in removed] == ["record_0", "record_0"]
