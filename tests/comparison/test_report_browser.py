"""The report page as a real browser shows it (headless Chromium): headings rendered, every table
under its own title, no broken image.

A copy of ``report.html`` gets a script that, on load, writes what the browser made of the page
into a ``<pre id="check">`` as JSON; ``chromium --dump-dom`` prints the DOM after it ran.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any, Dict, List

import pytest

from pipeline.comparison import collect, writer

CHROMIUM = shutil.which("chromium")
# CI installs chromium (.ci/run), so there a missing browser fails the test instead of skipping it.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                 reason="chromium is not installed (Debian: apt-get install chromium)")]

CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const text = (node) => (node ? node.textContent.trim() : "");
  const titleBefore = (node) => document.evaluate(
    "preceding::*[self::h1 or self::h2 or self::h3][1]", node, null,
    XPathResult.FIRST_ORDERED_NODE_TYPE, null).singleNodeValue;
  const tables = [...document.querySelectorAll("table")];
  const summary = {
    headings: [...document.querySelectorAll("h1, h2")].map(text),
    tables: tables.length,
    table_titles: tables.map((t) => text(titleBefore(t))),
    images: [...document.querySelectorAll("img")].map((i) => (
      {alt: i.alt, complete: i.complete, naturalWidth: i.naturalWidth})),
  };
  const pre = document.createElement("pre");
  pre.id = "check";
  pre.textContent = JSON.stringify(summary);
  document.body.appendChild(pre);
});
</script>
"""


def browser_summary(page: Path, tmp_path: Path) -> Dict[str, Any]:
    """What headless Chromium made of ``page`` with :data:`CHECK_SCRIPT` added."""
    checked = tmp_path / f"checked_{page.name}"
    checked.write_text(page.read_text(encoding="utf-8").replace("</body>", CHECK_SCRIPT + "</body>"),
                       encoding="utf-8")
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
                          "--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"chromium failed ({out.returncode}): {out.stderr[-1500:]}"
    found = re.search(r'<pre id="check">(.*?)</pre>', out.stdout, re.S)
    assert found, f"the check script did not run; chromium said: {out.stderr[-1500:]}"
    return json.loads(html.unescape(found.group(1)))


def page_problems(summary: Dict[str, Any]) -> List[str]:
    """What a reader would see wrong: raw Markdown headings, untitled tables, broken images."""
    problems = [f"heading not rendered: {h!r}" for h in summary["headings"] if h.startswith("#")]
    if not summary["headings"]:
        problems.append("no heading")
    titles = summary["table_titles"]
    problems += [f"table {i} has no title before it" for i, t in enumerate(titles) if not t]
    problems += [f"tables share the title {t!r}" for t in sorted(set(titles)) if t and titles.count(t) > 1]
    problems += [f"broken image: {i['alt']!r}" for i in summary["images"]
                 if not i["complete"] or i["naturalWidth"] <= 0]
    return problems


@pytest.fixture(scope="module")
def methods_report(tmp_path_factory):
    """The report of the fake compare_methods multirun (with a retention set)."""
    from tests.report_runs import write_methods_multirun

    root = write_methods_multirun(tmp_path_factory.mktemp("browser") / "multirun" / "2026-12-01" / "12-00-00")
    return writer.write_report(collect.runs_from_folder(root), root / "report", replicates=200), root / "report"


def _png_width(path: Path) -> int:
    return struct.unpack(">I", path.read_bytes()[16:20])[0]


def test_report_page_in_chromium_has_titled_tables_and_no_broken_image(methods_report, tmp_path):
    result, out = methods_report
    summary = browser_summary(out / "report.html", tmp_path)
    assert page_problems(summary) == []
    assert summary["headings"] == ["Comparison of 2 configurations (4 runs)", "Configurations",
                                   "Paired differences to full", "Pareto front: quality vs cost",
                                   "Retention (does it forget?)", "Benchmarks before and after (lm-evaluation-harness)",
                                   "Runs not compared", "Plots"]
    assert summary["tables"] == 4 and summary["table_titles"] == [
        "Configurations", "Paired differences to full", "Pareto front: quality vs cost",
        "Retention (does it forget?)"]
    widths = sorted(_png_width(p) for p in result["images"])
    assert sorted(i["naturalWidth"] for i in summary["images"]) == widths  # decoded at full size


def test_a_broken_image_is_caught(methods_report, tmp_path):
    _, out = methods_report
    text = (out / "report.html").read_text(encoding="utf-8")
    # Three zero bytes in front of the PNG signature: still valid base64, no longer an image.
    cut = text.rindex("base64,", 0, text.index('alt="Training loss"')) + len("base64,")
    broken = tmp_path / "broken.html"
    broken.write_text(text[:cut] + "AAAA" + text[cut:], encoding="utf-8")
    summary = browser_summary(broken, tmp_path)
    assert page_problems(summary) == ["broken image: 'Training loss'"]
