"""URLs as they may be shown: in logs, errors, health answers and telemetry."""

from __future__ import annotations

from sqlalchemy.engine import URL

__all__ = ["display_url"]


def display_url(url: URL) -> str:
    """``url`` with its password hidden."""
    return url.render_as_string(hide_password=True)
