"""usage-middleware: granular upload and API usage analytics, stored in your own database.

Public surface (everything else is private and may change)::

    UsageStore        the database: schema, exact write path, queries
    UploadRecord      one uploaded file (a ``file_uploads`` row)
    RequestRecord     one HTTP request (an ``api_requests`` row)
    Recorder          background batching of records into a store (tunable, optional)
    UsageRouter       the read API and dashboard (mount it); ALL_KEYS: an unrestricted scope
    UsageMiddleware   pure ASGI capture of requests and uploads; annotate() from endpoints
    api_key_uuid      the stable id the default hook gives an API key
"""

from ._capture.annotate import annotate
from ._capture.middleware import UsageMiddleware
from ._errors import ConfigurationError, DatabaseUnavailableError, SchemaMissingError, UsageError
from ._keys import api_key_uuid
from ._recording.recorder import Recorder
from ._records import RequestRecord, UploadRecord
from ._router import ALL_KEYS, UsageRouter
from ._store import UsageStore

__all__ = [
    "ALL_KEYS",
    "ConfigurationError",
    "DatabaseUnavailableError",
    "Recorder",
    "RequestRecord",
    "SchemaMissingError",
    "UploadRecord",
    "UsageError",
    "UsageMiddleware",
    "UsageRouter",
    "UsageStore",
    "annotate",
    "api_key_uuid",
]

__version__ = "0.1.0"
