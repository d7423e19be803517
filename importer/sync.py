"""Sync one remote: fetch its listing, record it in the catalog, download what `immediate` needs.

Steps, each finished before the next begins:

1. The remote's importer downloads the listing (the ``PULP_MANIFEST``) into the storage's
   ``tmp/`` and checks every line; a bad line fails the sync before the catalog is touched.
2. The listing is streamed, in the catalog's worker thread, into ``catalog.replace_remote``:
   new entries are added, changed ones updated, vanished ones removed, all in one transaction.
3. ``on_demand`` / ``streamed``: done, every file is recorded lazily. ``immediate``: every file
   not already stored is downloaded by at most ``download_concurrency`` workers pulling from
   one lazy iterator over the listing (so memory stays flat for 100,000 files), failing over
   to the file's next source (mirror) when one fails. Validated files enter storage in
   batches (`GroupCommitter`: one filesystem flush, then an atomic rename per file), then the
   catalog marks each stored. A worker takes its next file while its last one waits for its
   batch (at most ``max_backlog`` files wait).

A sync stopped half-way (cancelled, killed) leaves at most temporary files under ``tmp/``,
never a partial artifact; the next sync downloads what is missing.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import groupby
from operator import attrgetter
from typing import Any, TypeVar

import attrs
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from downloaders.errors import DownloadError
from downloaders.result import keep_upstream_date
from importer.importers import remove_quietly
from importer.progress import ALREADY_PRESENT, DOWNLOADED, FAILED, NoProgress
from store.catalog import CatalogEntry
from store.storage import ARTIFACT_MODE

T = TypeVar("T")
log = Logger()


class SyncError(Exception):
    """A remote could not be synced at all (listing unreachable or malformed); the catalog
    is unchanged."""

    def __init__(self, remote: str, reason: str) -> None:
        self.remote = remote
        self.reason = reason
        super().__init__(f"sync {remote}: {reason}")


@attrs.define
class SyncReport:
    """What one sync of one remote did.

    ``failed`` holds ``(url, reason)`` per file that no source could provide (the url is the
    file's first source; the reason names every source tried). ``removed`` counts catalog
    entries (one per file and source) that vanished upstream.
    """

    remote: str
    policy: str
    total: int = 0
    downloaded: int = 0
    already_present: int = 0
    recorded_lazily: int = 0
    failed: list[tuple[str, str]] = attrs.Factory(list)
    removed: int = 0
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no file failed."""
        return not self.failed


def run_bounded(
    items: Iterable[T], work: Callable[[T], defer.Deferred[Any]], concurrency: int
) -> defer.Deferred[None]:
    """Call ``work(item)`` for every item, at most *concurrency* at a time.

    Items are pulled lazily from one shared iterator by *concurrency* workers, so only the
    items in flight are in memory. ``work`` should handle its own failures; one that escapes
    stops that worker and fails the result once the others are done. Cancelling the result
    cancels the work in flight.
    """
    iterator = iter(items)
    workers = [_Worker(iterator, work).start() for _ in range(max(1, concurrency))]
    done = defer.gatherResults(workers, consumeErrors=True)
    return done.addCallbacks(lambda _: None, _first_error)


class _Worker:
    """One of `run_bounded`'s workers: takes the next item when its last one is done.

    Plain callbacks rather than a coroutine (this runs once per file). Work that finishes at
    once (a file already stored) loops instead of recursing, so the stack stays flat.
    """

    def __init__(self, iterator: Iterator[T], work: Callable[[T], defer.Deferred[Any]]) -> None:
        self.iterator = iterator
        self.work = work
        self.current: defer.Deferred[Any] | None = None
        self.done: defer.Deferred[None] = defer.Deferred(self._cancel)
        self._looping = False
        self._fired = False

    def start(self) -> defer.Deferred[None]:
        self._loop()
        return self.done

    def _loop(self) -> None:
        self._looping = True
        try:
            while not self.done.called:
                try:
                    item = next(self.iterator, _END)
                    if item is _END:
                        self.done.callback(None)
                        return
                    current = self.work(item)
                except BaseException:
                    self.done.errback(Failure())
                    return
                self._fired = False
                self.current = current
                current.addCallbacks(self._item_done, self._item_failed)
                if not self._fired:
                    return  # `_item_done` takes the next item when this one is done
        finally:
            self._looping = False

    def _item_done(self, _: Any) -> None:
        self.current = None
        if self._looping:
            self._fired = True
        else:
            self._loop()

    def _item_failed(self, failure: Failure) -> None:
        self.current = None
        self._fired = True
        if not self.done.called:
            self.done.errback(failure)

    def _cancel(self, _: defer.Deferred[None]) -> None:
        current, self.current = self.current, None
        if current is not None:
            current.cancel()


_END = object()


def _first_error(failure: Failure) -> Failure:
    """The failure inside a gatherResults' FirstError (a CancelledError stays one)."""
    if failure.check(defer.FirstError):
        return failure.value.subFailure
    return failure


def failure_reason(error: BaseException) -> str:
    """A one-line reason for a failed download (no traceback, no credentials)."""
    if isinstance(error, DownloadError):
        return error.message
    return f"{error.__class__.__name__}: {error}" if str(error) else error.__class__.__name__


def group_sources(entries: Iterable[CatalogEntry]) -> Iterator[list[CatalogEntry]]:
    """Group consecutive entries of one served path: the sources of one file, in order."""
    for _path, sources in groupby(entries, key=attrgetter("path")):
        yield sorted(sources, key=attrgetter("position"))


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


class GroupCommitter:
    """Commits validated temp files into storage in batches, off the reactor thread.

    A per-file fsync costs a journal commit (a few ms; a few hundred files/s on a common
    disk). Instead, while one batch is being committed the next accumulates; each batch
    costs one ``syncfs`` (the data of every file in it reaches the disk) and then one atomic
    rename per file, so a file still enters ``artifacts/`` only whole and durable.

    ``inline_renames``: the flush still runs in a thread, but the renames (two metadata calls
    per file) run in the reactor thread once it is done, instead of handing the GIL back and
    forth with a thread around each of them. For a process that serves nobody meanwhile (a
    sync); a server keeps the default, so a slow disk never stalls its clients.
    """

    def __init__(
        self,
        storage: Any,
        max_batch: int = 256,
        delay: float = 0.05,
        clock: Any = None,
        inline_renames: bool = False,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.storage = storage
        self.max_batch = max_batch
        self.delay = delay
        self.clock = clock
        self.inline_renames = inline_renames
        self._queue: list[tuple[str, str, int, defer.Deferred[None]]] = []
        self._busy = False
        self._timer: Any = None

    def commit(self, temp_path: str, sha256: str, size: int) -> defer.Deferred[None]:
        """Fires once the file is in storage (or fails with the StorageError)."""
        done: defer.Deferred[None] = defer.Deferred(self._drop)
        self._queue.append((temp_path, sha256, size, done))
        self._schedule()
        return done

    def _drop(self, done: defer.Deferred[None]) -> None:
        """Canceller: a file still waiting for its batch is removed, not committed.

        (A file whose batch is being committed enters storage anyway: it is whole.)
        """
        for index, item in enumerate(self._queue):
            if item[3] is done:
                del self._queue[index]
                remove_quietly(item[0])
                return

    def flush(self) -> None:
        """Commit what is queued now, without waiting for more files (the last batch)."""
        if not self._busy and self._queue:
            self._next_batch()
        else:
            self.delay = 0.0

    def _schedule(self) -> None:
        if self._busy or not self._queue:
            return
        if len(self._queue) >= self.max_batch:
            self._next_batch()
        elif self._timer is None:
            # Gather files for a moment: each batch costs one journal commit, and a journal
            # commit stalls every file creation on the disk meanwhile (the downloads' too).
            self._timer = self.clock.callLater(self.delay, self._next_batch)

    def _next_batch(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        if not batch:
            return
        self._busy = True
        items = [item[:3] for item in batch]
        if self.inline_renames:
            work = threads.deferToThread(_flushed, self.storage.temp_dir)
            work.addCallback(self._commit_flushed, items)
        else:
            work = threads.deferToThread(self._commit_batch, items)
        work.addBoth(self._batch_done, batch)

    def _commit_flushed(self, flushed: bool, items: list[tuple[str, str, int]]) -> Any:
        if flushed:  # the data is on disk: only the renames are left, done here
            return self._commit_all(items, durable=False)
        return threads.deferToThread(self._commit_all, items, True)  # an fsync per file

    def _commit_batch(self, items: list[tuple[str, str, int]]) -> list[BaseException | None]:
        return self._commit_all(items, durable=not _flushed(self.storage.temp_dir))

    def _commit_all(
        self, items: list[tuple[str, str, int]], durable: bool
    ) -> list[BaseException | None]:
        outcomes: list[BaseException | None] = []
        for path, sha256, size in items:
            try:
                self.storage.commit(path, sha256, size, durable=durable)
                outcomes.append(None)
            except Exception as error:
                outcomes.append(error)
        return outcomes

    def _batch_done(self, outcomes: Any, batch: list[Any]) -> None:
        for index, (path, _sha256, _size, done) in enumerate(batch):
            if isinstance(outcomes, Failure):
                remove_quietly(path)
                outcome: Any = outcomes
            else:
                outcome = outcomes[index]
            if done.called:  # cancelled meanwhile; the file is committed (or gone) anyway
                continue
            if outcome is None:
                done.callback(None)
            else:
                done.errback(outcome)
        self._busy = False
        self._schedule()


class _Sync:
    """The state of one remote's sync (see the module docstring)."""

    #: Downloads finished but not yet committed before workers wait for the committer.
    max_backlog = 256

    def __init__(self, remote: Any, catalog: Any, storage: Any, progress: Any) -> None:
        self.remote = remote
        self.catalog = catalog
        self.storage = storage
        self.progress = progress
        self.importer = remote.get_importer()
        self.report = SyncReport(remote=remote.name, policy=remote.policy)
        self._in_flight: dict[str, list[defer.Deferred[None]]] = {}
        #: Commits and catalog updates under way (the download slots are free meanwhile).
        self._pending: set[defer.Deferred[Any]] = set()
        # This process serves nobody while it syncs: renames run in the reactor thread.
        self._committer = GroupCommitter(storage, inline_renames=True)
        #: Stored files whose catalog entries are marked at the end of this reactor turn.
        self._to_mark: list[CatalogEntry] = []
        from twisted.internet import reactor

        self._clock = reactor

    @defer.inlineCallbacks
    def run(self) -> Any:
        started = time.monotonic()
        listing = yield self._fetch_listing()
        try:
            try:
                total = yield threads.deferToThread(self.importer.validate_listing, listing)
            except ValueError as error:
                raise SyncError(self.remote.name, f"bad listing, catalog unchanged: {error}")
            self.report.total = total
            entries = self.importer.catalog_entries(listing, self._stored_check())
            replaced = yield self.catalog.replace_remote(self.remote.name, entries)
            self.report.removed = replaced.removed
            if self.remote.policy == "immediate":
                yield self._download_all(listing, total)
            else:
                self.report.recorded_lazily = total
        finally:
            remove_quietly(listing)
            self.report.duration = time.monotonic() - started
        return self.report

    @defer.inlineCallbacks
    def _fetch_listing(self) -> Any:
        try:
            path = yield self.importer.fetch_listing(self.storage.temp_dir)
        except DownloadError as error:
            raise SyncError(self.remote.name, f"cannot fetch the listing: {error}")
        return path

    @defer.inlineCallbacks
    def _download_all(self, listing: str, total: int) -> Any:
        files = group_sources(self.importer.catalog_entries(listing, self._stored_check()))
        self.progress.start(self.remote.name, total)
        factory = self._factory()
        if factory is not None:  # temp files are created with the artifacts' mode (the
            # commit then needs no chmod), inline: a create costs less than handing the GIL
            # to a thread and back (measured in bench/RESULTS.md)
            factory.temp_files(self.storage.temp_dir, mode=ARTIFACT_MODE, ahead=0)
        try:
            yield run_bounded(files, self._one_file, self.remote.download_concurrency)
            self._committer.flush()  # no more files are coming
            while self._pending:  # commits and catalog updates still under way
                yield defer.gatherResults(list(self._pending), consumeErrors=True)
        except BaseException:
            for pending in list(self._pending):  # files waiting for a batch are dropped
                pending.cancel()
            raise
        finally:
            if factory is not None:
                yield factory.release_temp_files(self.storage.temp_dir)
            self.progress.finish()

    def _stored_check(self) -> Callable[[str], bool]:
        """``storage.has`` for one pass over the listing, minus the ``stat`` for content whose
        ``artifacts/xx`` folder did not exist as the pass began (in a first sync: all of it).

        Content stored meanwhile by someone else (the streamer) may be missed: it is then
        downloaded again and the commit keeps the artifact already there."""
        has = self.storage.has
        try:
            folders = frozenset(os.listdir(self.storage.artifacts_dir))
        except (AttributeError, OSError):  # another IArtifactStorage: ask it every time
            return has
        return lambda sha256: sha256[:2] in folders and has(sha256)

    def _factory(self) -> Any:
        """The remote's `DownloaderFactory`, if it has one (a duck-typed remote may not)."""
        make = getattr(self.remote, "downloader_factory", None)
        return make() if make is not None else None

    def _one_file(self, sources: list[CatalogEntry]) -> defer.Deferred[None]:
        """Fires when the download slot is free again (the commit may still be under way)."""
        sha256 = sources[0].sha256
        if sources[0].stored:  # checked in storage as the listing was read, a moment ago
            self._count(ALREADY_PRESENT)
            return defer.succeed(None)
        waiters = self._in_flight.get(sha256)
        if waiters is not None:  # the same content under another path is on its way in
            waiter: defer.Deferred[None] = defer.Deferred()
            waiters.append(waiter)
            return waiter.addCallback(lambda _: self._after_twin(sources))
        self._in_flight[sha256] = []
        return self._download(sources).addErrback(self._release, sha256)

    def _after_twin(self, sources: list[CatalogEntry]) -> defer.Deferred[None]:
        if self.storage.has(sources[0].sha256):
            self._count(ALREADY_PRESENT)
            return defer.succeed(None)
        return self._one_file(sources)  # the twin failed: try this path's own sources

    def _release(self, result: Any, sha256: str) -> Any:
        """The content *sha256* is in storage, or failed: let its twins go on."""
        for waiter in self._in_flight.pop(sha256, []):
            if not waiter.called:  # a cancelled sync has cancelled it already
                waiter.callback(None)
        return result

    def _track(self, d: defer.Deferred[Any]) -> None:
        self._pending.add(d)
        d.addBoth(lambda _: self._pending.discard(d))

    def _download(self, sources: list[CatalogEntry]) -> defer.Deferred[None]:
        """Try each source in order; hand the first valid file to the group committer.

        Fires when the download slot is free again. Plain callbacks, not a coroutine: this
        runs once per file, and a generator with its Deferreds cost more than the rest.
        """
        return self._try_source(sources, 0, [])

    def _try_source(
        self, sources: list[CatalogEntry], index: int, problems: list[tuple[str, str]]
    ) -> defer.Deferred[None]:
        if index == len(sources):  # every source failed
            if len(problems) == 1:
                self._fail(*problems[0])
            else:
                self._fail(sources[0].url, "; ".join(f"{url}: {why}" for url, why in problems))
            self._release(None, sources[0].sha256)
            return defer.succeed(None)
        entry = sources[index]
        try:
            downloader = self.remote.get_downloader(entry=entry, temp_dir=self.storage.temp_dir)
            running = downloader.run()
        except Exception:
            return self._source_failed(Failure(), sources, index, problems)
        args = (sources, index, problems)
        return running.addCallbacks(
            self._downloaded, self._source_failed, callbackArgs=args, errbackArgs=args
        )

    def _source_failed(
        self,
        failure: Failure,
        sources: list[CatalogEntry],
        index: int,
        problems: list[tuple[str, str]],
    ) -> Any:
        if failure.check(defer.CancelledError) or not failure.check(Exception):
            return failure
        url = sources[index].url
        problems.append((url, failure_reason(failure.value)))
        if len(sources) > 1:
            log.info("{url}: {reason}; trying the next source", url=url, reason=problems[-1][1])
        return self._try_source(sources, index + 1, problems)

    def _downloaded(
        self,
        result: Any,
        sources: list[CatalogEntry],
        index: int,
        problems: list[tuple[str, str]],
    ) -> Any:
        entry = sources[index]
        try:
            self._check(result, entry)
        except Exception:
            return self._source_failed(Failure(), sources, index, problems)
        keep_upstream_date(result.path, result)
        # Flush + atomic rename, in batches, off the reactor thread: even a cancelled or
        # killed sync never leaves a partial artifact. The slot is free meanwhile, unless
        # too many files wait for their commit.
        stored = self._committer.commit(result.path, entry.sha256, entry.size)
        stored.addCallbacks(
            self._stored, self._not_stored, callbackArgs=(entry,), errbackArgs=(entry,)
        )
        self._track(stored)
        if len(self._pending) > self.max_backlog:
            return stored
        return None

    @staticmethod
    def _check(result: Any, entry: CatalogEntry) -> None:
        """Refuse a result whose bytes are not the entry's (a custom downloader that skipped
        validation): it must never be committed under the entry's sha256."""
        attributes = result.artifact_attributes
        if attributes.get("sha256") != entry.sha256 or attributes.get("size") != entry.size:
            remove_quietly(result.path)
            raise DownloadError(entry.url, "the downloader did not validate size and sha256")

    def _stored(self, _: None, entry: CatalogEntry) -> None:
        self._count(DOWNLOADED)
        self._release(None, entry.sha256)
        # The files of one commit batch arrive here one after another, in one reactor turn:
        # they are marked in the catalog together, in one transaction.
        if not self._to_mark:
            marking: defer.Deferred[None] = defer.Deferred()
            self._track(marking)
            self._clock.callLater(0, self._mark_stored, marking)
        self._to_mark.append(entry)

    def _mark_stored(self, done: defer.Deferred[None]) -> None:
        entries, self._to_mark = self._to_mark, []
        if done.called:  # cancelled: the sync is being stopped
            return
        many = getattr(self.catalog, "mark_stored_many", None)
        if many is not None:
            marking = many([entry.sha256 for entry in entries])
        else:  # an ICatalog without the batched call
            marking = defer.gatherResults(
                [self.catalog.mark_stored(entry.sha256) for entry in entries], consumeErrors=True
            )

        def failed(failure: Failure) -> None:
            reason = _first_error(failure).getErrorMessage()
            for entry in entries:
                self.report.failed.append(
                    (entry.url, f"stored, but the catalog was not updated: {reason}")
                )

        marking.addCallbacks(lambda _: None, failed).chainDeferred(done)

    def _not_stored(self, failure: Failure, entry: CatalogEntry) -> None:
        self._release(None, entry.sha256)
        if failure.check(defer.CancelledError):
            return
        self._fail(entry.url, f"cannot store: {failure.getErrorMessage()}")

    def _fail(self, url: str, reason: str) -> None:
        self.report.failed.append((url, reason))
        self._count(FAILED)

    def _count(self, outcome: str) -> None:
        if outcome == DOWNLOADED:
            self.report.downloaded += 1
        elif outcome == ALREADY_PRESENT:
            self.report.already_present += 1
        self.progress.advance(outcome)


def sync_remote(
    remote: Any, catalog: Any, storage: Any, progress: Any = None
) -> defer.Deferred[SyncReport]:
    """Sync *remote* into *catalog* (an open ICatalog) and *storage* (IArtifactStorage).

    Fires with a `SyncReport` (per-file failures are in it), or fails with `SyncError` when
    the listing cannot be fetched or is malformed. Cancelling stops the sync: downloads in
    flight are aborted and their temporary files removed.
    """
    return _Sync(remote, catalog, storage, progress or NoProgress()).run()
