"""The AIMD limit of one endpoint, against scripted servers, and the retry timing rules."""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from zero_one_instruction.engines.aimd import (
    CEILING_PAUSES,
    LATENCY_MIN_TOKENS,
    MIN_SAMPLES,
    QUEUE_MIN,
    QUEUE_SHARE,
    Aimd,
    Average,
    Level,
    Ticket,
    rising,
)
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
    tickets = [aimd.send(now) for _ in range(aimd.room(now))]
    for i, ticket in enumerate(tickets):
        if i < capacity:
            aimd.succeeded(ticket, now + 1.0, 0)
        else:
            aimd.overloaded(ticket, now + 1.0)
    return min(len(tickets), capacity), max(0, len(tickets) - capacity)


@pytest.mark.parametrize("capacity", [5, 20, 50])
def test_refusals_keep_the_limit_within_a_tenth_of_the_hidden_capacity(capacity: int) -> None:
    aimd = Aimd.starting(8, 64)
    for _ in range(300):  # warm-up: slow start, then one request more per round trip
        round_trip(aimd, capacity)
    limits, served = [], 0
    for _ in range(500):
        served += round_trip(aimd, capacity)[0]
        limits.append(aimd.limit)
    assert max(limits) <= capacity + 2.5  # the 429s come a round trip after it is exceeded
    assert min(limits) >= 0.9 * capacity - 1  # cut by a tenth once per burst, never more
    assert max(limits) >= capacity  # and it climbs back up
    assert served / 500 >= 0.85 * capacity


def test_slow_start_doubles_the_limit_each_round_trip_until_the_first_refusal() -> None:
    aimd = Aimd.starting(4, 256)
    limits = []
    for _ in range(4):
        round_trip(aimd, 1000)
        limits.append(aimd.limit)
    assert limits == [8, 16, 32, 64]
    round_trip(aimd, 100)  # 64 sent, all served: 128
    # 128 sent: the 100 answers grow it by one each, the 28 refusals cut it by a tenth once.
    assert round_trip(aimd, 100) == (100, 28) and not aimd.probing
    assert aimd.limit == pytest.approx((128 + 100) * 0.9)
    before = aimd.limit
    round_trip(aimd, 1000)  # after the first cut: one request more per round trip
    assert aimd.limit == pytest.approx(before + 1, abs=0.05)


def test_a_burst_of_refusals_cuts_once() -> None:
    aimd = Aimd.starting(40, 64)
    tickets = [aimd.send(0.0) for _ in range(40)]
    cut = [aimd.overloaded(ticket, 1.0) for ticket in tickets]
    assert cut.count(True) == 1 and aimd.limit == pytest.approx(36)
    assert aimd.in_flight == 0
    # Requests sent after the cut answer the new limit: their refusal cuts again.
    again = [aimd.send(1.0) for _ in range(3)]
    assert [aimd.overloaded(ticket, 2.0) for ticket in again] == [True, False, False]
    assert aimd.limit == pytest.approx(36 * 0.9)


def test_a_timeout_halves_once_per_window() -> None:
    aimd = Aimd.starting(40, 64)
    tickets = [aimd.send(0.0) for _ in range(40)]
    assert [aimd.timed_out(ticket, 600.0) for ticket in tickets].count(True) == 1
    assert aimd.limit == 20


def test_the_limit_stays_within_one_and_the_maximum() -> None:
    aimd = Aimd.starting(8, 12)
    for step in range(1000):
        aimd.succeeded(aimd.send(step), step + 0.1, 0)
        while aimd.room(step):  # keep the window full, so it may grow
            aimd.send(step)
    assert aimd.limit == 12 and aimd.capacity == 12
    aimd = Aimd.starting(8, 12)
    for step in range(50):
        aimd.overloaded(aimd.send(step), step + 0.1)
    assert aimd.limit == 1.0 and aimd.capacity == 1 and aimd.room(0.0) == 1
    assert Aimd.starting(100, 12).limit == 12 and Aimd.starting(0, 12).limit == 1


def test_only_a_full_window_grows_the_limit() -> None:
    """An endpoint asked for less than its limit learns nothing about its capacity."""
    aimd = Aimd.starting(8, 64)
    for step in range(100):
        aimd.succeeded(aimd.send(step), step + 0.1, 0)  # one in flight at a time
    assert aimd.limit == 8


def test_retry_after_pauses_the_endpoint_until_then() -> None:
    aimd = Aimd.starting(4, 8)
    aimd.pause(10.0)
    assert aimd.room(0.0) == 0 and aimd.room(9.99) == 0
    assert aimd.room(10.0) == 4
    aimd.pause(5.0)  # a shorter pause never shortens a longer one
    assert aimd.room(9.0) == 0


def test_after_a_retry_after_the_limit_stays_under_the_refused_one_for_a_while() -> None:
    """Probing past the capacity again would cost another pause of the whole endpoint: the
    limit holds under the refused capacity for CEILING_PAUSES pauses, then probes again."""
    aimd = Aimd.starting(20, 64)
    aimd.probing = False  # past the slow start: one request more per round trip
    tickets = [aimd.send(0.0) for _ in range(20)]
    assert aimd.overloaded(tickets[0], 0.0, pause=1.0) and aimd.capacity == 18
    for _ in tickets[1:]:
        aimd.failed(0.0)
    now = 1.0
    while now + 1.0 < CEILING_PAUSES * 1.0:  # (the answers come a second after)
        round_trip(aimd, 1000, now)
        now += 0.1
    assert aimd.capacity == 19  # under the 20 refused, however many answers came
    while now < CEILING_PAUSES * 1.0 + 1.0:
        round_trip(aimd, 1000, now)
        now += 0.1
    assert aimd.capacity >= 20  # the hold is over: it probes past it again
    # Without Retry-After a refusal costs only its retry: no hold.
    aimd = Aimd.starting(20, 64)
    aimd.probing = False
    assert aimd.overloaded(aimd.send(0.0), 0.0)
    for step in range(40):
        round_trip(aimd, 1000, 1.0 + step)
    assert aimd.capacity >= 20


@dataclass
class QueueingServer:
    """A server like vLLM, scripted: it decodes up to `capacity` requests at once and queues
    the rest first come, first served. A request's decode takes `tokens` steps of
    `step_seconds`, each slower by up to `batch_slowdown` as the batch fills, times a seeded
    noise: the latency per token grows with the batch (batching) and, past the capacity,
    with the queue."""

    capacity: int
    step_seconds: float = 0.001
    batch_slowdown: float = 0.25
    noise: float = 0.1
    seed: int = 1
    active: int = 0
    waiting: deque[tuple[Ticket, int]] = field(default_factory=deque)
    done: list[tuple[float, int, Ticket, int]] = field(default_factory=list)  # a heap
    _order: int = 0

    def __post_init__(self) -> None:
        import random

        self.rng = random.Random(self.seed)

    def admit(self, ticket: Ticket, tokens: int, now: float) -> None:
        if self.active < self.capacity:
            self._start(ticket, tokens, now)
        else:
            self.waiting.append((ticket, tokens))

    def _start(self, ticket: Ticket, tokens: int, now: float) -> None:
        self.active += 1
        batch = min(1.0, (self.active - 1) / self.capacity)
        noise = self.rng.lognormvariate(0.0, self.noise)
        seconds = tokens * self.step_seconds * (1 + self.batch_slowdown * batch) * noise
        self._order += 1
        heapq.heappush(self.done, (now + seconds, self._order, ticket, tokens))

    def next_answer(self) -> tuple[float, Ticket, int]:
        now, _, ticket, tokens = heapq.heappop(self.done)
        self.active -= 1
        while self.waiting and self.active < self.capacity:
            self._start(*self.waiting.popleft(), now)
        return now, ticket, tokens


def run_closed_loop(
    aimd: Aimd, server: QueueingServer, answers: int, capacity_at: dict[int, int] | None = None
) -> list[tuple[float, int]]:
    """Keep `aimd`'s limit full of requests to `server` (more demand than it serves) for
    `answers` answers; `capacity_at` changes the server's capacity at those answers.
    Returns (time, limit) at every answer."""
    rng = server.rng
    now, trace = 0.0, []

    def fill() -> None:
        while aimd.room(now):
            server.admit(aimd.send(now), rng.randint(64, 128), now)

    fill()
    for number in range(answers):
        if capacity_at and number in capacity_at:
            server.capacity = capacity_at[number]
        now, ticket, tokens = server.next_answer()
        aimd.succeeded(ticket, now, tokens)
        trace.append((now, aimd.capacity))
        fill()
    return trace


def mean_limit(trace: list[tuple[float, int]], start: int, end: int | None = None) -> float:
    """The time-weighted mean of the limit over answers [start, end)."""
    part = trace[start:end]
    spans = [(b[0] - a[0], a[1]) for a, b in itertools.pairwise(part)]
    return sum(seconds * limit for seconds, limit in spans) / sum(s for s, _ in spans)


@pytest.mark.parametrize("capacity", [8, 32])
def test_a_queueing_server_is_held_to_its_capacity_by_latency_alone(capacity: int) -> None:
    """No refusal ever comes: the limit must read the queue from the latency per token, and
    tell it from a fuller batch's (slower per token, but more tokens a second)."""
    aimd = Aimd.starting(8, 64)
    trace = run_closed_loop(aimd, QueueingServer(capacity), 6000)
    assert max(limit for _, limit in trace) > 1.1 * capacity  # it did go past it...
    assert mean_limit(trace, 3000) == pytest.approx(capacity, rel=0.1)  # ...and came back
    assert not aimd.probing


def test_a_fuller_batch_that_gives_more_tokens_is_not_queueing() -> None:
    """A server with room for more than the maximum, each request slower per token as the
    batch fills (a CPU's decode), yet more tokens a second in all: nothing to cut for."""
    aimd = Aimd.starting(8, 48)
    server = QueueingServer(1000, batch_slowdown=0.4 * 1000 / 48)  # 40% slower at 48
    trace = run_closed_loop(aimd, server, 3000)
    assert mean_limit(trace, 1500) >= 0.9 * 48


def _level(latency: float) -> Level:
    average = Average()
    for i in range(2 * MIN_SAMPLES):
        average.add(latency * (1.02 if i % 2 else 0.98))
    return Level(latency=average)


def test_a_level_that_reads_too_fast_by_chance_is_not_the_knee() -> None:
    """A CPU server's batch: tokens a second grow slowly up to 16 in flight, then stay flat
    (a queue). Level 10 read 30% too fast, as one of many noisy averages will: read alone it
    is within reach of the best, and was the knee; fitted to a curve that never falls it is
    pooled with the slower levels above it, and the knee is at the capacity."""
    aimd = Aimd.starting(8, 64)
    for load in range(8, 21):
        throughput = min(load, 16) / (1 + min(load, 16) / 16) * (1.3 if load == 10 else 1.0)
        aimd.levels[load] = _level(load / throughput)
    knee = aimd.knee()
    assert knee is not None and knee.load in (15, 16)


def test_the_fit_never_falls_and_pools_what_would() -> None:
    readings = [(1.0, 20), (3.0, 20), (2.0, 20), (4.0, 60), (3.0, 20)]
    averages = []
    for _, count in readings:
        average = Average()
        for _ in range(count):
            average.add(1.0)
        averages.append(average)
    fitted = [
        value for value, _ in rising([(t, a) for (t, _), a in zip(readings, averages, strict=True)])
    ]
    # Weighted by what each average is worth: 60 answers of a moving average of about 20
    # are worth 39 (2 / weight - 1), as many as it holds.
    assert fitted == pytest.approx([1.0, 2.5, 2.5, (4 * 39 + 3 * 20) / 59, (4 * 39 + 3 * 20) / 59])


def test_a_server_that_got_slower_is_learnt_again() -> None:
    """The capacity drops from 48 to 16 (another job took the GPU): answers at loads the
    limit knew as fast are now slow; it forgets them and finds the new capacity."""
    aimd = Aimd.starting(8, 64)
    trace = run_closed_loop(aimd, QueueingServer(48), 12000, capacity_at={4000: 16})
    assert mean_limit(trace, 2000, 4000) == pytest.approx(48, rel=0.1)
    assert mean_limit(trace, 8000) == pytest.approx(16, rel=0.1)


def test_latency_is_learnt_only_from_answers_sent_after_the_last_cut() -> None:
    """Answers to requests sent before a cut met the load that was cut: they teach nothing
    of the new limit."""
    aimd = Aimd.starting(10, 64)
    old = [aimd.send(0.0) for _ in range(10)]
    assert aimd.overloaded(old.pop(), 0.5)
    for ticket in old:
        aimd.succeeded(ticket, 1.0, 100)
    assert aimd.latency.count == 0 and not aimd.levels
    new = aimd.send(1.0)
    aimd.succeeded(new, 2.0, 100)
    assert aimd.latency.count == 1 and list(aimd.levels) == [1]


def test_short_answers_do_not_count_towards_the_latency() -> None:
    """A judge's two tokens are mostly prefill: their latency per token says nothing."""
    aimd = Aimd.starting(20, 64)
    for _ in range(20):  # the first round trip is never measured
        aimd.succeeded(aimd.send(0.0), 0.01, 1)
    aimd.succeeded(aimd.send(0.0), 0.01 * 100, 100)
    for step in range(MIN_SAMPLES * 2):
        aimd.succeeded(aimd.send(step), step + 5.0, LATENCY_MIN_TOKENS - 1)
    assert aimd.limit == 20 and aimd.latency.count == 1
    assert aimd.latency.value == pytest.approx(0.01)


def test_the_first_round_trip_is_not_measured() -> None:
    """Sent together into an idle server, the first requests meet a batch filling up, not
    the starting load: their answers read too fast, and a knee read from them too low."""
    aimd = Aimd.starting(4, 64)
    first = [aimd.send(0.0) for _ in range(4)]
    for ticket in first:
        aimd.succeeded(ticket, 1.0, 100)
    assert aimd.latency.count == 0 and not aimd.levels
    aimd.succeeded(aimd.send(1.0), 2.0, 100)
    assert aimd.latency.count == 1


def test_the_first_slowdown_ends_the_start_without_a_cut_under_the_load_it_met() -> None:
    """A CPU's batch: each request slower per token as the batch fills (twice as slow at
    17 in flight), yet more tokens a second all the way to the maximum. The start sees
    slower answers than at its first limit and cannot tell them from a queue: it must not
    cut under the load they met (the old start cut to what the latency said was served,
    and held a mean limit of 13 over the first 300 answers)."""
    aimd = Aimd.starting(8, 24)
    trace = run_closed_loop(aimd, QueueingServer(1000, batch_slowdown=1000 / 16, noise=0.0), 300)
    assert not aimd.probing
    assert mean_limit(trace, 0, 300) >= 15


def test_a_small_limit_grows_by_a_share_of_itself() -> None:
    """At 8 in flight one request more is 12% more load: grown by one per 20 answers, the
    limit ran 9-10% over a queueing server's capacity of 8 before the latency showed it.
    It now grows by a twentieth of itself per 20 answers there."""
    aimd = Aimd(maximum=64, limit=8.0, probing=False)
    for step in range(MIN_SAMPLES):
        aimd.succeeded(aimd.send(step), step + 0.1, 0)
        while aimd.room(step):
            aimd.send(step)
    assert aimd.limit == pytest.approx(8.4, abs=0.05)  # one per 20 answers: 9
    overshoot = []
    for seed in range(1, 6):
        aimd = Aimd.starting(8, 64)
        trace = run_closed_loop(aimd, QueueingServer(8, seed=seed), 6000)
        overshoot.append(mean_limit(trace, 3000) / 8)
    assert max(overshoot) <= 1.07


def test_the_server_queue_steers_the_limit_where_it_is_reported() -> None:
    """A reading with a short queue grows the limit by what the queue allowed has left,
    where the limit was reached since the last reading; a longer queue cuts it to what the
    server runs plus the queue allowed, once per window; while readings come, answers
    neither grow the limit nor let the latency decide."""
    allowed = max(QUEUE_MIN, QUEUE_SHARE * 16)
    aimd = Aimd(maximum=64, limit=16.0, probing=False)
    tickets = [aimd.send(0.0) for _ in range(16)]
    grown = 16 + (allowed - 1) * 16 / 17  # the room left, by this client's share of 17
    assert not aimd.server_queue(1, 16, 0.5, 1.5) and aimd.limit == pytest.approx(grown)
    assert not aimd.server_queue(0, 16, 1.0, 1.5) and aimd.limit == pytest.approx(grown)
    limit = aimd.limit  # not reached since the last reading: no growth
    tickets += [aimd.send(1.0) for _ in range(aimd.room(1.0))]
    assert aimd.server_queue(8, 16, 1.5, 1.5)
    assert aimd.limit == pytest.approx(limit * (16 + allowed) / (16 + 8))
    assert not aimd.server_queue(8, 16, 2.0, 1.5)  # the same window: the cut is on its way
    # Answers while the readings are fresh (until 3.5): no growth per answer.
    limit = aimd.limit
    for number, ticket in enumerate(tickets):
        aimd.succeeded(ticket, 2.0 + number / 100, 100)
        while aimd.room(2.0):
            aimd.send(2.0)
    assert aimd.limit == limit
    # Readings stopped (a server restarting): the answers steer it again.
    aimd.succeeded(aimd.send(4.0), 4.5, 100)
    assert aimd.limit > limit


def test_a_reading_shares_growth_ends_a_search_and_ignores_an_idle_server() -> None:
    """Two workers on one server read the same queue: each grows by its share of the room
    left (here half of the requests the server holds are this one's). A latency search
    left from before the readings ends: the queue decides. A server running nothing (starting
    up) says nothing of its capacity: neither a cut nor growth."""
    allowed = max(QUEUE_MIN, QUEUE_SHARE * 16)
    aimd = Aimd(maximum=64, limit=8.0, probing=False, searching=True)
    for _ in range(8):
        aimd.send(0.0)
    assert not aimd.server_queue(0, 8, 0.5, 1.5)  # nothing waits, 8 of 8 are this one's
    assert not aimd.searching and aimd.limit == 8 + max(1.0, max(QUEUE_MIN, QUEUE_SHARE * 8))
    aimd = Aimd(maximum=64, limit=8.0, probing=False)
    for _ in range(8):
        aimd.send(0.0)
    assert not aimd.server_queue(0, 16, 0.5, 1.5)  # 16 running: 8 of them another worker's
    assert aimd.limit == 8 + max(1.0, allowed / 2)
    before = aimd.limit
    for _ in range(aimd.room(0.5)):
        aimd.send(0.5)
    assert not aimd.server_queue(30, 0, 1.0, 1.5) and aimd.limit == before
    assert aimd.metered(1.0)


def test_memory_is_bounded_by_the_levels_of_load() -> None:
    """One average per level of load, and no level above the maximum, however long it runs."""
    aimd = Aimd.starting(8, 24)
    run_closed_loop(aimd, QueueingServer(16), 20000)
    assert len(aimd.levels) <= 24 and max(aimd.levels) <= 24
    assert not math.isnan(aimd.limit)


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
