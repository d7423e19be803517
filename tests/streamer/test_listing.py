"""HTML listings: security headers, escaping of hostile names, folders first, sizes, links that
lead back to the listed files."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import unquote

import pytest
import pytest_twisted

from store import ListingItem
from streamer.listing import render_listing
from tests.streamer.content_support import start_content_server

#: A file name (no "/": that would make a folder) that breaks out of attributes and text.
HOSTILE = '<script>alert("x")<\u2215script>&\'"><img src=x onerror=alert(1)> %2e%2e.txt'


class _Page(HTMLParser):
    """Collects the elements and links of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "a":
            self._href = dict(attrs)["href"]
            self._text = []

    def handle_data(self, data):
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "a" and self._href is not None:
            self.links.append((self._href, "".join(self._text)))
            self._href = None


def _parse(body: bytes) -> _Page:
    page = _Page()
    page.feed(body.decode("utf-8"))
    return page


def test_render_escapes_and_orders():
    items = [
        ListingItem(name="b.txt", is_dir=False, size=12),
        ListingItem(name="zdir", is_dir=True),
        ListingItem(name=HOSTILE, is_dir=False, size=3),
        ListingItem(name="adir", is_dir=True),
    ]
    page = _parse(render_listing("/fixtures/sub/", items))
    assert set(page.tags) <= {
        "html",
        "head",
        "meta",
        "title",
        "style",
        "body",
        "h1",
        "table",
        "tr",
        "td",
        "a",
    }
    hrefs = [href for href, _ in page.links]
    assert hrefs[:3] == ["../", "adir/", "zdir/"]  # parent, then folders first
    texts = [text for _, text in page.links]
    assert HOSTILE in texts  # shown literally
    hostile_href = hrefs[texts.index(HOSTILE)]
    assert re.fullmatch(r"[A-Za-z0-9%._~-]+", hostile_href)
    assert unquote(hostile_href) == HOSTILE
    body = render_listing("/fixtures/sub/", items)
    assert b"<script>" not in body and b"<img" not in body
    assert b">12<" in body


def test_top_has_no_parent_link():
    page = _parse(render_listing("/", [ListingItem(name="fixtures", is_dir=True)]))
    assert [href for href, _ in page.links] == ["fixtures/"]


def test_hostile_folder_path_in_title_is_escaped():
    body = render_listing("/<script>x</script>/", [])
    assert b"<script>" not in body
    assert b"&lt;script&gt;" in body


@pytest.fixture
def server(tmp_path):
    srv = pytest_twisted.blockon(start_content_server(tmp_path))
    yield srv
    pytest_twisted.blockon(srv.stop())


@pytest_twisted.inlineCallbacks
def test_listing_over_http_with_a_hostile_name(server):
    yield server.add("fixtures/sub/" + HOSTILE, b"evil")
    yield server.add("fixtures/sub/plain file.txt", b"plain!")
    yield server.add("fixtures/sub/nested/deeper.txt", b"d")
    yield server.add("fixtures/top.txt", b"t")
    yield server.add("fixtures/sub/<b onmouseover=alert(1)>/x.txt", b"x")
    got = yield server.curl("/fixtures/sub/")
    assert got.status == 200
    assert got.header("content-type") == "text/html; charset=utf-8"
    assert got.header("content-security-policy") == "default-src 'none'; style-src 'unsafe-inline'"
    assert got.header("x-content-type-options") == "nosniff"
    assert got.header("content-length") == str(len(got.body))
    assert b"<script>" not in got.body
    page = _parse(got.body)
    links = dict(page.links)
    assert [href for href, _ in page.links][:3] == [
        "../",
        "%3Cb%20onmouseover%3Dalert%281%29%3E/",
        "nested/",
    ]
    assert b"<b " not in got.body and b"<img" not in got.body
    assert links["plain%20file.txt"] == "plain file.txt"
    # following each file link from the listing gets the file's bytes
    for href, text in page.links:
        if href.endswith("/"):
            continue
        fetched = yield server.curl("/fixtures/sub/" + href)
        assert fetched.status == 200, (href, fetched.status)
        assert fetched.body == {"plain file.txt": b"plain!", HOSTILE: b"evil"}[text]
    nested = yield server.curl("/fixtures/sub/nested/")
    assert [href for href, _ in _parse(nested.body).links] == ["../", "deeper.txt"]


@pytest_twisted.inlineCallbacks
def test_listing_shows_sizes_and_head_has_no_body(server):
    yield server.add("fixtures/sized.bin", b"x" * 1234)
    got = yield server.curl("/fixtures/")
    assert b">1234<" in got.body
    head = yield server.curl("/fixtures/", "-I")
    assert head.status == 200
    assert head.body == b""
    assert head.header("content-length") == str(len(got.body))
    assert head.header("content-security-policy") is not None
