"""Flow control end to end: a client that does not read makes the streamer buffer nothing
beyond a chunk or two, does not hold back the upstream or the other clients, catches up
from the temp file later, and is cut off once it made no progress for too long."""

from __future__ import annotations

import hashlib
import os
import socket
import tracemalloc

import pytest_twisted
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.error import ConnectionDone

from downloaders.http import READ_SIZE
from downloaders.inorder import LIMIT
from streamer.lazy import LazyOptions
from tests.support.clients import run_curl
from tests.support.faults import Gated, Generated, StallMidBody
from tests.support.polling import holds_within, until

BIG = Generated(16 * 1024 * 1024, block_size=65536, seed=b"flow")


class _SlowClient(protocol.Protocol):
    """A raw HTTP/1.1 client that stops reading after connecting until `resume()`; hashes
    the body as it arrives and records how the connection ended."""

    def __init__(self, path: bytes, reading: bool = False) -> None:
        self.path = path
        self.reading = reading
        self.head = b""
        self.in_body = False
        self.body_bytes = 0
        self.digest = hashlib.sha256()
        self.ended: defer.Deferred[bool] = defer.Deferred()
        self.clean = False

    def connectionMade(self) -> None:
        self.transport.write(
            b"GET " + self.path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        if not self.reading:
            # A small receive buffer, so the kernel cannot absorb the whole body for us.
            self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            self.transport.pauseProducing()

    def resume(self) -> None:
        self.reading = True
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            self.in_body = True
            self.head, _, data = self.head.partition(b"\r\n\r\n")
        self.body_bytes += len(data)
        self.digest.update(data)

    def connectionLost(self, reason) -> None:
        self.clean = reason.check(ConnectionDone) is not None
        self.ended.callback(self.clean)


def _connect(env, path: str, reading: bool = False) -> _SlowClient:
    client = _SlowClient(b"/" + path.encode(), reading)
    factory = protocol.ClientFactory.forProtocol(lambda: client)
    factory.noisy = False
    reactor.connectTCP("127.0.0.1", env.port.getHost().port, factory)
    return client


@pytest_twisted.inlineCallbacks
def test_slow_client_costs_no_memory_and_does_not_hold_back_the_fast_one(lazy_env, tmp_path):
    env = lazy_env.start()
    env.remote("up")
    url = env.upstream.register("/big", BIG)
    sha = BIG.sha256()
    yield env.publish("repo/big", b"", ("up", url), digest=sha, size=BIG.size)

    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        slow = _connect(env, "repo/big")
        assert (yield holds_within(lambda: sha in env.streamer.in_flight))
        fast_file = tmp_path / "fast.bin"
        code, _out, err = yield run_curl("-f", "-o", str(fast_file), env.url("repo/big"))
        assert code == 0, err
        # The upstream finished and the artifact is stored while the slow client read nothing.
        assert (yield holds_within(lambda: env.storage.has(sha)))
        assert slow.body_bytes == 0
        current, peak = tracemalloc.get_traced_memory()
        held, peak_growth = current - baseline, peak - baseline
    finally:
        tracemalloc.stop()
    print(f"\ntraced memory peak growth: {peak_growth / 1024:.0f} KiB for {BIG.size >> 20} MiB")
    # What the slow client costs: nothing left once the download is over (it still reads
    # nothing): its follower waits with a 4 KiB nudge, not with a read or two of the body.
    assert held < 256 * 1024, held
    # At the peak, only what any download with a fast client holds (see the module of each
    # budget): the spool's backlog, the upstream read being made, and a read of the fast
    # client that fell behind the chunks in memory (a busy machine); plus this process's
    # upstream server and objects. Not the slow client's share of a 16 MiB body.
    budgets = LIMIT + READ_SIZE + LazyOptions().read_size
    assert peak_growth < budgets + 512 * 1024, peak_growth
    assert hashlib.sha256(fast_file.read_bytes()).hexdigest() == sha

    slow.resume()
    assert (yield slow.ended)
    assert slow.body_bytes == BIG.size
    assert slow.digest.hexdigest() == sha
    assert len(env.upstream.requests("/big")) == 1
    assert (yield holds_within(lambda: not env.streamer.in_flight))


@pytest_twisted.inlineCallbacks
def test_client_making_no_progress_is_aborted_while_the_download_completes(lazy_env):
    env = lazy_env.start(no_progress_timeout=0.3)
    env.remote("up")
    url = env.upstream.register("/big", BIG)
    yield env.publish("repo/big", b"", ("up", url), digest=BIG.sha256(), size=BIG.size)
    slow = _connect(env, "repo/big")
    assert (yield holds_within(lambda: env.storage.has(BIG.sha256())))
    yield holds_within(lambda: False, timeout=0.4)
    slow.resume()
    clean = yield slow.ended
    assert not clean, "a stalled client's connection is aborted"
    assert slow.body_bytes < BIG.size
    assert not env.streamer.in_flight


@pytest_twisted.inlineCallbacks
def test_a_reading_client_is_never_cut_off_by_the_no_progress_timer(lazy_env):
    env = lazy_env.start(no_progress_timeout=0.2)
    env.remote("up")
    url = env.upstream.register("/big", BIG)
    yield env.publish("repo/big", b"", ("up", url), digest=BIG.sha256(), size=BIG.size)
    client = _connect(env, "repo/big", reading=True)
    assert (yield client.ended)
    assert client.body_bytes == BIG.size
    assert client.digest.hexdigest() == BIG.sha256()


@pytest_twisted.inlineCallbacks
def test_many_slow_clients_hold_a_small_read_each_not_a_full_one(lazy_env):
    """200 clients that read nothing join a download with 6 MiB already written: each holds
    one small read (64 KiB) of unsent bytes, not a full 512 KiB one (100 MiB together)."""
    from streamer.follower import MIN_READ_SIZE
    from streamer.static import Senders

    env = lazy_env.start()
    env.remote("up")
    body = bytes(range(256)) * (8 * 4096)  # 8 MiB
    url = env.upstream.register("/big", StallMidBody(6 * 1024 * 1024, body))
    sha = hashlib.sha256(body).hexdigest()
    yield env.publish("repo/big", b"", ("up", url), digest=sha, size=len(body))
    first = _connect(env, "repo/big")
    assert (yield holds_within(lambda: sha in env.streamer.in_flight))
    download = env.streamer.in_flight[sha]
    assert (yield holds_within(lambda: download.written >= 6 * 1024 * 1024))
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        clients = [_connect(env, "repo/big") for _ in range(200)]
        assert (yield holds_within(lambda: Senders.count == 201, timeout=60))
        growth = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    print(f"\ntraced memory growth: {growth / 2**20:.1f} MiB for 200 stalled clients")
    # Each: one read, plus the objects of its request and of both ends of its connection
    # (about 100 KiB here); a full read each was 100 MiB.
    assert growth < 200 * (MIN_READ_SIZE + 192 * 1024), growth
    for client in [first, *clients]:
        client.transport.abortConnection()
    assert (yield holds_within(lambda: Senders.count == 0))
    assert len(env.upstream.requests("/big")) == 1


def _chunk_being_written(monkeypatch) -> dict[str, int]:
    """Patch `InFlight.write` so that the returned dict's ``"chunk"`` says which upstream
    chunk the process is handling: n while the n-th is written, -n between chunks."""
    from streamer.inflight import InFlight

    writing = {"chunk": 0}
    write = InFlight.write

    def recording_write(self, data):
        writing["chunk"] = abs(writing["chunk"]) + 1
        try:
            return write(self, data)
        finally:
            writing["chunk"] = -writing["chunk"]  # negative: between chunks

    monkeypatch.setattr(InFlight, "write", recording_write)
    return writing


@pytest_twisted.inlineCallbacks
def test_a_large_cold_body_starts_going_out_as_its_first_chunk_is_written(lazy_env, monkeypatch):
    """Time to first byte: the response's first bytes are sent while the upstream's first
    chunk is handled, not at the reactor's next turn, where the next upstream read (hashed and
    written) would come first."""
    from twisted.internet import tcp

    env = lazy_env.start()
    env.remote("up")
    url = env.upstream.register("/big", BIG)
    yield env.publish("repo/big", b"", ("up", url), digest=BIG.sha256(), size=BIG.size)
    ours = env.port.getHost().port
    events: list[tuple[str, int]] = []
    writing = _chunk_being_written(monkeypatch)
    send = tcp.Server.writeSomeData

    def recording_send(self, data):
        if self.getHost().port == ours and not events:
            events.append(("first send", writing["chunk"]))
        return send(self, data)

    monkeypatch.setattr(tcp.Server, "writeSomeData", recording_send)
    code, out, err = yield run_curl("-f", "-o", "/dev/null", env.url("repo/big"))
    assert code == 0, err
    assert events == [("first send", 1)], "sent while the first chunk was written"


@pytest_twisted.inlineCallbacks
def test_a_cold_body_s_first_bytes_go_out_before_the_temp_file_has_them(lazy_env, monkeypatch):
    """Time to first byte: the client's first bytes are sent from memory before the chunk is
    appended to the temp file (and before the claim's notice is written), not after."""
    from twisted.internet import tcp

    env = lazy_env.start()
    env.remote("up")
    url = env.upstream.register("/big", BIG)
    yield env.publish("repo/big", b"", ("up", url), digest=BIG.sha256(), size=BIG.size)
    ours = env.port.getHost().port
    on_disk: list[int] = []
    send = tcp.Server.writeSomeData

    def recording_send(self, data):
        if self.getHost().port == ours and not on_disk:
            on_disk.append(os.path.getsize(env.streamer.in_flight[BIG.sha256()].path))
        return send(self, data)

    monkeypatch.setattr(tcp.Server, "writeSomeData", recording_send)
    code, out, err = yield run_curl("-f", "-o", "/dev/null", env.url("repo/big"))
    assert code == 0, err
    assert on_disk == [0], "the temp file held nothing yet when the first bytes were sent"
    yield until(lambda: BIG.sha256() not in env.streamer.in_flight)
    assert env.storage.has(BIG.sha256())


@pytest_twisted.inlineCallbacks
def test_a_large_cold_body_gives_up_the_cpu_once_right_after_its_first_bytes(lazy_env, monkeypatch):
    """A client on this host that the first bytes wake runs before the process handles the
    rest of the download (instead of once its time slice ends): the process yields its CPU
    right after the first send, while the first chunk is handled, and only then."""
    from twisted.internet import tcp

    env = lazy_env.start()
    env.remote("up")
    url = env.upstream.register("/big", BIG)
    yield env.publish("repo/big", b"", ("up", url), digest=BIG.sha256(), size=BIG.size)
    ours = env.port.getHost().port
    events: list[tuple[str, int]] = []
    writing = _chunk_being_written(monkeypatch)
    send, give_up = tcp.Server.writeSomeData, os.sched_yield

    def recording_send(self, data):
        if self.getHost().port == ours:
            events.append(("send", writing["chunk"]))
        return send(self, data)

    def recording_yield():
        events.append(("yield", writing["chunk"]))
        give_up()

    monkeypatch.setattr(tcp.Server, "writeSomeData", recording_send)
    monkeypatch.setattr(os, "sched_yield", recording_yield)
    code, out, err = yield run_curl("-f", "-o", "/dev/null", env.url("repo/big"))
    assert code == 0, err
    assert events[:2] == [("send", 1), ("yield", 1)], events[:4]
    assert [e for e in events if e[0] == "yield"] == [("yield", 1)]


@pytest_twisted.inlineCallbacks
def test_stalled_clients_leave_their_bytes_in_the_kernel_and_a_bounded_amount_there(lazy_env):
    """50 clients stop reading a 6 MiB download. Once they settled, the process holds a NUDGE
    at most of unsent bytes for each (it held one or two 64 KiB reads), and the kernel about
    UNSENT_LIMIT unsent at most (Linux let it grow to 4 MiB a connection); reading again,
    each gets the whole body, from one upstream request."""
    from streamer.sendroom import NUDGE, UNSENT_LIMIT, SendRoom
    from streamer.static import Senders

    body = Generated(6 * 1024 * 1024, block_size=65536, seed=b"stalled")
    env = lazy_env.start()
    env.remote("up")
    gate = Gated(body)
    url = env.upstream.register("/big", gate)
    yield env.publish("repo/big", b"", ("up", url), digest=body.sha256(), size=body.size)
    clients = [_connect(env, "repo/big") for _ in range(50)]
    waiting = env.streamer.in_flight
    yield until(lambda: len(getattr(waiting.get(body.sha256()), "followers", ())) == 50, 30)
    download = waiting[body.sha256()]
    gate.release()
    assert (yield holds_within(lambda: Senders.count == 50, timeout=30))
    transports = [f.request.channel.transport for f in download.followers]

    def unsent() -> list[int]:
        return [SendRoom(t.getHandle()).unsent() for t in transports]

    previous: list[int] = []
    while (now := unsent()) != previous:  # settled: the kernel takes nothing more
        previous = now
        yield holds_within(lambda: False, timeout=0.3)
    held = [len(t.dataBuffer) - t.offset + t._tempDataLen for t in transports]
    print(f"\n50 stalled clients: {sum(held) / 1024:.0f} KiB held in the process, ", end="")
    print(f"{sum(now) / 2**20:.1f} MiB unsent in the kernel")
    assert max(held) <= NUDGE, sorted(held)[-5:]
    assert Senders.in_transit <= 50 * NUDGE
    assert max(now) <= UNSENT_LIMIT + NUDGE, sorted(now)[-5:]

    for client in clients:
        client.resume()
    ended = yield defer.DeferredList([c.ended for c in clients])
    assert all(clean for _ok, clean in ended)
    assert all(c.body_bytes == body.size for c in clients)
    assert {c.digest.hexdigest() for c in clients} == {body.sha256()}
    assert len(env.upstream.requests("/big")) == 1


@pytest_twisted.inlineCallbacks
def test_followers_keep_the_bytes_in_transit_within_the_budget_and_all_finish(
    lazy_env, monkeypatch
):
    """20 clients read one download with the send budget cut to 128 KiB: the bytes read and
    not yet in the kernel never exceed it, followers that find it spent wait for bytes to
    leave (and are woken: every client gets the whole body)."""
    from streamer import static
    from streamer.static import Senders

    budget = 128 * 1024
    monkeypatch.setattr(static, "SEND_BUDGET", budget)
    seen = {"most": 0, "waits": 0}
    take, wait = Senders.take.__func__, Senders.wait.__func__

    def counting_take(cls, size):
        take(cls, size)
        seen["most"] = max(seen["most"], cls.in_transit)

    def counting_wait(cls, resume):
        seen["waits"] += 1
        wait(cls, resume)

    monkeypatch.setattr(Senders, "take", classmethod(counting_take))
    monkeypatch.setattr(Senders, "wait", classmethod(counting_wait))
    body = Generated(4 * 1024 * 1024, block_size=65536, seed=b"budget")
    env = lazy_env.start()
    env.remote("up")
    url = env.upstream.register("/big", body)
    yield env.publish("repo/big", b"", ("up", url), digest=body.sha256(), size=body.size)
    clients = [_connect(env, "repo/big", reading=True) for _ in range(20)]
    ended = yield defer.DeferredList([c.ended for c in clients])
    assert all(clean for _ok, clean in ended)
    assert {(c.body_bytes, c.digest.hexdigest()) for c in clients} == {(body.size, body.sha256())}
    print(f"\nmost in transit {seen['most'] / 1024:.0f} KiB, {seen['waits']} waits")
    assert 0 < seen["most"] <= budget
    assert seen["waits"] > 0
    assert Senders.in_transit == 0


def _get(sock: socket.socket, path: str) -> tuple[bytes, bytes]:
    """One GET on a kept-alive blocking socket: (head, body), read by Content-Length."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before the head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    (length,) = (
        v
        for k, _, v in (h.partition(b":") for h in head.split(b"\r\n"))
        if k.lower() == b"content-length"
    )
    while len(body) < int(length):
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError(f"closed after {len(body)} of {int(length)} body bytes")
        body += chunk
    return head, body


@pytest_twisted.inlineCallbacks
def test_a_stored_body_after_a_followed_one_on_the_same_connection(lazy_env):
    """A follower tunes its connection for its body (`SendRoom`); the next response on that
    kept-alive connection, a stored file's pull producer, must not inherit it (Twisted
    paused that producer twice, for the head and the first chunk, and resumed it once: the
    body never came)."""
    body = Generated(2 * 1024 * 1024, block_size=65536, seed=b"keepalive")
    env = lazy_env.start()
    env.remote("up")
    url = env.upstream.register("/big", body)
    yield env.publish("repo/big", b"", ("up", url), digest=body.sha256(), size=body.size)
    sock = socket.create_connection(("127.0.0.1", env.port.getHost().port))
    sock.settimeout(10)
    try:
        head, first = yield threads.deferToThread(_get, sock, "/repo/big")
        assert head.startswith(b"HTTP/1.1 200") and len(first) == body.size
        yield until(lambda: env.storage.has(body.sha256()) and not env.streamer.in_flight)
        head, second = yield threads.deferToThread(_get, sock, "/repo/big")
    finally:
        sock.close()
    assert head.startswith(b"HTTP/1.1 200")
    assert second == first
    assert hashlib.sha256(second).hexdigest() == body.sha256()
