"""The `zoi` commands end to end with the scripted engine."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from zero_one_instruction import __version__

from .clitools import assert_one_line_error, zoi
from .scripted_engine import ENGINE

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [
    [],
    ["config"],
    ["config", "show"],
    ["config", "check"],
    ["generate"],
    ["preview"],
    ["tiny-model"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "zoi")
def test_every_command_explains_itself(command: list[str]) -> None:
    result = zoi(*command, "--help")
    assert result.exit_code == 0
    assert "Usage: " in result.stdout
    description = result.stdout.split("\n\n")[1]
    assert len(description.split()) >= 6, description


def test_version() -> None:
    assert zoi("--version").stdout.strip() == f"zoi, version {__version__}"


def write_config(tmp_path: Path, extra: str = "") -> Path:
    """Built-in prompts tagged `case=...` by a prompts file, and the scripted engine."""
    cases = ["ok", "ok", "final", "ok", "short", "ok"]
    (tmp_path / "prompts.txt").write_text(
        "".join(f"質問 {i} case={c}\n" for i, c in enumerate(cases)), encoding="utf-8"
    )
    config = tmp_path / "c.yml"
    config.write_text(
        f"model_name: scripted\nengine: '{ENGINE}'\nprompts: {{source: file, file: prompts.txt}}\n"
        "engine_kwargs:\n  rules:\n    final: {judge@flatten: いいえ}\n    short: {answer: 短い}\n"
        + extra,
        encoding="utf-8",
    )
    return config


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_generate_writes_the_original_schema_in_index_order(tmp_path: Path) -> None:
    config, out, trace = write_config(tmp_path), tmp_path / "out.jsonl", tmp_path / "trace.jsonl"
    result = zoi(
        "generate",
        "-c",
        str(config),
        "--start",
        "0",
        "--end",
        "8",
        "-o",
        str(out),
        "--id-start",
        "100",
        "--trace",
        str(trace),
    )
    assert result.exit_code == 0, result.stderr
    records = read_jsonl(out)
    assert [r["id"] for r in records] == [f"record_{i}" for i in range(100, 106)]
    for record in records:
        assert set(record) == {"id", "input", "output", "conversation"}
        system, human, gpt = record["conversation"]
        assert system["from"] == "system" and "日本語" in system["value"]
        assert human == {"from": "human", "value": record["input"]}
        assert gpt == {"from": "gpt", "value": record["output"]}
    # prompts 0..7 cycle over the 6 cases; 2 ("final") and 4 ("short") are dropped.
    kept_prompts = [0, 1, 3, 5, 6, 7]
    assert all(r["input"].startswith("flatten|case=ok 質問") for r in records)
    assert all(r["output"].startswith("回答です。ケースok") for r in records)
    outcomes = read_jsonl(trace)
    assert [o["index"] for o in outcomes] == list(range(8))
    assert [o["index"] for o in outcomes if o["drop_reason"] is None] == kept_prompts
    assert {o["drop_reason"] for o in outcomes} == {None, "final_rejected", "answer_too_short"}
    assert "kept      6 (75.0%)" in result.stdout
    assert "final_rejected" in result.stdout and "answer_too_short" in result.stdout
    assert not list(tmp_path.glob("*.tmp"))


def test_generate_is_reproducible(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    for name in ("a.jsonl", "b.jsonl"):
        zoi("generate", "-c", str(config), "--start", "3", "--end", "9", "-o", str(tmp_path / name))
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").stat().st_size > 0


def test_generate_refuses_to_clobber_and_checks_its_arguments(tmp_path: Path) -> None:
    config, out = write_config(tmp_path), tmp_path / "out.jsonl"
    out.write_text("precious\n", encoding="utf-8")
    base = ["generate", "-c", str(config), "-o", str(out)]
    assert_one_line_error(zoi(*base, "--start", "0", "--end", "2"), "already exists")
    assert out.read_text(encoding="utf-8") == "precious\n"
    assert zoi(*base, "--start", "0", "--end", "2", "--overwrite").exit_code == 0
    assert len(read_jsonl(out)) == 2
    missing_dir = ["generate", "-c", str(config), "-o", str(tmp_path / "no" / "o.jsonl")]
    assert_one_line_error(zoi(*missing_dir, "--start", "0", "--end", "2"), "does not exist")
    assert_one_line_error(zoi(*base, "--start", "5", "--end", "5", "--overwrite"), "--end")
    assert_one_line_error(zoi(*base, "--start", "-1", "--end", "5", "--overwrite"), "'--start'")
    assert_one_line_error(zoi(*base, "--start", "a", "--end", "5"), "'a' is not a valid integer")
    assert_one_line_error(zoi(*base, "--end", "5"), "Missing option '--start'")
    id_start = zoi(*base, "--start", "0", "--end", "2", "--id-start", "-5", "--overwrite")
    assert_one_line_error(id_start, "'--id-start'")
    same = zoi(*base, "--start", "0", "--end", "2", "--trace", str(out), "--overwrite")
    assert_one_line_error(same, "--trace must not be the output file")
    unwritable = [
        "generate",
        "-c",
        str(config),
        "-o",
        "/proc/zoi.jsonl",
        "--start",
        "0",
        "--end",
        "1",
    ]
    assert_one_line_error(zoi(*unwritable), "/proc/zoi.jsonl")
    assert_one_line_error(zoi("preview", "-c", str(config), "-n", "0"), "'-n'")
    assert_one_line_error(zoi("nonsense"), "No such command 'nonsense'")


def test_generate_never_overwrites_one_of_its_inputs(tmp_path: Path) -> None:
    (tmp_path / "t.yml").write_text("{}\n", encoding="utf-8")
    (tmp_path / "chat.jinja").write_text("{{ messages }}\n", encoding="utf-8")
    config = write_config(tmp_path, "templates: t.yml\nchat_template: chat.jinja\n")
    victims = {
        config: "config file",
        tmp_path / "prompts.txt": "base-prompt file",
        tmp_path / "t.yml": "templates file",
        tmp_path / "chat.jinja": "chat-template file",
    }
    for victim, label in victims.items():
        before = victim.read_bytes()
        for flag in ("-o", "--trace"):
            other = str(tmp_path / "other.jsonl")
            where = ["-o", str(victim)] if flag == "-o" else ["-o", other, "--trace", str(victim)]
            result = zoi("generate", "-c", str(config), "--start", "0", "--end", "2", *where)
            assert_one_line_error(result, label, "an input is never overwritten")
            overwrite = zoi(
                "generate", "-c", str(config), "--start", "0", "--end", "2", *where, "--overwrite"
            )
            assert_one_line_error(overwrite, label)
        assert victim.read_bytes() == before
    hard = tmp_path / "hard.yml"
    os.link(config, hard)
    result = zoi("generate", "-c", str(config), "--start", "0", "--end", "1", "-o", str(hard))
    assert_one_line_error(result, "is the config file")
    (tmp_path / "tasks.txt").write_text("要約する\n", encoding="utf-8")
    (tmp_path / "domains.txt").write_text("歴史\n", encoding="utf-8")
    crossed = tmp_path / "crossed.yml"
    crossed.write_text(
        f"model_name: scripted\nengine: '{ENGINE}'\n"
        "prompts: {tasks_file: tasks.txt, domains_file: domains.txt}\n",
        encoding="utf-8",
    )
    for name, label in (("tasks.txt", "is the tasks file"), ("domains.txt", "is the domains file")):
        where = ["-o", str(tmp_path / name), "--overwrite"]
        result = zoi("generate", "-c", str(crossed), "--start", "0", "--end", "1", *where)
        assert_one_line_error(result, label)
    assert (tmp_path / "tasks.txt").read_text(encoding="utf-8") == "要約する\n"


def test_generate_writes_through_a_symlink_to_its_target(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    base = ["generate", "-c", str(config), "--start", "0", "--end", "2", "--overwrite"]
    target, link = tmp_path / "target.jsonl", tmp_path / "link.jsonl"
    target.write_text("old\n", encoding="utf-8")
    link.symlink_to(target.name)
    assert zoi(*base, "-o", str(link)).exit_code == 0
    assert link.is_symlink() and len(read_jsonl(target)) == 2
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to("made.jsonl")
    assert zoi(*base, "-o", str(dangling)).exit_code == 0
    assert dangling.is_symlink() and len(read_jsonl(tmp_path / "made.jsonl")) == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_generate_refuses_a_device_or_a_link_to_one(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    base = ["generate", "-c", str(config), "--start", "0", "--end", "1", "--overwrite"]
    stdout = tmp_path / "stdout"
    stdout.symlink_to("/dev/stdout")
    assert_one_line_error(zoi(*base, "-o", str(stdout)), str(stdout))
    assert stdout.is_symlink() and os.readlink(stdout) == "/dev/stdout"
    fifo = tmp_path / "fifo"  # not /dev/null: a regression must not be able to replace it
    os.mkfifo(fifo)
    assert_one_line_error(zoi(*base, "-o", str(fifo)), "not a regular file")
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    loop = tmp_path / "loop"
    loop.symlink_to(loop.name)
    assert_one_line_error(zoi(*base, "-o", str(loop)), "symbolic links")


def test_failed_run_writes_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path, "pipeline: {depth_steps: 0}\n")
    text = config.read_text(encoding="utf-8").replace(
        "short: {answer: 短い}", "short: {answer: '!dead'}"
    )
    config.write_text(text, encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = zoi("generate", "-c", str(config), "--start", "0", "--end", "6", "-o", str(out))
    assert_one_line_error(result, "engine failed", "scripted engine death", code=1)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


class BrokenEngine:
    def __init__(self, config: object) -> None:
        raise RuntimeError("the plug-in could not connect")

    async def complete(self, request: object) -> None:
        return None

    def close(self) -> None:
        return None


def test_unexpected_engine_errors_are_one_line(tmp_path: Path) -> None:
    config = tmp_path / "c.yml"
    config.write_text("model_name: m\nengine: 'tests.test_cli:BrokenEngine'\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = zoi("generate", "-c", str(config), "--start", "0", "--end", "2", "-o", str(out))
    assert_one_line_error(result, "RuntimeError: the plug-in could not connect", code=1)
    assert not out.exists()


def test_preview_shows_every_step_and_verdict(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = zoi("preview", "-c", str(config), "-n", "3")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert out.count("=== base prompt") == 3
    for label in (
        "--- width",
        "--- judge",
        "--- depth 1",
        "--- flatten",
        "--- final judge",
        "--- answer",
    ):
        assert label in out
    assert "=> dropped: final_rejected" in out and out.count("=> kept") == 2
    assert "kept 2 of 3" in out
    as_json = zoi("preview", "-c", str(config), "-n", "2", "--start", "2", "--json")
    outcomes = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [o["index"] for o in outcomes] == [2, 3]
    assert outcomes[0]["steps"][-1]["verdict"] is False


def test_console_script_runs_as_a_process(tmp_path: Path) -> None:
    """The installed `zoi` entry point, as a user runs it, with the scripted engine."""
    config, out = write_config(tmp_path), tmp_path / "out.jsonl"
    zoi_bin = Path(sys.executable).parent / "zoi"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [str(zoi_bin), "generate", "-c", str(config), "--start", "0", "--end", "4", "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert len(read_jsonl(out)) == 3
    bad = subprocess.run(
        [str(zoi_bin), "config", "check", str(tmp_path / "nope.yml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "not found" in bad.stderr


def zoi_process(*args: str, **popen: Any) -> subprocess.Popen[str]:
    """The installed `zoi` entry point, running this checkout's code."""
    zoi_bin = Path(sys.executable).parent / "zoi"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([str(zoi_bin), *args], text=True, env=env, **popen)


def test_preview_into_head_exits_quietly(tmp_path: Path) -> None:
    """`zoi preview --json -n 300 | head -1`: far more than a pipe buffer, reader gone early."""
    config = write_config(tmp_path)
    proc = zoi_process(
        "preview",
        "-c",
        str(config),
        "-n",
        "300",
        "--json",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = json.loads(proc.stdout.readline())
    assert first["index"] == 0
    proc.stdout.close()
    assert proc.wait(timeout=120) == 1
    assert proc.stderr.read() == ""


def closed_pipe() -> int:
    """The write end of a pipe whose reader has already gone."""
    read, write = os.pipe()
    os.close(read)
    return write


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["config", "show", "{config}"],
        ["config", "check", "{config}"],
        ["preview", "-c", "{config}", "-n", "4"],
        ["preview", "-c", "{config}", "-n", "4", "--json"],
        ["generate", "-c", "{config}", "--start", "0", "--end", "6", "-o", "{out}"],
    ],
    ids=["help", "config-show", "config-check", "preview", "preview-json", "generate"],
)
def test_every_command_exits_quietly_into_a_closed_pipe(tmp_path: Path, args: list[str]) -> None:
    config, out = write_config(tmp_path), tmp_path / "out.jsonl"
    stdout = closed_pipe()
    try:
        proc = zoi_process(
            *(a.format(config=config, out=out) for a in args),
            stdout=stdout,
            stderr=subprocess.PIPE,
        )
    finally:
        os.close(stdout)
    _, stderr = proc.communicate(timeout=120)
    assert (proc.returncode, stderr) == (1, "")
    if "generate" in args:
        assert len(read_jsonl(out)) == 4  # the records were written before the summary


class PipeBreakingEngine(BrokenEngine):
    """An engine whose own connection breaks: not the user's closed stdout."""

    def __init__(self, config: object) -> None:
        raise BrokenPipeError(32, "Broken pipe to the engine server")


def test_a_broken_pipe_elsewhere_is_still_an_error(tmp_path: Path) -> None:
    config = tmp_path / "c.yml"
    config.write_text(
        "model_name: m\nengine: 'tests.test_cli:PipeBreakingEngine'\n", encoding="utf-8"
    )
    proc = zoi_process("preview", "-c", str(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and stdout == ""
    assert stderr.startswith("zoi: error: BrokenPipeError: ") and stderr.count("\n") == 1
    assert "engine server" in stderr
