"""Bad input to the queue commands: one clear line, a non-zero exit, nothing changed."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from .clitools import assert_one_line_error, zoi
from .queue_helpers import password_server, scripted_config


@pytest.fixture
def made_run(tmp_path: Path) -> tuple[Path, Path]:
    config = scripted_config(tmp_path)
    run = tmp_path / "run"
    result = zoi("enqueue", "-c", str(config), "--run", str(run), "--num-prompts", "20")
    assert result.exit_code == 0, result.stderr
    return config, run


def test_missing_and_foreign_run_directories(tmp_path: Path) -> None:
    assert_one_line_error(zoi("worker", "--run", str(tmp_path / "nope")), "does not exist")
    assert_one_line_error(zoi("status", "--run", str(tmp_path)), "not a run directory")
    out = str(tmp_path / "o.jsonl")
    assert_one_line_error(
        zoi("merge", "--run", str(tmp_path / "nope"), "-o", out), "does not exist"
    )


def test_run_of_another_configuration_is_refused(
    made_run: tuple[Path, Path], tmp_path: Path
) -> None:
    config, run = made_run
    other = tmp_path / "other.yml"
    other.write_text(
        config.read_text(encoding="utf-8") + "pipeline: {depth_steps: 2}\ntemperature: 0.5\n",
        encoding="utf-8",
    )
    before = (run / "run.json").read_bytes()
    line = assert_one_line_error(
        zoi("enqueue", "-c", str(other), "--run", str(run), "--num-prompts", "20"),
        "belongs to another configuration",
        "pipeline.depth_steps",
        "temperature",
    )
    assert "differ" in line
    assert (run / "run.json").read_bytes() == before
    bigger = zoi("enqueue", "-c", str(config), "--run", str(run), "--num-prompts", "40")
    assert_one_line_error(bigger, "range.end")
    assert_one_line_error(zoi("worker", "--run", str(run), "-c", str(other)), "depth_steps")
    engine = tmp_path / "engine.yml"
    engine.write_text(
        config.read_text(encoding="utf-8").replace("none: {}", "none: {width: x}"), encoding="utf-8"
    )
    assert_one_line_error(
        zoi("worker", "--run", str(run), "-c", str(engine)), "engine_kwargs.rules"
    )


def test_hardware_settings_may_differ_per_machine(
    made_run: tuple[Path, Path], tmp_path: Path
) -> None:
    config, run = made_run
    other = tmp_path / "machine.yml"
    text = config.read_text(encoding="utf-8").replace("batch_size: 4", "batch_size: 16")
    other.write_text(text + "gpu_memory_utilization: 0.5\n", encoding="utf-8")
    again = zoi("enqueue", "-c", str(other), "--run", str(run), "--num-prompts", "20")
    assert again.exit_code == 0, again.stderr
    assert "enqueued 0" in again.stdout


def test_corrupt_run_file(made_run: tuple[Path, Path]) -> None:
    _, run = made_run
    path = run / "run.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["spec"]["temperature"] = 0.1  # edited by hand: no longer matches its fingerprint
    path.write_text(json.dumps(data), encoding="utf-8")
    assert_one_line_error(zoi("status", "--run", str(run)), "corrupt run file", "fingerprint")
    path.write_text("{not json", encoding="utf-8")
    assert_one_line_error(zoi("worker", "--run", str(run)), "run.json: corrupt run file")


def test_a_run_made_by_an_older_zoi_is_named_as_such(made_run: tuple[Path, Path]) -> None:
    """Its prompt hash and template rules differ from today's: saying "another configuration"
    would send the user looking for a change they never made."""
    _, run = made_run
    path = run / "run.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["format"] = 1
    path.write_text(json.dumps(data), encoding="utf-8")
    for command in (("status", "--run", str(run)), ("worker", "--run", str(run))):
        assert_one_line_error(zoi(*command), "made by an older zoi (run format 1", "new run")


def test_merge_never_writes_into_a_run_or_over_its_inputs(
    made_run: tuple[Path, Path], tmp_path: Path
) -> None:
    _, run = made_run
    before = (run / "run.json").read_bytes()
    (run / "shards" / "keep.jsonl").write_text("shard\n", encoding="utf-8")
    inside = [run / "run.json", run / "shards" / "keep.jsonl", run / "new.jsonl"]
    for output in inside:
        result = zoi("merge", "--run", str(run), "-o", str(output), "--allow-partial")
        assert_one_line_error(result, "is inside the run directory")
    assert (run / "run.json").read_bytes() == before
    assert (run / "shards" / "keep.jsonl").read_text(encoding="utf-8") == "shard\n"
    assert not (run / "new.jsonl").exists()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("一つ目\n二つ目\n", encoding="utf-8")
    config = scripted_config(tmp_path)
    config.write_text(config.read_text() + "prompts: {file: prompts.txt}\n", encoding="utf-8")
    other = tmp_path / "other"
    made = zoi("enqueue", "-c", str(config), "--run", str(other), "--num-prompts", "2")
    assert made.exit_code == 0, made.stderr
    result = zoi("merge", "--run", str(other), "-o", str(prompts), "--allow-partial")
    assert_one_line_error(result, "is the base-prompt file")
    assert prompts.read_text(encoding="utf-8") == "一つ目\n二つ目\n"


def test_merge_replaces_only_its_own_output_unless_told(
    made_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """merge cannot know the config the run was made from (run.json does not name its path),
    so an existing file it did not write, the config included, needs --overwrite; its own
    output from an earlier merge of this run is replaced freely."""
    config, run = made_run
    before = config.read_bytes()
    refused = zoi("merge", "--run", str(run), "-o", str(config), "--allow-partial")
    assert_one_line_error(refused, str(config), "already exists (pass --overwrite")
    assert config.read_bytes() == before
    out = tmp_path / "out.jsonl"
    for _ in range(2):  # the second merge replaces the first one's file
        assert zoi("merge", "--run", str(run), "-o", str(out), "--allow-partial").exit_code == 0
    out.write_text("edited by hand\n", encoding="utf-8")
    refused = zoi("merge", "--run", str(run), "-o", str(out), "--allow-partial")
    assert_one_line_error(refused, "already exists (pass --overwrite")


def test_merge_writes_through_a_symlink_and_keeps_the_mode(
    made_run: tuple[Path, Path], tmp_path: Path
) -> None:
    _, run = made_run
    target, link = tmp_path / "target.jsonl", tmp_path / "link.jsonl"
    target.write_text("old\n", encoding="utf-8")
    target.chmod(0o640)
    link.symlink_to(target)
    merge = ("merge", "--run", str(run), "-o", str(link), "--allow-partial")
    assert_one_line_error(zoi(*merge), "already exists (pass --overwrite")
    assert target.read_text(encoding="utf-8") == "old\n"
    assert zoi(*merge, "--overwrite").exit_code == 0
    assert link.is_symlink() and target.read_bytes() == b""
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_a_new_run_directory_is_private_and_an_existing_one_keeps_its_mode(
    tmp_path: Path,
) -> None:
    config = scripted_config(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o750)
    old = os.umask(0o022)
    try:
        for run in (tmp_path / "new", shared):
            made = zoi("enqueue", "-c", str(config), "--run", str(run), "--num-prompts", "2")
            assert made.exit_code == 0, made.stderr
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    assert stat.S_IMODE(shared.stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "new" / "run.json").stat().st_mode) == 0o644


def test_bad_redis_urls(made_run: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = made_run
    status = ["status", "--run", str(run), "--redis-url"]
    with password_server(tmp_path, "s3cret") as port:
        _check_urls(status, port)


def _check_urls(status: list[str], port: int) -> None:
    assert_one_line_error(zoi(*status, "redis://127.0.0.1:1/0"), "cannot reach Redis", code=1)
    assert_one_line_error(zoi(*status, "http://example.com"), "unsupported scheme 'http'")
    wrong = f"redis://:wrong-password@127.0.0.1:{port}/0"
    line = assert_one_line_error(zoi(*status, wrong), "authentication failed")
    assert "wrong-password" not in line and ":***@" in line
    right = zoi(*status, f"redis://:s3cret@127.0.0.1:{port}/0")
    assert right.exit_code == 0, right.stderr
    assert "queued 0" in right.stdout  # a different Redis: the run's chunks are not queued there


def test_passwords_are_never_shown() -> None:
    from zero_one_instruction.broker import redact

    assert redact("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact("redis://u:pw@h/0?password=x&db=1") == "redis://u:***@h/0?password=***&db=1"
    assert redact("unix:///run/r.sock?password=s3cret") == "unix:///run/r.sock?password=***"
    assert redact("rediss://h:6380/2") == "rediss://h:6380/2"


def test_malformed_redis_urls_never_show_the_password(made_run: tuple[Path, Path]) -> None:
    """A password with URL delimiters in it, or a port that is not a number: one line, exit
    2, and the secret nowhere in it."""
    _, run = made_run
    status = ["status", "--run", str(run), "--redis-url"]
    for url in (
        "redis://:se/cret@127.0.0.1:6379/0",
        "redis://:se#cret@127.0.0.1:6379/0",
        "redis://:se?cret@127.0.0.1:6379/0",
        "redis://user:12/cret@127.0.0.1/0",
    ):
        line = assert_one_line_error(zoi(*status, url), "percent-encode")
        assert "cret" not in line and ":***@127.0.0.1" in line, line
    line = assert_one_line_error(
        zoi(*status, "redis://:secret@127.0.0.1:abc/0"), "port must be a number"
    )
    assert "secret" not in line
    line = assert_one_line_error(zoi(*status, "redis://:secret@[::1/0"), "Invalid IPv6")
    assert "secret" not in line


def test_redacted_ipv6_hosts_keep_their_brackets() -> None:
    from zero_one_instruction.broker import redact

    assert redact("redis://:pw@[::1]:6379/0") == "redis://:***@[::1]:6379/0"
    assert redact("rediss://u:pw@[fe80::1%25eth0]/2") == "rediss://u:***@[fe80::1%25eth0]/2"
    assert redact("redis://:p@ss/w#rd@h:1/0?Password=x") == "redis://:***@h:1/0?Password=***"
    assert redact("redis://:p?w@h/0?password=x&db=1") == "redis://:***@h/0?password=***&db=1"


def test_redis_url_from_the_environment(made_run: tuple[Path, Path]) -> None:
    from click.testing import CliRunner

    from zero_one_instruction.cli import main

    _, run = made_run
    result = CliRunner(env={"ZOI_REDIS_URL": "redis://127.0.0.1:1/0"}).invoke(
        main, ["status", "--run", str(run)]
    )
    assert_one_line_error(result, "cannot reach Redis at redis://127.0.0.1:1/0", code=1)


def test_bad_enqueue_flags(tmp_path: Path) -> None:
    config, run = scripted_config(tmp_path), str(tmp_path / "run")
    base = ["enqueue", "-c", str(config), "--run", run]
    assert_one_line_error(zoi(*base, "--num-prompts", "0"), "'--num-prompts'")
    assert_one_line_error(zoi(*base, "--num-prompts", "5", "--start", "0"), "not both")
    assert_one_line_error(zoi(*base, "--start", "3"), "give --num-prompts N, or both")
    assert_one_line_error(zoi(*base, "--start", "3", "--end", "3"), "--end")
    assert_one_line_error(zoi(*base, "--num-prompts", "5", "--chunk-size", "0"), "'--chunk-size'")
    assert not (tmp_path / "run").exists()


def _limited(memory: int) -> None:
    """Cap the child's address space: on failure it must not take the machine's memory."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))


@pytest.mark.parametrize("command", ["enqueue", "run"])
def test_a_range_of_too_many_chunks_is_refused_before_anything_is_written(
    tmp_path: Path, command: str
) -> None:
    import subprocess

    from .queue_helpers import ENV, ZOI

    config, run = scripted_config(tmp_path), tmp_path / "run"
    args = [ZOI, command, "-c", str(config), "--run", str(run), "--chunk-size", "1"]
    if command == "run":
        args += ["-o", str(tmp_path / "out.jsonl")]
    done = subprocess.run(
        [*args, "--num-prompts", "1000000000000"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
        preexec_fn=lambda: _limited(4 << 30),
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("zoi: error: ")]
    assert len(errors) == 1 and done.stderr.rstrip().endswith(errors[0]), done.stderr
    assert "1,000,000,000,000 chunks" in errors[0] and "--chunk-size 1000000 or more" in errors[0]
    assert "Traceback" not in done.stderr
    assert not run.exists() and not (tmp_path / "out.jsonl").exists()
