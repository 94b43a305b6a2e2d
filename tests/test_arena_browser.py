"""The HTML report in a real headless browser: the table's rows are in the DOM and the page is not blank."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import danlu.arena

pytest.importorskip("sklearn")
PIL = pytest.importorskip("PIL.Image")  # installed with matplotlib

ROSTER = ("adamw", "sgdm", "lion", "adamw+lookahead")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--force-device-scale-factor=1")


def chromium() -> str | None:
    """A Chromium (or Chrome) binary on PATH, if any."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


pytestmark = pytest.mark.skipif(
    chromium() is None, reason="no chromium binary on PATH (Debian: apt-get install -y chromium)"
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("browser-report")
    danlu.arena.run_task("digits", optimizers=",".join(ROSTER), steps=30, seeds=2, lr_grid="0.3,1,3",
                         out=out, progress=False)
    return out / "report.html"


def _browser(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    command = [chromium() or "chromium", *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


class TableRows(HTMLParser):
    """Collects the cell texts of every row of the table with a given id."""

    def __init__(self, table_id: str) -> None:
        super().__init__()
        self.table_id, self.depth, self.rows, self.cell = table_id, 0, [], None
        self.inside_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table" and ("id", self.table_id) in attrs:
            self.depth = 1
        elif self.depth and tag == "tbody":
            self.inside_body = True
        elif self.depth and self.inside_body and tag == "tr":
            self.rows.append([])
        elif self.depth and self.inside_body and tag == "td":
            self.cell = ""

    def handle_endtag(self, tag: str) -> None:
        if self.depth and tag == "td" and self.cell is not None:
            self.rows[-1].append(self.cell.strip())
            self.cell = None
        elif self.depth and tag == "table":
            self.depth, self.inside_body = 0, False

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell += data


def test_dom_has_the_table_rows(report: Path, tmp_path: Path) -> None:
    done = _browser(["--dump-dom", report.as_uri()], tmp_path / "profile")
    assert done.returncode == 0, done.stderr[-2000:]
    parser = TableRows("results")
    parser.feed(done.stdout)
    assert sorted(row[1] for row in parser.rows) == sorted(ROSTER)
    for row in parser.rows:
        assert row[-2] == "2/2"  # every seed finished
    assert done.stdout.count("<img") == 4


def test_screenshot_shows_the_plots(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    done = _browser([f"--screenshot={shot}", "--window-size=1280,2600", report.as_uri()], tmp_path / "profile")
    assert shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(PIL.open(shot).convert("RGB"), dtype=np.int16).reshape(-1, 3)
    not_white = float((pixels.min(axis=1) < 235).mean())
    coloured = float((pixels.max(axis=1) - pixels.min(axis=1) > 80).mean())
    assert not_white > 0.05, f"the page looks blank ({not_white:.1%} non-white pixels)"
    assert coloured > 0.002, f"no plot lines visible ({coloured:.2%} coloured pixels)"
    assert len(np.unique(pixels, axis=0)) > 100


PICK_BACKGROUND = (233, 246, 236)  # the recommendation box's fill (#e9f6ec in the page's CSS)


def test_recommendation_is_above_the_fold(report: Path, tmp_path: Path) -> None:
    """On a 1280x720 window, before any scrolling, the recommendation box is on screen and names the pick."""
    shot = tmp_path / "fold.png"
    done = _browser([f"--screenshot={shot}", "--window-size=1280,720", report.as_uri()], tmp_path / "profile")
    assert shot.is_file(), done.stderr[-2000:]
    image = np.asarray(PIL.open(shot).convert("RGB"), dtype=np.int16)
    assert image.shape[:2] == (720, 1280)
    box = np.all(np.abs(image - np.array(PICK_BACKGROUND)) <= 2, axis=2)
    rows = np.nonzero(box.any(axis=1))[0]
    assert box.mean() > 0.02, f"the recommendation box covers {box.mean():.1%} of the first screen"
    assert rows.max() < 720 and rows.min() < 300, f"box spans rows {rows.min()}-{rows.max()}"
    dom = _browser(["--dump-dom", report.as_uri()], tmp_path / "profile2").stdout
    start = dom.index('id="recommendation"')
    assert start < dom.index('id="results"')
    assert "Recommendation: " in dom[start:start + 400]
