"""Commit validated temporary files into artifact storage in batches: one filesystem flush
per batch instead of one ``fsync`` per file, then an atomic rename per file.

The store's own, for whoever fills it: the sync's fetcher and the streamer's on-demand
downloads."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from store.catalog import mark_all_stored
from store.tempdirs import remove_quietly

__all__ = ["BatchCommitter", "flush_filesystem"]

_log = Logger()


#: What a queued file's caller hears: None (in storage, and marked stored given a catalog)
#: or why not (an exception or a Failure); called once, in the reactor thread.
Settle = Callable[[Any], object]


@attrs.define
class _Item:
    """A queued commit: the temp file (None until *write* made it), what it must be, whom to
    tell (the Deferred of `BatchCommitter.commit`, or an `add` caller's function), what to
    call once it is in storage, and how to write it."""

    path: str | None
    sha256: str
    size: int
    done: defer.Deferred[None] | Settle
    then: Callable[[], object] | None
    write: Callable[[], str] | None = None
    #: Why *write* failed, if it did.
    error: BaseException | None = None


def flush_filesystem(path: str) -> None:
    """Write every dirty page of the filesystem holding *path* to disk (Linux ``syncfs``;
    ``sync`` elsewhere). One call makes a whole batch of closed files durable."""
    libc = _libc()
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc is not None and libc.syncfs(fd) == 0:
            return
        os.sync()
    finally:
        os.close(fd)


def _flushed(path: str) -> bool:
    """`flush_filesystem`; False when it failed (each file is then fsynced instead)."""
    try:
        flush_filesystem(path)
    except OSError:
        return False
    return True


@functools.cache
def _libc() -> Any:
    """The C library with ``syncfs``, or None; loaded on the first flush, not at import
    (``ctypes`` and finding the library cost about 10 ms of every process's start)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc's
        libc.syncfs  # noqa: B018 - AttributeError where there is no syncfs
    except (OSError, AttributeError):
        return None
    return libc


class BatchCommitter:
    """Commits validated temp files into storage in batches, off the reactor thread.

    A per-file fsync costs a journal commit (a few ms; a few hundred files/s on a common
    disk). Instead, while one batch is being committed the next accumulates; each batch
    costs one ``syncfs`` (the data of every file in it reaches the disk) and then one atomic
    rename per file, so a file still enters ``artifacts/`` only whole and durable.

    ``inline_renames``: the flush still runs in a thread, but the renames (two metadata calls
    per file) run in the reactor thread once it is done, instead of handing the GIL back and
    forth with a thread around each of them. For a process that serves nobody meanwhile (a
    sync); a server keeps the default, so a slow disk never stalls its clients.

    ``catalog``: where the files of each batch are marked stored, in one call as soon as the
    batch is in storage, before their callers are told: by the committing thread itself where
    the catalog can (``mark_stored_many_here``: SQLite), else by the reactor
    (`mark_all_stored`: one trip to the catalog's thread); None: nobody is marked (the caller
    does it).

    ``busy_delay``: how long files gather instead of ``delay`` while they come in numbers (a
    batch of at least ``busy_files`` began less than two ``busy_delay`` ago). A batch costs
    more than its flush: a trip to the committing thread and back, one to the catalog's for
    the stored flags (but for SQLite, marked by the committing thread), and the GIL handed
    back and forth each time; a busy server commits fewer, larger batches, and a lone file (a
    first request on a quiet server, whose second request may come from another process and
    wait for the commit) still waits ``delay``.
    """

    def __init__(
        self,
        storage: Any,
        max_batch: int = 256,
        delay: float = 0.05,
        clock: Any = None,
        inline_renames: bool = False,
        busy_delay: float | None = None,
        busy_files: int = 4,
        catalog: Any = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.storage = storage
        self.max_batch = max_batch
        self.delay = delay
        self.busy_delay = delay if busy_delay is None else busy_delay
        self.busy_files = busy_files
        self.clock = clock
        self.inline_renames = inline_renames
        self.catalog = catalog
        self._queue: list[_Item] = []
        self._busy = False
        self._timer: Any = None
        self._hurried = False
        #: Until when a file gathers for ``busy_delay``: a while after a batch of at least
        #: ``busy_files`` began (files keep coming), not after a quiet spell.
        self._crowded_until = 0.0

    def commit(
        self,
        temp_path: str | None,
        sha256: str,
        size: int,
        then: Callable[[], object] | None = None,
        write: Callable[[], str] | None = None,
    ) -> defer.Deferred[None]:
        """Fires once the file is in storage and, given a ``catalog``, marked stored there (or
        fails with the StorageError, or the catalog's error).

        *then* is called right after the file entered storage, in the thread that committed
        it (file-system work that may wait for the journal, such as the last close of a file
        whose blocks reached the disk, must not stall the reactor); not called when the
        commit failed or was cancelled. Its exceptions are ignored.

        *write* (with *temp_path* None), for a file not written yet (a small body held in
        memory): called in the committing thread before the batch's flush, it makes the temp
        file and returns its path, so the reactor thread opens no file for it.
        """
        done: defer.Deferred[None] = defer.Deferred(self._drop)
        self._queue.append(_Item(temp_path, sha256, size, done, then, write))
        self._schedule()
        return done

    def add(
        self,
        temp_path: str | None,
        sha256: str,
        size: int,
        settle: Settle,
        then: Callable[[], object] | None = None,
        write: Callable[[], str] | None = None,
    ) -> None:
        """`commit`, telling *settle* (None, or the error) instead of firing a Deferred: a
        function call per file where a busy server commits many, and no way to take the file
        back while it waits."""
        self._queue.append(_Item(temp_path, sha256, size, settle, then, write))
        self._schedule()

    def _drop(self, done: defer.Deferred[None]) -> None:
        """Canceller: a file still waiting for its batch is removed, not committed.

        (A file whose batch is being committed enters storage anyway: it is whole.)
        """
        for index, item in enumerate(self._queue):
            if item.done is done:
                del self._queue[index]
                if item.path is not None:
                    remove_quietly(item.path)
                return

    def flush(self) -> None:
        """Commit what is queued now, without waiting for more files (the last batch)."""
        if not self._busy and self._queue:
            self._next_batch()
        else:
            self.delay = self.busy_delay = 0.0

    def hurry(self) -> None:
        """Someone waits for a queued file: commit the queue as soon as the batch under way
        (if any) is done, without gathering files for ``delay`` first. (A caller that stops
        downloading while its files wait would otherwise wait for the timer each time.)"""
        if not self._busy and self._queue:
            self._next_batch()
        else:
            self._hurried = True

    def _schedule(self) -> None:
        if self._busy or not self._queue:
            return
        if len(self._queue) >= self.max_batch or self._hurried:
            self._next_batch()
        elif self._timer is None:
            # Gather files for a moment (longer while they come in numbers): each batch costs
            # a flush, a trip to the committing thread (and maybe one to the catalog's).
            crowded = self.clock.seconds() < self._crowded_until
            delay = self.busy_delay if crowded else self.delay
            self._timer = self.clock.callLater(delay, self._next_batch)

    def _next_batch(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._hurried = False
        batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        if not batch:
            return
        if len(batch) >= self.busy_files:
            self._crowded_until = self.clock.seconds() + 2 * self.busy_delay
        self._busy = True
        work: defer.Deferred[Any]
        if self.inline_renames:
            work = threads.deferToThread(self._write_and_flush, batch)
            work.addCallback(self._commit_flushed, batch)
        else:
            work = threads.deferToThread(self._commit_batch, batch)
        work.addBoth(self._batch_done, batch)

    def _write_and_flush(self, batch: list[_Item]) -> bool:
        _write_pending(batch)
        return _flushed(self.storage.temp_dir)

    def _commit_flushed(self, flushed: bool, batch: list[_Item]) -> Any:
        if flushed:  # the data is on disk: only the renames are left, done here
            return self._commit_all(batch, durable=False), None
        fsynced = threads.deferToThread(self._commit_all, batch, True)  # an fsync per file
        return fsynced.addCallback(lambda outcomes: (outcomes, None))

    def _commit_batch(self, batch: list[_Item]) -> tuple[list[BaseException | None], Any]:
        _write_pending(batch)
        outcomes = self._commit_all(batch, durable=not _flushed(self.storage.temp_dir))
        return outcomes, self._mark_here(batch, outcomes)

    def _mark_here(self, batch: list[_Item], outcomes: list[BaseException | None]) -> Any:
        """In the committing thread: mark the batch's stored files through the catalog's
        ``mark_stored_many_here`` (`store.sqlite.SQLiteCatalog`), which needs no trip to the
        catalog's thread and back through the reactor. True once marked, the Failure if that
        failed, None if the reactor is to mark them (`mark_all_stored`)."""
        here = getattr(self.catalog, "mark_stored_many_here", None)
        stored = _stored(batch, outcomes)
        if here is None or not stored:
            return None
        try:
            return None if here(stored) is None else True
        except Exception:
            return Failure()

    def _commit_all(self, batch: list[_Item], durable: bool) -> list[BaseException | None]:
        outcomes: list[BaseException | None] = []
        for item in batch:
            if item.path is None:  # its write failed
                outcomes.append(item.error)
                continue
            try:
                self.storage.commit(item.path, item.sha256, item.size, durable=durable)
            except Exception as error:
                outcomes.append(error)
                continue
            outcomes.append(None)
            if item.then is not None:
                try:
                    item.then()
                except Exception:  # the file is committed: that is what the caller waits for
                    pass
        return outcomes

    def _batch_done(self, result: Any, batch: list[_Item]) -> None:
        """*result*: each file's outcome, and whether the committing thread marked them
        (`_mark_here`); or the Failure of the whole batch."""
        self._busy = False
        marked: Any = None
        if isinstance(result, Failure):
            for item in batch:
                if item.path is not None:
                    remove_quietly(item.path)
            outcomes: list[Any] = [result] * len(batch)
        else:
            outcomes, marked = result
        stored = _stored(batch, outcomes)
        if marked is None and self.catalog is not None and stored:
            marking = mark_all_stored(self.catalog, stored)
            marking.addBoth(_tell, batch, outcomes)
        else:
            _tell(marked, batch, outcomes)
        self._schedule()


def _stored(batch: list[_Item], outcomes: list[Any]) -> list[str]:
    """The sha256s of the files of *batch* that entered storage."""
    return [item.sha256 for item, outcome in zip(batch, outcomes, strict=True) if outcome is None]


def _tell(marked: Any, batch: list[_Item], outcomes: list[Any]) -> None:
    """Tell the callers of a batch its file's own outcome, else the catalog's failure to mark
    it (*marked*, if a Failure), else None. In one plain loop: one reactor call per batch,
    whatever its size."""
    failed = marked if isinstance(marked, Failure) else None
    for item, outcome in zip(batch, outcomes, strict=True):
        error = outcome if outcome is not None else failed
        done = item.done
        if not isinstance(done, defer.Deferred):
            try:
                done(error)
            except Exception:  # (its own fault: the other files of the batch are told still)
                _log.failure("a committed file's caller failed ({sha256})", sha256=item.sha256)
        elif done.called:  # cancelled meanwhile; the file is committed (or gone) anyway
            continue
        elif error is None:
            done.callback(None)
        else:
            done.errback(error)


def _write_pending(batch: list[_Item]) -> None:
    """Make the files of the items written in the committing thread (their *write*); a
    failure is kept as the item's outcome."""
    for item in batch:
        if item.write is not None and item.path is None:
            try:
                item.path = item.write()
            except Exception as exc:
                item.error = exc
