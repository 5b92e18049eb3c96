"""How evenly a run's kept records cover the tasks and domains its base prompts cross.

A model that fails on one kind of task (code, say) or one domain loses those prompts to the
judge, and the kept data quietly leans away from them; the overall kept share cannot show it.
Base prompt `i` of a cross-product source is task `i // D`, domain `i % D` (wrapping around
the `T * D` pairs), so an item's index alone places it. Cells are counted only where prompts
fell, so a 1000 x 1000 source over a short run costs what the run costs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .dataset import Item
from .errors import ZoiError
from .prompt_sources import tasks_and_domains
from .rundir import Run

# Past this many cells the heat map is unreadable and its JSON large: marginals only.
MAX_CELLS = 10_000


def _share(kept: int, prompts: int) -> float | None:
    return round(kept / prompts, 4) if prompts else None


@dataclass
class TaskCoverage:
    """Prompts and kept records per (task, domain) cell, from items' indexes."""

    label: str
    tasks: list[str]
    domains: list[str]
    prompts: Counter[tuple[int, int]] = field(default_factory=Counter)
    kept: Counter[tuple[int, int]] = field(default_factory=Counter)

    def add(self, item: Item) -> None:
        pair = item.index % (len(self.tasks) * len(self.domains))
        cell = divmod(pair, len(self.domains))
        self.prompts[cell] += 1
        self.kept[cell] += item.kept

    def _marginal(self, names: list[str], axis: int) -> list[dict[str, Any]]:
        prompts, kept = [0] * len(names), [0] * len(names)
        for cell, count in self.prompts.items():
            prompts[cell[axis]] += count
            kept[cell[axis]] += self.kept[cell]
        return [
            {"name": name, "prompts": p, "kept": k, "kept_share": _share(k, p)}
            for name, p, k in zip(names, prompts, kept, strict=True)
        ]

    def figures(self) -> dict[str, Any]:
        cells = None
        if len(self.tasks) * len(self.domains) <= MAX_CELLS:
            rows = range(len(self.tasks))
            columns = range(len(self.domains))
            cells = {
                "prompts": [[self.prompts[(t, d)] for d in columns] for t in rows],
                "kept": [[self.kept[(t, d)] for d in columns] for t in rows],
            }
        return {
            "available": True,
            "source": self.label,
            "tasks": self._marginal(self.tasks, 0),
            "domains": self._marginal(self.domains, 1),
            "cells": cells,
        }


def coverage_of(run: Run) -> tuple[TaskCoverage | None, str]:
    """The coverage counter for `run`'s source, or None and why there is none."""
    try:
        run.source()  # refuses lists changed since the run was made: cells would be wrong
        lists = tasks_and_domains(run.config.prompts)
    except ZoiError as exc:
        return None, str(exc)
    if lists is None:
        return None, "the base prompts come from a file, which has no tasks or domains"
    tasks, domains, label = lists
    return TaskCoverage(label, tasks, domains), ""


def not_available(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason}
