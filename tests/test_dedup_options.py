"""`--dedup [exact|near]` and `--near-threshold` on the command line: plain `--dedup` is
still exact, `--dedup near` writes the sidecar, and a threshold without near is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .clitools import assert_one_line_error, zoi
from .scripted_engine import ENGINE

SEASONS = "日本の四季それぞれの特徴と、季節ごとの代表的な行事について詳しく説明してください。"
# Base prompt case -> its question: two rewordings of one question and one other.
QUESTIONS = {"a": SEASONS, "b": SEASONS.replace("説明", "解説"), "c": "別の質問です"}


def _config(tmp_path: Path) -> Path:
    (tmp_path / "prompts.txt").write_text(
        "".join(f"case={case}\n" for case in QUESTIONS), encoding="utf-8"
    )
    rules = {case: {"flatten": f"{q} case={case}"} for case, q in QUESTIONS.items()}
    config = tmp_path / "c.yml"
    config.write_text(
        f"model_name: scripted\nengine: '{ENGINE}'\nprompts: {{file: prompts.txt}}\n"
        f"engine_kwargs: {{rules: {json.dumps(rules, ensure_ascii=False)}}}\n",
        encoding="utf-8",
    )
    return config


def _generate(tmp_path: Path, *options: str) -> list[str]:
    """The questions `zoi generate` writes with `options`, without their case marks."""
    out = tmp_path / "out.jsonl"
    args = ["generate", "-c", str(_config(tmp_path)), "--start", "0", "--end", "3"]
    result = zoi(*args, "-o", str(out), "--overwrite", *options)
    assert result.exit_code == 0, result.output
    lines = out.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["input"].split(" case=")[0] for line in lines]


def test_plain_dedup_is_exact_and_keeps_rewordings(tmp_path: Path) -> None:
    assert _generate(tmp_path, "--dedup", "--id-start", "3") == list(QUESTIONS.values())
    assert not (tmp_path / "out.duplicates.jsonl").exists()


def test_generate_with_near_dedup_writes_the_sidecar(tmp_path: Path) -> None:
    assert _generate(tmp_path, "--dedup", "near") == [SEASONS, "別の質問です"]
    (removed,) = [json.loads(line) for line in (tmp_path / "out.duplicates.jsonl").open()]
    assert (removed["duplicate_of"], removed["kind"]) == ("record_0", "near")
    assert removed["input"].startswith(QUESTIONS["b"])


def test_a_higher_threshold_keeps_the_rewording(tmp_path: Path) -> None:
    kept = _generate(tmp_path, "--dedup", "near", "--near-threshold", "0.95")
    assert kept == list(QUESTIONS.values())


@pytest.mark.parametrize("dedup", [[], ["--dedup"], ["--dedup", "exact"]])
def test_near_threshold_without_near_is_refused(tmp_path: Path, dedup: list[str]) -> None:
    args = ["generate", "-c", str(_config(tmp_path)), "--start", "0", "--end", "3"]
    result = zoi(*args, "-o", str(tmp_path / "o.jsonl"), *dedup, "--near-threshold", "0.8")
    assert_one_line_error(result, "--near-threshold goes with --dedup near")
    assert not (tmp_path / "o.jsonl").exists()
