"""Work on the chunks of one large body in order, on a thread beside the reactor.

Most of the CPU of a large download goes to two calls that release the GIL: ``hashlib``'s
``update`` (for more than 2 KiB) and ``os.write`` to the temporary file (page-cache writes cost
1 to 3 s of kernel time per GiB on a busy machine). Done on the reactor thread they add up, one
stream uses one core, and every other connection of the process waits for them. An `InOrder`
hands each chunk to one function (``consume``) on a pool thread instead, one chunk after
another in the order given, so the reactor thread goes on reading the upstream and sending to
clients meanwhile: one stream can use two cores.

Small bodies never pay a thread hop: the users consume the first `INLINE_BYTES` of a stream
in their own thread, as before, and make an `InOrder` only for a body that grows past that. At
most *limit* bytes wait for the thread: a `put` beyond that waits for it (the caller is held
back as it would be doing the work itself), so memory stays flat whatever the disk's speed.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from twisted.internet import defer

__all__ = ["INLINE_BYTES", "LIMIT", "SMALL_CHUNK", "InOrder"]

#: The first bytes of every stream are best consumed in the caller's thread: for a small body
#: (16 KiB files, 1 MiB ones) the work costs less than a hand-over to a thread and back.
INLINE_BYTES = 1 << 20
#: A chunk smaller than this is consumed in the caller's thread when nothing waits for the
#: pool (a chunked body's small pieces): handing it over would cost more than the work.
SMALL_CHUNK = 64 << 10
#: Bytes that may wait for the thread per stream (chunks of up to 1 MiB each).
LIMIT = 2 << 20

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _threads() -> ThreadPoolExecutor:
    """The process's pool for chunk work, made on first use (a forked child makes its own)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            # Each stream holds one thread while it has chunks waiting; beyond a few streams
            # at once, more threads only contend for the same cores.
            workers = max(4, 2 * (os.cpu_count() or 1))
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="downloaders-inorder")
        return _pool


def _forget_pool() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


class InOrder:
    """Call *consume* with each chunk `put` here, in order, each exactly once.

    A chunk is consumed on a pool thread, or at once in the caller's thread when it is small
    and nothing waits (`SMALL_CHUNK`). What *consume* raises stops the stream: the chunks
    still waiting are dropped, the next `put` and `finish` raise it, and `drained` fails with
    it.

    ``done`` counts the bytes consumed (it only grows); ``error`` holds what *consume* raised.
    Only one thread may call `put`, `finish`, `drained` and `close` (the reactor's).
    """

    def __init__(self, consume: Callable[[bytes], Any], limit: int = LIMIT) -> None:
        self._consume = consume
        self._limit = limit
        self._jobs: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        #: Bytes queued and not consumed yet.
        self._waiting = 0
        #: Chunks wait for the pool thread (False once `finish` or `close` took them over).
        self._active = False
        #: A `_drain` was submitted to the pool and has not returned: never two at once.
        self._scheduled = False
        #: The pool thread is inside *consume*.
        self._busy = False
        self._closed = False
        self._watchers: list[tuple[Any, defer.Deferred[None]]] = []
        self.done = 0
        self.error: BaseException | None = None

    def put(self, chunk: bytes) -> None:
        """Consume *chunk* after the ones before it: on a pool thread, or now if it is small
        and nothing waits. Raises what *consume* raised."""
        if self.error is not None:
            raise self.error
        if self._closed:
            raise ValueError("put() after close()")
        # Nothing waits unless ``_active`` (only this thread sets it): consuming here keeps
        # the order, and no pool thread takes a chunk while it is False.
        if not self._active and len(chunk) < SMALL_CHUNK:
            self._consume_here(chunk)
            return
        with self._lock:
            while self._waiting >= self._limit and self.error is None:
                self._changed.wait()
            if self.error is not None:
                raise self.error
            self._jobs.append(chunk)
            self._waiting += len(chunk)
            self._active = True
            if self._scheduled:  # a pool thread runs `_drain`, or will: it takes this one too
                return
            self._scheduled = True
        _threads().submit(self._drain)

    def finish(self) -> None:
        """Return once every chunk was consumed; the ones no thread started on yet are
        consumed here, so this waits at most for the chunk under way. Raises what *consume*
        raised."""
        with self._lock:
            jobs = self._take_over()
            watchers, self._watchers = self._watchers, []
        try:
            for chunk in jobs:
                self._consume_here(chunk)
        finally:
            for _reactor, watcher in watchers:  # (in the reactor's thread: the caller's)
                if self.error is None:
                    watcher.callback(None)
                else:
                    watcher.errback(self.error)
        if self.error is not None:
            raise self.error

    def drained(self, reactor: Any) -> defer.Deferred[None]:
        """A Deferred that fires in *reactor*'s thread once every chunk put so far was consumed
        (without taking the work over: the reactor is not held), or fails with what *consume*
        raised."""
        with self._lock:
            if self.error is None and self._active:
                watcher: defer.Deferred[None] = defer.Deferred(self._forget_watcher)
                self._watchers.append((reactor, watcher))
                return watcher
        if self.error is not None:
            return defer.fail(self.error)
        return defer.succeed(None)

    def close(self) -> None:
        """Drop what waits and return once the chunk under way (if any) is done: after this,
        *consume* is never called again (its file may be closed)."""
        with self._lock:
            self._closed = True
            self._take_over()
            watchers, self._watchers = self._watchers, []
        for _reactor, watcher in watchers:
            watcher.errback(defer.CancelledError())  # (in the reactor's thread: the caller's)

    def _forget_watcher(self, watcher: defer.Deferred[None]) -> None:
        """Canceller of a `drained` Deferred: nothing fires it any more."""
        with self._lock:
            self._watchers = [(r, w) for r, w in self._watchers if w is not watcher]

    # -- internals --------------------------------------------------------------------------

    def _take_over(self) -> list[bytes]:
        """(With the lock.) Stop the pool thread after its current chunk; return the rest."""
        self._active = False
        while self._busy:
            self._changed.wait()
        jobs = list(self._jobs)
        self._jobs.clear()
        self._waiting = 0
        self._changed.notify_all()
        return [] if self._closed else jobs

    def _consume_here(self, chunk: bytes) -> None:
        try:
            self._consume(chunk)
        except BaseException as exc:
            self.error = exc
            raise
        self.done += len(chunk)

    def _drain(self) -> None:
        """The pool thread's loop: consume chunks until none is left (or `finish` takes over)."""
        lock = self._lock
        while True:
            with lock:
                if not self._active:  # taken over by `finish` or `close`: they tell watchers
                    self._scheduled = False
                    return
                if not self._jobs:
                    self._active = self._scheduled = False
                    self._changed.notify_all()
                    watchers, self._watchers = self._watchers, []
                    break
                chunk = self._jobs.popleft()
                self._busy = True
            try:
                self._consume(chunk)
            except BaseException as exc:
                with lock:
                    self.error = exc
                    self._busy = False
                    self._active = self._scheduled = False
                    self._jobs.clear()
                    self._waiting = 0
                    self._changed.notify_all()
                    watchers, self._watchers = self._watchers, []
                break
            with lock:
                self._busy = False
                self.done += len(chunk)
                self._waiting -= len(chunk)
                self._changed.notify_all()
        for reactor, watcher in watchers:
            error = self.error
            if error is None:
                reactor.callFromThread(watcher.callback, None)
            else:
                reactor.callFromThread(watcher.errback, error)
