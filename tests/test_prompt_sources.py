"""Base-prompt sources: determinism, cycling, hashing, and one clear line per bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from zero_one_instruction.config import Prompts, load_config
from zero_one_instruction.prompt_sources import _builtin_list, load_source
from zero_one_instruction.rundir import Run, RunError, create_or_open
from zero_one_instruction.templates import load_templates

from .clitools import assert_one_line_error, zoi
from .queue_helpers import scripted_config

BASE_PROMPT = load_templates().base_prompt


def source(**settings: object):
    return load_source(Prompts.model_validate(settings), BASE_PROMPT)


def test_builtin_source_is_a_varied_cross_product() -> None:
    builtin = source()
    assert len(builtin) >= 40 * 40
    prompts = [builtin.prompt(i) for i in range(len(builtin))]
    assert len(set(prompts)) == len(prompts)
    tasks, domains = _builtin_list("tasks_ja.txt"), _builtin_list("domains_ja.txt")
    for index in (0, 1, 55, len(builtin) - 1):  # a plain request naming its task and domain
        prompt = prompts[index]
        assert tasks[index // len(domains)] in prompt and domains[index % len(domains)] in prompt
        assert "テーマ" not in prompt and "タスク" not in prompt
    assert builtin.prompt(5) == builtin.prompt(5 + len(builtin))  # cyclic, like the original
    assert source().content_hash == builtin.content_hash


def test_tasks_domains_files(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("要約する\n\n翻訳する\n", encoding="utf-8")
    (tmp_path / "d.txt").write_text("\ufeff歴史\n料理\n数学\n", encoding="utf-8")
    src = source(
        source="tasks_domains", tasks_file=tmp_path / "t.txt", domains_file=tmp_path / "d.txt"
    )
    assert len(src) == 6
    assert "歴史" in src.prompt(0) and "要約する" in src.prompt(0)
    assert "\ufeff" not in src.prompt(0)
    assert "数学" in src.prompt(5) and "翻訳する" in src.prompt(5)
    assert src.prompt(6) == src.prompt(0)


def test_prompt_files_txt_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("一つ目\n  \n二つ目\n", encoding="utf-8")
    txt = source(source="file", file=tmp_path / "p.txt")
    assert [txt.prompt(i) for i in range(3)] == ["一つ目", "二つ目", "一つ目"]
    lines = [json.dumps({"q": f"質問{i}", "other": 1}, ensure_ascii=False) for i in range(3)]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    jsonl = source(source="file", file=tmp_path / "p.jsonl", field="q")
    assert [jsonl.prompt(i) for i in range(4)] == ["質問0", "質問1", "質問2", "質問0"]
    with pytest.raises(IndexError):
        jsonl.prompt(-1)


def test_only_newlines_split_prompts(tmp_path: Path) -> None:
    odd = "改行\u2028区切り\x0cと\x85制御文字"
    (tmp_path / "p.txt").write_text(f"{odd}\r\n二つ目\n", encoding="utf-8")
    assert list(source(file=tmp_path / "p.txt").items) == [odd, "二つ目"]
    line = json.dumps({"prompt": odd}, ensure_ascii=False)
    (tmp_path / "p.jsonl").write_text(line + "\n", encoding="utf-8")
    assert list(source(file=tmp_path / "p.jsonl").items) == [odd]


def test_content_hash_follows_content(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("a\nb\n", encoding="utf-8")
    first = source(source="file", file=path).content_hash
    path.write_text("a\nc\n", encoding="utf-8")
    assert source(source="file", file=path).content_hash != first
    path.write_text("a\nb\n", encoding="utf-8")
    assert source(source="file", file=path).content_hash == first


def test_a_separator_inside_a_prompt_does_not_hash_like_two_prompts(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes(b"alpha\0beta\n")
    joined = source(file=path).content_hash
    path.write_bytes(b"alpha\nbeta\n")
    assert source(file=path).content_hash != joined


def _prompt_file_run(tmp_path: Path, text: bytes) -> tuple[Path, Run]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(text)
    config = scripted_config(tmp_path)
    config.write_text(config.read_text() + f"prompts: {{file: '{prompts}'}}\n")
    return prompts, create_or_open(tmp_path / "run", load_config(config), 0, 4, 2)


def test_a_run_refuses_its_prompts_split_differently(tmp_path: Path) -> None:
    prompts, run = _prompt_file_run(tmp_path, b"alpha\0beta\n")
    assert len(run.source()) == 1
    prompts.write_bytes(b"alpha\nbeta\n")
    with pytest.raises(RunError, match="changed since the run was created"):
        run.source()


def test_a_run_compares_the_prompt_count_as_well_as_the_hash(tmp_path: Path) -> None:
    _, run = _prompt_file_run(tmp_path, b"alpha\nbeta\n")
    frozen = {**run.spec, "prompts": {**run.spec["prompts"], "count": 3}}
    with pytest.raises(RunError, match="changed since the run was created"):
        Run(run.path, run.config, frozen, run.fingerprint).source()


BAD_SOURCES = [
    ("missing.txt", None, "base-prompt file not found"),
    ("blank.txt", b"\n   \n\n", "no non-blank lines"),
    ("bad.jsonl", b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": \n', "line 3: invalid JSON"),
    ("field.jsonl", b'{"prompt": "a"}\n{"text": "b"}\n', "line 2: no non-empty string field"),
    ("number.jsonl", b'{"prompt": 12}\n', "line 1: no non-empty string field 'prompt'"),
    ("bytes.txt", "一\n二\n三\n".encode() + b"\xff\xfe\n", "line 4: not valid UTF-8"),
    ("empty.jsonl", b"", "no records"),
    (
        "surrogate.jsonl",
        b'{"prompt": "a"}\n{"prompt": "\\ud800"}\n',
        "line 2: field 'prompt' holds a lone surrogate",
    ),
    ("deep.jsonl", b'{"prompt": ' + b"[" * 100_000 + b"\n", "line 1: JSON nested too deeply"),
]


@pytest.mark.parametrize(("name", "content", "fragment"), BAD_SOURCES)
def test_bad_prompt_file_gives_one_line_and_exit_2(
    tmp_path: Path, name: str, content: bytes | None, fragment: str
) -> None:
    if content is not None:
        (tmp_path / name).write_bytes(content)
    config = tmp_path / "c.yml"
    config.write_text(f"model_name: m\nprompts: {{source: file, file: {name}}}\n", "utf-8")
    line = assert_one_line_error(zoi("config", "check", str(config)), fragment)
    assert name in line


def test_tasks_domains_needs_both_files(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="needs domains_file and tasks_file"):
        source(source="tasks_domains", tasks_file=tmp_path / "t.txt")
