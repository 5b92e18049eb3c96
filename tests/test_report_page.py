"""`zoi report -o PAGE`: the page opens in a real headless browser (Debian's Chromium) with
every section and every plot there and not one console message; dataset text reaches it as
text, never as markup; and the figures only the page shows (samples, task coverage, judge
confidence) are right."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from zero_one_instruction.page import render_page
from zero_one_instruction.records import original_record
from zero_one_instruction.report import make_report

from .clitools import assert_one_line_error, zoi
from .report_demo import TASKS, make_demo_page

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
SECTIONS = (
    "funnel",
    "lengths",
    "duplicates",
    "diversity",
    "language",
    "flags",
    "confidence",
    "samples",
)
HOSTILE = "<script>console.error('escaped?')</script><img src=x onerror=alert(1)>"


def _browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium: `make setup` installs it (apt-get install chromium) as root")


def _chromium(page: Path, *args: str) -> tuple[str, list[str]]:
    """Chromium's stdout on `page` and the console messages it logged (every console call,
    script error and blocked load is one `CONSOLE` line on stderr)."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [
                _browser(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                *args,
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def open_page(page: Path) -> tuple[str, list[str]]:
    """The DOM after the browser rendered `page`, and its console messages."""
    return _chromium(page, "--dump-dom")


def screenshot(page: Path, png: Path, height: int = 2300) -> None:
    """The top of the page as the README shows it."""
    _chromium(page, f"--screenshot={png.resolve()}", f"--window-size=1100,{height}")


def _plots(dom: str) -> dict[str, int]:
    """Each plot's name and how many SVG elements its figure holds."""
    figures = dom.split('<figure class="plot"')[1:]
    return {
        figure.split('data-plot="', 1)[1].split('"', 1)[0]: figure.split("</figure>")[0].count(
            "<svg"
        )
        for figure in figures
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_page(tmp_path_factory.mktemp("demo"))


def test_a_run_s_page_renders_every_section_and_plot_without_console_messages(
    demo: Path, tmp_path: Path
) -> None:
    dom, console = open_page(demo)
    assert console == []
    for section in SECTIONS:
        assert f'<section id="{section}">' in dom, section
    assert _plots(dom) == dict.fromkeys(
        [
            "funnel",
            "acceptance",
            "length-question-chars",
            "length-answer-chars",
            "duplicates",
            "clusters",
            "distinct",
            "coverage",
            "scripts",
            "flags",
        ],
        1,
    )
    assert "Not available: the traces carry no probability" in dom
    assert "<script" not in dom and "http://" not in dom.replace("http://www.w3.org/", "")
    screenshot(demo, tmp_path / "page.png")
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_console_check_sees_a_script_error_and_a_blocked_load(tmp_path: Path) -> None:
    _browser()
    page = tmp_path / "bad.html"
    page.write_text(
        "<!DOCTYPE html><html><body><img src='https://example.invalid/x.png'>"
        "<script>console.error('boom'); missing();</script></body></html>",
        encoding="utf-8",
    )
    _, console = open_page(page)
    assert any('"boom"' in line for line in console)
    assert any("missing is not defined" in line for line in console)
    page.write_text(render_page_with_csp_breach(), encoding="utf-8")
    _, console = open_page(page)
    assert any("Content Security Policy" in line for line in console), console


def render_page_with_csp_breach() -> str:
    """A real page with one reference to the network: its CSP must block it, loudly."""
    html = render_page(make_report(_write_file(Path(tempfile.mkdtemp()))).figures)
    return html.replace("</body>", "<img src='https://example.invalid/x.png'></body>")


def _judge(kind: int, probability: Any) -> dict[str, Any]:
    return {
        "step": "judge",
        "attempt": kind,
        "text": "はい",
        "verdict": True,
        "yes_probability": probability,
    }


def _write_file(directory: Path) -> Path:
    """A merged file with meta: one hostile question, and judges with probabilities."""
    path = directory / "merged.jsonl"
    rows = [
        (HOSTILE, "回答です。<b>太字</b>ではなく文字として表示されるはずです。", [0.92, 0.97]),
        ("日本の四季について教えてください。", "春夏秋冬それぞれに行事があります。", [0.4, None]),
        ("俳句の作り方を説明してください。", "五七五の十七音で季語を入れます。", [True, 0.99]),
    ]
    with path.open("w", encoding="utf-8") as handle:
        for i, (question, answer, probabilities) in enumerate(rows):
            record = original_record(f"record_{i}", question, answer, "system")
            steps = [_judge(0, probabilities[0]), _judge(2, probabilities[1])]
            record["meta"] = {"index": i, "steps": steps}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def test_dataset_text_is_escaped_and_judge_confidence_is_plotted(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    result = zoi("report", str(_write_file(tmp_path)), "-o", str(page))
    assert result.exit_code == 0, result.stderr
    assert f"wrote     {page}" in result.stdout
    html = page.read_text(encoding="utf-8")
    assert "<script" not in html and "<img src=x" not in html and "<b>太字" not in html
    assert "&lt;script&gt;console.error(&#39;escaped?&#39;)&lt;/script&gt;" in html
    dom, console = open_page(page)
    assert console == []
    assert "<script" not in dom and "&lt;b&gt;太字&lt;/b&gt;" in dom
    assert _plots(dom)["confidence"] == 1
    assert "Not available: a merged file holds kept records only" in dom


def test_judge_confidence_counts_only_probabilities(tmp_path: Path) -> None:
    figures = make_report(_write_file(tmp_path)).figures["judge_confidence"]
    assert figures["available"] is True
    first, final = figures["judges"]["first"], figures["judges"]["final"]
    assert (first["count"], final["count"]) == (2, 2)  # True and None are not probabilities
    assert first["histogram"]["counts"][18] == 1 and first["histogram"]["counts"][8] == 1
    assert final["mean"] == round((0.97 + 0.99) / 2, 4)
    assert sum(final["histogram"]["counts"]) == 2 and final["histogram"]["counts"][19] == 2


def test_samples_and_task_coverage_of_a_run(demo: Path) -> None:
    figures = json.loads((demo.parent / "report.json").read_text(encoding="utf-8"))
    kept, dropped = figures["samples"]["kept"], figures["samples"]["dropped"]
    assert len(kept) == 20 and len(dropped) == 12  # 12 drops in all: every one is shown
    assert all(d["drop_reason"] == "fix_rejected" and d["reason"] for d in dropped)
    assert all([s["step"] for s in d["steps"]][-1] == "judge_after_fixer" for d in dropped)
    assert [k["index"] for k in kept] == sorted(k["index"] for k in kept)
    coverage = figures["task_coverage"]
    assert coverage["available"] is True
    shares = {t["name"].split("=")[1]: t["kept_share"] for t in coverage["tasks"]}
    assert shares == {name: (0.0 if name == "rejected" else 1.0) for name in TASKS}
    rejected = list(TASKS).index("rejected")
    assert coverage["cells"]["kept"][rejected] == [0] * 6
    assert sum(map(sum, coverage["cells"]["prompts"])) == figures["funnel"]["prompts"]


def test_a_file_has_no_task_coverage_and_the_page_refuses_bad_outputs(tmp_path: Path) -> None:
    path = _write_file(tmp_path)
    figures = make_report(path).figures
    assert figures["task_coverage"]["available"] is False
    assert figures["samples"]["dropped"] == [] and len(figures["samples"]["kept"]) == 3
    assert_one_line_error(zoi("report", str(path), "-o", str(path)), "is the input")
    same = str(tmp_path / "r.out")
    assert_one_line_error(zoi("report", str(path), "-o", same, "--json", same), "JSON output too")
    assert "<svg" in render_page(figures)
