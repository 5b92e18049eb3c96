"""`engine: openai` against a fake OpenAI-compatible server in the test process
(tests/fakeopenai.py): request bodies, routing, the judge's constraint, retries, failures,
and the start-up check."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import time
from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from zero_one_instruction.config import Config, parse_config
from zero_one_instruction.engines import (
    EngineDead,
    Message,
    Request,
    RequestError,
    close_engine,
    start_engine,
)
from zero_one_instruction.engines.openai import OpenAIEngine
from zero_one_instruction.engines.servercheck import EndpointError
from zero_one_instruction.errors import ConfigError, ZoiError
from zero_one_instruction.pipeline import Pipeline
from zero_one_instruction.prompt_sources import PromptSource
from zero_one_instruction.templates import load_templates

from .fakeopenai import FakeOpenAI, NotHttp, Reply, chat_answer, dead_port

JUDGE = ("はい", "いいえ")
KEY = "sk-test-0123456789abcdef"


def openai_config(urls: list[str], **overrides: Any) -> Config:
    """A config for engine openai over `urls`; `openai` in overrides is merged into its
    section, and retries are quick."""
    section = {"endpoints": urls, "retry_deadline": 5.0, **overrides.pop("openai", {})}
    data = {"model_name": "served-model", "engine": "openai", "openai": section, **overrides}
    return parse_config(data, "test.yml")


def judge_pool_config(main_url: str, judge_url: str) -> Config:
    """The judge asks `big-judge`, served at `judge_url`; the other steps `main_url`."""
    return openai_config(
        [main_url],
        step_models={"judge": "big-judge"},
        openai={"models": {"big-judge": {"endpoints": [judge_url]}}},
    )


def request(step: str = "answer", seed: int = 1, **fields: Any) -> Request:
    values: dict[str, Any] = {
        "step": step,
        "messages": (Message("system", "あなたは助手です。"), Message("user", "質問です。")),
        "max_tokens": 64,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": seed,
        **fields,
    }
    if step == "judge":
        values.setdefault("choices", JUDGE)
    return Request(**values)


def with_engine(config: Config, body: Callable[[OpenAIEngine], Coroutine[Any, Any, Any]]) -> Any:
    """Start the engine on a fresh loop, run `body` with it, close it."""

    async def main() -> Any:
        engine = await start_engine(config)
        try:
            return await body(engine)
        finally:
            await close_engine(engine)

    return asyncio.run(main())


def chats(fake: FakeOpenAI) -> list[dict[str, Any]]:
    """The chat requests the fake received, without the start-up's judge probes."""
    return [b for b in fake.requests if b["messages"][-1]["content"] != "Say hello."]


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries a few milliseconds apart: the behaviour, not the waiting, is under test."""
    monkeypatch.setattr("zero_one_instruction.engines.backoff.BASE_SECONDS", 0.01)
    monkeypatch.setattr("zero_one_instruction.engines.openai.BASE_SECONDS", 0.01)


# --- requests and answers ------------------------------------------------------------------


def test_a_request_carries_the_model_the_sampling_and_the_seed() -> None:
    with FakeOpenAI() as fake:
        config = openai_config([fake.url], chat_template_kwargs={"enable_thinking": False})

        async def body(engine: OpenAIEngine) -> Any:
            return await engine.complete(request(seed=12345))

        completion = with_engine(config, body)
    sent = chats(fake)[-1]
    assert sent["model"] == "served-model" and sent["n"] == 1
    assert (sent["seed"], sent["max_tokens"], sent["temperature"], sent["top_p"]) == (
        12345,
        64,
        0.7,
        0.9,
    )
    assert sent["messages"] == [
        {"role": "system", "content": "あなたは助手です。"},
        {"role": "user", "content": "質問です。"},
    ]
    assert sent["chat_template_kwargs"] == {"enable_thinking": False}
    assert "repetition_penalty" not in sent  # 1.0 is off: not sent to servers without it
    assert "structured_outputs" not in sent
    assert completion.text.startswith("これはテスト用") and completion.finish_reason == "stop"
    assert completion.prompt_tokens == 7 and completion.completion_tokens == len(completion.text)
    assert completion.choice_probabilities is None


def test_repetition_penalty_and_engine_kwargs_are_sent_when_set() -> None:
    with FakeOpenAI() as fake:
        config = openai_config([fake.url], engine_kwargs={"top_k": 20, "min_p": 0.05})

        async def body(engine: OpenAIEngine) -> Any:
            return await engine.complete(request(repetition_penalty=1.1))

        with_engine(config, body)
    sent = chats(fake)[-1]
    assert sent["repetition_penalty"] == 1.1
    assert (sent["top_k"], sent["min_p"]) == (20, 0.05)
    assert "chat_template_kwargs" not in sent


def test_step_models_send_the_judge_to_its_own_model_and_pool() -> None:
    with FakeOpenAI() as main, FakeOpenAI(models=("big-judge",)) as judges:
        config = judge_pool_config(main.url, judges.url)

        async def body(engine: OpenAIEngine) -> Any:
            return [await engine.complete(request(step)) for step in ("width", "judge", "answer")]

        _, verdict, _ = with_engine(config, body)
    assert verdict.text == "はい"
    assert [b["model"] for b in chats(main)] == ["served-model", "served-model"]
    assert [b["model"] for b in chats(judges)] == ["big-judge"]
    assert chats(judges)[0]["structured_outputs"] == {"choice": list(JUDGE)}
    assert main.model_lists == 1 and judges.model_lists == 1
    assert all(b["model"] == "big-judge" for b in judges.requests)  # the probe went there too


@pytest.mark.parametrize(
    ("honours", "field"),
    [
        ("structured_outputs", "structured_outputs"),
        ("guided_choice", "guided_choice"),
        ("json_schema", "response_format"),
    ],
)
def test_auto_finds_the_constraint_the_server_keeps(honours: str, field: str) -> None:
    """A server that ignores an unknown field answers freely: the probe sees it and moves on
    to the next way of asking."""
    with FakeOpenAI(honours=honours) as fake:
        config = openai_config([fake.url])

        async def body(engine: OpenAIEngine) -> Any:
            return await engine.complete(request("judge"))

        verdict = with_engine(config, body)
    assert verdict.text == "はい"
    judged = chats(fake)[-1]
    assert field in judged
    assert not ({"structured_outputs", "guided_choice", "response_format"} - {field}) & set(judged)
    if honours == "json_schema":
        assert judged["max_tokens"] >= 32  # room for the quotes of the JSON string


def test_a_set_constraint_is_used_without_a_probe() -> None:
    with FakeOpenAI(honours="guided_choice") as fake:
        config = openai_config([fake.url], openai={"judge_constraint": "guided_choice"})

        async def body(engine: OpenAIEngine) -> Any:
            return await engine.complete(request("judge"))

        assert with_engine(config, body).text == "はい"
    assert len(fake.requests) == 1 and fake.requests[0]["guided_choice"] == list(JUDGE)


def test_a_judge_always_has_room_for_its_longest_choice() -> None:
    """「いいえ」 is nine UTF-8 bytes: a byte-level tokenizer with no merge for it spells it in
    nine tokens, so `max_tokens: 8` would cut it into no choice. The body asks for ten; a
    larger setting stays as it is."""
    with FakeOpenAI(honours="guided_choice") as fake:
        config = openai_config([fake.url], openai={"judge_constraint": "guided_choice"})

        async def body(engine: OpenAIEngine) -> Any:
            await engine.complete(request("judge", max_tokens=8))
            await engine.complete(request("judge", seed=2, max_tokens=16))

        with_engine(config, body)
    assert [r["max_tokens"] for r in fake.requests] == [10, 16]


def test_a_server_that_constrains_nothing_is_refused_at_start() -> None:
    with FakeOpenAI(honours=None) as fake, pytest.raises(EndpointError) as caught:
        with_engine(openai_config([fake.url]), lambda engine: asyncio.sleep(0))
    assert "does not hold model 'served-model' to a judge's choices" in str(caught.value)
    assert len(fake.requests) == 3  # one probe per way of asking


def test_a_judge_answer_that_is_no_choice_is_counted_as_judge_invalid() -> None:
    """The engine returns what came back; the pipeline names it, and never reads a prefix."""
    with FakeOpenAI(honours=None, answer=lambda body: "はい、そうです") as fake:
        config = openai_config([fake.url], openai={"judge_constraint": "structured_outputs"})
        source = PromptSource("test", ["基本の質問"], "test")

        async def body(engine: OpenAIEngine) -> Any:
            return await Pipeline(config, load_templates(), source, engine).evolve(0)

        outcome = with_engine(config, body)
    assert outcome.drop_reason == "judge_invalid"
    assert "はい、そうです" in (outcome.steps[-1].error or "")


# --- retries and failures --------------------------------------------------------------------


def test_429_with_retry_after_pauses_then_retries_and_counts(fast_backoff: None) -> None:
    with FakeOpenAI() as fake:
        config = openai_config([fake.url], openai={"judge_constraint": "structured_outputs"})
        fake.script.append(Reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "1"}))

        async def body(engine: OpenAIEngine) -> Any:
            began = time.monotonic()
            completion = await engine.complete(request())
            return completion, time.monotonic() - began, engine.stats()[fake.url]

        completion, seconds, stats = with_engine(config, body)
    assert completion.text.startswith("これはテスト用") and completion.retries == 1
    assert seconds >= 1.0  # the endpoint was paused for the Retry-After
    assert (stats.requests, stats.retries, stats.errors) == (2, 1, {"rate_limited": 1})
    assert stats.limit == 7 and stats.in_flight == 0  # cut by a tenth from 8


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        (Reply(500, "Internal Server Error"), "server_error"),
        (Reply(503, {"error": {"message": "loading"}}), "unavailable"),
        (Reply(drop=True), "dropped"),
        (Reply(body=chat_answer("途中", finish="abort")), "dropped"),
    ],
)
def test_transient_failures_are_retried(fast_backoff: None, reply: Reply, kind: str) -> None:
    with FakeOpenAI() as fake:
        config = openai_config([fake.url], openai={"judge_constraint": "structured_outputs"})
        fake.script.extend([reply, reply])

        async def body(engine: OpenAIEngine) -> Any:
            return await engine.complete(request()), engine.stats()[fake.url]

        completion, stats = with_engine(config, body)
    assert completion.text.startswith("これはテスト用") and completion.finish_reason == "stop"
    assert completion.retries == 2  # the request's own count, for the chunk log
    assert (stats.requests, stats.retries, stats.errors) == (3, 2, {kind: 2})
    assert len(fake.requests) == 3


def test_a_request_the_server_rejects_fails_alone_with_its_message() -> None:
    message = "This model's maximum context length is 4096 tokens. However, you requested 9000"
    with FakeOpenAI() as fake:
        config = openai_config([fake.url], openai={"judge_constraint": "structured_outputs"})
        fake.script.append(Reply(400, {"error": {"message": message, "code": 400}}))

        async def body(engine: OpenAIEngine) -> Any:
            with pytest.raises(RequestError) as caught:
                await engine.complete(request())
            after = await engine.complete(request())  # the engine carries on
            return caught.value, after, engine.stats()[fake.url]

        error, after, stats = with_engine(config, body)
    assert "HTTP 400" in str(error) and message in str(error)
    assert after.text.startswith("これはテスト用")
    assert (stats.retries, stats.errors) == (0, {"rejected": 1})
    assert (error.retries, after.retries) == (0, 0)


def test_a_request_rejected_after_retries_still_counts_them(fast_backoff: None) -> None:
    with FakeOpenAI() as fake:
        config = openai_config([fake.url], openai={"judge_constraint": "structured_outputs"})
        fake.script.extend([Reply(503, "loading"), Reply(drop=True), Reply(400, "too long")])

        async def body(engine: OpenAIEngine) -> Any:
            with pytest.raises(RequestError) as caught:
                await engine.complete(request())
            return caught.value

        assert with_engine(config, body).retries == 2


@pytest.mark.parametrize("status", [401, 404])
def test_a_key_or_model_gone_mid_run_is_engine_dead(status: int) -> None:
    """Every other request would fail alike: dropping them one by one would lose the run."""
    with FakeOpenAI() as fake:
        config = openai_config([fake.url], openai={"judge_constraint": "structured_outputs"})
        fake.script.append(Reply(status, {"error": {"message": "gone"}}))

        async def body(engine: OpenAIEngine) -> Any:
            with pytest.raises(EngineDead, match=f"HTTP {status}"):
                await engine.complete(request())
            with pytest.raises(EngineDead):
                await engine.complete(request())

        with_engine(config, body)
    assert len(fake.requests) == 1


def test_a_pool_unreachable_past_the_deadline_is_engine_dead(fast_backoff: None) -> None:
    fake = FakeOpenAI().__enter__()
    config = openai_config(
        [fake.url], openai={"judge_constraint": "structured_outputs", "retry_deadline": 0.5}
    )

    async def body(engine: OpenAIEngine) -> Any:
        await engine.complete(request())
        fake.stop()  # killed mid-run, not restarted
        with pytest.raises(EngineDead) as caught:
            await engine.complete(request())
        stats = engine.stats()[fake.url]
        with pytest.raises(EngineDead):  # and stays dead, without another wait
            await engine.complete(request())
        return caught.value, stats

    dead, stats = with_engine(config, body)
    assert "openai.endpoints" in str(dead) and "failed every try for 0.5 s" in str(dead)
    assert stats.errors.get("connect", 0) + stats.errors.get("dropped", 0) >= 1
    assert stats.in_flight == 0


def test_a_request_that_keeps_crashing_a_live_server_fails_alone(fast_backoff: None) -> None:
    poison = 666

    def answer(body: dict[str, Any]) -> str:
        return "普通の答えです。十分な長さがあります。"

    with FakeOpenAI(answer=answer) as fake:
        config = openai_config(
            [fake.url], openai={"judge_constraint": "structured_outputs", "retry_deadline": 0.5}
        )
        original = fake.reply
        fake.reply = lambda body: (  # type: ignore[method-assign]
            Reply(500, "crash") if body.get("seed") == poison else original(body)
        )

        async def body(engine: OpenAIEngine) -> Any:
            async def others() -> None:
                for seed in range(200):  # the pool keeps answering meanwhile
                    await engine.complete(request(seed=seed))
                    await asyncio.sleep(0.01)

            background = asyncio.ensure_future(others())
            try:
                with pytest.raises(RequestError, match="kept failing this request") as caught:
                    await engine.complete(request(seed=poison))
            finally:
                background.cancel()
            return caught.value

        assert with_engine(config, body).retries >= 1


def test_backoffs_end_when_a_pool_that_stopped_answering_answers_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both requests fail while the server is away; the first retries soon and gets an
    answer. The second, whose backoff grew long, tries again then, not after its backoff:
    a restarted server is used at once. (Without that it would wait out its 600 s.)"""
    delays = iter([0.05])
    monkeypatch.setattr(
        "zero_one_instruction.engines.openai.backoff_delay", lambda attempt: next(delays, 600.0)
    )
    with FakeOpenAI() as fake:
        config = openai_config(
            [fake.url], openai={"judge_constraint": "structured_outputs", "retry_deadline": 600}
        )
        fake.script.extend([Reply(drop=True), Reply(drop=True)])

        async def body(engine: OpenAIEngine) -> Any:
            both = asyncio.gather(*(engine.complete(request(seed=i)) for i in range(2)))
            return await asyncio.wait_for(both, 60), engine.stats()[fake.url]

        done, stats = with_engine(config, body)
    assert [c.retries for c in done] == [1, 1]
    assert (stats.requests, stats.retries, stats.errors) == (4, 2, {"dropped": 2})


def test_requests_spread_over_a_pool_by_least_outstanding() -> None:
    with FakeOpenAI() as a, FakeOpenAI() as b:
        config = openai_config([a.url, b.url], openai={"judge_constraint": "structured_outputs"})
        for fake in (a, b):
            fake.script.extend(Reply(body=chat_answer("遅い答え"), delay=0.3) for _ in range(4))

        async def body(engine: OpenAIEngine) -> Any:
            await asyncio.gather(*(engine.complete(request(seed=i)) for i in range(8)))
            return engine.stats()

        stats = with_engine(config, body)
    assert (len(a.requests), len(b.requests)) == (4, 4)
    assert [s.requests for s in stats.values()] == [4, 4]


def test_a_dead_endpoint_is_paused_and_the_pool_carries_on(fast_backoff: None) -> None:
    dead = f"http://127.0.0.1:{dead_port()}/v1"
    with FakeOpenAI() as alive:
        config = openai_config([dead, alive.url], openai={"judge_constraint": "structured_outputs"})
        # Start-up would refuse the dead endpoint: build the engine without it.
        engine_config = config

        async def body() -> Any:
            engine = OpenAIEngine(engine_config)
            try:
                done = await asyncio.gather(*(engine.complete(request(seed=i)) for i in range(20)))
                return done, engine.stats()
            finally:
                await engine.aclose()

        done, stats = asyncio.run(body())
    assert len(done) == 20 and len(alive.requests) == 20
    assert stats[dead].errors.get("connect", 0) >= 1
    assert stats[dead].errors["connect"] < 20  # paused after refusing, not hammered


def test_a_request_waits_for_a_slot_not_a_deadline() -> None:
    """A busy pool queues requests; queueing is not failing. (The answers are by seed: two
    requests in flight may reach the server in either order.)"""
    with FakeOpenAI(answer=lambda body: f"答え{body['seed']}", delay=0.1) as fake:
        config = openai_config(
            [fake.url],
            openai={
                "judge_constraint": "structured_outputs",
                "max_in_flight": 2,
                "initial_in_flight": 2,
                "retry_deadline": 0.0,
            },
        )

        async def body(engine: OpenAIEngine) -> Any:
            done = await asyncio.gather(*(engine.complete(request(seed=i)) for i in range(6)))
            return [c.text for c in done], engine.stats()[fake.url]

        texts, stats = with_engine(config, body)
    assert texts == [f"答え{i}" for i in range(6)]
    assert stats.in_flight == 0 and stats.errors == {} and stats.requests == 6


# --- the pool decides, not one endpoint; queueing is not failing ------------------------------

BROKEN = {
    "500": Reply(500, {"error": {"message": "EngineCore died"}}),
    "502": Reply(502, {"error": {"message": "bad gateway"}}),
    "drop": Reply(drop=True),
}


@pytest.mark.parametrize("failure", BROKEN.values(), ids=BROKEN.keys())
def test_an_endpoint_that_fails_fast_is_paused_and_its_pool_loses_nothing(failure: Reply) -> None:
    """A broken server answers at once, so it always has the fewest requests outstanding: it
    would draw every retry, and records would be lost while the other server is healthy."""
    with FakeOpenAI(delay=0.2) as good, FakeOpenAI(fails=lambda body: failure) as bad:
        config = openai_config(
            [bad.url, good.url],
            openai={"judge_constraint": "structured_outputs", "retry_deadline": 2.0},
        )

        async def body(engine: OpenAIEngine) -> Any:
            tries = (engine.complete(request(seed=i)) for i in range(32))
            return await asyncio.gather(*tries, return_exceptions=True), engine.stats()

        done, stats = with_engine(config, body)
    assert [type(c).__name__ for c in done] == ["Completion"] * 32
    assert len(good.requests) == 32 and stats[good.url].errors == {}
    assert 1 <= stats[bad.url].requests < 32  # paused after each burst, not hammered
    assert stats[bad.url].in_flight == 0


TRANSIENT = {
    "500": Reply(500, "Internal Server Error"),
    "429": Reply(429, {"error": {"message": "slow down"}}),
    "drop": Reply(drop=True),
}


@pytest.mark.parametrize("failure", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_time_queued_for_a_slot_after_a_failure_is_not_failing(
    fast_backoff: None, failure: Reply
) -> None:
    """One failure, then a busy pool: the retry waits its turn behind the others, longer than
    the deadline, and still gets its answer."""
    with FakeOpenAI(delay=0.15) as fake:
        section = {"max_in_flight": 1, "initial_in_flight": 1, "retry_deadline": 0.3}
        config = openai_config(
            [fake.url], openai={"judge_constraint": "structured_outputs", **section}
        )
        fake.script.append(failure)

        async def body(engine: OpenAIEngine) -> Any:
            tries = (engine.complete(request(seed=i)) for i in range(6))
            return await asyncio.gather(*tries, return_exceptions=True), engine.stats()[fake.url]

        done, stats = with_engine(config, body)
    assert [type(c).__name__ for c in done] == ["Completion"] * 6
    assert (stats.requests, stats.retries, stats.in_flight) == (7, 1, 0)


def test_a_request_refused_for_load_waits_as_long_as_the_pool_answers_others(
    fast_backoff: None,
) -> None:
    """429s past the deadline are the pool's load, not this request's fault: while others
    get answers, it keeps its place rather than failing the engine or its record."""
    refused = iter(range(8))  # the first 8 tries of seed 5, each 0.1 s, outlast the deadline

    def fails(body: dict[str, Any]) -> Reply | None:
        if body.get("seed") == 5 and next(refused, None) is not None:
            return Reply(429, {"error": {"message": "slow down"}}, delay=0.1)
        return None

    with FakeOpenAI(fails=fails) as fake:
        config = openai_config(
            [fake.url], openai={"judge_constraint": "structured_outputs", "retry_deadline": 0.3}
        )

        async def body(engine: OpenAIEngine) -> Any:
            background = asyncio.ensure_future(others(engine))
            try:
                return await engine.complete(request(seed=5)), engine.stats()[fake.url]
            finally:
                background.cancel()

        completion, stats = with_engine(config, body)
    assert completion.text.startswith("これはテスト用")
    assert stats.errors == {"rate_limited": 8}


async def others(engine: OpenAIEngine) -> None:
    """Other records, answered one after another meanwhile: the pool is answering."""
    for seed in range(100, 1100):
        await engine.complete(request(seed=seed))
        await asyncio.sleep(0.01)


OWN_FAILURES = {
    "timeout": (Reply(body=chat_answer("遅すぎる答え"), delay=1.5), "timeout"),
    "drop": (Reply(drop=True), "dropped"),
    "abort": (Reply(body=chat_answer("途中", finish="abort")), "dropped"),
}


@pytest.mark.parametrize(("failure", "kind"), OWN_FAILURES.values(), ids=OWN_FAILURES.keys())
def test_a_request_that_keeps_failing_on_its_own_fails_alone(
    fast_backoff: None, failure: Reply, kind: str
) -> None:
    """A prompt that always runs past the timeout, or whose connection is always cut, while
    the pool answers others: its record fails (`<step>_failed`). Killing the engine would
    send the chunk back to the queue, to meet the same prompt again, forever."""
    poison = 666
    with FakeOpenAI(fails=lambda body: failure if body.get("seed") == poison else None) as fake:
        section = {"retry_deadline": 0.5, "request_timeout": 1.0}
        config = openai_config(
            [fake.url], openai={"judge_constraint": "structured_outputs", **section}
        )

        async def body(engine: OpenAIEngine) -> Any:
            background = asyncio.ensure_future(others(engine))
            try:
                with pytest.raises(RequestError) as caught:
                    await engine.complete(request(seed=poison))
            finally:
                background.cancel()
            after = await engine.complete(request(seed=1))  # the engine carries on
            return caught.value, after

        error, after = with_engine(config, body)
    assert "kept failing this request" in str(error) and f"last: {kind}" in str(error)
    assert after.text.startswith("これはテスト用")


def test_a_pool_that_dies_after_a_request_began_failing_is_engine_dead(
    fast_backoff: None,
) -> None:
    """The pool answered others after this request's first failure, then died: its
    answers grow old, and the request gives up with the engine, not never."""
    poison = 666
    fake = FakeOpenAI(
        fails=lambda body: Reply(500, "crash") if body.get("seed") == poison else None
    ).__enter__()
    config = openai_config(
        [fake.url], openai={"judge_constraint": "structured_outputs", "retry_deadline": 0.5}
    )

    async def body(engine: OpenAIEngine) -> Any:
        async def kill_soon() -> None:
            for seed in range(5):
                await engine.complete(request(seed=seed))
            fake.stop()

        killer = asyncio.ensure_future(kill_soon())
        with pytest.raises(EngineDead, match="failed every try"):
            await asyncio.wait_for(engine.complete(request(seed=poison)), 60)
        await killer

    with_engine(config, body)


BAD_200 = {
    "usage 1e400": (
        '{"choices": [{"message": {"role": "assistant", "content": "x"}, '
        '"finish_reason": "stop"}], "usage": {"completion_tokens": 1e400}}',
        "bad_response",
    ),
    "prompt_tokens a word": (
        {**chat_answer("x"), "usage": {"prompt_tokens": "many", "completion_tokens": 1}},
        "bad_response",
    ),
    "no choices": ({"object": "chat.completion"}, "bad_response"),
    "no JSON": ("<html>Gateway</html>", "bad_response"),
    "an error object": ({"error": {"message": "upstream provider failed"}}, "server_error"),
}


@pytest.mark.parametrize(("answer", "kind"), BAD_200.values(), ids=BAD_200.keys())
def test_an_unreadable_200_is_retried_and_frees_its_slot(
    fast_backoff: None, answer: Any, kind: str
) -> None:
    """A 200 that is no readable completion is the server's (or a gateway's) fault, like a
    5xx: retried, never an unhandled exception, and its slot is free again."""
    with FakeOpenAI() as fake:
        config = openai_config([fake.url], openai={"judge_constraint": "structured_outputs"})
        fake.script.append(Reply(body=answer))

        async def body(engine: OpenAIEngine) -> Any:
            return await engine.complete(request()), engine.stats()[fake.url]

        completion, stats = with_engine(config, body)
    assert completion.text.startswith("これはテスト用")
    assert (stats.requests, stats.retries, stats.errors, stats.in_flight) == (2, 1, {kind: 1}, 0)


def test_a_key_that_is_not_set_leaves_no_client_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """The judge's key is read after the other steps' pool is built: every key is read
    before any client is made, so a failed start has nothing to close."""
    monkeypatch.setenv("ZOI_TEST_KEY", KEY)
    monkeypatch.delenv("ZOI_JUDGE_KEY", raising=False)
    made: list[object] = []
    real = httpx.AsyncClient

    def client(**options: Any) -> httpx.AsyncClient:
        made.append(options)
        return real(**options)

    monkeypatch.setattr("zero_one_instruction.engines.openai.httpx.AsyncClient", client)
    config = openai_config(
        ["http://127.0.0.1:1/v1"],
        step_models={"judge": "big-judge"},
        openai={
            "api_key_env": "ZOI_TEST_KEY",
            "models": {
                "big-judge": {
                    "endpoints": ["http://127.0.0.1:2/v1"],
                    "api_key_env": "ZOI_JUDGE_KEY",
                }
            },
        },
    )
    with pytest.raises(ConfigError, match=r"\$ZOI_JUDGE_KEY is not set"):
        OpenAIEngine(config)
    assert made == []


def test_the_judge_constraint_found_is_what_each_chunk_marker_records() -> None:
    with FakeOpenAI(honours="json_schema") as fake:

        async def body(engine: OpenAIEngine) -> Any:
            return engine.marker_info()

        assert with_engine(openai_config([fake.url]), body) == {"judge_constraint": "json_schema"}


def test_close_twice_then_requests_are_refused() -> None:
    with FakeOpenAI() as fake:
        config = openai_config([fake.url], openai={"judge_constraint": "structured_outputs"})

        async def main() -> None:
            engine = await start_engine(config)
            engine.close()
            engine.close()
            await close_engine(engine)
            with pytest.raises(EngineDead):
                await engine.complete(request())

        asyncio.run(main())


# --- start-up --------------------------------------------------------------------------------


def start_error(config: Config) -> str:
    with pytest.raises(ZoiError) as caught:
        with_engine(config, lambda engine: asyncio.sleep(0))
    message = str(caught.value)
    assert "\n" not in message and KEY not in message
    return message


def test_start_refuses_an_unreachable_endpoint() -> None:
    url = f"http://127.0.0.1:{dead_port()}/v1"
    message = start_error(openai_config([url], openai={"startup_wait": 0.3}))
    assert message == f"openai.endpoints: {url} unreachable (Connection refused)"


def test_start_refuses_a_wrong_key_without_showing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOI_TEST_KEY", "sk-wrong-0000")
    with FakeOpenAI(key=KEY) as fake:
        config = openai_config([fake.url], openai={"api_key_env": "ZOI_TEST_KEY"})
        message = start_error(config)
    assert message == f"openai.endpoints: {fake.url} rejected the API key from $ZOI_TEST_KEY"
    assert "sk-wrong" not in message


def test_start_asks_for_a_key_where_none_is_named() -> None:
    with FakeOpenAI(key=KEY) as fake:
        message = start_error(openai_config([fake.url]))
    assert "wants an API key (HTTP 401)" in message and "openai.api_key_env" in message


def test_the_right_key_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOI_TEST_KEY", KEY)
    with FakeOpenAI(key=KEY) as fake:
        config = openai_config([fake.url], openai={"api_key_env": "ZOI_TEST_KEY"})

        async def body(engine: OpenAIEngine) -> Any:
            return await engine.complete(request())

        assert with_engine(config, body).text.startswith("これはテスト用")


def test_an_unset_key_variable_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZOI_TEST_KEY", raising=False)
    config = openai_config(["http://127.0.0.1:1/v1"], openai={"api_key_env": "ZOI_TEST_KEY"})
    with pytest.raises(ConfigError, match=r"openai.api_key_env: \$ZOI_TEST_KEY is not set"):
        OpenAIEngine(config)


def test_start_refuses_a_model_the_server_does_not_serve() -> None:
    with FakeOpenAI(models=("other", "another")) as fake:
        message = start_error(openai_config([fake.url]))
    assert message == (
        f"openai.endpoints: {fake.url} does not serve model 'served-model' "
        "(it serves: other, another)"
    )


def test_start_checks_every_step_model_on_its_own_pool() -> None:
    with FakeOpenAI() as main, FakeOpenAI(models=("small-judge",)) as judges:
        config = judge_pool_config(main.url, judges.url)
        message = start_error(config)
    assert message.startswith(f"openai.models.big-judge.endpoints: {judges.url} does not serve")


def test_start_refuses_a_server_that_does_not_speak_http() -> None:
    with NotHttp() as server:
        message = start_error(openai_config([server.url]))
    assert message == (
        f"openai.endpoints: {server.url} is not an OpenAI-compatible server "
        "(it does not answer HTTP)"
    )


def test_start_refuses_an_http_server_without_the_api() -> None:
    with FakeOpenAI() as fake:
        url = fake.url.removesuffix("/v1")  # the base URL without /v1: a common slip
        message = start_error(openai_config([url]))
    assert message == (
        f"openai.endpoints: {url} is not an OpenAI-compatible server "
        f"(GET {url}/models answered HTTP 404)"
    )


def test_a_judge_probe_names_what_the_server_said() -> None:
    """A server that refuses every probe for its own reason (a model without a chat template)
    says what to fix: the line carries its words, not only the constraints tried."""
    message = (
        "As of transformers v4.44, default chat template is no longer allowed, so you must "
        "provide a chat template if the tokenizer does not define one."
    )
    refusal = Reply(400, {"error": {"message": message}})
    with FakeOpenAI(fails=lambda body: refusal) as fake:
        line = start_error(openai_config([fake.url]))
    assert "does not hold model 'served-model' to a judge's choices" in line
    assert "HTTP 400" in line and message in line


def test_start_names_a_tls_failure_as_one() -> None:
    """https to a server that speaks http: the TLS error's errno (1) is not the reason."""
    with FakeOpenAI() as fake:
        url = fake.url.replace("http://", "https://")
        line = start_error(openai_config([url]))
    assert line.startswith(f"openai.endpoints: {url} unreachable (TLS failed: ")
    assert "Operation not permitted" not in line


def test_start_names_an_untrusted_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    fake = FakeOpenAI()
    fake._server.socket = context.wrap_socket(fake._server.socket, server_side=True)
    with fake:
        url = fake.url.replace("http://", "https://")
        line = start_error(openai_config([url]))
    assert line == (
        f"openai.endpoints: {url} unreachable (TLS certificate not trusted: self-signed "
        "certificate; a private CA's certificate can be named in $SSL_CERT_FILE)"
    )


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key, valid today: (cert, key) files."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_a_judge_probe_that_never_gets_an_answer_is_one_line_at_start(
    fast_backoff: None,
) -> None:
    crash = Reply(500, {"error": {"message": "EngineCore encountered an issue"}})
    with FakeOpenAI(fails=lambda body: crash) as fake:
        line = start_error(openai_config([fake.url], openai={"retry_deadline": 0.3}))
    assert line.startswith(f"openai.endpoints: {fake.url} failed every try for 0.3 s")
    assert line.endswith("(probing the judge's constraint)")
