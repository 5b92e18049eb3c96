"""How far a run has come and how fast it goes.

The one definition of a rate and an ETA: `zoi generate`'s and `zoi run`'s summaries, the
launcher's live line and `zoi status` all compute theirs here, each over its own span of time.
`Progress` is the launcher's view of a run's done markers, read incrementally while it runs,
and of the live counters of the chunks in hand.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import shards
from .engines.endpointstats import EndpointFigures, headline
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
    only those finished since the launcher began, which set the pace; `live` the chunks in
    hand, not yet done; `endpoints` the served models' figures, added up over the workers
    (none for an engine on GPUs). `funnel` alone is the run's final figure."""

    total_chunks: int
    total_prompts: int
    began: float = field(default_factory=time.time)
    counted: dict[str, _Counted] = field(default_factory=dict)
    funnel: Tally = field(default_factory=Tally)
    recent: Tally = field(default_factory=Tally)
    live: Tally = field(default_factory=Tally)
    endpoints: list[EndpointFigures] = field(default_factory=list)

    def update(
        self,
        run: Run,
        grid: dict[str, Chunk],
        live: dict[str, Tally] | None = None,
        endpoints: list[EndpointFigures] | None = None,
    ) -> None:
        """Read the markers that are new or gone, and take `live`, the funnels so far of the
        chunks in hand (`liveprogress`), read before the markers: a chunk with a marker is
        counted by its marker alone. `endpoints` are the workers' endpoint figures."""
        self.endpoints = list(endpoints or [])
        present = shards.present_markers(run)
        gone = [c for c in self.counted if present.get(c) != self.counted[c].inode]
        for chunk_id in gone:
            del self.counted[chunk_id]
        if gone:
            self._recount()
        for chunk_id, inode in present.items():
            if chunk_id in grid and chunk_id not in self.counted:
                self._add(run, grid[chunk_id], inode)
        self.live = Tally()
        for chunk_id, funnel in (live or {}).items():
            if chunk_id in grid and chunk_id not in self.counted:
                self.live.merge(funnel)

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
        """The live line: the done chunks and the records of the chunks in hand, so that
        records, rate and ETA move with every record, not only when a chunk ends."""
        shown, pace = self._with_live(self.funnel), self._with_live(self.recent)
        rate = Throughput.of(pace, time.time() - self.began)
        left = self.total_prompts - shown.prompts
        eta = rate.eta(left)
        until = "?" if eta is None else (f"{eta / 60:.1f} min" if left else "0 min")
        fleet = f" | {headline(self.endpoints)}" if self.endpoints else ""
        return (
            f"chunks {len(self.counted)}/{self.total_chunks} | records {shown.kept} "
            f"({shown.kept_percent:.0f}% kept) | {rate.records_per_s:.2f} records/s | "
            f"{rate.tokens_per_s:.0f} tokens/s | ETA {until}{fleet}"
        )

    def _with_live(self, funnel: Tally) -> Tally:
        total = Tally()
        total.merge(funnel)
        total.merge(self.live)
        return total
