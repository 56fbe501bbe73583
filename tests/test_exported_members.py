"""The public surface is exactly what ``__all__`` lists, in order, and each name resolves."""

from __future__ import annotations

import usage_middleware

EXPECTED = [
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


def test_all_lists_the_public_names_alphabetically() -> None:
    """__all__ is pinned, sorted, and every name in it is importable from the package."""
    assert usage_middleware.__all__ == EXPECTED
    assert sorted(EXPECTED) == EXPECTED
    for name in EXPECTED:
        assert getattr(usage_middleware, name) is not None


def test_public_objects_are_not_private_module_leaks() -> None:
    """Every public name is defined in the package, not re-exported from a dependency."""
    for name in EXPECTED:
        module = getattr(getattr(usage_middleware, name), "__module__", "usage_middleware")
        assert module.startswith("usage_middleware"), (name, module)
