"""`StreamerChannel` and `ClientLimit` on a `Clock`: the head deadline and the per-address cap.

The channel runs inside a real `StreamerSite` over a `StringTransport`; time moves only when
the test advances the clock. The same rules are driven over real sockets in
tests/faults/test_hostile_clients.py.
"""

from __future__ import annotations

import re

import pytest
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.interfaces import IHalfCloseableDescriptor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.web.resource import Resource
from zope.interface import implementer

from streamer.channel import ClientLimit, StreamerChannel
from streamer.logs import RequestLog
from streamer.metrics import Metrics
from streamer.ops import HealthResource
from streamer.service import StreamerSite

TIMEOUT = 30.0
GET = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


@implementer(IHalfCloseableDescriptor)
class _Transport(StringTransport):
    """A socket-like StringTransport that records whether the write side was closed first."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


def site(clock: Clock, cap: int = 0) -> StreamerSite:
    root = Resource()
    root.putChild(b"healthz", HealthResource(lambda: True))
    return StreamerSite(
        root,
        metrics=Metrics(),
        request_log=RequestLog(),
        reactor=clock,
        request_header_timeout=TIMEOUT,
        max_connections_per_client=cap,
    )


def connect(clock: Clock, host: str = "10.0.0.1") -> tuple[StreamerChannel, StringTransport]:
    channel = site(clock).buildProtocol(IPv4Address("TCP", host, 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
    channel.makeConnection(transport)
    return channel, transport


def test_partial_head_gets_408_when_the_deadline_passes():
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(b"GET /healthz HT")
    clock.advance(TIMEOUT - 0.1)
    assert transport.value() == b"" and not transport.disconnecting
    clock.advance(0.2)
    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"\r\nConnection: close\r\n" in transport.value()
    assert transport.disconnecting


def test_dripping_bytes_does_not_move_the_deadline():
    clock = Clock()
    channel, transport = connect(clock)
    for byte in GET[:-4]:
        channel.dataReceived(bytes([byte]))
        clock.advance(1.0)
        if transport.value():
            break
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert clock.seconds() == pytest.approx(TIMEOUT)


def test_a_connection_that_sends_nothing_is_closed_without_an_answer():
    clock = Clock()
    _, transport = connect(clock)
    clock.advance(TIMEOUT)
    assert transport.value() == b"" and transport.disconnecting


def test_keep_alive_deadline_starts_when_the_response_ends():
    clock = Clock()
    channel, transport = connect(clock)
    clock.advance(TIMEOUT - 1)  # a slow but complete head is fine
    channel.dataReceived(GET)
    assert transport.value().startswith(b"HTTP/1.1 200 ") and not transport.disconnecting
    transport.clear()
    clock.advance(TIMEOUT - 1)  # counted from the response, not from the connection
    assert not transport.disconnecting
    channel.dataReceived(b"GET /hea")
    clock.advance(1)
    assert transport.value().startswith(b"HTTP/1.1 408 ") and transport.disconnecting


def test_idle_keep_alive_connection_is_closed_quietly():
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(GET)
    transport.clear()
    clock.advance(TIMEOUT)
    assert transport.value() == b"" and transport.disconnecting


def test_pipelined_heads_each_get_their_own_deadline():
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(GET + GET + b"GET /hea")
    assert transport.value().count(b"HTTP/1.1 200 ") == 2
    clock.advance(TIMEOUT)
    assert transport.value().endswith(b"request head not received in time\n")


def test_keep_alive_requests_move_no_timer_of_their_own():
    """One timer serves a connection's deadlines: its requests schedule none (a timer set
    and cancelled per request, for the deadline and for Twisted's idle timeout, was a tenth
    of a small request's channel work), and the deadline still holds after them."""
    clock = Clock()
    channel, transport = connect(clock)
    scheduled = []
    call_later = channel.callLater

    def counting_call_later(delay, f, *args, **kwargs):
        scheduled.append(delay)
        return call_later(delay, f, *args, **kwargs)

    channel.callLater = counting_call_later
    for _ in range(20):
        channel.dataReceived(GET)
        clock.advance(1)
    assert transport.value().count(b"HTTP/1.1 200 ") == 20
    assert scheduled == [] and len(clock.getDelayedCalls()) == 1
    transport.clear()
    clock.advance(TIMEOUT - 1.5)
    assert not transport.disconnecting
    channel.dataReceived(b"GET /hea")
    clock.advance(1)
    assert transport.value().startswith(b"HTTP/1.1 408 ") and transport.disconnecting


def test_no_deadline_when_turned_off():
    clock = Clock()
    channel, transport = connect(clock)
    channel.head_timeout = 0.0
    channel._cancel_head_timer()
    # A byte every 10 s keeps Twisted's own idle timeout (60 s) from firing.
    for byte in GET[:-4]:
        channel.dataReceived(bytes([byte]))
        clock.advance(10)
    assert transport.value() == b"" and not transport.disconnecting


def test_refusal_half_closes_then_drains_for_a_bounded_time():
    clock = Clock()
    channel = site(clock).buildProtocol(IPv4Address("TCP", "10.0.0.1", 40000))
    transport = _Transport(peerAddress=IPv4Address("TCP", "10.0.0.1", 40000))
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert transport.write_closed and not transport.disconnecting
    channel.dataReceived(b"more body" * 1000)  # read and discarded
    assert transport.value().count(b"HTTP/1.1") == 1
    clock.advance(5)
    assert transport.disconnecting  # aborted after the linger time


def test_client_limit_counts_per_host_and_reports_once_per_interval():
    clock = Clock()
    limit = ClientLimit(2, clock.seconds, log_interval=60.0)
    a = IPv4Address("TCP", "10.0.0.1", 1)
    releases = [limit.admit(a), limit.admit(a)]
    assert all(releases) and limit.open_connections("10.0.0.1") == 2
    assert limit.admit(IPv4Address("TCP", "10.0.0.2", 1)) is not None  # another host
    with capturedLogs() as events:
        for _ in range(100):
            assert limit.admit(a) is None
        clock.advance(61)
        assert limit.admit(a) is None
    reports = [e for e in events if "max_connections_per_client" in e["log_format"]]
    assert [e["count"] for e in reports] == [1, 100]
    releases[0]()
    releases[0]()  # a second release of the same connection changes nothing
    assert limit.open_connections("10.0.0.1") == 1
    assert limit.admit(a) is not None


def test_client_limit_off_and_unix_sockets_are_not_counted():
    clock = Clock()
    assert ClientLimit(0, clock.seconds).admit(IPv4Address("TCP", "10.0.0.1", 1)) is not None
    unix = ClientLimit(1, clock.seconds)
    assert unix.admit(UNIXAddress(None)) is not None
    assert unix.admit(UNIXAddress(None)) is not None


def test_site_answers_over_the_cap_with_503_and_releases_on_close():
    clock = Clock()
    capped = site(clock, cap=1)
    addr = IPv4Address("TCP", "10.0.0.1", 40000)
    first = capped.buildProtocol(addr)
    first.makeConnection(StringTransport(peerAddress=addr))
    busy = capped.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    busy.makeConnection(transport)
    assert transport.value().startswith(b"HTTP/1.1 503 ") and transport.disconnecting
    first.connectionLost(None)
    assert isinstance(capped.buildProtocol(addr), StreamerChannel)


@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n",
    ],
    ids=["none", "two", "second-pipelined-without"],
)
@pytest.mark.parametrize("whole", [True, False], ids=["one-packet", "byte-by-byte"])
def test_an_http_1_1_request_needs_exactly_one_host_header(head, whole):
    """RFC 9112 §3.2: 400 with Connection: close for an HTTP/1.1 request without Host or with
    two (it was served); one with its Host before it is answered as usual."""
    clock = Clock()
    channel, transport = connect(clock)
    for chunk in [head] if whole else [bytes([byte]) for byte in head]:
        channel.dataReceived(chunk)
    clock.advance(0)
    sent = transport.value()
    statuses = re.findall(rb"(?:^|\n)HTTP/1\.1 (\d{3}) ", sent)
    assert statuses == [b"200"] * (head.count(b"GET ") - 1) + [b"400"], sent
    last = sent[sent.rindex(b"HTTP/1.1 400 ") :]
    assert b"Connection: close" in last
    assert last.endswith(b"\r\n\r\nan HTTP/1.1 request needs exactly one Host header\n")


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (b"GET /healthz HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", b"one Host header only"),
        (b"GET /healthz HTTP/1.1\r\nHost: a b\r\n\r\n", b"the Host header is not a host"),
        (b"GET /healthz HTTP/1.1\r\nHost: a, b\r\n\r\n", b"the Host header is not a host"),
        (b"GET /healthz HTTP/1.1\r\nHost: a/b\r\n\r\n", b"the Host header is not a host"),
        (b"GET /healthz HTTP/1.1\r\nHost: u@h\r\n\r\n", b"the Host header is not a host"),
        (b"GET /healthz HTTP/1.0\r\nHost: h:x\r\n\r\n", b"the Host header is not a host"),
        (b"GET /healthz HTTP/1.1\r\nHost: [::1\r\n\r\n", b"the Host header is not a host"),
    ],
    ids=["two-on-1.0", "space", "list", "slash", "userinfo", "port-1.0", "open-bracket"],
)
def test_any_request_with_two_or_an_invalid_host_header_gets_400(head, reason):
    """RFC 9112 §3.2 asks 400 for *any* request with more than one Host header or an invalid
    one (they were served: only HTTP/1.1's count of Host headers was checked)."""
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(head)
    clock.advance(0)
    sent = transport.value()
    assert sent.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in sent, sent
    assert sent.endswith(reason + b"\n"), sent


@pytest.mark.parametrize(
    "host", [b"", b"h", b"h:8080", b"h:", b"127.0.0.1:80", b"[::1]:80", b"xn--bcher-kva.example"]
)
def test_valid_host_headers_are_served(host):
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
    clock.advance(0)
    assert transport.value().startswith(b"HTTP/1.1 200 "), transport.value()


@pytest.mark.parametrize(
    "connection",
    [
        b"Connection: close",
        b"Connection: TE,close",
        b"Connection: te ,\tClose ",
        b"Connection: TE\r\nConnection: close",
    ],
    ids=["close", "list", "spaces-and-case", "second-line"],
)
def test_connection_close_anywhere_in_the_list_closes(connection):
    """``close`` among the ``Connection`` options (RFC 9110 §7.6.1 list syntax) closes the
    connection after the answer, which says so (before: only a first line split on spaces
    was read, so ``TE,close`` and a second line kept it open)."""
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: h\r\n%s\r\n\r\n" % connection)
    clock.advance(0)
    head = transport.value().split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close" in head, head
    assert transport.disconnecting


def test_connection_without_close_stays_open():
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(
        b"GET /healthz HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, closed\r\n\r\n"
    )
    clock.advance(0)
    assert transport.value().startswith(b"HTTP/1.1 200 ") and not transport.disconnecting


def test_an_http_1_0_request_without_host_is_served():
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(b"GET /healthz HTTP/1.0\r\n\r\n")
    clock.advance(0)
    assert transport.value().startswith(b"HTTP/1.0 200 ") or transport.value().startswith(
        b"HTTP/1.1 200 "
    ), transport.value()


@pytest.mark.parametrize(
    "head",
    [
        GET,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n",
        b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /healthz HTTP/1.0\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHo st: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n",
        b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET  /healthz HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 501 + b"\r\n",
        b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 16400 + b"\r\n\r\n",
        b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
def test_a_head_in_one_packet_is_answered_as_one_sent_byte_by_byte(head):
    """A whole head in one packet takes the channel's short path (its header lines straight
    to Twisted's checks); the answer, and whether the connection stays open, are those of
    the same bytes parsed line by line."""

    def answer(chunks: list[bytes]) -> tuple[bytes, bool]:
        clock = Clock()
        channel, transport = connect(clock)
        for chunk in chunks:
            channel.dataReceived(chunk)
        clock.advance(0)
        lines = [line for line in transport.value().split(b"\r\n") if not line.startswith(b"Date:")]
        return b"\r\n".join(lines), bool(transport.disconnecting)

    whole = answer([head])
    assert whole == answer([bytes([byte]) for byte in head])
    assert whole[0].startswith(b"HTTP/1.")
