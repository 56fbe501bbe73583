"""UsageMiddleware: a pure ASGI middleware that times requests and captures uploads.

Per request it wraps ``receive`` (count body bytes, feed the upload capture) and ``send`` (status
at ``http.response.start``, bytes summed over body messages, the clock stopped at the last body
message), runs the app, and afterwards — never on the way in or out of a message — turns what it
saw into one ``RequestRecord`` plus one ``UploadRecord`` per file and hands them to the recorder,
which writes them in the background. The request never waits for the database.

Per request: a ``_Exchange`` object counts what passes and its bound methods are the wrapped
``receive`` and ``send`` (``send`` returns the server's own awaitable for every message but the
last body message, so a plain GET costs one coroutine of ours, not one per message); a plain
dict stored in the scope under ``SCOPE_KEY`` takes what ``annotate()`` sets (inner scope copies
are shallow, so it is found from any endpoint). The exchange holds the server's callables and is
never reachable from the scope, so no request leaves a reference cycle behind. Nothing per
request is kept on the middleware. User hooks are guarded: a hook that raises is logged (its
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
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime, timezone
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio.to_thread
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._capture import MultipartCapture, RawCapture, multipart_boundary, parse_options_header
from ._errors import ConfigurationError
from ._keys import key_from_headers
from ._recording.recorder import Recorder
from ._records import RequestRecord, UploadRecord, UploadStatus
from ._telemetry import CaptureTelemetry

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from ._store import UsageStore

__all__ = ["EXCLUDED_KEY", "SCOPE_KEY", "UsageMiddleware", "annotate"]

logger = logging.getLogger(__name__)

UTC = timezone.utc
SCOPE_KEY = "usage_middleware.notes"
"""Scope key of the per-request dict ``annotate()`` writes to."""
EXCLUDED_KEY = "usage_middleware.excluded"
"""Set (truthy) in the scope by anything that wants its request left unrecorded (the router)."""

_DEFAULT_MAX_FILES = 1000
# Parts parsed per multipart request beyond max_files_per_request: Starlette's default
# ``max_fields``, so a form Starlette accepts is parsed whole and a flood of fields is not.
_MAX_FIELDS = 1000
_DEFAULT_SHUTDOWN_TIMEOUT = 10.0
_ROUTE_CACHE_SIZE = 4096
_UPLOAD_METHODS = frozenset({"POST", "PUT", "PATCH"})
_ANNOTATABLE = ("provider", "api_key_id", "upload_status", "error_message")
_UNSET: Any = object()
_MAX_PROVIDER = 64

T = TypeVar("T")
Capture = MultipartCapture | RawCapture
_UUID = uuid.UUID
_now = datetime.now
_request_row = RequestRecord._unchecked
_upload_row = UploadRecord._unchecked


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
    notes = scope.get(SCOPE_KEY)
    if notes is None:
        logger.debug("annotate(): no UsageMiddleware in front of this request; ignored")
        return
    notes.update(checked)


# --- per request --------------------------------------------------------------------------------


class _Exchange:
    """One request's state: counters from the messages and its upload capture; its bound
    ``receive``/``send`` are what the app is given.

    It holds the server's ``send`` (and so, in uvicorn, the server's per-request object, which
    holds the scope): it must never be reachable from the scope, or every request would leave a
    reference cycle for the garbage collector.
    """

    __slots__ = (
        "_receive",
        "_send",
        "body_done",
        "capture",
        "disconnected",
        "end",
        "handed_over",
        "received",
        "sent",
        "status",
    )

    def __init__(self, receive: Receive, send: Send, capture: Capture | None) -> None:
        self._receive = receive
        self._send = send
        self.capture = capture
        self.received = 0
        self.sent = 0
        self.status: int | None = None
        self.end: float | None = None  # perf_counter() once the last body message was sent
        # Set before the last body message is awaited: a disconnect the server reports while
        # that send is in progress (ASGI < 2.4 servers listen for one meanwhile) is no failure.
        self.handed_over = False
        self.body_done = False
        self.disconnected = False

    async def receive(self) -> Message:
        message = await self._receive()
        kind = message["type"]
        if kind == "http.request":
            body = message.get("body", b"")
            if body:
                self.received += len(body)
                if self.capture is not None:
                    self.capture.feed(body)
            if not message.get("more_body", False):
                self.body_done = True
        elif kind == "http.disconnect" and not self.handed_over:
            self.disconnected = True
        return message

    def send(self, message: Message) -> Awaitable[None]:
        """Count, then return the server's own awaitable: no coroutine of ours per message,
        except around the last one, after which the clock stops."""
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
        elif kind == "http.response.body":
            body = message.get("body", b"")
            if body:
                self.sent += len(body)
            if not message.get("more_body", False):
                return self._send_last(message)
        elif kind == "http.response.pathsend":
            return self._send_file(message)
        return self._send(message)

    async def _send_last(self, message: Message) -> None:
        self.handed_over = True
        await self._send(message)
        self.end = perf_counter()

    async def _send_file(self, message: Message) -> None:
        self.handed_over = True
        await self._send(message)
        self.end = perf_counter()
        with contextlib.suppress(OSError):
            self.sent += os.path.getsize(message["path"])

    def error_text(self, error: BaseException | None) -> str | None:
        """The request's ``error_message``: the exception, and whether the client went away."""
        text = None
        if error is not None:
            message = str(error)
            text = f"{type(error).__name__}: {message}" if message else type(error).__name__
        if self.disconnected:
            what = "mid-body" if not self.body_done else "before the response completed"
            text = f"client disconnected {what}" + (f" ({text})" if text else "")
        return text


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
    ``record_file_names=True``. At most ``max_files_per_request`` files are recorded per request;
    parsing stops at the next file part, or after ``max_files_per_request + 1000`` parts.
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
        self._requests_capped = 0

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
        """Capture failures so far (each was logged), requests whose parsing stopped at the
        file or part cap (the rest of their body was not looked at), and the recorder's own
        stats, if any."""
        stats = getattr(self.recorder, "stats", None)
        return {
            "capture_failures": self._failures,
            "requests_capped": self._requests_capped,
            "recorder": stats() if stats else None,
        }

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
        if scope.get("method") in _UPLOAD_METHODS:
            capture = self._capture_for(scope)
            if capture is not None:
                await self._call_with_upload(scope, receive, send, capture)
                return
        started = perf_counter()
        requested_at = _now(UTC)
        exchange = _Exchange(receive, send, None)
        notes: dict[str, Any] = {}
        scope[SCOPE_KEY] = notes
        # The router rewrites these in place on the way in; route templates need the originals.
        root_path = scope.get("root_path", "")
        entry_app = scope.get("app", self.app)
        error: BaseException | None = None
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except BaseException as exc:
            error = exc
            raise
        finally:
            try:
                request = self._request(
                    scope, exchange, notes, started, requested_at, root_path, entry_app, error
                )
                if request is not None:
                    self.recorder.submit(request)
            except Exception:
                self._failed("recording a request")

    async def _call_with_upload(
        self, scope: Scope, receive: Receive, send: Send, capture: Capture
    ) -> None:
        """``__call__`` for a request whose body is captured: upload rows and telemetry too."""
        started = perf_counter()
        requested_at = _now(UTC)
        span = token = None
        try:
            span, token = self._telemetry.begin(scope["method"])
        except Exception:
            self._failed("starting the upload span")
        exchange = _Exchange(receive, send, capture)
        notes: dict[str, Any] = {}
        scope[SCOPE_KEY] = notes
        root_path = scope.get("root_path", "")
        entry_app = scope.get("app", self.app)
        error: BaseException | None = None
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except BaseException as exc:
            error = exc
            raise
        finally:
            recorded: tuple[RequestRecord, str | None, list[UploadRecord]] | None = None
            try:
                capture.close(exchange.body_done)
                template = self._route_template(scope, root_path, entry_app)
                request = self._request(
                    scope,
                    exchange,
                    notes,
                    started,
                    requested_at,
                    root_path,
                    entry_app,
                    error,
                    template,
                )
                if request is not None:
                    uploads = self._uploads(
                        scope, exchange, notes, capture, request, template, error
                    )
                    self.recorder.submit_many([request, *uploads])
                    recorded = request, template, uploads
            except Exception:
                self._failed("recording a request")
            try:
                if recorded is None:
                    self._telemetry.discard(span, token)
                else:
                    request, template, uploads = recorded
                    self._telemetry.finish(
                        span, token, request, template, uploads, self._record_file_names, error
                    )
            except Exception:
                self._failed("recording upload telemetry")

    def _capture_for(self, scope: Scope) -> Capture | None:
        """The capture for an upload method's body, or ``None`` when the body is no upload."""
        try:
            content_type = _header(scope, b"content-type")
            # Starlette strips spaces and tabs around the type and ignores its case.
            if (
                content_type is not None
                and content_type.lstrip(b" \t")[:19].lower() == b"multipart/form-data"
            ):
                boundary = multipart_boundary(content_type)
                if boundary is None:
                    return None  # malformed: the request passes through, its row is still written
                return MultipartCapture(
                    boundary, max_files=self._max_files, max_parts=self._max_files + _MAX_FIELDS
                )
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
        except Exception:
            self._failed("setting up the upload capture")
        return None

    # --- after the app ----------------------------------------------------------------------

    def _request(
        self,
        scope: Scope,
        exchange: _Exchange,
        notes: dict[str, Any],
        started: float,
        requested_at: datetime,
        root_path: str,
        entry_app: Any,
        error: BaseException | None,
        template: Any = _UNSET,
    ) -> RequestRecord | None:
        """The request's row (``None`` when it turned out excluded), from values produced here:
        built unchecked, ``store.write`` validates it. ``template``: the route template when the
        caller already resolved it (the upload path needs it too)."""
        if scope.get(EXCLUDED_KEY):
            return None
        end = exchange.end
        if end is None:
            end = perf_counter()
        if template is _UNSET:
            template = None
            route = scope.get("route")
            if route is not None:
                cached = self._routes.get(id(route))
                template = cached[1] if cached is not None and cached[0] is route else None
                if template is None:
                    template = self._route_template(scope, root_path, entry_app)
        if notes and "api_key_id" in notes:
            key_id = notes["api_key_id"]
        else:
            try:
                key_id = self._api_key_id(scope)
            except Exception as exc:
                self._hook_failed("api_key_id", exc)
                key_id = None
            if key_id is not None and type(key_id) is not _UUID:
                key_id = self._coerce_key_id(key_id)
        status = exchange.status
        return _request_row(
            scope.get("method", "GET"),
            template if template is not None else scope.get("path", "/"),
            status if status is not None else 500,
            (end - started) * 1000.0,
            exchange.received,
            exchange.sent,
            key_id,
            exchange.error_text(error) if error is not None or exchange.disconnected else None,
            requested_at,
        )

    def _coerce_key_id(self, value: Any) -> uuid.UUID | None:
        if isinstance(value, uuid.UUID):
            return uuid.UUID(int=value.int)
        try:
            return uuid.UUID(str(value))
        except ValueError:
            self._failed("the api_key_id hook returned a value that is not a UUID", trace=False)
            return None

    def _uploads(
        self,
        scope: Scope,
        exchange: _Exchange,
        notes: dict[str, Any],
        capture: Capture,
        request: RequestRecord,
        template: str | None,
        error: BaseException | None,
    ) -> list[UploadRecord]:
        if capture.capped:
            self._requests_capped += 1
            logger.warning(
                "usage-middleware: a %s %s request has %s; the rest of its body was not parsed "
                "(max_files_per_request=%d)",
                request.method,
                template or "(unmatched route)",
                capture.error,
                self._max_files,
            )
        if not capture.files:
            return []
        provider = notes.get("provider", _UNSET)
        if provider is _UNSET:
            provider = self._provider
            if not isinstance(provider, str):
                provider = self._failsafe("provider", provider, scope, None)
                if provider is not None and not isinstance(provider, str):
                    self._failed("the provider hook returned a non-str", trace=False)
                    provider = None
                provider = (provider or "unknown")[:_MAX_PROVIDER]
        status = exchange.status
        reason_for_all: str | None = None
        if error is not None:
            reason_for_all = request.error_message
        elif exchange.disconnected and not exchange.body_done:
            reason_for_all = "client disconnected mid-body"
        elif status is None:
            reason_for_all = "no response was sent"
        elif not 200 <= status <= 299:
            reason_for_all = f"HTTP {status}"
        annotated_status = notes.get("upload_status", _UNSET)
        annotated_error = notes.get("error_message", _UNSET)
        uploads: list[UploadRecord] = []
        for file in capture.files:
            reason = reason_for_all
            if reason is None and not file.complete:
                reason = "incomplete file: " + (capture.error or "the app did not read it all")
            upload_status: UploadStatus = "failed" if reason else "success"
            if annotated_status is not _UNSET:
                upload_status = annotated_status
                if upload_status == "success":
                    reason = None
                elif reason is None:
                    reason = "marked failed by the application"
            if annotated_error is not _UNSET:
                reason = annotated_error
            try:
                uploads.append(
                    _upload_row(
                        provider,
                        file.file_type,
                        file.declared_type,
                        file.size,
                        upload_status,
                        reason,
                        request.api_key_id,
                        request.id,
                        file.file_name if self._record_file_names else None,
                        file.finished_at or _now(UTC),
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
            self._hook_failed(name, exc)
            return default

    def _hook_failed(self, name: str, exc: Exception) -> None:
        # The type only: a hook's message could quote the raw API key.
        self._failures += 1
        logger.warning("usage-middleware: the %s hook raised %s; ignored", name, type(exc).__name__)

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
