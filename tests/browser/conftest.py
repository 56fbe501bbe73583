"""Browser fixtures: Debian's Chromium through Playwright, and the example app on loopback.

The app runs in a uvicorn subprocess on a free 127.0.0.1 port against a temporary SQLite file
holding known uploads (around March 2020, see ``KNOWN``) and a year of demo data ending today.
Chromium is ``/usr/bin/chromium`` (``.ci/run`` installs it with apt; Playwright never downloads
one).
Without it the tests skip locally and fail under ``CI=true``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from dashboard_page import axe_script

from usage_middleware import RequestRecord, UploadRecord, UsageStore
from usage_middleware._demo import write_demo_data

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = ROOT / "examples" / "fastapi_app"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN_KEY = "browser-test-admin-key"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
UTC = timezone.utc

KEY_1 = "00000000-0000-4000-8000-0000000000b1"
KEY_2 = "00000000-0000-4000-8000-0000000000b2"
PROVIDERS = ("vercel", "s3", "cloudinary")
# Twelve types, so a breakdown has more rows than a ten-colour palette, and a long one.
TYPES = (
    "image/png",
    "image/jpeg",
    "application/pdf",
    "video/mp4",
    "image/webp",
    "text/csv",
    "image/gif",
    "application/zip",
    "audio/mpeg",
    "image/heic",
    "application/x-ndjson",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
)


def declared(i: int, file_type: str) -> str | None:
    """What the client claimed for upload ``i``: now and then a type other than the content's."""
    if i % 11 == 0:
        return "image/png" if file_type != "image/png" else "application/pdf"
    if i % 29 == 0:
        return "text/plain"
    return None


def known_uploads() -> list[UploadRecord]:
    """Uploads spread over 2020-02-25 .. 2020-04-05 (UTC), every provider and type, some failed,
    some declared as another type than their content."""
    out = []
    start = datetime(2020, 2, 25, tzinfo=UTC)
    for i in range(420):
        file_type = TYPES[(i // 3) % len(TYPES)]
        out.append(
            UploadRecord(
                api_key_id=KEY_1 if i % 3 else KEY_2,
                provider=PROVIDERS[i % 3],
                file_type=file_type,
                declared_type=declared(i, file_type),
                file_size=1_000 + 7_919 * i,
                upload_status="failed" if i % 13 == 0 else "success",
                error_message="too large" if i % 13 == 0 else None,
                uploaded_at=start + timedelta(hours=i * 2.3),
            )
        )
    return out


KNOWN = known_uploads()
ROUTES = (
    ("POST", "/api/upload"),
    ("GET", "/api/files/{file_id}"),
    ("PUT", "/files/{name}"),
    ("DELETE", "/api/files/{file_id}"),
)


def known_requests() -> list[RequestRecord]:
    """Requests over 2020-02-27 .. 2020-04-02 (UTC): four endpoints, both keys and none, some
    answered 404 or 500 (a few of those with an exception's message)."""
    out = []
    for i in range(200):
        method, route = ROUTES[i % 4]
        status = (
            500 if i % 10 == 0 else 404 if i % 7 == 0 else 201 if method in ("POST", "PUT") else 200
        )
        out.append(
            RequestRecord(
                api_key_id=None if i % 17 == 0 else KEY_1 if i % 3 else KEY_2,
                method=method,
                path=route,
                status_code=status,
                response_time_ms=5.0 + (i * 37) % 400,
                request_size=100 * (i % 9),
                response_size=50 + i,
                error_message="storage offline" if status == 500 and i % 20 == 0 else None,
                requested_at=datetime(2020, 2, 27, 3, tzinfo=UTC) + timedelta(hours=i * 4.3),
            )
        )
    return out


KNOWN_REQUESTS = known_requests()


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} is missing (apt-get install chromium)"
        if IN_CI:
            pytest.fail(f"{message}; CI=true: the browser tests are required")
        pytest.skip(message)


@dataclass
class Server:
    """The running example app and what the tests need to know about it."""

    base: str  # e.g. http://127.0.0.1:PORT
    dashboard: str  # the usage mount, with a trailing slash
    url: str  # the app's database
    admin_key: str = ADMIN_KEY
    known: tuple[UploadRecord, ...] = tuple(KNOWN)
    known_requests: tuple[RequestRecord, ...] = tuple(KNOWN_REQUESTS)
    keys: tuple[str, str] = (KEY_1, KEY_2)  # the known rows' API key ids
    artifacts: Path = ARTIFACTS
    root: Path = ROOT

    def get(self, endpoint: str, query: str, key: str = ADMIN_KEY) -> httpx.Response:
        """What an endpoint of the mount answers for a query string, asked directly (not by
        the page)."""
        return httpx.get(
            f"{self.dashboard}{endpoint}?{query}", headers={"x-api-key": key}, timeout=30
        )

    def granular(self, query: str, key: str = ADMIN_KEY) -> httpx.Response:
        return self.get("granular", query, key)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the example app exited with {proc.returncode}")
        try:
            if httpx.get(url, headers={"x-api-key": ADMIN_KEY}, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the example app did not answer {url} within {timeout} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The example app in a uvicorn subprocess over a database of known and demo data."""
    tmp = tmp_path_factory.mktemp("example")
    url = f"sqlite:///{tmp / 'usage.db'}"
    store = UsageStore(url)
    store.write([*KNOWN, *KNOWN_REQUESTS])
    write_demo_data(store, days=365, keys=3, seed=0)
    store.dispose()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "STORAGE_DIR": str(tmp / "files"),
        "USAGE_ADMIN_KEY": ADMIN_KEY,
        "USAGE_MIDDLEWARE_SPOOL_DIR": str(tmp / "spool"),
    }
    proc: subprocess.Popen[bytes] | None = None
    for _attempt in range(3):  # a free port can be taken between probe and bind
        port = _free_port()
        argv = [sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLE_DIR), "--factory"]
        argv += ["app:create_app", "--host", "127.0.0.1", "--port", str(port)]
        proc = subprocess.Popen([*argv, "--log-level", "warning"], env=env, cwd=tmp)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(f"{base}/api/usage/health", proc)
            break
        except RuntimeError:
            _stop(proc)
            proc = None
    if proc is None:
        pytest.fail("could not start the example app")
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        yield Server(base=base, dashboard=f"{base}/api/usage/", url=url)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright (no downloaded browser)."""
    require_chromium()
    axe_script()  # axe-core audits every state the tests visit
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh tab (own storage) in New York time, English number formats, desktop size."""
    context = browser.new_context(
        locale="en-US", timezone_id="America/New_York", viewport={"width": 1280, "height": 900}
    )
    context.set_default_timeout(20_000)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield tab
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
