"""The dashboard's upload panels in Chromium: the change against the previous period, spoofed
types, failures, export and live refresh. Each number on the page equals the API's answer and
the test's own aggregate of the raw rows it wrote (for a chosen range, zone, type, provider and
key); every state visited passes axe-core; every new control is used from the keyboard."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import pytest
from dashboard_page import SETTLED, audit, settle
from raw_rows import View, totals

from usage_middleware import UploadRecord, UsageStore

pytestmark = pytest.mark.browser

MARCH = (date(2020, 3, 1), date(2020, 3, 31))
REFRESHES = "document.getElementById('main').dataset.refreshes"


def open_at(page: Any, server: Any, query: str) -> Any:
    return settle(page, lambda: page.goto(f"{server.dashboard}?{query}#key={server.admin_key}"))


def focused(page: Any) -> str:
    name: str = page.evaluate(
        "() => { const e = document.activeElement; return e.id || e.tagName + ':' + e.textContent }"
    )
    return name


def test_each_kpi_shows_its_change_against_the_previous_period(page: Any, server: Any) -> None:
    """Uploads, data, success rate and requests each show the change against the equally long
    range just before (same zone, filters and key), and that range's numbers are the raw rows'."""
    view = View(*MARCH, "America/New_York", ("image/*",), ("s3", "vercel"), (server.keys[0],))
    open_at(page, server, view.query)
    body = server.granular(view.query).json()
    prev, before = body["previous"], view.previous()
    assert (prev["start"], prev["end"]) == ("2020-01-30", "2020-02-29")
    assert (before.start, before.end) == (date(2020, 1, 30), date(2020, 2, 29))
    expected = totals(before.uploads(server.known))
    requests = before.requests(server.known_requests)  # type and provider do not apply
    assert {k: prev[k] for k in expected} == expected and expected["uploads"] > 0
    assert (prev["requests"], prev["errors"]) == (
        len(requests),
        sum(r.status_code >= 400 for r in requests),
    )
    now = totals(view.uploads(server.known))
    assert {k: body["totals"][k] for k in now} == now

    shown = page.eval_on_selector_all(
        ".kpi .change",
        """els => Object.fromEntries(els.map(e => [e.id.replace('-change', '').replace('kpi-', ''),
            [e.dataset.previous, e.dataset.change, e.textContent]]))""",
    )
    for kpi, was, is_ in (
        ("uploads", prev["uploads"], now["uploads"]),
        ("bytes", prev["bytes"], now["bytes"]),
        ("requests", prev["requests"], body["requests"]["total"]),
    ):
        previous, change, text = shown[kpi]
        assert previous == str(was), kpi
        assert float(change) == pytest.approx((is_ - was) / was), kpi
        assert text.startswith(("▲", "▼")) and " from " in text, text
    assert f"from {prev['uploads']:,}" in shown["uploads"][2]
    rate, rate_before = (
        100 * now["successful"] / now["uploads"],
        100 * prev["successful"] / prev["uploads"],
    )
    assert float(shown["success"][0]) == pytest.approx(rate_before, abs=1e-4)
    assert float(shown["success"][1]) == pytest.approx(rate - rate_before, abs=2e-4)
    assert " pts from " in shown["success"][2]
    note = page.locator("#previous-note")
    assert (note.get_attribute("data-start"), note.get_attribute("data-end")) == (
        "2020-01-30",
        "2020-02-29",
    )
    assert "31 days before" in note.text_content()

    # Before the first known row there is nothing to compare with, and the page says so.
    open_at(page, server, "start=2020-02-25&end=2020-03-10&tz=UTC")
    body = server.granular("start=2020-02-25&end=2020-03-10&tz=UTC").json()
    assert (
        body["previous"]["uploads"]
        == 0
        == len(View(date(2020, 2, 10), date(2020, 2, 24)).uploads(server.known))
    )
    assert page.get_attribute("#kpi-uploads-change", "data-change") == ""
    assert page.text_content("#kpi-uploads-change") == "none in the previous period"
    assert page.text_content("#kpi-success-change") == "no uploads in the previous period"


def test_spoofed_types_count_uploads_declared_as_another_type(page: Any, server: Any) -> None:
    """The count and the (declared, detected) pairs equal the API's type_mismatches and the
    raw rows whose declared type differs from the detected one."""
    view = View(*MARCH, "Asia/Kolkata", ("image/*", "application/pdf"), (), (server.keys[0],))
    open_at(page, server, view.query)
    body = server.granular(view.query).json()
    spoofed = [r for r in view.uploads(server.known) if r.declared_type is not None]
    pairs = Counter((r.declared_type, r.file_type) for r in spoofed)
    assert {
        (m["declared_type"], m["file_type"]): m["uploads"] for m in body["type_mismatches"]
    } == (pairs)
    assert len(spoofed) > 1
    assert page.get_attribute("#mismatch-count", "data-value") == str(len(spoofed))
    assert page.text_content("#mismatch-count") == str(len(spoofed))
    table = page.eval_on_selector_all(
        "#mismatch-table tbody tr",
        "rs => rs.map(r => [r.dataset.declared, r.dataset.detected, +r.dataset.uploads])",
    )
    assert table == [
        [m["declared_type"], m["file_type"], m["uploads"]] for m in body["type_mismatches"]
    ]
    share = 100 * len(spoofed) / body["totals"]["uploads"]
    assert f"({share:.1f}".rstrip("0").rstrip(".") in page.text_content("#mismatch-share")

    # A day and provider whose uploads all declared their own type: zero, and a sentence
    # instead of a table.
    days = [View(MARCH[0] + timedelta(days=n), MARCH[0] + timedelta(days=n), providers=("s3",))
            for n in range(31)]  # fmt: skip
    clean = next(
        v for v in days
        if (rows := v.uploads(server.known)) and all(r.declared_type is None for r in rows)
    )  # fmt: skip
    open_at(page, server, clean.query)
    assert page.get_attribute("#mismatch-count", "data-value") == "0"
    assert server.granular(clean.query).json()["type_mismatches"] == []
    assert page.locator("#mismatch-table table").count() == 0
    assert "declared the one its content has" in page.text_content("#mismatch-table")


def shown_failures(page: Any) -> list[list[str]]:
    rows: list[list[str]] = page.eval_on_selector_all(
        "#failures-table tbody tr",
        "rs => rs.map(r => [r.dataset.kind, r.dataset.at, r.dataset.key, r.dataset.reason])",
    )
    return rows


def api_failures(server: Any, query: str) -> list[dict[str, Any]]:
    """Every item of /failures for the query, following the cursor page by page."""
    items: list[dict[str, Any]] = []
    cursor = ""
    while True:
        page = server.get("failures", f"{query}&limit=25{cursor}").json()
        items += page["items"]
        if page["next"] is None:
            return items
        cursor = f"&cursor={page['next']}"


def test_failures_page_through_failed_uploads_and_requests(page: Any, server: Any) -> None:
    """The latest failures, newest first, a page at a time with "Show older failures" (from the
    keyboard): the rows are /failures' items and the raw rows that failed."""
    key = server.keys[0]
    view = View(date(2020, 2, 27), MARCH[1], "Europe/Berlin", keys=(key,))
    open_at(page, server, view.query)
    uploads = [r for r in view.uploads(server.known) if r.upload_status == "failed"]
    requests = [r for r in view.requests(server.known_requests) if r.status_code >= 400]
    expected = sorted(
        [("upload", r.uploaded_at, r.error_message) for r in uploads]
        + [("request", r.requested_at, r.error_message) for r in requests],
        key=lambda f: (f[1], f[0]),
        reverse=True,
    )
    items = api_failures(server, view.query)
    assert [(i["kind"], datetime.fromisoformat(i["at"]), i["error_message"]) for i in items] == (
        expected
    )
    assert len(items) > 25  # more than one page
    as_shown = [[i["kind"], i["at"], i["api_key_id"], i["error_message"] or ""] for i in items]
    assert shown_failures(page) == as_shown[:25]
    assert page.is_visible("#failures-more")
    assert "latest 25" in page.text_content("#failures-count")

    page.focus("#failures-more")
    while page.is_visible("#failures-more"):
        count = len(shown_failures(page))
        with page.expect_response(lambda r: "/failures?" in r.url and "cursor=" in r.url):
            page.keyboard.press("Enter")
        page.wait_for_function(
            f"document.querySelectorAll('#failures-table tbody tr').length > {count}"
        )
    assert shown_failures(page) == as_shown
    assert focused(page) == "failures-table"  # the button left; focus stays in the panel
    assert "(all of them)" in page.text_content("#failures-count")
    audit(page, "failures, every page shown")
    when = page.eval_on_selector("#failures-table tbody tr time", "t => t.textContent")
    local = datetime.fromisoformat(items[0]["at"]).astimezone(ZoneInfo("Europe/Berlin"))
    assert when == f"{local:%b} {local.day}, {local:%Y, %H:%M:%S}"  # in the page's zone

    # A provider filter selects uploads, which requests do not have: the panel says so.
    typed = View(date(2020, 2, 27), MARCH[1], "Europe/Berlin", (), ("s3",), (key,))
    open_at(page, server, typed.query)
    assert "Failed uploads only" in page.text_content("#failures-note")
    failed = [r for r in typed.uploads(server.known) if r.upload_status == "failed"]
    assert {row[0] for row in shown_failures(page)} == {"upload"}
    assert len(shown_failures(page)) == len(failed) == len(api_failures(server, typed.query))


def read_csv(text: str) -> list[list[str]]:
    assert text.endswith("\r\n")  # RFC 4180 line ends
    return list(csv.reader(io.StringIO(text)))


def download(page: Any, action: Any) -> tuple[str, str]:
    with page.expect_download() as saved:
        action()
    return saved.value.suggested_filename, Path(saved.value.path()).read_bytes().decode()


def test_export_saves_the_tables_and_the_raw_rows(page: Any, server: Any) -> None:
    """Each table of the view downloads as CSV equal to the API's answer; the raw rows come from
    /export with the key in a header (never in a URL) and are the rows of the view."""
    key = server.keys[1]
    view = View(*MARCH, "America/New_York", ("image/*",), (), (key,))
    open_at(page, server, view.query)
    body = server.granular(view.query).json()

    name, text = download(
        page, lambda: page.click("#export-tables [data-table='uploads-over-time']")
    )
    assert name == "usage-uploads-over-time-2020-03-01_2020-03-31.csv"
    rows = read_csv(text)
    assert rows[0] == ["period", "uploads", "successful", "failed", "bytes"]
    assert [[r[0], *map(int, r[1:])] for r in rows[1:]] == [
        [p["period"], p["uploads"], p["successful"], p["failed"], p["bytes"]]
        for p in body["series"]
    ]
    assert sum(int(r[1]) for r in rows[1:]) == len(view.uploads(server.known))

    page.focus("#export-tables [data-table='file-types']")  # from the keyboard
    name, text = download(page, lambda: page.keyboard.press("Enter"))
    rows = read_csv(text)
    assert rows[0] == ["file_type", "uploads", "bytes", "percentage"]
    assert [[r[0], int(r[1]), int(r[2]), float(r[3])] for r in rows[1:]] == [
        [t["file_type"], t["uploads"], t["bytes"], t["percentage"]] for t in body["file_types"]
    ]
    _, text = download(page, lambda: page.click("#export-tables [data-table='spoofed-types']"))
    assert read_csv(text)[1:] == [
        [m["declared_type"], m["file_type"], str(m["uploads"])] for m in body["type_mismatches"]
    ]
    audit(page, "after table exports")

    # Raw uploads: every row of the view, asked for with the key in the x-api-key header.
    button = "#export [data-dataset='uploads'][data-format='csv']"
    with page.expect_request(lambda r: "/export?" in r.url) as asked:
        name, text = download(page, lambda: page.click(button))
    request = asked.value
    assert request.headers["x-api-key"] == server.admin_key
    assert server.admin_key not in request.url and server.admin_key not in page.url
    assert parse_qs(urlsplit(request.url).query) == {
        "start": ["2020-03-01"], "end": ["2020-03-31"], "tz": ["America/New_York"],
        "file_type": ["image/*"], "api_key_id": [key], "dataset": ["uploads"], "format": ["csv"],
    }  # fmt: skip
    assert name == "usage-uploads-2020-03-01_2020-03-31.csv"
    rows = read_csv(text)
    ids = {r[rows[0].index("id")] for r in rows[1:]}
    assert ids == {str(r.id) for r in view.uploads(server.known)}
    assert name in page.text_content("#export-status")

    # Raw requests as NDJSON: requests have no type, so that filter is not sent.
    page.focus("#export [data-dataset='requests'][data-format='ndjson']")
    with page.expect_request(lambda r: "/export?" in r.url) as asked:
        name, text = download(page, lambda: page.keyboard.press("Enter"))
    assert "file_type" not in parse_qs(urlsplit(asked.value.url).query)
    lines = [json.loads(line) for line in text.splitlines()]
    assert {line["id"] for line in lines} == {
        str(r.id) for r in view.requests(server.known_requests)
    }
    assert "requests have neither" in page.text_content("#export-note")
    audit(page, "after raw exports")


def kpi(page: Any, name: str) -> int:
    return int(page.get_attribute(f"#kpi-{name}", "data-value"))


def set_hidden(page: Any, hidden: bool) -> None:
    """What the browser does when the tab goes to the background (or comes back)."""
    page.evaluate(
        """hidden => {
        const values = [['hidden', hidden], ['visibilityState', hidden ? 'hidden' : 'visible']];
        for (const [name, value] of values)
          Object.defineProperty(document, name, {configurable: true, get: () => value});
        document.dispatchEvent(new Event('visibilitychange'));
    }""",
        hidden,
    )


def test_live_refresh_updates_numbers_in_place(page: Any, server: Any) -> None:
    """A range including today refreshes every 30 s without a loading state or new nodes, stops
    while the tab is hidden, catches up when it is shown, and the toggle (keyboard) turns it off;
    a range that ended before today has no toggle."""
    page.clock.install()
    query = "range=today&tz=UTC"
    open_at(page, server, query)
    assert page.is_visible("#live-box") and page.is_checked("#live")
    assert "every 30 s · updated " in page.text_content("#live-status")
    before = kpi(page, "uploads")
    page.evaluate(
        """() => {
        const main = document.getElementById('main'), content = document.getElementById('content');
        window.seen = { kpi: document.getElementById('kpi-uploads'), states: [] };
        new MutationObserver(() => window.seen.states.push(
            main.dataset.state + ' ' + main.getAttribute('aria-busy') + ' ' + content.hidden))
          .observe(document.getElementById('main'), {attributes: true, subtree: true,
                   attributeFilter: ['data-state', 'aria-busy', 'hidden']});
    }"""
    )
    store = UsageStore(server.url)
    try:
        now = datetime.now(timezone.utc)
        store.write([UploadRecord(provider="s3", file_type="image/png", uploaded_at=now)])
    finally:
        store.dispose()

    with page.expect_response(lambda r: "/granular?" in r.url):
        page.clock.fast_forward(31_000)
    page.wait_for_function(f"{REFRESHES} === '1' && {SETTLED}")
    assert kpi(page, "uploads") == before + 1 == server.granular(query).json()["totals"]["uploads"]
    assert page.evaluate("document.getElementById('kpi-uploads') === window.seen.kpi")
    states = page.evaluate("window.seen.states")
    assert not [s for s in states if "loading" in s or "true" in s], states  # no flicker
    audit(page, "after a live refresh")

    calls: list[str] = []
    page.on("request", lambda r: calls.append(r.url) if "/api/usage/" in r.url else None)
    set_hidden(page, True)
    assert page.text_content("#live-status") == "Paused while this tab is hidden"
    page.clock.fast_forward(120_000)
    page.wait_for_timeout(300)
    assert calls == []
    with page.expect_response(lambda r: "/granular?" in r.url):
        set_hidden(page, False)  # overdue: refreshes at once
    page.wait_for_function(f"{REFRESHES} === '2' && {SETTLED}")

    page.focus("#live")
    page.keyboard.press("Space")
    assert not page.is_checked("#live") and page.text_content("#live-status") == "Off"
    calls.clear()
    page.clock.fast_forward(120_000)
    page.wait_for_timeout(300)
    assert calls == []

    open_at(page, server, "start=2020-03-01&end=2020-03-31&tz=UTC")
    assert not page.is_visible("#live-box")
