"""UsageRouter: the HTTP read API and the dashboard page, mountable anywhere.

Every request is authorised first (``authorize(request)`` → key ids, ``ALL_KEYS`` or ``None``),
then validated, then answered by :mod:`usage_middleware._queries` in a worker thread — the
database calls block, the event loop must not. Failures are JSON, never an HTML 500:

* 400 ``{"error": {"code", "message", "parameter"}}`` for bad parameters,
* 401 when ``authorize`` returns ``None``, 403 for an ``api_key_id`` outside the caller's scope,
* 503 when the database cannot answer or a read outlives the store's ``read_timeout`` (and 500
  JSON if ``authorize`` itself raises).

``/health`` shows process details (recorder counters, pid, spool path, database host), so it has
its own authorization: ``health_authorize``, by default callers whose scope is ``ALL_KEYS``.
``/health/live`` is the unauthenticated liveness answer for load balancers; it touches nothing.

Every request through the router marks its ASGI scope ``usage_middleware.excluded`` so the
capture middleware does not record the dashboard's own traffic.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from datetime import date, datetime, tzinfo
from functools import partial
from typing import Any, Final, TypeVar
from uuid import UUID

import anyio.to_thread
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send

from . import _export, _failures, _queries, _requests
from ._dashboard import dashboard_page, time_zones
from ._errors import ConfigurationError, UsageError
from ._store import UsageStore
from ._timerange import (
    DEFAULT_MAX_FILTER_VALUES,
    DEFAULT_MAX_RANGE_DAYS,
    QueryError,
    QuerySpec,
    parse_query,
)

__all__ = ["ALL_KEYS", "UsageRouter"]

logger = logging.getLogger(__name__)

EXCLUDED_SCOPE_KEY = "usage_middleware.excluded"
_T = TypeVar("_T")


class _AllKeys:
    """The type of :data:`ALL_KEYS`: a scope that contains every API key (and keyless rows)."""

    _instance: _AllKeys | None = None

    def __new__(cls) -> _AllKeys:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ALL_KEYS"

    def __reduce__(self) -> str:
        return "ALL_KEYS"


ALL_KEYS: Final = _AllKeys()
"""Return this from ``authorize`` to let the caller read every API key's usage."""

KeyScope = Iterable[UUID | str] | _AllKeys | None  # what authorize() returns
Authorize = Callable[[Request], "KeyScope | Awaitable[KeyScope]"]
HealthAuthorize = Callable[[Request], "bool | Awaitable[bool | None] | None"]
KeyLabels = Callable[[list[UUID]], "Mapping[Any, Any] | Awaitable[Mapping[Any, Any]]"]

# More distinct parameter names than this is not a usage query (there are eight): refused before
# any per-name work, so a crafted URL costs one linear pass on the event loop.
MAX_PARAMETER_NAMES = 32


def _today(tz: tzinfo) -> date:
    return datetime.now(tz).date()


def _error(status: int, code: str, message: str, parameter: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "parameter": parameter}},
        status_code=status,
        headers={"Cache-Control": "no-store"},
    )


class _Denied(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


class UsageRouter(Router):
    """The usage API and dashboard as a Starlette ``Router``: ``app.mount(path, router)``.

    ``authorize(request)`` (sync or async) returns the API key ids the caller may read, or
    :data:`ALL_KEYS`; ``None`` means 401. Omitting it is an error unless ``public=True``, which
    serves every key's usage to anyone who can reach the mount. ``max_range_days`` (default
    400) bounds a query's length and ``max_filter_values`` (default 50) the values of each
    repeatable filter; ``today`` is the clock for presets (a function of the time zone).

    ``health_authorize(request)`` (sync or async) decides who sees ``/health``'s details:
    ``True`` shows them, ``False`` is 403, ``None`` is 401. By default only callers whose
    ``authorize`` returns ``ALL_KEYS`` see them (with ``public=True``, everyone).
    ``/health/live`` answers ``{"status": "ok"}`` to anyone.

    ``key_labels(ids)`` (sync or async) names keys in ``/consumers``: it gets the listed key
    ids and returns ``{id: label}``; labels are the host's (say, a customer name), never
    derived from the key itself. Ids it was not asked about are ignored; if it raises, the
    labels are null and the answer is still served.
    """

    def __init__(
        self,
        store: UsageStore,
        *,
        authorize: Authorize | None = None,
        public: bool = False,
        health_authorize: HealthAuthorize | None = None,
        max_range_days: int = DEFAULT_MAX_RANGE_DAYS,
        max_filter_values: int = DEFAULT_MAX_FILTER_VALUES,
        today: Callable[[tzinfo], date] = _today,
        key_labels: KeyLabels | None = None,
    ) -> None:
        if authorize is None and not public:
            raise ConfigurationError(
                "UsageRouter needs authorize=callable(request) returning the caller's API key "
                "ids (or ALL_KEYS); pass public=True to serve all usage without authorization"
            )
        if authorize is not None and public:
            raise ConfigurationError("pass either authorize or public=True, not both")
        if not isinstance(max_range_days, int) or max_range_days < 1:
            raise ConfigurationError(f"max_range_days must be an int >= 1, got {max_range_days!r}")
        if not isinstance(max_filter_values, int) or max_filter_values < 1:
            raise ConfigurationError(
                f"max_filter_values must be an int >= 1, got {max_filter_values!r}"
            )
        self.store = store
        self._authorize = authorize
        self._health_authorize = health_authorize
        self._max_range_days = max_range_days
        self._max_filter_values = max_filter_values
        self._today = today
        if key_labels is not None and not callable(key_labels):
            raise ConfigurationError("key_labels must be callable(ids) -> {id: label}")
        self._key_labels = key_labels
        super().__init__(
            routes=[
                Route("/", dashboard_page, methods=["GET"], name="usage_dashboard"),
                Route("/granular", self._granular, methods=["GET"], name="usage_granular"),
                Route("/file-types", self._file_types, methods=["GET"], name="usage_file_types"),
                Route("/providers", self._providers, methods=["GET"], name="usage_providers"),
                Route("/history", self._history, methods=["GET"], name="usage_history"),
                Route("/requests", self._requests, methods=["GET"], name="usage_requests"),
                Route("/consumers", self._consumers, methods=["GET"], name="usage_consumers"),
                Route("/failures", self._failures, methods=["GET"], name="usage_failures"),
                Route("/export", self._export, methods=["GET"], name="usage_export"),
                Route("/health", self._health, methods=["GET"], name="usage_health"),
                Route("/health/live", _live, methods=["GET"], name="usage_health_live"),
                Route("/time-zones", _time_zones, methods=["GET"], name="usage_time_zones"),
            ]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope[EXCLUDED_SCOPE_KEY] = True
        await super().__call__(scope, receive, send)

    # --- request handling --------------------------------------------------------------------

    async def _scope(self, request: Request) -> Collection[UUID] | None:
        """The caller's readable keys: ``None`` for all of them; raises ``_Denied``."""
        if self._authorize is None:
            return None
        try:
            result = self._authorize(request)
            if inspect.isawaitable(result):
                result = await result
        except Exception:
            logger.exception("usage router: authorize() raised")
            raise _Denied(_error(500, "authorize_failed", "the authorize hook failed")) from None
        if result is None:
            raise _Denied(_error(401, "unauthorized", "authentication required"))
        if isinstance(result, _AllKeys):
            return None
        try:
            return frozenset(k if isinstance(k, UUID) else UUID(str(k)) for k in result)
        except (TypeError, ValueError):
            logger.error("usage router: authorize() returned %r, not key ids", type(result))
            raise _Denied(
                _error(500, "authorize_failed", "authorize returned something other than key ids")
            ) from None

    def _spec(self, request: Request) -> QuerySpec:
        params: dict[str, list[str]] = {}
        for name, value in request.query_params.multi_items():  # one pass, in order
            values = params.get(name)
            if values is None:
                if len(params) == MAX_PARAMETER_NAMES:
                    raise QueryError(
                        "too_many_parameters",
                        f"at most {MAX_PARAMETER_NAMES} distinct parameter names are allowed",
                        None,
                    )
                params[name] = values = []
            values.append(value)
        return parse_query(
            params,
            today=self._today,
            max_range_days=self._max_range_days,
            max_filter_values=self._max_filter_values,
        )

    async def _answer(
        self,
        request: Request,
        query: Callable[[UsageStore, QuerySpec, Collection[UUID] | None], Any],
    ) -> Response:
        try:
            allowed = await self._scope(request)
            spec = self._spec(request)
        except _Denied as denied:
            return denied.response
        except QueryError as exc:
            return _error(400, exc.code, exc.message, exc.parameter)
        keys: Collection[UUID] | None = allowed
        if spec.api_key_ids is not None:
            if allowed is not None:
                outside = [k for k in spec.api_key_ids if k not in allowed]
                if outside:
                    return _error(
                        403,
                        "forbidden",
                        f"api_key_id {outside[0]} is outside your scope",
                        "api_key_id",
                    )
            keys = frozenset(spec.api_key_ids)
        try:
            body = await self._run(partial(query, self.store, spec, keys))
        except _queries.ReadTimeoutError as exc:
            logger.warning("usage router: %s", exc)
            return _error(
                503, "query_timeout", "the usage query took too long; try a shorter range"
            )
        except (SQLAlchemyError, UsageError) as exc:
            logger.warning("usage router: database query failed: %s", exc)
            return _error(503, "database_unavailable", "the usage database did not answer")
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def _run(self, fn: Callable[[], _T]) -> _T:
        return await anyio.to_thread.run_sync(fn)

    async def _granular(self, request: Request) -> Response:
        return await self._answer(request, _queries.granular)

    async def _file_types(self, request: Request) -> Response:
        return await self._answer(request, _only("file_types"))

    async def _providers(self, request: Request) -> Response:
        return await self._answer(request, _only("providers"))

    async def _history(self, request: Request) -> Response:
        return await self._answer(request, _queries.history)

    # --- failures and export ------------------------------------------------------------------

    async def _prepared(
        self, request: Request
    ) -> tuple[QuerySpec, Collection[UUID] | None, dict[str, list[str]]] | Response:
        """Authorization, the usual parameters and the key scope, as :meth:`_answer` does them,
        plus every parameter's values for the endpoint's own; or the error response."""
        try:
            allowed = await self._scope(request)
            spec = self._spec(request)  # also caps the number of distinct names
        except _Denied as denied:
            return denied.response
        except QueryError as exc:
            return _error(400, exc.code, exc.message, exc.parameter)
        keys: Collection[UUID] | None = allowed
        if spec.api_key_ids is not None:
            outside = [k for k in spec.api_key_ids if allowed is not None and k not in allowed]
            if outside:
                return _error(
                    403, "forbidden", f"api_key_id {outside[0]} is outside your scope", "api_key_id"
                )
            keys = frozenset(spec.api_key_ids)
        params: dict[str, list[str]] = {}
        for name, value in request.query_params.multi_items():
            params.setdefault(name, []).append(value)
        return spec, keys, params

    async def _guarded(self, fn: Callable[[], _T]) -> _T | Response:
        """``fn`` in a worker thread, with the database errors mapped as :meth:`_answer` does."""
        try:
            return await self._run(fn)
        except _queries.ReadTimeoutError as exc:
            logger.warning("usage router: %s", exc)
            return _error(
                503, "query_timeout", "the usage query took too long; try a shorter range"
            )
        except (SQLAlchemyError, UsageError) as exc:
            logger.warning("usage router: database query failed: %s", exc)
            return _error(503, "database_unavailable", "the usage database did not answer")

    async def _requests(self, request: Request) -> Response:
        prepared = await self._prepared(request)
        if isinstance(prepared, Response):
            return prepared
        spec, keys, params = prepared
        try:
            filters = _requests.parse_request_filter(params, self._max_filter_values)
        except QueryError as exc:
            return _error(400, exc.code, exc.message, exc.parameter)
        body = await self._guarded(
            partial(_requests.requests_answer, self.store, spec, keys, filters)
        )
        if isinstance(body, Response):
            return body
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def _consumers(self, request: Request) -> Response:
        prepared = await self._prepared(request)
        if isinstance(prepared, Response):
            return prepared
        spec, keys, params = prepared
        try:
            limit = _requests.parse_consumer_limit(params)
        except QueryError as exc:
            return _error(400, exc.code, exc.message, exc.parameter)
        body = await self._guarded(
            partial(_requests.consumers_answer, self.store, spec, keys, limit)
        )
        if isinstance(body, Response):
            return body
        await self._label(body["consumers"])
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def _label(self, rows: list[dict[str, Any]]) -> None:
        """Fill ``label`` from the host's ``key_labels`` for the listed keys only."""
        ids = [UUID(row["api_key_id"]) for row in rows if row["api_key_id"] is not None]
        if self._key_labels is None or not ids:
            return
        try:
            result = self._key_labels(ids)
            if inspect.isawaitable(result):
                result = await result
            labels = {}
            for k, v in dict(result).items():
                try:
                    labels[str(k if isinstance(k, UUID) else UUID(str(k)))] = v
                except ValueError:
                    continue
        except Exception:
            logger.exception("usage router: key_labels() failed; consumers served without labels")
            return
        for row in rows:
            label = labels.get(row["api_key_id"]) if row["api_key_id"] is not None else None
            row["label"] = label if isinstance(label, str) else None

    async def _failures(self, request: Request) -> Response:
        prepared = await self._prepared(request)
        if isinstance(prepared, Response):
            return prepared
        spec, keys, params = prepared
        try:
            limit, cursor = _failures.parse_failure_options(params)
        except QueryError as exc:
            return _error(400, exc.code, exc.message, exc.parameter)
        body = await self._guarded(
            partial(_failures.failures, self.store, spec, keys, limit, cursor)
        )
        if isinstance(body, Response):
            return body
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def _export(self, request: Request) -> Response:
        prepared = await self._prepared(request)
        if isinstance(prepared, Response):
            return prepared
        spec, keys, params = prepared
        try:
            dataset, fmt = _export.parse_export_options(params)
        except QueryError as exc:
            return _error(400, exc.code, exc.message, exc.parameter)
        export = _export.Export(self.store, spec, keys, dataset, fmt)
        failed = await self._guarded(export.prepare)
        if isinstance(failed, Response):
            return failed
        headers = {
            "Cache-Control": "no-store",
            "Content-Disposition": f'attachment; filename="{export.filename}"',
            "X-Content-Type-Options": "nosniff",
        }
        if export.retention_start is not None:
            headers["X-Usage-Retention-Start"] = export.retention_start.isoformat()
        if export.ignored:
            headers["X-Usage-Ignored"] = ",".join(export.ignored)
        # a sync iterator: Starlette reads each page in a worker thread
        return StreamingResponse(export.body(), media_type=export.media_type, headers=headers)

    async def _may_see_health(self, request: Request) -> None:
        """Raises ``_Denied`` unless the caller may see health details."""
        if self._health_authorize is None:
            if await self._scope(request) is not None:
                raise _Denied(
                    _error(
                        403, "forbidden", "health details are for unrestricted (ALL_KEYS) callers"
                    )
                )
            return
        try:
            allowed = self._health_authorize(request)
            if inspect.isawaitable(allowed):
                allowed = await allowed
        except Exception:
            logger.exception("usage router: health_authorize() raised")
            raise _Denied(
                _error(500, "authorize_failed", "the health_authorize hook failed")
            ) from None
        if allowed is None:
            raise _Denied(_error(401, "unauthorized", "authentication required"))
        if allowed is not True:
            raise _Denied(_error(403, "forbidden", "health details are not for this caller"))

    async def _health(self, request: Request) -> Response:
        try:
            await self._may_see_health(request)
        except _Denied as denied:
            return denied.response
        recorders = []
        for recorder in self.store.recorders:
            try:
                recorders.append(recorder.stats())
            except Exception:
                logger.exception("usage router: recorder.stats() raised")
        try:
            await self._run(self.store.ping)
        except (SQLAlchemyError, UsageError) as exc:
            logger.warning("usage router: health check failed: %s", exc)
            return JSONResponse(
                {"status": "unavailable", "database": "unreachable", "recorders": recorders},
                status_code=503,
                headers={"Cache-Control": "no-store"},
            )
        return JSONResponse(
            {"status": "ok", "database": "ok", "recorders": recorders},
            headers={"Cache-Control": "no-store"},
        )


async def _live(request: Request) -> Response:
    """Liveness for load balancers: the process answers. No authorization, no database, no
    details."""
    return JSONResponse({"status": "ok"}, headers={"Cache-Control": "no-store"})


def _only(key: str) -> Callable[[UsageStore, QuerySpec, Collection[UUID] | None], Any]:
    def query(store: UsageStore, spec: QuerySpec, keys: Collection[UUID] | None) -> Any:
        result = _queries.breakdowns(store, spec, keys)
        return {"range": result["range"], "totals": result["totals"], key: result[key]}

    return query


async def _time_zones(request: Request) -> Response:
    """The canonical IANA zones the dashboard offers and the legacy aliases browsers report
    (``{"zones": [...], "aliases": {"Asia/Calcutta": "Asia/Kolkata", ...}}``): public reference
    data from tzdata, no authorization, no database."""
    return JSONResponse(time_zones(), headers={"Cache-Control": "public, max-age=86400"})
