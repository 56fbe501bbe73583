"""The dashboard's Requests and Consumers panels in Chromium, and how many calls a change makes.

The numbers on the page equal ``/requests`` and ``/consumers`` and the test's own aggregate of
the raw rows it wrote (percentiles within the API's stated error of the exact nearest rank);
every state visited passes axe-core; sorting, filtering by an endpoint or status, narrowing to
a key and the key picker are used from the keyboard.
"""

from __future__ import annotations

from collections import Counter
from datetime import date, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from dashboard_page import SETTLED, audit, settle
from raw_rows import View, nearest_rank, totals

from usage_middleware._schema import ENDPOINT_RELATIVE_ERROR

pytestmark = pytest.mark.browser

MARCH = (date(2020, 3, 1), date(2020, 3, 31))


def open_at(page: Any, server: Any, query: str) -> Any:
    return settle(page, lambda: page.goto(f"{server.dashboard}?{query}#key={server.admin_key}"))


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def endpoint_calls(page: Any) -> list[str]:
    """The usage API endpoints the page calls from now on, by name."""
    calls: list[str] = []

    def seen(request: Any) -> None:
        path = urlsplit(request.url).path
        if "/api/usage/" in path and path.rsplit("/", 1)[1]:
            calls.append(path.rsplit("/", 1)[1])

    page.on("request", seen)
    return calls


def settle_requests(page: Any, action: Any) -> Any:
    """A change only the Requests panel depends on: its /requests answer, rendered, audited."""
    with page.expect_response(lambda r: "/requests?" in r.url) as answer:
        action()
    page.wait_for_function(SETTLED)
    audit(page)
    return answer.value


def focused(page: Any) -> str:
    text: str = page.evaluate("document.activeElement.textContent")
    return text


def figures(page: Any) -> dict[str, str]:
    shown: dict[str, str] = page.eval_on_selector_all(
        "#requests-figures dd", "ds => Object.fromEntries(ds.map(d => [d.id, d.dataset.value]))"
    )
    return shown


def endpoint_rows(page: Any) -> list[list[Any]]:
    rows: list[list[Any]] = page.eval_on_selector_all(
        "#endpoints-table tbody tr",
        """rs => rs.map(r => [r.dataset.method, r.dataset.route, +r.dataset.requests,
            +r.dataset.errors, +r.dataset.p95ResponseMs])""",
    )
    return rows


def check_requests(page: Any, body: dict[str, Any], view: View, server: Any) -> None:
    """The panel shows ``body``, and ``body`` is the raw rows of ``view``."""
    rows = view.requests(server.known_requests)
    t = body["totals"]
    assert t["requests"] == len(rows) > 0
    assert t["errors"] == sum(r.status_code >= 400 for r in rows)
    assert t["server_errors"] == sum(r.status_code >= 500 for r in rows)
    assert t["request_bytes"] == sum(r.request_size for r in rows)
    ms = [r.response_time_ms for r in rows]
    assert t["avg_response_ms"] == pytest.approx(sum(ms) / len(ms), abs=1e-3)
    for q in (0.5, 0.95, 0.99):
        exact = nearest_rank(ms, q)
        got = t[f"p{round(q * 100)}_response_ms"]
        assert abs(got - exact) <= ENDPOINT_RELATIVE_ERROR * exact, (q, got, exact)

    shown = figures(page)
    assert shown["rq-requests"] == str(t["requests"])
    assert shown["rq-errors"] == str(t["errors"])
    for name in ("p50", "p95", "p99"):
        assert float(shown[f"rq-{name}"]) == t[f"{name}_response_ms"]
    assert float(shown["rq-avg"]) == t["avg_response_ms"]
    assert int(shown["rq-in"]) == t["request_bytes"]

    per_day = Counter(view.local_day(r.requested_at).isoformat() for r in rows)
    errors_per_day = Counter(
        view.local_day(r.requested_at).isoformat() for r in rows if r.status_code >= 400
    )
    assert [(p["period"], p["requests"], p["errors"]) for p in body["series"]] == [
        (p["period"], per_day[p["period"]], errors_per_day[p["period"]]) for p in body["series"]
    ]
    columns = page.eval_on_selector_all(
        "#rseries-chart g.col",
        "cs => cs.map(c => [c.dataset.period, +c.dataset.requests, +c.dataset.errors])",
    )
    assert columns == [[p["period"], p["requests"], p["errors"]] for p in body["series"]]
    latency = page.eval_on_selector_all(
        "#latency-chart g.col",
        "cs => cs.map(c => [+c.dataset.p50ResponseMs, +c.dataset.p95ResponseMs])",
    )
    assert latency == [[p["p50_response_ms"], p["p95_response_ms"]] for p in body["series"]]

    statuses = Counter(r.status_code for r in rows)
    assert {s["status_code"]: s["requests"] for s in body["status_codes"]} == statuses
    shares = page.eval_on_selector_all(
        "#status-chart .share-row", "rs => rs.map(r => [+r.dataset.key, +r.dataset.requests])"
    )
    assert shares == [[s["status_code"], s["requests"]] for s in body["status_codes"]]

    endpoints = Counter((r.method, r.path) for r in rows)
    assert {(e["method"], e["route"]): e["requests"] for e in body["endpoints"]} == endpoints
    assert endpoint_rows(page) == [
        [e["method"], e["route"], e["requests"], e["errors"], e["p95_response_ms"]]
        for e in body["endpoints"]
    ]


def test_requests_panel_equals_the_api_and_the_raw_rows(page: Any, server: Any) -> None:
    """Totals, requests and errors over time, p50/p95 over time, status codes and endpoints for
    a range, zone and key; the type and provider filters are named as not applying."""
    view = View(*MARCH, "America/New_York", ("image/*",), ("s3",), (server.keys[0],))
    open_at(page, server, view.query)
    body = server.get("requests", view.query).json()
    check_requests(page, body, view, server)
    assert body["ignored"] == ["provider", "file_type"]
    assert page.get_attribute("#requests-note", "data-ignored") == "provider,file_type"
    assert "do not apply to requests" in page.text_content("#requests-note")
    assert page.get_attribute("#kpi-requests-note", "data-ignored") == "provider,file_type"
    assert page.text_content("#kpi-requests-note") == (
        "All requests: the provider and file type filters do not apply to them"
    )
    kpi = server.granular(view.query).json()["requests"]["total"]
    assert page.get_attribute("#kpi-requests", "data-value") == str(kpi)
    assert kpi == len(view.requests(server.known_requests))

    # Without those filters there is nothing to explain.
    plain = View(*MARCH, "America/New_York", keys=(server.keys[0],))
    open_at(page, server, plain.query)
    assert server.get("requests", plain.query).json()["ignored"] == []
    assert not page.is_visible("#requests-note")
    assert page.text_content("#kpi-requests-note") == ""


def test_endpoints_sort_and_filter_from_the_keyboard(page: Any, server: Any) -> None:
    """The sort buttons order the table both ways; an endpoint or a status code chosen with the
    keyboard narrows the Requests panel (method, route and status in the URL) with one /requests
    call, and its chip removes the filter again."""
    view = View(*MARCH, "UTC")
    open_at(page, server, view.query)
    page.focus("#endpoints-table button.sort[data-sort='errors']")
    page.keyboard.press("Enter")
    errors = [row[3] for row in endpoint_rows(page)]
    assert errors == sorted(errors, reverse=True)
    assert page.get_attribute("#endpoints-table th:has([data-sort='errors'])", "aria-sort") == (
        "descending"
    )
    page.keyboard.press("Enter")  # focus stayed on the button: again, the other way
    assert [row[3] for row in endpoint_rows(page)] == sorted(errors)
    assert focused(page) == "Errors"
    page.focus("#endpoints-table button.sort[data-sort='endpoint']")
    page.keyboard.press("Space")
    names = [f"{row[0]} {row[1]}" for row in endpoint_rows(page)]
    assert names == sorted(names)
    audit(page, "endpoints sorted by name")

    calls = endpoint_calls(page)
    page.focus("#endpoints-table button.row >> text='POST /api/upload'")
    answer = settle_requests(page, lambda: page.keyboard.press("Enter"))
    assert calls == ["requests"]  # the other answers do not depend on it
    assert query_of(page.url)["method"] == ["POST"]
    assert query_of(page.url)["route"] == ["/api/upload"]
    assert query_of(answer.url)["route"] == ["/api/upload"]
    only = View(*MARCH, "UTC", methods=("POST",), routes=("/api/upload",))
    body = server.get("requests", f"{view.query}&method=POST&route=/api/upload").json()
    check_requests(page, body, only, server)
    assert page.get_attribute("#endpoints-table button[aria-pressed='true']", "class") == "row"
    assert "POST /api/upload" in page.text_content("#requests-filters")

    page.focus("#status-chart button >> text='500'")
    settle_requests(page, lambda: page.keyboard.press("Enter"))
    assert query_of(page.url)["status"] == ["500"]
    both = View(*MARCH, "UTC", methods=("POST",), routes=("/api/upload",), statuses=("500",))
    query = f"{view.query}&method=POST&route=/api/upload&status=500"
    assert figures(page)["rq-requests"] == str(len(both.requests(server.known_requests)))
    assert server.get("requests", query).json()["totals"]["requests"] == len(
        both.requests(server.known_requests)
    )

    page.focus("#requests-filters button[aria-label='Remove the filter POST /api/upload']")
    settle_requests(page, lambda: page.keyboard.press("Enter"))
    assert "method" not in query_of(page.url) and query_of(page.url)["status"] == ["500"]
    page.focus("#requests-filters button")
    settle_requests(page, lambda: page.keyboard.press("Enter"))
    assert not {"method", "route", "status"} & set(query_of(page.url))
    assert not page.is_visible("#requests-filters")
    page.click("#endpoints-table button.sort[data-sort='requests']")  # back to the API's order
    check_requests(page, server.get("requests", view.query).json(), view, server)


CONSUMER_FIELDS = (
    "api_key_id",
    "uploads",
    "bytes",
    "failed_uploads",
    "requests",
    "errors",
    "last_seen",
)


def consumer_rows(page: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = page.eval_on_selector_all(
        "#consumers-table tbody tr",
        """rs => rs.map(r => ({api_key_id: r.dataset.key || null, uploads: +r.dataset.uploads,
            bytes: +r.dataset.bytes, failed_uploads: +r.dataset.failedUploads,
            requests: +r.dataset.requests, errors: +r.dataset.errors,
            last_seen: r.dataset.lastSeen || null}))""",
    )
    return rows


def test_consumers_list_each_key_and_narrow_the_whole_page(page: Any, server: Any) -> None:
    """For an all-keys caller: one row per key (and keyless requests) equal to /consumers and
    the raw rows; choosing a key (keyboard) narrows every answer to it, and the key picker in
    the filters shows and changes the choice."""
    view = View(*MARCH, "Asia/Tokyo", (), ("s3", "vercel"))
    open_at(page, server, view.query)
    body = server.get("consumers", view.query).json()
    uploads, requests = view.uploads(server.known), view.requests(server.known_requests)
    want = {}
    for key in {r.api_key_id for r in uploads} | {r.api_key_id for r in requests}:
        ups = [r for r in uploads if r.api_key_id == key]
        reqs = [r for r in requests if r.api_key_id == key]
        want[None if key is None else str(key)] = {
            "uploads": len(ups),
            "bytes": sum(r.file_size for r in ups),
            "failed_uploads": sum(r.upload_status == "failed" for r in ups),
            "requests": len(reqs),
            "errors": sum(r.status_code >= 400 for r in reqs),
            "last_seen": max([r.uploaded_at for r in ups] + [r.requested_at for r in reqs]),
        }
    got = {
        c["api_key_id"]: {
            **{f: c[f] for f in CONSUMER_FIELDS[1:-1]},
            "last_seen": datetime.fromisoformat(c["last_seen"]),
        }
        for c in body["consumers"]
    }
    assert got == want
    assert len(want) == 3  # two keys and requests without one
    assert consumer_rows(page) == [{f: c[f] for f in CONSUMER_FIELDS} for c in body["consumers"]]
    assert page.is_visible("#consumers") and page.is_visible("#keys-field")
    options = page.eval_on_selector_all("#keys-filter input", "is => is.map(i => i.value)")
    assert sorted(options) == sorted(server.keys)

    key = server.keys[1]
    page.focus(f"#consumers-table button[title='{key}']")
    answer = settle(page, lambda: page.keyboard.press("Enter"))
    assert query_of(page.url)["api_key_id"] == [key] == query_of(answer.url)["api_key_id"]
    narrowed = View(*MARCH, "Asia/Tokyo", (), ("s3", "vercel"), (key,))
    body = answer.json()
    assert {k: body["totals"][k] for k in totals([])} == totals(narrowed.uploads(server.known))
    assert page.get_attribute("#kpi-uploads", "data-value") == str(body["totals"]["uploads"])
    assert page.get_attribute("#kpi-requests", "data-value") == str(
        len(narrowed.requests(server.known_requests))
    )
    assert page.get_attribute(f"#consumers-table button[title='{key}']", "aria-pressed") == "true"
    assert page.is_checked(f"#keys-filter input[value='{key}']")
    assert page.text_content("#keys-summary") == f"{key[:8]}…{key[-4:]}"
    failure_keys = page.eval_on_selector_all(
        "#failures-table tbody tr", "rs => rs.map(r => r.dataset.key)"
    )
    assert set(failure_keys) == {key}

    # The picker, from the keyboard: open it, tick the other key too.
    page.focus("#keys-filter summary")
    page.keyboard.press("Enter")
    assert page.get_attribute("#keys-filter", "open") is not None
    audit(page, "key picker open")
    other = server.keys[0]
    page.focus(f"#keys-filter input[value='{other}']")
    answer = settle(page, lambda: page.keyboard.press("Space"))
    assert sorted(query_of(answer.url)["api_key_id"]) == sorted(server.keys)
    assert page.text_content("#keys-summary").count("…") == 2
    page.keyboard.press("Escape")

    # Choosing the chosen key again goes back to every key.
    page.focus(f"#consumers-table button[title='{key}']")
    settle(page, lambda: page.keyboard.press("Enter"))
    page.focus(f"#consumers-table button[title='{key}']")
    settle(page, lambda: page.keyboard.press("Enter"))
    assert "api_key_id" not in query_of(page.url)
    assert page.text_content("#keys-summary") == "All keys"


def test_keys_show_by_the_hosts_labels(page: Any, server: Any) -> None:
    """Keys the host names (the example app labels each key with its owner) show by that name
    in the Consumers table, the key picker and the failures."""
    open_at(page, server, "range=90d&tz=UTC")
    body = server.get("consumers", "range=90d&tz=UTC").json()
    labels = {c["api_key_id"]: c["label"] for c in body["consumers"]}
    assert sorted(labels.values()) == ["Acme", "Globex", "Initech"]  # the demo data's keys
    shown = page.eval_on_selector_all(
        "#consumers-table tbody tr",
        "rs => rs.map(r => [r.dataset.key, r.dataset.label, r.querySelector('th').textContent])",
    )
    assert shown == [[c["api_key_id"], c["label"], c["label"]] for c in body["consumers"]]
    picker = page.eval_on_selector_all(
        "#keys-filter label", "ls => ls.map(l => [l.querySelector('input').value, l.textContent])"
    )
    assert sorted(picker) == sorted([k, f"{v} ({k[:8]}…)"] for k, v in labels.items())
    failures = page.eval_on_selector_all(
        "#failures-table span.key[data-id]", "ss => ss.map(s => [s.dataset.id, s.textContent])"
    )
    assert failures and all(text == labels[key] for key, text in failures)


def test_a_customer_key_sees_neither_consumers_nor_the_key_picker(page: Any, server: Any) -> None:
    """A caller that may read one key has nothing to compare it with."""
    settle(page, lambda: page.goto(f"{server.dashboard}?range=90d&tz=UTC#key=demo-key-acme"))
    body = server.get("consumers", "range=90d&tz=UTC", key="demo-key-acme").json()
    assert len(body["consumers"]) == 1
    assert page.evaluate("document.getElementById('main').dataset.state") == "ready"
    assert not page.is_visible("#consumers")
    assert not page.is_visible("#keys-field")
    assert page.is_visible("#requests") and page.is_visible("#failures")


def test_each_change_asks_only_the_answers_it_changes(page: Any, server: Any) -> None:
    """One /granular call per change for the main answer; each panel asks again only when a
    parameter it uses changed, and the filter options only when the range or zone did."""
    open_at(page, server, "start=2020-03-01&end=2020-03-31&tz=UTC")
    calls = endpoint_calls(page)

    def after(action: Any) -> list[str]:
        calls.clear()
        settle(page, action)
        page.wait_for_timeout(300)  # nothing else follows
        return sorted(calls)

    page.click("#providers-filter summary")
    tick = page.check
    assert after(lambda: tick("#providers-filter input[value='s3']")) == [
        "consumers", "failures", "granular", "requests",
    ]  # fmt: skip
    page.keyboard.press("Escape")
    assert after(lambda: page.select_option("#granularity", "week")) == ["granular", "requests"]
    page.click("#keys-filter summary")
    assert after(lambda: tick(f"#keys-filter input[value='{server.keys[0]}']")) == [
        "failures", "granular", "requests",
    ]  # fmt: skip
    page.keyboard.press("Escape")
    assert after(lambda: page.select_option("#preset", "last_month")) == [
        "consumers", "failures", "file-types", "granular", "providers", "requests",
    ]  # fmt: skip
