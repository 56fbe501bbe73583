"""``GET /time-zones`` and the zone list the dashboard page carries (no browser needed)."""

from __future__ import annotations

import json
import re
import zoneinfo
from collections.abc import Iterator

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount

from usage_middleware import UsageRouter, UsageStore


class Client:
    """GETs through the real ASGI app (httpx's ASGI transport, no network)."""

    def __init__(self, app: Starlette) -> None:
        self.app = app

    def get(self, path: str) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.get(path)

        return anyio.run(go)


@pytest.fixture
def client(sqlite_url: str) -> Iterator[Client]:
    """A router whose authorize refuses everyone: zone names are public reference data."""
    store = UsageStore(sqlite_url)
    store.create_schema()

    def nobody(request: Request) -> None:
        return None

    try:
        yield Client(Starlette(routes=[Mount("/api/usage", UsageRouter(store, authorize=nobody))]))
    finally:
        store.dispose()


def test_time_zones_are_canonical_names_with_legacy_aliases(client: Client) -> None:
    """Chromium reports Asia/Calcutta, Europe/Kiev, Asia/Saigon: the list offers the canonical
    names instead and maps each legacy alias to one of them."""
    response = client.get("/api/usage/time-zones")
    assert response.status_code == 200
    body = response.json()
    zones, aliases = body["zones"], body["aliases"]
    assert zones == sorted(zones)
    assert {"UTC", "Asia/Kolkata", "Europe/Kyiv", "Asia/Ho_Chi_Minh", "America/New_York"} <= set(
        zones
    )
    assert {"Europe/Amsterdam", "Europe/Oslo"} <= set(zones)  # known names, though links today
    legacy = {"Asia/Calcutta", "Europe/Kiev", "Asia/Saigon", "US/Eastern", "Etc/UTC", "Zulu"}
    assert not legacy & set(zones)
    assert not {z for z in zones if z.startswith("Etc/")}
    assert aliases["Asia/Calcutta"] == "Asia/Kolkata"
    assert aliases["Europe/Kiev"] == "Europe/Kyiv"
    assert aliases["Asia/Saigon"] == "Asia/Ho_Chi_Minh"
    assert aliases["US/Eastern"] == "America/New_York"
    assert aliases["Etc/UTC"] == "UTC"
    available = zoneinfo.available_timezones()
    assert set(zones) <= available | {"UTC"}
    assert set(aliases) <= available and not set(aliases) & set(zones)
    assert set(aliases.values()) <= set(zones)
    assert 300 < len(zones) < len(available)


def test_the_page_carries_the_same_list(client: Client) -> None:
    """The dashboard needs no request for its zone list: the page embeds /time-zones."""
    page = client.get("/api/usage/")
    assert page.status_code == 200
    found = re.search(r"const TZ_DATA = (\{.*?\});\n", page.text)
    assert found, "the zone list is not embedded in the page"
    assert json.loads(found.group(1)) == client.get("/api/usage/time-zones").json()
