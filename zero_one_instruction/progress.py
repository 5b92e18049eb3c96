"""How far a run has come: `Progress` is the launcher's view of a run's done markers, read
incrementally while it runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import shards
from .pipeline import Tally
from .rundir import Chunk, Run


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
        elapsed = max(time.time() - self.began, 1e-9)
        rate = self.recent.prompts / elapsed
        left = self.total_prompts - self.funnel.prompts
        eta = f"{left / rate / 60:.1f} min" if rate > 0 and left else ("0 min" if not left else "?")
        return (
            f"chunks {len(self.counted)}/{self.total_chunks} | records {self.funnel.kept} "
            f"({self.funnel.kept_percent:.0f}% kept) | {self.recent.kept / elapsed:.2f} "
            f"records/s | {self.recent.completion_tokens / elapsed:.0f} tokens/s | ETA {eta}"
        )
