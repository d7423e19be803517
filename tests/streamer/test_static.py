"""Serving stored artifacts over a real socket: conditional requests, ranges (single, multiple,
suffix, 416, abusive), X-Accel-Redirect, flow control with a slow reader, fds closed."""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import math
import os

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater

from streamer.config import ServerConfig
from tests.streamer.content_support import open_fds_to, start_content_server
from tests.support.clients import raw_http
from tests.support.polling import holds_within

DATA = bytes(range(256)) * 40  # 10240 bytes


@pytest.fixture
def server(tmp_path):
    srv = pytest_twisted.blockon(start_content_server(tmp_path))
    pytest_twisted.blockon(srv.add("fixtures/data.bin", DATA))
    yield srv
    pytest_twisted.blockon(srv.stop())


def _etag():
    return '"' + hashlib.sha256(DATA).hexdigest() + '"'


@pytest_twisted.inlineCallbacks
def test_if_none_match_gives_304(server):
    got = yield server.curl("/fixtures/data.bin", "-H", f"If-None-Match: {_etag()}")
    assert got.status == 304
    assert got.body == b""
    assert got.header("etag") == _etag()
    got = yield server.curl("/fixtures/data.bin", "-H", f'If-None-Match: "other", W/{_etag()}')
    assert got.status == 304
    got = yield server.curl("/fixtures/data.bin", "-H", 'If-None-Match: "other"')
    assert got.status == 200 and got.body == DATA


@pytest_twisted.inlineCallbacks
def test_if_modified_since(server):
    first = yield server.curl("/fixtures/data.bin")
    last_modified = first.header("last-modified")
    got = yield server.curl("/fixtures/data.bin", "-H", f"If-Modified-Since: {last_modified}")
    assert got.status == 304
    old = "Thu, 01 Jan 1998 00:00:00 GMT"
    got = yield server.curl("/fixtures/data.bin", "-H", f"If-Modified-Since: {old}")
    assert got.status == 200 and got.body == DATA
    got = yield server.curl("/fixtures/data.bin", "-H", "If-Modified-Since: garbage")
    assert got.status == 200
    # If-None-Match wins over If-Modified-Since
    got = yield server.curl(
        "/fixtures/data.bin",
        "-H",
        f"If-Modified-Since: {last_modified}",
        "-H",
        'If-None-Match: "other"',
    )
    assert got.status == 200


@pytest_twisted.inlineCallbacks
def test_if_match_failure_is_412(server):
    got = yield server.curl("/fixtures/data.bin", "-H", 'If-Match: "other"')
    assert got.status == 412
    got = yield server.curl("/fixtures/data.bin", "-H", f"If-Match: {_etag()}")
    assert got.status == 200


@pytest_twisted.inlineCallbacks
def test_single_range(server):
    got = yield server.curl("/fixtures/data.bin", "-r", "100-199")
    assert got.status == 206
    assert got.body == DATA[100:200]
    assert got.header("content-range") == f"bytes 100-199/{len(DATA)}"
    assert got.header("content-length") == "100"


@pytest_twisted.inlineCallbacks
def test_suffix_and_open_ranges(server):
    got = yield server.curl("/fixtures/data.bin", "-H", "Range: bytes=-10")
    assert got.status == 206 and got.body == DATA[-10:]
    got = yield server.curl("/fixtures/data.bin", "-H", "Range: bytes=10000-")
    assert got.status == 206 and got.body == DATA[10000:]
    got = yield server.curl("/fixtures/data.bin", "-H", "Range: bytes=10000-99999999")
    assert got.header("content-range") == f"bytes 10000-{len(DATA) - 1}/{len(DATA)}"


@pytest_twisted.inlineCallbacks
def test_multiple_ranges_are_multipart(server):
    got = yield server.curl("/fixtures/data.bin", "-r", "0-9,5000-5009,-3")
    assert got.status == 206
    content_type = got.header("content-type")
    assert content_type.startswith("multipart/byteranges; boundary=")
    assert got.header("content-length") == str(len(got.body))
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + got.body
    )
    parts = list(message.iter_parts())
    assert [p.get_payload(decode=True) for p in parts] == [
        DATA[0:10],
        DATA[5000:5010],
        DATA[-3:],
    ]
    assert parts[1]["Content-Range"] == f"bytes 5000-5009/{len(DATA)}"
    assert parts[1]["Content-Type"] == "application/octet-stream"


@pytest_twisted.inlineCallbacks
def test_unsatisfiable_range_is_416(server):
    got = yield server.curl("/fixtures/data.bin", "-H", f"Range: bytes={len(DATA)}-")
    assert got.status == 416
    assert got.header("content-range") == f"bytes */{len(DATA)}"


@pytest_twisted.inlineCallbacks
def test_reversed_or_invalid_ranges_are_ignored(server):
    for header in ("bytes=20-10", "bytes=0-1,9-3", "bytes=x-y", "pages=1-2"):
        got = yield server.curl("/fixtures/data.bin", "-H", f"Range: {header}")
        assert got.status == 200, header
        assert got.body == DATA


@pytest_twisted.inlineCallbacks
def test_range_abuse_does_not_multiply_parts(server):
    header = "bytes=" + "0-0," * 3000  # 12 kB: within twisted's header limit
    got = yield server.curl("/fixtures/data.bin", "-H", f"Range: {header}")
    assert got.status == 206
    assert got.body == DATA[0:1]
    overlapping = "bytes=" + ",".join(f"{i}-{i + 500}" for i in range(0, 5000, 7))
    got = yield server.curl("/fixtures/data.bin", "-H", f"Range: {overlapping}")
    assert got.status == 206
    assert got.body == DATA[0 : 4998 + 500 + 1]
    many = "bytes=" + ",".join(f"{i * 20}-{i * 20}" for i in range(200))
    got = yield server.curl("/fixtures/data.bin", "-H", f"Range: {many}")
    assert got.status == 200 and got.body == DATA


@pytest_twisted.inlineCallbacks
def test_oversized_range_header_is_refused_not_crashing(server):
    header = "bytes=" + "0-0," * 5000  # 20 kB of headers: twisted refuses the request
    got = yield server.curl("/fixtures/data.bin", "-H", f"Range: {header}")
    assert got.status in (400, 431) or got.exit_code != 0
    again = yield server.curl("/fixtures/data.bin")
    assert again.status == 200 and again.body == DATA


@pytest_twisted.inlineCallbacks
def test_if_range(server):
    got = yield server.curl("/fixtures/data.bin", "-r", "0-9", "-H", f"If-Range: {_etag()}")
    assert got.status == 206 and got.body == DATA[:10]
    got = yield server.curl("/fixtures/data.bin", "-r", "0-9", "-H", 'If-Range: "old"')
    assert got.status == 200 and got.body == DATA
    first = yield server.curl("/fixtures/data.bin", "-I")
    date = first.header("last-modified")
    got = yield server.curl("/fixtures/data.bin", "-r", "0-9", "-H", f"If-Range: {date}")
    assert got.status == 206
    old = "Thu, 01 Jan 1998 00:00:00 GMT"
    got = yield server.curl("/fixtures/data.bin", "-r", "0-9", "-H", f"If-Range: {old}")
    assert got.status == 200


@pytest_twisted.inlineCallbacks
def test_head_ignores_range_and_sends_no_body(server):
    got = yield server.curl("/fixtures/data.bin", "-I", "-r", "0-9")
    assert got.status == 200
    assert got.header("content-length") == str(len(DATA))
    assert got.body == b""


@pytest_twisted.inlineCallbacks
def test_empty_file(server):
    yield server.add("fixtures/empty.txt", b"")
    got = yield server.curl("/fixtures/empty.txt")
    assert got.status == 200 and got.body == b""
    assert got.header("content-length") == "0"
    got = yield server.curl("/fixtures/empty.txt", "-r", "0-0")
    assert got.status == 200 and got.body == b""


@pytest_twisted.inlineCallbacks
def test_compressed_files_keep_their_own_type(server):
    yield server.add("fixtures/archive.tar.gz", b"\x1f\x8b fake")
    got = yield server.curl("/fixtures/archive.tar.gz", "-I")
    assert got.header("content-type") == "application/gzip"
    assert got.header("content-encoding") is None


@pytest_twisted.inlineCallbacks
def test_x_accel_redirect_mode(tmp_path):
    config = type("Config", (), {"server": ServerConfig(x_accel_redirect="/protected/")})()
    srv = yield start_content_server(tmp_path, config=config)
    try:
        entry = yield srv.add("fixtures/data.bin", DATA)
        # A request through the front (nginx sets this header) is handed to the front ...
        front = ("-H", "X-Sendfile-Type: X-Accel-Redirect")
        got = yield srv.curl("/fixtures/data.bin", *front)
        assert got.status == 200
        assert got.body == b""
        sha = entry.sha256
        assert got.header("x-accel-redirect") == f"/protected/artifacts/{sha[:2]}/{sha[2:]}"
        assert got.header("content-type") == "application/octet-stream"
        assert got.header("etag") == f'"{sha}"'
        # the header names a real file under the storage root
        relative = got.header("x-accel-redirect").removeprefix("/protected/")
        with open(os.path.join(srv.storage.root, relative), "rb") as f:
            assert f.read() == DATA
        got = yield srv.curl("/fixtures/data.bin", "-H", f'If-None-Match: "{sha}"', *front)
        assert got.status == 304
        # ... one that reached the streamer directly gets the content itself.
        got = yield srv.curl("/fixtures/data.bin")
        assert (got.status, got.body) == (200, DATA)
        assert got.header("x-accel-redirect") is None
        # Both answers say they depend on the header, so no cache mixes them up.
        assert got.header("vary") == "X-Sendfile-Type"
        assert (yield srv.curl("/fixtures/data.bin", *front)).header("vary") == "X-Sendfile-Type"
        got = yield srv.curl("/fixtures/data.bin", "-H", "X-Sendfile-Type: X-Sendfile")
        assert (got.status, got.body) == (200, DATA)
    finally:
        yield srv.stop()


class _SlowReader(protocol.Protocol):
    """Sends one GET, then reads nothing until told to; collects what it then receives."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.chunks: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)
        self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason) -> None:
        self.done.callback(b"".join(self.chunks))


def _connect(port: int, proto: protocol.Protocol) -> defer.Deferred:
    return protocol.ClientCreator(reactor, lambda: proto).connectTCP("127.0.0.1", port)


@pytest_twisted.inlineCallbacks
def test_slow_reader_does_not_make_the_server_buffer(tmp_path):
    srv = yield start_content_server(tmp_path)
    try:
        big = os.urandom(1024 * 1024) * 48  # 48 MiB, more than loopback socket buffers hold
        entry = yield srv.add("fixtures/big.bin", big)
        artifact = srv.storage.path_for(entry.sha256)
        reader = _SlowReader(
            b"GET /fixtures/big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        yield _connect(srv.port.getHost().port, reader)
        # Once the kernel's buffers are full (a busy machine may take more than a second).
        yield holds_within(
            lambda: [t.producerPaused for t in srv.server_transports()] == [True], timeout=10
        )
        (transport,) = srv.server_transports()
        buffered = len(transport.dataBuffer) + transport._tempDataLen
        assert transport.producerPaused, "the producer must be paused while the client stalls"
        assert buffered < 2 * 1024 * 1024, buffered
        assert open_fds_to(artifact) == 1
        reader.transport.resumeProducing()
        body = yield reader.done
        head, _, payload = body.partition(b"\r\n\r\n")
        assert b"200 OK" in head
        assert hashlib.sha256(payload).hexdigest() == entry.sha256
        yield deferLater(reactor, 0.05, lambda: None)
        assert open_fds_to(artifact) == 0
    finally:
        yield srv.stop()


@pytest_twisted.inlineCallbacks
def test_client_disconnect_mid_body_closes_the_file(tmp_path):
    srv = yield start_content_server(tmp_path)
    try:
        big = os.urandom(1024 * 1024) * 32
        entry = yield srv.add("fixtures/big.bin", big)
        artifact = srv.storage.path_for(entry.sha256)
        reader = _SlowReader(b"GET /fixtures/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        yield _connect(srv.port.getHost().port, reader)
        yield deferLater(reactor, 0.3, lambda: None)
        assert open_fds_to(artifact) == 1
        reader.transport.abortConnection()
        yield reader.done
        for _ in range(50):
            if open_fds_to(artifact) == 0:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        assert open_fds_to(artifact) == 0
        got = yield srv.curl("/fixtures/big.bin", "-r", "0-3")
        assert got.body == big[:4]
    finally:
        yield srv.stop()


@pytest_twisted.inlineCallbacks
def test_raw_http10_request_gets_the_whole_body(server):
    result = yield raw_http(
        "127.0.0.1", server.port.getHost().port, b"GET /fixtures/data.bin HTTP/1.0\r\n\r\n"
    )
    head, _, body = result.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert body == DATA


def test_first_chunk_is_small_then_chunks_double_to_full_size(tmp_path):
    """The head and the first bytes leave after one short read (time to first byte); each
    later read doubles up to CHUNK_SIZE (few reactor turns per byte); the body is intact."""
    from twisted.web.test.requesthelper import DummyRequest

    from streamer.static import CHUNK_SIZE, FIRST_CHUNK, FileRangesProducer

    body = os.urandom(3 * CHUNK_SIZE + 5)
    path = tmp_path / "big.bin"
    path.write_bytes(body)
    request = DummyRequest([b"big.bin"])
    request.channel = object()  # connected: the producer finishes the request at the end
    with path.open("rb") as fileobj:
        FileRangesProducer(request, fileobj, [(b"", 0, len(body))]).start()
    sizes = [len(chunk) for chunk in request.written]
    doubling = [FIRST_CHUNK << n for n in range(5) if FIRST_CHUNK << n < CHUNK_SIZE]
    full = (len(body) - sum(doubling)) // CHUNK_SIZE
    rest = len(body) - sum(doubling) - full * CHUNK_SIZE
    assert sizes == [*doubling, *[CHUNK_SIZE] * full, rest]
    assert b"".join(request.written) == body
    assert request.finished


@pytest_twisted.inlineCallbacks
def test_many_stalled_readers_of_a_stored_file_hold_a_share_of_the_budget(tmp_path):
    """100 clients of a stored 8 MiB file that stop reading: the bytes the server holds for
    them (written, not sent) are their shares of SEND_BUDGET, not a full 1 MiB chunk each."""
    from streamer.static import CHUNK_SIZE, SEND_BUDGET, Senders

    srv = yield start_content_server(tmp_path)
    try:
        big = os.urandom(8 * 1024 * 1024)
        yield srv.add("fixtures/big.bin", big)
        request = b"GET /fixtures/big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        readers = [_SlowReader(request) for _ in range(100)]
        for reader in readers:
            yield _connect(srv.port.getHost().port, reader)

        def all_stalled() -> bool:
            paused = [t.producerPaused for t in srv.server_transports()]
            return Senders.count == 100 and paused == [True] * 100

        # Once every response filled its connection (a busy machine may take over a second).
        yield holds_within(all_stalled, timeout=10)
        assert Senders.count == 100
        held = sum(len(t.dataBuffer) + t._tempDataLen for t in srv.server_transports())
        print(f"\nunsent bytes held for 100 stalled readers: {held / 2**20:.1f} MiB")
        # A reader that started while fewer were sending got a larger share and still holds
        # it: at most the budget times (1 + ln(n x chunk / budget)), 45 MiB here; a full
        # chunk each was 100 MiB.
        bound = SEND_BUDGET * (1 + math.log(100 * CHUNK_SIZE / SEND_BUDGET))
        assert held <= bound, (held, bound)
        readers[0].transport.resumeProducing()
        body = yield readers[0].done
        assert (
            hashlib.sha256(body.partition(b"\r\n\r\n")[2]).digest() == hashlib.sha256(big).digest()
        )
    finally:
        yield srv.stop()
    assert Senders.count == 0


@pytest.mark.parametrize(
    "name",
    [
        "pool/a.rpm",
        "pool/b.deb",
        "dists/x/Release",
        "repodata/primary.xml.gz",
        "repodata/other.sqlite.bz2",
        "src/a.tar.gz",
        "src/a.tgz",
        "src/a.tar.xz",
        "src/a.TAR.GZ",
        "src/old.Z",
        "src/old.z",
        "index.HTML",
        "a/.hidden",
        "a/.js",
        "a/..json",
        "a.b/noext",
        "a/trailing.",
        "a/x.unknown.gz",
        "a/x.json.br",
    ],
)
def test_content_type_by_suffix_is_what_mimetypes_says(name):
    """Content types are worked out once per suffix pair; every answer is the one mimetypes
    gives for the whole path (compressed files: the compressed format), asked twice."""
    import mimetypes

    from streamer.static import _ENCODING_TYPES, content_type_for

    kind, encoding = mimetypes.guess_type(name, strict=False)
    if encoding is not None:
        kind = _ENCODING_TYPES.get(encoding, "application/octet-stream")
    expected = (kind or "application/octet-stream").encode("ascii")
    assert content_type_for(name) == expected
    assert content_type_for(name) == expected


def test_a_stored_body_sends_its_first_chunk_with_the_head_then_one_chunk_per_drain(tmp_path):
    """The producer writes the first chunk as it starts (in the turn that read the request,
    not a Cooperator tick later), then one chunk each time the transport has sent what it
    holds: the transport pauses it as soon as more than its buffer waits, as TCP's does."""
    from twisted.web.test.requesthelper import DummyRequest

    from streamer.static import FIRST_CHUNK, FileRangesProducer

    class Transport(DummyRequest):
        """Holds what is written (and a response head of 200 bytes before the body); pauses
        the producer above 64 KiB, as Twisted's TCP transport does."""

        producer = None
        held = 200
        channel = object()  # connected

        def registerProducer(self, producer, streaming):
            assert streaming
            self.producer = producer

        def unregisterProducer(self):
            self.producer = None

        def write(self, data):
            super().write(data)
            self.held += len(data)
            if self.held > 65536 and self.producer is not None:
                self.producer.pauseProducing()

        def drain(self):
            self.held = 0
            self.producer.resumeProducing()

    body = os.urandom(1 << 20)
    path = tmp_path / "artifact"
    path.write_bytes(body)
    request = Transport([b""])
    with open(path, "rb") as fileobj:
        FileRangesProducer(request, fileobj, [(b"", 0, len(body))]).start()
        assert [len(chunk) for chunk in request.written] == [FIRST_CHUNK]
        sizes = []
        while request.producer is not None:
            before = len(request.written)
            request.drain()
            sizes.append(sum(len(chunk) for chunk in request.written[before:]))
        assert b"".join(request.written) == body and request.finished
        assert sizes == [128 << 10, 256 << 10, 512 << 10, 64 << 10]
