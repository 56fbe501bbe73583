"""Route templates: ``/files/{id}`` instead of ``/files/123``, mount prefixes included.

Labelling rows by template keeps their cardinality bounded. The route Starlette matched is in
the scope; the mounts above it are found by walking the app's route tree once per route and
caching the answer by the route object.
"""

from __future__ import annotations

from typing import Any

from starlette.routing import Mount
from starlette.types import Scope

__all__ = ["RouteTemplates"]

_CACHE_SIZE = 4096


class RouteTemplates:
    """Templates of matched routes, cached per route object (bounded)."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[Any, str | None]] = {}

    def cached(self, route: Any) -> str | None:
        """The template of ``route`` if it is cached, else ``None``: a dict lookup."""
        entry = self._cache.get(id(route))
        return entry[1] if entry is not None and entry[0] is route else None

    def template(self, scope: Scope, entry_root_path: str, entry_app: Any) -> str | None:
        """The matched route's path template, with the templates of the mounts above it."""
        route = scope.get("route")
        if route is None:
            return None
        cached = self._cache.get(id(route))
        if cached is not None and cached[0] is route:
            return cached[1]
        path = getattr(route, "path", None)
        if not isinstance(path, str):
            return None
        if isinstance(route, Mount):
            path = path.rstrip("/") + "/{path}"
        prefix = _mount_prefix(getattr(entry_app, "routes", None), route, 0)
        if prefix is None:
            # Not reachable from the app's route tree (built at run time): use the mount point
            # the request actually went through; not cached, it may hold parameter values.
            root_path = scope.get("root_path", "")
            mounted = (
                root_path[len(entry_root_path) :] if root_path.startswith(entry_root_path) else ""
            )
            return mounted + path
        template = prefix + path
        if len(self._cache) < _CACHE_SIZE:
            self._cache[id(route)] = (route, template)
        return template


def _mount_prefix(routes: Any, target: Any, depth: int) -> str | None:
    """The concatenated mount templates leading to ``target`` in a route tree, or ``None``."""
    if routes is None or depth > 8:
        return None
    try:
        candidates = list(routes)
    except TypeError:
        return None
    for candidate in candidates:
        if candidate is target:
            return ""
    for candidate in candidates:
        sub = getattr(candidate, "routes", None)
        if sub is None:
            continue
        below = _mount_prefix(sub, target, depth + 1)
        if below is not None:
            mount_path = getattr(candidate, "path", "") if isinstance(candidate, Mount) else ""
            return mount_path.rstrip("/") + below
    return None
