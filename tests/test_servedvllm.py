"""`vllm serve` from the CPU build on the tiny model (tests/servedvllm.py): the fixture serves,
and what this vLLM version's OpenAI server does with the fields `engine: openai` relies on,
measured (docs/engines.md, "Serving with vllm serve (measured)", says the same in prose).

Some tests pin a behaviour of the installed version rather than a wish: when one fails after
a vLLM upgrade, the server changed, and the note and `engine: openai` must follow it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from zero_one_instruction.engines.base import Message, Request

from .faultproxy import FaultProxy
from .servedvllm import SERVED_NAME, ServedVLLM, tiny_config

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.served,
    pytest.mark.skipif(os.environ.get("ZOI_SKIP_VLLM") == "1", reason="ZOI_SKIP_VLLM=1"),
]
CHOICES = ["はい", "いいえ"]
QUESTION = [
    {"role": "system", "content": "あなたは厳格な審査員です。"},
    {"role": "user", "content": "この質問は明確ですか。はいかいいえで答えてください。"},
]
SEEDS = range(10)
# The judge's constraint for servers without `structured_outputs` (OpenAI's own API).
ENUM_SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "verdict", "schema": {"enum": CHOICES}},
}


@pytest.fixture
def client(vllm_server: ServedVLLM) -> Iterator[httpx.Client]:
    with vllm_server.client() as client:
        yield client


def chat(client: httpx.Client, **fields: Any) -> httpx.Response:
    body: dict[str, Any] = {
        "model": SERVED_NAME,
        "messages": QUESTION,
        "max_tokens": 16,
        "temperature": 1.0,
        **fields,
    }
    return client.post("/chat/completions", json=body)


def answer(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    """The first choice of a request that must succeed."""
    response = chat(client, **fields)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def texts(client: httpx.Client, **fields: Any) -> list[str]:
    return [answer(client, seed=seed, **fields)["message"]["content"] for seed in SEEDS]


def test_models_lists_the_served_name_behind_the_key(vllm_server: ServedVLLM) -> None:
    response = httpx.get(vllm_server.base_url + "/models", headers=vllm_server.headers)
    assert response.status_code == 200
    (model,) = response.json()["data"]
    assert (model["id"], model["object"], model["max_model_len"]) == (SERVED_NAME, "model", 1024)
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        refused = httpx.get(vllm_server.base_url + "/models", headers=headers)
        # Not OpenAI's error shape: `error` is a string, not an object.
        assert (refused.status_code, refused.json()) == (401, {"error": "Unauthorized"})
    assert httpx.get(vllm_server.url + "/health").status_code == 200  # no key needed


def test_choice_gives_only_the_choices_at_temperature_1(client: httpx.Client) -> None:
    free = texts(client)
    assert set(free) - set(CHOICES), "unconstrained noise should not look like a verdict"
    constrained = [
        answer(client, seed=seed, structured_outputs={"choice": CHOICES}) for seed in SEEDS
    ]
    assert {c["message"]["content"] for c in constrained} <= set(CHOICES)
    assert {c["finish_reason"] for c in constrained} == {"stop"}


def test_guided_choice_is_ignored_by_this_version(client: httpx.Client) -> None:
    """Removed in vLLM 0.12: an extra field, accepted (200) and ignored, so the output is
    not constrained at all. A client that sends only `guided_choice` gets noise."""
    assert set(texts(client, guided_choice=CHOICES)) - set(CHOICES)
    both = texts(client, guided_choice=CHOICES, structured_outputs={"choice": CHOICES})
    assert set(both) <= set(CHOICES)


def test_a_json_schema_enum_gives_a_json_string(client: httpx.Client) -> None:
    found = texts(client, response_format=ENUM_SCHEMA)
    assert all(text.startswith('"') for text in found), found  # JSON, quotes included
    assert {json.loads(text) for text in found} <= set(CHOICES)


def test_choice_and_response_format_together_are_refused(client: httpx.Client) -> None:
    both = {"structured_outputs": {"choice": CHOICES}, "response_format": ENUM_SCHEMA}
    response = chat(client, seed=1, **both)
    assert response.status_code == 400
    assert "only use one kind of structured outputs" in response.json()["error"]["message"]


def test_the_same_seed_gives_the_same_text_alone_or_in_a_batch(
    vllm_server: ServedVLLM, client: httpx.Client
) -> None:
    one_by_one = texts(client, max_tokens=24)
    assert texts(client, max_tokens=24) == one_by_one
    assert len(set(one_by_one)) > 1  # different seeds, different texts

    async def concurrently() -> list[str]:
        async with httpx.AsyncClient(
            base_url=vllm_server.base_url, headers=vllm_server.headers, timeout=120
        ) as batch:
            body = {"model": SERVED_NAME, "messages": QUESTION, "max_tokens": 24}
            responses = await asyncio.gather(
                *(batch.post("/chat/completions", json={**body, "seed": s}) for s in SEEDS)
            )
        return [r.json()["choices"][0]["message"]["content"] for r in responses]

    assert asyncio.run(concurrently()) == one_by_one
    unseeded = [answer(client, max_tokens=24)["message"]["content"] for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_choice_logprobs_are_the_constrained_distribution(client: httpx.Client) -> None:
    """The mask is applied before the log-probabilities are taken: at every position the
    allowed tokens' probabilities sum to 1, and the masked ones come back at -9999."""
    found = answer(
        client, seed=3, structured_outputs={"choice": CHOICES}, logprobs=True, top_logprobs=20
    )
    positions = found["logprobs"]["content"]
    assert positions
    for position in positions:
        allowed = [c["logprob"] for c in position["top_logprobs"] if c["logprob"] > -9000]
        assert math.isclose(sum(math.exp(lp) for lp in allowed), 1.0, abs_tol=1e-3)
        assert position["logprob"] in allowed
    # A token that is part of a character decodes to "" with no bytes: a client cannot tell
    # such candidates apart by text (`return_tokens_as_token_ids` names them by id instead).
    partial = [c for p in positions for c in p["top_logprobs"] if c["token"] == ""]
    assert partial and all(c["bytes"] == [] for c in partial)
    too_many = chat(client, seed=3, logprobs=True, top_logprobs=21)
    assert too_many.status_code == 400
    assert too_many.json()["error"]["param"] == "logprobs"


def test_usage_counts_the_prompt_and_the_completion(client: httpx.Client) -> None:
    response = chat(client, seed=2, max_tokens=12, return_token_ids=True)
    body = response.json()
    usage, (choice,) = body["usage"], body["choices"]
    assert usage["prompt_tokens"] == len(body["prompt_token_ids"])
    assert usage["completion_tokens"] == len(choice["token_ids"]) == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert choice["finish_reason"] == "length"


def test_a_prompt_beyond_the_context_is_a_400_in_openai_shape(client: httpx.Client) -> None:
    long = [{"role": "user", "content": "あいう" * 2000}]
    response = chat(client, messages=long, max_tokens=8)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("BadRequestError", 400)
    assert error["param"] == "input_tokens"
    assert "maximum context length is 1024 tokens" in error["message"]
    too_long_output = chat(client, max_tokens=5000)
    assert too_long_output.status_code == 400
    assert too_long_output.json()["error"]["param"] == "max_tokens"


def test_unknown_fields_are_ignored(client: httpx.Client) -> None:
    plain = answer(client, seed=4)["message"]["content"]
    assert answer(client, seed=4, frobnicate={"x": 1})["message"]["content"] == plain


def test_an_unknown_model_is_a_404(client: httpx.Client) -> None:
    response = chat(client, model="nope", seed=1)
    assert response.status_code == 404
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("NotFoundError", 404, "model")


def test_the_proxy_passes_a_real_completion_after_its_faults(
    vllm_server: ServedVLLM, fault_proxy: FaultProxy
) -> None:
    fault_proxy.fail_429(retry_after=2)
    fault_proxy.drop()
    with httpx.Client(base_url=fault_proxy.url + "/v1", headers=vllm_server.headers) as client:
        assert chat(client, seed=1).status_code == 429
        with pytest.raises(httpx.RemoteProtocolError):
            chat(client, seed=1)
        through = answer(client, seed=1, structured_outputs={"choice": CHOICES})
        assert client.get("/models").json()["data"][0]["id"] == SERVED_NAME
    assert through["message"]["content"] in CHOICES
    assert fault_proxy.counts() == {"requests": 4, "429": 1, "dropped": 1, "passed": 2}


def test_the_server_computes_what_the_in_process_engine_does(
    tiny_model: Path, client: httpx.Client
) -> None:
    """The fixture gives the server the in-process engine's arguments, so the same request
    and seed give the same text and token counts through either."""
    from zero_one_instruction.engines.vllm import VLLMEngine

    requests = [
        Request(
            step="width",
            messages=(Message("system", "あなたは助手です。"), Message("user", f"質問{i}")),
            max_tokens=24,
            temperature=0.9,
            top_p=0.9,
            repetition_penalty=1.0,
            seed=100 + i,
        )
        for i in range(4)
    ] + [
        Request(
            step="judge",
            messages=(Message("user", f"判定{i}"),),
            max_tokens=8,
            temperature=1.0,
            top_p=1.0,
            repetition_penalty=1.0,
            seed=200 + i,
            choices=tuple(CHOICES),
        )
        for i in range(4)
    ]

    async def in_process() -> list[tuple[str, int, int]]:
        engine = VLLMEngine(tiny_config(tiny_model))
        try:
            done = [await engine.complete(r) for r in requests]
        finally:
            engine.close()
        return [(c.text, c.prompt_tokens, c.completion_tokens) for c in done]

    served = []
    for request in requests:
        fields: dict[str, Any] = {
            "messages": [m.as_dict() for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
        }
        if request.choices:
            fields["structured_outputs"] = {"choice": list(request.choices)}
        body = chat(client, **fields).json()
        served.append(
            (
                body["choices"][0]["message"]["content"],
                body["usage"]["prompt_tokens"],
                body["usage"]["completion_tokens"],
            )
        )
    assert served == asyncio.run(in_process())


def test_a_killed_server_comes_back_on_its_port_with_the_same_outputs(
    vllm_server: ServedVLLM,
) -> None:
    """Last in this module: it takes the session's server away (about 30 s to restart)."""
    with vllm_server.client() as client:
        before = texts(client, max_tokens=12)
    old_group, port = vllm_server.pgid, vllm_server.port
    assert old_group is not None and len(vllm_server.processes()) >= 3  # API, engine, worker
    vllm_server.kill()
    assert vllm_server.processes() == []
    with pytest.raises(httpx.ConnectError):
        httpx.get(vllm_server.url + "/health")
    vllm_server.start()
    assert vllm_server.port == port and vllm_server.pgid != old_group
    with vllm_server.client() as client:
        assert texts(client, max_tokens=12) == before  # the dummy weights come from the seed
