"""Counters for a stream of any length, each in memory that does not grow with it.

A report over 500,000 records must not hold them: lengths are counted per value (there are
only so many lengths), frequent openings are kept by the space-saving algorithm, and the
figures that need the texts themselves are computed on a uniform random sample.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .detectors import char_ngrams

T = TypeVar("T")
PERCENTILES = (5, 25, 50, 75, 90, 95, 99)
HISTOGRAM_BINS = 20


def _nice_width(span: int, bins: int) -> int:
    """A bin width of 1, 2 or 5 times a power of ten: edges a reader can take in at a glance."""
    raw = max(1, -(-span // bins))
    scale = 1
    while True:
        for step in (1, 2, 5):
            if step * scale >= raw:
                return step * scale
        scale *= 10


@dataclass
class Distribution:
    """Non-negative integers (lengths) counted per value: exact percentiles and a histogram in
    memory bounded by the longest value, not by how many were counted."""

    counts: Counter[int] = field(default_factory=Counter)

    def add(self, value: int) -> None:
        self.counts[value] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def percentile(self, p: float) -> int:
        """The smallest value with at least `p` percent of the values at or below it."""
        target = max(1, -(-self.total * p // 100))
        seen = 0
        for value in sorted(self.counts):
            seen += self.counts[value]
            if seen >= target:
                return value
        raise ValueError("no values counted")

    def histogram(self, bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
        """Equal-width bins from zero (bin i is `[i * width, (i + 1) * width)`), wide enough
        that at most `bins` cover every value."""
        if not self.counts:
            return {"width": 1, "counts": []}
        width = _nice_width(max(self.counts) + 1, bins)
        out = [0] * (max(self.counts) // width + 1)
        for value, count in self.counts.items():
            out[value // width] += count
        return {"width": width, "counts": out}

    def figures(self) -> dict[str, Any]:
        total = self.total
        if not total:
            return {"count": 0}
        return {
            "count": total,
            "mean": round(sum(v * n for v, n in self.counts.items()) / total, 2),
            "min": min(self.counts),
            "max": max(self.counts),
            "percentiles": {f"p{p}": self.percentile(p) for p in PERCENTILES},
            "histogram": self.histogram(),
        }


class TopCounter(Generic[T]):
    """The most frequent items of a stream in bounded memory: the space-saving algorithm
    (Metwally et al.), evicting in batches so an item costs O(1) amortized. Exact while no
    more than `2 * capacity` distinct items were seen; after that a count may be over by at
    most `floor`, and every item more frequent than that is still there."""

    def __init__(self, capacity: int = 2000) -> None:
        self.capacity = capacity
        self.counts: dict[T, int] = {}
        self.floor = 0

    def add(self, item: T) -> None:
        count = self.counts.get(item)
        self.counts[item] = (self.floor if count is None else count) + 1
        if len(self.counts) > 2 * self.capacity:
            ranked = sorted(self.counts.items(), key=lambda kv: -kv[1])
            self.floor = max(self.floor, ranked[self.capacity][1])
            self.counts = dict(ranked[: self.capacity])

    def top(self, n: int) -> list[tuple[T, int]]:
        return sorted(self.counts.items(), key=lambda kv: -kv[1])[:n]


class Reservoir(Generic[T]):
    """A uniform random sample of `size` items from a stream of unknown length (Vitter's
    algorithm R), seeded so that the same input gives the same sample."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.items: list[T] = []
        self.seen = 0
        self._random = random.Random(seed)

    def add(self, item: T) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
            return
        slot = self._random.randrange(self.seen)
        if slot < self.size:
            self.items[slot] = item


def shortened(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, with "…" where it was cut: an example shown in a
    report or on its page must not carry a whole runaway answer."""
    return text if len(text) <= limit else text[:limit] + "…"


def distinct_ngram_ratio(texts: Iterable[str], n: int) -> float | None:
    """Distinct character n-grams over all n-grams of `texts` ("distinct-n"): near 1 for
    varied text, low for text that says the same things. It falls as more text is counted,
    so the report computes it on a sample of fixed size, which keeps runs of different sizes
    comparable."""
    seen: set[str] = set()
    total = 0
    for text in texts:
        for gram in char_ngrams(text, n):
            seen.add(gram)
            total += 1
    return round(len(seen) / total, 4) if total else None
