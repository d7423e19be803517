"""`SendRoom` against real loopback sockets: a write of `room()` bytes is taken by the kernel at
once, whatever its send buffer, and the kernel never holds more than the unsent limit for a
client that reads nothing; where it cannot tell, nothing changes."""

from __future__ import annotations

import fcntl
import select
import socket
import sys
from types import SimpleNamespace

import pytest
from twisted.web.test.requesthelper import DummyRequest

from streamer.sendroom import NUDGE, SendRoom

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux socket figures")

LIMIT = 256 * 1024


@pytest.fixture
def pair():
    """A connected (server side, client side) pair; the client reads nothing."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    client.connect(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    server.setblocking(False)
    yield server, client
    server.close()
    client.close()


def _writable(sock: socket.socket) -> bool:
    return bool(select.select([], [sock], [], 0)[1])


def _fill(server: socket.socket, room: SendRoom) -> list[int]:
    """Write as a follower does on Twisted (a write waits in the process until the socket
    reports room): `room()` bytes, or a NUDGE when that is 0, until a write would wait. That
    one must be a NUDGE, and every other one must have been taken whole."""
    sizes = []
    while True:
        size = room.room() or NUDGE
        sizes.append(size)
        if not _writable(server):
            assert size == NUDGE and room.room() == 0, sizes
            return sizes
        sent = server.send(b"x" * size)
        assert room.unsent() <= LIMIT + NUDGE  # the kernel may take a little past the mark
        if sent < size:
            assert size == NUDGE, sizes
            return sizes
        assert len(sizes) < 10000


@pytest.mark.parametrize("sndbuf", [None, 32 * 1024])
def test_only_a_nudge_ever_waits_and_the_unsent_bytes_stay_bounded(pair, sndbuf):
    """With Linux's own send buffer (it grows to MiBs) and with a small fixed one (a slow
    link's), for a client that reads nothing: every write of `room()` bytes is taken at
    once, only a NUDGE ever waits, and the kernel holds about the limit unsent at most; once
    the client read what the kernel held, there is room again."""
    server, client = pair
    if sndbuf:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, LIMIT)
    room = SendRoom(server, LIMIT)
    sizes = _fill(server, room)
    assert sizes[0] > NUDGE
    if not sndbuf:
        assert room.unsent() >= LIMIT // 2, "the unsent limit, not the send buffer, stopped it"
    client.setblocking(False)
    while select.select([client], [], [], 0.2)[0]:
        if not client.recv(1 << 20):
            break
    assert select.select([], [server], [], 1.0)[1]
    assert room.room() > NUDGE
    assert _fill(server, room)[0] > NUDGE


def test_no_room_where_the_kernel_cannot_tell():
    """A transport without a TCP socket (a test double, or TLS): nothing to attach to."""
    request = DummyRequest([b""])
    assert SendRoom.attach(request) is None


def test_the_first_room_is_what_attach_measured(pair, monkeypatch):
    """`attach` asks the kernel once (both queries must work there); the `room` right after
    it (the body's first read) answers from that, without more system calls; the next ones
    ask the kernel again."""
    server, _client = pair
    transport = SimpleNamespace(getHandle=lambda: server, bufferSize=65536)
    request = SimpleNamespace(channel=SimpleNamespace(transport=transport))
    queries: list[int] = []
    ioctl = fcntl.ioctl

    def counted(fd, request, *args):
        queries.append(request)
        return ioctl(fd, request, *args)

    monkeypatch.setattr(fcntl, "ioctl", counted)
    room = SendRoom.attach(request, LIMIT)
    assert room is not None and transport.bufferSize == 0
    assert len(queries) == 1
    first = room.room()
    assert len(queries) == 1
    assert NUDGE < first <= LIMIT
    assert room.room() == first  # asked again: nothing was written meanwhile
    assert len(queries) == 2
    server.send(b"x" * first)
    assert room.room() < first
    assert len(queries) == 3
    room.detach()
    assert transport.bufferSize == 65536
