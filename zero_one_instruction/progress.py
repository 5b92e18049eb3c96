"""How far a run has come and how fast it goes.

The one definition of a rate and an ETA: `zoi generate`'s and `zoi run`'s summaries, the
launcher's live line and `zoi status` all compute theirs here, each over its own span of time.
`Progress` is the launcher's view of a run's done markers, read incrementally while it runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import shards
from .pipeline import Tally
from .rundir import Chunk, Run


def per_second(amount: float, seconds: float) -> float:
    """`amount` over a span of `seconds`. No span (nothing timed yet, or a clock that went
    back) gives no rate rather than an absurd one."""
    return amount / seconds if seconds > 0 else 0.0


@dataclass(frozen=True)
class Throughput:
    """A funnel's pace over the time it took; the names are `zoi status --json`'s."""

    prompts_per_s: float = 0.0
    records_per_s: float = 0.0
    tokens_per_s: float = 0.0  # generated tokens: what the engine's speed is judged by

    @classmethod
    def of(cls, funnel: Tally, seconds: float) -> Throughput:
        return cls(
            prompts_per_s=per_second(funnel.prompts, seconds),
            records_per_s=per_second(funnel.kept, seconds),
            tokens_per_s=per_second(funnel.completion_tokens, seconds),
        )

    def eta(self, remaining: int) -> float | None:
        """Seconds until `remaining` base prompts are done at this pace: 0 with none left,
        None (unknown) while there is no pace yet."""
        if not remaining:
            return 0.0
        return remaining / self.prompts_per_s if self.prompts_per_s > 0 else None


@dataclass
class _Counted:
    """A marker already counted: its inode tells a rewritten marker from the same one."""

    inode: int
    funnel: Tally
    recent: bool


@dataclass
class Progress:
    """What the markers say, read incrementally: each marker is read once. Only markers of
    chunks in the run's grid count, and only once `shards.check` accepts them; a marker that
    disappears (set aside) stops counting. `funnel` adds up every counted chunk; `recent`
    only those finished since the launcher began, which set the pace."""

    total_chunks: int
    total_prompts: int
    began: float = field(default_factory=time.time)
    counted: dict[str, _Counted] = field(default_factory=dict)
    funnel: Tally = field(default_factory=Tally)
    recent: Tally = field(default_factory=Tally)

    def update(self, run: Run, grid: dict[str, Chunk]) -> None:
        present = shards.present_markers(run)
        gone = [c for c in self.counted if present.get(c) != self.counted[c].inode]
        for chunk_id in gone:
            del self.counted[chunk_id]
        if gone:
            self._recount()
        for chunk_id, inode in present.items():
            if chunk_id in grid and chunk_id not in self.counted:
                self._add(run, grid[chunk_id], inode)

    def _add(self, run: Run, chunk: Chunk, inode: int) -> None:
        result = shards.check(run, chunk, deep=False)
        if not result.done or result.marker is None:
            return  # damaged or being replaced: the reconciliation deals with it
        marker = result.marker
        counted = _Counted(inode, shards.funnel_of(marker), self._after_start(marker))
        self.counted[chunk.id] = counted
        self._count(counted)

    def _recount(self) -> None:
        """Add up the funnels again, after markers stopped counting: rare, so the totals can
        otherwise grow chunk by chunk however large the run."""
        self.funnel, self.recent = Tally(), Tally()
        for counted in self.counted.values():
            self._count(counted)

    def _count(self, counted: _Counted) -> None:
        self.funnel.merge(counted.funnel)
        if counted.recent:
            self.recent.merge(counted.funnel)

    def _after_start(self, marker: dict[str, Any]) -> bool:
        try:
            return datetime.fromisoformat(marker["finished_at"]).timestamp() >= self.began
        except (KeyError, TypeError, ValueError):
            return False

    def line(self) -> str:
        pace = Throughput.of(self.recent, time.time() - self.began)
        left = self.total_prompts - self.funnel.prompts
        eta = pace.eta(left)
        shown = "?" if eta is None else (f"{eta / 60:.1f} min" if left else "0 min")
        return (
            f"chunks {len(self.counted)}/{self.total_chunks} | records {self.funnel.kept} "
            f"({self.funnel.kept_percent:.0f}% kept) | {pace.records_per_s:.2f} records/s | "
            f"{pace.tokens_per_s:.0f} tokens/s | ETA {shown}"
        )
