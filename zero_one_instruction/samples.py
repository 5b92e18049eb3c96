"""What the report shows of the items themselves: random kept records and random drops with
their step texts, and the judges' confidence where traces carry it.

Counts say how often; a reader trusts data only after reading some of it, and a drop is
understood only with the texts that led to it. Both samples are uniform over the whole input
(`Reservoir`), so the first chunk is not overrepresented, and hold 20 items however many pass.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .analysis import judge_name, step_name
from .dataset import Item
from .pipeline import DROP_REASONS
from .textstats import Reservoir, shortened

SAMPLES = 20
TEXT_CHARS = 2000
STEP_CHARS = 1200
CONFIDENCE_BINS = 20


def _cut(text: Any, limit: int) -> str | None:
    """A trace's text shortened, or None where a damaged trace holds no text."""
    return shortened(text, limit) if isinstance(text, str) else None


def _step(step: dict[str, Any]) -> dict[str, Any]:
    return {
        "step": step_name(step),
        "text": _cut(step.get("text"), STEP_CHARS),
        "verdict": step.get("verdict"),
        "finish_reason": step.get("finish_reason"),
        "error": step.get("error"),
        "yes_probability": step.get("yes_probability"),
    }


def _item(item: Item) -> dict[str, Any]:
    out: dict[str, Any] = {
        "index": item.index,
        "question": _cut(item.question, TEXT_CHARS),
        "answer": _cut(item.answer, TEXT_CHARS),
    }
    if not item.kept:
        reason = item.drop_reason or "unknown"
        out["drop_reason"] = reason
        out["reason"] = DROP_REASONS.get(reason, "")
        out["steps"] = [_step(s) for s in item.steps or []]
    return out


@dataclass
class Samples:
    """A uniform sample of kept records and one of drops, each of `SAMPLES` items."""

    kept: Reservoir[Item] = field(default_factory=lambda: Reservoir(SAMPLES, seed=1))
    dropped: Reservoir[Item] = field(default_factory=lambda: Reservoir(SAMPLES, seed=2))

    def add(self, item: Item) -> None:
        (self.kept if item.kept else self.dropped).add(item)

    def figures(self) -> dict[str, Any]:
        def ordered(reservoir: Reservoir[Item]) -> list[dict[str, Any]]:
            return [_item(i) for i in sorted(reservoir.items, key=lambda i: i.index)]

        return {"kept": ordered(self.kept), "dropped": ordered(self.dropped)}


def _probability(step: dict[str, Any]) -> float | None:
    """The judge's probability of はい, where the engine gave one (`yes_probability`)."""
    value = step.get("yes_probability")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if 0.0 <= value <= 1.0 else None


@dataclass
class JudgeConfidence:
    """The distribution of each judge's probability of はい, in bins of 1/20, from traces.
    Empty when the engine gives no log-probabilities: the page then says so."""

    bins: dict[str, Counter[int]] = field(default_factory=dict)
    sums: Counter[str] = field(default_factory=Counter)

    def add(self, item: Item) -> None:
        for step in item.steps or []:
            if step.get("step") != "judge":
                continue
            probability = _probability(step)
            if probability is None:
                continue
            judge = judge_name(step)
            slot = min(int(probability * CONFIDENCE_BINS), CONFIDENCE_BINS - 1)
            self.bins.setdefault(judge, Counter())[slot] += 1
            self.sums[judge] += probability

    def figures(self) -> dict[str, Any]:
        judges = {}
        for judge, counts in self.bins.items():
            total = sum(counts.values())
            judges[judge] = {
                "count": total,
                "mean": round(self.sums[judge] / total, 4),
                "histogram": {
                    "width": 1 / CONFIDENCE_BINS,
                    "counts": [counts[i] for i in range(CONFIDENCE_BINS)],
                },
            }
        return {"available": bool(judges), "judges": judges}
