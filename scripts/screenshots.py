"""Take the README's dashboard pictures: docs/dashboard.png and docs/dashboard-narrow.png.

Starts the example app (``examples/fastapi_app``) in a uvicorn subprocess on a loopback port,
over a temporary SQLite database holding a year of demo data ending today, and photographs its
dashboard with Playwright driving Debian's Chromium (``/usr/bin/chromium``; ``apt-get install
chromium``, never ``playwright install``): a desktop page (1280 px wide, the whole page) and
the first screen of a phone (390 x 844 px). Everything temporary is removed afterwards.

    .venv/bin/python scripts/screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import Page, sync_playwright

from usage_middleware import UsageStore
from usage_middleware._demo import write_demo_data

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = ROOT / "examples" / "fastapi_app"
CHROMIUM = "/usr/bin/chromium"
ADMIN_KEY = "screenshot-admin-key"
# The main answer is drawn and no panel is still waiting for its own.
READY = (
    "document.getElementById('main').dataset.state === 'ready'"
    " && !document.querySelector('[data-panel][data-state=\"loading\"]')"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start_app(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The example app over ``tmp``'s database; returns the process and the usage mount URL."""
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp / 'usage.db'}",
        "STORAGE_DIR": str(tmp / "files"),
        "USAGE_ADMIN_KEY": ADMIN_KEY,
        "USAGE_MIDDLEWARE_SPOOL_DIR": str(tmp / "spool"),
    }
    argv = [sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLE_DIR), "--factory"]
    argv += ["app:create_app", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen([*argv, "--log-level", "warning"], env=env, cwd=tmp)
    mount = f"http://127.0.0.1:{port}/api/usage/"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the example app exited with {proc.returncode}")
        try:
            if httpx.get(mount + "health/live", timeout=2).status_code == 200:
                return proc, mount
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the example app did not start within 60 s")


def _open(page: Page, url: str) -> None:
    page.goto(url)
    page.wait_for_function(READY)
    page.evaluate("document.fonts.ready")


def take(out: Path) -> list[Path]:
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is missing (apt-get install chromium)")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="usage-screenshots-") as name:
        tmp = Path(name)
        store = UsageStore(f"sqlite:///{tmp / 'usage.db'}")
        write_demo_data(store, days=365, keys=3, seed=0)
        store.dispose()
        proc, mount = _start_app(tmp)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
                )
                try:
                    desktop = browser.new_context(
                        locale="en-US", timezone_id="UTC", viewport={"width": 1280, "height": 900}
                    ).new_page()
                    _open(desktop, f"{mount}?range=90d&tz=UTC#key={ADMIN_KEY}")
                    desktop.screenshot(path=str(out / "dashboard.png"), full_page=True)
                    phone = browser.new_context(
                        locale="en-US",
                        timezone_id="UTC",
                        viewport={"width": 390, "height": 844},
                        is_mobile=True,
                        has_touch=True,
                    ).new_page()
                    _open(phone, f"{mount}?range=30d&tz=UTC#key={ADMIN_KEY}")
                    phone.screenshot(path=str(out / "dashboard-narrow.png"))
                finally:
                    browser.close()
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    return [out / "dashboard.png", out / "dashboard-narrow.png"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder (default: docs)")
    for path in take(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
