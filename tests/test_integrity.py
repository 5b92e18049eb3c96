"""Never mix two configurations: shards of another run, damaged markers, the frozen chat
template, hardware settings that cannot reach the data, and engine arguments checked early."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from zero_one_instruction import shards
from zero_one_instruction.rundir import Chunk, open_run

from .clitools import assert_one_line_error
from .clitools import zoi as zoi_inline
from .queue_helpers import ok, scripted_config, zoi

N, CHUNK = 10, 5


def run_args(config: Path, out: Path, run: Path) -> list[str]:
    return [
        "run",
        "-c",
        str(config),
        "--num-prompts",
        str(N),
        "--chunk-size",
        str(CHUNK),
        "-o",
        str(out),
        "--run",
        str(run),
    ]


def generated(config: Path, out: Path) -> bytes:
    ok("generate", "-c", str(config), "--start", "0", "--end", str(N), "-o", str(out))
    return out.read_bytes()


@pytest.fixture
def finished(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """A finished `zoi run` of the scripted engine (seed 5): config, run dir, its output."""
    config, run = scripted_config(tmp_path), tmp_path / "run"
    out = tmp_path / "seed5.jsonl"
    ok(*run_args(config, out, run))
    return config, run, out.read_bytes()


def test_shards_of_another_configuration_are_set_aside_and_redone(
    finished: tuple[Path, Path, bytes], tmp_path: Path
) -> None:
    config, run, seed5 = finished
    other = tmp_path / "seed6.yml"
    other.write_text(config.read_text(encoding="utf-8").replace("seed: 5", "seed: 6"), "utf-8")
    seed6 = generated(other, tmp_path / "reference6.jsonl")
    assert seed6 != seed5
    (run / "run.json").unlink()
    out = tmp_path / "seed6.jsonl"
    ok(*run_args(other, out, run))
    assert out.read_bytes() == seed6, "records of the seed-5 run were mixed into the seed-6 one"
    assert len(list((run / "shards").glob("*.done.bad-*"))) == N // CHUNK  # kept, not deleted


def test_status_and_merge_refuse_a_foreign_marker(finished: tuple[Path, Path, bytes]) -> None:
    _, run, _ = finished
    marker = run / "shards" / f"{Chunk(0, CHUNK).id}.done"
    data = json.loads(marker.read_text(encoding="utf-8"))
    marker.write_text(json.dumps({**data, "run": "0" * 64}), encoding="utf-8")
    state = json.loads(ok("status", "--run", str(run), "--json"))
    assert state["chunks"]["bad"] == 1 and state["chunks"]["done"] == N // CHUNK - 1
    assert "another run" in state["problems"][0]
    assert_one_line_error(
        zoi_inline("merge", "--run", str(run), "-o", str(run.parent / "m.jsonl")),
        "[0, 5)",
        code=1,
    )


DAMAGED_FUNNELS = {
    "empty": {},
    "no dropped": {"prompts": 5, "kept": 5, "fixer_ran": 0},
    "dropped not a map": "dropped",
    "counts do not add up": "add",
    "a count is text": "text",
}


def _damage(funnel: dict, how: object) -> object:
    if isinstance(how, dict):
        return how
    if how == "dropped":
        return {**funnel, "dropped": 3}
    if how == "add":
        return {**funnel, "prompts": funnel["prompts"] + 1}
    return {**funnel, "kept": str(funnel["kept"])}


@pytest.mark.parametrize("how", DAMAGED_FUNNELS.values(), ids=DAMAGED_FUNNELS.keys())
def test_a_marker_with_a_damaged_funnel_is_damaged(
    finished: tuple[Path, Path, bytes], how: object
) -> None:
    _, run, _ = finished
    chunk = Chunk(0, CHUNK)
    marker = run / "shards" / f"{chunk.id}.done"
    data = json.loads(marker.read_text(encoding="utf-8"))
    marker.write_text(json.dumps({**data, "funnel": _damage(data["funnel"], how)}), "utf-8")
    result = shards.check(open_run(run), chunk)
    assert not result.done and result.problem == "marker has a damaged funnel"


def test_status_and_run_survive_an_empty_funnel(
    finished: tuple[Path, Path, bytes], tmp_path: Path
) -> None:
    config, run, expected = finished
    marker = run / "shards" / f"{Chunk(0, CHUNK).id}.done"
    data = json.loads(marker.read_text(encoding="utf-8"))
    marker.write_text(json.dumps({**data, "funnel": {}}), encoding="utf-8")
    state = zoi("status", "--run", str(run))
    assert state.returncode == 0, state.stderr
    assert "damaged funnel" in state.stdout + state.stderr
    out = tmp_path / "again.jsonl"
    done = zoi(*run_args(config, out, run))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == expected


def test_copied_shards_of_the_same_configuration_are_kept(
    finished: tuple[Path, Path, bytes], tmp_path: Path
) -> None:
    """The fingerprint names the data, not the directory: a run rebuilt with the same
    settings keeps its shards (and runs nothing again)."""
    config, run, expected = finished
    copy = tmp_path / "copy"
    shutil.copytree(run / "shards", copy / "shards")
    ok(
        "enqueue",
        "-c",
        str(config),
        "--run",
        str(copy),
        "--num-prompts",
        str(N),
        "--chunk-size",
        "5",
    )
    state = json.loads(ok("status", "--run", str(copy), "--json"))
    assert state["chunks"]["done"] == N // CHUNK
    out = tmp_path / "copy.jsonl"
    ok("merge", "--run", str(copy), "-o", str(out))
    assert out.read_bytes() == expected
