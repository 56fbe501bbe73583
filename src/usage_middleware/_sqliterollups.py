"""The SQLite request rollups: the statements that roll new requests up into every tier.

The requests come from a *source*: live ones a seal reads straight from ``api_requests``
(:func:`usage_middleware._sqliteseal.raw_requests`, their labels, latency bucket and
microseconds computed in SQL), late ones from the table the writer staged them in with those
values computed in Python (``STAGED``, see :mod:`usage_middleware._sqlitewrite`). One pass over
the source sums them per key, UTC quarter hour, endpoint labels, status and fine latency bucket
(the fine groups); the histograms' groups (by fine bucket) and the endpoint rollups' groups (by
endpoint and coarse bucket) are summed from those, and every tier from them, ``INSERT ..
SELECT .. GROUP BY .. ON CONFLICT DO UPDATE`` in unique-key order. A quarter hour of traffic
holds far fewer such groups than rows, so each request is read, bucketed and sorted once.

Endpoint rollups follow the route cap (see ``_schema.ROUTES_PER_KEY_DAY``): the new named routes
of each key and UTC day are admitted into ``endpoint_routes`` in route order while the day has
room, endpoint groups whose route was not admitted are relabelled ``(other)``, and then the
three endpoint tiers are rolled up like the others. Being the only writer, SQLite never exceeds
the cap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._schema import ENDPOINT_BUCKET_WIDTH, OTHER_ROUTE, ROUTES_PER_KEY_DAY, UNMATCHED_ROUTE

__all__ = [
    "ENDPOINT_ROLLUPS",
    "MONTHLY",
    "MONTH_ROLLS",
    "NOT_MONTHLY",
    "STAGED",
    "roll_up_requests",
]

#: The writer's staged requests as a source of :func:`roll_up_requests`: every column the
#: rollups read (``api_key_id``, ``requested_at``, ``status_code``, ``request_size``,
#: ``response_size``, ``latency_bucket``, ``response_us``, ``endpoint_method``,
#: ``endpoint_route``) under its own name.
STAGED = "temp.um_stage_requests"

# the connection-local tables the groups are summed into (made by roll_up_requests)
_CREATE_GROUPS = (
    "CREATE TEMP TABLE IF NOT EXISTS um_fine_groups (api_key_id, q, method, route, "
    "status_code, latency_bucket, n, us, rq, rs)",
    "CREATE TEMP TABLE IF NOT EXISTS um_request_groups (api_key_id, q, latency_bucket, "
    "n, e, us, rq, rs)",
    "CREATE TEMP TABLE IF NOT EXISTS um_endpoint_groups (api_key_id, q, method, route, "
    "status_code, latency_bucket, n, us, rq, rs)",
)


def _checked_add(column: str) -> str:
    """``column + excluded.column`` that fails instead of overflowing.

    SQLite's ``+`` silently turns an integer overflow into an inexact REAL; ``abs()`` of the
    smallest integer raises ``integer overflow`` (as ``sum()`` does), which the store reports as
    refused records (as PostgreSQL's ``bigint out of range``). Both terms are sums of values
    that are never negative, so the sum overflows exactly when the test says. Used for the byte
    and time sums, the only counters that can grow that large; the per-batch sums are ``sum()``.
    """
    return (
        f"CASE WHEN {column} > 9223372036854775807 - excluded.{column} "
        f"THEN abs(-9223372036854775807 - 1) ELSE {column} + excluded.{column} END"
    )


def _quarter(column: str) -> str:
    """The UTC quarter hour (:00, :15, :30, :45) of a stored UTC timestamp, as stored text."""
    minute = f"substr({column}, 15, 2)"
    return (
        f"substr({column}, 1, 14) || CASE WHEN {minute} < '15' THEN '00' "
        f"WHEN {minute} < '30' THEN '15' WHEN {minute} < '45' THEN '30' ELSE '45' END "
        "|| ':00.000000'"
    )


_REQUEST_SET = (
    "total_requests = total_requests + excluded.total_requests, "
    "error_requests = error_requests + excluded.error_requests, "
    f"total_response_us = {_checked_add('total_response_us')}, "
    f"total_request_bytes = {_checked_add('total_request_bytes')}, "
    f"total_response_bytes = {_checked_add('total_response_bytes')}"
)
# Periods of the grouped rows' UTC quarter hour ``q`` (stored text), per tier.
_MONTH, _DAY, _HOUR = (
    "substr(q, 1, 7) || '-01'",
    "substr(q, 1, 10)",
    ("substr(q, 1, 13) || ':00:00.000000'"),
)
# One pass over the source: the groups both kinds of rollup are summed from (``{source}``: a
# table or a parenthesised SELECT with the columns STAGED has). The two groupings from them
# sort in the tiers' key order, so that the tiers' own sorts find their input in order.
_GROUP_FINE = (
    "INSERT INTO temp.um_fine_groups "
    f"SELECT api_key_id, {_quarter('requested_at')}, endpoint_method, endpoint_route, "
    "status_code, latency_bucket, count(*), sum(response_us), sum(request_size), "
    "sum(response_size) FROM {source} GROUP BY 1, 2, 3, 4, 5, 6"
)
_GROUP_REQUESTS = (
    "INSERT INTO temp.um_request_groups "
    "SELECT api_key_id, q, latency_bucket, sum(n), sum(CASE WHEN status_code >= 400 THEN n "
    "ELSE 0 END), sum(us), sum(rq), sum(rs) FROM temp.um_fine_groups "
    "GROUP BY api_key_id, q, latency_bucket"
)
_REQUEST_TIERS = (
    "monthly_request_usage", "daily_request_usage", "hourly_request_usage", "quarter_request_usage",
)  # fmt: skip
_REQUEST_ROLLUPS = tuple(
    f"INSERT INTO main.{table} (api_key_id, {when_column}, latency_bucket, total_requests, "
    "error_requests, total_response_us, total_request_bytes, total_response_bytes) "
    f"SELECT api_key_id, {when} AS w, latency_bucket, sum(n), sum(e), sum(us), sum(rq), "
    "sum(rs) FROM temp.um_request_groups WHERE true "
    "GROUP BY api_key_id, w, latency_bucket ORDER BY api_key_id, w, latency_bucket "
    f"ON CONFLICT (ifnull(api_key_id, ''), {when_column}, latency_bucket) "
    f"DO UPDATE SET {_REQUEST_SET}"
    for table, when_column, when in (
        ("monthly_request_usage", "usage_month", _MONTH),
        ("daily_request_usage", "usage_date", _DAY),
        ("hourly_request_usage", "usage_hour", _HOUR),
        ("quarter_request_usage", "usage_quarter", "q"),
    )
)


# The coarse (endpoint) bucket of a fine one, as endpoint_bucket: (fine + 4) / 5 in integers.
_WIDTH = ENDPOINT_BUCKET_WIDTH

# --- endpoint rollups and the route cap -----------------------------------------------------
# The new requests are first summed per key, UTC quarter hour and endpoint with their own
# routes (from the fine groups); the cap's two steps then run on those groups, which share a
# key, day and route with each of their rows but are far fewer: admit the batch's new named
# routes per key and UTC day, in route order, into the room the day has left (SQLite runs an
# INSERT's SELECT to completion before inserting when it reads the target table, so the room is
# the day's count before this batch); then relabel every group whose route is not in
# endpoint_routes as "(other)". The tiers' GROUP BY adds up the groups that relabelling made
# alike.
_SAME_KEY = "ifnull(e.api_key_id, '') = ifnull({k}, '')"
_GROUP_ENDPOINTS = (
    "INSERT INTO temp.um_endpoint_groups "
    f"SELECT api_key_id, q, method, route, status_code, (latency_bucket + {_WIDTH - 1}) / {_WIDTH} "
    "AS b, sum(n), sum(us), sum(rq), sum(rs) FROM temp.um_fine_groups "
    "GROUP BY api_key_id, q, method, route, status_code, b"
)
_ADMIT_ROUTES = (
    "INSERT INTO main.endpoint_routes (api_key_id, usage_date, route) "
    "SELECT k, d, r FROM ("
    "SELECT k, d, r, row_number() OVER (PARTITION BY ifnull(k, ''), d ORDER BY r) AS n "
    "FROM (SELECT DISTINCT api_key_id AS k, substr(q, 1, 10) AS d, "
    "route AS r FROM temp.um_endpoint_groups "
    f"WHERE route <> '{UNMATCHED_ROUTE}') AS w "
    "WHERE NOT EXISTS (SELECT 1 FROM main.endpoint_routes AS e "
    f"WHERE {_SAME_KEY.format(k='w.k')} AND e.usage_date = w.d AND e.route = w.r)"
    ") AS c "
    f"WHERE n <= {ROUTES_PER_KEY_DAY} - (SELECT count(*) FROM main.endpoint_routes AS e "
    f"WHERE {_SAME_KEY.format(k='c.k')} AND e.usage_date = c.d) "
    "ORDER BY ifnull(k, ''), d, r"
)
_RELABEL = (
    f"UPDATE temp.um_endpoint_groups SET route = '{OTHER_ROUTE}' "
    f"WHERE route <> '{UNMATCHED_ROUTE}' AND NOT EXISTS ("
    "SELECT 1 FROM main.endpoint_routes AS e "
    f"WHERE {_SAME_KEY.format(k='um_endpoint_groups.api_key_id')} "
    "AND e.usage_date = substr(um_endpoint_groups.q, 1, 10) "
    "AND e.route = um_endpoint_groups.route)"
)
_ENDPOINT_SET = (
    "total_requests = total_requests + excluded.total_requests, "
    f"total_response_us = {_checked_add('total_response_us')}, "
    f"total_request_bytes = {_checked_add('total_request_bytes')}, "
    f"total_response_bytes = {_checked_add('total_response_bytes')}"
)
_ENDPOINT_GROUP = "api_key_id, w, method, route, status_code, latency_bucket"
ENDPOINT_ROLLUPS = {
    table: f"INSERT INTO main.{table} (api_key_id, {when_column}, method, route, status_code, "
    "latency_bucket, total_requests, total_response_us, total_request_bytes, "
    "total_response_bytes) "
    f"SELECT api_key_id, {when} AS w, method, route, status_code, latency_bucket, sum(n), "
    f"sum(us), sum(rq), sum(rs) FROM temp.um_endpoint_groups WHERE true "
    f"GROUP BY {_ENDPOINT_GROUP} ORDER BY {_ENDPOINT_GROUP} "
    f"ON CONFLICT (ifnull(api_key_id, ''), {when_column}, method, route, status_code, "
    f"latency_bucket) DO UPDATE SET {_ENDPOINT_SET}"
    for table, when_column, when in (
        ("monthly_endpoint_usage", "usage_month", _MONTH),
        ("daily_endpoint_usage", "usage_date", _DAY),
        ("quarter_endpoint_usage", "usage_quarter", "q"),
    )
}
#: The monthly tiers, which follow the month instant (see :mod:`usage_middleware._sqliteseal`),
#: and the other tables a roll-up fills.
MONTHLY = frozenset(("monthly_request_usage", "monthly_endpoint_usage"))
NOT_MONTHLY = tuple(
    t for t in (*_REQUEST_TIERS, "endpoint_routes", *ENDPOINT_ROLLUPS) if t not in MONTHLY
)
# The monthly tiers' statements for groups before a month instant (a late write's).
_MONTHLY_BEFORE = {
    table: statement.replace(" WHERE true ", " WHERE q < ? ")
    for table, statement in (
        *zip(_REQUEST_TIERS, _REQUEST_ROLLUPS, strict=True),
        *ENDPOINT_ROLLUPS.items(),
    )
    if table in MONTHLY
}
_DAILY_COUNTERS = (
    "total_requests, error_requests, total_response_us, total_request_bytes, total_response_bytes"
)
#: A month roll: the daily tiers' rows of the UTC days ``[?, ?)`` (dates as stored) summed by
#: month into the monthly tiers.
MONTH_ROLLS = (
    f"INSERT INTO main.monthly_request_usage (api_key_id, usage_month, latency_bucket, "
    f"{_DAILY_COUNTERS}) "
    "SELECT api_key_id, substr(usage_date, 1, 7) || '-01' AS w, latency_bucket, "
    "sum(total_requests), sum(error_requests), sum(total_response_us), sum(total_request_bytes), "
    "sum(total_response_bytes) FROM main.daily_request_usage "
    "WHERE usage_date >= ? AND usage_date < ? "
    "GROUP BY api_key_id, w, latency_bucket ORDER BY api_key_id, w, latency_bucket "
    "ON CONFLICT (ifnull(api_key_id, ''), usage_month, latency_bucket) "
    f"DO UPDATE SET {_REQUEST_SET}",
    "INSERT INTO main.monthly_endpoint_usage (api_key_id, usage_month, method, route, "
    "status_code, latency_bucket, total_requests, total_response_us, total_request_bytes, "
    "total_response_bytes) "
    "SELECT api_key_id, substr(usage_date, 1, 7) || '-01' AS w, method, route, status_code, "
    "latency_bucket, sum(total_requests), sum(total_response_us), sum(total_request_bytes), "
    "sum(total_response_bytes) FROM main.daily_endpoint_usage "
    "WHERE usage_date >= ? AND usage_date < ? "
    f"GROUP BY {_ENDPOINT_GROUP} ORDER BY {_ENDPOINT_GROUP} "
    "ON CONFLICT (ifnull(api_key_id, ''), usage_month, method, route, status_code, "
    f"latency_bucket) DO UPDATE SET {_ENDPOINT_SET}",
)
_CLEAR_GROUPS = (
    "DELETE FROM temp.um_fine_groups",
    "DELETE FROM temp.um_request_groups",
    "DELETE FROM temp.um_endpoint_groups",
)


def roll_up_requests(
    cur: Any,
    source: str = STAGED,
    params: Sequence[Any] = (),
    tiers: Sequence[str] | None = None,
    months_before: str | None = None,
) -> int:
    """Roll the requests of ``source`` (new ones only; ``params`` bound to its placeholders)
    up into the request histograms and, through the route cap (``endpoint_routes``), the
    endpoint rollups; returns how many requests that was. ``tiers`` names the only tables to
    fill (a seal's: all but the monthly ones; an upgrade's backfill of the tables an older file
    lacked). ``months_before`` (a month instant as stored) gives the monthly tiers only the
    requests before it (a late write's)."""

    def wanted(table: str) -> bool:
        return tiers is None or table in tiers

    def roll(table: str, statement: str) -> None:
        if not wanted(table):
            return
        if months_before is not None and table in MONTHLY:
            cur.execute(_MONTHLY_BEFORE[table], (months_before,))
        else:
            cur.execute(statement)

    for statement in (*_CREATE_GROUPS, *_CLEAR_GROUPS):
        cur.execute(statement)
    cur.execute(_GROUP_FINE.format(source=source), params)
    rolled = int(cur.execute("SELECT coalesce(sum(n), 0) FROM temp.um_fine_groups").fetchone()[0])
    if any(wanted(t) for t in _REQUEST_TIERS):
        cur.execute(_GROUP_REQUESTS)
        for table, statement in zip(_REQUEST_TIERS, _REQUEST_ROLLUPS, strict=True):
            roll(table, statement)
    cur.execute(_GROUP_ENDPOINTS)
    if wanted("endpoint_routes"):
        cur.execute(_ADMIT_ROUTES)
    cur.execute(_RELABEL)
    for table, statement in ENDPOINT_ROLLUPS.items():
        roll(table, statement)
    for statement in _CLEAR_GROUPS:
        cur.execute(statement)
    return rolled
