"""URLs as they may be shown: in logs, errors, health answers and telemetry."""

from __future__ import annotations

import re

from sqlalchemy.engine import URL, make_url

__all__ = ["display_url", "mask_text"]

# Query parameters (libpq keywords such as password, sslpassword) whose values must not be shown,
# and the same inside a conninfo string or URL given as a value (libpq expands a dbname holding
# one). Over-masking a harmless value (a key file path) costs nothing.
_SECRET_NAME = r"[A-Za-z_]*(?:pass|pwd|secret|token|key|credential)[A-Za-z_]*"
_SECRET_PARAM = re.compile(rf"(?i)\b({_SECRET_NAME})(\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]*)")
_URL_USERINFO = re.compile(r"(://[^:@/?#\s]*):[^@/?#\s]*@")
_MASK = "***"


def mask_text(text: str) -> str:
    """``text`` with URL passwords and ``name=value`` secrets masked."""
    text = _URL_USERINFO.sub(rf"\1:{_MASK}@", text)
    return _SECRET_PARAM.sub(rf"\1\2{_MASK}", text)


def display_url(url: str | URL) -> str:
    """``url`` with every credential masked: the password, and each query parameter (or
    conninfo keyword inside one) that names a password, secret, token or key. The one form in
    which a store's URL is shown: repr, errors, recorder stats and logs, metric attributes."""
    parsed = make_url(url)
    query: dict[str, str | tuple[str, ...]] = {}
    for name, value in parsed.query.items():
        if re.fullmatch(_SECRET_NAME, name, re.IGNORECASE):
            query[name] = _MASK
        elif isinstance(value, str):
            query[name] = mask_text(value)
        else:
            query[name] = tuple(mask_text(v) for v in value)
    database = parsed.database
    if database and parsed.get_backend_name() != "sqlite":
        database = mask_text(database)
    shown = parsed.set(query=query, database=database).render_as_string(hide_password=True)
    return shown.replace("%2A%2A%2A", _MASK)
