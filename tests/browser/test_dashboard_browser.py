"""The dashboard page in Chromium against the example app: filters, numbers, states, URL."""

from __future__ import annotations

from datetime import date
from typing import Any
from urllib.parse import parse_qs

import pytest
from dashboard_page import (
    STATE,
    assert_page_matches,
    granular_calls,
    page_query,
    settle,
)

pytestmark = pytest.mark.browser


def test_range_type_and_provider_filters_show_what_granular_returns(page: Any, server: Any) -> None:
    """Dates, time zone, a file type family and a provider: one call each, the same numbers."""
    calls = granular_calls(page)
    settle(page, lambda: page.goto(f"{server.dashboard}#key={server.admin_key}"))
    assert page.eval_on_selector("#tz", "e => e.value") == "America/New_York"
    query = parse_qs(page_query(page))
    assert query == {"range": ["30d"], "tz": ["America/New_York"]}  # the key left the URL
    assert len(calls) == 1

    answer = settle(page, lambda: page.select_option("#preset", "7d"))
    assert parse_qs(page_query(page))["range"] == ["7d"]
    assert page.input_value("#start") == answer.json()["range"]["start"]
    assert len(calls) == 2

    settle(page, lambda: page.fill("#start", "2020-03-01"))  # end still today: too long
    assert page.evaluate(STATE) == "error"
    settle(page, lambda: page.fill("#end", "2020-03-31"))
    settle(page, lambda: page.select_option("#tz", "UTC"))
    page.click("#types-filter summary")
    settle(page, lambda: page.check("#types-filter input[value='image/*']"))
    page.click("#providers-filter summary")
    settle(page, lambda: page.check("#providers-filter input[value='s3']"))
    assert len(calls) == 7

    query = parse_qs(page_query(page))
    assert query == {
        "start": ["2020-03-01"],
        "end": ["2020-03-31"],
        "tz": ["UTC"],
        "file_type": ["image/*"],
        "provider": ["s3"],
    }
    response = server.granular(page_query(page))
    assert response.status_code == 200
    body = response.json()
    assert page.evaluate(STATE) == "ready"
    assert_page_matches(page, body)

    # ... and those numbers are the raw rows' aggregate.
    rows = [
        r
        for r in server.known
        if date(2020, 3, 1) <= r.uploaded_at.date() <= date(2020, 3, 31)
        and r.file_type.startswith("image/")
        and r.provider == "s3"
    ]
    assert body["totals"]["uploads"] == len(rows) > 0
    assert body["totals"]["bytes"] == sum(r.file_size for r in rows)
    assert len(body["series"]) == 31
    assert {r["provider"] for r in body["providers"]} == {"s3"}

    # The URL is the view: opening it again restores every filter and the same numbers.
    settle(page, lambda: page.goto(page.url))
    assert page.is_checked("#types-filter input[value='image/*']")
    assert page.is_checked("#providers-filter input[value='s3']")
    assert page.eval_on_selector("#preset", "e => e.value") == "custom"
    assert_page_matches(page, body)

    page.screenshot(path=str(server.artifacts / "dashboard-filtered.png"), full_page=True)


def test_back_button_restores_the_previous_view(page: Any, server: Any) -> None:
    """Each change is a history entry; going back shows the earlier filters and refetches."""
    settle(
        page,
        lambda: page.goto(
            f"{server.dashboard}?start=2020-03-01&end=2020-03-31&tz=UTC#key={server.admin_key}"
        ),
    )
    page.click("#providers-filter summary")
    settle(page, lambda: page.check("#providers-filter input[value='vercel']"))
    assert parse_qs(page_query(page))["provider"] == ["vercel"]
    settle(page, lambda: page.go_back())
    assert "provider" not in parse_qs(page_query(page))
    assert not page.is_checked("#providers-filter input[value='vercel']")
    assert_page_matches(page, server.granular(page_query(page)).json())


def test_empty_range_shows_the_empty_state(page: Any, server: Any) -> None:
    """A range without uploads says so instead of drawing empty charts."""
    settle(
        page,
        lambda: page.goto(
            f"{server.dashboard}?start=2019-01-01&end=2019-01-31&tz=UTC#key={server.admin_key}"
        ),
    )
    assert page.evaluate(STATE) == "empty"
    assert page.is_visible("#empty")
    assert not page.is_visible("#charts")
    assert page.text_content("#kpi-uploads") == "0"
    assert server.granular(page_query(page)).json()["totals"]["uploads"] == 0


def test_bad_request_shows_the_api_message(page: Any, server: Any) -> None:
    """A 400 from the API is shown as its message, with the offending control marked."""
    query = "start=2020-03-10&end=2020-03-01&tz=UTC"
    settle(page, lambda: page.goto(f"{server.dashboard}?{query}#key={server.admin_key}"))
    response = server.granular(query)
    assert response.status_code == 400
    error = response.json()["error"]
    assert page.evaluate(STATE) == "error"
    assert page.text_content("#error-message") == error["message"]
    assert page.get_attribute("#error", "role") == "alert"
    assert page.get_attribute(f"#{error['parameter']}", "aria-invalid") == "true"
    assert not page.is_visible("#content")


def test_without_a_key_the_page_asks_for_one(page: Any, server: Any) -> None:
    """A 401 shows a key form; a valid key then loads the data, and a customer sees only theirs."""
    settle(page, lambda: page.goto(f"{server.dashboard}?range=12m&tz=UTC"))
    assert page.evaluate(STATE) == "error"
    assert page.is_visible("#key-form")
    page.fill("#key-input", "demo-key-acme")
    answer = settle(page, lambda: page.click("#key-form button[type=submit]"))
    assert answer.request.headers["x-api-key"] == "demo-key-acme"
    assert page.evaluate(STATE) == "ready"
    mine = server.granular(page_query(page), key="demo-key-acme").json()
    everyone = server.granular(page_query(page)).json()
    assert 0 < mine["totals"]["uploads"] < everyone["totals"]["uploads"]
    assert_page_matches(page, mine)


def test_screenshot_of_a_year_of_demo_data(page: Any, server: Any) -> None:
    """The last 12 months of demo data render as a full dashboard; saved as a test artifact."""
    settle(page, lambda: page.goto(f"{server.dashboard}?range=12m&tz=UTC#key={server.admin_key}"))
    assert page.evaluate(STATE) == "ready"
    body = server.granular(page_query(page)).json()
    assert body["range"]["granularity"] in ("week", "month")
    assert_page_matches(page, body)
    shot = server.artifacts / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    for name in ("dashboard.png", "dashboard-narrow.png"):  # scripts/screenshots.py makes them
        assert (server.root / "docs" / name).exists(), f"docs/{name} (README screenshot) is missing"


def test_narrow_screen_keeps_everything_reachable(browser: Any, server: Any) -> None:
    """On a phone-sized viewport the page does not scroll sideways and the filters stack."""
    context = browser.new_context(locale="en-US", viewport={"width": 390, "height": 844})
    try:
        page = context.new_page()
        settle(page, lambda: page.goto(f"{server.dashboard}?range=90d#key={server.admin_key}"))
        assert page.evaluate(STATE) == "ready"
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.screenshot(path=str(server.artifacts / "dashboard-narrow.png"), full_page=True)
    finally:
        context.close()
