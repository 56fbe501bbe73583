"""The example upload API end to end, in process: uploads land as rows, the dashboard is scoped."""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import select

from usage_middleware import UsageStore
from usage_middleware._schema import api_requests, file_uploads

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "test-admin-key"
ACME = "demo-key-acme"
ACME_ID = uuid.UUID("00000000-de30-4000-8000-000000000001")
GLOBEX = "demo-key-globex"
GLOBEX_ID = uuid.UUID("00000000-de30-4000-8000-000000000002")
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200
PDF = b"%PDF-1.7\n" + b"x" * 1000


def load_example() -> ModuleType:
    """Import ``examples/fastapi_app/app.py`` (not a package) under a private name."""
    spec = importlib.util.spec_from_file_location(
        "usage_example_app", ROOT / "examples" / "fastapi_app" / "app.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = load_example()


class AppClient:
    """Synchronous calls into the ASGI app through httpx's ASGI transport (no network)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://test", follow_redirects=True
            ) as client:
                return await client.request(method, url, **kwargs)

        return anyio.run(go)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)


@pytest.fixture
def app_client(db_url: str, tmp_path: Path) -> Iterator[tuple[AppClient, Path, UsageStore]]:
    app = example.create_app(database_url=db_url, storage_dir=tmp_path / "files", admin_key=ADMIN)
    store: UsageStore = app.state.store
    try:
        yield AppClient(app), tmp_path / "files", store
    finally:
        for recorder in store.recorders:
            recorder.shutdown(10)
        store.dispose()


def flushed_rows(store: UsageStore, table: Any) -> list[Any]:
    for recorder in store.recorders:
        assert recorder.force_flush(10)
    with store.engine.connect() as conn:
        return list(conn.execute(select(table)).mappings())


def test_upload_many_files_records_one_row_each(
    app_client: tuple[AppClient, Path, UsageStore],
) -> None:
    """Three files to cloudinary give three successful rows with the caller's key and provider."""
    client, files_dir, store = app_client
    response = client.post(
        "/api/upload",
        headers={"x-api-key": ACME},
        data={"provider": "cloudinary"},
        files=[
            ("files", ("a.png", PNG, "image/png")),
            ("files", ("b.png", PNG + b"more", "image/png")),
            ("files", ("c.pdf", PDF, "application/pdf")),
        ],
    )
    assert response.status_code == 201, response.text
    assert [f["size"] for f in response.json()["files"]] == [len(PNG), len(PNG) + 4, len(PDF)]
    stored = sorted(p.name.split("-", 1)[1] for p in (files_dir / "cloudinary").rglob("*.*"))
    assert stored == ["a.png", "b.png", "c.pdf"]

    rows = sorted(flushed_rows(store, file_uploads), key=lambda r: r["file_name"])
    assert [(r["file_name"], r["file_type"], r["file_size"]) for r in rows] == [
        ("a.png", "image/png", len(PNG)),
        ("b.png", "image/png", len(PNG) + 4),
        ("c.pdf", "application/pdf", len(PDF)),
    ]
    assert {(r["provider"], r["upload_status"], r["api_key_id"]) for r in rows} == {
        ("cloudinary", "success", ACME_ID)
    }
    (request,) = flushed_rows(store, api_requests)
    assert (request["path"], request["status_code"], request["api_key_id"]) == (
        "/api/upload",
        201,
        ACME_ID,
    )
    assert {r["request_id"] for r in rows} == {request["id"]}


def test_provider_from_header_and_bearer_key(
    app_client: tuple[AppClient, Path, UsageStore],
) -> None:
    """The provider may come from ``x-storage-provider`` and the key from a bearer token."""
    client, _, store = app_client
    response = client.post(
        "/api/upload",
        headers={"authorization": f"Bearer {GLOBEX}", "x-storage-provider": "s3"},
        files=[("files", ("doc.pdf", PDF, "application/pdf"))],
    )
    assert response.status_code == 201, response.text
    (row,) = flushed_rows(store, file_uploads)
    assert (row["provider"], row["api_key_id"]) == ("s3", GLOBEX_ID)
    assert row["upload_status"] == "success"


def test_missing_or_unknown_key_is_401_and_recorded_without_key(
    app_client: tuple[AppClient, Path, UsageStore],
) -> None:
    """Uploads without a known key are refused, stored nowhere, and recorded as failed, keyless."""
    client, files_dir, store = app_client
    for headers in ({}, {"x-api-key": "not-a-key"}):
        response = client.post(
            "/api/upload", headers=headers, files=[("files", ("a.png", PNG, "image/png"))]
        )
        assert response.status_code == 401
    assert not files_dir.exists() or not any(files_dir.rglob("*.*"))
    rows = flushed_rows(store, file_uploads)
    assert len(rows) == 2
    assert {(r["upload_status"], r["api_key_id"], r["error_message"]) for r in rows} == {
        ("failed", None, "missing or unknown API key")
    }


def test_file_over_provider_limit_fails_the_upload(
    app_client: tuple[AppClient, Path, UsageStore],
) -> None:
    """A file over vercel's 4.5 MB limit gives 413, stores nothing and records the reason."""
    client, files_dir, store = app_client
    big = b"\x00" * 4_600_000
    response = client.post(
        "/api/upload",
        headers={"x-api-key": ACME},
        data={"provider": "vercel"},
        files=[("files", ("small.png", PNG, "image/png")), ("files", ("big.bin", big, None))],
    )
    assert response.status_code == 413
    assert not files_dir.exists() or not any(files_dir.rglob("*.*"))
    rows = sorted(flushed_rows(store, file_uploads), key=lambda r: r["file_size"])
    assert [(r["file_size"], r["provider"], r["upload_status"]) for r in rows] == [
        (len(PNG), "vercel", "failed"),
        (len(big), "vercel", "failed"),
    ]
    assert rows[0]["error_message"] == "big.bin is 4,600,000 bytes; vercel takes at most 4,500,000"


def test_unknown_provider_is_400(app_client: tuple[AppClient, Path, UsageStore]) -> None:
    """An unknown provider name is a client error naming the valid ones."""
    client, _, store = app_client
    response = client.post(
        "/api/upload",
        headers={"x-api-key": ACME},
        data={"provider": "ftp"},
        files=[("files", ("a.png", PNG, "image/png"))],
    )
    assert response.status_code == 400
    assert "vercel, s3, cloudinary" in response.json()["detail"]
    (row,) = flushed_rows(store, file_uploads)
    assert row["upload_status"] == "failed"


def test_raw_put_records_one_upload_with_the_request_type(
    app_client: tuple[AppClient, Path, UsageStore],
) -> None:
    """``PUT /files/{name}`` stores the raw body; ``raw_upload_paths`` makes it one upload row."""
    client, files_dir, store = app_client
    csv = b"day,uploads\n2025-06-01,3\n" * 50
    photo = client.request(
        "PUT",
        "/files/photo.png",
        headers={"x-api-key": ACME, "content-type": "image/png", "x-storage-provider": "s3"},
        content=PNG,
    )
    table = client.request(
        "PUT",
        "/files/report.csv",
        headers={"x-api-key": ACME, "content-type": "text/csv"},
        content=csv,
    )
    assert (photo.status_code, table.status_code) == (201, 201), (photo.text, table.text)
    assert (photo.json()["size"], table.json()["size"]) == (len(PNG), len(csv))
    stored = {p.name.split("-", 1)[1]: p.read_bytes() for p in files_dir.rglob("*.*")}
    assert stored == {"photo.png": PNG, "report.csv": csv}

    rows = sorted(flushed_rows(store, file_uploads), key=lambda r: r["file_name"])
    assert [(r["file_name"], r["file_type"], r["file_size"], r["provider"]) for r in rows] == [
        ("photo.png", "image/png", len(PNG), "s3"),
        ("report.csv", "text/csv", len(csv), "vercel"),
    ]
    assert {(r["upload_status"], r["api_key_id"]) for r in rows} == {("success", ACME_ID)}
    requests = flushed_rows(store, api_requests)
    assert {(r["method"], r["path"], r["status_code"]) for r in requests} == {
        ("PUT", "/files/{name}", 201)
    }


def test_raw_put_over_the_provider_limit_fails(
    app_client: tuple[AppClient, Path, UsageStore],
) -> None:
    """A raw body over vercel's limit gives 413, leaves no file and one failed upload row."""
    client, files_dir, store = app_client
    big = b"\x00" * 4_600_000
    response = client.request("PUT", "/files/big.bin", headers={"x-api-key": ACME}, content=big)
    assert response.status_code == 413
    assert not any(files_dir.rglob("*.*"))
    (row,) = flushed_rows(store, file_uploads)
    assert (row["provider"], row["upload_status"]) == ("vercel", "failed")
    assert row["error_message"] == "big.bin is over vercel's 4,500,000 bytes"


def test_dashboard_scope_follows_the_key(app_client: tuple[AppClient, Path, UsageStore]) -> None:
    """The admin key reads every key's usage, a customer key only its own, no key nothing."""
    client, _, store = app_client
    for key, n in ((ACME, 2), (GLOBEX, 1)):
        for _ in range(n):
            response = client.post(
                "/api/upload", headers={"x-api-key": key}, files=[("files", ("a.png", PNG, None))]
            )
            assert response.status_code == 201
    flushed_rows(store, file_uploads)

    def uploads(headers: dict[str, str], query: str = "range=7d") -> Any:
        return client.get(f"/api/usage/granular?{query}", headers=headers)

    assert uploads({"x-api-key": ADMIN}).json()["totals"]["uploads"] == 3
    assert uploads({"x-api-key": ACME}).json()["totals"]["uploads"] == 2
    assert uploads({"x-api-key": GLOBEX}).json()["totals"]["uploads"] == 1
    assert uploads({}).status_code == 401
    assert uploads({}, f"range=7d&key={ADMIN}").status_code == 401
    other = uploads({"x-api-key": ACME}, f"range=7d&api_key_id={GLOBEX_ID}")
    assert other.status_code == 403


def test_usage_mount_serves_the_dashboard_page(
    app_client: tuple[AppClient, Path, UsageStore],
) -> None:
    """``/`` redirects to the dashboard, which the router serves without needing a key."""
    client, _, _ = app_client
    page = client.get("/")
    assert page.status_code == 200
    assert str(page.url).endswith("/api/usage/")
    assert "<title>Upload usage</title>" in page.text


def test_banner_prints_the_dashboard_url_and_keys(tmp_path: Path) -> None:
    """The start-up banner names the dashboard URL (key in the fragment) and the demo keys."""
    app = example.create_app(
        database_url=f"sqlite:///{tmp_path / 'u.db'}", storage_dir=tmp_path, admin_key=ADMIN
    )
    text = example.banner(app, "127.0.0.1", 8000)
    assert f"http://127.0.0.1:8000/api/usage/#key={ADMIN}" in text
    assert ACME in text and GLOBEX in text
    app.state.store.dispose()
