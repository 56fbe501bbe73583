"""Databases that do not answer, for the tests of what the recorder does then."""

from __future__ import annotations

import socket
from pathlib import Path

from sqlalchemy.engine import make_url


def down_url(db_url: str, tmp_path: Path) -> str:
    """A URL of the same kind as ``db_url`` whose database cannot be reached."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        return f"sqlite:///{tmp_path / 'missing-dir' / 'usage.db'}"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
