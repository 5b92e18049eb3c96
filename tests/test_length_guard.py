"""The character bound that refuses a hopeless prompt before it is tokenised, checked
against the tiny model's real byte-level BPE tokenizer (no engine needed)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from zero_one_instruction.engines.base import Message, Request, RequestError
from zero_one_instruction.engines.vllm import LengthGuard


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model / "tokenizer.json"))


def request(*contents: str) -> Request:
    messages = tuple(Message("user", content) for content in contents)
    return Request(
        step="width", messages=messages, max_tokens=8, temperature=0.0, top_p=1.0, seed=0
    )


def test_no_text_takes_fewer_tokens_than_the_bound(tokenizer: Tokenizer) -> None:
    """The bound is safe: a token never stands for more than `max_chars_per_token`
    characters, even for text made of the longest token itself."""
    guard = LengthGuard.for_tokenizer(tokenizer, 512)
    longest = max(tokenizer.get_vocab(), key=len)
    assert guard.max_chars_per_token == len(longest) > 4
    texts = [
        "日本語の文章です。" * 500,
        tokenizer.decode([tokenizer.token_to_id(longest)]) * 300,
        "<|assistant|>" * 400,
        "plain ascii words, digits 12345 and   spaces " * 200,
        "絵文字😀と記号★" * 300,
    ]
    for text in texts:
        tokens = len(tokenizer.encode(text).ids)
        assert tokens >= math.ceil(len(text) / guard.max_chars_per_token), text[:30]


def test_guard_refuses_only_what_cannot_fit() -> None:
    guard = LengthGuard(max_model_len=512, max_chars_per_token=40)
    guard.check(request("a" * 10_000, "b" * 10_480))  # 20,480 characters: may fit
    guard.check(request(" " * 50_000 + "x"))  # whitespace around a prompt is not counted
    with pytest.raises(RequestError, match="prompt of 20481 characters exceeds the maximum"):
        guard.check(request("a" * 10_001, "b" * 10_480))
    began = time.monotonic()
    with pytest.raises(RequestError, match="maximum context length of 512 tokens"):
        guard.check(request("長" * 10_000_000))
    assert time.monotonic() - began < 5  # generous: one pass over the text, no tokenising
