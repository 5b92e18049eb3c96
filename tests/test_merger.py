"""The merger, in-process: one output in base-prompt order from the verified shards, a
refusal of an unfinished run unless `allow_partial`, and what each MergeOptions changes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from zero_one_instruction import shards
from zero_one_instruction.errors import ZoiError
from zero_one_instruction.merger import MergeIncomplete, MergeOptions, MergeReport, merge_run
from zero_one_instruction.records import dumps
from zero_one_instruction.rundir import Run

from .unit_runs import SYSTEM, finish, finish_all, flip_a_byte, make_run, outcome


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return make_run(tmp_path, end=6, chunk_size=2)


def _read(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def _merge(
    run: Run, options: MergeOptions | None = None
) -> tuple[MergeReport, list[dict[str, Any]]]:
    """What `merge_run` reports and writes with `options`, into the run's one output file."""
    out = run.path.parent / "out.jsonl"
    report = merge_run(run.path, out, options or MergeOptions(), overwrite=True)
    return report, _read(out)


def _merged(run: Run, options: MergeOptions | None = None) -> list[dict[str, Any]]:
    return _merge(run, options)[1]


def _numbered(records: list[dict[str, Any]]) -> str:
    """The records as `id input, ...`: the two things order and numbering are about."""
    return ", ".join(f"{r['id']} {r['input']}" for r in records)


def test_ids_follow_the_base_prompt_order_whatever_order_chunks_finished_in(run: Run) -> None:
    for chunk in reversed(run.chunks()):
        finish(run, chunk, dropped=frozenset({1}))
    report, records = _merge(run)
    assert (
        _numbered(records)
        == "record_0 質問0, record_1 質問2, record_2 質問3, record_3 質問4, record_4 質問5"
    )
    assert records[0] == {
        "id": "record_0",
        "input": "質問0",
        "output": "回答0",
        "conversation": [
            {"from": "system", "value": SYSTEM},
            {"from": "human", "value": "質問0"},
            {"from": "gpt", "value": "回答0"},
        ],
    }
    assert (report.chunks, report.merged, report.records, report.duplicates) == (3, 3, 5, 0)
    assert report.bytes == (run.path.parent / "out.jsonl").stat().st_size
    assert report.missing == [] and report.problems == []


def test_id_start_shifts_every_id(run: Run) -> None:
    finish_all(run)
    ids = [r["id"] for r in _merged(run, MergeOptions(id_start=100))]
    assert ids == [f"record_{n}" for n in range(100, 106)]


def test_a_missing_chunk_refuses_the_merge_and_writes_nothing(run: Run) -> None:
    first, _, third = run.chunks()
    finish(run, first)
    finish(run, third)
    out = run.path.parent / "out.jsonl"
    with pytest.raises(MergeIncomplete, match=r"missing base-prompt ranges \[2, 4\) \(") as refused:
        merge_run(run.path, out)
    assert refused.value.exit_code == 1 and "--allow-partial" in str(refused.value)
    assert not out.exists()


def test_allow_partial_merges_what_is_there_and_names_the_holes(run: Run) -> None:
    first, _, third = run.chunks()
    finish(run, first)
    finish(run, third)
    report, records = _merge(run, MergeOptions(allow_partial=True))
    assert _numbered(records) == "record_0 質問0, record_1 質問1, record_2 質問4, record_3 質問5"
    assert (report.merged, report.records, report.missing) == (2, 4, [(2, 4)])


def test_a_damaged_shard_refuses_the_merge_naming_it(run: Run) -> None:
    finish_all(run)
    second = run.chunks()[1]
    shards.marker_path(run.shards, run.chunks()[0]).unlink()
    flip_a_byte(shards.path_of(run.shards, second, "records"))
    with pytest.raises(MergeIncomplete) as refused:
        _merged(run)
    message = str(refused.value)
    assert "missing base-prompt ranges [0, 2);" in message
    assert f"damaged shards [2, 4) ({second.id}.jsonl does not match its checksum)" in message


@pytest.mark.parametrize(
    "options",
    [MergeOptions(allow_partial=True), MergeOptions(allow_partial=True, with_meta=True)],
    ids=["spliced", "parsed"],
)
@pytest.mark.parametrize("bad", [1, 2], ids=["middle", "last"])
def test_a_shard_found_damaged_while_copying_is_cut_back_out(
    run: Run, options: MergeOptions, bad: int
) -> None:
    """Same size, other bytes: only the copy's checksum finds it, after its lines were
    written; the output and the ids must be as if the chunk had never been there."""
    finish_all(run)
    damaged = run.chunks()[bad]
    flip_a_byte(shards.path_of(run.shards, damaged, "records"))
    report, records = _merge(run, options)
    kept = [n for n in range(6) if n not in (damaged.start, damaged.start + 1)]
    assert _numbered(records) == ", ".join(f"record_{i} 質問{n}" for i, n in enumerate(kept))
    assert report.problems == [f"chunk {damaged.id}: {damaged.id}.jsonl does not match its marker"]
    assert (report.merged, report.records) == (2, 4)
    assert report.missing == [(damaged.start, damaged.end)]
    assert report.bytes == (run.path.parent / "out.jsonl").stat().st_size


@pytest.mark.parametrize(
    ("field", "value"), [("input", 7), ("output", None), ("conversation", [{"from": "x"}])]
)
@pytest.mark.parametrize("fmt", ["original", "messages"])
def test_a_shard_line_that_parses_but_is_no_record_is_cut_out(
    run: Run, field: str, value: object, fmt: str
) -> None:
    """Damage that leaves valid JSON (a number where the question was) is refused like any
    other damage: the chunk is cut out and named, never a traceback from deeper down."""
    finish_all(run)
    damaged = run.chunks()[1]
    path = shards.path_of(run.shards, damaged, "records")
    first, rest = path.read_bytes().split(b"\n", 1)
    line = dumps({**json.loads(first), field: value}).encode().rstrip(b"\n")
    assert len(line) < len(first)  # padded to the same size: only the parse can find it
    path.write_bytes(line[:-1] + b" " * (len(first) - len(line)) + b"}\n" + rest)
    options = MergeOptions(fmt=fmt, dedup="exact", allow_partial=True)  # type: ignore[arg-type]
    report, records = _merge(run, options)
    assert report.problems == [f"chunk {damaged.id}: {damaged.id}.jsonl does not match its marker"]
    assert (len(records), report.missing) == (4, [(damaged.start, damaged.end)])


def test_messages_format_gives_role_and_content_only(run: Run) -> None:
    finish_all(run)
    first = _merged(run, MergeOptions(fmt="messages"))[0]
    assert first == {
        "id": "record_0",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "質問0"},
            {"role": "assistant", "content": "回答0"},
        ],
    }


def test_with_meta_adds_each_records_source_index_and_trace(run: Run) -> None:
    finish(run, run.chunks()[0], dropped=frozenset({0}))
    finish(run, run.chunks()[1])
    finish(run, run.chunks()[2])
    records = _merged(run, MergeOptions(with_meta=True))
    assert [(r["input"], r["meta"]["index"]) for r in records] == [
        (f"質問{n}", n) for n in range(1, 6)
    ]
    meta = records[0]["meta"]
    assert set(meta) == {"index", "fixer_ran", "steps", "kept"}  # the rest is the record
    assert meta["steps"][0]["step"] == "width" and meta["kept"] is True
    assert set(records[0]) == {"id", "input", "output", "conversation", "meta"}


def test_dedup_drops_questions_seen_before_across_chunks(run: Run) -> None:
    for chunk in run.chunks():
        first, second = range(chunk.start, chunk.end)
        outcomes = [outcome(first, question="同じ質問"), outcome(second)]
        shards.write_chunk(run, chunk, outcomes, SYSTEM, {})
    report, records = _merge(run, MergeOptions(dedup="exact"))
    assert _numbered(records) == "record_0 同じ質問, record_1 質問1, record_2 質問3, record_3 質問5"
    assert (report.records, report.duplicates) == (4, 2)
    assert len(_merged(run)) == 6  # without dedup every record stays


def test_parsed_and_spliced_outputs_are_the_same_bytes(run: Run) -> None:
    """`dedup` over distinct questions parses every line; the default splices the id in. The
    output must not depend on which path wrote it."""
    finish_all(run, dropped=frozenset({3}))
    spliced, parsed = run.path.parent / "spliced.jsonl", run.path.parent / "parsed.jsonl"
    merge_run(run.path, spliced)
    report = merge_run(run.path, parsed, MergeOptions(dedup="exact"))
    assert report.duplicates == 0
    assert parsed.read_bytes() == spliced.read_bytes()


def test_an_existing_file_the_run_did_not_write_is_refused(run: Run) -> None:
    finish_all(run)
    other = run.path.parent / "other.jsonl"
    other.write_text("keep me\n", encoding="utf-8")
    with pytest.raises(ZoiError, match="already exists"):
        merge_run(run.path, other)
    assert other.read_text(encoding="utf-8") == "keep me\n"
    assert merge_run(run.path, other, overwrite=True).records == 6


SEASONS = "日本の四季それぞれの特徴と、季節ごとの代表的な行事について詳しく説明してください。"
PYTHON = "Pythonでリストの重複を取り除き、元の順序を保ったまま返す関数を書いてください。"
# Each chunk's two questions: the second chunk rewords the first chunk's question and brings
# one the third chunk rewords.
NEAR_CHUNKS = [
    (SEASONS, "短い質問"),
    (SEASONS.replace("説明", "解説"), PYTHON),
    (PYTHON.replace("関数", "関数を"), "別の質問"),
]


def _near_run(run: Run) -> Path:
    """The chunks of NEAR_CHUNKS committed; the path of the near-dedup sidecar of out.jsonl."""
    for chunk, questions in zip(run.chunks(), NEAR_CHUNKS, strict=True):
        outcomes = [
            outcome(i, question=q)
            for i, q in zip(range(chunk.start, chunk.end), questions, strict=True)
        ]
        shards.write_chunk(run, chunk, outcomes, SYSTEM, {})
    return run.path.parent / "out.duplicates.jsonl"


def test_near_dedup_drops_rewordings_across_chunks_into_a_sidecar(run: Run) -> None:
    sidecar = _near_run(run)
    report, records = _merge(run, MergeOptions(dedup="near"))
    assert _numbered(records) == (
        f"record_0 {SEASONS}, record_1 短い質問, record_2 {PYTHON}, record_3 別の質問"
    )
    removed = _read(sidecar)
    assert [(r["duplicate_of"], r["kind"], r["input"]) for r in removed] == [
        ("record_0", "near", NEAR_CHUNKS[1][0]),
        ("record_2", "near", NEAR_CHUNKS[2][0]),
    ]
    assert (report.records, report.duplicates, report.near_duplicates) == (4, 0, 2)
    assert report.sidecar == sidecar
    assert len(_merged(run, MergeOptions(dedup="exact"))) == 6  # the control: all differ


@pytest.mark.parametrize("at", ["answer", "key"])
def test_a_damaged_shard_takes_its_questions_out_of_the_near_index(run: Run, at: str) -> None:
    """The second chunk fails its checksum while merged: its records leave the output, its
    entries the sidecar, and its questions the index, so the third chunk's rewording of one
    of them is kept. Damage that breaks the JSON is cut out the same way."""
    sidecar = _near_run(run)
    damaged = shards.path_of(run.shards, run.chunks()[1], "records")
    data = damaged.read_bytes()
    flip_a_byte(damaged, data.rindex("回答".encode()) + 2 if at == "answer" else 5)
    report, records = _merge(run, MergeOptions(dedup="near", allow_partial=True))
    assert _numbered(records) == (
        f"record_0 {SEASONS}, record_1 短い質問, record_2 {NEAR_CHUNKS[2][0]}, record_3 別の質問"
    )
    assert sidecar.read_bytes() == b""
    assert (report.near_duplicates, report.missing) == (0, [(2, 4)])
