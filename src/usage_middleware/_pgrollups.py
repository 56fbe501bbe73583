"""The PostgreSQL request rollup statements: one template per tier, and the seal and the roll.

The tiers come in three kinds (see :mod:`usage_middleware._pgrequests` for the instants that bound
them): :func:`fine_tiers` fold new raw rows, staged or read back from ``api_requests`` and
grouped by UTC quarter hour, into the quarter-hour histogram and endpoint rollup with the route
cap; :func:`coarse_tiers` add quarter-hour (or already summed) groups to the hourly and daily
ones, :func:`monthly_tiers` to the monthly ones. A late write runs all three on its new rows; a
seal (``SEAL_SQL``) runs the fine ones on the raw rows of ``[lo, hi)``; a roll (``ROLL_SQL``)
runs the coarse ones on the quarter-hour rows of the whole UTC hours ``[lo, hi)``, and a month
roll (``MONTHS_SQL``) the monthly ones on the daily rows of the whole UTC days ``[lo, hi)``.

Values that must agree bit for bit with Python are computed in Python when staging (the latency
buckets, microseconds, labels) and, for a seal, in SQL by the same formulas: the fine bucket is
``ceil(ln(ms / min) / ln(gamma))`` with the same float64 constants, and PostgreSQL's ``round``
of a float rounds half to even, as Python's does.
"""

from __future__ import annotations

from ._schema import (
    _LOG_GAMMA,
    _MAX_BUCKET,
    _MIN_MS,
    ENDPOINT_BUCKET_WIDTH,
    OTHER_METHOD,
    OTHER_ROUTE,
    ROUTES_PER_KEY_DAY,
    STANDARD_METHODS,
    UNMATCHED_ROUTE,
)

__all__ = [
    "MONTHS_SQL", "MONTHS_UPSERT_SQL", "QUARTER", "ROLL_SQL", "ROLL_UPSERT_SQL", "SEAL_SQL",
    "SEAL_UPSERT_SQL", "added", "coarse_tiers", "fine_tiers", "monthly_tiers", "sums",
]  # fmt: skip

# The new rows are grouped once by UTC quarter hour (:00, :15, :30, :45); the hourly, daily and
# monthly rollups are sums of those groups, so the raw rows are aggregated only once.
QUARTER = "date_bin('15 minutes', utc_at, TIMESTAMP '2000-01-01') AS q"


_REQUEST_COUNTERS = """
    count(*)::bigint AS total_requests,
    count(*) FILTER (WHERE status_code >= 400)::bigint AS error_requests,
    sum(response_us)::bigint AS total_response_us,
    sum(request_size)::bigint AS total_request_bytes,
    sum(response_size)::bigint AS total_response_bytes
"""
_REQUEST_COUNTER_NAMES = (
    "total_requests, error_requests, total_response_us, total_request_bytes, total_response_bytes"
)


def sums(names: str, named: bool = False) -> str:
    """``sum(c)::bigint`` for each of the comma-separated counters ``names`` (``AS c`` too if
    ``named``): what a coarser tier adds up from finer rows."""
    return ", ".join(f"sum({c})::bigint" + (f" AS {c}" if named else "") for c in names.split(", "))


def added(names: str) -> str:
    """The ``DO UPDATE SET`` of an upsert into alias ``t`` that adds ``names`` to the stored row."""
    return ", ".join(f"{c} = t.{c} + EXCLUDED.{c}" for c in names.split(", "))


_REQUEST_SUMS = sums(_REQUEST_COUNTER_NAMES)
_REQUEST_SET = added(_REQUEST_COUNTER_NAMES)

# The endpoint rollups' labels: method and route staged as computed in Python, the route then
# capped per key and UTC day. held: the named routes the batch's key-days have (as of this
# statement's snapshot); the batch's other named routes are admitted in route order into the
# room left (ROUTES_PER_KEY_DAY minus held). Under READ COMMITTED a concurrent writer may have
# inserted one of them since the snapshot: the upsert then waits for it and, DO UPDATE being
# what it is, returns the row anyway, so a route is named exactly when endpoint_routes holds it.
# Two writers that both saw room may together pass the cap by what their batches admitted.
# The NULL key joins as a hashable equality: (key IS NULL, coalesce(key, nil UUID)).
_NIL = "'00000000-0000-0000-0000-000000000000'::uuid"
_SAME_KEY = (
    "({a}.api_key_id IS NULL) = ({b}.api_key_id IS NULL) "
    f"AND coalesce({{a}}.api_key_id, {_NIL}) = coalesce({{b}}.api_key_id, {_NIL})"
)
_ENDPOINT_COUNTER_NAMES = (
    "total_requests, total_response_us, total_request_bytes, total_response_bytes"
)
_ENDPOINT_SUMS = sums(_ENDPOINT_COUNTER_NAMES)
_ENDPOINT_SET = added(_ENDPOINT_COUNTER_NAMES)


# A seal's or roll's old instant as a UTC timestamp, comparable with the periods' starts.
_LO_UTC = "(%(lo)s::timestamptz AT TIME ZONE 'UTC')"


def _tier(
    name: str, into: str, select: str, source: str, group: str, conflict: str, start: str,
    split: bool,
) -> str:  # fmt: skip
    """One rollup tier: ``INSERT INTO {into} SELECT {select} FROM {source} {group}`` with an
    upsert on ``conflict``.

    With ``split`` (a seal, or a roll), two statements: ``{name}`` upserts the groups of periods
    that started before the old instant of the tier, and ``{name}_new`` plainly inserts the
    others (``start``: the period's start, a UTC timestamp), which no rollup row can hold yet:
    every row folded so far, late or sealed, is older than that instant, and so is its period's
    start. Most of a seal's rows are of such periods, and a plain insert skips each row's
    conflict probe.
    """
    statement = f"INSERT INTO public.{into}\n    SELECT {select}\n      FROM {source}"
    statement += "{where}" + group
    upsert = f"ON CONFLICT ON CONSTRAINT {conflict}"
    if not split:
        return f"{name} AS (\n    {statement.format(where='')}\n    {upsert}\n)"
    old = statement.format(where=f"\n     WHERE {start} < {_LO_UTC}")
    new = statement.format(where=f"\n     WHERE {start} >= {_LO_UTC}")
    return f"{name} AS (\n    {old}\n    {upsert}\n), {name}_new AS (\n    {new}\n)"


def _request_tier(
    table: str, column: str, when: str, start: str, split: bool, source: str = "grouped"
) -> str:
    """A request histogram tier summed from quarter-hour groups."""
    return _tier(
        f"into_{table}",
        f"{table} AS t (api_key_id, {column}, latency_bucket, {_REQUEST_COUNTER_NAMES})",
        f"api_key_id, {when}, latency_bucket, {_REQUEST_SUMS}",
        source,
        "\n     GROUP BY 1, 2, 3\n     ORDER BY 1, 2, 3",
        f"uq_{table} DO UPDATE SET {_REQUEST_SET}",
        start,
        split,
    )


def _endpoint_tier(
    table: str, column: str, when: str, start: str, split: bool, source: str = "labelled"
) -> str:
    """An endpoint tier summed from labelled quarter-hour groups."""
    return _tier(
        f"into_{table}",
        f"{table} AS t (api_key_id, {column}, method, route, status_code, latency_bucket, "
        f"{_ENDPOINT_COUNTER_NAMES})",
        f"api_key_id, {when}, method, route, status_code, latency_bucket, {_ENDPOINT_SUMS}",
        source,
        "\n     GROUP BY 1, 2, 3, 4, 5, 6\n     ORDER BY 1, 2, 3, 4, 5, 6",
        f"uq_{table} DO UPDATE SET {_ENDPOINT_SET}",
        start,
        split,
    )


_HOUR = "date_trunc('hour', q)"
_DAY = "date_trunc('day', q)"
_MONTH = "date_trunc('month', q)"


def coarse_tiers(split: bool, grouped: str = "grouped", labelled: str = "labelled") -> str:
    """The CTEs that add quarter-hour groups (``grouped``: histogram rows, ``labelled``:
    endpoint rows, each with ``q``, the UTC start of its quarter hour or of the coarser period it
    already sums) to the *coarse* tiers: the request histograms by hour and day and the endpoint
    rollups by day."""
    return ", ".join(
        (
            _request_tier("daily_request_usage", "usage_date", "q::date", _DAY, split, grouped),
            _request_tier(
                "hourly_request_usage",
                "usage_hour",
                f"{_HOUR} AT TIME ZONE 'UTC'",
                _HOUR,
                split,
                grouped,
            ),
            _endpoint_tier("daily_endpoint_usage", "usage_date", "q::date", _DAY, split, labelled),
        )
    )


def monthly_tiers(split: bool, grouped: str = "grouped", labelled: str = "labelled") -> str:
    """The CTEs that add groups as :func:`coarse_tiers` takes them to the *monthly* tiers:
    the request histograms and endpoint rollups by month."""
    return ", ".join(
        (
            _request_tier(
                "monthly_request_usage", "usage_month", f"{_MONTH}::date", _MONTH, split, grouped
            ),
            _endpoint_tier(
                "monthly_endpoint_usage", "usage_month", f"{_MONTH}::date", _MONTH, split, labelled
            ),
        )
    )


def fine_tiers(split: bool) -> str:
    """The CTEs that fold ``staged`` (new raw rows, bucketed and labelled as in Python, with
    their UTC quarter hour ``q``) into the *fine* tiers: the quarter-hour request histogram and
    endpoint rollup, with the route cap (``endpoint_routes``). They leave ``grouped`` and
    ``labelled`` for :func:`coarse_tiers`."""
    quarter = _tier(
        "into_quarter_request_usage",
        "quarter_request_usage AS t "
        f"(api_key_id, usage_quarter, latency_bucket, {_REQUEST_COUNTER_NAMES})",
        f"api_key_id, q AT TIME ZONE 'UTC', latency_bucket, {_REQUEST_COUNTER_NAMES}",
        "grouped",
        "\n     ORDER BY 1, 2, 3",
        f"uq_quarter_request_usage DO UPDATE SET {_REQUEST_SET}",
        "q",
        split,
    )
    endpoints = _endpoint_tier(
        "quarter_endpoint_usage", "usage_quarter", "q AT TIME ZONE 'UTC'", "q", split
    )
    return f"""grouped AS (
    SELECT api_key_id, q, latency_bucket, {_REQUEST_COUNTERS}
      FROM staged
     GROUP BY 1, 2, 3
), {quarter}, endpoints AS (
    SELECT api_key_id, q, endpoint_method AS method, endpoint_route AS route,
           status_code::smallint AS status_code, endpoint_bucket AS latency_bucket,
           count(*)::bigint AS total_requests, sum(response_us)::bigint AS total_response_us,
           sum(request_size)::bigint AS total_request_bytes,
           sum(response_size)::bigint AS total_response_bytes
      FROM staged
     GROUP BY 1, 2, 3, 4, 5, 6
), wanted AS (
    SELECT DISTINCT api_key_id, q::date AS d, route
      FROM endpoints
     WHERE route <> '{UNMATCHED_ROUTE}'
), days AS (
    SELECT DISTINCT api_key_id, d FROM wanted
), held AS (
    SELECT e.api_key_id, e.usage_date AS d, e.route
      FROM days JOIN public.endpoint_routes AS e
        ON e.api_key_id = days.api_key_id AND e.usage_date = days.d
    UNION ALL
    SELECT e.api_key_id, e.usage_date, e.route
      FROM days JOIN public.endpoint_routes AS e
        ON days.api_key_id IS NULL AND e.api_key_id IS NULL AND e.usage_date = days.d
), ranked AS (
    SELECT api_key_id, d, route, held,
           count(*) FILTER (WHERE held) OVER (PARTITION BY api_key_id, d) AS n_held,
           row_number() OVER (PARTITION BY api_key_id, d, held ORDER BY route) AS n
      FROM (SELECT api_key_id, d, route, bool_or(held) AS held
              FROM (SELECT api_key_id, d, route, true AS held FROM held
                    UNION ALL
                    SELECT api_key_id, d, route, false FROM wanted) AS u
             GROUP BY 1, 2, 3) AS c
), admitted AS (
    INSERT INTO public.endpoint_routes AS t (api_key_id, usage_date, route)
    SELECT api_key_id, d, route
      FROM ranked
     WHERE NOT held AND n <= {ROUTES_PER_KEY_DAY} - n_held
     ORDER BY 1, 2, 3
    ON CONFLICT ON CONSTRAINT uq_endpoint_routes DO UPDATE SET route = EXCLUDED.route
    RETURNING api_key_id, usage_date AS d, route
), named AS (
    SELECT api_key_id, d, route FROM held
    UNION ALL
    SELECT api_key_id, d, route FROM admitted
), labelled AS (
    SELECT p.api_key_id, p.q, p.method,
           CASE WHEN p.route = '{UNMATCHED_ROUTE}' OR n.route IS NOT NULL THEN p.route
                ELSE '{OTHER_ROUTE}' END AS route,
           p.status_code, p.latency_bucket, p.total_requests, p.total_response_us,
           p.total_request_bytes, p.total_response_bytes
      FROM endpoints AS p
      LEFT JOIN named AS n
        ON n.d = p.q::date AND n.route = p.route AND {_SAME_KEY.format(a="n", b="p")}
), {endpoints}"""


_FINE_BUCKET = (
    f"CASE WHEN r.response_time_ms <= {_MIN_MS!r}::float8 THEN 0 "
    f"ELSE LEAST({_MAX_BUCKET}, pg_catalog.ceil(pg_catalog.ln(r.response_time_ms / "
    f"{_MIN_MS!r}::float8) / {_LOG_GAMMA!r}::float8)) END::smallint"
)
_METHODS = ", ".join(f"'{m}'" for m in sorted(STANDARD_METHODS))


def _seal(split: bool) -> str:
    """A seal: the raw rows of [lo, hi) into the fine tiers, labelled and bucketed in SQL as
    the writer does in Python; its one row is how many rows it folded."""
    return f"""
WITH new AS (
    SELECT r.api_key_id, {QUARTER.replace("utc_at", "(r.requested_at AT TIME ZONE 'UTC')")},
           r.status_code, r.request_size, r.response_size, {_FINE_BUCKET} AS latency_bucket,
           pg_catalog.round(r.response_time_ms * 1000::float8)::bigint AS response_us,
           CASE WHEN r.method IN ({_METHODS}) THEN r.method ELSE '{OTHER_METHOD}' END
               AS endpoint_method,
           (CASE WHEN r.route_matched IS FALSE THEN '{UNMATCHED_ROUTE}' ELSE r.path END)
               COLLATE "C" AS endpoint_route
      FROM public.api_requests AS r
     WHERE r.requested_at >= %(lo)s AND r.requested_at < %(hi)s
), staged AS (
    SELECT n.*, ((n.latency_bucket + {ENDPOINT_BUCKET_WIDTH - 1}) / {ENDPOINT_BUCKET_WIDTH}
                 )::smallint AS endpoint_bucket
      FROM new AS n
), {fine_tiers(split)}
SELECT count(*) FROM new"""


# By the fine tiers' index on the UTC quarter hour.
_UTC_DAYS = (
    "usage_quarter AT TIME ZONE 'UTC' >= (%(lo)s::timestamptz AT TIME ZONE 'UTC') "
    "AND usage_quarter AT TIME ZONE 'UTC' < (%(hi)s::timestamptz AT TIME ZONE 'UTC')"
)


def _roll(split: bool) -> str:
    """A roll: the fine tiers' rows of the UTC hours [lo, hi) summed into the hourly and daily
    tiers; its one row is how many requests they hold. The quarter hours are summed by hour
    (request histograms) and by day (endpoints) first, so each tier sums a few rows per period."""
    return f"""
WITH grouped AS (
    SELECT api_key_id, date_trunc('hour', usage_quarter AT TIME ZONE 'UTC') AS q,
           latency_bucket, {sums(_REQUEST_COUNTER_NAMES, named=True)}
      FROM public.quarter_request_usage
     WHERE {_UTC_DAYS}
     GROUP BY 1, 2, 3
), labelled AS (
    SELECT api_key_id, date_trunc('day', usage_quarter AT TIME ZONE 'UTC') AS q, method, route,
           status_code, latency_bucket, {sums(_ENDPOINT_COUNTER_NAMES, named=True)}
      FROM public.quarter_endpoint_usage
     WHERE {_UTC_DAYS}
     GROUP BY 1, 2, 3, 4, 5, 6
), {coarse_tiers(split)}
SELECT coalesce(sum(total_requests), 0) FROM grouped"""


# The daily tiers' days [lo, hi), both UTC midnights.
_DAYS = (
    "usage_date >= (%(lo)s::timestamptz AT TIME ZONE 'UTC')::date "
    "AND usage_date < (%(hi)s::timestamptz AT TIME ZONE 'UTC')::date"
)


def _months(split: bool) -> str:
    """A month roll: the daily tiers' rows of the UTC days [lo, hi) summed by month into the
    monthly tiers; its one row is how many requests they hold. A monthly row is so written once
    a day for a day's traffic, from the day's rows, instead of once an hour."""
    return f"""
WITH grouped AS (
    SELECT api_key_id, date_trunc('month', usage_date::timestamp) AS q, latency_bucket,
           {sums(_REQUEST_COUNTER_NAMES, named=True)}
      FROM public.daily_request_usage
     WHERE {_DAYS}
     GROUP BY 1, 2, 3
), labelled AS (
    SELECT api_key_id, date_trunc('month', usage_date::timestamp) AS q, method, route, status_code,
           latency_bucket, {sums(_ENDPOINT_COUNTER_NAMES, named=True)}
      FROM public.daily_endpoint_usage
     WHERE {_DAYS}
     GROUP BY 1, 2, 3, 4, 5, 6
), {monthly_tiers(split)}
SELECT coalesce(sum(total_requests), 0) FROM grouped"""


#: The seal, plainly inserting the rows of periods that start at or after its old instant.
SEAL_SQL = _seal(split=True)
#: The roll, likewise.
ROLL_SQL = _roll(split=True)
#: Both upserting every row: what a seal falls back on should a rollup row of such a period
#: exist after all (written into the rollups by hand); it then adds to that row.
SEAL_UPSERT_SQL = _seal(split=False)
ROLL_UPSERT_SQL = _roll(split=False)
#: The month roll, likewise.
MONTHS_SQL = _months(split=True)
MONTHS_UPSERT_SQL = _months(split=False)
