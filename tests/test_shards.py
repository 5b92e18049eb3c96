"""Shards and their done markers, in-process: what `write_chunk` commits, when a marker is
trusted (`read_marker`, `check`), how a bad shard is set aside, and the `Verified` cache."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from zero_one_instruction import shards
from zero_one_instruction.rundir import Run
from zero_one_instruction.runner import _log_chunk

from .unit_runs import DROP, INFO, SYSTEM, finish, flip_a_byte, make_run, outcome


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return make_run(tmp_path, end=6, chunk_size=3)


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _edit_marker(run: Run, changes: dict[str, object]) -> None:
    """Change fields of the first chunk's marker, as a hand edit or another run would."""
    path = shards.marker_path(run.shards, run.chunks()[0])
    marker = json.loads(path.read_text(encoding="utf-8"))
    marker.update(changes)
    path.write_text(json.dumps(marker), encoding="utf-8")


def test_write_chunk_commits_records_meta_rejects_and_a_marker(run: Run) -> None:
    chunk = run.chunks()[1]
    marker = finish(run, chunk, dropped=frozenset({4}), info={"worker": "w1"})

    records = _lines(shards.path_of(run.shards, chunk, "records"))
    assert [r["input"] for r in records] == ["質問3", "質問5"]
    assert all("id" not in r for r in records)  # the merger assigns ids
    assert records[0]["conversation"][0] == {"from": "system", "value": SYSTEM}
    assert [m["index"] for m in _lines(shards.path_of(run.shards, chunk, "meta"))] == [3, 5]
    rejects = _lines(shards.path_of(run.shards, chunk, "rejects"))
    assert [(r["index"], r["drop_reason"], r["kept"]) for r in rejects] == [(4, DROP, False)]

    assert (marker["chunk"], marker["start"], marker["end"]) == (chunk.id, 3, 6)
    assert marker["run"] == run.fingerprint and marker["worker"] == "w1"
    assert {k: v["lines"] for k, v in marker["files"].items()} == {
        "records": 2,
        "meta": 2,
        "rejects": 1,
    }
    records_file = shards.path_of(run.shards, chunk, "records")
    assert marker["files"]["records"]["bytes"] == records_file.stat().st_size
    assert marker["files"]["records"]["sha256"] == shards.sha256_of(records_file)
    assert marker["funnel"]["prompts"] == 3 and marker["funnel"]["dropped"] == {DROP: 1}

    assert shards.read_marker(run, chunk) == (marker, None)
    assert shards.check(run, chunk).done
    assert shards.funnel_of(marker).kept == 2


def test_a_chunk_without_a_marker_is_not_done_and_no_problem(run: Run) -> None:
    chunk = run.chunks()[0]
    assert shards.read_marker(run, chunk) == (None, None)
    result = shards.check(run, chunk)
    assert (result.done, result.marker, result.problem) == (False, None, None)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"run": "f" * 64}, "shard of another run (ffffffffffffffff), not of this one"),
        ({"start": 1}, "marker does not describe this chunk"),
        ({"format": 99}, "marker does not describe this chunk"),
        ({"files": {"records": {}}}, "marker does not describe this chunk"),
        (
            {"funnel": {"prompts": 3, "kept": 9, "fixer_ran": 0, "prompt_tokens": 0}},
            "marker has a damaged funnel",
        ),
        (
            {
                "funnel": {
                    "prompts": 3,
                    "kept": 3,
                    "fixer_ran": 0,
                    "prompt_tokens": 0,
                    "completion_tokens": 0,
                    "dropped": {},
                    "retries": -1,
                }
            },
            "marker has a damaged funnel",
        ),
    ],
)
def test_a_marker_that_does_not_fit_is_a_problem(
    run: Run, changes: dict[str, object], problem: str
) -> None:
    chunk = run.chunks()[0]
    finish(run, chunk)
    _edit_marker(run, changes)
    assert shards.read_marker(run, chunk) == (None, problem)
    result = shards.check(run, chunk)
    assert not result.done and result.problem == problem


def test_a_funnel_that_does_not_add_up_is_damaged(run: Run) -> None:
    chunk = run.chunks()[0]
    marker = finish(run, chunk)
    marker["funnel"]["dropped"] = {DROP: 1}  # three kept and one dropped of three prompts
    _edit_marker(run, {"funnel": marker["funnel"]})
    assert shards.read_marker(run, chunk)[1] == "marker has a damaged funnel"


def test_an_unreadable_marker_is_a_problem(run: Run) -> None:
    chunk = run.chunks()[0]
    finish(run, chunk)
    shards.marker_path(run.shards, chunk).write_bytes(b'{"format": 1, ')
    marker, problem = shards.read_marker(run, chunk)
    assert marker is None and problem is not None and problem.startswith("unreadable marker (")


def test_torn_missing_and_altered_shard_files_are_problems(run: Run) -> None:
    first, second = run.chunks()
    finish(run, first)
    finish(run, second, dropped=frozenset({3}))
    records = shards.path_of(run.shards, first, "records")
    size = records.stat().st_size
    with records.open("r+b") as handle:
        handle.truncate(size - 4)
    assert shards.check(run, first).problem == (
        f"{records.name} has {size - 4} bytes, marker says {size} (truncated or modified)"
    )

    rejects = shards.path_of(run.shards, second, "rejects")
    flip_a_byte(rejects)
    assert shards.check(run, second, deep=False).done  # the size alone looks right
    assert shards.check(run, second).problem == f"{rejects.name} does not match its checksum"
    rejects.unlink()
    result = shards.check(run, second)
    assert result.problem == f"{rejects.name} is missing" and result.marker is not None


def test_set_aside_moves_every_file_of_a_bad_shard_and_keeps_them(run: Run) -> None:
    first, second = run.chunks()
    finish(run, first)
    finish(run, second)
    _edit_marker(run, {"run": "0" * 64})
    before = {p.name: p.read_bytes() for p in run.shards.glob(f"{first.id}*")}
    assert len(before) == 4

    shards.set_aside(run.shards, first)
    assert not list(run.shards.glob(f"{first.id}.*done")) and not shards.check(run, first).problem
    aside = {p.name.split(".bad-")[0]: p.read_bytes() for p in run.shards.glob("*.bad-*")}
    assert aside == before  # never deleted, byte for byte
    assert shards.check(run, second).done  # the other chunk is untouched

    finish(run, first)  # redone: the chunk is done again, and its old files stay aside
    assert shards.check(run, first).done and len(list(run.shards.glob("*.bad-*"))) == 4


def test_present_markers_lists_marker_files_with_their_inodes(run: Run) -> None:
    first, second = run.chunks()
    assert shards.present_markers(run) == {}
    finish(run, first)
    finish(run, second)
    (run.shards / "stray.jsonl").write_text("", encoding="utf-8")
    marker = shards.marker_path(run.shards, second)
    assert shards.present_markers(run) == {
        first.id: shards.marker_path(run.shards, first).stat().st_ino,
        second.id: marker.stat().st_ino,
    }
    _edit_marker(run, {"run": "0" * 64})  # presence only: a foreign marker is present
    assert first.id in shards.present_markers(run)
    shards.set_aside(run.shards, second)
    assert list(shards.present_markers(run)) == [first.id]


def _hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files `shards` hashes from now on."""
    hashed: list[str] = []
    real = shards.sha256_of

    def counting(path: Path) -> str:
        hashed.append(path.name)
        return real(path)

    monkeypatch.setattr(shards, "sha256_of", counting)
    return hashed


def test_verified_hashes_a_shard_once_until_it_changes(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = run.chunks()
    finish(run, first)
    hashed = _hashes(monkeypatch)
    verified = shards.Verified(run)
    assert verified.check(first).done and len(hashed) == 3
    assert not verified.check(second).done  # not done: nothing to hash or remember
    assert verified.check(first).done and len(hashed) == 3
    verified.save()
    known = json.loads((run.shards / shards.Verified.FILE).read_text(encoding="utf-8"))
    assert list(known) == [first.id]

    assert shards.Verified(run).check(first).done and len(hashed) == 3  # the saved hint
    meta = shards.path_of(run.shards, first, "meta")
    flip_a_byte(meta)
    os.utime(meta, ns=(1, 1))  # a new mtime, as any write gives
    result = shards.Verified(run).check(first)
    assert result.problem == f"{meta.name} does not match its checksum"
    assert hashed[3:] == [f"{first.id}.jsonl", meta.name]  # hashed again, up to the bad file


def test_verified_ignores_a_corrupt_hint_file(run: Run) -> None:
    first = run.chunks()[0]
    finish(run, first)
    (run.shards / shards.Verified.FILE).write_text("{not json", encoding="utf-8")
    verified = shards.Verified(run)
    assert verified.check(first).done
    verified.save()
    assert first.id in json.loads((run.shards / shards.Verified.FILE).read_text(encoding="utf-8"))


def test_read_lines_gives_each_line_and_feeds_the_digest(run: Run) -> None:
    """The merger checks a shard with the digest of the very lines it copies."""
    finish(run, run.chunks()[0])
    path = shards.path_of(run.shards, run.chunks()[0], "records")
    digest = hashlib.sha256()
    lines = list(shards.read_lines(path, digest))
    assert b"".join(lines) == path.read_bytes() and len(lines) == 3
    assert digest.hexdigest() == shards.sha256_of(path)
    assert list(shards.read_lines(path)) == lines


def test_the_chunk_log_carries_the_retries_of_the_chunk(run: Run) -> None:
    chunk = run.chunks()[0]
    outcomes = [outcome(i) for i in range(chunk.start, chunk.end)]
    outcomes[1].retries = 4
    marker = shards.write_chunk(run, chunk, outcomes, SYSTEM, {**INFO, "worker": "w", "seconds": 1})
    assert marker["funnel"]["retries"] == 4 and shards.check(run, chunk).done
    clean = finish(run, run.chunks()[1], info={**INFO, "worker": "w", "seconds": 1})
    assert "retries" not in clean["funnel"]  # as markers were before retries were counted
    for done in (marker, clean):
        _log_chunk(run, done)
    lines = _lines(run.path / "logs" / "chunks.jsonl")
    assert [line["retries"] for line in lines] == [4, 0]
