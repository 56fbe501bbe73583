"""What the shipped text says matches the code, and stands on its own.

The README, the pages in docs/, docstrings, comments and SQL files describe the behaviour
itself: no pointers to documents that are not in the repository, no private module offered as
API, counts and state names that agree with the code, and links that lead somewhere.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from usage_middleware import Recorder, UsageStore
from usage_middleware._schema import ALL_TABLES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
# The README and every docs page: what a reader of the repository (or its sdist) reads first.
MARKDOWN = [ROOT / "README.md", *DOC_PAGES]
RLS = (ROOT / "src" / "usage_middleware" / "sql" / "supabase_rls.sql").read_text(encoding="utf-8")
SHIPPED = ("src", "docs", "examples", "benchmarks", "tests", "sql")
TEXT_SUFFIXES = {".py", ".sql", ".md", ".html", ".js", ".css", ".txt", ".toml", ".cfg", ".ini"}
# References to documents outside the repository, and notes on how the code came about.
# (Spelled with classes and escapes so that this file does not match itself.)
OUTSIDE = re.compile(
    r"\bS[P]EC\b|\xa7|\bL[E]SSONS\b"
    r"|(?i:s[t]yle\.md|\bthe[ ]issue\b|\bi[s]sue \d|\bd[e]fect \d|h[a]rdening)"
)
NUMBERS = {
    "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11,
    "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
}  # fmt: skip


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
    assert DOC_PAGES and set(DOC_PAGES) <= set(shipped_files())
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in shipped_files()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not found, "\n".join(found)


def test_the_docs_offer_no_private_module_as_api() -> None:
    """``usage_middleware._x`` may change any time; the README and docs name public names only."""
    found = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in MARKDOWN
        for name in re.findall(r"usage_middleware\._\w+", path.read_text(encoding="utf-8"))
    ]
    assert not found, found


def test_the_docs_pages_exist_and_are_all_linked_from_the_readme() -> None:
    """The README is a landing page: each docs page is one link away."""
    names = {p.name for p in DOC_PAGES}
    assert {"capture.md", "recorder.md", "storage.md", "sql.md", "http-api.md"} <= names
    assert {"benchmarks.md", "demo.md"} <= names
    linked = {Path(target).name for target, _ in _links(README) if target.startswith("docs/")}
    assert names <= linked, sorted(names - linked)


def test_each_docs_page_opens_with_a_title_and_a_paragraph_on_what_it_covers() -> None:
    """A reader arriving from a link learns in one paragraph whether this is the right page."""
    for path in DOC_PAGES:
        blocks = [b.strip() for b in path.read_text(encoding="utf-8").split("\n\n") if b.strip()]
        assert blocks[0].startswith("# ") and "\n" not in blocks[0], path.name
        first = blocks[1]
        assert first[0].isalpha() and "This page covers" in first, (path.name, first[:80])


def _without_code(text: str) -> str:
    """Markdown without fenced code blocks (a ``# comment`` there is no heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)


def _links(text: str) -> list[tuple[str, str]]:
    """``(file, anchor)`` of every inline link and image outside code blocks."""
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _without_code(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        out.append((file, anchor))
    return out


def _anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation dropped, spaces to -."""
    headings = re.findall(r"^#{1,6} +(.+?) *$", _without_code(text), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_points_at_an_existing_file_and_heading() -> None:
    """Links in the README and docs lead to a file of the repository (and a heading there)."""
    broken = []
    for path in MARKDOWN:
        text = path.read_text(encoding="utf-8")
        links = _links(text)
        assert links or path.name != "README.md"
        for file, anchor in links:
            target = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(ROOT)} -> {file}#{anchor}"
            if not target.is_file() or ROOT not in target.parents:
                broken.append(f"{where}: no such file in the repository")
            elif (
                anchor
                and target.suffix == ".md"
                and anchor not in _anchors(target.read_text(encoding="utf-8"))
            ):
                broken.append(f"{where}: no such heading")
    assert not broken, "\n".join(broken)


def _number(word: str) -> int:
    return NUMBERS[word.lower()] if word.lower() in NUMBERS else int(word)


def _flat(path: Path) -> str:
    """The text with every run of whitespace as one space, so a phrase may wrap."""
    return " ".join(path.read_text(encoding="utf-8").split())


def test_the_sql_page_counts_the_tables_and_policies_there_are() -> None:
    """The schema's tables, the tables under row level security, the policies to rename."""
    sql_page = _flat(ROOT / "docs" / "sql.md")
    tables = re.findall(r"(?i:the) (\w+) tables \(`file_uploads`", sql_page)
    secured = re.findall(r"(?:read policies|row level security) on all (\w+) tables", sql_page)
    renamed = re.findall(r"rename it in the (\w+) policies", sql_page)
    assert tables and secured and renamed
    assert {_number(w) for w in tables} == {len(ALL_TABLES)}
    rls_tables = set(re.findall(r"ALTER TABLE public\.(\w+) ENABLE ROW LEVEL SECURITY", RLS))
    assert {_number(w) for w in secured} == {len(rls_tables & set(ALL_TABLES))}
    policies = re.findall(r"CREATE POLICY .*?;", RLS, flags=re.DOTALL)
    naming_the_key_table = [p for p in policies if "public.api_keys" in p]
    assert {_number(w) for w in renamed} == {len(naming_the_key_table)}
    # Wherever else the docs count the tables, they say the same.
    for path in MARKDOWN:
        for word in re.findall(r"(?i:the|all) (\w+) tables \(`file_uploads`", _flat(path)):
            assert _number(word) == len(ALL_TABLES), path.name


@pytest.fixture
def recorder(tmp_path: Path) -> Recorder:
    return Recorder(UsageStore(f"sqlite:///{tmp_path / 'usage.db'}"), spool_path=":memory:")


def test_the_recorder_page_lists_every_recorder_state(recorder: Recorder) -> None:
    """Each state ``stats()`` reports over a recorder's life is one docs/recorder.md names."""
    listed = re.search(r"`state` \(([^)]*)\)", _flat(ROOT / "docs" / "recorder.md"))
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
