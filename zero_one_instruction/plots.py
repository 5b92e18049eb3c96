"""The report page's plots: the figures' numbers drawn by matplotlib as inline SVG.

SVG rather than PNG because it is text in the page (one self-contained file, sharp at any
zoom), and matplotlib because it is the plotting library every Python user has met. Each
plot is made with the object API (no pyplot: no global figure state) under fixed settings,
with the date left out and a per-plot hash salt, so the same figures give the same bytes
and two plots on one page never share an element id. Labels stay ASCII: the page's HTML
carries the Japanese text, which the browser's fonts render, and matplotlib's fonts may not.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from .detectors import SCRIPTS

COLOURS = {"kept": "#3b7d4f", "drop": "#b5473a", "main": "#3a6ea5", "other": "#999999"}
SCRIPT_COLOURS = ("#3a6ea5", "#6b9bd1", "#1f3f66", "#d08c2e", "#8d5fb5", "#aaaaaa")
MARKED = ("p50", "p90", "p99")
WIDTH = 7.0


def _svg(figure: Figure, name: str) -> str:
    """The figure as an `<svg>` element to put in HTML (no XML prolog or doctype)."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": f"zoi-{name}", "svg.fonttype": "path"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None}, bbox_inches="tight")
    text = buffer.getvalue()
    start, end = text.find("<metadata>"), text.find("</metadata>")
    if start >= 0 and end > start:  # RDF naming matplotlib: bytes, and URLs the page never loads
        text = text[:start] + text[end + len("</metadata>") :]
    return text[text.index("<svg") :]


def _figure(height: float) -> Figure:
    return Figure(figsize=(WIDTH, height), layout="constrained")


def bars(name: str, labels: Sequence[str], values: Sequence[float], colours: Sequence[str]) -> str:
    """Horizontal bars, one per label, each with its value written at its end."""
    figure = _figure(0.45 * len(labels) + 0.8)
    axes = figure.add_subplot()
    rows = list(range(len(labels)))[::-1]
    axes.barh(rows, values, color=list(colours))
    axes.set_yticks(rows, labels=list(labels))
    top = max(values, default=0) or 1
    for row, value in zip(rows, values, strict=True):
        shown = f"{value:.0%}" if isinstance(value, float) else f"{value:,}"
        axes.text(value + top * 0.01, row, shown, va="center", fontsize=9)
    axes.set_xlim(0, top * 1.15)
    axes.spines[["top", "right"]].set_visible(False)
    return _svg(figure, name)


def funnel(name: str, figures: dict[str, Any]) -> str:
    """Prompts, kept, and each drop reason, in counts."""
    dropped = figures["dropped"]
    labels = ["prompts", "kept", *(f"dropped: {reason}" for reason in dropped)]
    values = [figures["prompts"], figures["kept"], *dropped.values()]
    colours = [COLOURS["main"], COLOURS["kept"], *[COLOURS["drop"]] * len(dropped)]
    return bars(name, labels, values, colours)


def acceptance(name: str, judges: dict[str, Any], rescue_rate: float | None) -> str:
    """Each judge's share of yes, and the fixer's rescue rate, as shares."""
    labels = [f"judge {judge} ({j['accepted']}/{j['asked']})" for judge, j in judges.items()]
    values = [float(j["acceptance"] or 0.0) for j in judges.values()]
    labels.append("fixer rescue rate")
    values.append(float(rescue_rate or 0.0))
    return bars(name, labels, values, [COLOURS["main"]] * len(values))


def histogram(name: str, figures: dict[str, Any], unit: str) -> str:
    """A length histogram with its p50, p90 and p99 marked."""
    hist = figures["histogram"]
    width, counts = hist["width"], hist["counts"]
    figure = _figure(2.4)
    axes = figure.add_subplot()
    first = next((i for i, n in enumerate(counts) if n), 0)  # bins start at zero: skip empties
    edges = [i * width for i in range(first, len(counts))]
    axes.bar(
        edges, counts[first:], width=width, align="edge", color=COLOURS["main"], edgecolor="white"
    )
    for mark, style in zip(MARKED, ("-", "--", ":"), strict=True):
        value = figures["percentiles"][mark]
        axes.axvline(value, color=COLOURS["drop"], linestyle=style, label=f"{mark} = {value:,}")
    axes.set_xlabel(unit)
    axes.set_ylabel("records")
    axes.legend(fontsize=8, frameon=False)
    axes.spines[["top", "right"]].set_visible(False)
    return _svg(figure, name)


def grouped(name: str, groups: dict[str, dict[str, float | None]], xlabel: str) -> str:
    """Vertical bars of several series (e.g. question, answer) over shared categories."""
    categories = list(next(iter(groups.values())))
    figure = _figure(2.6)
    axes = figure.add_subplot()
    step = 0.8 / len(groups)
    colours = (COLOURS["main"], COLOURS["kept"], COLOURS["drop"])
    for i, (series, values) in enumerate(groups.items()):
        xs = [c + i * step for c in range(len(categories))]
        axes.bar(xs, [v or 0 for v in values.values()], width=step, label=series, color=colours[i])
    axes.set_xticks([c + 0.4 - step / 2 for c in range(len(categories))], labels=categories)
    axes.set_xlabel(xlabel)
    axes.set_ylim(0, 1)
    axes.legend(fontsize=8, frameon=False)
    axes.spines[["top", "right"]].set_visible(False)
    return _svg(figure, name)


def scripts(name: str, sides: dict[str, dict[str, float]]) -> str:
    """The mean share of each script, stacked, per side (questions, answers)."""
    figure = _figure(1.6)
    axes = figure.add_subplot()
    rows = list(range(len(sides)))[::-1]
    left = [0.0] * len(sides)
    for script, colour in zip(SCRIPTS, SCRIPT_COLOURS, strict=True):
        shares = [side[script] for side in sides.values()]
        axes.barh(rows, shares, left=left, color=colour, label=script)
        left = [a + b for a, b in zip(left, shares, strict=True)]
    axes.set_yticks(rows, labels=list(sides))
    axes.set_xlim(0, 1)
    axes.legend(
        fontsize=8, frameon=False, ncols=len(SCRIPTS), loc="lower center", bbox_to_anchor=(0.5, 1.0)
    )
    return _svg(figure, name)


def heatmap(name: str, prompts: list[list[int]], kept: list[list[int]]) -> str:
    """Kept share per (task, domain) cell; cells without prompts are left blank."""
    shares = [
        [k / p if p else math.nan for p, k in zip(prow, krow, strict=True)]
        for prow, krow in zip(prompts, kept, strict=True)
    ]
    figure = _figure(max(3.0, min(9.0, 0.12 * len(shares) + 1.5)))
    axes = figure.add_subplot()
    image = axes.imshow(
        shares, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", interpolation="nearest"
    )
    axes.set_xlabel("domain (number in the list below)")
    axes.set_ylabel("task (number)")
    figure.colorbar(image, ax=axes, label="kept share")
    return _svg(figure, name)


def confidence(name: str, judges: dict[str, Any]) -> str:
    """Each judge's probability of yes, as step histograms over [0, 1]."""
    figure = _figure(2.6)
    axes = figure.add_subplot()
    for judge, figures in judges.items():
        counts = figures["histogram"]["counts"]
        width = figures["histogram"]["width"]
        edges = [i * width for i in range(len(counts) + 1)]
        axes.stairs(counts, edges, label=f"{judge} (mean {figures['mean']:.2f})", linewidth=1.5)
    axes.set_xlim(0, 1)
    axes.set_xlabel("probability of yes (hai)")
    axes.set_ylabel("verdicts")
    axes.legend(fontsize=8, frameon=False)
    axes.spines[["top", "right"]].set_visible(False)
    return _svg(figure, name)
