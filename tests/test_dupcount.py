"""The report's spilled duplicate counts: the same as counting in memory, whatever the sizes
of its buffers and files, checked against the threshold, and in agreement with the near-dedup
merge."""

from __future__ import annotations

import gc
import json
import random
from typing import Any

import pytest
from datasketch import MinHash

from benchmarks.synthetic import _reword, questions_and_answers
from zero_one_instruction import dupcount
from zero_one_instruction.dupcount import DuplicateCounter, digest
from zero_one_instruction.encoder import EncodeOptions, Encoder
from zero_one_instruction.neardup import Bands
from zero_one_instruction.records import dumps, original_record

from .test_neardup import ABOVE, BASE, BELOW

BANDS = Bands()


def in_memory(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """The counts as defined, with sets and dicts: what the spilled counter must match. A
    record's candidates are the first holders of its bands; its root is the earliest of them
    whose estimated Jaccard similarity (datasketch's) reaches the threshold."""
    seen_q: set[int] = set()
    seen_a: set[int] = set()
    first_of_band: dict[int, int] = {}
    exact_q = exact_a = 0
    roots: dict[int, list[int]] = {}
    signatures = [BANDS.signature(question) for question, _ in pairs]
    for seq, (question, answer) in enumerate(pairs):
        exact_a += digest(answer) in seen_a
        seen_a.add(digest(answer))
        keys = BANDS.keys(question)
        earlier = {first_of_band[k] for k in keys if k in first_of_band}
        similar = [r for r in earlier if _near(signatures[seq], signatures[r])]
        for key in keys:
            first_of_band.setdefault(key, seq)
        if digest(question) in seen_q:
            exact_q += 1
        elif similar:
            roots.setdefault(min(similar), []).append(seq)
        seen_q.add(digest(question))
    largest = sorted(roots.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:10]
    return {
        "exact": (exact_q, exact_a),
        "near": sum(len(m) for m in roots.values()),
        "clusters": len(roots),
        "largest": [(root, len(members) + 1, members[:5]) for root, members in largest],
    }


def _near(one: MinHash, other: MinHash) -> bool:
    return bool(one.jaccard(other) >= BANDS.threshold)


def spilled(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    counter = DuplicateCounter(BANDS)
    for seq, (question, answer) in enumerate(pairs):
        counter.add(1000 + seq, question, answer, question[:20])
    counts = counter.count()
    assert not counter._spill.root.exists()  # the temporary files are gone
    largest = [
        (c["first_index"] - 1000, c["size"], [r["index"] - 1000 for r in c["repeats"]])
        for c in counts.largest
    ]
    assert all(
        r["question"] == pairs[r["index"] - 1000][0][:20]
        for c in counts.largest
        for r in c["repeats"]
    )
    return {
        "exact": (counts.exact_questions, counts.exact_answers),
        "near": counts.near_questions,
        "clusters": counts.clusters,
        "largest": largest,
    }


@pytest.mark.parametrize(
    "sizes",
    [{}, {"CHUNK": 97, "RANGE": 64, "LIMIT": 12 * 3, "BATCH": 5}],
    ids=["default", "tiny-buffers-files-and-splits"],
)
def test_spilled_counts_equal_counting_in_memory(
    sizes: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in sizes.items():
        monkeypatch.setattr(dupcount, name, value)
    pairs = list(questions_and_answers(1500, seed=3))
    expected = in_memory(pairs)
    assert expected["exact"][0] > 20 and expected["near"] > 20  # the data has both
    assert spilled(pairs) == expected


def test_no_records_count_nothing() -> None:
    assert spilled([]) == {"exact": (0, 0), "near": 0, "clusters": 0, "largest": []}


def test_a_question_sharing_a_band_below_the_threshold_is_not_counted() -> None:
    """BELOW shares a band with BASE at a similarity under the threshold, ABOVE over it."""
    below = spilled([(BASE, "回答1"), (BELOW, "回答2")])
    assert (below["near"], below["clusters"]) == (0, 0)
    above = spilled([(BASE, "回答1"), (BELOW, "回答2"), (ABOVE, "回答3")])
    assert (above["near"], above["largest"]) == (1, [(0, 2, [2])])


def _stars() -> list[str]:
    """Distinct questions, each followed later by rewordings and an exact repeat of it."""
    rng = random.Random(5)
    bases = [q for q, _ in questions_and_answers(400, seed=9)][::50]
    questions = list(bases)
    for base in bases:
        questions += [_reword(rng, base) for _ in range(rng.randint(1, 3))] + [base]
    return questions


def _merge_drops(pairs: list[tuple[str, str]]) -> tuple[dict[int, int], set[int]]:
    """What a near-dedup merge drops: {near duplicate: the kept record it repeats} by their
    place in `pairs`, and every dropped place."""
    encoder = Encoder(EncodeOptions(dedup="near"))
    removed: list[bytes] = []
    encoder.removed = removed.append
    kept: dict[str, int] = {}
    dropped: set[int] = set()
    for index, (question, answer) in enumerate(pairs):
        record = original_record("", question, answer, "")
        del record["id"]
        line = encoder.line(dumps(record).encode("utf-8"))
        if line is None:
            dropped.add(index)
        else:
            kept[json.loads(line)["id"]] = index
    near = [json.loads(line) for line in removed]
    order = sorted(dropped)
    repeats = {
        order[n]: kept[entry["duplicate_of"]]
        for n, entry in enumerate(near)
        if entry["kind"] == "near"
    }
    return repeats, dropped


def test_the_report_counts_what_the_merge_drops_as_near_duplicates() -> None:
    """Both check a candidate's estimated Jaccard similarity against the threshold, so each
    near duplicate whose root the merge keeps is one the merge drops, for that root, and the
    merge drops no other. They differ only on chains: the merge never drops a question for
    nearly repeating a dropped one, and the report counts it (here one: a rewording of a
    rewording)."""
    questions = _stars()
    pairs = [(q, f"回答{i}") for i, q in enumerate(questions)]
    report = spilled(pairs)
    assert report["clusters"] < 10 and all(size <= 6 for _, size, _ in report["largest"])
    roots = {member: root for root, _, members in report["largest"] for member in members}
    assert len(roots) == report["near"]  # every cluster and member is listed
    repeats, dropped = _merge_drops(pairs)
    assert {m: r for m, r in roots.items() if r not in dropped} == repeats
    chains = {m: r for m, r in roots.items() if r in dropped}
    assert len(repeats) >= 6 and len(chains) == 1
    assert all(root in repeats for root in chains.values())


def test_a_report_stopped_early_leaves_no_temporary_files() -> None:
    counter = DuplicateCounter(BANDS)
    counter.add(0, "質問", "回答", "質問")
    spill = counter._spill.root
    assert spill.is_dir()
    del counter
    gc.collect()
    assert not spill.exists()
