"""Exceptions raised by usage-middleware.

Hierarchy::

    UsageError                      base of everything raised on purpose
    ├── ConfigurationError          bad option or URL; fix the call site (also a ValueError)
    ├── DatabaseUnavailableError    the database could not be reached; check the URL / server
    ├── RecordsRefusedError         the database refused a batch's values (also a ValueError)
    ├── SchemaMissingError          tables are absent and auto-creation is off; run create_schema()
    └── ReadTimeoutError            a read ran past the store's read_timeout and was cancelled

Invalid records raise plain ``ValueError`` naming the offending field, before anything is written.
"""

from __future__ import annotations


class UsageError(Exception):
    """Base class for errors raised by usage-middleware."""


class ConfigurationError(UsageError, ValueError):
    """An option, URL or hook is invalid. The message names it and says what is accepted."""


class DatabaseUnavailableError(UsageError):
    """The database could not be reached or refused the connection."""


class RecordsRefusedError(UsageError, ValueError):
    """The database refused the values of a batch (a rollup sum out of range, a constraint).

    Retrying the same records cannot help, so this is a ``ValueError``: the recorder bisects
    the batch, rejects the records that cause it and writes the others.
    """


class SchemaMissingError(UsageError):
    """The usage tables do not exist and automatic schema creation is disabled."""


class ReadTimeoutError(UsageError):
    """A read statement ran longer than the store's ``read_timeout`` and was cancelled."""
