"""How a response reaches the socket (`StreamerChannel.write`), over real loopback sockets.

A response written without a producer goes to the kernel while it is written, its head and
its first body bytes in one ``send``; what the socket does not take, and everything written
behind bytes still queued, goes through the transport in order.
"""

from __future__ import annotations

import hashlib
import socket

import pytest
import pytest_twisted
from twisted.internet import reactor, tcp, threads
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from streamer.logs import RequestLog
from streamer.metrics import Metrics
from streamer.service import StreamerSite
from tests.support.faults import Serve

SMALL = b"sixteen bytes..\n" * 1024  # 16 KiB
LARGE = hashlib.sha256(b"large").digest() * (32 * 1024 * 1024 // 32)  # fills socket buffers


class _Answer(Resource):
    """``/small`` and ``/large``: the body written at once, without a producer; records
    whether a send happened while it was being written."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.rendering = False

    def render(self, request):
        body = LARGE if request.path == b"/large" else SMALL
        request.setHeader(b"content-length", b"%d" % len(body))
        self.rendering = True
        try:
            request.write(body)
            request.finish()
        finally:
            self.rendering = False
        return NOT_DONE_YET


@pytest.fixture
def served(monkeypatch):
    """(port, answer resource, sends): the sends are ``(while rendering, bytes)`` of every
    ``writeSomeData`` on a connection the site accepted."""
    answer = _Answer()
    site = StreamerSite(answer, metrics=Metrics(), request_log=RequestLog(), reactor=reactor)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    ours = port.getHost().port
    sends: list[tuple[bool, bytes]] = []
    send = tcp.Server.writeSomeData

    def recording_send(self, data):
        sent = send(self, data)
        if self.getHost().port == ours and isinstance(sent, int):
            sends.append((answer.rendering, bytes(data[:sent])))
        return sent

    monkeypatch.setattr(tcp.Server, "writeSomeData", recording_send)
    yield ours, sends
    pytest_twisted.blockon(port.stopListening())


def _read_answers(port: int, *requests: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    """Send the *requests* (method, path) pipelined on one connection and read their
    answers: (head, body) each."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(b"".join(_request(method, path) for method, path in requests))
        data = b""
        for method, _ in requests:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(1 << 20)
                assert chunk, f"closed before a head: {data[:200]!r}"
                data += chunk
            head, _, data = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            if method == "HEAD":
                length = 0
            while len(data) < length:
                chunk = sock.recv(1 << 20)
                assert chunk, f"closed after {len(data)} of {length} body bytes"
                data += chunk
            answers.append((head, data[:length]))
            data = data[length:]
    return answers


def _request(method: str, path: str) -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


@pytest_twisted.ensureDeferred
async def test_a_small_answer_leaves_in_one_send_while_it_is_written(served):
    port, sends = served
    ((head, body),) = await threads.deferToThread(_read_answers, port, ("GET", "/small"))
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == SMALL
    assert len(sends) == 1, [(during, len(data)) for during, data in sends]
    during, data = sends[0]
    assert during, "sent at the reactor's next turn, not while written"
    assert data == head + b"\r\n\r\n" + SMALL


@pytest_twisted.ensureDeferred
async def test_a_head_answer_leaves_in_one_send_while_it_is_written(served):
    port, sends = served
    ((head, _),) = await threads.deferToThread(_read_answers, port, ("HEAD", "/small"))
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\ncontent-length: 16384" in head.lower()
    assert sends == [(True, head + b"\r\n\r\n")]


@pytest_twisted.ensureDeferred
async def test_what_the_socket_does_not_take_follows_through_the_transport(served):
    port, sends = served
    ((head, body),) = await threads.deferToThread(_read_answers, port, ("GET", "/large"))
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert body == LARGE
    assert sends[0][0] and not sends[-1][0], "the rest went out in later turns"


@pytest_twisted.ensureDeferred
async def test_a_pipelined_answer_waits_behind_the_bytes_still_queued(served):
    """The first answer is too large for the socket: the second, written while most of the
    first waits in the transport, must come after it, not be sent ahead."""
    port, _ = served
    pipelined = [("GET", "/large"), ("GET", "/small"), ("HEAD", "/small"), ("GET", "/small")]
    answers = await threads.deferToThread(_read_answers, port, *pipelined)
    assert [head.split(b"\r\n")[0] for head, _ in answers] == [b"HTTP/1.1 200 OK"] * 4
    assert [body for _, body in answers] == [LARGE, SMALL, b"", SMALL]


@pytest_twisted.ensureDeferred
async def test_a_cold_body_s_first_bytes_leave_before_anything_else_is_set_up(
    make_service, upstream, monkeypatch
):
    """A large cold body (through the service: `StreamerChannel`, the lazy path): its head and
    first body bytes go to the kernel in one ``send`` as they are written, before the
    connection is set up for the rest of the body (its kernel room, ``TCP_NOTSENT_LOWAT``;
    the producer) and without passing through the transport's buffer (which costs an
    ``epoll_ctl`` pair and the reactor's next turn, or a send of its own); then the rest."""
    from streamer.sendroom import SendRoom

    env = await make_service()
    data = hashlib.sha256(b"cold").digest() * (1024 * 1024 // 32)
    upstream.register("/files/cold.bin", Serve(data))
    await env.add("cold.bin", data, stored=False, url=upstream.url("/files/cold.bin"))
    events: list[str] = []
    send, queue, attach = tcp.Server.writeSomeData, tcp.Server.startWriting, SendRoom.attach

    def ours(transport) -> bool:
        return transport.getHost().port == env.port

    def recording_send(self, data):
        if ours(self):
            events.append("send" if bytes(data[:12]) != b"HTTP/1.1 200" else "head and body")
        return send(self, data)

    def recording_queue(self):
        if ours(self):
            events.append("queued")
        return queue(self)

    def recording_attach(request, *args):
        events.append("kernel room set up")
        return attach(request, *args)

    monkeypatch.setattr(tcp.Server, "writeSomeData", recording_send)
    monkeypatch.setattr(tcp.Server, "startWriting", recording_queue)
    monkeypatch.setattr(SendRoom, "attach", recording_attach)
    ((head, body),) = await threads.deferToThread(
        _read_answers, env.port, ("GET", "/fixtures/cold.bin")
    )
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == data
    assert events[:2] == ["head and body", "kernel room set up"], events[:6]
