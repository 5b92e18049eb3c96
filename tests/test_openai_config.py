"""`engine: openai` in the config, the run's fingerprint and the command line: `zoi config
check` on bad sections, `step_models` in the fingerprint and URLs out of it, and `zoi
generate` end to end against the fake server (tests/fakeopenai.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from zero_one_instruction import shards
from zero_one_instruction.config import load_config
from zero_one_instruction.producer import enqueue
from zero_one_instruction.prompt_sources import load_source
from zero_one_instruction.rundir import create_or_open, data_spec, fingerprint
from zero_one_instruction.templates import load_templates
from zero_one_instruction.worker import serve

from .clitools import assert_one_line_error, zoi
from .fakeopenai import FakeOpenAI, dead_port
from .unit_runs import broker

FAST = {"heartbeat_interval": 0.3, "heartbeat_ttl": 2, "janitor_interval": 0.5}

KEY = "sk-live-abcdefabcdefabcdef"
GOOD = "model_name: served-model\nengine: openai\nopenai: {endpoints: [http://127.0.0.1:8000/v1]}\n"


def write(tmp_path: Path, text: str, name: str = "c.yml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


BAD = [
    ("model_name: m\nengine: openai\n", "openai.endpoints: required with engine openai"),
    (
        "model_name: m\nengine: openai\nopenai: {endpoints: [ftp://host/v1]}\n",
        "openai.endpoints.0: not an http(s) URL (got 'ftp://host/v1')",
    ),
    (
        "model_name: m\nengine: openai\nopenai: {endpoints: ['localhost:8000']}\n",
        "openai.endpoints.0: not an http(s) URL",
    ),
    (
        "model_name: m\nengine: openai\nopenai: {endpoints: ['http://u:p@host/v1']}\n",
        "credentials do not belong in the URL",
    ),
    (
        "model_name: m\nengine: openai\nopenai: {endpoints: [http://a/v1, 'http://a/v1/']}\n",
        "openai.endpoints: lists the same URL twice",
    ),
    (
        "model_name: m\nengine: openai\n"
        "openai: {endpoints: [http://a/v1], max_in_flight: 4, initial_in_flight: 16}\n",
        "initial_in_flight 16 is above max_in_flight 4",
    ),
    (
        'model_name: m\nengine: openai\nopenai: {endpoints: ["http://a\\tb/v1"]}\n',
        "openai.endpoints.0: a space or control character at position 8",
    ),
    (
        'model_name: m\nengine: openai\nopenai: {endpoints: ["http://a/v1\\n"]}\n',
        "openai.endpoints.0: a space or control character at position 11",
    ),
    (
        "model_name: m\nengine: openai\nopenai: {endpoints: ['http://a /v1']}\n",
        "openai.endpoints.0: a space or control character at position 8",
    ),
    (
        "model_name: m\nengine: openai\nopenai: {endpoints: ['http://\u2603.example/v1']}\n",
        "openai.endpoints.0: not a URL the HTTP client takes (Invalid IDNA hostname",
    ),
    (
        "model_name: m\nengine: openai\nopenai: {endpoints: [http://a/v1], judge_constraint: x}\n",
        "openai.judge_constraint: Input should be 'auto'",
    ),
    (
        "model_name: m\nengine: openai\nopenai: {endpoints: [http://a/v1], timeout: 3}\n",
        "openai.timeout: unknown key",
    ),
    (
        "model_name: m\nengine: openai\nchat_template: '{{ x }}'\n"
        "openai: {endpoints: [http://a/v1]}\n",
        "chat_template: engine openai cannot set it",
    ),
    (
        "model_name: m\nengine: openai\nstep_models: {judgement: big}\n"
        "openai: {endpoints: [http://a/v1]}\n",
        "step_models: unknown step 'judgement'",
    ),
    ("model_name: m\nstep_models: {judge: big}\n", "step_models: only engine openai routes"),
    (
        "model_name: m\nopenai: {endpoints: [http://a/v1]}\n",
        "openai: this section is for engine openai",
    ),
    (
        "model_name: m\nengine: openai\nengine_kwargs: {seed: 3}\n"
        "openai: {endpoints: [http://a/v1]}\n",
        "engine_kwargs.seed: engine openai sets this field itself",
    ),
    (
        "model_name: m\nengine: openai\nhardware_kwargs: {enforce_eager: true}\n"
        "openai: {endpoints: [http://a/v1]}\n",
        "hardware_kwargs.enforce_eager: engine openai takes no hardware_kwargs",
    ),
    (
        "model_name: m\nengine: openai\nopenai:\n  endpoints: [http://a/v1]\n"
        "  models: {big: {endpoints: []}}\n",
        "openai.models.big.endpoints: List should have at least 1 item",
    ),
]


@pytest.mark.parametrize(("text", "fragment"), BAD)
def test_config_check_refuses_bad_openai_settings_in_one_line(
    tmp_path: Path, text: str, fragment: str
) -> None:
    assert_one_line_error(zoi("config", "check", str(write(tmp_path, text))), fragment)


def test_a_key_written_where_its_variable_belongs_is_never_echoed(tmp_path: Path) -> None:
    text = f"{GOOD}".replace("]}", f"], api_key_env: {KEY}-x}}")
    line = assert_one_line_error(
        zoi("config", "check", str(write(tmp_path, text))), "openai.api_key_env"
    )
    assert KEY not in line


SECRET = "sk-pasted-0123456789"


@pytest.mark.parametrize(
    "endpoints",
    [
        f"['http://user:{SECRET}@host/v1']",
        f"['http://host/v1?api_key={SECRET}']",
        f"['http://host/v1#{SECRET}']",
        f"'http://user:{SECRET}@host/v1'",  # not even a list: still not echoed
        f"[http://a/v1, 'http://{SECRET}@b/v1']",
    ],
)
def test_a_url_with_credentials_is_refused_without_echoing_them(
    tmp_path: Path, endpoints: str
) -> None:
    text = f"model_name: m\nengine: openai\nopenai: {{endpoints: {endpoints}}}\n"
    line = assert_one_line_error(zoi("config", "check", str(write(tmp_path, text))), "openai")
    assert SECRET not in line and "***" in line


@pytest.mark.parametrize(
    ("limits", "initial"),
    [
        ("", 8),
        ("max_in_flight: 4", 4),
        ("max_in_flight: 100", 8),
        ("max_in_flight: 4, initial_in_flight: 2", 2),
    ],
)
def test_the_starting_limit_is_eight_or_the_maximum_if_lower(
    tmp_path: Path, limits: str, initial: int
) -> None:
    """`max_in_flight: 4` alone is a whole setting: the default start follows it down."""
    text = GOOD.replace("]}", f"]{', ' + limits if limits else ''}}}")
    assert load_config(write(tmp_path, text)).openai.initial_in_flight == initial


def test_a_judge_with_its_own_endpoints_needs_none_shared(tmp_path: Path) -> None:
    """Every model with its own endpoints: the shared list may be left out."""
    text = (
        "model_name: gen\nengine: openai\nstep_models: {judge: big}\n"
        "openai:\n  models:\n    gen: {endpoints: [http://a/v1]}\n    big: {endpoints: [http://b/v1]}\n"
    )
    result = zoi("config", "check", str(write(tmp_path, text)))
    assert result.exit_code == 0, result.stderr


def test_show_prints_the_openai_section_and_loads_back(tmp_path: Path) -> None:
    text = GOOD + "step_models: {judge: big-judge}\n"
    text = text.replace(
        "]}", "], api_key_env: ZOI_KEY, models: {big-judge: {endpoints: [http://j/v1]}}}"
    )
    shown = zoi("config", "show", str(write(tmp_path, text)))
    assert shown.exit_code == 0, shown.stderr
    data = yaml.safe_load(shown.stdout)
    assert data["step_models"] == {"judge": "big-judge"}
    assert data["openai"]["endpoints"] == ["http://127.0.0.1:8000/v1"]
    assert data["openai"]["api_key_env"] == "ZOI_KEY" and data["openai"]["max_in_flight"] == 64
    assert data["model_name"] == "served-model"
    again = zoi("config", "show", str(write(tmp_path, shown.stdout, "again.yml")))
    assert again.stdout == shown.stdout


def test_a_config_without_them_shows_neither_section(tmp_path: Path) -> None:
    shown = zoi("config", "show", str(write(tmp_path, "model_name: m\n")))
    assert "step_models" not in shown.stdout and "openai" not in shown.stdout


def test_a_served_model_name_is_not_taken_for_a_path(tmp_path: Path) -> None:
    (tmp_path / "served-model").mkdir()  # a folder of that name beside the config
    assert load_config(write(tmp_path, GOOD)).model_name == "served-model"


# --- the fingerprint -------------------------------------------------------------------------


def spec_of(tmp_path: Path, text: str) -> dict[str, object]:
    config = load_config(write(tmp_path, text, f"c{abs(hash(text))}.yml"))
    templates = load_templates(config.templates, config.system_prompt)
    source = load_source(config.prompts, templates.base_prompt)
    return data_spec(config, templates, source, 0, 10, 5)


def test_step_models_are_in_the_fingerprint_and_urls_are_not(tmp_path: Path) -> None:
    base = spec_of(tmp_path, GOOD)
    assert "step_models" not in base and "openai" not in base
    other_urls = GOOD.replace("127.0.0.1:8000", "gpu2:9000").replace(
        "]}", "], max_in_flight: 9, initial_in_flight: 2, api_key_env: K}"
    )
    assert fingerprint(spec_of(tmp_path, other_urls)) == fingerprint(base)
    routed = spec_of(tmp_path, GOOD + "step_models: {judge: big-judge}\n")
    assert routed["step_models"] == {"judge": "big-judge"}
    assert fingerprint(routed) != fingerprint(base)
    renamed = spec_of(tmp_path, GOOD.replace("served-model", "other-model"))
    assert fingerprint(renamed) != fingerprint(base)


def test_run_json_names_the_key_variable_but_never_holds_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZOI_KEY", KEY)
    config = load_config(write(tmp_path, GOOD.replace("]}", "], api_key_env: ZOI_KEY}")))
    run = create_or_open(tmp_path / "run", config, 0, 4, 2)
    text = (run.path / "run.json").read_text(encoding="utf-8")
    assert KEY not in text
    assert json.loads(text)["config"]["openai"]["api_key_env"] == "ZOI_KEY"
    # Another machine's URLs: the same run.
    elsewhere = load_config(write(tmp_path, GOOD.replace("127.0.0.1:8000", "gpu9:8000"), "w.yml"))
    assert run.with_hardware(elsewhere).fingerprint == run.fingerprint


# --- the command line, end to end ---------------------------------------------------------


def generate_config(tmp_path: Path, url: str, extra: str = "") -> Path:
    (tmp_path / "prompts.txt").write_text(
        "".join(f"基本の質問その{i}\n" for i in range(12)), encoding="utf-8"
    )
    return write(
        tmp_path,
        "model_name: served-model\nengine: openai\nprompts: {file: prompts.txt}\n"
        f"openai: {{endpoints: [{url}], retry_deadline: 5}}\n" + extra,
    )


def test_generate_with_engine_openai_writes_every_record(tmp_path: Path) -> None:
    out, trace = tmp_path / "out.jsonl", tmp_path / "trace.jsonl"
    with FakeOpenAI() as fake:
        config = generate_config(tmp_path, fake.url)
        result = zoi(
            "generate", "-c", str(config), "--start", "0", "--end", "12",
            "-o", str(out), "--trace", str(trace),
        )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == [f"record_{i}" for i in range(12)]
    assert all(r["output"].startswith("これはテスト用") for r in records)
    outcomes = [json.loads(line) for line in trace.read_text(encoding="utf-8").splitlines()]
    judges = [s for o in outcomes for s in o["steps"] if s["step"] == "judge"]
    assert judges and all(s["text"] == "はい" and "yes_probability" not in s for s in judges)
    seeds = [b["seed"] for b in fake.requests if b["messages"][-1]["content"] != "Say hello."]
    assert len(seeds) == len(set(seeds)) == sum(len(o["steps"]) for o in outcomes)


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("unreachable", "unreachable"),
        ("key", "rejected the API key from $ZOI_KEY"),
        ("model", "does not serve model 'served-model' (it serves: other)"),
    ],
)
def test_generate_stops_at_start_up_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, problem: str, expected: str
) -> None:
    monkeypatch.setenv("ZOI_KEY", KEY)
    out = tmp_path / "out.jsonl"
    served = ("other",) if problem == "model" else ("served-model",)
    with FakeOpenAI(key="another" if problem == "key" else KEY, models=served) as fake:
        url = f"http://127.0.0.1:{dead_port()}/v1" if problem == "unreachable" else fake.url
        config = generate_config(tmp_path, url)
        text = config.read_text(encoding="utf-8")
        config.write_text(text.replace("retry_deadline: 5", "api_key_env: ZOI_KEY"), "utf-8")
        result = zoi("generate", "-c", str(config), "--start", "0", "--end", "2", "-o", str(out))
    line = assert_one_line_error(result, "openai.endpoints", expected)
    assert KEY not in line and not out.exists()
    assert not fake.requests  # stopped before any record was asked for


def test_each_chunk_marker_records_the_judge_constraint_its_worker_used(
    tmp_path: Path, signals: None
) -> None:
    """`auto` is found per worker, outside the fingerprint: a run whose workers reached
    servers that keep different constraints shows it, chunk by chunk."""
    with FakeOpenAI(honours="json_schema") as fake:
        config = load_config(generate_config(tmp_path, fake.url))
        run = create_or_open(tmp_path / "run", config, 0, 4, 2)
        with broker(run) as connection:
            enqueue(connection, run)
            assert serve(connection, run, name="unit", burst=True, **FAST) is True
    markers = [shards.read_marker(run, chunk)[0] or {} for chunk in run.chunks()]
    assert [m.get("engine") for m in markers] == [{"judge_constraint": "json_schema"}] * 2
