"""How many requests one endpoint may have in flight: additive increase, multiplicative
decrease (AIMD), the rule TCP uses to share a link it cannot see.

A server's capacity is not known in advance and changes (another team's jobs, a restarted
node), so the limit is found by probing: it grows by about one request per round trip while
every answer comes back, halves when the server says it is overloaded (429, 503, a timeout),
and shrinks by a tenth when answers slow down (the latency of a generated token doubled:
requests are queueing in the server). It never leaves [1, maximum].

A burst of errors is one signal, not many: when 40 requests sent together all get a 429, the
limit halves once. Each request carries the number it was sent under (`Ticket`), and only a
request sent after the last decrease may decrease it again: those sent before answered a
limit that has already been cut.

Pure: no clock, no I/O. The caller passes the times, so the behaviour can be tested against
a scripted server, step by step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

# Overloaded (429, 503, timeout): halve. Slowing down: shrink by a tenth.
OVERLOAD_FACTOR = 0.5
SLOWDOWN_FACTOR = 0.9
# Slowing down means: the latency per generated token (its moving average) is above this many
# times the lowest average seen.
LATENCY_FACTOR = 2.0
# The moving average's weight for a new answer, and the fewest generated tokens an answer must
# have to count: a judge's two tokens are mostly prefill, and would read as a slowdown.
LATENCY_WEIGHT = 0.2
LATENCY_MIN_TOKENS = 16


class Ticket(NamedTuple):
    """A request in flight, by the number it was sent under."""

    number: int


@dataclass
class Aimd:
    """One endpoint's limit, what it has in flight, and until when it is paused."""

    maximum: int
    limit: float
    in_flight: int = 0
    paused_until: float = 0.0
    latency: float | None = None  # moving average, seconds per generated token
    best_latency: float | None = None
    sent: int = 0
    _window: int = 0  # requests numbered up to this one were sent before the last decrease
    _last_full: int = 0  # the number of the last request that filled the limit

    @classmethod
    def starting(cls, initial: int, maximum: int) -> Aimd:
        return cls(maximum=maximum, limit=float(max(1, min(initial, maximum))))

    @property
    def capacity(self) -> int:
        """The whole requests the limit allows, at least one."""
        return max(1, int(self.limit))

    def room(self, now: float) -> int:
        """How many more requests may be sent at `now`: none while paused."""
        if now < self.paused_until:
            return 0
        return max(0, self.capacity - self.in_flight)

    def send(self) -> Ticket:
        self.sent += 1
        self.in_flight += 1
        if self.in_flight >= self.capacity:
            self._last_full = self.sent
        return Ticket(self.sent)

    def succeeded(self, ticket: Ticket, seconds: float, tokens: int) -> None:
        """An answer came back: grow by 1/limit (one request per round trip) if the limit
        was reached while it was in flight (an endpoint asked for less than its limit learns
        nothing of its capacity), and watch the latency per generated token."""
        self._finish()
        if self._last_full >= ticket.number:
            self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)
        if tokens < LATENCY_MIN_TOKENS or seconds <= 0:
            return
        per_token = seconds / tokens
        self.latency = (
            per_token
            if self.latency is None
            else (1 - LATENCY_WEIGHT) * self.latency + LATENCY_WEIGHT * per_token
        )
        self.best_latency = min(self.best_latency or self.latency, self.latency)
        if self.latency > LATENCY_FACTOR * self.best_latency:
            self._decrease(ticket, SLOWDOWN_FACTOR)

    def overloaded(self, ticket: Ticket) -> bool:
        """429, 503 or a timeout: halve, once per window. Returns whether it did."""
        self._finish()
        return self._decrease(ticket, OVERLOAD_FACTOR)

    def failed(self) -> None:
        """Any other end (a refused connection, a rejected request): the slot is free, and
        the limit stays, since it says nothing of the server's load."""
        self._finish()

    def pause(self, until: float) -> None:
        """Send nothing before `until` (a Retry-After, an endpoint that refused a connection);
        a later pause never shortens an earlier one."""
        self.paused_until = max(self.paused_until, until)

    def _finish(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    def _decrease(self, ticket: Ticket, factor: float) -> bool:
        if ticket.number <= self._window:
            return False
        self.limit = max(1.0, self.limit * factor)
        self._window = self.sent
        return True
