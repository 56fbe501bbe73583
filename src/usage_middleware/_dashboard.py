"""The dashboard page served by ``UsageRouter`` at ``GET /`` of its mount."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse


@lru_cache(maxsize=1)
def _page() -> str:
    return (
        resources.files("usage_middleware")
        .joinpath("static")
        .joinpath("dashboard.html")
        .read_text("utf-8")
    )


async def dashboard_page(request: Request) -> HTMLResponse:
    """The single-file dashboard; it calls ``granular`` relative to its own URL."""
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})
