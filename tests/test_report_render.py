"""Report rendering: self-contained HTML (checked in headless Chromium) and markdown with linked figures."""

from __future__ import annotations

import base64
import os
import re

import numpy as np
import pytest

from posttrain_probe.analysis.plots import new_figure
from posttrain_probe.errors import ProbeError
from posttrain_probe.study.report_check import check_in_browser, external_references, find_chromium
from posttrain_probe.study.report_render import Report, format_value

needs_chromium = pytest.mark.skipif(
    find_chromium() is None and not os.environ.get("CI"),
    reason="no Chromium installed (apt-get install chromium); under CI a missing Chromium fails instead",
)


def _figure(seed: int, title: str):
    fig = new_figure(5, 2.5)
    ax = fig.add_subplot()
    rng = np.random.default_rng(seed)
    ax.plot(np.cumsum(rng.normal(size=200)), color="#0072B2")
    ax.set_title(title)
    return fig


def _report(tmp_path) -> Report:
    png = tmp_path / "given.png"
    _figure(3, "from a file").savefig(png, format="png", dpi=80)
    report = Report("Study <report> & results")
    report.paragraph("Plain text with <b>tags</b>, a pipe | and *stars*.\n\nA second paragraph.")
    report.heading("Setup", 2).code("posttrain-probe study --config study.yaml\n```nested fence```")
    report.note("Synthetic models: the numbers show the pipeline, not a finding.", title="Caveat")
    report.heading("Results", 2)
    report.table(
        ["feature", "NRN", "MAS", "label"],
        [[12, 0.123456, 1234567.0, "fine-tune-only"], [7, float("nan"), 3e-5, "shared"], [3, 0.5, 1500.25, None]],
        caption="Top features",
        highlight=lambda row: row[3] == "fine-tune-only",
    )
    for seed in range(3):
        report.figure(_figure(seed, f"random walk {seed}"), caption=f"Random walk {seed}: cumulative sums")
    report.figure(png, caption="A figure read from a PNG file")
    report.heading("Feature cards", 2)
    report.card(
        "Feature 12 (fine-tune-only)",
        {"NRN": 0.91, "MAS": 0.12, "fires on": "14% of tokens"},
        contexts=[([" the", " cat", "<sat>", " on", "\u21b5"], 2, 3.25), (["a", " |dog|", " ran"], 1, 2.5)],
    )
    report.card("Feature 7", [("NRN", 0.5)], contexts=[])
    return report


def test_format_value():
    assert format_value(3) == "3" and format_value(np.int64(3)) == "3"
    assert format_value(0.0) == "0" and format_value(0.123456) == "0.1235" and format_value(12.3456) == "12.35"
    assert format_value(1234.56) == "1235" and format_value(1.5e7) == "1.5e+07" and format_value(4.5e-5) == "4.50e-05"
    assert format_value(float("nan")) == "nan" and format_value(float("-inf")) == "-inf"
    assert format_value(None) == "\u2013" and format_value(True) == "yes" and format_value("x") == "x"


def test_html_and_markdown(tmp_path):
    report = _report(tmp_path)
    html_path, md_path = report.write(tmp_path / "out")
    page = html_path.read_text()
    assert html_path.name == "report.html" and md_path.name == "report.md"
    # self-contained: every image inline, no script, nothing external
    assert external_references(page) == []
    assert "<script" not in page.lower()
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4 and all(base64.b64decode(data).startswith(b"\x89PNG") for data in images)
    # all text escaped
    assert "Study &lt;report&gt; &amp; results" in page and "<b>tags</b>" not in page
    assert "<mark" in page and "&lt;sat&gt;</mark>" in page
    assert 'class="card"' in page and "<caption>Top features</caption>" in page
    assert page.count("<tr class=hl>") == 1
    assert 'href="#s-setup"' in page  # contents of the level-2 headings
    # markdown: figures as files, linked relatively
    md = md_path.read_text()
    names = report.figure_names()
    assert names[0] == "01-random-walk-0-cumulative-sums.png" and names[3] == "04-a-figure-read-from-a-png-file.png"
    for name in names:
        assert f"](figures/{name})" in md
        assert (tmp_path / "out" / "figures" / name).read_bytes().startswith(b"\x89PNG")
    assert "| feature | NRN | MAS | label |" in md and "|---:|---:|---:|---|" in md
    assert "| **12** | **0.1235** | **1.23e+06** | **fine\\-tune\\-only** |" not in md  # '-' is not escaped
    assert "| **12** | **0.1235** | **1.23e+06** | **fine-tune-only** |" in md
    assert " the cat**\\<sat\\>** on\u21b5" in md and "a **\\|dog\\|** ran" in md
    assert "> **Caveat:**" in md and "````\nposttrain-probe study" in md
    assert "Plain text with \\<b\\>tags\\</b\\>, a pipe \\| and \\*stars\\*." in md
    # a rewrite with fewer figures removes the stale figure files
    smaller = Report("again").figure(_figure(0, "only"), caption="Only one")
    smaller.write(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "figures").iterdir()) == ["01-only-one.png"]


def test_bad_blocks(tmp_path):
    report = Report("r")
    with pytest.raises(ProbeError, match="do not have 2 values"):
        report.table(["a", "b"], [[1, 2], [3]])
    with pytest.raises(ProbeError, match="highlight index"):
        report.card("c", {}, contexts=[(["a"], 1, 1.0)])
    with pytest.raises(ProbeError, match="PNG, JPEG or SVG"):
        report.figure(tmp_path / "x.gif")
    with pytest.raises(ProbeError, match="cannot read figure"):
        report.figure(tmp_path / "missing.png")
    assert external_references('<img src="https://x.org/a.png"><style>body{background:url(b.png)}</style>') == [
        "https://x.org/a.png",
        "b.png",
    ]


@needs_chromium
def test_report_in_headless_chromium(tmp_path):
    """The report opens in Chromium without console errors, every image decodes, the screenshot covers the page."""
    html_path, _ = _report(tmp_path).write(tmp_path / "out")
    check = check_in_browser(html_path, tmp_path / "shot.png")
    assert check.problems() == [], check
    assert check.console == [] and check.console_errors == []
    assert len(check.images) == 4 and all(image["width"] > 100 and image["height"] > 50 for image in check.images)
    assert check.screenshot == tmp_path / "shot.png" and check.screenshot.is_file()
    assert check.screenshot_distinct_colours > 10  # text, figures, card boxes: not blank
    assert check.screenshot_size[1] >= check.page_height >= check.images_bottom > 4 * 200
    assert not list((tmp_path / "out").glob(".*browser-check*"))  # the probe copy is gone


@needs_chromium
def test_browser_check_sees_errors(tmp_path):
    """The check itself: a script error, a console.error, a broken image and a missing file are all reported."""
    page = tmp_path / "bad.html"
    page.write_text(
        "<!DOCTYPE html><html><head><title>bad</title></head><body><p>text</p>"
        '<img src="data:image/png;base64,AAAA"><img src="missing.png">'
        '<script>console.log("fine"); console.error("boom"); undefinedFunction();</script></body></html>'
    )
    check = check_in_browser(page, tmp_path / "bad.png", timeout=60)
    assert "console.error: boom" in check.console_errors
    assert any("undefinedFunction is not defined" in e for e in check.console_errors)
    assert any("failed to load <img>" in e and "missing.png" in e for e in check.console_errors)
    assert len(check.undecoded_images) == 2
    assert check.external_references == ["missing.png"]
    assert any(message.startswith("fine") for message in check.console)
    assert not check.ok
