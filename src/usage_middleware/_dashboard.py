"""The dashboard page served by ``UsageRouter`` at ``GET /`` of its mount.

The page carries the time zone list it offers (canonical IANA names and the legacy aliases
browsers still report, such as Chromium's ``Asia/Calcutta``), so choosing a zone costs no
request. The same data is ``GET /time-zones`` for other clients.
"""

from __future__ import annotations

import json
import zoneinfo
from functools import lru_cache
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse

_ZONES_PLACEHOLDER = "/*TIME_ZONES*/null"


def _tzdata_text(name: str) -> str:
    return resources.files("tzdata.zoneinfo").joinpath(name).read_text("utf-8")


@lru_cache(maxsize=1)
def time_zones() -> dict[str, Any]:
    """``{"zones": [...], "aliases": {legacy: canonical}}`` from the tzdata package.

    ``zoneinfo.available_timezones()`` mixes canonical names with backward-compatible links
    (``Asia/Calcutta``, ``US/Eastern``) and ``Etc/GMT+5``-style zones nobody picks from a list.
    The zones offered are those ``zone.tab`` lists (one or more per country, the names people
    know) plus ``UTC``; the aliases are ``tzdata.zi``'s links to one of them.
    """
    available = zoneinfo.available_timezones()
    zones = {"UTC"}
    for line in _tzdata_text("zone.tab").splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and not line.startswith("#") and fields[2] in available:
            zones.add(fields[2])
    aliases = {"Etc/UTC": "UTC"}
    for line in _tzdata_text("tzdata.zi").splitlines():
        if not line.startswith("L "):
            continue
        _, target, link = line.split()
        canonical = "UTC" if target == "Etc/UTC" else target
        if link not in zones and canonical in zones and link in available:
            aliases[link] = canonical
    return {"zones": sorted(zones), "aliases": dict(sorted(aliases.items()))}


@lru_cache(maxsize=1)
def _page() -> str:
    html = (
        resources.files("usage_middleware")
        .joinpath("static")
        .joinpath("dashboard.html")
        .read_text("utf-8")
    )
    data = json.dumps(time_zones(), separators=(",", ":")).replace("<", "\\u003c")
    return html.replace(_ZONES_PLACEHOLDER, data, 1)


async def dashboard_page(request: Request) -> HTMLResponse:
    """The single-file dashboard; it calls ``granular`` relative to its own URL."""
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})
