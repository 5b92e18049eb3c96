"""Template loading, validation and single-pass substitution."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from zero_one_instruction.errors import TemplateError
from zero_one_instruction.templates import PLACEHOLDERS, load_templates, placeholders, render


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_builtin_templates_are_complete_and_japanese() -> None:
    templates = load_templates()
    for name, (required, optional) in PLACEHOLDERS.items():
        tpl = templates.step(name)
        found = placeholders(tpl.user) | placeholders(tpl.system or "")
        assert required <= found <= required | optional, name
        assert any("\u3040" <= ch <= "\u30ff" for ch in tpl.user + (tpl.system or "")), name
    assert "日本語" in templates.output_system_prompt
    assert templates.answer.user == "{question}"


def test_override_a_subset_keeps_the_rest(tmp_path: Path) -> None:
    path = write(tmp_path, "width: |-\n  同じテーマで別の質問を書いてください。\n  {prompt}\n")
    templates = load_templates(path)
    builtin = load_templates()
    assert templates.width.user.startswith("同じテーマで別の質問")
    assert templates.width.system is None
    assert templates.judge == builtin.judge
    assert templates.output_system_prompt == builtin.output_system_prompt


def test_system_prompt_from_config_wins() -> None:
    assert load_templates(None, "あなたは先生です。").output_system_prompt == "あなたは先生です。"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("width: 新しい質問を書いてください。\n", "template 'width' lacks placeholder {prompt}"),
        ("judge: '{prompt} {answer}'\n", "template 'judge' uses unknown placeholder {answer}"),
        ("answer: {system: '{refusal_marker}', user: 'no question'}\n", "lacks placeholder"),
        ("depthh: '{prompt}'\n", "unknown template 'depthh'"),
        ("fix: [a, b]\n", "template 'fix' must be a string"),
        ("base_prompt: {system: '{task}', user: '{domain}{task}'}\n", "takes no system"),
        (
            "seed: '{domain}{task}'\nbase_prompt: '{task}{domain}'\n",
            "the old name of 'base_prompt'",
        ),
        ("flatten: {user: ''}\n", "has no user message"),
        ("output_system_prompt: '{prompt}'\n", "cannot contain placeholders"),
        ("width: [unclosed\n", "invalid YAML"),
        ("- width\n", "expected a mapping"),
    ],
)
def test_bad_templates_are_rejected_naming_the_template(
    tmp_path: Path, text: str, fragment: str
) -> None:
    with pytest.raises(TemplateError, match=None) as info:
        load_templates(write(tmp_path, text))
    assert fragment in str(info.value)
    assert str(tmp_path / "t.yaml") in str(info.value)


def test_literal_braces_are_allowed_and_unescaped(tmp_path: Path) -> None:
    path = write(tmp_path, 'width: "JSON例: {{prompt}} と {{\\"a\\": 1}}\\n{prompt}"\n')
    templates = load_templates(path)
    ((_, user),) = templates.width.messages(prompt="X")
    assert user == 'JSON例: {prompt} と {"a": 1}\nX'


def test_render_is_single_pass_for_any_inserted_text() -> None:
    nasty = "{prompt} {{prompt}} {question} {% if x %}{{ y }}{% endif %} \\1 $0 %s {0} " * 2000
    out = render("前{prompt}後", {"prompt": nasty})
    assert out == f"前{nasty}後"
    assert len(out) > 100_000


def test_template_files_refuse_yaml_aliases(tmp_path: Path) -> None:
    path = write(tmp_path, "width: &w '{prompt}を書き直して'\nfix: *w\n")
    with pytest.raises(TemplateError, match=r"t\.yaml: line 2, column 6: .*aliases are not"):
        load_templates(path)


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("{prompt} {", "template 'width': lone '{' in '{prompt} {'; write '{{'"),
        ("} {prompt}", "template 'width': lone '}' in '} {prompt}'; write '}}'"),
        ("{prompt} {{x}", "lone '}' in '{prompt} {{x}'"),
        ("{prompt} {0}", "template 'width': positional field {0} is not supported"),
        ("{prompt} {}", "template 'width': positional field {} is not supported"),
        ("{prompt:>10}", "template 'width': {prompt:>10}: format specs, conversions"),
        ("{prompt!r}", "template 'width': {prompt!r}: format specs, conversions"),
        ("{prompt.upper}", "{prompt.upper}: format specs, conversions and attribute"),
        ('{prompt} {"a": 1}', """template 'width': invalid field {"a": 1}"""),
        ("{ prompt }", "template 'width': invalid field { prompt }"),
        ("{prompt} {answer}", "template 'width' uses unknown placeholder {answer}"),
    ],
)
def test_every_brace_is_doubled_or_a_placeholder(
    tmp_path: Path, template: str, fragment: str
) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"width": template}), encoding="utf-8")
    with pytest.raises(TemplateError) as info:
        load_templates(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and fragment in message, message
    assert "lacks placeholder" not in message


def test_system_messages_are_checked_like_user_messages(tmp_path: Path) -> None:
    path = write(tmp_path, "judge: {system: '判定 {0}', user: '{prompt}'}\n")
    with pytest.raises(TemplateError, match=r"template 'judge': positional field \{0\}"):
        load_templates(path)


def test_doubled_braces_render_single_everywhere(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "output_system_prompt: 'JSON {{\"a\": 1}} で'\n"
        "judge: {system: '{{はい}}か{{いいえ}}', user: '{{{prompt}}}'}\n",
    )
    templates = load_templates(path)
    assert templates.output_system_prompt == 'JSON {"a": 1} で'
    assert templates.judge.messages(prompt="Q") == [("system", "{はい}か{いいえ}"), ("user", "{Q}")]
    assert load_templates(None, "{{x}} は {{y}}").output_system_prompt == "{x} は {y}"


def test_examples_are_earlier_chat_turns_through_the_same_user_message(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "width:\n"
        "  system: 依頼文を書く係です。\n"
        "  user: '手本: {prompt}'\n"
        "  examples:\n"
        "    - {prompt: '犬の飼い方は?', reply: '猫の爪切りのこつを教えてください。'}\n"
        "    - {prompt: '{{prompt}}', reply: '{reply}'}\n",
    )
    chat = load_templates(path).width.messages(prompt="本番")
    assert chat == [
        ("system", "依頼文を書く係です。"),
        ("user", "手本: 犬の飼い方は?"),
        ("assistant", "猫の爪切りのこつを教えてください。"),
        ("user", "手本: {{prompt}}"),  # example values are inserted as written, never scanned
        ("assistant", "{reply}"),
        ("user", "手本: 本番"),
    ]


def test_examples_are_frozen_with_the_templates() -> None:
    """A run directory keeps `as_dict()`; rebuilding it must give the same chat, examples
    included, or a resumed run would send other prompts than the first worker did."""
    from zero_one_instruction.templates import templates_from_dict

    builtin = load_templates()
    assert builtin.width.examples, "the built-in width step teaches by example"
    rebuilt = templates_from_dict(builtin.as_dict(), "run.json")
    assert rebuilt == builtin
    assert rebuilt.width.messages(prompt="X") == builtin.width.messages(prompt="X")


def test_builtin_judge_examples_say_both_words() -> None:
    replies = {example.reply for example in load_templates().judge.examples}
    assert replies == {"はい", "いいえ"}


@pytest.mark.parametrize(
    ("examples", "fragment"),
    [
        ("examples: {prompt: a, reply: b}", "examples must be a list"),
        ("examples: [{prompt: a}]", "example 1: has no reply"),
        ("examples: [{prompt: a, reply: ''}]", "example 1: has no reply"),
        ("examples: [{reply: b}]", "example 1: lacks 'prompt'"),
        ("examples: [{prompt: a, reply: b, question: c}]", "example 1: has unknown key 'question'"),
        ("examples: [{prompt: a, reply: b}, [x]]", "example 2: must be a mapping"),
        ("examples: [{prompt: 1, reply: b}]", "example 1: must be a mapping of placeholder"),
    ],
)
def test_bad_examples_are_one_line_naming_the_example(
    tmp_path: Path, examples: str, fragment: str
) -> None:
    path = write(tmp_path, f"depth:\n  user: '{{prompt}}を難しく'\n  {examples}\n")
    with pytest.raises(TemplateError) as info:
        load_templates(path)
    message = str(info.value)
    assert message.startswith(f"{path}: template 'depth'") and fragment in message, message


def test_judge_examples_reply_only_the_judge_words(tmp_path: Path) -> None:
    text = "judge:\n  user: '{prompt}?'\n  examples: [{prompt: a, reply: はい。}]\n"
    path = write(tmp_path, text)
    with pytest.raises(TemplateError, match="a judge example replies はい or いいえ, not 'はい。'"):
        load_templates(path)


def test_the_base_prompt_takes_no_examples(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "base_prompt:\n  user: '{domain}{task}'\n  examples: [{domain: a, task: b, reply: c}]\n",
    )
    with pytest.raises(TemplateError, match="'base_prompt' writes the base prompt, not a chat"):
        load_templates(path)


def test_a_file_with_the_old_name_seed_still_sets_the_base_prompt(tmp_path: Path) -> None:
    templates = load_templates(write(tmp_path, "seed: '{domain}について「{task}」'\n"))
    assert templates.base_prompt.user == "{domain}について「{task}」"
    assert templates.width == load_templates().width


def test_the_base_prompt_is_frozen_under_its_old_name() -> None:
    """run.json and the fingerprint were made with the key `seed`: a new key would give every
    run made before the rename another fingerprint, and resuming it would be refused."""
    frozen = load_templates().as_dict()
    assert "seed" in frozen and "base_prompt" not in frozen
    assert frozen["seed"] == load_templates().base_prompt.as_dict()
