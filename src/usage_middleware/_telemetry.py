"""OpenTelemetry for capture: span attributes, a span of our own, upload metrics.

Only ``opentelemetry-api`` is needed. Work happens on upload requests only, never on a plain
GET: the current span is used when it is recording (the server span of an instrumented app);
otherwise, when an SDK is configured, an ``upload`` span of our own covers the request (the app's
own spans nest under it). With no SDK every call lands on the API's no-op objects, whose
instruments are created once here, so the cost is a few attribute lookups per upload request.

Names follow the semantic conventions where they exist (``http.request.method``, ``http.route``,
``http.response.status_code``, ``http.request.body.size``, ``file.size``, ``file.extension``,
``error.type``); ours live under ``usage.*``. The raw API key never appears, only its id.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import context, metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from ._capture.sniff import known_type

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, TracerProvider

    from ._records import RequestRecord, UploadRecord

__all__ = ["CaptureTelemetry"]

_NAME = "usage_middleware"
_SIZE_BUCKETS: Sequence[float] = [
    0,
    1024,
    16 * 1024,
    256 * 1024,
    1024**2,
    4 * 1024**2,
    16 * 1024**2,
    64 * 1024**2,
    256 * 1024**2,
    1024**3,
    4 * 1024**3,
]


def _version() -> str:
    from . import __version__

    return __version__


class CaptureTelemetry:
    """Tracer and instruments, created once per middleware."""

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        version = _version()
        self.tracer = trace.get_tracer(_NAME, version, tracer_provider=tracer_provider)
        meter = metrics.get_meter(_NAME, version, meter_provider=meter_provider)
        self.uploads = meter.create_counter(
            "usage.uploads",
            unit="{file}",
            description="Files captured from upload requests, by provider, type and status.",
        )
        self.upload_size = meter.create_histogram(
            "usage.upload.size",
            unit="By",
            description="Size of captured files as received.",
            explicit_bucket_boundaries_advisory=_SIZE_BUCKETS,
        )

    def begin(self, method: str) -> tuple[Span | None, Any]:
        """The span to annotate for an upload request, and a context token if we started one.

        Returns ``(None, None)`` when nothing records (no SDK): the caller then skips all span
        work for the request.
        """
        current = trace.get_current_span()
        if current.is_recording():
            return current, None
        span = self.tracer.start_span("upload", kind=SpanKind.INTERNAL)
        if not span.is_recording():
            return None, None
        span.set_attribute("http.request.method", method)
        return span, context.attach(trace.set_span_in_context(span))

    def finish(
        self,
        span: Span | None,
        token: Any,
        request: RequestRecord,
        route: str | None,
        uploads: Sequence[UploadRecord],
        record_file_names: bool,
        exc: BaseException | None,
    ) -> None:
        """Metrics for each file, then attributes and events on the span (ending ours)."""
        try:
            self._record(span, token, request, route, uploads, record_file_names, exc)
        finally:
            self.discard(span, token)

    def discard(self, span: Span | None, token: Any) -> None:
        """End our span (if we started one) and restore the context; records nothing more."""
        if token is not None:
            context.detach(token)
            if span is not None:
                span.end()

    def _record(
        self,
        span: Span | None,
        token: Any,
        request: RequestRecord,
        route: str | None,
        uploads: Sequence[UploadRecord],
        record_file_names: bool,
        exc: BaseException | None,
    ) -> None:
        for upload in uploads:
            attributes = {
                "usage.provider": upload.provider,
                "usage.file.type": upload.file_type if known_type(upload.file_type) else "other",
                "usage.upload.status": upload.upload_status,
            }
            self.uploads.add(1, attributes)
            self.upload_size.record(upload.file_size, attributes)
        if span is None:
            return
        attrs: dict[str, Any] = {
            "http.response.status_code": request.status_code,
            "http.request.body.size": request.request_size,
            "usage.upload.count": len(uploads),
            "usage.upload.bytes": sum(u.file_size for u in uploads),
        }
        if route is not None:
            attrs["http.route"] = route
        if request.api_key_id is not None:
            attrs["usage.api_key_id"] = str(request.api_key_id)
        if uploads:
            attrs["usage.provider"] = uploads[0].provider
        span.set_attributes(attrs)
        for upload in uploads:
            event: dict[str, Any] = {
                "file.size": upload.file_size,
                "usage.file.type": upload.file_type,
                "usage.upload.status": upload.upload_status,
            }
            if upload.declared_type is not None:
                event["usage.file.declared_type"] = upload.declared_type
            if upload.error_message is not None:
                event["usage.error_message"] = upload.error_message
            if upload.file_name:
                extension = os.path.splitext(upload.file_name)[1].lstrip(".").lower()
                if extension:
                    event["file.extension"] = extension[:16]
                if record_file_names:
                    event["file.name"] = upload.file_name
            span.add_event("usage.file", event)
        if token is None:
            return  # the server span belongs to its instrumentation: it sets status and ends it
        span.update_name(f"upload {request.method} {route}" if route else "upload")
        if request.status_code >= 500 or exc is not None:
            if exc is not None:
                span.set_attribute("error.type", type(exc).__qualname__)
            span.set_status(Status(StatusCode.ERROR))
