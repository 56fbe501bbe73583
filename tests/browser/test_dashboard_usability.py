"""The dashboard as a new user meets it: filter controls that say what they filter, dates typed
by hand, zone names, error states, a phone-sized screen, colours, partial periods, keyboard."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from dashboard_page import STATE, audit, granular_calls, settle

pytestmark = pytest.mark.browser

MARCH = "start=2020-03-01&end=2020-03-31&tz=UTC"
LONG_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


def open_at(page: Any, server: Any, query: str) -> Any:
    return settle(page, lambda: page.goto(f"{server.dashboard}?{query}#key={server.admin_key}"))


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


@pytest.fixture
def narrow(browser: Any) -> Iterator[Any]:
    """A phone-sized tab (390 x 844) in UTC."""
    context = browser.new_context(
        locale="en-US", timezone_id="UTC", viewport={"width": 390, "height": 844}
    )
    context.set_default_timeout(20_000)
    try:
        yield context.new_page()
    finally:
        context.close()


def test_ticking_a_box_shows_in_the_control_at_once(page: Any, server: Any) -> None:
    """The multi-select's summary names what is ticked as soon as it is ticked."""
    open_at(page, server, MARCH)
    page.click("#types-filter summary")
    settle(page, lambda: page.check("#types-filter input[value='image/png']"))
    assert page.text_content("#types-summary") == "image/png"
    page.click("#providers-filter summary")
    settle(page, lambda: page.check("#providers-filter input[value='s3']"))
    assert page.text_content("#providers-summary") == "s3"
    settle(page, lambda: page.check("#providers-filter input[value='vercel']"))
    assert page.text_content("#providers-summary") == "s3, vercel"
    assert query_of(page.url)["provider"] == ["s3", "vercel"]


def test_clear_unticks_the_boxes(page: Any, server: Any) -> None:
    """After "Clear" nothing is ticked, and the next tick filters by that value alone."""
    open_at(page, server, MARCH + "&provider=s3")
    page.click("#providers-filter summary")
    assert page.is_checked("#providers-filter input[value='s3']")
    settle(page, lambda: page.click("#providers-filter .clear"))
    assert "provider" not in query_of(page.url)
    assert page.eval_on_selector_all("#providers-filter input:checked", "els => els.length") == 0
    assert page.text_content("#providers-summary") == "All providers"
    answer = settle(page, lambda: page.check("#providers-filter input[value='vercel']"))
    assert query_of(answer.url)["provider"] == ["vercel"]
    assert page.text_content("#providers-summary") == "vercel"


def test_a_typed_date_is_one_request_and_one_history_entry(page: Any, server: Any) -> None:
    """Typing 03/05/2020 passes through years 0002, 0020 and 0202; none of them is requested,
    and Back returns to the range before the edit, not to a half-typed one."""
    open_at(page, server, MARCH)
    calls = granular_calls(page)
    entries = page.evaluate("history.length")
    page.focus("#start")  # the month segment

    def type_and_leave() -> None:
        page.keyboard.type("03052020")
        page.keyboard.press("Tab")  # leaving the field applies it

    settle(page, type_and_leave)
    page.wait_for_timeout(1_500)  # longer than the typing pause: nothing else is pending
    assert [query_of(c)["start"] for c in calls] == [["2020-03-05"]]
    assert page.evaluate(STATE) == "ready"
    assert page.evaluate("history.length") == entries + 1

    page.focus("#end")  # a pause in typing applies it too, without leaving the field
    settle(page, lambda: page.keyboard.type("03202020"))
    page.wait_for_timeout(1_500)
    assert [query_of(c)["end"][0] for c in calls] == ["2020-03-31", "2020-03-20"]
    assert page.evaluate("history.length") == entries + 2

    settle(page, lambda: page.go_back())
    assert query_of(page.url)["start"] == ["2020-03-05"]
    assert query_of(page.url)["end"] == ["2020-03-31"]
    settle(page, lambda: page.go_back())
    assert query_of(page.url)["start"] == ["2020-03-01"]
    assert page.input_value("#start") == "2020-03-01"


def test_zone_list_offers_canonical_names(browser: Any, server: Any) -> None:
    """A browser in Asia/Calcutta (Chromium's name) gets Asia/Kolkata selected; the list has the
    canonical names only; an alias in a shared URL still opens; a filter change is one call."""
    context = browser.new_context(locale="en-US", timezone_id="Asia/Calcutta")
    context.set_default_timeout(20_000)
    try:
        page = context.new_page()
        assert page.evaluate("Intl.DateTimeFormat().resolvedOptions().timeZone") == "Asia/Calcutta"
        requests: list[str] = []
        page.on("request", lambda r: requests.append(urlsplit(r.url).path))
        answer = settle(page, lambda: page.goto(f"{server.dashboard}#key={server.admin_key}"))
        assert query_of(answer.url)["tz"] == ["Asia/Kolkata"]
        assert page.input_value("#tz") == "Asia/Kolkata"
        assert query_of(page.url)["tz"] == ["Asia/Kolkata"]
        zones = page.eval_on_selector_all("#tz option", "os => os.map(o => o.value)")
        assert {"Asia/Kolkata", "Europe/Kyiv", "Asia/Ho_Chi_Minh", "UTC"} <= set(zones)
        assert not {"Asia/Calcutta", "Europe/Kiev", "Asia/Saigon", "US/Eastern"} & set(zones)
        assert page.text_content("#tz option:checked") == "Asia/Kolkata (local)"
        # no request for the zone list: the page carries it
        assert not [p for p in requests if p.endswith("/time-zones")]

        requests.clear()
        page.click("#providers-filter summary")
        settle(page, lambda: page.check("#providers-filter input[value='s3']"))
        page.wait_for_timeout(300)
        # one call per answer: the main one, and each panel whose own query changed
        assert sorted(p.rsplit("/", 1)[1] for p in requests) == [
            "consumers", "failures", "granular", "requests",
        ]  # fmt: skip

        # An alias in a link still works: the canonical zone is selected and asked for.
        answer = settle(
            page, lambda: page.goto(f"{server.dashboard}?{MARCH.replace('UTC', 'Europe/Kiev')}")
        )
        assert query_of(answer.url)["tz"] == ["Europe/Kyiv"]
        assert page.input_value("#tz") == "Europe/Kyiv"
        assert page.evaluate(STATE) == "ready"
        # A valid zone outside the list (Etc/GMT+5) is added to it rather than dropped.
        answer = settle(page, lambda: page.goto(f"{server.dashboard}?range=7d&tz=Etc/GMT%2B5"))
        assert query_of(answer.url)["tz"] == ["Etc/GMT+5"]
        assert page.input_value("#tz") == "Etc/GMT+5"
    finally:
        context.close()


def test_an_error_describes_the_request_and_offers_retry_only_when_it_can_help(
    page: Any, server: Any
) -> None:
    """After a 400 the header names what was asked (not the last view that loaded) and there
    is no "Try again"; after a network failure there is, and it works."""
    open_at(page, server, "range=12m&granularity=month&tz=UTC")
    assert "monthly" in page.text_content("#range-label")
    settle(page, lambda: page.select_option("#granularity", "hour"))  # > 31 days of hours
    assert page.evaluate(STATE) == "error"
    label = page.text_content("#range-label")
    assert "hourly" in label and "monthly" not in label
    assert "Last 12 months" in label
    assert not page.is_visible("#retry")

    open_at(page, server, MARCH)
    assert "Mar 31, 2020" in page.text_content("#range-label")
    page.focus("#end")

    def fill_and_confirm() -> None:
        page.fill("#end", "2020-02-01")  # before the first day
        page.keyboard.press("Enter")

    settle(page, fill_and_confirm)
    assert page.evaluate(STATE) == "error"
    assert page.get_attribute("#end", "aria-invalid") == "true" or page.get_attribute(
        "#start", "aria-invalid"
    )
    label = page.text_content("#range-label")
    assert "Feb 1, 2020" in label and "Mar 31, 2020" not in label
    assert not page.is_visible("#retry")

    page.route("**/granular?*", lambda route: route.abort())
    page.goto(f"{server.dashboard}?{MARCH}")
    page.wait_for_function(f"{STATE} === 'error'")
    assert page.is_visible("#retry")
    audit(page)
    page.unroute("**/granular?*")
    settle(page, lambda: page.click("#retry"))
    assert page.evaluate(STATE) == "ready"


def control_overflow(page: Any) -> list[str]:
    """Controls of the filter form that stick out of its padding box (by more than 0.5 px)."""
    result: list[str] = page.evaluate(
        """() => {
        const form = document.getElementById('filters'), s = getComputedStyle(form);
        const r = form.getBoundingClientRect();
        const left = r.left + parseFloat(s.borderLeftWidth) + parseFloat(s.paddingLeft);
        const right = r.right - parseFloat(s.borderRightWidth) - parseFloat(s.paddingRight);
        return [...form.querySelectorAll('.field, select, input, summary, button')]
          .filter(e => e.getClientRects().length && !e.closest('.menu'))
          .map(e => [e.id || e.className || e.tagName, e.getBoundingClientRect()])
          .filter(([, b]) => b.left < left - 0.5 || b.right > right + 0.5)
          .map(([name, b]) => `${name}: ${b.left.toFixed(1)}..${b.right.toFixed(1)}`
            + ` outside ${left.toFixed(1)}..${right.toFixed(1)}`);
        }"""
    )
    return result


def test_narrow_screen_shows_the_totals_first_and_filters_fit(narrow: Any, server: Any) -> None:
    """At 390 px the filters fold behind one button, the four totals are on the first screen,
    and unfolded every control fits inside the filter card."""
    page = narrow
    open_at(page, server, "range=90d&tz=UTC&provider=s3")
    assert not page.is_visible("#filters")
    assert page.is_visible("#filters-toggle")
    assert "Last 90 days" in page.text_content("#filters-summary")
    assert "1 filter" in page.text_content("#filters-summary")
    for kpi in ("#kpi-uploads", "#kpi-bytes", "#kpi-success", "#kpi-requests"):
        box = page.locator(kpi).bounding_box()
        assert box is not None and box["y"] + box["height"] <= 844, kpi
    page.focus("#filters-toggle")
    page.keyboard.press("Enter")
    assert page.get_attribute("#filters-toggle", "aria-expanded") == "true"
    assert page.is_visible("#filters")
    assert control_overflow(page) == []
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    audit(page, "narrow, filters open")
    page.click("#types-filter summary")
    assert control_overflow(page) == []
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    audit(page, "narrow, types menu open")

    # A 400 unfolds the filters, so the control it marks can be seen.
    open_at(page, server, "start=2020-03-10&end=2020-03-01&tz=UTC")
    assert page.evaluate(STATE) == "error"
    assert page.is_visible("#start[aria-invalid='true'], #end[aria-invalid='true']")


def share_colours(page: Any, chart: str) -> dict[str, str]:
    colours: dict[str, str] = page.eval_on_selector_all(
        f"#{chart} .share-row",
        """rows => Object.fromEntries(rows.map(r => {
            const bar = r.querySelector('.bar i') || r.querySelectorAll('rect')[1];  // HTML or SVG
            const style = getComputedStyle(bar);
            return [r.dataset.key, bar instanceof SVGElement ? style.fill : style.backgroundColor];
        }))""",
    )
    return colours


def test_each_value_keeps_its_colour(page: Any, server: Any) -> None:
    """A type or provider has the same colour whatever its rank, and twelve types get twelve
    colours (a ten-colour cycle gave the eleventh the first one's)."""
    open_at(page, server, MARCH)
    types = share_colours(page, "types-chart")
    providers = share_colours(page, "providers-chart")
    assert len(types) == 12
    assert len(set(types.values())) == 12
    assert len(set(providers.values())) == 3
    ranked = list(types)
    for value in (ranked[-1], ranked[5], LONG_TYPE):  # shown alone, it ranks first
        open_at(page, server, f"{MARCH}&file_type={value.replace('+', '%2B')}")
        assert share_colours(page, "types-chart") == {value: types[value]}
    last_provider = list(providers)[-1]
    open_at(page, server, f"{MARCH}&provider={last_provider}")
    assert share_colours(page, "providers-chart") == {last_provider: providers[last_provider]}


def test_long_mime_types_are_readable(page: Any, narrow: Any, server: Any) -> None:
    """A long MIME type is shown whole (wrapped), not cut, on a desktop and on a phone."""
    for tab in (page, narrow):
        open_at(tab, server, MARCH)
        row = tab.locator(f"#types-chart .share-row[data-key='{LONG_TYPE}']")
        assert row.locator(".label").text_content() == LONG_TYPE
        assert LONG_TYPE in (row.get_attribute("title") or "")
        clipped = row.locator(".label").evaluate(
            "e => e.scrollWidth > e.clientWidth + 1 || e.scrollHeight > e.clientHeight + 1"
        )
        assert not clipped
        label = row.locator(".label").bounding_box()
        card = tab.locator("#types-chart").bounding_box()
        assert label is not None and card is not None
        assert label["x"] + label["width"] <= card["x"] + card["width"]
        assert tab.evaluate("document.documentElement.scrollWidth") <= tab.viewport_size["width"]


def marks(page: Any) -> list[tuple[str, str, int]]:
    """(period, mark, bar rects) per column of the uploads chart."""
    found: list[tuple[str, str, int]] = page.eval_on_selector_all(
        "#uploads-chart g.col",
        """cs => cs.map(c => [c.dataset.period, c.dataset.mark,
            c.querySelectorAll('rect.bar').length])""",
    )
    return found


def test_partial_and_future_periods_are_marked(page: Any, server: Any) -> None:
    """A 1-day first month, a 5-day last month and hours still to come are hatched and named in
    a note, so their low bars or zeros are not read as real ones."""
    open_at(page, server, "start=2020-02-29&end=2020-04-05&granularity=month&tz=UTC")
    assert [(p, m) for p, m, _ in marks(page)] == [
        ("2020-02-29", "partial"),
        ("2020-03-01", ""),
        ("2020-04-01", "partial"),
    ]
    assert page.is_visible("#uploads-note") and "partial period" in page.text_content(
        "#uploads-note"
    )
    assert page.locator("#uploads-table th", has_text="(partial period)").count() == 2

    open_at(page, server, "start=2020-03-02&end=2020-03-29&granularity=week&tz=UTC")  # Mon..Sun
    assert {m for _, m, _ in marks(page)} == {""}
    assert not page.is_visible("#uploads-note")

    before = datetime.now(timezone.utc)
    open_at(page, server, "range=today&granularity=hour&tz=UTC")
    after = datetime.now(timezone.utc)
    columns = marks(page)
    assert len(columns) == 24
    for period, mark, bars in columns:
        start = datetime.fromisoformat(period)
        if start > after:
            assert (mark, bars) == ("future", 0), period
        elif start + timedelta(hours=1) <= before:
            assert mark == "", period
    if before.hour < 23:
        assert "still to come" in page.text_content("#uploads-note")


def test_first_week_of_a_year_is_partial(page: Any, server: Any) -> None:
    """The last 12 months start on the same weekday only by chance: a cut first week is marked."""
    answer = open_at(page, server, "range=12m&granularity=week&tz=UTC")
    first = date.fromisoformat(answer.json()["range"]["start"])
    columns = marks(page)
    assert columns[0][1] == ("" if first.weekday() == 0 else "partial")
    assert columns[-1][1] == "partial"  # this week is not over
    assert {m for _, m, _ in columns[1:-1]} == {""}


def focused(page: Any) -> str:
    name: str = page.evaluate(
        """() => { const e = document.activeElement;
        return e.id || (e.tagName === 'SUMMARY' ? e.closest('details').id + ' summary'
          : e.tagName + ':' + (e.value || e.textContent)); }"""
    )
    return name


def test_every_filter_works_from_the_keyboard(page: Any, server: Any) -> None:
    """Tab reaches each filter in order; Space/Enter open and tick; Escape closes; Enter on a
    date or Reset applies it."""
    open_at(page, server, MARCH)
    page.focus("#preset")
    order = [focused(page)]
    while order[-1] != "reset" and len(order) < 20:
        page.keyboard.press("Tab")  # a date field takes three: month, day, year
        if focused(page) != order[-1]:
            order.append(focused(page))
    assert order == [
        "preset", "start", "end", "tz", "types-filter summary", "providers-filter summary",
        "keys-filter summary", "granularity", "reset",
    ]  # fmt: skip

    # File types: Enter opens, Tab to the first box, Space ticks, Escape closes.
    page.focus("#types-filter summary")
    page.keyboard.press("Enter")
    assert page.get_attribute("#types-filter", "open") is not None
    audit(page, "types menu open")
    page.keyboard.press("Tab")
    assert focused(page) == "INPUT:application/*"
    settle(page, lambda: page.keyboard.press("Space"))
    assert query_of(page.url)["file_type"] == ["application/*"]
    assert page.text_content("#types-summary") == "application/*"
    assert focused(page) == "INPUT:application/*"  # focus stays on the box
    page.keyboard.press("Escape")
    assert page.get_attribute("#types-filter", "open") is None
    assert focused(page) == "types-filter summary"

    # Providers: Space opens; Tab past the last item closes the list.
    page.keyboard.press("Tab")
    page.keyboard.press("Space")
    assert page.get_attribute("#providers-filter", "open") is not None
    page.keyboard.press("Tab")
    settle(page, lambda: page.keyboard.press("Space"))
    first = query_of(page.url)["provider"]
    assert len(first) == 1 and page.text_content("#providers-summary") == first[0]
    for _ in range(3):  # the other two providers and "Clear"
        page.keyboard.press("Tab")
    settle(page, lambda: page.keyboard.press("Enter"))  # Clear
    assert "provider" not in query_of(page.url)
    page.keyboard.press("Tab")
    assert focused(page) == "keys-filter summary"  # an all-keys caller has the key picker
    assert page.get_attribute("#providers-filter", "open") is None
    page.keyboard.press("Tab")
    assert focused(page) == "granularity"

    # Selects change with the arrow keys, one request per change.
    settle(page, lambda: page.keyboard.press("ArrowDown"))
    assert query_of(page.url)["granularity"] == ["hour"]
    page.focus("#tz")
    settle(page, lambda: page.keyboard.press("ArrowUp"))
    assert query_of(page.url)["tz"] != ["UTC"]
    page.focus("#preset")
    settle(page, lambda: page.keyboard.press("Home"))
    assert query_of(page.url)["range"] == ["today"]

    # A date typed and confirmed with Enter (the start alone, with today as the end, is a 400).
    def type_date(field: str, keys: str, then: str) -> None:
        page.focus(field)
        page.keyboard.type(keys)
        page.keyboard.press(then)

    settle(page, lambda: type_date("#start", "03012020", "Tab"))
    settle(page, lambda: type_date("#end", "03102020", "Enter"))
    assert (query_of(page.url)["start"], query_of(page.url)["end"]) == (
        ["2020-03-01"],
        ["2020-03-10"],
    )

    # Reset with Enter brings back the defaults and drops every filter.
    page.focus("#reset")
    settle(page, lambda: page.keyboard.press("Enter"))
    query = query_of(page.url)
    assert query["range"] == ["30d"] and "file_type" not in query and "granularity" not in query
    assert page.text_content("#types-summary") == "All types"


def test_dark_scheme_passes_axe(browser: Any, server: Any) -> None:
    """The dark palette (prefers-color-scheme) keeps text contrast and every label."""
    context = browser.new_context(locale="en-US", timezone_id="UTC", color_scheme="dark")
    context.set_default_timeout(20_000)
    try:
        page = context.new_page()
        open_at(page, server, MARCH)  # settle() audits it
        page.click("#types-filter summary")
        audit(page, "dark, types menu open")
        open_at(page, server, "start=2020-03-10&end=2020-03-01&tz=UTC")  # the error state
    finally:
        context.close()
