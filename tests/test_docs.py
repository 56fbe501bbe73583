"""What the shipped text says matches the code, and stands on its own.

The README, docstrings, comments and SQL files describe the behaviour itself: no pointers to
documents that are not in the repository, no private module offered as API, and counts and
state names that agree with the code.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from usage_middleware import Recorder, UsageStore
from usage_middleware._schema import ALL_TABLES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
RLS = (ROOT / "src" / "usage_middleware" / "sql" / "supabase_rls.sql").read_text(encoding="utf-8")
SHIPPED = ("src", "docs", "examples", "benchmarks", "tests", "sql")
TEXT_SUFFIXES = {".py", ".sql", ".md", ".html", ".js", ".css", ".txt", ".toml", ".cfg", ".ini"}
# References to documents outside the repository, and notes on how the code came about.
# (Spelled with classes and escapes so that this file does not match itself.)
OUTSIDE = re.compile(
    r"\bS[P]EC\b|\xa7|\bL[E]SSONS\b"
    r"|(?i:s[t]yle\.md|\bthe[ ]issue\b|\bi[s]sue \d|\bd[e]fect \d|h[a]rdening)"
)
NUMBERS = {"five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}


def shipped_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    for top in SHIPPED:
        base = ROOT / top
        if base.is_symlink():  # sql/ is the package's sql directory
            continue
        files += [
            p
            for p in sorted(base.rglob("*"))
            if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts
        ]
    return [p for p in files if p.exists()]


def test_no_references_to_documents_outside_the_repository() -> None:
    """Say the thing itself instead of pointing at a section of a document nobody has."""
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in shipped_files()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not found, "\n".join(found)


def test_the_readme_offers_no_private_module_as_api() -> None:
    """``usage_middleware._x`` may change any time; the README points at public names only."""
    assert not re.findall(r"usage_middleware\._\w+", README)


def _number(word: str) -> int:
    return NUMBERS[word.lower()] if word.lower() in NUMBERS else int(word)


def test_the_readme_counts_the_tables_and_policies_there_are() -> None:
    """The schema's tables, the tables under row level security, the policies to rename."""
    tables = re.findall(r"the (\w+) tables \(`file_uploads`", README)
    secured = re.findall(r"(?:read policies|row level security) on all (\w+) tables", README)
    renamed = re.findall(r"rename it in the (\w+) policies", README)
    assert tables and secured and renamed
    assert {_number(w) for w in tables} == {len(ALL_TABLES)}
    rls_tables = set(re.findall(r"ALTER TABLE public\.(\w+) ENABLE ROW LEVEL SECURITY", RLS))
    assert {_number(w) for w in secured} == {len(rls_tables & set(ALL_TABLES))}
    policies = re.findall(r"CREATE POLICY .*?;", RLS, flags=re.DOTALL)
    naming_the_key_table = [p for p in policies if "public.api_keys" in p]
    assert {_number(w) for w in renamed} == {len(naming_the_key_table)}


@pytest.fixture
def recorder(tmp_path: Path) -> Recorder:
    return Recorder(UsageStore(f"sqlite:///{tmp_path / 'usage.db'}"), spool_path=":memory:")


def test_the_readme_lists_every_recorder_state(recorder: Recorder) -> None:
    """Each state ``stats()`` reports over a recorder's life is one the README names."""
    listed = re.search(r"`state` \(([^)]*)\)", README)
    assert listed is not None
    states = set(re.findall(r"`(\w+)`", listed.group(1)))
    seen = [recorder.stats()["state"]]
    recorder.start()
    seen.append(recorder.stats()["state"])
    recorder.shutdown()
    seen.append(recorder.stats()["state"])
    recorder.store.dispose()
    assert seen == ["not_started", "running", "stopped"]
    assert set(seen) <= states
