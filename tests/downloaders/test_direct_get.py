"""`DirectGetAgent`, the downloaders' keep-alive GET client with responses parsed by llhttp:
a scripted raw server on loopback (exact bytes on the wire), the fault upstream and through
`HttpDownloader`, so each answer shape is checked where the downloader sees it."""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    readBody,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from downloaders import DownloaderFactory, HttpDownloader, RemoteSettings, TruncatedBody
from downloaders.direct_get import IDLE_TIMEOUT, DirectGetAgent, ResponseParseError, _split_target
from downloaders.factory import CachingEndpointFactory
from downloaders.tls import RemoteTLSPolicy
from tests.downloaders.support import client_agent
from tests.support.faults import Serve
from tests.support.polling import until

BODY = b"0123456789" * 100


def ok(body: bytes = BODY, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


class Scripted(protocol.Protocol):
    """Answers each request head with the next scripted answer: bytes, or a callable given the
    transport (to close, stall...)."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.factory.heads.append(head)
            answer = self.factory.answers.pop(0) if self.factory.answers else ok()
            if callable(answer):
                answer(self.transport)
            else:
                self.transport.write(answer)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.closed += 1


class ScriptedServer(protocol.Factory):
    protocol = Scripted

    def __init__(self) -> None:
        self.answers: list[Any] = []
        self.heads: list[bytes] = []
        self.connections: list[Scripted] = []
        self.closed = 0

    @property
    def open(self) -> int:
        return len(self.connections) - self.closed


@pytest.fixture
def scripted():
    server = ScriptedServer()
    port = pytest_twisted.blockon(
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server)
    )
    server.url = f"http://127.0.0.1:{port.getHost().port}"
    yield server
    for connection in server.connections:
        connection.transport.abortConnection()
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def agent():
    endpoints = CachingEndpointFactory(reactor, RemoteTLSPolicy.from_settings(_settings()), 5)
    pool = HTTPConnectionPool(reactor, persistent=False)
    made = DirectGetAgent(endpoints, Agent.usingEndpointFactory(reactor, endpoints, pool=pool), 4)
    yield made
    pytest_twisted.blockon(made.close_idle())


def _settings() -> RemoteSettings:
    return RemoteSettings(url="http://127.0.0.1/")


async def get(agent: Any, url: str, headers: Headers | None = None) -> tuple[Any, bytes]:
    """The response and its whole body (raising what ended it otherwise). Not ``readBody``,
    which warns about Twisted's own body transport (it has no ``abortConnection``)."""
    response = await agent.request(b"GET", url.encode(), headers)
    data, reason = await body_and_reason(response)
    if not reason.check(ResponseDone):
        reason.raiseException()
    return response, data


class Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.ended: defer.Deferred[Any] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason
        self.ended.callback(None)  # (a Failure given to callback would be an errback)


async def body_and_reason(response: Any) -> tuple[bytes, Any]:
    collect = Collect()
    response.deliverBody(collect)
    await collect.ended
    return collect.data, collect.reason


@pytest_twisted.ensureDeferred
async def test_requests_share_one_keep_alive_connection_and_send_their_headers(agent, scripted):
    headers = Headers({b"User-Agent": [b"tester/1"], b"X-Token": [b"abc"]})
    for _ in range(5):
        response, body = await get(agent, scripted.url + "/a%20b?x=1", headers)
        assert (response.code, response.phrase, body) == (200, b"OK", BODY)
        assert response.length == len(BODY) and response.version == (b"HTTP", 1, 1)
    assert len(scripted.connections) == 1 and agent.idle_count() == 1
    first = scripted.heads[0].split(b"\r\n")
    assert first[0] == b"GET /a%20b?x=1 HTTP/1.1"
    host = scripted.url.removeprefix("http://").encode()
    assert sorted(first[1:]) == sorted([b"Host: " + host, b"User-Agent: tester/1", b"X-Token: abc"])
    await agent.close_idle()
    await until(lambda: scripted.open == 0)


@pytest_twisted.ensureDeferred
async def test_a_request_head_is_sent_at_once_and_a_partial_send_finishes_through_the_transport(
    agent, scripted, monkeypatch
):
    """A head goes out with one ``send`` as the request is made (not queued for the
    reactor's next turn, with an ``epoll_ctl`` pair around it); what a ``send`` leaves
    (a head larger than the socket's buffer) the transport writes, in order."""
    from twisted.internet import tcp

    queued: list[bytes] = []
    write = tcp.Client.write
    monkeypatch.setattr(
        tcp.Client, "write", lambda self, data: queued.append(data) or write(self, data)
    )
    await get(agent, scripted.url + "/first")  # connects: the first head
    response = agent.request(b"GET", (scripted.url + "/small").encode())
    assert len(scripted.heads) == 1 and queued == []  # (the server has not read it yet)
    await body_and_reason(await response)
    assert scripted.heads[1].startswith(b"GET /small ") and queued == []
    (connection,) = [c for idle in agent._idle.values() for c in idle]
    connection.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = Headers({b"X-Big": [b"b" * 6_000] * 50})  # more than one send takes now
    await get(agent, scripted.url + "/big", big)
    assert queued and len(scripted.heads[2]) > 300_000
    assert scripted.heads[2].endswith(b"b" * 1000) and b"X-Big" in scripted.heads[2]
    assert len(scripted.connections) == 1


@pytest_twisted.ensureDeferred
async def test_connection_headers_are_kept_out_of_the_response_headers(agent, scripted):
    scripted.answers = [ok(extra=b'Connection: keep-alive\r\nETag: "x"\r\nKeep-Alive: 5\r\n')]
    response, _ = await get(agent, scripted.url + "/")
    assert response.headers.getRawHeaders(b"etag") == [b'"x"']
    for name in (b"connection", b"keep-alive", b"content-length"):
        assert not response.headers.hasHeader(name)


@pytest_twisted.ensureDeferred
async def test_chunked_and_until_close_bodies(agent, scripted):
    scripted.answers = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        lambda t: (t.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end"), t.loseConnection()),
    ]
    response, body = await get(agent, scripted.url + "/chunked")
    assert body == b"hello world" and response.length is not None
    response = await agent.request(b"GET", (scripted.url + "/close").encode())
    data, reason = await body_and_reason(response)
    assert data == b"until the end" and reason.check(PotentialDataLoss)


@pytest_twisted.ensureDeferred
async def test_connection_close_is_not_kept(agent, scripted):
    scripted.answers = [ok(extra=b"Connection: close\r\n"), ok()]
    await get(agent, scripted.url + "/")
    await get(agent, scripted.url + "/")
    assert len(scripted.connections) == 2


@pytest_twisted.ensureDeferred
async def test_a_connection_the_server_closed_while_idle_is_retried_once(agent, scripted):
    await get(agent, scripted.url + "/")
    scripted.answers = [lambda t: t.abortConnection(), ok(b"second try")]
    response, body = await get(agent, scripted.url + "/")
    assert body == b"second try" and len(scripted.connections) == 2


@pytest_twisted.ensureDeferred
async def test_a_fresh_connection_closed_before_an_answer_is_not_retried(agent, scripted):
    scripted.answers = [lambda t: t.abortConnection()]
    with pytest.raises(ResponseNeverReceived):
        await agent.request(b"GET", (scripted.url + "/").encode())
    assert len(scripted.heads) == 1


@pytest_twisted.ensureDeferred
async def test_a_body_cut_short_is_a_response_failure(agent, scripted):
    scripted.answers = [lambda t: (t.write(ok()[:-10]), t.loseConnection())]
    response = await agent.request(b"GET", (scripted.url + "/").encode())
    data, reason = await body_and_reason(response)
    assert len(data) == len(BODY) - 10 and reason.check(ResponseFailed)


@pytest_twisted.ensureDeferred
async def test_informational_answers_are_skipped(agent, scripted):
    scripted.answers = [b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + ok()]
    response, body = await get(agent, scripted.url + "/")
    assert (response.code, body) == (200, BODY) and not response.headers.hasHeader(b"link")


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nX-Huge: " + b"a" * 20_000 + b"\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\n" + b"X-Many: yes\r\n" * 10_000 + b"Content-Length: 2\r\n\r\nok",
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: twelve\r\n\r\n",
    ],
    ids=["huge-header", "huge-head", "garbage", "bad-length"],
)
@pytest_twisted.ensureDeferred
async def test_bad_or_oversized_heads_are_refused(agent, scripted, answer):
    scripted.answers = [answer]
    with pytest.raises(ResponseNeverReceived):
        await agent.request(b"GET", (scripted.url + "/").encode())
    await until(lambda: scripted.open == 0)  # and the connection is dropped


@pytest.mark.parametrize(
    ("answer", "text"),
    [
        (b"HTTP/1.1 200 OK\r\nX-Huge: " + b"a" * 20_000 + b"\r\n\r\n", "header too large"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
            + b"X-Trailer: flood\r\n" * 5000,
            "header too large",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "invalid HTTP"),
    ],
    ids=["header", "trailers", "llhttp"],
)
@pytest_twisted.ensureDeferred
async def test_a_refused_answer_says_why(agent, scripted, answer, text):
    scripted.answers = [answer]
    with pytest.raises((ResponseNeverReceived, ResponseFailed)) as raised:
        response = await agent.request(b"GET", (scripted.url + "/").encode())
        await readBody(response)
    (reason,) = raised.value.reasons
    assert reason.check(ResponseParseError) and text in str(reason.value)


@pytest_twisted.ensureDeferred
async def test_bytes_after_the_answer_make_the_connection_unusable(agent, scripted):
    scripted.answers = [ok() + b"HTTP/1.1 200 OK\r\n", ok()]
    _, body = await get(agent, scripted.url + "/")
    assert body == BODY
    await get(agent, scripted.url + "/")
    assert len(scripted.connections) == 2  # the first was not reused


def in_pieces(answer: bytes, head_end: int, *cuts: int) -> Any:
    """A scripted answer written in pieces, a reactor turn apart: up to *head_end*, then at each
    of *cuts*: the body past the head arrives in reads of its own."""
    bounds = [0, head_end, *cuts, len(answer)]

    def send(transport: Any) -> None:
        for i, (start, end) in enumerate(itertools.pairwise(bounds)):
            reactor.callLater(0.01 * i, transport.write, answer[start:end])

    return send


@pytest_twisted.ensureDeferred
async def test_a_body_arriving_after_its_head_in_pieces_is_whole_and_the_connection_reused(
    agent, scripted
):
    body = os.urandom(300_000)
    answer = ok(body)
    head_end = len(answer) - len(body)
    scripted.answers = [in_pieces(answer, head_end + 10, head_end + 1000, head_end + 150_000)]
    _, got = await get(agent, scripted.url + "/")
    assert got == body
    await until(lambda: agent.idle_count() == 1)
    _, again = await get(agent, scripted.url + "/")
    assert again == BODY
    assert len(scripted.connections) == 1


@pytest_twisted.ensureDeferred
async def test_bytes_after_a_body_read_in_pieces_make_the_connection_unusable(agent, scripted):
    body = os.urandom(200_000)
    answer = ok(body) + b"HTTP/1.1 200 OK\r\n"
    head_end = len(answer) - len(body) - 17
    scripted.answers = [in_pieces(answer, head_end, head_end + 70_000), ok()]
    _, got = await get(agent, scripted.url + "/")
    assert got == body
    _, again = await get(agent, scripted.url + "/")
    assert again == BODY
    assert len(scripted.connections) == 2  # the first was not reused


@pytest_twisted.ensureDeferred
async def test_a_body_nobody_reads_yet_is_kept_then_delivered(agent, scripted):
    response = await agent.request(b"GET", (scripted.url + "/").encode())
    await until(lambda: agent.idle_count() == 1)  # fully received, connection back in the pool
    data, reason = await body_and_reason(response)
    assert data == BODY and reason.check(ResponseDone)
    with pytest.raises(RuntimeError):
        response.deliverBody(Collect())


@pytest_twisted.ensureDeferred
async def test_stopping_the_body_aborts_the_connection(agent, scripted):
    scripted.answers = [lambda t: t.write(ok()[:-500])]  # then nothing more
    response = await agent.request(b"GET", (scripted.url + "/").encode())
    collect = Collect()
    response.deliverBody(collect)
    await until(lambda: collect.data)
    collect.transport.stopProducing()
    await collect.ended
    assert collect.reason.check(ResponseFailed)
    await until(lambda: scripted.open == 0)
    assert agent.idle_count() == 0


@pytest_twisted.ensureDeferred
async def test_cancelling_before_the_answer_aborts(agent, scripted):
    scripted.answers = [lambda t: None]  # never answers
    d = agent.request(b"GET", (scripted.url + "/").encode())
    await until(lambda: scripted.heads)
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    await until(lambda: scripted.open == 0)


@pytest_twisted.ensureDeferred
async def test_head_and_other_methods_go_to_the_fallback(scripted):
    calls = []

    class Fallback:
        def request(self, method, uri, headers=None, bodyProducer=None):
            calls.append(method)
            return defer.succeed("fallback")

    endpoints = CachingEndpointFactory(reactor, RemoteTLSPolicy.from_settings(_settings()), 5)
    made = DirectGetAgent(endpoints, Fallback())
    assert await made.request(b"HEAD", (scripted.url + "/").encode()) == "fallback"
    assert await made.request(b"POST", b"http://x/", None, object()) == "fallback"
    assert calls == [b"HEAD", b"POST"] and scripted.heads == []


@pytest_twisted.ensureDeferred
async def test_downloads_through_the_factory_use_it_and_validate(upstream, tmp_path):
    body = b"through the factory\n" * 1000
    url = upstream.register("/f.bin", Serve(body))
    chunked = upstream.register("/c.bin", Serve(body, chunked=True))
    factory = DownloaderFactory(RemoteSettings(url=url, max_retries=0), temp_dir=str(tmp_path))
    digest = {"sha256": hashlib.sha256(body).hexdigest()}
    try:
        for target in (url, chunked, url):
            result = await factory.build(target, expected_digests=digest).run()
            assert Path(result.path).read_bytes() == body
        assert upstream.total_connections == 1  # one keep-alive connection for all three
        assert factory.idle_connections() == 1
    finally:
        await factory.close()
    assert await upstream.wait_until_idle(2.0)


@pytest_twisted.ensureDeferred
async def test_a_truncated_body_is_reported_by_the_downloader(scripted, tmp_path):
    scripted.answers = [lambda t: (t.write(ok()[:-100]), t.loseConnection())]
    factory = DownloaderFactory(
        RemoteSettings(url=scripted.url, max_retries=0), temp_dir=str(tmp_path)
    )
    downloader = factory.build(scripted.url + "/x", expected_size=len(BODY))
    assert isinstance(downloader, HttpDownloader)
    try:
        with pytest.raises(TruncatedBody, match="body truncated after 900 of 1000 bytes"):
            await downloader.run()
    finally:
        await factory.close()


@pytest_twisted.ensureDeferred
async def test_a_connection_idle_too_long_is_not_reused(scripted):
    now = [1000.0]
    endpoints = CachingEndpointFactory(reactor, RemoteTLSPolicy.from_settings(_settings()), 5)
    made = DirectGetAgent(endpoints, None, clock=lambda: now[0])
    try:
        await get(made, scripted.url + "/")
        now[0] += IDLE_TIMEOUT - 1
        await get(made, scripted.url + "/")
        assert len(scripted.connections) == 1  # still fresh enough
        now[0] += IDLE_TIMEOUT + 1
        await get(made, scripted.url + "/")
        assert len(scripted.connections) == 2
        await until(lambda: scripted.open == 1)  # the stale one was closed
    finally:
        await made.close_idle()


@pytest.mark.parametrize(
    ("url", "origin", "target"),
    [
        (b"http://h:8080/a/b?c=d#frag", b"http://h:8080", b"/a/b?c=d"),
        (b"http://h?x=1", b"http://h", b"/?x=1"),
        (b"https://[::1]:8443", b"https://[::1]:8443", b"/"),
        (b"http://h/p;params?q", b"http://h", b"/p;params?q"),
    ],
)
def test_request_targets(url, origin, target):
    assert _split_target(url) == (origin, target)


@pytest.mark.parametrize(
    "url", [b"http://h/a b", b"http://h/a\r\nX: y", b"http://user:pw@h/", b"http:///path"]
)
def test_unsafe_urls_are_refused_before_anything_is_sent(url):
    with pytest.raises(ValueError):
        _split_target(url)


@pytest_twisted.ensureDeferred
async def test_the_request_line_and_host_come_from_the_url(agent, scripted):
    await get(agent, scripted.url + "?x=1#ignored")
    host = scripted.url.removeprefix("http://").encode()
    assert scripted.heads[0].split(b"\r\n")[:2] == [b"GET /?x=1 HTTP/1.1", b"Host: " + host]


def test_the_old_names_still_import():
    from downloaders import client

    assert client.Http11Agent is DirectGetAgent
    assert client.ResponseParseError is ResponseParseError


# --- answers both clients must read alike (Twisted's `Agent` and ours) ---------------------


@pytest.fixture
def either(http_client, scripted):
    """This test's client (both, in turn) on a persistent pool, closed afterwards."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    made = client_agent(http_client, pool)
    yield made
    if isinstance(made, DirectGetAgent):
        pytest_twisted.blockon(made.close_idle())
    pytest_twisted.blockon(pool.closeCachedConnections())


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n',
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\n\r\n",
    ],
    ids=["204", "304", "304-with-length"],
)
@pytest_twisted.ensureDeferred
async def test_no_body_statuses_are_empty_and_keep_the_connection(either, scripted, answer):
    scripted.answers = [answer, ok()]
    response = await either.request(b"GET", (scripted.url + "/").encode())
    assert response.length == 0
    data, reason = await body_and_reason(response)
    assert data == b"" and reason.check(ResponseDone)
    _, body = await get(either, scripted.url + "/")
    assert body == BODY and len(scripted.connections) == 1  # reused


@pytest_twisted.ensureDeferred
async def test_bare_lf_line_ends_are_read(either, scripted):
    scripted.answers = [b"HTTP/1.1 200 OK\nContent-Length: 2\nX-Old: yes\n\nok", ok()]
    response, body = await get(either, scripted.url + "/")
    assert (response.code, body) == (200, b"ok")
    assert response.headers.getRawHeaders(b"x-old") == [b"yes"]
    _, body = await get(either, scripted.url + "/")
    assert body == BODY and len(scripted.connections) == 1


class Trailing(Collect):
    """Collects a body, noting the trailers the response holds when the body ends."""

    def __init__(self, response: Any) -> None:
        super().__init__()
        self.response = response

    def connectionLost(self, reason: Any = None) -> None:
        self.trailers = getattr(self.response, "trailers", None)
        super().connectionLost(reason)


@pytest_twisted.ensureDeferred
async def test_trailers_never_change_the_headers_handed_over(either, scripted):
    scripted.answers = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Sum: abc\r\nConnection: close\r\n\r\n",
        ok(),
    ]
    response = await either.request(b"GET", (scripted.url + "/").encode())
    before = list(response.headers.getAllRawHeaders())
    trailing = Trailing(response)
    response.deliverBody(trailing)
    await trailing.ended
    assert trailing.data == b"hello" and trailing.reason.check(ResponseDone)
    assert list(response.headers.getAllRawHeaders()) == before
    assert not response.headers.hasHeader(b"x-sum")
    if isinstance(either, DirectGetAgent):  # ours keeps them apart, read before the end
        assert trailing.trailers.getRawHeaders(b"x-sum") == [b"abc"]
    _, body = await get(either, scripted.url + "/")
    assert body == BODY and len(scripted.connections) == 1  # a trailer is no connection header


class Raising(Collect):
    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        raise ValueError("the reader's own bug")


@pytest_twisted.ensureDeferred
async def test_a_body_protocol_that_raises_hears_its_own_exception(either, scripted):
    scripted.answers = [lambda t: t.write(ok()[:-500])]  # the rest never comes
    response = await either.request(b"GET", (scripted.url + "/").encode())
    raising = Raising()
    response.deliverBody(raising)
    await raising.ended
    assert raising.reason.check(ResponseFailed)
    reasons = raising.reason.value.reasons  # (Twisted's adds a _DataLoss after it)
    assert reasons[0].check(ValueError) and "the reader's own bug" in str(reasons[0].value)
    assert not any(r.check(ResponseParseError) for r in reasons)  # the server is not blamed
    await until(lambda: scripted.open == 0)  # an answer not read to its end: aborted
    _, body = await get(either, scripted.url + "/")
    assert body == BODY


# --- our body transport, as readers of Twisted's expect it ------------------------------------


@pytest_twisted.ensureDeferred
async def test_read_body_can_be_cancelled_through_abort_connection(agent, scripted, recwarn):
    scripted.answers = [lambda t: t.write(ok()[:-500])]  # then nothing more
    response = await agent.request(b"GET", (scripted.url + "/").encode())
    reading = readBody(response)  # would warn without the transport's abortConnection
    assert not [w for w in recwarn if "abortConnection" in str(w.message)]
    reading.cancel()
    with pytest.raises(defer.CancelledError):
        await reading
    await until(lambda: scripted.open == 0)
    assert agent.idle_count() == 0


@pytest.mark.parametrize("how", ["loseConnection", "abortConnection"])
@pytest_twisted.ensureDeferred
async def test_a_reader_giving_up_an_until_close_body_never_sees_its_end(agent, scripted, how):
    scripted.answers = [lambda t: t.write(b"HTTP/1.1 200 OK\r\n\r\nsome of it")]
    response = await agent.request(b"GET", (scripted.url + "/").encode())
    assert response.length is UNKNOWN_LENGTH
    collect = Collect()
    response.deliverBody(collect)
    await until(lambda: collect.data)
    getattr(collect.transport, how)()
    await collect.ended
    assert collect.reason.check(ResponseFailed)  # not PotentialDataLoss: a complete body
    await until(lambda: scripted.open == 0)
