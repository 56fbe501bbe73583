"""The test suite writes only to temporary directories, never into the user's home.

A recorder without ``spool_path`` spools under ``USAGE_MIDDLEWARE_SPOOL_DIR`` or the XDG state
directory, by default ``~/.local/state/usage-middleware``; gunicorn puts its control socket in
``XDG_RUNTIME_DIR``, else ``~/.gunicorn``. The session fixture in conftest.py points all of
them at a temporary directory, for subprocesses as well.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from usage_middleware import Recorder, UsageStore

HOME = Path.home().resolve()


def test_a_default_spool_is_not_in_the_home_directory(tmp_path: Path) -> None:
    """A recorder of this process puts its spool file outside the home directory."""
    store = UsageStore(f"sqlite:///{tmp_path / 'usage.db'}")
    recorder = Recorder(store)
    try:
        spool = Path(recorder.spool_path).resolve()
        assert not spool.is_relative_to(HOME), spool
    finally:
        recorder.shutdown()
        store.dispose()


def test_a_subprocess_spools_outside_the_home_directory_too(tmp_path: Path) -> None:
    """Servers and scripts the tests start inherit the setting."""
    script = (
        "import os, sys\n"
        "from usage_middleware import Recorder, UsageStore\n"
        "store = UsageStore(sys.argv[1])\n"
        "recorder = Recorder(store)\n"
        "print(recorder.spool_path)\n"
        "print(os.environ.get('XDG_RUNTIME_DIR', '~'))\n"
        "recorder.shutdown()\n"
        "store.dispose()\n"
    )
    url = f"sqlite:///{tmp_path / 'usage.db'}"
    done = subprocess.run(
        [sys.executable, "-c", script, url], capture_output=True, text=True, timeout=60, check=True
    )
    spool, runtime = (Path(line).expanduser().resolve() for line in done.stdout.splitlines())
    assert not spool.is_relative_to(HOME), spool
    assert runtime.is_dir() and not runtime.is_relative_to(HOME), runtime  # gunicorn's socket
