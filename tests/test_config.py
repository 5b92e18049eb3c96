"""Loading configs: the original file, defaults, and one clear line for every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from zero_one_instruction.config import Config, dump_config, load_config

from .clitools import assert_one_line_error, zoi

ROOT = Path(__file__).resolve().parent.parent


def test_original_model_config_loads_unchanged() -> None:
    original = yaml.safe_load((ROOT / "model_config.yml").read_text(encoding="utf-8"))
    config = load_config(ROOT / "model_config.yml")
    for key, value in original.items():
        assert getattr(config, key) == value, key
    assert set(original) == {
        "model_name",
        "quantization",
        "gpu_memory_utilization",
        "tensor_parallel_size",
        "batch_size",
        "max_tokens",
        "max_model_len",
        "trust_remote_code",
        "dtype",
        "temperature",
        "top_p",
    }


def test_defaults_are_filled_in(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text("model_name: m\n", encoding="utf-8")
    config = load_config(path)
    assert config.pipeline.depth_steps == 1
    assert config.pipeline.fixer is True
    assert config.pipeline.min_answer_chars == 10
    assert config.pipeline.refusal_marker == "不可能"
    assert (config.sampling.judge.temperature, config.sampling.judge.max_tokens) == (0.0, 8)
    assert config.engine == "vllm"
    assert config.concurrency() == 4 * config.batch_size


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "model").mkdir()
    path = tmp_path / "sub" / "c.yml"
    path.write_text(
        "model_name: ../model\ntemplates: t.yaml\nprompts: {source: file, file: p.txt}\n",
        encoding="utf-8",
    )
    config = load_config(path)
    assert config.model_name == str((tmp_path / "model").resolve())
    assert config.templates == (tmp_path / "sub" / "t.yaml").resolve()
    assert config.prompts.file == (tmp_path / "sub" / "p.txt").resolve()


def test_hub_ids_are_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text("model_name: Qwen/Qwen2.5-7B-Instruct\n", encoding="utf-8")
    assert load_config(path).model_name == "Qwen/Qwen2.5-7B-Instruct"


def test_show_prints_effective_config_that_loads_back(tmp_path: Path) -> None:
    result = zoi("config", "show", str(ROOT / "model_config.yml"))
    assert result.exit_code == 0
    shown = yaml.safe_load(result.stdout)
    assert shown["pipeline"]["depth_steps"] == 1
    assert shown["quantization"] == "awq"
    again = tmp_path / "again.yml"
    again.write_text(result.stdout, encoding="utf-8")
    assert load_config(again) == load_config(ROOT / "model_config.yml")
    assert dump_config(Config(model_name="m")).startswith("model_name: m\n")


def test_check_accepts_the_shipped_configs() -> None:
    for name in ("model_config.yml", "examples/tiny_cpu.yml", "examples/real_cpu.yml"):
        result = zoi("config", "check", str(ROOT / name))
        assert result.exit_code == 0, result.stderr
        assert "ok (2916 base prompts" in result.stdout


BAD_CONFIGS = [
    ("model_name: [unclosed\n", "invalid YAML"),
    ("model_name: m\nmodle_name: x\n", "modle_name: unknown key"),
    ("model_name: m\npipeline:\n  depth_step: 2\n", "pipeline.depth_step: unknown key"),
    ("model_name: m\nbatch_size: many\n", "batch_size: Input should be a valid integer"),
    ("model_name: m\nbatch_size: 3.0\n", "batch_size: Input should be a valid integer"),
    ("model_name: m\ntemperature: true\n", "temperature: Input should be a valid number"),
    ("model_name: m\ntemperature: .inf\n", "temperature: Input should be a finite number"),
    ("model_name: m\npipeline: {fixer: 1}\n", "pipeline.fixer: Input should be a valid boolean"),
    (
        "model_name: m\ngpu_memory_utilization: 1.5\n",
        "gpu_memory_utilization: Input should be less",
    ),
    (
        "model_name: m\npipeline: {depth_steps: -1}\n",
        "pipeline.depth_steps: Input should be greater",
    ),
    ("model_name: m\ntop_p: 0\n", "top_p: Input should be greater than 0"),
    ("quantization: awq\n", "model_name: required key is missing"),
    ("model_name: '  '\n", "model_name: String should match"),
    ("- model_name: m\n", "expected a mapping"),
    (
        "model_name: m\nmodel_name: n\n",
        "line 2, column 1: invalid YAML: duplicate key 'model_name'",
    ),
    (
        "model_name: m\nengine: nonsense\n",
        "engine: must be 'vllm', 'openai' or 'package.module:ClassName'",
    ),
    ("model_name: m\nengine: ':'\n", "engine: must be 'vllm'"),
    ("model_name: m\nprompts: {source: web}\n", "prompts.source: Input should be 'builtin'"),
    (
        "model_name: m\nprompts: {source: builtin, file: p.txt}\n",
        "file is set but source is 'builtin'",
    ),
    ("model_name: m\nprompts: {source: file}\n", "source 'file' needs file"),
    ("model_name: m\nprompts: {file: p.json}\n", "file p.json: use a .txt or a .jsonl file"),
    ("model_name: m\nsampling: {judge: {max_tokens: 0}}\n", "sampling.judge.max_tokens: Input"),
    ("model_name: m\nmax_tokens: 5000\n", "may generate 5000 tokens, which leaves no room"),
    ("model_name: m\nseed: -1\n", "seed: Input should be greater than or equal to 0"),
    ("model_name: m\nseed: 99999999999\n", "seed: Input should be less than or equal"),
    ("model_name: m\nsystem_prompt: ''\n", "system_prompt: String should match"),
    ("model_name: m\nsystem_prompt: 'hi {prompt}'\n", "takes no {placeholders}"),
    ("model_name: m\ntemplates: missing.yaml\n", "missing.yaml: templates file not found"),
    ("model_name: m\nchat_template: missing.jinja\n", "chat_template: file"),
    ("model_name: m\nengine: no_such_module:Engine\n", "cannot import module 'no_such_module'"),
    ("model_name: m\nengine: 'tests.scripted_engine:Nope'\n", "has no class 'Nope'"),
    ("model_name: m\n\tdtype: auto\n", "line 2"),
]


@pytest.mark.parametrize(("text", "fragment"), BAD_CONFIGS)
def test_bad_config_gives_one_line_and_exit_2(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.yml"
    path.write_text(text, encoding="utf-8")
    # `generate` validates the config, then the engine spec, before it loads any model.
    result = zoi(
        "generate", "-c", str(path), "--start", "0", "--end", "2", "-o", str(tmp_path / "out.jsonl")
    )
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(("text", "fragment"), BAD_CONFIGS[:12])
def test_config_check_reports_the_same_errors(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.yml"
    path.write_text(text, encoding="utf-8")
    assert_one_line_error(zoi("config", "check", str(path)), fragment)


def test_absolute_paths_are_kept_and_show_round_trips(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text("width: '新しく書いて: {prompt}'\n", encoding="utf-8")
    (tmp_path / "p.txt").write_text("質問\n", encoding="utf-8")
    path = tmp_path / "sub" / "c.yml"
    path.parent.mkdir()
    text = f"model_name: m\ntemplates: {tmp_path / 't.yaml'}\nprompts: {{file: {tmp_path}/p.txt}}\n"
    path.write_text(text, encoding="utf-8")
    config = load_config(path)
    assert config.templates == tmp_path / "t.yaml"
    assert config.prompts.source == "file" and config.prompts.file == tmp_path / "p.txt"
    again = tmp_path / "again.yml"
    again.write_text(dump_config(config), encoding="utf-8")
    assert load_config(again) == config
    assert "1 base prompts from" in zoi("config", "check", str(path)).stdout


def test_partial_judge_override_keeps_it_greedy(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text("model_name: m\nsampling: {judge: {max_tokens: 16}}\n", encoding="utf-8")
    judge = load_config(path).sampling.judge
    assert (judge.temperature, judge.max_tokens) == (0.0, 16)
    path.write_text("model_name: m\nsampling: {judge: {temperature: null}}\n", encoding="utf-8")
    assert load_config(path).sampling.judge.temperature is None


def test_missing_and_undecodable_config_files(tmp_path: Path) -> None:
    assert_one_line_error(zoi("config", "check", str(tmp_path / "none.yml")), "not found")
    path = tmp_path / "latin1.yml"
    path.write_bytes(b"model_name: caf\xe9\n")
    assert_one_line_error(zoi("config", "show", str(path)), "latin1.yml", "cannot read")


def alias_bomb() -> str:
    """Nine levels of nine aliases each: 9**9 strings (hundreds of GB printed) from ~400 bytes."""
    lines = ["model_name: m", "engine_kwargs:", "  l0: &l0 [lol, lol, lol, lol, lol, lol]"]
    for level in range(1, 9):
        refs = ", ".join([f"*l{level - 1}"] * 9)
        lines.append(f"  l{level}: &l{level} [{refs}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("command", [["config", "check"], ["config", "show"]])
def test_yaml_aliases_are_refused_before_they_expand(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "bomb.yml"
    path.write_text(alias_bomb(), encoding="utf-8")
    assert len(path.read_bytes()) < 600
    result = zoi(*command, str(path))
    assert_one_line_error(result, "bomb.yml: line 4, column", "aliases are not supported (*l0)")
    assert result.stdout == ""


def test_yaml_nested_too_deep_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "deep.yml"
    path.write_text("model_name: m\nengine_kwargs: " + "[" * 20_000 + "]" * 20_000 + "\n")
    assert_one_line_error(
        zoi("config", "check", str(path)), "deep.yml: line 2", "nested deeper than 100 levels"
    )
    block = "model_name: m\nengine_kwargs:\n" + "".join(
        f"{'  ' * i}k{i}:\n" for i in range(1, 5000)
    )
    path.write_text(block, encoding="utf-8")
    assert_one_line_error(zoi("config", "show", str(path)), "deep.yml: line", "nested deeper")


def test_anchors_without_aliases_and_moderate_nesting_still_load(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    nested = "[" * 50 + "1" + "]" * 50
    path.write_text(
        f"model_name: &name m\nchat_template_kwargs: {{deep: {nested}}}\n", encoding="utf-8"
    )
    config = load_config(path)
    assert config.model_name == "m"
    assert str(config.chat_template_kwargs["deep"]).count("[") == 50


def test_system_prompt_takes_doubled_braces_and_refuses_lone_ones(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text("model_name: m\nsystem_prompt: '{{x}} を {{y}} で'\n", encoding="utf-8")
    assert zoi("config", "check", str(path)).exit_code == 0
    for value, fragment in [
        ("'JSON {\"a\": 1}'", "system_prompt: invalid field"),
        ("'a { b'", "system_prompt: lone '{'"),
        ("'{0}'", "system_prompt: positional field {0}"),
        ("'{x}'", "system_prompt: the output system prompt takes no {placeholders}"),
    ]:
        path.write_text(f"model_name: m\nsystem_prompt: {value}\n", encoding="utf-8")
        assert_one_line_error(zoi("config", "check", str(path)), "c.yml", fragment)
