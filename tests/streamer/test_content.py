"""ContentResource dispatch on a real loopback server: stored hits, 404, 405, folders, index.html,
redirects, errors without tracebacks, and the lazy branch's hand-off."""

from __future__ import annotations

import os
import re

import pytest
import pytest_twisted
from twisted.internet import defer, task

from tests.streamer.content_support import start_content_server
from tests.support.clients import raw_http


@pytest.fixture
def server(tmp_path):
    srv = pytest_twisted.blockon(start_content_server(tmp_path))
    yield srv
    pytest_twisted.blockon(srv.stop())


@pytest_twisted.inlineCallbacks
def test_stored_file_get_and_head(server):
    data = b"hello stored world\n" * 100
    entry = yield server.add("fixtures/a/hello.txt", data)
    got = yield server.curl("/fixtures/a/hello.txt")
    assert got.status == 200
    assert got.body == data
    assert got.header("content-length") == str(len(data))
    assert got.header("content-type") == "text/plain"
    assert got.header("etag") == f'"{entry.sha256}"'
    assert got.header("accept-ranges") == "bytes"
    assert got.header("last-modified").endswith("GMT")
    head = yield server.curl("/fixtures/a/hello.txt", "-I")
    assert head.status == 200
    assert head.body == b""
    assert head.header("content-length") == str(len(data))
    assert head.header("etag") == f'"{entry.sha256}"'


@pytest_twisted.inlineCallbacks
def test_query_string_is_not_part_of_the_key(server):
    yield server.add("fixtures/q.bin", b"\x00\x01\x02")
    got = yield server.curl("/fixtures/q.bin?expires=1&signature=abc")
    assert got.status == 200
    assert got.body == b"\x00\x01\x02"
    assert got.header("content-type") == "application/octet-stream"


@pytest_twisted.inlineCallbacks
def test_unknown_path_is_404_plain_text(server):
    yield server.add("fixtures/known.txt", b"x")
    got = yield server.curl("/fixtures/unknown.txt")
    assert got.status == 404
    assert got.header("content-type").startswith("text/plain")
    assert got.body == b"not found\n"
    got = yield server.curl("/nowhere/at/all")
    assert got.status == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "BREW"])
@pytest_twisted.inlineCallbacks
def test_other_methods_are_405_with_allow(server, method):
    yield server.add("fixtures/known.txt", b"x")
    got = yield server.curl("/fixtures/known.txt", "-X", method)
    assert got.status == 405
    assert got.header("allow") == "GET, HEAD"


@pytest_twisted.inlineCallbacks
def test_folder_without_slash_redirects(server):
    yield server.add("fixtures/sub/file.txt", b"x")
    got = yield server.curl("/fixtures/sub?x=1")
    assert got.status == 301
    assert got.header("location") == "/fixtures/sub/?x=1"
    got = yield server.curl("/fixtures")
    assert got.status == 301
    assert got.header("location") == "/fixtures/"


@pytest_twisted.inlineCallbacks
def test_folder_lists_and_top_lists_base_paths(server):
    yield server.add("fixtures/sub/file.txt", b"abc")
    got = yield server.curl("/fixtures/sub/")
    assert got.status == 200
    assert got.header("content-type") == "text/html; charset=utf-8"
    assert b'href="file.txt"' in got.body
    top = yield server.curl("/")
    assert top.status == 200
    assert b'href="fixtures/"' in top.body


@pytest_twisted.inlineCallbacks
def test_empty_base_path_is_an_empty_listing(tmp_path):
    srv = yield start_content_server(tmp_path, base_paths=("fixtures", "deep/er"))
    try:
        got = yield srv.curl("/fixtures/")
        assert got.status == 200
        assert b"Index of /fixtures/" in got.body
        got = yield srv.curl("/deep/")
        assert got.status == 200
        assert b'href="er/"' in got.body
        got = yield srv.curl("/deep/er/")
        assert got.status == 200
        got = yield srv.curl("/deep/other/")
        assert got.status == 404
    finally:
        yield srv.stop()


@pytest_twisted.inlineCallbacks
def test_folder_serves_its_index_html(server):
    page = b"<html>welcome</html>"
    yield server.add("fixtures/site/index.html", page)
    yield server.add("fixtures/site/other.txt", b"x")
    got = yield server.curl("/fixtures/site/")
    assert got.status == 200
    assert got.body == page
    assert got.header("content-type") == "text/html"


@pytest_twisted.inlineCallbacks
def test_file_path_with_trailing_slash_is_404(server):
    yield server.add("fixtures/file.txt", b"x")
    got = yield server.curl("/fixtures/file.txt/")
    assert got.status == 404


@pytest_twisted.inlineCallbacks
def test_cache_status_is_hit_for_stored(server):
    yield server.add("fixtures/file.txt", b"x")
    seen = []
    original = server.site.log

    def log(request):
        seen.append(getattr(request, "cache_status", None))
        return original(request)

    server.site.log = log
    got = yield server.curl("/fixtures/file.txt")
    assert got.status == 200
    assert seen == ["hit"]


@pytest_twisted.inlineCallbacks
def test_stored_flag_without_file_is_not_served_from_disk(server):
    """The catalog says stored but the file is gone: the stored branch is not taken."""
    entry = yield server.add("fixtures/gone.txt", b"gone")
    os.unlink(server.storage.path_for(entry.sha256))
    got = yield server.curl("/fixtures/gone.txt")
    # The entry's upstream (port 9, discard) refuses connections: the lazy path answers 502
    # (or, without a lazy streamer, "not available" 502); never a 200 with missing bytes.
    assert got.status == 502
    assert got.header("content-type").startswith("text/plain")
    assert b"Traceback" not in got.body


@pytest_twisted.inlineCallbacks
def test_file_stored_before_the_catalog_flag_is_a_hit(server):
    data = b"already here"
    yield server.add("fixtures/early.txt", data, stored=False)
    source = server.root / "early"
    source.write_bytes(data)
    server.storage.import_file(str(source))
    got = yield server.curl("/fixtures/early.txt")
    assert got.status == 200
    assert got.body == data


@pytest_twisted.inlineCallbacks
def test_catalog_failure_is_500_without_traceback(server):
    def broken(path):
        return defer.fail(RuntimeError("database exploded: secret detail"))

    server.catalog.lookup = broken
    got = yield server.curl("/fixtures/anything.txt")
    assert got.status == 500
    assert got.body == b"internal server error\n"
    assert b"Traceback" not in got.body and b"secret" not in got.body


@pytest_twisted.inlineCallbacks
def test_a_raising_storage_is_500_and_the_server_keeps_serving(server):
    yield server.add("fixtures/ok.txt", b"ok")
    original = server.storage.open

    def boom(sha256, size=None):
        raise PermissionError("no access to the artifact")

    server.storage.open = boom
    got = yield server.curl("/fixtures/ok.txt")
    assert got.status == 500
    assert b"Traceback" not in got.body
    server.storage.open = original
    got = yield server.curl("/fixtures/ok.txt")
    assert got.status == 200 and got.body == b"ok"


@pytest_twisted.inlineCallbacks
def test_pipelined_requests_are_answered_in_order(server):
    yield server.add("fixtures/one.txt", b"first")
    yield server.add("fixtures/two.txt", b"second")
    port = server.port.getHost().port
    request = (
        b"GET /fixtures/one.txt HTTP/1.1\r\nHost: x\r\n\r\n"
        b"HEAD /fixtures/two.txt HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /fixtures/missing HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /fixtures/two.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    result = yield raw_http("127.0.0.1", port, request)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", result.data)
    assert statuses == [b"200", b"200", b"404", b"200"]
    assert result.data.index(b"first") < result.data.index(b"not found")
    assert result.data.endswith(b"second")


@pytest_twisted.inlineCallbacks
def test_client_leaving_during_the_lookup_opens_nothing(server):
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    from tests.streamer.content_support import open_fds_to

    entry = yield server.add("fixtures/slow.txt", b"slow lookup")
    lookup = server.catalog.lookup
    answered = []

    def slow_lookup(path):
        def later():
            answered.append(path)
            return lookup(path)

        return deferLater(reactor, 0.3, later)

    server.catalog.lookup = slow_lookup
    result = yield raw_http(
        "127.0.0.1",
        server.port.getHost().port,
        b"GET /fixtures/slow.txt HTTP/1.1\r\nHost: x\r\n\r\n",
        timeout=0.1,
    )
    assert result.timed_out and result.data == b""
    yield deferLater(reactor, 0.5, lambda: None)
    assert answered == ["fixtures/slow.txt"]
    assert open_fds_to(server.storage.path_for(entry.sha256)) == 0
    server.catalog.lookup = lookup
    got = yield server.curl("/fixtures/slow.txt")
    assert got.status == 200 and got.body == b"slow lookup"


@pytest_twisted.inlineCallbacks
def test_behind_the_service_root_resource(server):
    """Mounted under the service's root (which handles /metrics and /healthz), paths are the
    same: the resource reads the raw request target, not twisted's prepath/postpath."""
    from twisted.internet import reactor
    from twisted.web import server as web_server
    from twisted.web.resource import Resource

    from streamer.service import RootResource

    yield server.add("fixtures/deep/file.txt", b"deep")
    health = Resource()
    health.isLeaf = True
    health.render = lambda request: b"ok"
    root = RootResource(server.resource, {b"healthz": health}, lambda: True)
    site = web_server.Site(root)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}"
    try:
        from tests.support.clients import run_curl

        out = yield run_curl("--path-as-is", base + "/fixtures/deep/file.txt")
        assert out.stdout == b"deep"
        out = yield run_curl("--path-as-is", base + "/healthz")
        assert out.stdout == b"ok"
        # One normalised path for the root and the content: /fixtures/../healthz is /healthz,
        # a '..' above the root is refused by the root, below a reserved name is 404.
        out = yield run_curl("--path-as-is", base + "/fixtures/../healthz")
        assert out.stdout == b"ok"
        out = yield run_curl("--path-as-is", "-w", "%{http_code}", base + "/fixtures/../../x")
        assert out.stdout.endswith(b"400")
        out = yield run_curl("--path-as-is", "-w", "%{http_code}", base + "/healthz/x")
        assert out.stdout.endswith(b"404")
        out = yield run_curl("--path-as-is", base + "/fixtures/deep/./file.txt")
        assert out.stdout == b"deep"
        out = yield run_curl("--path-as-is", base + "/fixtures/deep/")
        assert b'href="file.txt"' in out.stdout
        raw = yield raw_http(
            "127.0.0.1",
            port.getHost().port,
            b"GET http://evil/fixtures/deep/file.txt HTTP/1.1\r\n"
            b"Host: x\r\nConnection: close\r\n\r\n",
        )
        assert raw.data.startswith(b"HTTP/1.1 400 ")
    finally:
        yield port.stopListening()


def counted_lookups(server) -> list[str]:
    """Record every path the content resource asks the catalog for, in order."""
    asked: list[str] = []
    lookup = server.catalog.lookup

    def counting_lookup(path):
        asked.append(path)
        return lookup(path)

    server.catalog.lookup = counting_lookup
    lookup_now = getattr(server.catalog, "lookup_now", None)
    if lookup_now is not None:  # (answers at once when it can: asked all the same)

        def counting_lookup_now(path):
            found = lookup_now(path)
            if found is not None:
                asked.append(path)
            return found

        server.catalog.lookup_now = counting_lookup_now
    return asked


def cache_on_a_clock(server, seconds: float) -> task.Clock:
    """The lookup cache's time as a Clock the test advances (the order of the requests
    decides, not how fast a loaded machine runs them), with a cache time of *seconds*."""
    clock = task.Clock()
    server.resource.reactor = clock
    server.resource.lookup_cache_seconds = seconds
    return clock


@pytest_twisted.inlineCallbacks
def test_lookups_are_reused_briefly_and_unknown_paths_never(server):
    entry = yield server.add("fixtures/cached.txt", b"cached body")
    asked = counted_lookups(server)
    clock = cache_on_a_clock(server, 0.3)
    for _ in range(3):
        got = yield server.curl("/fixtures/cached.txt")
        assert got.status == 200 and got.body == b"cached body"
        assert got.header("etag") == f'"{entry.sha256}"'
    assert asked == ["fixtures/cached.txt"]
    for _ in range(2):
        missing = yield server.curl("/fixtures/missing.txt")
        assert missing.status == 404
    assert asked.count("fixtures/missing.txt") == 2, "a miss is asked again (a sync may add it)"
    clock.advance(0.29)
    got = yield server.curl("/fixtures/cached.txt")
    assert asked.count("fixtures/cached.txt") == 1, "still inside the cache time"
    # After the cache time the catalog is asked again, and sees a change (new content).
    clock.advance(0.02)
    yield server.add("fixtures/cached.txt", b"new body")
    got = yield server.curl("/fixtures/cached.txt")
    assert got.body == b"new body"
    assert asked.count("fixtures/cached.txt") == 2


def counted_opens(server) -> list[str]:
    """Record every artifact the content resource tries to open from storage."""
    opened: list[str] = []
    open_ = server.storage.open

    def counting_open(sha256, size=None):
        opened.append(sha256)
        return open_(sha256, size)

    server.storage.open = counting_open
    return opened


@pytest_twisted.inlineCallbacks
def test_cached_entries_not_on_disk_go_lazy_after_one_look(server):
    """A path whose entries are cached but whose artifact is not on disk (gone, or a
    `streamed` remote's, never stored) is looked for on disk once and handed to the lazy
    path with those entries: no second lookup, no second look on disk."""
    entry = yield server.add("fixtures/again.txt", b"again")
    asked = counted_lookups(server)
    cache_on_a_clock(server, 0.3)
    got = yield server.curl("/fixtures/again.txt")
    assert (got.status, got.body) == (200, b"again")
    os.unlink(server.storage.path_for(entry.sha256))
    opened = counted_opens(server)
    got = yield server.curl("/fixtures/again.txt")
    # The entry's upstream (port 9, discard) refuses connections: the lazy path's 502.
    assert got.status == 502 and b"Traceback" not in got.body
    assert opened == [entry.sha256]
    assert asked == ["fixtures/again.txt"]

    def broken(request, entries, path):
        raise RuntimeError("lazy path exploded: secret detail")

    server.resource.lazy.serve = broken
    got = yield server.curl("/fixtures/again.txt")
    assert got.status == 500 and got.body == b"internal server error\n"


@pytest_twisted.inlineCallbacks
def test_lookups_are_reused_until_a_sync_changes_the_catalog(server):
    """A path is looked up once while no sync changes the catalog (a warm file costs no
    query), however long; a sync that does is seen within `lookup_cache_seconds`."""
    yield server.add("fixtures/kept.txt", b"kept body")
    asked = counted_lookups(server)
    clock = cache_on_a_clock(server, 0.3)
    for _ in range(3):
        got = yield server.curl("/fixtures/kept.txt")
        assert (got.status, got.body) == (200, b"kept body")
        clock.advance(60)  # no sync in between: the catalog's version is unchanged
    assert asked == ["fixtures/kept.txt"]
    yield server.add("fixtures/kept.txt", b"new body")
    clock.advance(0.3)
    got = yield server.curl("/fixtures/kept.txt")
    assert (got.status, got.body) == (200, b"new body")
    assert asked == ["fixtures/kept.txt"] * 2


@pytest_twisted.inlineCallbacks
def test_a_path_the_catalog_answers_at_once_needs_no_coroutine(server):
    """While the catalog's version is current, a path SQLite answers at once is served (or
    handed to the lazy path) without the dispatch coroutine and its Deferreds; a path the
    catalog does not know still goes there with its empty answer (a folder, or a 404), not
    asked twice."""
    yield server.add("fixtures/first.txt", b"first")
    yield server.add("fixtures/second.txt", b"second")
    yield server.add("fixtures/sub/third.txt", b"third")
    cache_on_a_clock(server, 0.3)
    dispatched: list[object] = []
    dispatch = server.resource._dispatch

    def counted(request, target, known=None):
        dispatched.append(known)
        return dispatch(request, target, *([] if known is None else [known]))

    server.resource._dispatch = counted
    got = yield server.curl("/fixtures/first.txt")  # the catalog's version is asked here
    assert (got.status, got.body, len(dispatched)) == (200, b"first", 1)
    asked = counted_lookups(server)
    got = yield server.curl("/fixtures/second.txt")
    assert (got.status, got.body, len(dispatched)) == (200, b"second", 1)
    got = yield server.curl("/fixtures/missing.txt")
    assert got.status == 404 and dispatched[1:] == [[]]
    got = yield server.curl("/fixtures/sub")
    assert got.status == 301 and got.header("location") == "/fixtures/sub/"
    assert asked == ["fixtures/second.txt", "fixtures/missing.txt", "fixtures/sub"]
