"""Text that UTF-8 cannot encode, from the engine: one record is dropped and counted, the
chunk and the run go on."""

from __future__ import annotations

import json
from pathlib import Path

from .queue_helpers import enqueue_run, ok, stop, worker
from .scripted_engine import ENGINE

N, CHUNK, CUT = 12, 4, 5


def _config(tmp_path: Path) -> Path:
    """Prompt CUT's answer ends in half an emoji (a lone surrogate); the others are fine."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "".join(f"case={'cut' if i == CUT else f'ok{i}'}\n" for i in range(N)), encoding="utf-8"
    )
    config = tmp_path / "cut.yml"
    config.write_text(
        f"model_name: scripted\nengine: '{ENGINE}'\nbatch_size: 4\nseed: 5\n"
        f"prompts: {{source: file, file: {prompts}}}\n"
        "engine_kwargs:\n  rules:\n    cut: {answer: '!cut:回答です。詳しく説明します'}\n",
        encoding="utf-8",
    )
    return config


def test_a_cut_character_drops_one_record_not_the_chunk(tmp_path: Path) -> None:
    config, run = _config(tmp_path), tmp_path / "run"
    enqueue_run(config, run, N, CHUNK)
    proc = worker(run, "--burst")
    assert proc.wait(timeout=120) == 0, stop(proc)
    marker = json.loads((run / "shards" / "0000000004-0000000008.done").read_text("utf-8"))
    assert marker["funnel"]["dropped"] == {"bad_text": 1}
    rejects = (run / "shards" / "0000000004-0000000008.rejects.jsonl").read_text("utf-8")
    assert [json.loads(line)["index"] for line in rejects.splitlines()] == [CUT]
    out = tmp_path / "out.jsonl"
    ok("merge", "--run", str(run), "-o", str(out))
    assert len(out.read_text("utf-8").splitlines()) == N - 1


def test_generate_drops_the_record_with_a_cut_character(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    config = str(_config(tmp_path))
    report = ok("generate", "-c", config, "--start", "0", "--end", str(N), "-o", str(out))
    assert "bad_text" in report
    assert len(out.read_text("utf-8").splitlines()) == N - 1
