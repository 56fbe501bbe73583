"""UsageMiddleware: a pure ASGI middleware that times requests and captures uploads.

Per request it wraps ``receive`` (count body bytes, feed the upload capture) and ``send`` (status
at ``http.response.start``, bytes summed over body messages, the clock stopped at the last body
message), runs the app, and afterwards — never on the way in or out of a message — turns what it
saw into one ``RequestRecord`` plus one ``UploadRecord`` per file and hands them to the recorder,
which writes them in the background. The request never waits for the database.

Per-request state lives in a ``_Exchange`` object stored in the scope under ``SCOPE_KEY`` (inner
scope copies are shallow, so ``annotate()`` finds it from any endpoint); nothing per request is
kept on the middleware. User hooks run inside ``_failsafe``: a hook that raises is logged (its
type only, so a key in its message cannot leak) and ignored.

Lifespan: the recorder starts on ``lifespan.startup`` (or on the first request when the server
sends no lifespan events) and is shut down — flushing every record of every completed request —
before ``lifespan.shutdown.complete`` is passed on. Both run in a worker thread.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio.to_thread
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._capture import MultipartCapture, RawCapture, multipart_boundary, parse_options_header
from ._errors import ConfigurationError
from ._keys import key_from_headers
from ._recorder import Recorder
from ._records import RequestRecord, UploadRecord, UploadStatus
from ._telemetry import CaptureTelemetry

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from ._store import UsageStore

__all__ = ["EXCLUDED_KEY", "SCOPE_KEY", "UsageMiddleware", "annotate"]

logger = logging.getLogger(__name__)

UTC = timezone.utc
SCOPE_KEY = "usage_middleware.exchange"
"""Scope key of the per-request object ``annotate()`` writes to."""
EXCLUDED_KEY = "usage_middleware.excluded"
"""Set (truthy) in the scope by anything that wants its request left unrecorded (the router)."""

_DEFAULT_MAX_FILES = 1000
_DEFAULT_SHUTDOWN_TIMEOUT = 10.0
_ROUTE_CACHE_SIZE = 4096
_UPLOAD_METHODS = frozenset({"POST", "PUT", "PATCH"})
_ANNOTATABLE = ("provider", "api_key_id", "upload_status", "error_message")
_UNSET: Any = object()
_MAX_PROVIDER = 64

T = TypeVar("T")


class RecorderLike(Protocol):
    """What the middleware needs from a recorder (``Recorder`` or a test double)."""

    def start(self) -> None: ...

    def submit(self, record: RequestRecord | UploadRecord) -> Any: ...

    def submit_many(self, records: Iterable[RequestRecord | UploadRecord]) -> Any: ...

    def shutdown(self, timeout: float = ...) -> Any: ...


# --- annotate ---------------------------------------------------------------------------------


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
    unknown = sorted(set(fields) - set(_ANNOTATABLE))
    if unknown:
        raise TypeError(
            f"annotate() got unexpected field(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(_ANNOTATABLE)}"
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
    exchange = scope.get(SCOPE_KEY)
    if exchange is None:
        logger.debug("annotate(): no UsageMiddleware in front of this request; ignored")
        return
    for name, value in checked.items():
        setattr(exchange, name, value)


# --- per request --------------------------------------------------------------------------------


class _Exchange:
    """One request's state: counters from the messages, and what the endpoint annotated."""

    __slots__ = (
        "api_key_id",
        "body_done",
        "disconnected",
        "end",
        "error_message",
        "provider",
        "received",
        "response_done",
        "sent",
        "status",
        "upload_status",
    )

    def __init__(self) -> None:
        self.received = 0
        self.sent = 0
        self.status: int | None = None
        self.end: float | None = None
        self.body_done = False
        self.response_done = False
        self.disconnected = False
        self.provider: Any = _UNSET
        self.api_key_id: Any = _UNSET
        self.upload_status: Any = _UNSET
        self.error_message: Any = _UNSET


def _exception_text(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _header(scope: Scope, wanted: bytes) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == wanted:
            return bytes(value)
    return None


class UsageMiddleware:
    """Records every HTTP request and every uploaded file into the usage tables.

    Give it a ``store`` (it then builds a :class:`Recorder` from ``recorder_options``) or a
    ready ``recorder``. Hooks, all optional, receive the ASGI scope:

    - ``provider``: a string, or ``callable(scope) -> str | None``; default ``"unknown"``.
    - ``api_key_id``: ``callable(scope) -> UUID | str | None``; default reads ``x-api-key`` or
      ``Authorization: Bearer`` and hashes the key to a stable UUID (``api_key_uuid``).
    - ``exclude``: ``callable(scope) -> bool``; ``exclude_paths``: path prefixes. Excluded
      requests pass through untouched. Requests handled by ``UsageRouter`` are never recorded.
    - ``raw_upload``: ``callable(scope) -> bool``; ``raw_upload_paths``: path prefixes. A
      non-multipart ``POST``/``PUT``/``PATCH`` they match is one uploaded file (its body).

    ``annotate()`` from the endpoint wins over every hook. File names are stored only with
    ``record_file_names=True``. At most ``max_files_per_request`` files are recorded per request.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: UsageStore | None = None,
        recorder: RecorderLike | None = None,
        provider: str | Callable[[Scope], str | None] = "unknown",
        api_key_id: Callable[[Scope], uuid.UUID | str | None] | None = None,
        exclude: Callable[[Scope], bool] | None = None,
        exclude_paths: Iterable[str] = (),
        raw_upload: Callable[[Scope], bool] | None = None,
        raw_upload_paths: Iterable[str] = (),
        record_file_names: bool = False,
        max_files_per_request: int = _DEFAULT_MAX_FILES,
        shutdown_timeout: float = _DEFAULT_SHUTDOWN_TIMEOUT,
        recorder_options: Mapping[str, Any] | None = None,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        if recorder is None:
            if store is None:
                raise ConfigurationError(
                    "UsageMiddleware needs store=UsageStore(...) (or a ready recorder=...)"
                )
            recorder = Recorder(store, **dict(recorder_options or {}))
        elif recorder_options:
            raise ConfigurationError(
                "recorder_options only apply when the middleware builds "
                "the recorder; configure the recorder you pass instead"
            )
        if isinstance(provider, str):
            if not provider.strip() or len(provider) > _MAX_PROVIDER:
                raise ConfigurationError(
                    f"provider must be a non-empty str of at most {_MAX_PROVIDER} characters"
                )
        elif not callable(provider):
            raise ConfigurationError("provider must be a str or a callable(scope) -> str")
        for name, hook in (
            ("api_key_id", api_key_id),
            ("exclude", exclude),
            ("raw_upload", raw_upload),
        ):
            if hook is not None and not callable(hook):
                raise ConfigurationError(f"{name} must be a callable(scope) or None")
        if max_files_per_request < 1:
            raise ConfigurationError(
                f"max_files_per_request must be >= 1, got {max_files_per_request}"
            )
        if shutdown_timeout <= 0:
            raise ConfigurationError(f"shutdown_timeout must be > 0, got {shutdown_timeout}")
        self.app = app
        self.recorder = recorder
        self._provider = provider
        self._api_key_id = api_key_id or key_from_headers
        self._exclude = exclude
        self._exclude_paths = self._prefixes(exclude_paths, "exclude_paths")
        self._raw_upload = raw_upload
        self._raw_upload_paths = self._prefixes(raw_upload_paths, "raw_upload_paths")
        self._record_file_names = record_file_names
        self._max_files = max_files_per_request
        self._shutdown_timeout = shutdown_timeout
        self._telemetry = CaptureTelemetry(tracer_provider, meter_provider)
        self._routes: dict[int, tuple[Any, str | None]] = {}
        self._started = False
        self._atexit_registered = False
        self._failures = 0

    @staticmethod
    def _prefixes(paths: Iterable[str], name: str) -> tuple[str, ...]:
        if isinstance(paths, str):
            paths = (paths,)
        out = tuple(paths)
        for path in out:
            if not isinstance(path, str) or not path.startswith("/"):
                raise ConfigurationError(f"{name} entries must be paths starting with '/'")
        return out

    def stats(self) -> dict[str, Any]:
        """Capture failures so far (each was logged) and the recorder's own stats, if any."""
        stats = getattr(self.recorder, "stats", None)
        return {"capture_failures": self._failures, "recorder": stats() if stats else None}

    # --- ASGI -------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if (self._exclude_paths and scope["path"].startswith(self._exclude_paths)) or (
            self._exclude is not None and self._failsafe("exclude", self._exclude, scope, False)
        ):
            await self.app(scope, receive, send)
            return
        if not self._started:
            await self._start(lazily=True)
        await self._handle(scope, receive, send)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        requested_at = datetime.now(UTC)
        entry_root_path = scope.get("root_path", "")
        entry_app = scope.get("app", self.app)
        exchange = _Exchange()
        scope[SCOPE_KEY] = exchange
        capture = self._capture_for(scope)
        span = token = None
        if capture is not None:
            try:
                span, token = self._telemetry.begin(scope["method"])
            except Exception:
                self._failed("starting the upload span")

        async def receive_() -> Message:
            message = await receive()
            kind = message["type"]
            if kind == "http.request":
                body = message.get("body", b"")
                if body:
                    exchange.received += len(body)
                    if capture is not None:
                        capture.feed(body)
                if not message.get("more_body", False):
                    exchange.body_done = True
            elif kind == "http.disconnect" and not exchange.response_done:
                exchange.disconnected = True
            return message

        async def send_(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.body":
                exchange.sent += len(message.get("body", b""))
                if not message.get("more_body", False):
                    await send(message)
                    exchange.end = time.perf_counter()
                    exchange.response_done = True
                    return
            elif kind == "http.response.start":
                exchange.status = message["status"]
            elif kind == "http.response.pathsend":
                await send(message)
                exchange.end = time.perf_counter()
                exchange.response_done = True
                with contextlib.suppress(OSError):
                    exchange.sent += os.path.getsize(message["path"])
                return
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive_, send_)
        except BaseException as exc:
            error = exc
            raise
        finally:
            recorded: tuple[RequestRecord, str | None, list[UploadRecord]] | None = None
            try:
                recorded = self._finish(
                    scope,
                    exchange,
                    capture,
                    started,
                    requested_at,
                    entry_root_path,
                    entry_app,
                    error,
                )
            except Exception:
                self._failed("recording a request")
            if capture is not None:
                try:
                    if recorded is None:
                        self._telemetry.discard(span, token)
                    else:
                        request, route, uploads = recorded
                        self._telemetry.finish(
                            span, token, request, route, uploads, self._record_file_names, error
                        )
                except Exception:
                    self._failed("recording upload telemetry")

    def _capture_for(self, scope: Scope) -> MultipartCapture | RawCapture | None:
        if scope.get("method") not in _UPLOAD_METHODS:
            return None
        content_type = _header(scope, b"content-type")
        if content_type is not None and content_type[:19].lower() == b"multipart/form-data":
            boundary = multipart_boundary(content_type)
            if boundary is None:
                return None  # malformed: the request passes through, its row is still written
            return MultipartCapture(boundary, max_files=self._max_files)
        path = scope["path"]
        if (self._raw_upload_paths and path.startswith(self._raw_upload_paths)) or (
            self._raw_upload is not None
            and self._failsafe("raw_upload", self._raw_upload, scope, False)
        ):
            name = None
            disposition = _header(scope, b"content-disposition")
            if disposition is not None:
                raw = parse_options_header(disposition)[1].get(b"filename")
                name = raw.decode("utf-8", "replace") if raw else None
            if not name:
                name = path.rstrip("/").rsplit("/", 1)[-1] or None
            declared = content_type.decode("latin-1") if content_type else None
            return RawCapture(name, declared)
        return None

    # --- after the app ----------------------------------------------------------------------

    def _finish(
        self,
        scope: Scope,
        exchange: _Exchange,
        capture: MultipartCapture | RawCapture | None,
        started: float,
        requested_at: datetime,
        entry_root_path: str,
        entry_app: Any,
        error: BaseException | None,
    ) -> tuple[RequestRecord, str | None, list[UploadRecord]] | None:
        """Build and submit the records; ``None`` when the request turned out excluded."""
        if capture is not None:
            capture.close(exchange.body_done)
        if scope.get(EXCLUDED_KEY):
            return None
        end = exchange.end if exchange.end is not None else time.perf_counter()
        route = self._route_template(scope, entry_root_path, entry_app)
        if exchange.api_key_id is not _UNSET:
            key_id = exchange.api_key_id
        else:
            key_id = self._failsafe("api_key_id", self._api_key_id, scope, None)
            if key_id is not None and not isinstance(key_id, uuid.UUID):
                try:
                    key_id = uuid.UUID(str(key_id))
                except ValueError:
                    self._failed(
                        "the api_key_id hook returned a value that is not a UUID", trace=False
                    )
                    key_id = None
        mid_body = exchange.disconnected and not exchange.body_done
        request_error: str | None = None
        if error is not None:
            request_error = _exception_text(error)
        if exchange.disconnected:
            what = "mid-body" if mid_body else "before the response completed"
            request_error = f"client disconnected {what}" + (
                f" ({request_error})" if request_error else ""
            )
        request = RequestRecord._unchecked(
            method=scope.get("method", "GET"),
            path=route if route is not None else scope.get("path", "/"),
            status_code=exchange.status if exchange.status is not None else 500,
            response_time_ms=(end - started) * 1000.0,
            request_size=exchange.received,
            response_size=exchange.sent,
            api_key_id=key_id,
            error_message=request_error,
            requested_at=requested_at,
        )
        if capture is None:
            self.recorder.submit(request)
            return request, route, []
        uploads = self._uploads(scope, exchange, capture, request, error, mid_body)
        self.recorder.submit_many([request, *uploads])
        return request, route, uploads

    def _uploads(
        self,
        scope: Scope,
        exchange: _Exchange,
        capture: MultipartCapture | RawCapture,
        request: RequestRecord,
        error: BaseException | None,
        mid_body: bool,
    ) -> list[UploadRecord]:
        if not capture.files:
            return []
        provider = exchange.provider
        if provider is _UNSET:
            provider = self._provider
            if not isinstance(provider, str):
                provider = self._failsafe("provider", provider, scope, None)
                if provider is not None and not isinstance(provider, str):
                    self._failed("the provider hook returned a non-str", trace=False)
                    provider = None
                provider = (provider or "unknown")[:_MAX_PROVIDER]
        status = request.status_code if exchange.status is not None else None
        uploads: list[UploadRecord] = []
        for file in capture.files:
            reason: str | None = None
            if error is not None:
                reason = request.error_message
            elif mid_body:
                reason = "client disconnected mid-body"
            elif status is None:
                reason = "no response was sent"
            elif status >= 400:
                reason = f"HTTP {status}"
            elif not file.complete:
                reason = "incomplete file: " + (capture.error or "the app did not read it all")
            upload_status: UploadStatus = "failed" if reason else "success"
            if exchange.upload_status is not _UNSET:
                upload_status = exchange.upload_status
                if upload_status == "success":
                    reason = None
                elif reason is None:
                    reason = "marked failed by the application"
            if exchange.error_message is not _UNSET:
                reason = exchange.error_message
            try:
                uploads.append(
                    UploadRecord(
                        provider=provider,
                        file_type=file.file_type,
                        declared_type=file.declared_type,
                        file_size=file.size,
                        upload_status=upload_status,
                        error_message=reason,
                        api_key_id=request.api_key_id,
                        request_id=request.id,
                        file_name=file.file_name if self._record_file_names else None,
                        uploaded_at=file.finished_at or datetime.now(UTC),
                    )
                )
            except ValueError:
                self._failed("building an upload record")
        return uploads

    def _route_template(self, scope: Scope, entry_root_path: str, entry_app: Any) -> str | None:
        """The matched route's path template, with the templates of the mounts above it."""
        route = scope.get("route")
        if route is None:
            return None
        cached = self._routes.get(id(route))
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
        if len(self._routes) < _ROUTE_CACHE_SIZE:
            self._routes[id(route)] = (route, template)
        return template

    # --- lifespan ---------------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def receive_() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self._start(lazily=False)
            return message

        async def send_(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self._stop()
            await send(message)

        await self.app(scope, receive_, send_)

    async def _start(self, *, lazily: bool) -> None:
        if self._started:
            return
        self._started = True
        try:
            await anyio.to_thread.run_sync(self.recorder.start)
        except Exception:
            self._started = False
            self._failed("starting the recorder")
            return
        if lazily and not self._atexit_registered:
            # No lifespan: nothing will tell us about shutdown, so flush at interpreter exit.
            self._atexit_registered = True
            atexit.register(_shutdown_at_exit, weakref.ref(self.recorder), self._shutdown_timeout)

    async def _stop(self) -> None:
        self._started = False
        try:
            await anyio.to_thread.run_sync(self.recorder.shutdown, self._shutdown_timeout)
        except Exception:
            self._failed("shutting the recorder down")

    # --- failure handling -------------------------------------------------------------------

    def _failsafe(self, name: str, hook: Callable[[Scope], T], scope: Scope, default: T) -> T:
        try:
            return hook(scope)
        except Exception as exc:
            # The type only: a hook's message could quote the raw API key.
            self._failures += 1
            logger.warning(
                "usage-middleware: the %s hook raised %s; ignored", name, type(exc).__name__
            )
            return default

    def _failed(self, what: str, *, trace: bool = True) -> None:
        self._failures += 1
        logger.error(
            "usage-middleware: failure while %s; the request is unaffected", what, exc_info=trace
        )


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


def _shutdown_at_exit(ref: weakref.ReferenceType[Any], timeout: float) -> None:
    recorder = ref()
    if recorder is not None:
        try:
            recorder.shutdown(timeout)
        except Exception:
            logger.exception("usage-middleware: flushing at exit failed")
