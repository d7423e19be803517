"""`InOrder`: chunks consumed in order beside the caller's thread, with a bounded backlog; and
the digests of a large stream, hashed that way, equal hashlib's."""

from __future__ import annotations

import hashlib
import os
import random
import threading

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from downloaders.digests import DigestCalculator
from downloaders.inorder import INLINE_BYTES, SMALL_CHUNK, InOrder

MIB = 1 << 20


class Recorder:
    """A *consume* that records each chunk and the thread it ran on; with a gate, each call
    waits for it first."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.chunks: list[bytes] = []
        self.threads: list[int] = []
        self.gate = gate
        self.entered = threading.Semaphore(0)

    def __call__(self, chunk: bytes) -> None:
        self.entered.release()
        if self.gate is not None:
            assert self.gate.wait(10)
        self.chunks.append(chunk)
        self.threads.append(threading.get_ident())


def test_chunks_of_any_size_are_consumed_once_in_order_off_the_callers_thread() -> None:
    rng = random.Random(7)
    chunks = [os.urandom(rng.choice([10, 4096, SMALL_CHUNK, 300_000, MIB])) for _ in range(120)]
    record = Recorder()
    queue = InOrder(record, limit=2 * MIB)
    for chunk in chunks:
        queue.put(chunk)
    queue.finish()
    assert record.chunks == chunks
    assert queue.done == sum(map(len, chunks))
    big = [t for c, t in zip(record.chunks, record.threads, strict=True) if len(c) >= SMALL_CHUNK]
    assert set(big) - {threading.get_ident()}, "every large chunk ran on the caller's thread"


def test_put_waits_while_the_backlog_is_full_so_memory_stays_bounded() -> None:
    gate = threading.Event()
    record = Recorder(gate)
    queue = InOrder(record, limit=2 * MIB)
    queue.put(b"a" * MIB)
    assert record.entered.acquire(timeout=10)  # the thread is on "a" (counted until done)
    queue.put(b"b" * MIB)  # 2 MiB held now: the limit
    returned = threading.Event()

    def put_one_more() -> None:
        queue.put(b"c" * MIB)
        returned.set()

    putter = threading.Thread(target=put_one_more)
    putter.start()
    assert not returned.wait(0.3), "put() returned with the backlog full"
    gate.set()
    assert returned.wait(10)
    putter.join()
    queue.finish()
    assert [c[:1] for c in record.chunks] == [b"a", b"b", b"c"]


def test_finish_consumes_what_no_thread_started_on_in_the_callers_thread() -> None:
    gate = threading.Event()
    record = Recorder(gate)
    queue = InOrder(record, limit=4 * MIB)
    for letter in b"abcd":
        queue.put(bytes([letter]) * MIB)
    assert record.entered.acquire(timeout=10)  # the pool thread is inside chunk "a"
    finishing = threading.Thread(target=queue.finish)
    finishing.start()
    gate.set()
    finishing.join(10)
    assert [c[:1] for c in record.chunks] == [b"a", b"b", b"c", b"d"]
    assert record.threads[0] != finishing.ident
    assert record.threads[1:] == [finishing.ident] * 3


def test_an_error_of_consume_stops_the_stream_and_reaches_the_caller() -> None:
    seen: list[bytes] = []

    def consume(chunk: bytes) -> None:
        if chunk.startswith(b"x"):
            raise OSError(28, "No space left on device")
        seen.append(chunk)

    queue = InOrder(consume, limit=4 * MIB)
    queue.put(b"a" * MIB)
    queue.put(b"x" * MIB)
    queue.put(b"b" * MIB)
    with pytest.raises(OSError, match="No space"):
        queue.finish()
    with pytest.raises(OSError, match="No space"):
        queue.put(b"c" * MIB)
    assert seen == [b"a" * MIB]


@pytest_twisted.ensureDeferred
async def test_drained_fires_in_the_reactor_once_every_chunk_was_consumed() -> None:
    gate = threading.Event()
    record = Recorder(gate)
    queue = InOrder(record, limit=4 * MIB)
    queue.put(b"a" * MIB)
    queue.put(b"b" * MIB)
    drained = queue.drained(reactor)
    assert not drained.called
    gate.set()
    await drained
    assert len(record.chunks) == 2
    assert (await queue.drained(reactor)) is None  # nothing waits: at once


@pytest_twisted.ensureDeferred
async def test_drained_fails_with_the_error_of_consume() -> None:
    def consume(chunk: bytes) -> None:
        raise OSError(5, "Input/output error")

    queue = InOrder(consume, limit=4 * MIB)
    drained_early = None
    queue.put(b"a" * MIB)
    drained_early = queue.drained(reactor)
    with pytest.raises(OSError, match="Input/output"):
        await drained_early
    with pytest.raises(OSError, match="Input/output"):
        await queue.drained(reactor)


def test_close_drops_what_waits_and_returns_after_the_chunk_under_way() -> None:
    gate = threading.Event()
    record = Recorder(gate)
    queue = InOrder(record, limit=4 * MIB)
    for letter in b"abc":
        queue.put(bytes([letter]) * MIB)
    assert record.entered.acquire(timeout=10)
    closing = threading.Thread(target=queue.close)
    closing.start()
    closing.join(0.2)
    assert closing.is_alive(), "close() returned while consume() still ran"
    gate.set()
    closing.join(10)
    assert [c[:1] for c in record.chunks] == [b"a"]
    with pytest.raises(ValueError):
        queue.put(b"d")


@pytest_twisted.ensureDeferred
async def test_a_cancelled_drained_is_never_fired_again() -> None:
    gate = threading.Event()
    queue = InOrder(Recorder(gate))
    queue.put(b"a" * MIB)
    drained = queue.drained(reactor)
    drained.cancel()
    with pytest.raises(defer.CancelledError):
        await drained
    gate.set()
    queue.finish()  # (would raise AlreadyCalledError in the reactor if it fired it)
    await queue.drained(reactor)


@pytest.mark.parametrize("algorithms", [("sha256",), ("sha256", "sha512", "md5")])
def test_digests_of_a_large_stream_hashed_beside_the_caller_are_hashlibs(algorithms) -> None:
    rng = random.Random(3)
    data = os.urandom(INLINE_BYTES * 5 + 12345)
    calculator = DigestCalculator(algorithms)
    position = 0
    while position < len(data):
        step = rng.choice([1, 1000, SMALL_CHUNK, 700_000, MIB])
        calculator.update(data[position : position + step])
        position += step
    expected = {name: hashlib.new(name, data).hexdigest() for name in algorithms}
    assert calculator.artifact_attributes() == {"size": len(data), **expected}
