"""Hostile clients against the whole service (in-process `StreamerService`, real sockets).

Disconnects at every phase, clients that never read or read one byte a second, pipelining,
malformed and oversized requests, path traversal in every encoding and Range abuse. Each must
get a sane status or a closed connection, never a 500 or a traceback, and the service must
keep serving. Stalled clients are bounded by the configured no-progress timeout (1 s here),
never by a long wait.
"""

from __future__ import annotations

import functools
import hashlib
import re
import shutil
import socket
import time

import attrs
import pytest
import pytest_twisted
import trustme
from twisted.internet import defer, protocol, reactor, task
from twisted.logger import capturedLogs

from streamer.inflight import MEMORY_BODY
from tests.support import faults
from tests.support.clients import RawResult, raw_http, run_curl
from tests.support.polling import holds_within
from tests.support.service import ServiceEnv
from tests.support.twistd import start_twistd

BODY = bytes(range(256)) * 256  # 64 KiB
BIG = 16 * 1024 * 1024  # fills any socket buffer
STALL = 1.0  # the service's stall_timeout in these tests
DROP_WITHIN = STALL + 4.0  # a stalled client must be gone by then


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def request(target: str, *headers: str, method: str = "GET", close: bool = True) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: streamer", *headers]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def status_of(data: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return int(match.group(1)) if match else 0


def assert_sane(data: bytes, allowed: tuple[int, ...] = (400, 404, 405, 414, 431)) -> int:
    """A closed connection (no bytes) or an allowed status; never a 500 or a traceback."""
    assert b"Traceback" not in data and b'File "' not in data
    if not data:
        return 0
    status = status_of(data)
    assert status in allowed, data[:300]
    return status


@pytest.fixture
def make_service(make_service):
    """The shared fixture, with this file's short ``stall_timeout``."""
    return functools.partial(make_service, stall_timeout=STALL)


@pytest.fixture
def service(make_service):
    return pytest_twisted.blockon(make_service())


async def assert_serving(env: ServiceEnv) -> None:
    """The service still answers a normal request, and no request is left in flight."""
    await env.add("health.txt", b"still here\n", stored=True)
    result = await raw_http("127.0.0.1", env.port, request("/fixtures/health.txt"))
    assert status_of(result.data) == 200 and result.data.endswith(b"still here\n")
    assert await holds_within(lambda: env.in_flight_requests() == 0, 3.0), (
        env.service.site.in_flight
    )
    # A download may still be committing (or finishing for others) after its response ended.
    assert await holds_within(lambda: not env.lazy.in_flight and env.temp_files() == [], 5.0), (
        env.temp_files()
    )


# --- disconnects ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /fixtures/a.bin", b"GET /fixtures/a.bin HTTP/1.1\r\nHost: x\r\n"],
    ids=["connect-only", "half-request-line", "headers-unfinished"],
)
@pytest_twisted.ensureDeferred
async def test_disconnect_before_the_request_is_complete(service, sent):
    await service.add("a.bin", BODY, stored=True)
    result = await raw_http("127.0.0.1", service.port, sent, timeout=0.2)
    assert result.timed_out and result.data == b""
    await assert_serving(service)


@pytest_twisted.ensureDeferred
async def test_disconnect_before_response_headers_keeps_an_on_demand_download(service, upstream):
    gate = faults.Gated(faults.Serve(BODY))
    url = upstream.register("/gated.bin", gate)
    await service.add("gated.bin", BODY, stored=False, url=url)
    client = raw_http("127.0.0.1", service.port, request("/fixtures/gated.bin"), timeout=5)
    assert await holds_within(lambda: gate.waiting == 1)
    for channel in list(service.service.site.in_flight):
        channel.transport.abortConnection()  # the client vanishes before any header
    result = await client
    assert result.data == b""
    gate.release()
    assert await holds_within(lambda: service.storage.has(sha256(BODY)))
    assert await holds_within(lambda: not service.lazy.in_flight)
    assert len(upstream.requests("/gated.bin")) == 1
    await assert_serving(service)


@pytest.mark.parametrize("held", [False, True], ids=["streamed-body", "body-held-in-memory"])
@pytest_twisted.ensureDeferred
async def test_disconnect_mid_body_on_demand_download_completes_and_is_stored(
    service, upstream, held
):
    # A body held in memory until validated sends nothing before the client leaves; a larger
    # one streams, so the client leaves with some of its bytes.
    body = BODY if held else BODY * 3  # (0.98 s upstream)
    assert (len(body) <= MEMORY_BODY) == held
    url = upstream.register("/slow.bin", faults.Trickle(body, 200_000, interval=0.01))
    await service.add("slow.bin", body, stored=False, url=url)
    result = await raw_http("127.0.0.1", service.port, request("/fixtures/slow.bin"), timeout=0.25)
    assert result.timed_out and status_of(result.data) == (0 if held else 200)
    assert len(result.data) < len(body)
    assert await holds_within(lambda: service.storage.has(sha256(body)))
    assert service.storage.open(sha256(body)).read() == body
    await assert_serving(service)


@pytest_twisted.ensureDeferred
async def test_disconnect_mid_body_streamed_download_is_cancelled(make_service, upstream):
    env = await make_service(policy="streamed")
    url = upstream.register("/slow.bin", faults.Trickle(BODY, 20_000, interval=0.01))
    await env.add("slow.bin", BODY, stored=False, url=url)
    result = await raw_http("127.0.0.1", env.port, request("/fixtures/slow.bin"), timeout=0.2)
    assert result.timed_out and status_of(result.data) == 200
    # Nobody reads any more: the upstream transfer is cancelled, not finished.
    assert await upstream.wait_until_idle(2.0), "the upstream connection outlived the client"
    assert await holds_within(lambda: not env.lazy.in_flight)
    assert env.temp_files() == []
    assert not env.storage.has(sha256(BODY))
    await assert_serving(env)


@pytest_twisted.ensureDeferred
async def test_disconnect_during_a_coalesced_download(service, upstream):
    gate = faults.Gated(faults.Trickle(BODY, 400_000, interval=0.01))
    url = upstream.register("/shared.bin", gate)
    await service.add("shared.bin", BODY, stored=False, url=url)
    quitter = raw_http("127.0.0.1", service.port, request("/fixtures/shared.bin"), timeout=0.3)
    stayers = [run_curl("-f", service.url("fixtures/shared.bin")) for _ in range(2)]
    assert await holds_within(lambda: gate.waiting == 1)
    assert (await quitter).timed_out
    gate.release()
    for code, out, err in await defer.gatherResults(stayers):
        assert code == 0, err
        assert out == BODY
    assert len(upstream.requests("/shared.bin")) == 1
    assert await holds_within(lambda: service.storage.has(sha256(BODY)))
    await assert_serving(service)


# --- clients that do not read ----------------------------------------------------------------


class _NeverReads(protocol.Protocol):
    """Sends a request, then never reads: the server's writes pile up until it gives up."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.transport.write(self.payload)
        self.transport.pauseProducing()

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


async def never_read(env: ServiceEnv, target: str) -> float:
    """Seconds until the service dropped a client that never reads (fails after DROP_WITHIN)."""
    client = _NeverReads(request(target))
    await protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", env.port)
    started = time.monotonic()
    assert await holds_within(lambda: env.in_flight_requests() == 1, 2.0)
    dropped = await holds_within(lambda: env.in_flight_requests() == 0, DROP_WITHIN)
    client.transport.resumeProducing()
    client.transport.abortConnection()
    await client.lost
    assert dropped, "the service kept a stalled client's response open"
    return time.monotonic() - started


@pytest.mark.parametrize("stored", [True, False], ids=["stored", "lazy"])
@pytest_twisted.ensureDeferred
async def test_never_reading_client_is_dropped(service, upstream, stored):
    await add_big(service, upstream, "big.bin", stored)
    assert await never_read(service, "/fixtures/big.bin") < DROP_WITHIN
    # The download fills the store regardless of the stalled client.
    assert await holds_within(lambda: service.storage.has(faults.Generated(BIG).sha256()), 10.0)
    await assert_serving(service)


async def add_big(env: ServiceEnv, upstream, name: str, stored: bool) -> None:
    """A 16 MiB artifact at ``fixtures/<name>``: stored, or lazy from the upstream."""
    generated = faults.Generated(BIG)
    url = upstream.register(f"/{name}", generated)
    if stored:
        await env.add(name, b"".join(generated.chunks()), stored=True)
        return
    await env.add(name, b"", stored=False, url=url)  # make the remote known, then fix size
    entry = (await env.catalog.lookup(f"fixtures/{name}"))[0]
    big = attrs.evolve(entry, size=BIG, digests={"sha256": generated.sha256()})
    others = [e for e in await env.catalog.entries_for_remote("fixtures") if e.path != big.path]
    await env.catalog.replace_remote("fixtures", [*others, big])


@pytest.mark.parametrize("stored", [True, False], ids=["stored", "lazy"])
@pytest_twisted.ensureDeferred
async def test_one_byte_per_second_reader_is_dropped_in_bounded_time(service, upstream, stored):
    await add_big(service, upstream, "trickle-read.bin", stored)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    received, ended = 0, False
    try:
        try:
            sock.connect(("127.0.0.1", service.port))
        except BlockingIOError:
            pass
        await task.deferLater(reactor, 0.05, lambda: None)
        sock.send(request("/fixtures/trickle-read.bin"))
        started = time.monotonic()
        while not ended and time.monotonic() - started < DROP_WITHIN:
            await task.deferLater(reactor, 1.0, lambda: None)  # one byte a second
            try:
                byte = sock.recv(1)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                byte = b""
            ended = byte == b""
            received += len(byte)
        dropped = await holds_within(lambda: service.in_flight_requests() == 0, 0.5)
        assert ended or dropped, "a 1 byte/s reader held its response open"
        assert received < BIG
    finally:
        sock.close()
    await assert_serving(service)


# --- malformed and abusive requests ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_are_answered_in_order(service):
    await service.add("one.txt", b"first body\n", stored=True)
    await service.add("two.txt", b"second body\n", stored=True)
    payload = (
        request("/fixtures/one.txt", close=False)
        + request("/fixtures/missing.txt", close=False)
        + request("/fixtures/two.txt", method="HEAD", close=False)
        + request("/fixtures/two.txt")
    )
    result = await raw_http("127.0.0.1", service.port, payload, timeout=5)
    statuses = [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3})", result.data)]
    assert statuses == [200, 404, 200, 200]
    assert result.data.index(b"first body\n") < result.data.index(b"second body\n")
    assert result.data.count(b"second body\n") == 1  # HEAD sent no body
    await assert_serving(service)


MALFORMED = [
    b"\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /fixtures/a.bin\r\n\r\n",
    b"GET /fixtures/a.bin HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /fixtures/a.bin HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    b"GET  /fixtures/a.bin  HTTP/1.1\r\nHost: x\r\n\r\n",
    b"G\x00T /fixtures/a.bin HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /fixtures/a.bin HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET /fixtures/a.bin HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET /fixtures/a.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET /fixtures/a.bin HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: bogus\r\n\r\n",
    b"\xff\xfe\xfd /\xff HTTP/1.1\r\n\r\n",
    b"DELETE /fixtures/a.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
]


@pytest_twisted.ensureDeferred
async def test_malformed_request_lines(service):
    await service.add("a.bin", BODY, stored=True)
    for payload in MALFORMED:
        result = await raw_http("127.0.0.1", service.port, payload, timeout=3)
        assert not result.timed_out, payload[:60]
        assert_sane(result.data)
    await assert_serving(service)


def assert_refused(result: RawResult, status: int) -> None:
    """*status* with ``Connection: close``, then an orderly close (FIN, not a reset)."""
    assert not result.timed_out, result
    assert status_of(result.data) == status, result.data[:300]
    head = result.data.split(b"\r\n\r\n", 1)[0].lower()
    assert b"\r\nconnection: close" in head, head
    assert result.clean, result


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (["X-Big: " + "a" * 100_000], 431),
        ([f"X-H-{i}: {i}" for i in range(10_000)], 431),
        (["Cookie: " + "c=1; " * 20_000], 431),
        ([f"X-H-{i}: " + "a" * 1000 for i in range(20)], 431),
    ],
    ids=["100KiB-header-line", "10000-headers", "huge-cookie", "20KiB-head"],
)
@pytest_twisted.ensureDeferred
async def test_oversized_and_countless_headers(service, headers, status):
    await service.add("a.bin", BODY, stored=True)
    result = await raw_http("127.0.0.1", service.port, request("/fixtures/a.bin", *headers), 5)
    assert_refused(result, status)
    await assert_serving(service)


@pytest.mark.parametrize(
    "sent",
    [
        b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /" + b"a" * 20_000,
    ],
    ids=["20KiB-request-line", "20KiB-without-line-end"],
)
@pytest_twisted.ensureDeferred
async def test_oversized_request_line_gets_414(service, sent):
    result = await raw_http("127.0.0.1", service.port, sent, 5)
    assert_refused(result, 414)
    await assert_serving(service)


# --- request bodies: the service takes no uploads ----------------------------------------------

BODY_HEADS = {
    "healthz-GET-1GB-length": request("/healthz", "Content-Length: 1000000000", close=False),
    "content-HEAD-1GB-length": request(
        "/fixtures/a.bin", "Content-Length: 1000000000", method="HEAD", close=False
    ),
    "content-GET-chunked": request("/fixtures/a.bin", "Transfer-Encoding: chunked", close=False),
    "POST-expect-100-continue": request(
        "/fixtures/a.bin", "Content-Length: 10", "Expect: 100-continue", method="POST"
    ),
}


@pytest.mark.parametrize("signed", [False, True], ids=["open", "signed-unsigned-request"])
@pytest.mark.parametrize("head", BODY_HEADS.values(), ids=BODY_HEADS.keys())
@pytest_twisted.ensureDeferred
async def test_request_body_is_refused_before_it_is_read(make_service, head, signed):
    env = await make_service(signed=signed)
    await env.add("a.bin", BODY, stored=True)
    started = time.monotonic()
    # The head alone: the answer must not wait for the announced body.
    result = await raw_http("127.0.0.1", env.port, head, timeout=5)
    assert_refused(result, 413)
    assert b" 100 " not in result.data  # no "100 Continue" invitation to send it
    assert time.monotonic() - started < 2.0
    method = head.split(b" ", 1)[0].decode()
    assert env.service.metrics.value("streamer_requests_total", {"method": method, "status": "413"})
    # With a body that keeps coming: still the answer, then an orderly close.
    result = await raw_http("127.0.0.1", env.port, head + b"x" * (4 << 20), timeout=5)
    assert_refused(result, 413)
    if signed:
        served = await raw_http("127.0.0.1", env.port, request("/healthz"), timeout=3)
        assert status_of(served.data) == 200
    else:
        await assert_serving(env)


@pytest_twisted.ensureDeferred
async def test_refusals_reach_the_client_over_tls(make_service, tmp_path):
    """Over TLS the answer goes out inside the TLS stream (never a half-closed socket under it)."""
    cert = trustme.CA().issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    listen = f"ssl:0:privateKey={tmp_path / 'key.pem'}:certKey={tmp_path / 'cert.pem'}"
    env = await make_service(
        listen=listen + ":interface=127.0.0.1", server_extra="request_header_timeout = 1\n"
    )
    body = request("/healthz", "Content-Length: 1000000000", close=False)
    for sent, status, drip in [
        (body, 413, 0.0),
        (body + b"x" * (1 << 20), 413, 0.0),
        (b"GET /" + b"a" * 20_000, 414, 0.0),
        (request("/healthz", close=False), 408, 0.2),
    ]:
        result = await raw_http("127.0.0.1", env.port, sent, timeout=5, drip=drip, tls=True)
        assert not result.timed_out and status_of(result.data) == status, result
    result = await raw_http("127.0.0.1", env.port, request("/healthz"), timeout=5, tls=True)
    assert status_of(result.data) == 200


@pytest_twisted.ensureDeferred
async def test_empty_request_body_is_fine(service):
    await service.add("a.bin", BODY, stored=True)
    for head in (
        request("/healthz", "Content-Length: 0"),
        request("/fixtures/a.bin", "Content-Length: 0", method="HEAD"),
    ):
        result = await raw_http("127.0.0.1", service.port, head, timeout=5)
        assert status_of(result.data) == 200 and result.clean


# --- slow heads and connection caps ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_slow_request_heads_get_408_and_idle_connections_close(make_service):
    env = await make_service(server_extra="request_header_timeout = 1\n")
    started = time.monotonic()
    # 44 bytes at one per 0.1 s: a head that would take 4.4 s.
    slow = [
        raw_http("127.0.0.1", env.port, request("/healthz", close=False), timeout=6, drip=0.1)
        for _ in range(20)
    ]
    idle = raw_http("127.0.0.1", env.port, b"", timeout=6)
    served = await raw_http("127.0.0.1", env.port, request("/healthz"), timeout=3)
    assert status_of(served.data) == 200
    for result in await defer.gatherResults(slow):
        assert_refused(result, 408)
    assert time.monotonic() - started < 3.0
    # A connection that never sent a byte is closed without an answer.
    quiet = await idle
    assert quiet.data == b"" and quiet.clean and not quiet.timed_out
    # On a keep-alive connection the deadline restarts when a response ends: the idle
    # connection after it is closed without a 408.
    kept = await raw_http("127.0.0.1", env.port, request("/healthz", close=False), timeout=6)
    assert status_of(kept.data) == 200 and b" 408 " not in kept.data
    assert kept.clean and not kept.timed_out
    await assert_serving(env)


@pytest_twisted.ensureDeferred
async def test_slowloris_cannot_take_the_service_offline(tmp_path):
    """Many slow-drip connections against twistd with 64 open files: /healthz still answers."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("needs prlimit (util-linux)")
    (tmp_path / "streamer.toml").write_text("[server]\nrequest_header_timeout = 1\n")
    served = start_twistd(
        tmp_path,
        ["--config", "streamer.toml"],
        prefix=[prlimit, "--nofile=64:64", "--"],
    )
    proto, base = served.proto, served.base
    port = int(base.rsplit(":", 1)[1])
    attackers: list[defer.Deferred[RawResult]] = []
    try:
        await served.healthy()
        # More connections than the process has descriptors, each dripping a byte every
        # 0.5 s and staying for up to 8 s unless the service closes it. Without a deadline
        # they hold every descriptor, and Twisted closes each new connection at once.
        head = request("/healthz", "X-Pad: " + "p" * 100, close=False)
        attackers.extend(raw_http("127.0.0.1", port, head, timeout=8, drip=0.5) for _ in range(80))
        await task.deferLater(reactor, 2.0, lambda: None)
        for _ in range(5):
            result = await raw_http("127.0.0.1", port, request("/healthz"), timeout=4)
            assert status_of(result.data) == 200, (result, proto.output.decode()[-2000:])
        # Every attacker was cut off by the service, none lasted to its own 8 s.
        for outcome in await defer.gatherResults(attackers):
            assert not outcome.timed_out and status_of(outcome.data) in (0, 408), outcome
    finally:
        await defer.DeferredList(attackers, consumeErrors=True)
        code = await served.stop()
    assert code == 0, proto.output.decode()[-2000:]
    assert "Traceback" not in proto.output.decode()


@pytest_twisted.ensureDeferred
async def test_connections_over_the_per_client_cap_get_503(make_service):
    env = await make_service(server_extra="max_connections_per_client = 3\n")
    limit = env.service.site.client_limit
    held = [raw_http("127.0.0.1", env.port, b"GET /hea", timeout=1.5) for _ in range(3)]
    assert await holds_within(lambda: limit.open_connections("127.0.0.1") == 3)
    with capturedLogs() as events:
        for _ in range(4):
            result = await raw_http("127.0.0.1", env.port, request("/healthz"), timeout=3)
            assert_refused(result, 503)
    reports = [e for e in events if "max_connections_per_client" in e.get("log_format", "")]
    assert len(reports) == 1, reports  # once per address per interval, not per connection
    assert (await held[0]).timed_out  # the held connections were never answered
    await defer.gatherResults(held)
    assert await holds_within(lambda: limit.open_connections("127.0.0.1") == 0)
    await assert_serving(env)


# Dot and empty segments inside the root (/fixtures/./a.bin, /fixtures//a.bin) are served as the
# normalised path: see tests/faults/test_paths_and_signatures.py.

TRAVERSALS = [
    "/fixtures/../../../../etc/passwd",
    "/fixtures/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/fixtures/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "/fixtures/..%2f..%2f..%2fetc%2fpasswd",
    "/fixtures/%252e%252e/%252e%252e/etc/passwd",
    "/fixtures/a.bin%00.txt",
    "/fixtures/a.bin%00",
    "/fixtures/..\\..\\..\\etc\\passwd",
    "/fixtures/%5c..%5c..%5cetc%5cpasswd",
    "/fixtures/.%2e/.%2e/etc/passwd",
    "/fixtures/%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd",
    "/fixtures/a.bin/../../../etc/passwd",
    "/fixtures/%2e%2e/../a.bin",
    "//etc/passwd",
    "/%2fetc%2fpasswd",
    "http://127.0.0.1/etc/passwd",
    "file:///etc/passwd",
    "*",
    "127.0.0.1:80",
]


@pytest.mark.parametrize("target", TRAVERSALS)
@pytest_twisted.ensureDeferred
async def test_path_traversal_never_leaves_the_catalog(service, upstream, target):
    await service.add("a.bin", BODY, stored=True)
    result = await raw_http("127.0.0.1", service.port, request(target), timeout=3)
    status = assert_sane(result.data)
    assert b"root:" not in result.data
    assert BODY[:64] not in result.data
    assert status != 200
    assert upstream.all_requests() == []  # nothing the client named is ever fetched
    await assert_serving(service)


@pytest.mark.parametrize(
    "ranges",
    [
        ",".join(["0-0"] * 5000),
        ",".join(f"{i}-{i + 1000}" for i in range(0, 60_000, 7)),
        "0-65535," * 200 + "0-65535",
        "100-0",
        "65536-70000",
        "-0",
        "0-18446744073709551616",
        "0--5,a-b,,,",
    ],
    ids=[
        "5000x0-0",
        "overlapping",
        "whole-file-200-times",
        "reversed",
        "past-the-end",
        "empty-suffix",
        "huge-number",
        "junk",
    ],
)
@pytest.mark.parametrize("stored", [True, False], ids=["stored", "lazy"])
@pytest_twisted.ensureDeferred
async def test_range_abuse(service, upstream, ranges, stored):
    url = upstream.register("/ranged.bin", faults.Serve(BODY))
    await service.add("ranged.bin", BODY, stored=stored, url=url)
    header = "Range: bytes=" + ranges
    result = await raw_http("127.0.0.1", service.port, request("/fixtures/ranged.bin", header), 10)
    assert not result.timed_out
    status = assert_sane(result.data, (200, 206, 400, 416, 431))
    # Never an amplification: at most a little more than the file itself.
    assert len(result.data) < 2 * len(BODY) + 64 * 1024, len(result.data)
    if status == 200:
        assert result.data.endswith(BODY)
    await assert_serving(service)
