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
    encoder = Encoder(EncodeOptions(dedup=True))
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
    encoder = Encoder(EncodeOptions(dedup=True, id_start=1))
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
