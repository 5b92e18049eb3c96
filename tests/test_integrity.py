"""Never mix two configurations: shards of another run, damaged markers, the frozen chat
template, hardware settings that cannot reach the data, and engine arguments checked early."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from zero_one_instruction import shards
from zero_one_instruction.config import Config
from zero_one_instruction.engines.base import Completion, Request, RequestError
from zero_one_instruction.engines.vllm import read_chat_template
from zero_one_instruction.pipeline import Outcome, StepTrace
from zero_one_instruction.rundir import Chunk, open_run

from . import queue_helpers
from .clitools import assert_one_line_error
from .clitools import zoi as zoi_inline
from .queue_helpers import (
    ROOT,
    enqueue_run,
    ok,
    requests_per_seed,
    scripted_config,
    stop,
    worker,
    zoi,
)
from .scripted_engine import ENGINE, ScriptedEngine

N, CHUNK = 10, 5


def run_args(config: Path, out: Path, run: Path) -> list[str]:
    return queue_helpers.run_args(config, out, N, CHUNK, "--run", str(run))


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


def vllm_config(tmp_path: Path, body: str) -> Path:
    """A config for the vLLM engine; checking it never loads a model."""
    config = tmp_path / "vllm.yml"
    config.write_text(f"model_name: some/model\n{body}", encoding="utf-8")
    return config


@pytest.mark.parametrize(
    "key", ["model", "seed", "revision", "tokenizer", "load_format", "max_model_len"]
)
def test_hardware_kwargs_that_could_change_the_data_are_refused(tmp_path: Path, key: str) -> None:
    config = vllm_config(tmp_path, f"hardware_kwargs: {{{key}: 7}}\n")
    assert_one_line_error(
        zoi_inline("config", "check", str(config)), f"hardware_kwargs.{key}", "engine_kwargs"
    )


def test_a_worker_cannot_bring_data_settings_as_hardware(tmp_path: Path) -> None:
    config = vllm_config(tmp_path, "")
    run = tmp_path / "run"
    from zero_one_instruction.config import load_config
    from zero_one_instruction.rundir import create_or_open

    create_or_open(run, load_config(config), 0, 4, 2)
    machine = vllm_config(tmp_path, "hardware_kwargs: {tokenizer: other/tokenizer}\n")
    assert_one_line_error(
        zoi_inline("worker", "--run", str(run), "-c", str(machine)), "hardware_kwargs.tokenizer"
    )


def test_a_worker_checks_the_engine_arguments_frozen_in_the_run(tmp_path: Path) -> None:
    """Without -c a worker takes run.json's config, which no config load checked (a run of
    another version, or one edited by hand): its engine arguments are checked before the
    engine is built."""
    from zero_one_instruction.config import load_config
    from zero_one_instruction.rundir import create_or_open

    run = tmp_path / "run"
    create_or_open(run, load_config(vllm_config(tmp_path, "")), 0, 4, 2)
    path = run / "run.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["config"]["hardware_kwargs"] = {"seed": 7}  # outside the fingerprint
    path.write_text(json.dumps(data), encoding="utf-8")
    assert_one_line_error(
        zoi_inline("worker", "--run", str(run)), "run.json", "hardware_kwargs.seed"
    )


def test_hardware_kwargs_of_the_allowlist_pass(tmp_path: Path) -> None:
    config = vllm_config(
        tmp_path,
        "hardware_kwargs: {enforce_eager: true, max_num_batched_tokens: 4096,\n"
        "  enable_chunked_prefill: false, enable_prefix_caching: true, cpu_offload_gb: 1}\n",
    )
    done = zoi_inline("config", "check", str(config))
    assert done.exit_code == 0, done.stderr


needs_vllm_source = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("vllm") is None, reason="vLLM is not installed"
)


@needs_vllm_source
@pytest.mark.parametrize("section", ["engine_kwargs", "hardware_kwargs"])
def test_a_misspelt_engine_argument_is_refused_before_any_run(tmp_path: Path, section: str) -> None:
    config = vllm_config(tmp_path, f"{section}: {{max_num_seq: 8}}\n")
    expected = (f"{section}.max_num_seq", "not a vLLM engine argument", "max_num_seqs")
    assert_one_line_error(zoi_inline("config", "check", str(config)), *expected)
    run = tmp_path / "run"
    enqueue = zoi_inline("enqueue", "-c", str(config), "--run", str(run), "--num-prompts", "4")
    assert_one_line_error(enqueue, *expected)
    out = tmp_path / "out.jsonl"
    ran = zoi_inline("run", "-c", str(config), "-o", str(out), "--num-prompts", "4")
    assert_one_line_error(ran, *expected)
    made = zoi_inline("generate", "-c", str(config), "--start", "0", "--end", "4", "-o", str(out))
    assert_one_line_error(made, *expected)
    assert not run.exists() and not out.exists() and not Path(f"{out}.run").exists()


@needs_vllm_source
def test_real_engine_arguments_pass_the_check(tmp_path: Path) -> None:
    config = vllm_config(tmp_path, "engine_kwargs: {load_format: dummy, max_num_seqs: 8}\n")
    done = zoi_inline("config", "check", str(config))
    assert done.exit_code == 0, done.stderr


class TemplateEngine(ScriptedEngine):
    """Renders as the vLLM engine does: with the chat template its config gives, read once
    when the engine starts; a template that cannot render fails every request."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.template = read_chat_template(config.chat_template)

    async def complete(self, request: Request) -> Completion:
        if self.template is None or "broken" in self.template:
            raise RequestError(f"cannot render with {self.template!r}")
        return await super().complete(request)


def template_config(tmp_path: Path) -> tuple[Path, Path]:
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}", encoding="utf-8")
    config = scripted_config(tmp_path)
    text = config.read_text(encoding="utf-8").replace(ENGINE, "tests.test_integrity:TemplateEngine")
    config.write_text(text + "chat_template: chat.jinja\n", encoding="utf-8")
    return config, template


def test_workers_use_the_chat_template_frozen_in_the_run(tmp_path: Path) -> None:
    config, template = template_config(tmp_path)
    expected = generated(config, tmp_path / "reference.jsonl")
    assert expected
    run = tmp_path / "run"
    enqueue_run(config, run, N, CHUNK)
    template.write_text("{{ broken }}", encoding="utf-8")  # edited after enqueue
    proc = worker(run, "--burst")
    assert proc.wait(timeout=120) == 0, stop(proc)
    out = tmp_path / "out.jsonl"
    ok("merge", "--run", str(run), "-o", str(out))
    assert out.read_bytes() == expected


def test_a_chunk_whose_every_record_failed_alike_is_not_committed(tmp_path: Path) -> None:
    config = scripted_config(tmp_path)
    text = config.read_text(encoding="utf-8").replace("none: {}", "none: {width: '!error'}")
    config.write_text(text, encoding="utf-8")
    run = tmp_path / "run"
    enqueue_run(config, run, N, CHUNK, "--retries", "0")
    proc = worker(run, "--burst")
    assert proc.wait(timeout=120) != 0, stop(proc)
    assert not list((run / "shards").glob("*.done")), "a chunk of failures was committed as done"
    state = json.loads(ok("status", "--run", str(run), "--json"))
    assert state["chunks"]["failed"] == N // CHUNK and state["chunks"]["done"] == 0


def _failed(step: str, error: str) -> Outcome:
    return Outcome(0, "p", drop_reason=f"{step}_failed", steps=[StepTrace(step, error=error)])


@pytest.mark.parametrize(
    ("outcomes", "alike"),
    [
        ([_failed("width", "e"), _failed("width", "e")], True),
        ([_failed("width", "e"), _failed("width", "other")], False),
        ([_failed("width", "e"), _failed("answer", "e")], False),
        ([_failed("width", "e"), Outcome(1, "p", question="q", answer="a")], False),
        ([_failed("width", "e"), Outcome(1, "p", drop_reason="answer_too_short")], False),
        ([_failed("width", "e")], False),  # one record's failure is that record's
    ],
)
def test_only_a_uniform_request_failure_fails_a_chunk(outcomes: list[Outcome], alike: bool) -> None:
    from zero_one_instruction.runner import uniform_failure  # here: main had none to import

    assert (uniform_failure(outcomes) is not None) == alike


def test_zoi_run_applies_this_invocations_hardware_settings_on_resume(tmp_path: Path) -> None:
    """The run was made with one machine's settings; `zoi run` resumes it with others (as
    after an out-of-memory): its workers must use the new ones, not those in run.json."""
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = scripted_config(tmp_path, log=first_log)
    second = tmp_path / "second.yml"
    text = first.read_text(encoding="utf-8").replace(str(first_log), str(second_log))
    second.write_text(text.replace("batch_size: 4", "batch_size: 2"), encoding="utf-8")
    run = tmp_path / "run"
    enqueue_run(first, run, N, CHUNK)
    ok(*run_args(second, tmp_path / "out.jsonl", run))
    assert not first_log.exists(), "the workers ran with the hardware settings of run.json"
    assert len(requests_per_seed(second_log)) == N


@pytest.mark.vllm
@pytest.mark.skipif(os.environ.get("ZOI_SKIP_VLLM") == "1", reason="ZOI_SKIP_VLLM=1")
def test_vllm_workers_use_the_frozen_chat_template(tiny_model: Path, tmp_path: Path) -> None:
    """The reproduction on the real engine: the template file is broken after enqueue."""
    data = yaml.safe_load((ROOT / "examples" / "tiny_cpu.yml").read_text(encoding="utf-8"))
    template = tmp_path / "chat.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:",
        encoding="utf-8",
    )
    data.update(model_name=str(tiny_model), chat_template=str(template))
    config = tmp_path / "tiny.yml"
    config.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    expected = generated(config, tmp_path / "reference.jsonl")
    run = tmp_path / "run"
    enqueue_run(config, run, N, CHUNK)
    template.write_text("{{ raise_exception('edited after enqueue') }}", encoding="utf-8")
    proc = worker(run, "--burst")
    assert proc.wait(timeout=600) == 0, stop(proc)
    state = json.loads(ok("status", "--run", str(run), "--json"))
    assert state["chunks"]["done"] == N // CHUNK
    assert not [r for r in state["dropped"] if r.endswith("_failed")], state["dropped"]
    out = tmp_path / "out.jsonl"
    ok("merge", "--run", str(run), "-o", str(out))
    assert out.read_bytes() == expected
