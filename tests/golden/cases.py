"""What the golden test records: every command's output on fixed inputs, with the scripted engine.

`produce(work)` writes the inputs into `work`, runs the commands there and returns each
recorded output by its name under `tests/golden/expected/`. Only what is deterministic by
design is kept, byte for byte. Where a file also holds something that is not (the work
folder's path, a duration, a clock time, a host or process name), exactly those fields are
replaced by a `<placeholder>`, by the functions at the end of this file; no record, no count
and no other field is ever normalised.

The base prompts cycle over cases, and each case is scripted to take one path through the
pipeline: kept, kept after the fixer, or dropped for each reason the scripted engine can make
(see `RULES`). 40 prompts over 28 lines also wrap past the end of the prompt file.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner

from zero_one_instruction.cli import main

from ..queue_helpers import FAST, zoi
from ..scripted_engine import ENGINE

EXPECTED = Path(__file__).resolve().parent / "expected"

# case -> the scripted engine's responses for it (`judge@STEP`: the judge of STEP's text).
RULES: dict[str, dict[str, str]] = {
    "ok": {},
    "fixed": {"judge@width": "いいえ"},  # the fixer runs, its text passes: kept
    "wempty": {"width": "!empty"},  # the fixer works from the base prompt: kept
    "spaced": {"width": "  width|case=spaced 前後に空白のある依頼  "},  # stripped
    "trunc": {"answer": "!length:途中で切れた長い回答です。説明はまだ続きますが上限に達しました"},
    "dup": {"flatten": "flatten|case=dup 何度も出てくる同じ質問です"},  # for --dedup
    "refused": {"answer": "その依頼に答えるのは不可能です。別の質問であればお手伝いできます。"},
    "short": {"answer": "短い"},
    "final": {"judge@flatten": "いいえ"},
    "fixrej": {"judge@width": "いいえ", "judge@fix": "いいえ"},
    "fixempty": {"judge@width": "いいえ", "fix": "!empty"},
    "fixerr": {"judge@width": "いいえ", "fix": "!error"},
    "werr": {"width": "!error"},
    "jerr": {"judge@width": "!error"},
    "jinvalid": {"judge@width": "たぶん"},
    "derr": {"depth": "!error"},
    "dempty": {"depth": "!empty"},
    "ferr": {"flatten": "!error"},
    "fempty": {"flatten": "!empty"},
    "aerr": {"answer": "!error"},
    "aempty": {"answer": "!empty"},
    "cut": {"answer": "!cut:絵文字が半分で切れた回答です。"},
}
CASES = [
    *("ok", "fixed", "ok", "final", "short", "werr", "ok", "wempty", "fixrej", "jinvalid"),
    *("ok", "trunc", "dup", "refused", "cut", "aerr", "ok", "dempty", "dup", "fixempty"),
    *("jerr", "ferr", "fempty", "derr", "fixerr", "aempty", "spaced", "dup"),
]
PROMPTS = [f"質問 {i}: {{prompt}} と {{{{波括弧}}}} case={case}" for i, case in enumerate(CASES)]
N = 40


def _engine_kwargs() -> str:
    return "engine_kwargs:\n  rules:\n" + "".join(
        f"    {case}: {json.dumps(rules, ensure_ascii=False)}\n" for case, rules in RULES.items()
    )


def write_inputs(work: Path) -> None:
    """The prompt files and four configs: `main` (the case file and the default pipeline),
    `logged` (`main` logging every request), `variant` (a JSONL prompt file, no fixer, two
    depth steps, other filters, its own system prompt) and `builtin` (the built-in templates
    and base prompts, logging every request)."""
    (work / "prompts.txt").write_text("".join(p + "\n" for p in PROMPTS), encoding="utf-8")
    (work / "prompts.jsonl").write_text(
        "".join(
            json.dumps({"n": i, "text": p}, ensure_ascii=False) + "\n"
            for i, p in enumerate(PROMPTS)
        ),
        encoding="utf-8",
    )
    head = f"model_name: scripted\nengine: '{ENGINE}'\nbatch_size: 4\n"
    main = head + "seed: 20240611\nprompts: {file: prompts.txt}\n" + _engine_kwargs()
    (work / "main.yml").write_text(main, encoding="utf-8")
    logged = f"hardware_kwargs: {{requests: {work / 'logged-requests.jsonl'}}}\n"
    (work / "logged.yml").write_text(main + logged, encoding="utf-8")
    (work / "variant.yml").write_text(
        head + "seed: 7\nsystem_prompt: 簡潔に答えるアシスタントです。\n"
        "prompts: {file: prompts.jsonl, field: text}\n"
        "pipeline: {fixer: false, depth_steps: 2, drop_truncated_answers: true,"
        " refusal_marker: お答えできません, min_answer_chars: 28}\n" + _engine_kwargs(),
        encoding="utf-8",
    )
    (work / "builtin.yml").write_text(
        head + "seed: 3\ntemperature: 0.7\nrepetition_penalty: 1.05\n"
        "sampling: {width: {top_p: 0.8}, answer: {temperature: 0.5, max_tokens: 300}}\n"
        f"hardware_kwargs: {{requests: {work / 'requests.jsonl'}}}\n",
        encoding="utf-8",
    )


class Recorder:
    """Runs commands in `work` and collects the outputs to compare, by golden name."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.outputs: dict[str, bytes] = {}

    def keep(self, name: str, data: bytes) -> None:
        assert name not in self.outputs, name
        self.outputs[name] = data

    def keep_file(
        self, name: str, path: Path, normalise: Callable[[str], str] | None = None
    ) -> None:
        data = path.read_bytes()
        if normalise is not None:
            data = normalise(data.decode("utf-8")).encode("utf-8")
        self.keep(name, data)

    def console(
        self, name: str, args: list[str], code: int, stdout: str, stderr: str | None
    ) -> None:
        """The command, its exit code, its stdout and (unless left out) its stderr, as one file."""
        text = f"$ zoi {' '.join(args)}\nexit {code}\n--- stdout\n{stdout}"
        if stderr is not None:
            text += f"--- stderr\n{stderr}"
        self.keep(name, self.paths(durations(text)).encode("utf-8"))

    def cli(self, name: str | None, *args: str, code: int = 0) -> str:
        """A command in this process (`tests.clitools` style); its console kept as `name`."""
        result = CliRunner().invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == code, (args, result.stdout, result.stderr)
        if name is not None:
            self.console(name, list(args), result.exit_code, result.stdout, result.stderr)
        return result.stdout

    def process(
        self, name: str | None, *args: str, stderr: bool = True, tidy: Callable[[str], str] = str
    ) -> str:
        """A command as its own process, as a user runs `zoi run` and `zoi worker`. Their
        stderr (progress lines, log lines with rates and times) is left out with
        `stderr=False`."""
        done = zoi(*args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        if name is not None:
            shown = done.stderr if stderr else None
            self.console(name, list(args), done.returncode, tidy(done.stdout), shown)
        return done.stdout

    def paths(self, text: str) -> str:
        """The work folder differs between recording and testing: `<work>` stands for it."""
        return text.replace(str(self.work), "<work>")


# --- normalising the fields that are not deterministic by design -------------------------

_DURATION_LINE = re.compile(r"^time      .*$", re.MULTILINE)  # the summary's timing line
_SECONDS = re.compile(r" in \d+\.\d\d s\b")  # `zoi enqueue` and `zoi merge`: "in 0.03 s"


def durations(text: str) -> str:
    """A console's wall-clock figures: the summary's `time` line (seconds and the rates
    derived from them) and the "in N.NN s" of enqueue and merge."""
    return _SECONDS.sub(" in <seconds> s", _DURATION_LINE.sub("time      <duration>", text))


def _fields(text: str, *keys: str) -> str:
    """`"key": value` (a JSON string or number) as `"key": "<key>"` for each of `keys`, on the
    text as written: every other byte of the file stays as the command wrote it."""
    pattern = re.compile(rf'"({"|".join(keys)})": ("(?:[^"\\]|\\.)*"|-?[0-9][0-9.eE+-]*)')
    return pattern.sub(lambda m: f'"{m.group(1)}": "<{m.group(1)}>"', text)


def marker(text: str) -> str:
    """A done marker: which worker on which host ran the chunk, and when and how long."""
    return _fields(text, "worker", "host", "started_at", "finished_at", "seconds")


def run_file(text: str) -> str:
    """run.json: when and by which host and process the run was created."""
    return _fields(text, "created_at", "created_by")


def status_json(text: str) -> str:
    """`zoi status --json`: the throughput over the last minutes (the work's speed)."""
    return _fields(text, "prompts_per_s", "records_per_s", "tokens_per_s")


_RECENT_LINE = re.compile(r"^recent    .*?; ", re.MULTILINE)


def status_text(text: str) -> str:
    """`zoi status`: the same throughput, ahead of the ETA on its line."""
    return _RECENT_LINE.sub("recent    <rates>; ", text)


_REASON_LINE = re.compile(r"^  (\S+) +(\d+)  ")


def ties_sorted(text: str) -> str:
    """`zoi run`'s summary lists drop reasons by count; reasons with equal counts come in the
    order the launcher happened to find the chunks' markers on disk, so those are put in
    alphabetical order. Every line stays whole, and the counts keep their order."""
    lines = text.splitlines(keepends=True)

    def key(line: str) -> tuple[int, str]:
        reason, count = _REASON_LINE.match(line).groups()  # type: ignore[union-attr]
        return -int(count), reason

    out: list[str] = []
    while lines:
        block = []
        while lines and _REASON_LINE.match(lines[0]):
            block.append(lines.pop(0))
        out += sorted(block, key=key) if block else [lines.pop(0)]
    return "".join(out)


def sorted_lines(text: str) -> str:
    """Requests in the order they reached the engine, which is the order the concurrent
    prompts happen to interleave in, not part of the behaviour: sorted, every line whole."""
    return "".join(sorted(text.splitlines(keepends=True)))


# --- the commands -------------------------------------------------------------------------


def _generate(rec: Recorder, name: str, config: str, start: int, end: int, *extra: str) -> None:
    out = rec.work / name
    out.mkdir()
    rec.cli(
        f"{name}/console.txt",
        *("generate", "-c", str(rec.work / config), "--start", str(start), "--end", str(end)),
        *("-o", str(out / "records.jsonl"), "--trace", str(out / "trace.jsonl"), *extra),
    )
    rec.keep_file(f"{name}/records.jsonl", out / "records.jsonl")
    rec.keep_file(f"{name}/trace.jsonl", out / "trace.jsonl")


def single_process(rec: Recorder) -> None:
    """`zoi generate` (three configs), `zoi preview` (JSON and text), `zoi config`."""
    work = rec.work
    _generate(rec, "generate", "main.yml", 0, N, "--id-start", "100")
    _generate(rec, "variant", "variant.yml", 3, 3 + N)
    # The built-in base prompts are 54 tasks x 54 domains: this range wraps past the end.
    _generate(rec, "builtin", "builtin.yml", 2913, 2919)
    rec.keep_file("builtin/requests.jsonl", work / "requests.jsonl", sorted_lines)
    main_yml = str(work / "main.yml")
    preview = ["preview", "-c", main_yml, "--start", "3", "-n", "20", "--json"]
    rec.keep("preview/main.jsonl", rec.cli(None, *preview).encode())
    rec.cli("preview/main.txt", "preview", "-c", main_yml, "--start", "3", "-n", "12")
    rec.cli("preview/variant.txt", "preview", "-c", str(work / "variant.yml"), "-n", "12")
    # The requests of the fixer path, with a base prompt holding `{prompt}` and `{{...}}`.
    rec.cli(None, "preview", "-c", str(work / "logged.yml"), "--start", "7", "-n", "2")
    rec.keep_file("preview/requests.jsonl", work / "logged-requests.jsonl", sorted_lines)
    rec.cli("config/show.txt", "config", "show", main_yml)
    rec.cli("config/check.txt", "config", "check", main_yml)


def launcher(rec: Recorder) -> None:
    """`zoi run`: the embedded Redis, a spawned worker, chunks of 7 (the last one short)."""
    out = rec.work / "run.jsonl"
    args = ["run", "-c", str(rec.work / "main.yml"), "--num-prompts", str(N), "--chunk-size", "7"]
    rec.process("run/console.txt", *args, "-o", str(out), stderr=False, tidy=ties_sorted)
    rec.keep_file("run/out.jsonl", out)


MERGES = {
    "default": [],
    "id-start": ["--id-start", "1000"],
    "messages": ["--format", "messages"],
    "with-meta": ["--with-meta"],
    "dedup": ["--dedup"],
    "all": ["--format", "messages", "--with-meta", "--dedup", "--id-start", "5"],
}


def queue(rec: Recorder) -> None:
    """`zoi enqueue`, `zoi worker --burst`, `zoi status`, the run directory, then `zoi merge`
    with each option, and on a run with a chunk undone: refused, then --allow-partial."""
    run = rec.work / "queue.run"
    rec.cli(
        "queue/enqueue.txt",
        *("enqueue", "-c", str(rec.work / "main.yml"), "--run", str(run)),
        *("--start", "0", "--end", str(N), "--chunk-size", "6"),
    )
    rec.process(None, "worker", "--run", str(run), "--burst", *FAST)
    rec.keep(
        "queue/status.json",
        status_json(rec.paths(rec.cli(None, "status", "--run", str(run), "--json"))).encode(),
    )
    rec.keep(
        "queue/status.txt",
        status_text(rec.paths(rec.cli(None, "status", "--run", str(run)))).encode(),
    )
    rec.keep_file("queue/run.json", run / "run.json", lambda t: run_file(rec.paths(t)))
    for path in sorted((run / "shards").iterdir()):
        if path.suffix == ".done":
            rec.keep_file(f"queue/shards/{path.name}", path, marker)
        elif path.suffix == ".jsonl":
            rec.keep_file(f"queue/shards/{path.name}", path)
    for name, options in MERGES.items():
        out = rec.work / f"merge-{name}.jsonl"
        rec.cli(f"queue/merge-{name}.txt", "merge", "--run", str(run), "-o", str(out), *options)
        rec.keep_file(f"queue/merge-{name}.jsonl", out)
    done = next((run / "shards").glob("0000000012-*.done"))
    done.rename(done.with_name(done.name + ".aside"))
    out = rec.work / "merge-partial.jsonl"
    rec.cli("queue/merge-refused.txt", "merge", "--run", str(run), "-o", str(out), code=1)
    rec.cli(
        "queue/merge-partial.txt", "merge", "--run", str(run), "-o", str(out), "--allow-partial"
    )
    rec.keep_file("queue/merge-partial.jsonl", out)


def produce(work: Path) -> dict[str, bytes]:
    """Every golden output, made afresh in the empty folder `work`."""
    write_inputs(work)
    rec = Recorder(work)
    single_process(rec)
    launcher(rec)
    queue(rec)
    return rec.outputs


def clear(directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)
