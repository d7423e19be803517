"""Request path normalisation and traversal protection: unit tests of `parse_request_target`,
and every encoding of a traversal sent to a real server by curl and by a raw socket."""

from __future__ import annotations

import re

import pytest
import pytest_twisted

from streamer.paths import (
    MAX_TARGET_LENGTH,
    RefusedPath,
    RequestPath,
    origin_form,
    parse_request_target,
)
from tests.streamer.content_support import start_content_server
from tests.support.clients import raw_http

SECRET = b"TOP-SECRET-OUTSIDE-THE-CATALOG"


@pytest.mark.parametrize(
    "target, expected",
    [
        (b"/", RequestPath("", True)),
        (b"/fixtures", RequestPath("fixtures", False)),
        (b"/fixtures/", RequestPath("fixtures", True)),
        (b"/fixtures/a/b.txt", RequestPath("fixtures/a/b.txt", False)),
        (b"/fixtures/a/b.txt?sig=1&expires=2", RequestPath("fixtures/a/b.txt", False)),
        (b"/fixtures/with%20space.txt", RequestPath("fixtures/with space.txt", False)),
        (b"/fixtures/%252e%252e/x", RequestPath("fixtures/%2e%2e/x", False)),
        (b"/fixtures/%C3%A9t%C3%A9.txt", RequestPath("fixtures/\u00e9t\u00e9.txt", False)),
        (b"/fixtures/..a/b..", RequestPath("fixtures/..a/b..", False)),
        # RFC 3986 §5.2.4 dot-segment removal, and empty segments merged
        (b"/fixtures/./Packages", RequestPath("fixtures/Packages", False)),
        (b"/fixtures/./InRelease?x=1", RequestPath("fixtures/InRelease", False)),
        (b"/fixtures/./", RequestPath("fixtures", True)),
        (b"/fixtures/.", RequestPath("fixtures", True)),
        (b"/fixtures/a/..", RequestPath("fixtures", True)),
        (b"/fixtures/a/../b", RequestPath("fixtures/b", False)),
        (b"/fixtures/a/./../b/./c", RequestPath("fixtures/b/c", False)),
        (b"/fixtures/..", RequestPath("", True)),
        (b"/fixtures/../other/x", RequestPath("other/x", False)),
        (b"/./fixtures", RequestPath("fixtures", False)),
        (b"/fixtures//a", RequestPath("fixtures/a", False)),
        (b"/fixtures/a//", RequestPath("fixtures/a", True)),
        (b"//etc/passwd", RequestPath("etc/passwd", False)),
        (b"//", RequestPath("", True)),
        (b"/.", RequestPath("", True)),
    ],
)
def test_accepted_targets(target, expected):
    assert parse_request_target(target) == expected


@pytest.mark.parametrize(
    "target, status",
    [
        (b"/../etc/passwd", 400),
        (b"/..", 400),
        (b"/fixtures/../../etc/passwd", 400),
        (b"/fixtures/a/../../../etc/passwd", 400),
        (b"/fixtures/./.././../etc", 400),
        # percent-encoded dot segments are refused, never resolved (even when a later '..'
        # would remove them)
        (b"/fixtures/%2e%2e/%2e%2e/etc/passwd", 400),
        (b"/fixtures/%2e%2e/../x", 400),
        (b"/fixtures/%2e/x", 400),
        (b"/fixtures/%2E%2E/x", 400),
        (b"/fixtures/.%2e/x", 400),
        (b"/fixtures/..%2f..%2fetc", 400),
        (b"/fixtures/%2e", 400),
        (b"/fixtures/a%00.txt", 400),
        (b"/fixtures/a\x00.txt", 400),
        (b"/fixtures/a%0d%0aSet-Cookie:x", 400),
        (b"/fixtures/a%7f", 400),
        (b"/fixtures/%c2%85", 400),
        (b"/fixtures\\..\\secret", 400),
        (b"/fixtures/%5c..%5csecret", 400),
        # encoded slashes are refused, not split (a front sees /fixtures%2Fa as one segment)
        (b"/fixtures/a%2Fb", 400),
        (b"/fixtures%2Fa", 400),
        (b"/fixtures/a%2Fb/../c", 400),
        (b"/fixtures/a%2F%2Fb", 400),
        (b"/fixtures/a%2F", 400),
        (b"/%2Fetc", 400),
        (b"http://evil.example/fixtures/a", 400),
        (b"https://127.0.0.1/x", 400),
        (b"evil.example:443", 400),
        (b"*", 400),
        (b"", 400),
        (b"fixtures/a", 400),
        (b"/fixtures/a#frag", 400),
        (b"/fixtures/%ff%fe", 404),
        (b"/" + b"a" * MAX_TARGET_LENGTH, 414),
    ],
)
def test_refused_targets(target, status):
    with pytest.raises(RefusedPath) as info:
        parse_request_target(target)
    assert info.value.status == status


@pytest.mark.parametrize(
    "target, expected",
    [
        (b"http://h/a/b?c=d", (b"/a/b?c=d", b"h")),
        (b"HTTPS://h:8443/a", (b"/a", b"h:8443")),
        (b"http://h?x=1", (b"/?x=1", b"h")),
        (b"http://h", (b"/", b"h")),
        (b"http://[::1]:80/a", (b"/a", b"[::1]:80")),
        (b"http://user:pw@h/a", None),  # userinfo: refused as a non-path target
        (b"http:///a", None),
        (b"http://h#/a", None),  # "/a" is the fragment: the authority is not "h#"
        (b"http://h#frag", None),
        (b"http://[::1/a", None),
        (b"http://:80/a", None),
        (b"http://h:/a", (b"/a", b"h:")),  # (an empty port is allowed: RFC 3986 §3.2.3)
        (b"http://h%41.example:8080", (b"/", b"h%41.example:8080")),
        (b"ftp://h/a", None),
        (b"/a", None),
        (b"h:443", None),
        (b"*", None),
    ],
)
def test_absolute_form_targets_become_origin_form(target, expected):
    assert origin_form(target) == expected


def test_url_path_round_trip():
    assert RequestPath("", True).url_path == "/"
    assert RequestPath("a/b", True).url_path == "/a/b/"
    assert RequestPath("a/b", False).segments == ["a", "b"]


@pytest.fixture
def server(tmp_path):
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "secret.txt").write_bytes(SECRET)
    srv = pytest_twisted.blockon(start_content_server(tmp_path))
    pytest_twisted.blockon(srv.add("fixtures/public.txt", b"public"))
    pytest_twisted.blockon(srv.add("fixtures/%2e%2e/literal.txt", b"literal name"))
    yield srv
    pytest_twisted.blockon(srv.stop())


@pytest.fixture
def looked_up(server):
    """Every path the server asks the catalog about (lookup and list_dir)."""
    seen: list[str] = []
    lookup, list_dir = server.catalog.lookup, server.catalog.list_dir

    def recording_lookup(path):
        seen.append(path)
        return lookup(path)

    def recording_list_dir(path):
        seen.append(path)
        return list_dir(path)

    server.catalog.lookup = recording_lookup
    server.catalog.list_dir = recording_list_dir
    return seen


CURL_ATTEMPTS = [
    "/fixtures/../secret.txt",
    "/fixtures/../../secret.txt",
    "/../secret.txt",
    "/fixtures/%2e%2e/secret.txt",
    "/fixtures/%2e%2e/%2e%2e/secret.txt",
    "/fixtures/..%2fsecret.txt",
    "/fixtures/%2E%2E%2F%2E%2E%2Fsecret.txt",
    "/fixtures/public.txt%00.html",
    "/fixtures/%5c..%5c..%5csecret.txt",
    "//secret.txt",
    "/fixtures/a/../../../secret.txt",
    "/fixtures/%2e%2e/../public.txt",
    "/storage/secret.txt",
    "/storage/",
    "/artifacts/",
    "/fixtures/%252e%252e/%252e%252e/secret.txt",
]


@pytest.mark.parametrize("target", CURL_ATTEMPTS)
@pytest_twisted.inlineCallbacks
def test_traversal_with_curl_never_leaves_the_catalog(server, looked_up, target):
    got = yield server.curl(target)
    assert got.status in (400, 404), (target, got.status)
    assert SECRET not in got.body
    assert b"Traceback" not in got.body
    for path in looked_up:  # nothing with a dot segment ever reached the catalog
        assert ".." not in path.split("/") and "." not in path.split("/")
        assert "\x00" not in path and "\\" not in path


@pytest.mark.parametrize(
    "target",
    [
        "/fixtures/./public.txt",
        "/fixtures//public.txt",
        "//fixtures/public.txt",
        "/fixtures/sub/../public.txt",
        "/./fixtures/./sub/.././/public.txt",
    ],
)
@pytest_twisted.inlineCallbacks
def test_dot_and_empty_segments_are_normalised(server, looked_up, target):
    """The forms apt and other clients send (``./`` from flat repositories) serve the file."""
    got = yield server.curl(target)
    assert (got.status, got.body) == (200, b"public"), target
    assert looked_up == ["fixtures/public.txt"]


@pytest_twisted.inlineCallbacks
def test_double_encoding_is_decoded_once(server, looked_up):
    got = yield server.curl("/fixtures/%252e%252e/literal.txt")
    assert got.status == 200
    assert got.body == b"literal name"
    assert "fixtures/%2e%2e/literal.txt" in looked_up


RAW_ATTEMPTS = [
    # (the service's request turns absolute-form into origin form first; the content
    # resource alone, as here, refuses it)
    b"GET http://evil.example/fixtures/public.txt HTTP/1.1\r\nHost: evil.example\r\n",
    b"GET http://127.0.0.1/../secret.txt HTTP/1.1\r\nHost: x\r\n",
    b"GET /fixtures/..\\..\\secret.txt HTTP/1.1\r\nHost: x\r\n",
    b"GET /fixtures\\public.txt HTTP/1.1\r\nHost: x\r\n",
    b"GET /fixtures/public.txt\x00 HTTP/1.1\r\nHost: x\r\n",
    b"GET /fixtures/../secret.txt HTTP/1.1\r\nHost: x\r\n",
    b"GET * HTTP/1.1\r\nHost: x\r\n",
    b"GET evil.example:80 HTTP/1.1\r\nHost: x\r\n",
    b"GET /" + b"a/" * 3000 + b" HTTP/1.1\r\nHost: x\r\n",
    b"GET /fixtures/\xff\xfe HTTP/1.1\r\nHost: x\r\n",
    b"GET /fixtures/%ff HTTP/1.1\r\nHost: x\r\n",
]


@pytest.mark.parametrize("request_head", RAW_ATTEMPTS, ids=lambda r: repr(r[:40]))
@pytest_twisted.inlineCallbacks
def test_raw_request_lines_are_refused_cleanly(server, request_head):
    result = yield raw_http(
        "127.0.0.1",
        server.port.getHost().port,
        request_head + b"Connection: close\r\n\r\n",
    )
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", result.data)
    assert match is not None, result
    assert int(match.group(1)) in (400, 404, 405, 414)  # twisted answers "GET *" with 405
    assert SECRET not in result.data
    assert b"Traceback" not in result.data
    assert b"public" not in result.data.partition(b"\r\n\r\n")[2]


@pytest_twisted.inlineCallbacks
def test_server_keeps_serving_after_hostile_paths(server):
    for target in CURL_ATTEMPTS:
        yield server.curl(target)
    got = yield server.curl("/fixtures/public.txt")
    assert got.status == 200 and got.body == b"public"
