"""The AIMD limit of one endpoint, against scripted servers, and the retry timing rules."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from zero_one_instruction.engines.aimd import LATENCY_MIN_TOKENS, Aimd
from zero_one_instruction.engines.backoff import (
    CAP_SECONDS,
    MAX_RETRY_AFTER,
    backoff_delay,
    retry_after,
)
from zero_one_instruction.engines.openai import _fault_pause


def round_trip(aimd: Aimd, capacity: int, now: float = 0.0) -> tuple[int, int]:
    """One round trip against a server that serves `capacity` requests at once and answers
    429 to the rest: fill the room, then every request ends. Returns (served, refused)."""
    tickets = [aimd.send() for _ in range(aimd.room(now))]
    for i, ticket in enumerate(tickets):
        if i < capacity:
            aimd.succeeded(ticket, 1.0, 0)
        else:
            aimd.overloaded(ticket)
    return min(len(tickets), capacity), max(0, len(tickets) - capacity)


@pytest.mark.parametrize("capacity", [5, 20, 50])
def test_the_limit_converges_to_the_hidden_capacity_and_stays_around_it(capacity: int) -> None:
    aimd = Aimd.starting(8, 64)
    for _ in range(300):  # warm-up: one request more per round trip, halving past capacity
        round_trip(aimd, capacity)
    limits, served = [], 0
    for _ in range(500):
        served += round_trip(aimd, capacity)[0]
        limits.append(aimd.limit)
    assert max(limits) <= capacity + 2.5  # the 429s come a round trip after it is exceeded
    assert min(limits) >= capacity / 2 - 1  # halved once per burst, never more
    assert max(limits) >= 0.9 * capacity  # and it climbs back up
    assert served / 500 >= 0.6 * capacity  # the sawtooth's mean, above half the capacity


def test_a_burst_of_overloads_halves_once() -> None:
    aimd = Aimd.starting(40, 64)
    tickets = [aimd.send() for _ in range(40)]
    halved = [aimd.overloaded(ticket) for ticket in tickets]
    assert halved.count(True) == 1 and aimd.limit == 20
    assert aimd.in_flight == 0
    # Requests sent after the cut answer the new limit: their overload halves again.
    again = [aimd.send() for _ in range(3)]
    assert [aimd.overloaded(ticket) for ticket in again] == [True, False, False]
    assert aimd.limit == 10


def test_the_limit_stays_within_one_and_the_maximum() -> None:
    aimd = Aimd.starting(8, 12)
    for _ in range(1000):
        aimd.succeeded(aimd.send(), 0.1, 0)
        while aimd.room(0.0):  # keep the window full, so it may grow
            aimd.send()
    assert aimd.limit == 12 and aimd.capacity == 12
    aimd = Aimd.starting(8, 12)
    for _ in range(50):
        aimd.overloaded(aimd.send())
    assert aimd.limit == 1.0 and aimd.capacity == 1 and aimd.room(0.0) == 1
    assert Aimd.starting(100, 12).limit == 12 and Aimd.starting(0, 12).limit == 1


def test_only_a_full_window_grows_the_limit() -> None:
    """An endpoint asked for less than its limit learns nothing about its capacity."""
    aimd = Aimd.starting(8, 64)
    for _ in range(100):
        aimd.succeeded(aimd.send(), 0.1, 0)  # one in flight at a time
    assert aimd.limit == 8


def test_retry_after_pauses_the_endpoint_until_then() -> None:
    aimd = Aimd.starting(4, 8)
    aimd.pause(10.0)
    assert aimd.room(0.0) == 0 and aimd.room(9.99) == 0
    assert aimd.room(10.0) == 4
    aimd.pause(5.0)  # a shorter pause never shortens a longer one
    assert aimd.room(9.0) == 0


def test_rising_latency_per_token_shrinks_the_limit_by_a_tenth_per_window() -> None:
    aimd = Aimd.starting(20, 64)
    tokens = LATENCY_MIN_TOKENS * 4
    for _ in range(10):
        aimd.succeeded(aimd.send(), 0.01 * tokens, tokens)  # 10 ms a token: the best seen
    limit = aimd.limit
    tickets = [aimd.send() for _ in range(10)]
    for ticket in tickets:  # answers at 100 ms a token: requests queue in the server
        aimd.succeeded(ticket, 0.1 * tokens, tokens)
    assert aimd.limit == pytest.approx(limit * 0.9)  # once for the whole window
    aimd.succeeded(aimd.send(), 0.1 * tokens, tokens)
    assert aimd.limit == pytest.approx(limit * 0.81)


def test_short_answers_do_not_count_towards_the_latency() -> None:
    """A judge's two tokens are mostly prefill: their latency per token says nothing."""
    aimd = Aimd.starting(20, 64)
    aimd.succeeded(aimd.send(), 0.01 * 100, 100)
    for _ in range(20):
        aimd.succeeded(aimd.send(), 5.0, 2)
    assert aimd.limit == 20 and aimd.latency == pytest.approx(0.01)


def test_backoff_grows_exponentially_with_full_jitter_up_to_its_cap() -> None:
    rng = random.Random(1)
    first = [backoff_delay(1, rng) for _ in range(200)]
    late = [backoff_delay(30, rng) for _ in range(200)]
    assert min(first) >= 0 and max(first) <= 0.5
    assert max(late) <= CAP_SECONDS and max(late) > 0.5 * CAP_SECONDS
    assert len(set(first)) > 100  # jittered, not one value


def test_backoff_and_pauses_stay_numbers_after_hours_of_retries() -> None:
    """A request the pool keeps refusing for load is retried for as long as the pool answers
    others: its thousandth retry waits the cap, not a power of two too large for a float."""
    assert 0.0 <= backoff_delay(5000) <= CAP_SECONDS
    assert _fault_pause(5000) == CAP_SECONDS


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert retry_after("3", now) == 3.0
    assert retry_after(" 1.5 ", now) == 1.5
    assert retry_after(format_datetime(now + timedelta(seconds=7), usegmt=True), now) == 7.0
    assert retry_after(format_datetime(now - timedelta(seconds=7), usegmt=True), now) == 0.0
    assert retry_after("-4", now) == 0.0
    assert retry_after("86400", now) == MAX_RETRY_AFTER
    assert retry_after(None, now) is None
    assert retry_after("soon", now) is None
    assert retry_after("nan", now) is None
