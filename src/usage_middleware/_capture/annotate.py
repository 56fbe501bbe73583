"""``annotate()``: what an endpoint knows better than the middleware's hooks.

The middleware puts a plain dict in the scope under :data:`SCOPE_KEY` (inner scope copies are
shallow, so it is found from any endpoint); ``annotate()`` validates fields into it.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

__all__ = ["ANNOTATABLE", "SCOPE_KEY", "annotate"]

logger = logging.getLogger("usage_middleware._capture.middleware")

SCOPE_KEY = "usage_middleware.notes"
"""Scope key of the per-request dict ``annotate()`` writes to."""
ANNOTATABLE = ("provider", "api_key_id", "upload_status", "error_message")
_MAX_PROVIDER = 64


def _check_annotation(name: str, value: Any) -> Any:
    if name == "provider":
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"provider must be a non-empty str, got {value!r:.60}")
        if len(value) > _MAX_PROVIDER:
            raise ValueError(f"provider must be at most {_MAX_PROVIDER} characters")
        return value.strip()
    if name == "api_key_id":
        if value is None or isinstance(value, uuid.UUID):
            return value
        if isinstance(value, str):
            try:
                return uuid.UUID(value)
            except ValueError:
                pass
        raise ValueError(
            f"api_key_id must be a UUID (or None), got {type(value).__name__}; "
            "hash a raw key with usage_middleware.api_key_uuid()"
        )
    if name == "upload_status":
        if value not in ("success", "failed"):
            raise ValueError(f"upload_status must be 'success' or 'failed', got {value!r:.40}")
        return value
    if value is not None and not isinstance(value, str):
        raise ValueError(f"error_message must be a str or None, got {type(value).__name__}")
    return value


def annotate(request_or_scope: Any, **fields: Any) -> None:
    """Set ``provider``, ``api_key_id``, ``upload_status`` or ``error_message`` for the records
    of the current request, from inside the endpoint. Wins over the middleware's hooks.

    Accepts a Starlette/FastAPI ``Request`` (or anything with ``.scope``) or the ASGI scope.
    Unknown field names raise ``TypeError``, bad values ``ValueError``. Without the middleware
    in front of the app, the call validates and does nothing else.
    """
    unknown = sorted(set(fields) - set(ANNOTATABLE))
    if unknown:
        raise TypeError(
            f"annotate() got unexpected field(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(ANNOTATABLE)}"
        )
    checked = {name: _check_annotation(name, value) for name, value in fields.items()}
    scope = request_or_scope if isinstance(request_or_scope, dict) else None
    if scope is None:
        scope = getattr(request_or_scope, "scope", None)
        if not isinstance(scope, dict):
            raise TypeError(
                "annotate() needs a Request or an ASGI scope, "
                f"got {type(request_or_scope).__name__}"
            )
    notes = scope.get(SCOPE_KEY)
    if notes is None:
        logger.debug("annotate(): no UsageMiddleware in front of this request; ignored")
        return
    notes.update(checked)
