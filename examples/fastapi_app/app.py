"""Example upload API with usage tracking: ``POST /api/upload`` (multipart), ``PUT /files/{name}``
(raw body) and a dashboard at ``/api/usage/``.

Run it with ``make demo`` (from the repository root), or::

    python examples/fastapi_app/app.py            # http://127.0.0.1:8000

Callers authenticate with an ``x-api-key`` header. The key table is in memory: three demo
customer keys whose ids match the ``usage-middleware demo-data`` command's demo key ids (so the
synthetic history belongs to them), and one admin key that reads every key's usage on the
dashboard — taken from ``USAGE_ADMIN_KEY``, or random per process and printed at start.

Each request picks a storage provider (form field ``provider`` or header ``x-storage-provider``)
among three local-folder backends named like real ones — ``vercel``, ``s3``, ``cloudinary`` —
so the example runs offline. Each has its real per-file size limit; a file over it fails the
upload with 413, and ``annotate()`` tells the middleware so (status and reason).

``PUT /files/{name}`` takes one file as the raw request body, its type in ``Content-Type``
(``curl -T photo.png -H 'Content-Type: image/png' .../files/photo.png``), streamed to the
provider's folder. The middleware records it as one upload because the app passes
``raw_upload_paths=["/files/"]``: a non-multipart body there is a file.

Settings (environment): ``DATABASE_URL`` (default: SQLite file ``usage.db`` next to this file;
``postgresql+psycopg://...`` for PostgreSQL), ``STORAGE_DIR`` (default: ``storage/`` next to this
file), ``USAGE_ADMIN_KEY``, ``HOST`` (127.0.0.1) and ``PORT`` (8000).
"""

import os
import re
import secrets
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.responses import RedirectResponse
from fastapi.security import APIKeyHeader
from starlette.concurrency import run_in_threadpool
from starlette.types import Scope

from usage_middleware import ALL_KEYS, UsageMiddleware, UsageRouter, UsageStore, annotate

HERE = Path(__file__).resolve().parent
USAGE_MOUNT = "/api/usage"
RAW_UPLOADS = "/files"


@dataclass(frozen=True)
class ApiKey:
    """One caller: the id stored with its usage (never the raw key) and what it may read."""

    key_id: uuid.UUID
    owner: str
    admin: bool = False


def demo_keys(admin_key: str) -> dict[str, ApiKey]:
    """The in-memory key table. Customer ids are the demo-data command's demo key ids."""
    return {
        "demo-key-acme": ApiKey(uuid.UUID("00000000-de30-4000-8000-000000000001"), "Acme"),
        "demo-key-globex": ApiKey(uuid.UUID("00000000-de30-4000-8000-000000000002"), "Globex"),
        "demo-key-initech": ApiKey(uuid.UUID("00000000-de30-4000-8000-000000000003"), "Initech"),
        admin_key: ApiKey(uuid.UUID("00000000-de30-4000-8000-000000000000"), "Admin", admin=True),
    }


class KeyTable:
    """Looks keys up in constant time per entry, so timing does not reveal a key's prefix."""

    def __init__(self, keys: Mapping[str, ApiKey]) -> None:
        self._keys = [(raw.encode(), key) for raw, key in keys.items()]

    def lookup(self, raw: str | None) -> ApiKey | None:
        if not raw:
            return None
        candidate = raw.encode()
        found = None
        for known, key in self._keys:
            if secrets.compare_digest(known, candidate):
                found = key
        return found

    def from_headers(self, headers: Mapping[str, str]) -> ApiKey | None:
        raw = headers.get("x-api-key")
        if raw is None:
            auth = headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                raw = auth[7:].strip()
        return self.lookup(raw)


@dataclass(frozen=True)
class Backend:
    """A storage provider simulated by a local folder, with the provider's per-file limit."""

    name: str
    root: Path
    max_file_size: int

    def save(self, upload: UploadFile, key: ApiKey) -> dict[str, Any]:
        folder = self.root / self.name / str(key.key_id)
        folder.mkdir(parents=True, exist_ok=True)
        name = _safe_name(upload.filename or "upload")
        target = folder / f"{uuid.uuid4().hex[:12]}-{name}"
        with target.open("wb") as out:
            shutil.copyfileobj(upload.file, out, 1024 * 1024)
        return {
            "name": upload.filename,
            "size": target.stat().st_size,
            "content_type": upload.content_type,
            "provider": self.name,
            "location": f"{self.name}://{key.key_id}/{target.name}",
        }


PROVIDER_LIMITS = {
    "vercel": 4_500_000,  # Vercel Blob server uploads: 4.5 MB
    "s3": 5_000_000_000,  # S3 single PUT: 5 GB
    "cloudinary": 10_000_000,  # Cloudinary free plan images: 10 MB
}


def _safe_name(name: str) -> str:
    name = Path(name.replace("\\", "/")).name
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "upload"
    return name[:100]


def create_app(
    database_url: str | None = None,
    storage_dir: str | os.PathLike[str] | None = None,
    admin_key: str | None = None,
) -> FastAPI:
    """Build the example app; arguments default to the environment, then to local files."""
    default_url = f"sqlite:///{HERE / 'usage.db'}"
    database_url = database_url or os.environ.get("DATABASE_URL") or default_url
    root = Path(storage_dir or os.environ.get("STORAGE_DIR") or HERE / "storage")
    admin_key = admin_key or os.environ.get("USAGE_ADMIN_KEY") or secrets.token_urlsafe(18)
    table = demo_keys(admin_key)
    keys = KeyTable(table)
    backends = {name: Backend(name, root, limit) for name, limit in PROVIDER_LIMITS.items()}
    store = UsageStore(database_url)

    app = FastAPI(title="Upload API (usage-middleware example)")
    app.state.store = store
    app.state.admin_key = admin_key

    def key_id_of(scope: Scope) -> uuid.UUID | None:
        """The middleware's API-key hook: our key ids, and nothing for unknown keys."""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        key = keys.from_headers(headers)
        return key.key_id if key else None

    app.add_middleware(
        UsageMiddleware,
        store=store,
        api_key_id=key_id_of,
        record_file_names=True,
        raw_upload_paths=[RAW_UPLOADS + "/"],
    )

    def authorize(request: Request) -> Any:
        """Dashboard scope: the admin key reads everything, a customer key its own usage.

        Only headers count (the dashboard page sends ``x-api-key``); a key in a query string
        would end up in access logs and browser history.
        """
        key = keys.from_headers(request.headers)
        if key is None:
            return None
        return ALL_KEYS if key.admin else [key.key_id]

    owners = {key.key_id: key.owner for key in table.values()}

    def key_labels(ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
        """Names for the dashboard's consumers: each key's owner, never the key itself."""
        return {i: owners[i] for i in ids if i in owners}

    app.mount(USAGE_MOUNT, UsageRouter(store, authorize=authorize, key_labels=key_labels))

    header_key = APIKeyHeader(name="x-api-key", auto_error=False)

    def caller(request: Request, _doc: Annotated[str | None, Depends(header_key)]) -> ApiKey:
        """The authenticated caller (``x-api-key`` or a bearer token), else 401."""
        key = keys.from_headers(request.headers)
        if key is None:
            annotate(request, upload_status="failed", error_message="missing or unknown API key")
            raise HTTPException(
                401, "missing or unknown API key (x-api-key header)", {"WWW-Authenticate": "ApiKey"}
            )
        annotate(request, api_key_id=key.key_id)
        return key

    @app.post("/api/upload", status_code=201)
    async def upload(
        request: Request,
        key: Annotated[ApiKey, Depends(caller)],
        files: Annotated[list[UploadFile], File(description="one or more files")],
        provider: Annotated[str | None, Form()] = None,
        x_storage_provider: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        """Store the files with one provider; all or nothing."""
        name = (provider or x_storage_provider or "vercel").strip().lower()
        backend = backends.get(name)
        if backend is None:
            message = f"unknown provider {name[:40]!r}; choose one of {', '.join(backends)}"
            annotate(request, upload_status="failed", error_message=message)
            raise HTTPException(400, message)
        annotate(request, provider=backend.name)
        for f in files:
            if f.size is not None and f.size > backend.max_file_size:
                message = (
                    f"{_safe_name(f.filename or 'upload')} is {f.size:,} bytes; "
                    f"{backend.name} takes at most {backend.max_file_size:,}"
                )
                annotate(request, upload_status="failed", error_message=message)
                raise HTTPException(413, message)
        stored = [await run_in_threadpool(backend.save, f, key) for f in files]
        return {"provider": backend.name, "files": stored}

    @app.put(RAW_UPLOADS + "/{name}", status_code=201)
    async def put_file(
        request: Request,
        name: str,
        key: Annotated[ApiKey, Depends(caller)],
        x_storage_provider: Annotated[str | None, Header()] = None,
    ) -> Any:
        """Store the raw request body as one file, streamed to disk chunk by chunk."""
        backend = backends.get((x_storage_provider or "vercel").strip().lower())
        if backend is None:
            message = f"unknown provider; choose one of {', '.join(backends)}"
            annotate(request, upload_status="failed", error_message=message)
            raise HTTPException(400, message)
        annotate(request, provider=backend.name)
        folder = root / backend.name / str(key.key_id)
        await run_in_threadpool(folder.mkdir, parents=True, exist_ok=True)
        target = folder / f"{uuid.uuid4().hex[:12]}-{_safe_name(name)}"
        size = 0
        async with await anyio.open_file(target, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > backend.max_file_size:
                    break
                await out.write(chunk)
        if size > backend.max_file_size:
            await anyio.Path(target).unlink()
            message = f"{_safe_name(name)} is over {backend.name}'s {backend.max_file_size:,} bytes"
            annotate(request, upload_status="failed", error_message=message)
            raise HTTPException(413, message)
        return {
            "name": name,
            "size": size,
            "content_type": request.headers.get("content-type"),
            "provider": backend.name,
            "location": f"{backend.name}://{key.key_id}/{target.name}",
        }

    @app.get("/api/files")
    async def list_files(key: Annotated[ApiKey, Depends(caller)]) -> dict[str, Any]:
        """The caller's stored files, per provider."""

        def scan() -> list[dict[str, Any]]:
            out = []
            for backend in backends.values():
                folder = root / backend.name / str(key.key_id)
                if folder.is_dir():
                    for path in sorted(folder.iterdir()):
                        out.append(
                            {
                                "provider": backend.name,
                                "name": path.name,
                                "size": path.stat().st_size,
                            }
                        )
            return out

        return {"files": await run_in_threadpool(scan)}

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse(USAGE_MOUNT + "/")

    return app


def banner(app: FastAPI, host: str, port: int) -> str:
    """What to tell the person who started the example."""
    base = f"http://{host}:{port}"
    return "\n".join(
        [
            "",
            "Upload API with usage tracking (usage-middleware example)",
            f"  usage database : {app.state.store.url.render_as_string(hide_password=True)}",
            f"  dashboard      : {base}{USAGE_MOUNT}/#key={app.state.admin_key}",
            "  admin API key  : " + app.state.admin_key + "  (reads every key's usage)",
            "  demo API keys  : demo-key-acme, demo-key-globex, demo-key-initech",
            f"  try            : curl -H 'x-api-key: demo-key-acme' -F provider=s3 "
            f"-F files=@README.md {base}/api/upload",
            f"                 curl -H 'x-api-key: demo-key-acme' -H 'Content-Type: image/png' "
            f"-T docs/dashboard.png {base}{RAW_UPLOADS}/dashboard.png",
            "",
        ]
    )


if __name__ == "__main__":
    import uvicorn

    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "8000"))
    application = create_app()
    print(banner(application, host, port), flush=True)
    uvicorn.run(application, host=host, port=port)
