"""Headless Chromium (Debian's `chromium`) for reading what a web UI shows.

`dump_dom(url)` returns the DOM after the page's scripts ran (virtual time lets timers and
animations finish without waiting in real time); `page_text(dom)` is its visible text, one line
per text node. `screenshot(url, path)` writes a PNG (for test failures).
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")
TIMEOUT_S = 180


def chromium() -> str | None:
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


def _run(args: list[str], *, budget_ms: int) -> subprocess.CompletedProcess:
    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium is not installed")
    # run-all-compositor-stages-before-draw: without it, lazily drawn charts are often missing
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--run-all-compositor-stages-before-draw",
        "--window-size=1400,1000",
        f"--virtual-time-budget={budget_ms}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def dump_dom(url: str, *, budget_ms: int = 30000) -> str:
    res = _run(["--dump-dom", url], budget_ms=budget_ms)
    if res.returncode != 0 or not res.stdout:
        raise RuntimeError(f"chromium --dump-dom {url} failed ({res.returncode}): {res.stderr[-2000:]}")
    return res.stdout


def screenshot(url: str, path: Path, *, budget_ms: int = 30000) -> Path | None:
    res = _run([f"--screenshot={path}", url], budget_ms=budget_ms)
    return path if res.returncode == 0 and path.exists() else None


def page_text(dom: str) -> list[str]:
    body = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    text = html.unescape(re.sub(r"<[^>]+>", "\n", body))
    return [line.strip() for line in text.splitlines() if line.strip()]


def chart_points(dom: str, title: str) -> int:
    """Points of the first plotted line after the chart titled `title` (plotly SVG: one `M` then
    one `L` per further point); 0 when the chart has no line."""
    start = dom.find(f'title="{title}"')  # the chart card's heading
    if start < 0:
        return 0
    m = re.search(r'<path class="js-line" d="([^"]*)"', dom[start:])
    if not m:
        return 0
    return len(re.findall(r"[ML]", m.group(1)))
