"""`engine: openai` against a fake OpenAI-compatible server in the test process
(tests/fakeopenai.py): request bodies, routing, the judge's constraint, retries, failures,
and the start-up check."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

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
    assert stats.limit == 4 and stats.in_flight == 0  # halved from 8


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
    """A busy pool queues requests in order; queueing is not failing."""
    with FakeOpenAI() as fake:
        config = openai_config(
            [fake.url],
            openai={
                "judge_constraint": "structured_outputs",
                "max_in_flight": 2,
                "initial_in_flight": 2,
                "retry_deadline": 0.0,
            },
        )
        fake.script.extend(Reply(body=chat_answer(f"答え{i}"), delay=0.1) for i in range(6))

        async def body(engine: OpenAIEngine) -> Any:
            done = await asyncio.gather(*(engine.complete(request(seed=i)) for i in range(6)))
            return [c.text for c in done], engine.stats()[fake.url]

        texts, stats = with_engine(config, body)
    assert texts == [f"答え{i}" for i in range(6)]  # first come, first served
    assert stats.in_flight == 0 and stats.errors == {}


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
