"""File types from leading bytes: a corpus of real file layouts, spoofed names and claims."""

from __future__ import annotations

import io
import random
import struct
import zipfile
import zlib

import filetype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usage_middleware._capture.sniff import SNIFF_BYTES, _markup, effective_type, sniff
from usage_middleware._records import normalize_mime


def _png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00\xff\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _jpeg_jfif() -> bytes:
    app0 = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    dqt = b"\xff\xdb\x00\x43\x00" + bytes(range(1, 65))
    sof0 = b"\xff\xc0\x00\x0b\x08\x00\x01\x00\x01\x01\x01\x11\x00"
    return b"\xff\xd8" + app0 + dqt + sof0 + b"\xff\xd9"


def _jpeg_exif() -> bytes:
    tiff = b"MM\x00\x2a\x00\x00\x00\x08\x00\x00"
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(tiff)) + b"Exif\x00\x00" + tiff
    return b"\xff\xd8" + app1 + b"\xff\xd9"


def _gif() -> bytes:
    return (
        b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00"
        b"!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
    )


def _webp() -> bytes:
    vp8l = b"\x2f\x00\x00\x00\x10\x07\x10\x11\x11\x88\x88\xfe\x07\x00"
    body = b"WEBP" + b"VP8L" + struct.pack("<I", len(vp8l) - 1) + vp8l
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _isobmff(major: bytes, compatible: list[bytes], rest: bytes) -> bytes:
    ftyp = major + b"\x00\x00\x02\x00" + b"".join(compatible)
    return struct.pack(">I", 8 + len(ftyp)) + b"ftyp" + ftyp + rest


def _mp4() -> bytes:
    # What ffmpeg writes: ftyp(isom; isom iso2 avc1 mp41), a free box, then mdat.
    return _isobmff(
        b"isom", [b"isom", b"iso2", b"avc1", b"mp41"], b"\x00\x00\x00\x08free\x00\x00\x10\x00mdat"
    )


def _heic() -> bytes:
    # iPhone photos: ftyp(heic; mif1 heic), then the meta box.
    return _isobmff(b"heic", [b"mif1", b"heic"], b"\x00\x00\x01\x00meta\x00\x00\x00\x00")


def _pdf() -> bytes:
    return (
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
        b"2 0 obj\n<< /Type /Pages /Kids [] /Count 0 >>\nendobj\n"
        b"trailer\n<< /Root 1 0 R >>\n%%EOF\n"
    )


def _ooxml(main_part: str, main_xml: str, content_type: str) -> bytes:
    # The entry order Microsoft Office writes: [Content_Types].xml, _rels/.rels, then the parts.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(
            "[Content_Types].xml",
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            f'<Override PartName="/{main_part}" ContentType="{content_type}"/></Types>',
        )
        archive.writestr(
            "_rels/.rels",
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?><Relationships '
            'xmlns="http://schemas.openxmlformats.org/package/2006/relationships"/>',
        )
        archive.writestr(main_part, main_xml)
        archive.writestr("docProps/app.xml", "<Properties/>")
    return buffer.getvalue()


def _docx() -> bytes:
    return _ooxml(
        "word/document.xml",
        "<w:document/>",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml",
    )


def _xlsx() -> bytes:
    return _ooxml(
        "xl/workbook.xml",
        "<workbook/>",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml",
    )


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("README.txt", "plain archive\n" * 20)
        archive.writestr("data/values.csv", "a,b\n1,2\n")
    return buffer.getvalue()


SVG = (
    b'<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n'
    b"<!-- Created with Inkscape -->\n"
    b'<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" '
    b'"http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">\n'
    b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><script>alert(1)</script>'
    b"</svg>\n"
)
HTML = b"\xef\xbb\xbf\n  <!DOCTYPE html>\n<html><head><script>alert(document.cookie)</script>"
HTML_NO_DOCTYPE = b"<html>\n<body onload=alert(1)>"

DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"

# (description, bytes, client's file name, client's declared type, expected file_type)
CORPUS = [
    ("JPEG (JFIF) named .png", _jpeg_jfif(), "cat.png", "image/png", "image/jpeg"),
    ("JPEG (Exif) as it is", _jpeg_exif(), "IMG_0001.JPG", "image/jpeg", "image/jpeg"),
    ("PNG named .jpg", _png(), "photo.jpg", "image/jpeg", "image/png"),
    ("GIF", _gif(), "anim.gif", "image/gif", "image/gif"),
    ("WebP declared octet-stream", _webp(), "x.webp", "application/octet-stream", "image/webp"),
    ("HEIC from a phone", _heic(), "IMG_0002.HEIC", "application/octet-stream", "image/heic"),
    ("MP4 declared quicktime", _mp4(), "clip.mov", "video/quicktime", "video/mp4"),
    ("PDF", _pdf(), "report.pdf", "application/pdf", "application/pdf"),
    ("DOCX declared zip", _docx(), "letter.docx", "application/zip", DOCX),
    ("XLSX declared octet-stream", _xlsx(), "sheet.xlsx", "application/octet-stream", XLSX),
    ("plain ZIP named .docx", _zip(), "fake.docx", DOCX, "application/zip"),
    ("SVG declared png", SVG, "logo.png", "image/png", "image/svg+xml"),
    ("HTML named .jpg", HTML, "photo.jpg", "image/jpeg", "text/html"),
    ("HTML without doctype", HTML_NO_DOCTYPE, "a.txt", "text/plain", "text/html"),
]


@pytest.mark.parametrize(
    ("data", "name", "declared", "expected"),
    [case[1:] for case in CORPUS],
    ids=[case[0] for case in CORPUS],
)
def test_corpus_real_type_wins_over_name_and_claim(
    data: bytes, name: str, declared: str, expected: str
) -> None:
    """The leading bytes decide the type, whatever the file is called or claims to be."""
    assert effective_type(data[:SNIFF_BYTES], declared, name) == expected


def test_office_documents_are_told_from_the_first_bytes_only() -> None:
    """A DOCX is recognised from its first SNIFF_BYTES even when the archive is much larger."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>" * 50)
        archive.writestr("_rels/.rels", "<Relationships/>")
        archive.writestr("word/document.xml", "<w:document/>")
        archive.writestr("word/media/image1.bin", random.Random(1).randbytes(1 << 20))
    data = buffer.getvalue()
    assert len(data) > 100 * SNIFF_BYTES
    assert sniff(data[:SNIFF_BYTES]) == DOCX


def test_declared_type_is_used_when_bytes_prove_nothing() -> None:
    """Unrecognisable bytes fall back to the declared type, normalised."""
    assert effective_type(b"a,b\n1,2\n", "Text/CSV; charset=utf-8", "x.csv") == "text/csv"


def test_extension_is_used_when_declared_type_is_generic() -> None:
    """With no sniffable bytes and an octet-stream claim, the extension decides."""
    assert effective_type(b"a,b\n1,2\n", "application/octet-stream", "x.csv") == "text/csv"


def test_text_without_any_hint_is_text_plain() -> None:
    """UTF-8 text with no claim and no known extension is text/plain."""
    assert effective_type("héllo wörld\n".encode(), None, "NOTES") == "text/plain"


def test_text_cut_inside_a_multibyte_character_is_still_text() -> None:
    """A sniff buffer ending mid-character does not turn text into binary."""
    assert effective_type("é".encode() * 10 + b"\xc3", None, None) == "text/plain"


def test_unknown_binary_is_octet_stream() -> None:
    """Binary bytes with no claim and no name are application/octet-stream."""
    assert effective_type(b"\x00\x01\x02\x03garbage\x00", None, None) == "application/octet-stream"


def test_empty_file_keeps_the_declared_type() -> None:
    """An empty file has nothing to sniff: the declared type stands."""
    assert effective_type(b"", "image/png", "empty.png") == "image/png"


def test_xml_that_is_not_svg_or_html_is_xml() -> None:
    """An XML document whose root is neither svg nor html is application/xml."""
    assert sniff(b'<?xml version="1.0"?>\n<feed xmlns="http://www.w3.org/2005/Atom"/>') == (
        "application/xml"
    )


def test_text_starting_with_a_less_than_sign_is_not_markup() -> None:
    """Text that merely starts with '<' is not mistaken for HTML."""
    assert sniff(b"<3 you\n") is None


def _filetype_then_markup(head: bytes) -> str | None:
    """What sniff() answered by running every filetype matcher."""
    if not head:
        return None
    kind = filetype.guess_mime(head)
    return normalize_mime(kind) if kind else _markup(head)


MKV = b"\x1a\x45\xdf\xa3\x93\x42\x82\x88matroska\x42\x87\x81\x04"


@settings(max_examples=400, deadline=None)
@given(
    start=st.sampled_from(
        [b"", b"PK\x03\x04", b"\x1a\x45\xdf\xa3", MKV, b"%PDF-", b"\xff\xd8\xff"]
        + [case[1][:64] for case in CORPUS]
    ),
    rest=st.binary(max_size=700),
    cut=st.integers(min_value=0, max_value=SNIFF_BYTES),
)
def test_sniff_gives_the_answer_of_all_filetype_matchers(
    start: bytes, rest: bytes, cut: int
) -> None:
    """Skipping the matchers that cannot match never changes the answer."""
    head = (start + rest)[:cut]
    assert sniff(head) == _filetype_then_markup(head)


@pytest.mark.parametrize("case", CORPUS, ids=[case[0] for case in CORPUS])
def test_sniff_agrees_with_filetype_on_the_corpus(case: tuple[str, bytes, str, str, str]) -> None:
    """Real layouts (office documents included) get filetype's own answer."""
    head = case[1][:SNIFF_BYTES]
    assert sniff(head) == _filetype_then_markup(head)


# WHATWG MIME sniffing, "rules for identifying an unknown MIME type": the HTML patterns (each
# tag name, any case, followed by a tag-terminating byte: space or '>') after any number of
# leading whitespace bytes (tab, LF, FF, CR, space), and the "<!--" pattern.
WHATWG_HTML_PATTERNS = [
    b"<!DOCTYPE HTML",
    b"<HTML",
    b"<HEAD",
    b"<SCRIPT",
    b"<IFRAME",
    b"<H1",
    b"<DIV",
    b"<FONT",
    b"<TABLE",
    b"<A",
    b"<STYLE",
    b"<TITLE",
    b"<B",
    b"<BODY",
    b"<BR",
    b"<P",
    b"<!--",
]


@pytest.mark.parametrize("pattern", WHATWG_HTML_PATTERNS, ids=lambda p: p.decode())
@pytest.mark.parametrize("terminator", [b" ", b">"], ids=["space", "gt"])
@pytest.mark.parametrize("lower", [False, True], ids=["upper", "lower"])
@pytest.mark.parametrize(
    "leading", [b"", b"\t\n\x0c\r ", b" " * 1100, b"\n" * 5000], ids=["none", "ws", "1100", "5000"]
)
def test_whatwg_html_patterns_are_html(
    pattern: bytes, terminator: bytes, lower: bool, leading: bytes
) -> None:
    """Every WHATWG HTML pattern, in either case, after any leading whitespace the sniff
    buffer holds, is text/html whatever the client claims."""
    head = leading + (pattern.lower() if lower else pattern) + terminator + b"x"
    assert effective_type(head, "image/png", "photo.png") == "text/html"


@pytest.mark.parametrize(
    "head",
    [
        b"<!-- c --> <script>alert(1)</script>",
        b"<!-- c --><SCRIPT>alert(1)</SCRIPT>",
        b"<!-->" + b"<p>x",
        b"  <!-- " + b"x" * 9000,  # a comment longer than the sniff buffer: "<!--" decides
        b"<!-- " + b"x" * 9000 + b" --><html>",
        b"<!-- c -->\n<foo>bar</foo>",  # WHATWG: "<!--" alone makes it HTML
        b"\xef\xbb\xbf\n<html>",
        b"<!--x--><div>",  # no terminator after "<!--": the tag after the comment decides
    ],
    ids=[
        "comment-script",
        "comment-upper",
        "empty-comment",
        "9k-comment",
        "9k-then-html",
        "comment-then-xml",
        "bom",
        "tight-comment-div",
    ],
)
def test_comments_do_not_hide_html(head: bytes) -> None:
    """A leading comment, however long, does not hide HTML (WHATWG's "<!--" pattern)."""
    assert effective_type(head[:SNIFF_BYTES], "image/png", "photo.png") == "text/html"


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"<H2>title</H2>", "text/plain"),  # not one of the patterns
        (b"<bx>", "text/plain"),  # "<B" not followed by a terminating byte
        (b"<abbr>", "text/plain"),
        (b"<html", "text/plain"),  # the pattern needs its terminating byte
        (b"<!--x-->", "text/plain"),
        (b"\x0b<html>", "application/octet-stream"),  # vertical tab is not WHATWG whitespace
        (b"<!-- c --> <svg xmlns='http://www.w3.org/2000/svg'>", "image/svg+xml"),
        (b"<?xml version='1.0'?><!-- c --><feed/>", "application/xml"),
    ],
)
def test_what_the_html_patterns_do_not_match(head: bytes, expected: str) -> None:
    """Near misses are not HTML; an SVG root after a comment stays SVG, an XML declaration
    first makes XML."""
    assert effective_type(head, None, None) == expected


def test_whitespace_beyond_the_sniff_buffer_hides_what_follows() -> None:
    """Only the first SNIFF_BYTES are kept: markup after that much whitespace is not seen
    (browsers sniff only the first 1,445 bytes, so they do not run it as HTML either)."""
    head = (b" " * SNIFF_BYTES + b"<script>")[:SNIFF_BYTES]
    assert effective_type(head, "image/png", "a.png") == "image/png"
