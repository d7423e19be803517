"""Temporary files for downloads: created with one ``os.open``, or ahead of time in a thread.

Creating a file (a new inode and directory entry) is the most expensive filesystem call of a
small download: on some disks a good part of a millisecond of kernel CPU, more than the HTTP
work for a 16 KiB file. A `TempFilePool` moves that cost off the reactor thread: a worker
thread keeps a few empty files ready, and a download takes one without waiting. A pool that
runs dry creates the file inline, so a download never waits for the thread either.
"""

from __future__ import annotations

import collections
import os
from typing import Any

from twisted.internet import defer, threads

__all__ = ["TEMP_PREFIX", "TempFilePool", "create_temp_file", "write_temp_file"]

#: Names of the downloaders' temporary files: this prefix, then 16 random hex digits.
TEMP_PREFIX = ".download-"
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_ATTEMPTS = 100


def create_temp_file(folder: str, mode: int = 0o600) -> tuple[int, str]:
    """Create a new empty file (*mode*, less the umask) in *folder*; return its descriptor
    and path.

    ``O_CREAT | O_EXCL`` on a random name, as ``tempfile`` does, minus its per-call overhead
    (a name generator, a file object and a buffer per file). Raises ``OSError``.
    """
    for _ in range(_ATTEMPTS):
        path = os.path.join(folder, f"{TEMP_PREFIX}{os.urandom(8).hex()}")
        try:
            return os.open(path, _FLAGS, mode), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name in {folder}")


def write_temp_file(folder: str, data: bytes, mode: int = 0o600, mtime: float | None = None) -> str:
    """Create a new file in *folder* holding *data* (a body kept in memory until it was
    validated), modified at *mtime* when given (a failure to date it is ignored: the date is
    a courtesy); return its path. Raises ``OSError``, leaving nothing behind."""
    fd, path = create_temp_file(folder, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if mtime is not None:
            try:
                os.utime(fd, (mtime, mtime))
            except OSError:
                pass
    except BaseException:
        os.close(fd)
        _unlink_quietly(path)
        raise
    os.close(fd)
    return path


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _create_many(folder: str, count: int, mode: int) -> list[tuple[int, str]]:
    """Up to *count* new files (fewer if the folder refuses more; the caller creates inline)."""
    made: list[tuple[int, str]] = []
    try:
        for _ in range(count):
            made.append(create_temp_file(folder, mode))
    except OSError:
        pass
    return made


def _drop(item: tuple[int, str]) -> None:
    fd, path = item
    try:
        os.close(fd)
    finally:
        _unlink_quietly(path)


class TempFilePool:
    """Empty temporary files in *folder*, created ahead by a worker thread.

    Nothing is created before the first `take` or `fill`. `close` removes the files not taken; files
    a killed process left behind are empty and live in *folder* with the downloads' other
    temporary files (the artifact storage clears its ``tmp/`` at start-up).

    :param size: how many files to keep ready (a refill starts when half are taken: fewer, larger
        refills, each one hand-over to the thread and back). 0: none; every file is created
        inline, with *mode*, and no thread is used (where a create costs less than two
        hand-overs of the GIL, as on most local disks).
    :param reactor: whose thread pool creates the files (default: the global reactor).
    :param mode: the files' permissions (less the umask). 0600 by default; a caller that
        will make the file public anyway (artifact storage: 0644) saves a ``chmod`` per file.
    """

    def __init__(self, folder: str, size: int = 32, reactor: Any = None, mode: int = 0o600) -> None:
        self.folder = folder
        self.mode = mode
        self.size = max(0, size)
        self._reactor = reactor
        self._ready: collections.deque[tuple[int, str]] = collections.deque()
        self._refilling: defer.Deferred[None] | None = None
        self._closed = False

    def take(self) -> tuple[int, str]:
        """A new empty file: ``(descriptor, path)``, now the caller's. Raises ``OSError``."""
        item = self._ready.popleft() if self._ready else create_temp_file(self.folder, self.mode)
        if (
            self.size
            and self._refilling is None
            and not self._closed
            and len(self._ready) * 2 <= self.size
        ):
            self._refill()
        return item

    def fill(self) -> None:
        """Start making files now, before the first `take` (a sync about to begin)."""
        if self._refilling is None and not self._closed and len(self._ready) < self.size:
            self._refill()

    def close(self) -> defer.Deferred[None]:
        """Remove the files nobody took; fires once a refill under way has ended and its
        files are removed too. Later `take` calls still work (created inline)."""
        self._closed = True
        while self._ready:
            _drop(self._ready.popleft())
        if self._refilling is None:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()
        self._refilling.addBoth(lambda _: done.callback(None))
        return done

    def _refill(self) -> None:
        count = self.size - len(self._ready)
        if self._reactor is None:
            d = threads.deferToThread(_create_many, self.folder, count, self.mode)
        else:
            d = threads.deferToThreadPool(
                self._reactor,
                self._reactor.getThreadPool(),
                _create_many,
                self.folder,
                count,
                self.mode,
            )
        self._refilling = d.addCallbacks(self._filled, self._failed)

    def _filled(self, made: list[tuple[int, str]]) -> None:
        self._refilling = None
        if self._closed:
            for item in made:
                _drop(item)
            return
        self._ready.extend(made)

    def _failed(self, _failure: Any) -> None:
        self._refilling = None  # `take` creates inline and reports the real error
