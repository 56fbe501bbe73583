"""``scripts/screenshots.py`` (``make screenshots``) still takes the README's two pictures: the
example app over a year of demo data, photographed in Chromium, to a folder of the test's own."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_chromium

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's header chunk."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_the_screenshot_script_photographs_the_dashboard(tmp_path: Path) -> None:
    require_chromium()
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "screenshots.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    wide_w, wide_h = png_size(tmp_path / "dashboard.png")
    narrow = png_size(tmp_path / "dashboard-narrow.png")
    assert wide_w == 1280 and wide_h > 1500  # the whole page, every panel below the first screen
    assert narrow == (390, 844)  # a phone's first screen
