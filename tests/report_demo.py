"""A scripted-engine run with something in every section of the report page, and its page.

Tasks carry the scripted engine's case names, so every base prompt of a task behaves alike:
some are rejected by the judge, some answers are cut off at max_tokens, come back in English,
loop, decline without the refusal marker, or follow a question with leaked scaffolding; the
domains cross them, so the coverage heat map has rows of different colours. The run's model is
the tiny model's directory (the scripted engine ignores it), so the report finds its tokenizer
and counts tokens as for a real run. The browser test opens the page this makes, and
`python -m tests.report_demo docs/report.png` remakes the README's screenshot from it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from unittest import mock

from zero_one_instruction import machine
from zero_one_instruction.report import make_report

from .queue_helpers import ENGINE, ROOT

TASKS = {
    "ok": {},
    "fine": {},
    "rejected": {"judge@width": "いいえ", "judge@fix": "いいえ"},
    "cut": {"answer": "!length:回答の途中で、説明が長くなりすぎて"},
    "english": {"answer": "The answer is written in English, not in Japanese at all."},
    "refuse": {"answer": "申し訳ありませんが、その質問にはお答えできません。"},
    "loop": {"answer": "まず準備です。" + "水と地図を必ず持っていきましょう。" * 5},
    "leak": {"flatten": "テーマ: 料理\n新しい依頼文：case=leak 献立を考えてください。"},
}
DOMAINS = ["料理", "歴史", "数学", "旅行", "音楽", "医療"]
PROMPTS = 2 * len(TASKS) * len(DOMAINS)


def _config(directory: Path, model: Path) -> Path:
    tasks = directory / "tasks.txt"
    tasks.write_text("".join(f"課題 case={name}\n" for name in TASKS), encoding="utf-8")
    domains = directory / "domains.txt"
    domains.write_text("\n".join(DOMAINS) + "\n", encoding="utf-8")
    rules = "".join(
        f"    {case}:\n" + "".join(f"      {k}: {json.dumps(v)}\n" for k, v in rule.items())
        for case, rule in TASKS.items()
        if rule
    )
    config = directory / "demo.yml"
    config.write_text(
        f"model_name: {model}\nengine: '{ENGINE}'\nbatch_size: 4\nseed: 5\n"
        f"prompts:\n  tasks_file: {tasks}\n  domains_file: {domains}\n"
        f"engine_kwargs:\n  rules:\n{rules}",
        encoding="utf-8",
    )
    return config


def make_demo_page(directory: Path, model: Path, prompts: int = PROMPTS) -> Path:
    """Run the demo (twice over every task x domain pair by default) with `model` (a tiny
    model's directory) as the run's model, and write its page."""
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "out.jsonl"
    # The workers find the scripted engine on PYTHONPATH; the environment is this process's
    # only while the run lasts (a GPU id left behind would plan GPU workers in later tests).
    workers = {"PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT)), "CUDA_VISIBLE_DEVICES": "0"}
    with mock.patch.dict(os.environ, workers):
        machine.run(_config(directory, model), out, 0, prompts, chunk_size=12)
    page = directory / "report.html"
    make_report(run_dir=Path(f"{out}.run"), html_path=page, json_path=directory / "report.json")
    return page


if __name__ == "__main__":
    import tempfile

    from zero_one_instruction.tiny_model import build_tiny_model

    from .test_report_page import screenshot

    with tempfile.TemporaryDirectory() as scratch:
        model = build_tiny_model(Path(scratch) / "model")
        screenshot(make_demo_page(Path(scratch) / "demo", model), Path(sys.argv[1]))
