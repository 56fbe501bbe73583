"""The dashboard in Chromium against the example app storing to ClickHouse (chdb).

The data is written into a chdb directory by a separate process (chdb runs one embedded server
per process: the test process never opens it), then the example app runs on it in a uvicorn
subprocess. The page's numbers must equal ``/granular`` and the raw rows aggregated here, in a
zone whose offset is on :45.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

pytestmark = pytest.mark.browser
pytest.importorskip("chdb")

UTC = timezone.utc
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ADMIN_KEY = "browser-test-admin-key"  # what conftest._wait_ready sends
KEY = "00000000-0000-4000-8000-0000000000c1"
ZONE = "Asia/Kathmandu"
STATE = "document.getElementById('main').dataset.state"


def records() -> list[Any]:
    """Uploads over 2021-05-28 .. 2021-06-08 (UTC), every fifth failed, around local midnight."""
    from usage_middleware import UploadRecord

    start = datetime(2021, 5, 28, 17, 50, tzinfo=UTC)  # 23:35 in Kathmandu
    return [
        UploadRecord(
            api_key_id=KEY,
            provider=("s3", "vercel")[i % 2],
            file_type=("image/png", "application/pdf", "image/jpeg")[i % 3],
            file_size=500 + 37 * i,
            upload_status="failed" if i % 5 == 0 else "success",
            uploaded_at=start + timedelta(minutes=53 * i),
        )
        for i in range(300)
    ]


def seed(url: str) -> None:
    """Run in a child process: write the records, seal what is due, close."""
    from usage_middleware import UsageStore

    store = UsageStore(url)
    store.write(records())
    store.dispose()


@pytest.fixture(scope="module")
def ch_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The example app on a chdb store, in a uvicorn subprocess; yields the dashboard URL."""
    from conftest import _free_port, _stop, _wait_ready, require_chromium

    require_chromium()
    tmp = tmp_path_factory.mktemp("chdb-example")
    url = f"chdb:///{tmp / 'ch'}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(HERE)])}
    subprocess.run(
        [sys.executable, "-c", f"from test_clickhouse_dashboard import seed; seed({url!r})"],
        env=env, cwd=tmp, check=True, timeout=120,
    )  # fmt: skip
    env.update({
        "DATABASE_URL": url, "STORAGE_DIR": str(tmp / "files"), "USAGE_ADMIN_KEY": ADMIN_KEY,
        "USAGE_MIDDLEWARE_SPOOL_DIR": str(tmp / "spool"),
    })  # fmt: skip
    port = _free_port()
    argv = [sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT / "examples" / "fastapi_app")]
    argv += ["--factory", "app:create_app", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen([*argv, "--log-level", "warning"], env=env, cwd=tmp)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(f"{base}/api/usage/health", proc)
        yield f"{base}/api/usage/"
    finally:
        _stop(proc)


def test_the_dashboard_shows_clickhouse_answers_in_a_45_minute_zone(
    page: Any, ch_server: str
) -> None:
    """Daily series over twelve days in Kathmandu: page == /granular == raw rows by local day."""
    query = f"start=2021-05-28&end=2021-06-08&tz={ZONE}"
    with page.expect_response(lambda r: "/granular?" in r.url):
        page.goto(f"{ch_server}?{query}#key={ADMIN_KEY}")
    page.wait_for_function(f"{STATE} === 'ready'")
    body = httpx.get(
        f"{ch_server}granular?{query}", headers={"x-api-key": ADMIN_KEY}, timeout=30
    ).json()

    tz = ZoneInfo(ZONE)
    want: dict[str, list[int]] = {}
    d = date(2021, 5, 28)
    while d <= date(2021, 6, 8):
        want[d.isoformat()] = [0, 0]
        d += timedelta(days=1)
    for r in records():
        day = r.uploaded_at.astimezone(tz).date().isoformat()
        if day in want:
            want[day][0] += 1
            want[day][1] += r.file_size
    assert [[p["period"], p["uploads"], p["bytes"]] for p in body["series"]] == [
        [k, *v] for k, v in want.items()
    ]
    shown = page.eval_on_selector_all(
        "#uploads-chart g.col",
        "els => els.map(e => [e.dataset.period, +e.dataset.uploads, +e.dataset.bytes])",
    )
    assert shown == [[k, *v] for k, v in want.items()]
    total = page.eval_on_selector("#kpi-uploads", "e => e.dataset.value")
    assert total == str(sum(v[0] for v in want.values())) == str(body["totals"]["uploads"])
