"""Multi-turn conversations in runs: what run.json freezes (and, at one turn, does not), the
turns in the output (`--format messages`, `meta.turns`), the summary, `zoi status`, the chunk
log, the preview and `zoi report`; reruns and the queue write the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

from zero_one_instruction.config import load_config
from zero_one_instruction.rundir import RunError, create_or_open

from .clitools import zoi as zoi_here
from .queue_helpers import FAST, case_config, generate_twice, ok, run_without

# Judges say はい by default in the scripted engine: here one case's follow-up is rejected in
# turn 2 and another's answer is too short in turn 3, so conversations end in each way.
SCRIPT = (
    "engine_kwargs:\n  rules:\n"
    '    funo: {"judge@follow_up": "いいえ"}\n'
    '    anshort: {"answer#3": "短い"}\n'
)
PROMPTS = 12


def write_config(tmp_path: Path, pipeline: str = "turns: 3") -> Path:
    return case_config(tmp_path, ["a", "funo", "anshort", "b"], pipeline, SCRIPT)


def spec(run: Path) -> dict[str, object]:
    return json.loads((run / "run.json").read_text(encoding="utf-8"))["spec"]


def test_one_turn_freezes_what_runs_always_froze(tmp_path: Path) -> None:
    plain = create_or_open(tmp_path / "one", load_config(write_config(tmp_path, "")), 0, 4, 2)
    frozen = spec(plain.path)
    assert "turns" not in frozen["pipeline"] and "failed_turn" not in frozen["pipeline"]
    assert "follow_up" not in frozen["templates"] and "follow_up" not in frozen["sampling"]
    multi = create_or_open(tmp_path / "three", load_config(write_config(tmp_path)), 0, 4, 2)
    frozen = spec(multi.path)
    assert frozen["pipeline"]["turns"] == 3
    assert {"follow_up", "follow_up_judge"} <= set(frozen["templates"])
    try:
        create_or_open(plain.path, load_config(write_config(tmp_path)), 0, 4, 2)
    except RunError as exc:
        assert "pipeline.turns" in str(exc)
    else:
        raise AssertionError("a run of one turn was resumed with three")


def test_generate_twice_and_the_queue_write_the_same_conversations(tmp_path: Path) -> None:
    """Three turns: two `zoi generate` runs and enqueue -> worker -> merge write the same
    records (every turn in `--format messages`, `meta.turns`) and trace; the summary, status
    and the chunk log count records by turns and the conversations that ended early."""
    config = write_config(tmp_path)
    extra = ("--with-meta", "--format", "messages")
    written, traced, summary = generate_twice(tmp_path, config, PROMPTS, *extra)
    assert "turns     3 turns 6, 2 turns 3, 1 turn 3" in summary, summary
    assert "ended early: follow_up_rejected 3, answer_too_short 3" in summary
    records = [json.loads(line) for line in written.splitlines()]
    assert len(records) == PROMPTS
    for record in records:
        roles = [m["role"] for m in record["messages"]]
        assert roles == ["system", *["user", "assistant"] * record["meta"]["turns"]]
    traces = [json.loads(line) for line in traced.splitlines()]
    assert [t["turns"] for t in traces] == [r["meta"]["turns"] for r in records]
    assert all(t["turns"] == 1 + len(t["later_turns"]) for t in traces)
    ended = [r["meta"].get("ended") for r in records]
    assert ended.count("follow_up_rejected") == ended.count("answer_too_short") == 3
    run = tmp_path / "run"
    ok("enqueue", "-c", str(config), "--run", str(run), "--num-prompts", str(PROMPTS),
       "--chunk-size", "5")  # fmt: skip
    ok("worker", "--run", str(run), "--burst", *FAST)
    merged = tmp_path / "merged.jsonl"
    ok("merge", "--run", str(run), "-o", str(merged), "--with-meta", "--format", "messages")
    assert merged.read_bytes() == written
    status = ok("status", "--run", str(run))
    assert "\nturns     3 turns 6, 2 turns 3, 1 turn 3" in status, status
    figures = json.loads(ok("status", "--run", str(run), "--json"))
    assert figures["turns"] == {"1": 3, "2": 3, "3": 6}
    assert figures["turns_ended"] == {"follow_up_rejected": 3, "answer_too_short": 3}
    log = [json.loads(line) for line in (run / "logs" / "chunks.jsonl").read_text().splitlines()]
    assert sum(sum(line["turns"].values()) for line in log) == PROMPTS
    assert sum(sum(line["turns_ended"].values()) for line in log) == 6
    report = json.loads(zoi_report(tmp_path, "--run", str(run)))
    assert report["records"] == PROMPTS and report["turns"] == {"1": 3, "2": 3, "3": 6}
    assert report["funnel"]["turns_ended"] == {"follow_up_rejected": 3, "answer_too_short": 3}
    from_file = json.loads(zoi_report(tmp_path, str(merged)))
    assert from_file["turns"] == report["turns"]
    assert from_file["lengths"]["question"] == report["lengths"]["question"]  # first turns


def zoi_report(tmp_path: Path, *source: str) -> str:
    """`zoi report`'s JSON figures of a run or a file; its screen says which figures are the
    first turn's, and why conversations ended early where it knows."""
    out = tmp_path / "report.json"
    shown = ok("report", *source, "--json", str(out))
    figures = json.loads(out.read_text(encoding="utf-8"))
    if "turns" in figures:
        assert "(the figures below are the first turn's)" in shown
        assert ("ended early:" in shown) == bool(
            figures["funnel"] and "turns_ended" in figures["funnel"]
        )
    else:
        assert "turns" not in shown
    return out.read_text(encoding="utf-8")


def test_drop_mode_drops_the_conversations_that_end_early(tmp_path: Path) -> None:
    config = write_config(tmp_path, "turns: 3, failed_turn: drop")
    out = tmp_path / "out.jsonl"
    summary = ok("generate", "-c", str(config), "--start", "0", "--end", "8", "-o", str(out))
    assert "turn_follow_up_rejected" in summary and "turn_answer_too_short" in summary
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 4 and all(len(r["conversation"]) == 7 for r in records)
    assert "ended early" not in summary


def test_a_one_turn_run_logs_and_shows_no_turns(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_without(write_config(tmp_path, ""), run, "turns")
    merged = tmp_path / "merged.jsonl"
    ok("merge", "--run", str(run), "-o", str(merged), "--with-meta")
    assert '"turns"' not in merged.read_text(encoding="utf-8")
    assert '"turns"' not in zoi_report(tmp_path, "--run", str(run))


def test_the_preview_shows_the_follow_up_steps(tmp_path: Path) -> None:
    result = zoi_here("preview", "-c", str(write_config(tmp_path, "turns: 2")), "-n", "1")
    assert result.exit_code == 0, result.stderr
    shown = [line for line in result.stdout.splitlines() if line.startswith("--- turn 2")]
    assert [line.split(" (")[0] for line in shown] == [
        "--- turn 2 follow-up",
        "--- turn 2 follow-up judge",
        "--- turn 2 answer",
    ]
