"""UsageMiddleware: a pure ASGI middleware that times requests and captures uploads.

Per request it wraps ``receive`` (count body bytes, feed the upload capture) and ``send`` (status
at ``http.response.start``, bytes summed over body messages, the clock stopped at the last body
message), runs the app, and afterwards — never on the way in or out of a message — turns what it
saw into one ``RequestRecord`` plus one ``UploadRecord`` per file and hands them to the recorder,
which writes them in the background. The request never waits for the database.

Per request: a ``Exchange`` object counts what passes and its bound methods are the wrapped
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

The module keeps one request's whole path, from the scope to its rows, in one class, so the
hot path reads top to bottom; what stands alone lives beside it (exchange, routes, multipart,
sniff, annotate).
"""

from __future__ import annotations

import atexit
import logging
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio.to_thread
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._errors import ConfigurationError
from .._keys import key_from_headers
from .._recording.compact import new_request_item
from .._recording.recorder import Recorder
from .._records import RequestRecord, UploadRecord, UploadStatus
from .._telemetry import CaptureTelemetry
from .annotate import SCOPE_KEY, annotate
from .exchange import Capture, Exchange, header
from .multipart import MultipartCapture, RawCapture, multipart_boundary, parse_options_header
from .routes import RouteTemplates

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from .._store import UsageStore

__all__ = ["EXCLUDED_KEY", "SCOPE_KEY", "UsageMiddleware", "annotate"]

logger = logging.getLogger(__name__)

UTC = timezone.utc
EXCLUDED_KEY = "usage_middleware.excluded"
"""Set (truthy) in the scope by anything that wants its request left unrecorded (the router)."""

_DEFAULT_MAX_FILES = 1000
# Parts parsed per multipart request beyond max_files_per_request: Starlette's default
# ``max_fields``, so a form Starlette accepts is parsed whole and a flood of fields is not.
_MAX_FIELDS = 1000
_DEFAULT_SHUTDOWN_TIMEOUT = 10.0
_UPLOAD_METHODS = frozenset({"POST", "PUT", "PATCH"})
_UNSET: Any = object()
_MAX_PROVIDER = 64

T = TypeVar("T")
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
        # A request with no upload goes to our own recorder as the tuple its queue holds (no
        # record made); any other recorder (a subclass may override submit) gets records.
        self._submit_request: Callable[[Any], Any] = recorder.submit
        self._new_request: Callable[..., object] = _request_row
        if type(recorder) is Recorder:
            self._submit_request = recorder.submit_item
            self._new_request = new_request_item
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
        self._routes = RouteTemplates()
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
        exchange = Exchange(receive, send, None)
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
                    scope, exchange, notes, started, requested_at, root_path, entry_app, error,
                    make=self._new_request,
                )  # fmt: skip
                if request is not None:
                    self._submit_request(request)
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
        exchange = Exchange(receive, send, capture)
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
                template = self._routes.template(scope, root_path, entry_app)
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
                    make=_request_row,
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
            content_type = header(scope, b"content-type")
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
                disposition = header(scope, b"content-disposition")
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
        exchange: Exchange,
        notes: dict[str, Any],
        started: float,
        requested_at: datetime,
        root_path: str,
        entry_app: Any,
        error: BaseException | None,
        template: Any = _UNSET,
        *,
        make: Callable[..., T],
    ) -> T | None:
        """The request's row (``None`` when it turned out excluded), from values produced here:
        built unchecked, ``store.write`` validates it. ``template``: the route template when the
        caller already resolved it (the upload path needs it too). ``make``: what builds it
        from the values (a record: ``_request_row``; the recorder's queue item)."""
        if scope.get(EXCLUDED_KEY):
            return None
        end = exchange.end
        if end is None:
            end = perf_counter()
        if template is _UNSET:
            template = None
            route = scope.get("route")
            if route is not None:
                template = self._routes.cached(route)
                if template is None:
                    template = self._routes.template(scope, root_path, entry_app)
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
        return make(
            scope.get("method", "GET"),
            template if template is not None else scope.get("path", "/"),
            status if status is not None else 500,
            (end - started) * 1000.0,
            exchange.received,
            exchange.sent,
            key_id,
            exchange.error_text(error) if error is not None or exchange.disconnected else None,
            requested_at,
            template is not None,
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
        exchange: Exchange,
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


def _shutdown_at_exit(ref: weakref.ReferenceType[Any], timeout: float) -> None:
    recorder = ref()
    if recorder is not None:
        try:
            recorder.shutdown(timeout)
        except Exception:
            logger.exception("usage-middleware: flushing at exit failed")
