"""Depth operators and elimination rules in runs: what run.json freezes (and, at the defaults,
does not), the operators' templates and their overrides, and the operators in the output
(`meta.operators`), the trace, the funnel, `zoi status`, the chunk log and the preview; reruns
and the queue write the same bytes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from zero_one_instruction.config import dump_config, load_config
from zero_one_instruction.errors import TemplateError
from zero_one_instruction.operators import OPERATORS, TEMPLATES
from zero_one_instruction.pipeline import Tally
from zero_one_instruction.rundir import RunError, create_or_open, open_run
from zero_one_instruction.shards import readable_funnel
from zero_one_instruction.templates import OPTIONAL, load_templates

from .clitools import zoi as zoi_here
from .queue_helpers import FAST, case_config, generate_twice, ok, run_without

ALL = "{constraints: 1, deepen: 1, concretize: 1, reasoning: 1, complicate_input: 1}"
RULES = "drop_depth_no_gain: true, drop_depth_leaked: true, drop_non_answers: true"
# Judges say はい by default in the scripted engine: the no-gain judge says いいえ here, but
# for one case, so that most records are kept and one is dropped for each rule.
SCRIPT = (
    "engine_kwargs:\n  rules:\n"
    '    none: {"judge@depth": "いいえ"}\n'
    '    nogain: {"judge@depth": "はい"}\n'
    '    sorry: {"judge@depth": "いいえ", "answer": "申し訳ありませんが、お答えできません。"}\n'
)
PROMPTS = 24


def write_config(tmp_path: Path, pipeline: str = "", extra: str = "") -> Path:
    return case_config(tmp_path, ["none", "nogain", "sorry", "none"], pipeline, extra + SCRIPT)


def operators_config(tmp_path: Path, extra: str = "") -> Path:
    return write_config(tmp_path, f"depth_steps: 2, depth_operators: {ALL}, {RULES}", extra)


def spec(run: Path) -> dict[str, object]:
    return json.loads((run / "run.json").read_text(encoding="utf-8"))["spec"]


def test_the_defaults_freeze_what_runs_always_froze(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    run = create_or_open(tmp_path / "run", config, 0, 4, 2)
    frozen = spec(run.path)
    assert not {"depth_operators", *(k for k in frozen["pipeline"] if "drop_depth" in k)} & set(
        frozen["pipeline"]
    )
    assert "drop_non_answers" not in frozen["pipeline"]
    assert not set(OPTIONAL) & set(frozen["templates"])
    shown = dump_config(config)
    assert "depth_operators" not in shown and "drop_non_answers" not in shown


def test_operators_and_rules_set_are_frozen_with_the_templates_they_send(tmp_path: Path) -> None:
    config = load_config(operators_config(tmp_path))
    run = create_or_open(tmp_path / "run", config, 0, 4, 2)
    frozen = spec(run.path)
    assert frozen["pipeline"]["depth_operators"] == dict.fromkeys(OPERATORS, 1.0)
    assert frozen["pipeline"]["drop_depth_no_gain"] is True
    sent = set(OPTIONAL) - {"follow_up", "follow_up_judge"}  # those of one turn
    assert set(OPTIONAL) & set(frozen["templates"]) == sent
    assert "depth_operators:" in dump_config(config)
    reopened = open_run(run.path)
    assert reopened.templates == load_templates()
    (tmp_path / "plain").mkdir()
    plain = load_config(write_config(tmp_path / "plain"))
    with pytest.raises(RunError, match=r"pipeline\.depth_operators"):
        create_or_open(run.path, plain, 0, 4, 2)


def test_only_the_drawn_operators_templates_are_frozen(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "depth_operators: {reasoning: 1, deepen: 0}"))
    run = create_or_open(tmp_path / "run", config, 0, 4, 2)
    assert set(OPTIONAL) & set(spec(run.path)["templates"]) == {"reasoning"}


def test_a_run_made_before_the_operators_reads_its_templates(tmp_path: Path) -> None:
    """run.json of a zoi without operators holds the original seven templates: the run
    opens, and a template it never sends is the built-in one."""
    config = load_config(write_config(tmp_path))
    run = create_or_open(tmp_path / "run", config, 0, 4, 2)
    assert open_run(run.path).templates.deepen == load_templates().deepen


def test_a_users_template_file_overrides_an_operator_and_needs_none(tmp_path: Path) -> None:
    own = tmp_path / "own.yml"
    own.write_text("deepen: 'もっと深く: {prompt}'\nwidth: '幅: {prompt}'\n", encoding="utf-8")
    templates = load_templates(own)
    assert templates.deepen.user == "もっと深く: {prompt}" and templates.deepen.system is None
    assert templates.concretize == load_templates().concretize
    without = tmp_path / "old.yml"
    without.write_text("depth: '条件を一つ加えて: {prompt}'\n", encoding="utf-8")
    assert load_templates(without).reasoning == load_templates().reasoning
    config_path = write_config(tmp_path, "depth_operators: {deepen: 1}", f"templates: {own}\n")
    out = tmp_path / "out.jsonl"
    trace = tmp_path / "trace.jsonl"
    ok(
        "generate",
        "-c",
        str(config_path),
        "--start",
        "0",
        "--end",
        "2",
        "-o",
        str(out),
        "--trace",
        str(trace),
    )
    first = json.loads(trace.read_text(encoding="utf-8").splitlines()[0])
    depth = next(step for step in first["steps"] if step["step"] == "depth")
    assert depth["operator"] == "deepen"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("same_request: '{before} だけ'", "template 'same_request' lacks placeholder {after}"),
        (
            "same_request:\n  user: '{before} {after}'\n  examples:\n"
            "    - {before: a, after: b, reply: 同じ}",
            "a judge example replies はい or いいえ",
        ),
        ("deepen: '深く'", "template 'deepen' lacks placeholder {prompt}"),
        ("reasoning: '{prompt} {question}'", "unknown placeholder {question}"),
    ],
)
def test_the_new_templates_are_checked_like_the_others(
    tmp_path: Path, text: str, fragment: str
) -> None:
    own = tmp_path / "own.yml"
    own.write_text(text + "\n", encoding="utf-8")
    with pytest.raises(TemplateError) as caught:
        load_templates(own)
    assert fragment in str(caught.value)


def test_every_operator_has_its_own_shipped_template() -> None:
    templates = load_templates()
    systems = {templates.step(TEMPLATES[name]).system for name in OPERATORS}
    assert len(systems) == len(OPERATORS)
    for name in OPERATORS:
        step = templates.step(TEMPLATES[name])
        assert step.examples and "{prompt}" in step.user


def test_generate_twice_and_the_queue_write_the_same_bytes(tmp_path: Path) -> None:
    """All operators and rules on: two `zoi generate` runs and enqueue -> worker -> merge
    write the same records, meta (with `meta.operators`) and trace; status, the chunk log
    and the summary count the operators."""
    config = operators_config(tmp_path)
    written, traced, summary = generate_twice(tmp_path, config, PROMPTS, "--with-meta")
    assert "operators constraints " in summary and "depth_no_gain" in summary
    records = [json.loads(line) for line in written.splitlines()]
    assert records and len(records) < PROMPTS
    for record in records:
        operators = record["meta"]["operators"]
        assert len(operators) == 2 and set(operators) <= set(OPERATORS)
        depth = [s for s in record["meta"]["steps"] if s["step"] == "depth"]
        assert [s["operator"] for s in depth] == operators
    dropped = {json.loads(line)["drop_reason"] for line in traced.splitlines()}
    assert {"depth_no_gain", "answer_apology"} <= dropped
    run = tmp_path / "run"
    ok("enqueue", "-c", str(config), "--run", str(run), "--num-prompts", str(PROMPTS),
       "--chunk-size", "5")  # fmt: skip
    ok("worker", "--run", str(run), "--burst", *FAST)
    merged = tmp_path / "merged.jsonl"
    ok("merge", "--run", str(run), "-o", str(merged), "--with-meta")
    assert merged.read_bytes() == written
    status = ok("status", "--run", str(run))
    assert "\noperators constraints " in status and " kept)" in status
    figures = json.loads(ok("status", "--run", str(run), "--json"))
    assert sum(figures["operators"].values()) == 2 * PROMPTS  # every prompt reached depth
    assert sum(figures["operators_kept"].values()) == 2 * figures["records"]
    log = [json.loads(line) for line in (run / "logs" / "chunks.jsonl").read_text().splitlines()]
    assert sum(sum(line["operators"].values()) for line in log) == sum(
        figures["operators"].values()
    )


def test_a_default_run_logs_and_shows_no_operators(tmp_path: Path) -> None:
    run_without(write_config(tmp_path, extra=""), tmp_path / "run", "operators")


def test_a_funnel_with_damaged_operator_counts_is_not_read() -> None:
    funnel = {
        "prompts": 1, "kept": 1, "dropped": {}, "fixer_ran": 0, "prompt_tokens": 1,
        "completion_tokens": 1,
    }  # fmt: skip
    assert readable_funnel(funnel)
    assert readable_funnel({**funnel, "operators": {"deepen": 2}, "operators_kept": {}})
    assert not readable_funnel({**funnel, "operators": {"deepen": -1}})
    assert not readable_funnel({**funnel, "operators_kept": ["deepen"]})


def test_the_preview_names_each_depth_steps_operator(tmp_path: Path) -> None:
    config = operators_config(tmp_path)
    result = zoi_here("preview", "-c", str(config), "-n", "1")
    assert result.exit_code == 0, result.stderr
    assert "--- depth 1 " in result.stdout and "--- no-gain judge" in result.stdout
    shown = [line for line in result.stdout.splitlines() if line.startswith("--- depth")]
    assert all(line.split()[3] in OPERATORS for line in shown), shown


def test_a_funnel_with_operators_reads_back_as_it_was_written() -> None:
    """A done marker's funnel holds the depth steps by operator, and gives them back."""
    tally = Tally(prompts=3, kept=1, dropped=Counter({"depth_no_gain": 2}))
    tally.operators.update({"deepen": 4, "reasoning": 2})
    tally.operators_kept.update({"deepen": 2})
    data = tally.as_dict()
    assert data["operators"] == {"deepen": 4, "reasoning": 2}
    assert data["operators_kept"] == {"deepen": 2}
    assert readable_funnel(data)
    back = Tally.from_dict(json.loads(json.dumps(data)))
    assert back == tally
    assert "operators" not in Tally(prompts=1, kept=1).as_dict()
