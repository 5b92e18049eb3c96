"""The figures an engine that talks to servers reports per endpoint (its optional `stats()`),
made safe to publish and added up across the workers that share an endpoint.

Each worker's engine runs its own concurrency controller per endpoint, so what an endpoint
carries is the sum over the workers: `zoi status` and the launcher's line add the workers'
figures up here. What a worker publishes is read back by other processes, from Redis that
anyone on the queue can write to, so reading keeps only well-formed figures and never fails.
URLs lose any credentials and query before they leave the engine: figures are shown and logged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

NUMBERS = ("limit", "in_flight", "requests", "retries")
STEERING = ("queue", "latency", "mixed")  # what may move an endpoint's limit


def public_url(url: str) -> str:
    """`url` without user, password, query or fragment: what may be shown anywhere."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "<unparsable url>"
    if ":" in host:  # an IPv6 address keeps its brackets
        host = f"[{host}]"
    return urlunsplit((parts.scheme, host + port, parts.path, "", ""))


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and value >= 0 and value == value and value != float("inf")


@dataclass(frozen=True)
class EndpointFigures:
    """One endpoint as one worker sees it, or as every worker together does (`workers`).

    `limit` is the concurrency controller's current limit on requests in flight, `requests`
    every request sent (retries included) and `retries` how many of those were retries;
    `errors` counts failed attempts by kind (`429`, `5xx`, `timeout`, `connect`, or the
    engine's own names). `up` is False only when the engine says it has given the endpoint up
    for now (optional in `stats()`). `steered_by` says what moves the limit, where the engine
    says (optional): `queue` (the server's own queue), `latency`, or `mixed` when the workers
    sharing the endpoint differ (one of them lost the metrics, say)."""

    url: str
    limit: float = 0.0
    in_flight: int = 0
    requests: int = 0
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    up: bool = True
    workers: int = 1
    steered_by: str | None = None

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def error_rate(self) -> float:
        """Failed attempts per request sent, as a share (0 before the first request)."""
        if not self.requests:
            return 0.0
        return min(1.0, self.error_count / self.requests)

    def plus(self, other: EndpointFigures) -> EndpointFigures:
        """Both workers' figures for the endpoint: limits, requests and errors add up, and
        the endpoint is up if any worker still reaches it."""
        errors = dict(self.errors)
        for kind, count in other.errors.items():
            errors[kind] = errors.get(kind, 0) + count
        return EndpointFigures(
            url=self.url,
            limit=self.limit + other.limit,
            in_flight=self.in_flight + other.in_flight,
            requests=self.requests + other.requests,
            retries=self.retries + other.retries,
            errors=errors,
            up=self.up or other.up,
            workers=self.workers + other.workers,
            steered_by=self.steered_by if self.steered_by == other.steered_by else "mixed",
        )

    def as_dict(self) -> dict[str, Any]:
        """`zoi status --json`'s entry: the figures, the error count and rate."""
        return {
            **dataclasses.asdict(self),
            "error_count": self.error_count,
            "error_rate": round(self.error_rate, 6),
        }


def _fields(value: Any) -> Mapping[str, Any] | None:
    """One endpoint's figures as a mapping, from a dict or a dataclass instance."""
    if isinstance(value, Mapping):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return None


def parse(url: Any, value: Any) -> EndpointFigures | None:
    """One endpoint's figures as an engine or a worker gave them, or None when they are not
    figures (a missing or negative count, an error kind that is not a name): left out, never
    raised."""
    data = _fields(value)
    if not isinstance(url, str) or data is None:
        return None
    if not _is_number(data.get("limit")):
        return None
    if not all(_is_count(data.get(name)) for name in NUMBERS[1:]):
        return None
    errors = data.get("errors", {})
    if not isinstance(errors, Mapping) or not all(
        isinstance(kind, str) and _is_count(count) for kind, count in errors.items()
    ):
        return None
    up = data.get("up", True)
    steered_by = data.get("steered_by")
    return EndpointFigures(
        url=public_url(url),
        limit=float(data["limit"]),
        in_flight=data["in_flight"],
        requests=data["requests"],
        retries=data["retries"],
        errors=dict(sorted(errors.items())),
        up=up if isinstance(up, bool) else True,
        steered_by=steered_by if steered_by in STEERING else None,
    )


def snapshot(stats: Any) -> dict[str, dict[str, Any]]:
    """What an engine's `stats()` returned, as JSON-safe figures by public URL: what a worker
    publishes. Entries that are not figures are left out."""
    if not isinstance(stats, Mapping):
        return {}
    found = {}
    for url, value in stats.items():
        figures = parse(url, value)
        if figures is not None:
            published = dataclasses.asdict(figures)
            del published["url"], published["workers"]
            found[figures.url] = published
    return found


def fleet(workers: Iterable[Mapping[str, EndpointFigures]]) -> list[EndpointFigures]:
    """Every endpoint the workers report, each added up over the workers, by URL."""
    total: dict[str, EndpointFigures] = {}
    for endpoints in workers:
        for url, figures in endpoints.items():
            total[url] = total[url].plus(figures) if url in total else figures
    return [total[url] for url in sorted(total)]


def headline(endpoints: list[EndpointFigures]) -> str:
    """The launcher's short part: endpoints up (and down), the concurrency they are allowed
    and the error rate over every request: `endpoints: 2 up, conc 24, err 0.3%`."""
    up = sum(1 for e in endpoints if e.up)
    down = len(endpoints) - up
    requests = sum(e.requests for e in endpoints)
    errors = sum(e.error_count for e in endpoints)
    rate = min(1.0, errors / requests) if requests else 0.0
    state = f"{up} up" + (f", {down} down" if down else "")
    conc = sum(e.limit for e in endpoints)
    return f"endpoints: {state}, conc {conc:.0f}, err {100 * rate:.1f}%"
