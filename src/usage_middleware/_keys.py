"""API keys to stable ids: the raw key never leaves this module.

``api_key_uuid(key)`` is a name-based UUID (RFC 9562 version 5) in a fixed namespace, so the same
key gives the same id in every process, host and release, and a host can compute the ids its
customers own (for ``UsageRouter``'s ``authorize``) without storing anything. The mapping is
cached in a bounded LRU, so a request only hashes a key it has not seen recently, and the default
hook remembers the ids of the header values it has seen lately by their raw bytes, so a known key
costs it one lookup.
"""

from __future__ import annotations

import uuid
from functools import lru_cache

from starlette.types import Scope

__all__ = ["API_KEY_NAMESPACE", "api_key_uuid", "key_from_headers"]

API_KEY_NAMESPACE = uuid.UUID("5b0f1f5e-8a47-5c1e-9d0b-7a1c3e2f4d60")
"""Namespace of the version 5 UUIDs made from API keys. Part of the stored data's contract:
changing it would give every key a new id."""

_CACHE_SIZE = 4096


@lru_cache(maxsize=_CACHE_SIZE)
def api_key_uuid(key: str) -> uuid.UUID:
    """The stable id of an API key (surrounding whitespace ignored)."""
    return uuid.uuid5(API_KEY_NAMESPACE, key.strip())


# The ids of the header values seen lately, by their raw bytes: a request with a key seen before
# costs one lookup (no strip, decode and hash of a new str). Only values that carry a key are
# kept (never another scheme's credentials, such as Basic). Bounded like api_key_uuid's cache;
# a full one starts over.
_BY_API_KEY: dict[bytes, uuid.UUID] = {}
_BY_AUTHORIZATION: dict[bytes, uuid.UUID] = {}


def key_from_headers(scope: Scope) -> uuid.UUID | None:
    """The default hook: ``x-api-key``, else ``Authorization: Bearer <key>``, as a stable id."""
    bearer: uuid.UUID | None = None
    for name, value in scope.get("headers", ()):
        if name == b"x-api-key":
            try:
                return _BY_API_KEY[value]
            except (KeyError, TypeError):  # not seen lately; TypeError: not bytes
                pass
            key = value.strip()
            if key:
                return _remember(_BY_API_KEY, value, api_key_uuid(key.decode("latin-1")))
        elif name == b"authorization" and bearer is None:
            try:
                bearer = _BY_AUTHORIZATION[value]
            except (KeyError, TypeError):
                scheme, _, token = value.strip().partition(b" ")
                if scheme.lower() == b"bearer" and token.strip():
                    bearer = _remember(
                        _BY_AUTHORIZATION, value, api_key_uuid(token.strip().decode("latin-1"))
                    )
    return bearer


def _remember(cache: dict[bytes, uuid.UUID], value: bytes, found: uuid.UUID) -> uuid.UUID:
    if type(value) is bytes:
        if len(cache) >= _CACHE_SIZE:
            cache.clear()
        cache[value] = found
    return found
