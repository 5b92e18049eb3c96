"""The report as one HTML page: the figures' sections, their plots inline, the texts escaped.

The page must open anywhere, offline, years later: everything is in the one file (plots as
inline SVG, the style inline), and it runs no script at all. Its Content-Security-Policy
forbids scripts and any load from elsewhere, so a dataset text that slipped past escaping
still could not run, and a reference to the network would show as a browser error, which the
browser test looks for. jinja2 renders it with autoescape on: questions and answers are
untrusted text from a model and must reach the reader as text, never as markup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from . import plots
from .records import atomic_file

TEMPLATE = "report.html.j2"
# Tasks and domains listed as the heat map's weakest, per axis.
WEAKEST = 10


@dataclass
class Plot:
    """One plot on the page: its name (the test counts them by it), caption and SVG."""

    name: str
    caption: str
    svg: Markup


@dataclass
class Plots:
    """The page's plots by section, drawn from the figures before the template runs."""

    by_section: dict[str, list[Plot]] = field(default_factory=dict)

    def add(self, section: str, name: str, caption: str, svg: str) -> None:
        # Markup: matplotlib's own SVG, from numbers and ASCII labels, never dataset text.
        self.by_section.setdefault(section, []).append(Plot(name, caption, Markup(svg)))


def _funnel_plots(out: Plots, funnel: dict[str, Any] | None) -> None:
    if not funnel:
        return
    out.add(
        "funnel",
        "funnel",
        "Prompts, kept records and each drop reason",
        plots.funnel("funnel", funnel),
    )
    rescue = funnel["fixer"]["rescue_rate"]
    out.add(
        "funnel",
        "acceptance",
        "Judge acceptance (share of yes) and fixer rescue rate",
        plots.acceptance("acceptance", funnel["judges"], rescue),
    )


def _length_plots(out: Plots, lengths: dict[str, Any]) -> None:
    for side in ("question", "answer"):
        for unit in ("chars", "tokens"):
            figures = lengths[side][unit]
            if figures and figures.get("count"):
                name = f"length-{side}-{unit}"
                caption = f"{side.capitalize()} length in {unit}"
                out.add("lengths", name, caption, plots.histogram(name, figures, unit))


def _duplicate_plots(out: Plots, duplicates: dict[str, Any]) -> None:
    counts = {
        "exact duplicate questions": duplicates["exact_duplicate_questions"],
        "exact duplicate answers": duplicates["exact_duplicate_answers"],
        "near-duplicate questions": duplicates["near_duplicate_questions"],
    }
    colours = [plots.COLOURS["drop"]] * len(counts)
    out.add(
        "duplicates",
        "duplicates",
        "Duplicates among kept records",
        plots.bars("duplicates", list(counts), list(counts.values()), colours),
    )
    clusters = duplicates["near"]["largest_clusters"]
    if clusters:
        labels = [f"question #{c['first_index']}" for c in clusters]
        sizes = [c["size"] for c in clusters]
        out.add(
            "duplicates",
            "clusters",
            "Largest near-duplicate clusters (records in each)",
            plots.bars("clusters", labels, sizes, [plots.COLOURS["main"]] * len(sizes)),
        )


def _diversity_plots(out: Plots, figures: dict[str, Any]) -> None:
    distinct = figures["diversity"]["distinct_ngrams"]
    groups = {
        side: {f"distinct-{n}": v for n, v in ratios.items()} for side, ratios in distinct.items()
    }
    if any(v is not None for ratios in groups.values() for v in ratios.values()):
        out.add(
            "diversity",
            "distinct",
            "Distinct character n-gram ratios (on a sample)",
            plots.grouped("distinct", groups, "character n-grams"),
        )
    coverage = figures.get("task_coverage") or {}
    cells = coverage.get("cells")
    if coverage.get("available") and cells:
        out.add(
            "diversity",
            "coverage",
            "Kept share per task (rows) and domain (columns)",
            plots.heatmap("coverage", cells["prompts"], cells["kept"]),
        )


def _other_plots(out: Plots, figures: dict[str, Any]) -> None:
    language = figures["language"]
    if figures["records"]:
        sides = {"questions": language["question_scripts"], "answers": language["answer_scripts"]}
        out.add(
            "language",
            "scripts",
            "Mean share of each script per text",
            plots.scripts("scripts", sides),
        )
    flags = figures["flags"]
    counts = {
        "leaked scaffolding": flags["leaked_questions"],
        "looping answers": flags["looping_answers"],
        "restating answers": flags["restating_answers"],
        "non-Japanese answers": language["non_japanese_answers"],
        "non-Japanese questions": language["non_japanese_questions"],
    }
    out.add(
        "flags",
        "flags",
        "Flagged kept records",
        plots.bars(
            "flags", list(counts), list(counts.values()), [plots.COLOURS["drop"]] * len(counts)
        ),
    )
    confidence = figures.get("judge_confidence") or {}
    if confidence.get("available"):
        out.add(
            "confidence",
            "confidence",
            "Judges' probability of yes",
            plots.confidence("confidence", confidence["judges"]),
        )


def draw(figures: dict[str, Any]) -> Plots:
    """Every plot the figures call for."""
    out = Plots()
    _funnel_plots(out, figures.get("funnel"))
    _length_plots(out, figures["lengths"])
    _duplicate_plots(out, figures["duplicates"])
    _diversity_plots(out, figures)
    _other_plots(out, figures)
    return out


def _weakest(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries with the lowest kept share, among those that had prompts."""
    tried = [r for r in rows if r["prompts"]]
    return sorted(tried, key=lambda r: (r["kept_share"], -r["prompts"]))[:WEAKEST]


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    environment.filters["percent"] = lambda v: "–" if v is None else f"{100 * v:.1f}%"
    return environment


def render_page(figures: dict[str, Any]) -> str:
    """The page's HTML for `figures` (as `report.make_report` returns them)."""
    source = resources.files(__package__).joinpath(f"data/{TEMPLATE}").read_text("utf-8")
    template = _environment().from_string(source)
    coverage = figures.get("task_coverage") or {}
    weakest = (
        {"tasks": _weakest(coverage["tasks"]), "domains": _weakest(coverage["domains"])}
        if coverage.get("available")
        else None
    )
    return template.render(f=figures, plots=draw(figures).by_section, weakest=weakest)


def write_page(figures: dict[str, Any], path: Path) -> None:
    """Write the page whole or not at all."""
    with atomic_file(path, follow_links=True) as handle:
        handle.write(render_page(figures))
