"""OpenTelemetry from capture: our span or the server's, file events, upload metrics."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from test_middleware_helpers import HTML, JPEG, drive, multipart, request, starlette_app

RAW_KEY = "sk_live_TELEMETRY_SECRET"


class Otel:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def metrics(self) -> dict[str, list[Any]]:
        data = self.reader.get_metrics_data()
        out: dict[str, list[Any]] = {}
        if data is None:  # nothing was ever recorded
            return out
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    out[metric.name] = list(metric.data.data_points)
        return out


@pytest.fixture
def otel() -> Iterator[Otel]:
    o = Otel()
    yield o
    o.tracer_provider.shutdown()
    o.meter_provider.shutdown()


def upload_body() -> tuple[bytes, dict[str, str]]:
    body, headers = multipart(
        [("a", "cat.png", "image/png", JPEG), ("b", "page.jpg", "image/jpeg", HTML)]
    )
    return body, {**dict((k.decode(), v.decode()) for k, v in headers), "x-api-key": RAW_KEY}


def test_upload_request_gets_its_own_span_with_file_events(otel: Otel) -> None:
    """Without a server span, an upload request is covered by our span with one event per file."""
    app, recorder = starlette_app(
        tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider
    )
    body, headers = upload_body()
    request(app, "POST", "/upload?provider=vercel", content=body, headers=headers)
    [span] = otel.exporter.get_finished_spans()
    assert span.name == "upload POST /upload"
    assert span.kind == SpanKind.INTERNAL
    attrs = dict(span.attributes or {})
    assert attrs["http.request.method"] == "POST"
    assert attrs["http.route"] == "/upload"
    assert attrs["http.response.status_code"] == 200
    assert attrs["http.request.body.size"] == len(body)
    assert attrs["usage.upload.count"] == 2
    assert attrs["usage.upload.bytes"] == len(JPEG) + len(HTML)
    assert attrs["usage.provider"] == "vercel"
    assert attrs["usage.api_key_id"] == str(recorder.requests[0].api_key_id)
    events = [dict(e.attributes or {}) for e in span.events]
    assert [(e["usage.file.type"], e.get("usage.file.declared_type")) for e in events] == [
        ("image/jpeg", "image/png"),
        ("text/html", "image/jpeg"),
    ]
    assert events[0]["file.size"] == len(JPEG)
    assert "file.name" not in events[0] and "file.extension" not in events[0]
    assert RAW_KEY not in repr([span.to_json()])


def test_file_names_reach_spans_only_when_opted_in(otel: Otel) -> None:
    """With record_file_names=True the file events carry file.name and file.extension."""
    app, _ = starlette_app(tracer_provider=otel.tracer_provider, record_file_names=True)
    body, headers = upload_body()
    request(app, "POST", "/upload", content=body, headers=headers)
    [span] = otel.exporter.get_finished_spans()
    event = dict(span.events[0].attributes or {})
    assert (event["file.name"], event["file.extension"]) == ("cat.png", "png")


def test_attributes_go_on_the_current_server_span_when_there_is_one(otel: Otel) -> None:
    """Inside a recording server span, capture annotates it instead of starting a span."""
    app, _ = starlette_app(tracer_provider=otel.tracer_provider)
    body, headers = upload_body()
    tracer = otel.tracer_provider.get_tracer("server")
    raw_headers = [(k.encode(), v.encode()) for k, v in headers.items()]

    async def serve() -> None:
        with tracer.start_as_current_span("POST", kind=SpanKind.SERVER):
            await drive(app, "POST", "/upload", raw_headers, [body])

    anyio.run(serve)
    [span] = otel.exporter.get_finished_spans()
    assert span.name == "POST"
    assert span.kind == SpanKind.SERVER
    assert dict(span.attributes or {})["usage.upload.count"] == 2
    assert len(span.events) == 2


def test_failed_upload_span_has_error_status(otel: Otel) -> None:
    """An endpoint exception sets the span's status to error with the exception type."""
    app, _ = starlette_app(tracer_provider=otel.tracer_provider)
    body, headers = upload_body()
    raw_headers = [(k.encode(), v.encode()) for k, v in headers.items()]
    anyio.run(drive, app, "POST", "/upload?raise=1", raw_headers, [body])
    [span] = otel.exporter.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == "RuntimeError"
    assert {dict(e.attributes or {})["usage.upload.status"] for e in span.events} == {"failed"}


def test_upload_metrics_count_files_and_sizes(otel: Otel) -> None:
    """The uploads counter and size histogram see each file with provider, type and status."""
    app, _ = starlette_app(meter_provider=otel.meter_provider, provider="s3")
    body, headers = upload_body()
    for _ in range(3):
        request(app, "POST", "/upload", content=body, headers=headers)
    metrics = otel.metrics()
    counts = {
        (p.attributes["usage.file.type"], p.attributes["usage.upload.status"]): p.value
        for p in metrics["usage.uploads"]
    }
    assert counts == {("image/jpeg", "success"): 3, ("text/html", "success"): 3}
    assert {p.attributes["usage.provider"] for p in metrics["usage.uploads"]} == {"s3"}
    sizes = {
        p.attributes["usage.file.type"]: (p.count, p.sum) for p in metrics["usage.upload.size"]
    }
    assert sizes["image/jpeg"] == (3, 3 * len(JPEG))


def test_unknown_declared_types_do_not_explode_metric_labels(otel: Otel) -> None:
    """A made-up declared type is labelled 'other' in metrics (bounded cardinality)."""
    app, recorder = starlette_app(meter_provider=otel.meter_provider)
    body, headers = multipart([("a", "x", "application/x-made-up-12345", b"\x00\x01binary")])
    request(
        app,
        "POST",
        "/upload",
        content=body,
        headers=dict((k.decode(), v.decode()) for k, v in headers),
    )
    assert recorder.uploads[0].file_type == "application/x-made-up-12345"
    [point] = otel.metrics()["usage.uploads"]
    assert point.attributes["usage.file.type"] == "other"


def test_plain_requests_make_no_spans(otel: Otel) -> None:
    """A GET is recorded but costs no telemetry: no span, no metric."""
    app, recorder = starlette_app(
        tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider
    )
    request(app, "GET", "/items/1")
    assert len(recorder.requests) == 1
    assert otel.exporter.get_finished_spans() == ()
    assert "usage.uploads" not in otel.metrics()


def test_without_an_sdk_uploads_are_recorded_and_no_context_leaks() -> None:
    """With the API's no-op providers capture still works and leaves no span current."""
    app, recorder = starlette_app(tracer_provider=trace.NoOpTracerProvider())
    body, headers = upload_body()
    request(app, "POST", "/upload", content=body, headers=headers)
    assert len(recorder.uploads) == 2
    assert not trace.get_current_span().is_recording()
