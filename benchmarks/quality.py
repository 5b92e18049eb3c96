"""Quality: what the default prompts make of base prompts on a real small model.

Runs N built-in base prompts (tasks x domains, spread so that no two share a task or, up to
the list's length, a domain) and a file of simple questions through `zoi generate --trace` on
a real model, then reads the traces: per step, how many prompts reached it, how many passed,
and why the rest were dropped; over the kept records, how many are mostly Japanese script,
carry Chinese-only characters, leak template scaffolding, have a question that is really an
answer, or an answer cut at max_tokens. Throughput is not measured here (see real_engine.py).

It needs the real model (about 12 GiB on the CPU), so run_all runs it only when named:

    flock /tmp/zoi-real-engine.lock .venv/bin/python -m benchmarks.quality --prompts 32
    .venv/bin/python -m benchmarks.run_all --only quality
    .venv/bin/python -m benchmarks.quality --scripted --prompts 4   # no model: checks it runs

The metrics are heuristics meant to be read with the records (kept in --out): they count
what is easy to see by script and pattern, not whether a fact is right.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from zero_one_instruction.config import Prompts, load_config
from zero_one_instruction.engines import load_engine
from zero_one_instruction.generator import load_inputs
from zero_one_instruction.modelstamp import read_stamp
from zero_one_instruction.operators import OPERATORS, TEMPLATES
from zero_one_instruction.pipeline import JUDGE_CHOICES, NO, YES, JudgeKind, Pipeline
from zero_one_instruction.prompt_sources import _builtin_list, load_source
from zero_one_instruction.templates import Templates, load_templates
from zero_one_instruction.textstats import distinct_ngram_ratio

from .common import ROOT, SCRIPTED, machine, table, zoi

MODEL = Path("/work/models/qwen2.5-coder-1.5b-instruct")
CONFIG = ROOT / "benchmarks" / "quality.yml"
QUESTIONS = ROOT / "benchmarks" / "simple_questions_ja.txt"
JUDGE_SET = ROOT / "benchmarks" / "judge_set_ja.json"

KANA = re.compile(r"[\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
KANJI = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff々〆]")
# Simplified Chinese forms that Japanese does not use (Japanese writes 这→これ, 们, 说→説,
# 时→時, 种→種 ...): one of them in a record means the model slipped into Chinese.
CHINESE_ONLY = frozenset(
    "氧碳这们么说时为过还种发进动应关现实问题样经长东车气电话书买卖见觉让认识请谁该论两吗呢给从"
)
# Template labels and framing that belong to the step prompts, never to a finished question.
LEAK = re.compile(
    r"【[^】\n]{0,30}】|テーマ\s*[:：]|タスク\s*[:：]|新しいプロンプト|元のプロンプト|評価対象"
    r"|修正後のプロンプト|書き換えたプロンプト|完成した質問文|(?:元の|新しい)依頼文?\s*[:：]"
    r"|^\s*(?:依頼文?|質問文?|プロンプト|指示文?|問題文?)\s*[:：]",
    re.MULTILINE,
)
# How a request or question to an assistant ends or asks, in Japanese.
REQUEST = re.compile(
    r"[?？]|ください|下さい|ませんか|でしょうか|ですか|ますか|ますでしょうか|教えて|お願い"
    r"|てほしい|てもらえ|頂け|いただけ|しなさい|せよ|答えよ|述べよ|挙げよ|示せ|求めよ"
)
# How an answer opens, or a label that only an answer carries.
ANSWER_OPENER = re.compile(
    r"^\s*(?:はい[、。]|いいえ[、。]|もちろん|承知|かしこまり|了解|以下(?:は|に|の)|"
    r"こんにちは|ありがとうございます|[#*]+\s)|^\s*(?:回答|答え|解答)\s*[:：]",
    re.MULTILINE,
)

# A trace records a judge's kind as its `attempt` number.
JUDGES = {
    JudgeKind.FIRST: "judge (width)",
    JudgeKind.AFTER_FIX: "judge (after fix)",
    JudgeKind.FINAL: "judge (final)",
    JudgeKind.SAME_REQUEST: "judge (same request)",
}
STAGES = [
    "width",
    "judge (width)",
    "fix",
    "judge (after fix)",
    "depth",
    "judge (same request)",
    "flatten",
    "judge (final)",
    "answer",
]


def japanese_share(text: str) -> float:
    """Kana and kanji among the letters (digits, punctuation and spaces do not count)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    japanese = sum(1 for c in letters if KANA.match(c) or KANJI.match(c))
    return japanese / len(letters)


def mostly_japanese(text: str, threshold: float = 0.8) -> bool:
    """Mostly Japanese script, and some kana: Chinese text is all kanji-range characters, so
    the share alone would call it Japanese."""
    return japanese_share(text) >= threshold and bool(KANA.search(text))


def chinese_chars(text: str) -> str:
    """The Chinese-only characters in `text`, in order of appearance, each once."""
    return "".join(dict.fromkeys(c for c in text if c in CHINESE_ONLY))


# The templates beyond the original steps' (depth operators, the no-gain judge): copying
# their instructions into a question is a leak too, whether or not the run sent them.
OPTIONAL_STEPS = (
    *(t for t in TEMPLATES.values() if t != "depth"),
    "same_request",
    "follow_up",
    "follow_up_judge",
)
# A run of this many characters of a template's instructions, found in a question, was
# copied from the template (shorter runs are common phrasing, like 「を説明してください。」).
FRAGMENT_CHARS = 14
_PIECES = re.compile(r"[^。\n]+[。:：]?")
_PLACEHOLDER = re.compile(r"\{[A-Za-z_]+\}")


def template_fragments(templates: Templates) -> tuple[str, ...]:
    """The labels and instruction sentences of the step prompts (the answer step's user
    message is the question itself, so it has none): whatever templates a run uses, a
    question that quotes them leaks scaffolding, with no pattern list to keep up to date."""
    pieces: set[str] = set()
    for name in ("width", "judge", "fix", "depth", "flatten", *OPTIONAL_STEPS):
        step = templates.step(name)
        for text in (step.system or "", step.user):
            for piece in _PIECES.findall(_PLACEHOLDER.sub("\n", text)):
                piece = piece.strip(" -・\t")
                if len(piece) >= FRAGMENT_CHARS or piece.endswith((":", "：")):
                    pieces.add(piece)
    return tuple(sorted(pieces, key=lambda p: (-len(p), p)))


def _copied(piece: str, text: str) -> bool:
    if piece.endswith((":", "：")) or len(piece) < FRAGMENT_CHARS:
        return piece in text
    return any(
        piece[i : i + FRAGMENT_CHARS] in text for i in range(len(piece) - FRAGMENT_CHARS + 1)
    )


def leaks(text: str, fragments: tuple[str, ...] = ()) -> list[str]:
    """The template labels and framing in `text`, and the template pieces it copies from."""
    found = [m.group(0).strip() for m in LEAK.finditer(text)]
    return found + [piece for piece in fragments if piece not in found and _copied(piece, text)]


def looks_like_answer(text: str) -> bool:
    """A question that is really an answer: it opens as an answer does, or nowhere asks
    anything (no question mark, no ください, no ですか ...)."""
    return bool(ANSWER_OPENER.search(text)) or not REQUEST.search(text)


def stage(step: dict[str, Any]) -> str:
    """The funnel stage of one step trace: judges are told apart by their kind, and the
    steps of a later turn by the turn (`turn 2 answer`)."""
    name = JUDGES.get(step["attempt"], "judge") if step["step"] == "judge" else step["step"]
    return f"turn {step['turn']} {step['step']}" if "turn" in step else name


def later_stages(outcomes: list[dict[str, Any]]) -> list[str]:
    """The later turns' stages that occur, in turn order: follow-up, its judge, answer."""
    turns = sorted({s["turn"] for o in outcomes for s in o["steps"] if "turn" in s})
    return [f"turn {t} {step}" for t in turns for step in ("follow_up", "judge", "answer")]


def truncated(outcome: dict[str, Any]) -> bool:
    """The answer stopped at max_tokens."""
    answers = [s for s in outcome["steps"] if s["step"] == "answer" and "turn" not in s]
    return bool(answers) and answers[-1]["finish_reason"] == "length"


def funnel(outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage: prompts that reached it, passed it, were told いいえ there, dropped there
    (by reason). A first-judge いいえ with the fixer on is not a drop: the prompt goes on to
    the fixer. Answer filters (refused, too short, truncated) count at the answer stage."""
    rows = []
    for name in STAGES + later_stages(outcomes):
        reached = [o for o in outcomes if any(stage(s) == name for s in o["steps"])]
        dropped = Counter(
            o["drop_reason"] if not o["kept"] else o["ended"]
            for o in reached
            if (not o["kept"] or "ended" in o) and stage(o["steps"][-1]) == name
        )
        said_no = sum(
            1 for o in reached for s in o["steps"] if stage(s) == name and s["verdict"] is False
        )
        rows.append(
            {
                "stage": name,
                "reached": len(reached),
                "passed": len(reached) - sum(dropped.values()),
                "said_no": said_no if "judge" in name else None,
                "dropped": dict(sorted(dropped.items())),
            }
        )
    return rows


def by_operator(outcomes: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per depth operator: the depth steps it ran and those of them in kept records (a run
    without operators names none: its depth steps are all `constraints`)."""
    counts: dict[str, dict[str, int]] = {}
    for o in outcomes:
        for step in o["steps"]:
            if step["step"] == "depth":
                row = counts.setdefault(step.get("operator", "constraints"), {"ran": 0, "kept": 0})
                row["ran"] += 1
                row["kept"] += int(o["kept"])
    return {name: counts[name] for name in OPERATORS if name in counts}


def _first_text(outcome: dict[str, Any], step: str) -> str | None:
    return next((s["text"] for s in outcome["steps"] if s["step"] == step), None)


def summarize(outcomes: list[dict[str, Any]], fragments: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every figure the report shows, from trace records (`Outcome.to_dict()`); `fragments`
    are the run's template pieces (`template_fragments`)."""
    kept = [o for o in outcomes if o["kept"]]
    widths = [t for t in (_first_text(o, "width") for o in outcomes) if t]
    japanese = [o for o in kept if mostly_japanese(o["question"]) and mostly_japanese(o["answer"])]
    chinese = {o["index"]: chinese_chars(o["question"] + o["answer"]) for o in kept}
    leaked = {o["index"]: leaks(o["question"], fragments) for o in kept}
    return {
        "prompts": len(outcomes),
        "kept": len(kept),
        "funnel": funnel(outcomes),
        "operators": by_operator(outcomes),
        "dropped": dict(
            sorted(Counter(o["drop_reason"] for o in outcomes if not o["kept"]).items())
        ),
        "kept_mostly_japanese": len(japanese),
        "kept_with_chinese": {i: c for i, c in chinese.items() if c},
        "kept_with_leaks": {i: found for i, found in leaked.items() if found},
        "kept_answer_like": [o["index"] for o in kept if looks_like_answer(o["question"])],
        "kept_truncated": [o["index"] for o in kept if truncated(o)],
        "width_outputs": len(widths),
        "width_leaks": sum(1 for t in widths if leaks(t, fragments)),
        "width_answer_like": sum(1 for t in widths if looks_like_answer(t)),
        **({"later_turns": later_turns(kept, fragments)} if later_stages(outcomes) else {}),
    }


def later_turns(kept: list[dict[str, Any]], fragments: tuple[str, ...]) -> dict[str, Any]:
    """The first checks again over the kept records' later turns (a follow-up question and
    its answer), and how varied the follow-up questions are."""
    pairs = [(t["question"], t["answer"]) for o in kept for t in o.get("later_turns", [])]
    questions = [q for q, _ in pairs]
    cut = sum(
        1
        for o in kept
        for s in o["steps"]
        if "turn" in s and s["step"] == "answer" and s["finish_reason"] == "length"
    )
    return {
        "records_with_more_turns": sum(1 for o in kept if o.get("later_turns")),
        "turns": len(pairs),
        "mostly_japanese": sum(1 for q, a in pairs if mostly_japanese(q) and mostly_japanese(a)),
        "with_chinese": sum(1 for q, a in pairs if chinese_chars(q + a)),
        "with_leaks": sum(1 for q in questions if leaks(q, fragments)),
        "answer_like": sum(1 for q in questions if looks_like_answer(q)),
        "truncated": cut,
        "ended": dict(sorted(Counter(o["ended"] for o in kept if "ended" in o).items())),
        "distinct_question": {
            str(n): distinct_ngram_ratio(questions, n) for n in (1, 2, 3) if questions
        },
    }


def builtin_indices(count: int, tasks: int, domains: int) -> list[int]:
    """Indices whose tasks are all different (up to `tasks` of them) and whose domains step
    by 7, so a small sample is not 8 domains of the first task."""
    return [(k % tasks) * domains + (k * 7 + k // tasks) % domains for k in range(count)]


def builtin_prompts(count: int, templates_file: Path | None) -> list[dict[str, Any]]:
    """The built-in base prompts the run's base_prompt template would give, with their indices."""
    templates = load_templates(templates_file)
    source = load_source(Prompts(source="builtin"), templates.base_prompt)
    tasks, domains = len(_builtin_list("tasks_ja.txt")), len(_builtin_list("domains_ja.txt"))
    return [
        {"index": i, "prompt": source.prompt(i)} for i in builtin_indices(count, tasks, domains)
    ]


def write_config(
    out: Path,
    name: str,
    prompts_file: Path,
    templates: Path | None,
    model: Path | None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """The benchmark's engine settings (or the scripted engine) with this set's prompts;
    `overrides` are top-level config keys (a test scripts the engine through them)."""
    if model is None:
        data: dict[str, Any] = {"model_name": "scripted", "engine": SCRIPTED, "batch_size": 8}
    else:
        data = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
        data["model_name"] = str(model)
    data["prompts"] = {"source": "file", "file": str(prompts_file)}
    if templates is not None:
        data["templates"] = str(templates.resolve())
    for key, value in (overrides or {}).items():
        _set(data, key, value)
    config = out / f"{name}.yml"
    config.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return config


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a config key given as `section.key` (e.g. `pipeline.depth_operators`)."""
    *parents, last = dotted.split(".")
    for name in parents:
        data = data.setdefault(name, {})
    data[last] = value


def parse_setting(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` from the command line, the value read as YAML (`{deepen: 1}`, `2`)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key, yaml.safe_load(value)


def run_sets(
    out: Path,
    sets: dict[str, list[str]],
    templates: Path | None,
    model: Path | None,
    overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One `zoi generate --trace` over every set's prompts at once (one engine start, full
    batches: on a 2-core CPU two half-empty runs cost nearly twice as long), then one summary
    per set. Each outcome's `index` is renumbered to its position within its set."""
    prompts = [p for items in sets.values() for p in items]
    prompts_file = out / "prompts.jsonl"
    prompts_file.write_text(
        "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts),
        encoding="utf-8",
    )
    config = write_config(out, "quality", prompts_file, templates, model, overrides)
    records, trace = out / "records.jsonl", out / "trace.jsonl"
    seconds = zoi(
        "generate",
        "-c",
        str(config),
        "--start",
        "0",
        "--end",
        str(len(prompts)),
        "-o",
        str(records),
        "--trace",
        str(trace),
        "--overwrite",
    )
    outcomes = [json.loads(line) for line in trace.read_text(encoding="utf-8").splitlines()]
    lines = iter(records.read_text(encoding="utf-8").splitlines(keepends=True))
    fragments = template_fragments(load_templates(templates))
    results, offset = [], 0
    for name, items in sets.items():
        mine = outcomes[offset : offset + len(items)]
        kept_lines = [next(lines) for o in mine if o["kept"]]  # records are in index order
        for outcome in mine:
            outcome["index"] -= offset
        offset += len(items)
        results.append(
            {
                "set": name,
                "seconds": round(seconds, 1),
                "trace": str(trace),
                "offset": offset - len(items),
                **summarize(mine, fragments),
                "diversity": diversity(out / name, kept_lines),
            }
        )
    return results


def diversity(stem: Path, record_lines: list[str]) -> dict[str, Any]:
    """The diversity figures `zoi report` gives for a set's kept records: distinct n-gram
    shares, duplicate and near-duplicate questions, the most frequent openings."""
    if not record_lines:
        return {}
    records = stem.with_suffix(".records.jsonl")
    records.write_text("".join(record_lines), encoding="utf-8")
    figures = stem.with_suffix(".report.json")
    zoi("report", str(records), "--json", str(figures), "--no-tokens")
    data = json.loads(figures.read_text(encoding="utf-8"))
    distinct = data["diversity"]["distinct_ngrams"]
    return {
        "distinct_question": distinct["question"],
        "distinct_answer": distinct["answer"],
        "exact_duplicate_questions": data["duplicates"]["exact_duplicate_questions"],
        "near_duplicate_questions": data["duplicates"]["near_duplicate_questions"],
        "question_openings": data["diversity"]["question_openings"][:3],
    }


def run_set(
    out: Path,
    name: str,
    prompts: list[str],
    templates: Path | None,
    model: Path | None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One set alone: `run_sets` with a single set."""
    return run_sets(out, {name: prompts}, templates, model, overrides)[0]


async def _verdicts(config_file: Path, texts: list[str]) -> list[str]:
    """The first judge's verdict on each text, through the run's own engine and requests."""
    config = load_config(config_file)
    inputs = load_inputs(config)
    engine = load_engine(config)
    try:
        pipeline = Pipeline(config, inputs.templates, inputs.source, engine)
        requests = [
            pipeline.request(i, "judge", JUDGE_CHOICES, {"prompt": text}, judge=JudgeKind.FIRST)
            for i, text in enumerate(texts)
        ]
        completions = await asyncio.gather(*(engine.complete(r) for r in requests))
    finally:
        engine.close()
    return [c.text.strip() for c in completions]


def judge_check(config_file: Path, labelled: Path = JUDGE_SET) -> dict[str, Any]:
    """How the judge does on texts whose verdict is known: good requests it should pass, and
    answers, scaffolding, Chinese, image or real-time requests it should reject."""
    data = json.loads(labelled.read_text(encoding="utf-8"))
    good, bad = data["good"], data["bad"]
    verdicts = asyncio.run(_verdicts(config_file, good + bad))
    return {
        "good": len(good),
        "good_passed": sum(v == YES for v in verdicts[: len(good)]),
        "bad": len(bad),
        "bad_rejected": sum(v == NO for v in verdicts[len(good) :]),
        "misjudged": [
            t for t, v in zip(good + bad, verdicts, strict=True) if (t in good) != (v == YES)
        ],
    }


def read_questions(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def measure(
    count: int,
    questions: Path | None,
    templates: Path | None,
    model: Path | None,
    out: Path,
    judge: bool = True,
    overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    sets: dict[str, list[str]] = {}
    chosen = builtin_prompts(count, templates)
    if chosen:
        sets["builtin"] = [c["prompt"] for c in chosen]
    if questions is not None:
        sets["questions"] = read_questions(questions)
    results = run_sets(out, sets, templates, model, overrides)
    if chosen:
        results[0]["indices"] = [c["index"] for c in chosen]
    if judge:  # after the run: one engine at a time
        results[0]["judge_check"] = judge_check(out / "quality.yml")
    (out / "quality.json").write_text(
        json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8"
    )
    return results


def run(smoke: bool = False) -> list[dict[str, Any]]:
    """run_all's entry: the scripted engine at smoke size, else the real model (opt-in)."""
    out = Path(tempfile.mkdtemp(prefix="zoi-quality-"))
    if smoke:
        return measure(4, QUESTIONS, None, None, out)
    if read_stamp(MODEL) is None:
        raise SystemExit(f"{MODEL} holds no model: make it with `zoi real-model {MODEL}`")
    return measure(32, QUESTIONS, None, MODEL, out)


def _percent(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.0f}%)" if whole else "0/0"


def _reasons(dropped: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in dropped.items()) or "-"


def funnel_table(result: dict[str, Any]) -> str:
    rows = [
        [
            r["stage"],
            str(r["reached"]),
            _percent(r["passed"], r["reached"]),
            "-" if r["said_no"] is None else str(r["said_no"]),
            _reasons(r["dropped"]),
        ]
        for r in result["funnel"]
    ]
    return table(["step", "reached", "passed", "said いいえ", "dropped there"], rows)


def quality_table(results: Iterable[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        kept = r["kept"]
        rows.append(
            [
                r["set"],
                _percent(kept, r["prompts"]),
                _percent(r["kept_mostly_japanese"], kept),
                str(len(r["kept_with_chinese"])),
                str(len(r["kept_with_leaks"])),
                str(len(r["kept_answer_like"])),
                str(len(r["kept_truncated"])),
                f"{r['width_leaks']}/{r['width_outputs']}",
                f"{r['width_answer_like']}/{r['width_outputs']}",
                f"{r['seconds']:.0f}",
            ]
        )
    header = [
        "set",
        "kept",
        "kept, mostly Japanese",
        "kept with Chinese-only chars",
        "kept with leaks",
        "kept, question is an answer",
        "kept, answer truncated",
        "width: leaks",
        "width: answer-like",
        "seconds",
    ]
    return table(header, rows)


def judge_line(check: dict[str, Any]) -> str:
    return (
        f"judge set: passed {_percent(check['good_passed'], check['good'])} of good requests, "
        f"rejected {_percent(check['bad_rejected'], check['bad'])} of bad texts"
    )


def _shares(distinct: dict[str, float]) -> str:
    return " / ".join(f"{distinct[n]:.2f}" for n in ("1", "2", "3") if n in distinct)


def diversity_table(results: Iterable[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        d = r.get("diversity") or {}
        if not d:
            continue
        openings = ", ".join(f"「{text}」 {n}" for text, n in d["question_openings"])
        rows.append(
            [
                r["set"],
                _shares(d["distinct_question"]),
                _shares(d["distinct_answer"]),
                str(d["exact_duplicate_questions"]),
                str(d["near_duplicate_questions"]),
                openings,
            ]
        )
    header = [
        "set",
        "distinct 1/2/3-grams, questions",
        "same, answers",
        "duplicate questions",
        "near-duplicate questions",
        "most frequent openings",
    ]
    return table(header, rows)


def operator_table(result: dict[str, Any]) -> str:
    rows = [
        [name, str(row["ran"]), _percent(row["kept"], row["ran"])]
        for name, row in result["operators"].items()
    ]
    return table(["operator", "depth steps", "in kept records"], rows)


def later_table(results: Iterable[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        t = r.get("later_turns")
        if not t:
            continue
        rows.append(
            [
                r["set"],
                _percent(t["records_with_more_turns"], r["kept"]),
                _percent(t["mostly_japanese"], t["turns"]),
                str(t["with_chinese"]),
                str(t["with_leaks"]),
                str(t["answer_like"]),
                str(t["truncated"]),
                _shares(t["distinct_question"]) if t["distinct_question"] else "-",
                _reasons(t["ended"]),
            ]
        )
    header = [
        "set",
        "kept records with a 2nd turn",
        "later turns, mostly Japanese",
        "with Chinese-only chars",
        "follow-ups with leaks",
        "follow-up is an answer",
        "later answers truncated",
        "follow-ups: distinct 1/2/3-grams",
        "ended early",
    ]
    return table(header, rows)


def report(results: list[dict[str, Any]]) -> str:
    parts = [quality_table(results), "", diversity_table(results)]
    if any(r.get("later_turns") for r in results):
        parts += ["", later_table(results)]
    if results and "judge_check" in results[0]:
        parts.append("\n" + judge_line(results[0]["judge_check"]))
    for r in results:
        parts.append(f"\n{r['set']}: {_reasons(r['dropped'])} (trace: {r['trace']})\n")
        parts.append(funnel_table(r))
        if r["operators"]:
            parts.append("\n" + operator_table(r))
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32, help="built-in base prompts (0: none)")
    parser.add_argument("--questions", type=Path, default=QUESTIONS, help="one question a line")
    parser.add_argument("--no-questions", action="store_true", help="skip the questions file")
    parser.add_argument("--templates", type=Path, help="a templates YAML to try instead")
    parser.add_argument("--model", type=Path, default=MODEL, help="the model's folder")
    parser.add_argument("--scripted", action="store_true", help="the scripted engine, no model")
    parser.add_argument("--out", type=Path, help="folder for records, traces and quality.json")
    parser.add_argument("--no-judge-check", action="store_true", help="skip the judge set")
    parser.add_argument(
        "--set",
        type=parse_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config setting for this run, e.g. 'pipeline.depth_operators={deepen: 1}'",
    )
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="zoi-quality-"))
    questions = None if args.no_questions else args.questions
    model = None if args.scripted else args.model
    print(f"{machine()}; {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; model {model}")
    settings = dict(args.set)
    results = measure(
        args.prompts, questions, args.templates, model, out, not args.no_judge_check, settings
    )
    print(f"settings: {settings or 'defaults'}")
    print(report(results))
    print(f"\nJSON, records and traces: {out}")


if __name__ == "__main__":
    main()
