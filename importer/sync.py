"""Sync one remote: fetch its listing, record it in the catalog, download what `immediate` needs.

Steps:

1. The remote's importer downloads the listing (the ``PULP_MANIFEST``) into the storage's
   ``tmp/`` and checks every line; a bad line fails the sync before the catalog is touched.
2. The listing is streamed, in the catalog's worker thread, into ``catalog.replace_remote``:
   new entries are added, changed ones updated, vanished ones removed, all in one transaction.
3. ``on_demand`` / ``streamed``: done, every file is recorded lazily. ``immediate``: while the
   catalog records the listing (files stored meanwhile are marked once it is), every file
   not already stored is downloaded by at most ``download_concurrency`` workers pulling from
   one lazy iterator over the listing (so memory stays flat for 100,000 files), failing over
   to the file's next source (mirror) when one fails. Validated files enter storage in
   batches (`BatchCommitter`: one filesystem flush, then an atomic rename per file), then the
   catalog marks each stored. A worker takes its next file while its last one waits for its
   batch (at most ``max_backlog`` files wait). Helper processes (`importer.helpers`) may
   share the downloads; the catalog stays this process's.

A sync stopped half-way (cancelled, killed) leaves at most temporary files under ``tmp/``,
never a partial artifact; the next sync downloads what is missing.
"""

from __future__ import annotations

import collections
import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import groupby
from operator import attrgetter
from typing import Any, TypeVar

import attrs
from twisted.internet import defer, threads
from twisted.python.failure import Failure

from downloaders.errors import DownloadError
from importer.fetcher import FileFetcher
from importer.helpers.process import helpers_for
from importer.progress import ALREADY_PRESENT, DOWNLOADED, FAILED, NoProgress
from store.catalog import CatalogEntry, mark_all_stored
from store.tempdirs import remove_quietly

T = TypeVar("T")

#: Longest wait, in seconds, before stored files are marked in the catalog.
MARK_DELAY = 0.2


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
    items: Iterable[T],
    work: Callable[[T], defer.Deferred[Any]],
    concurrency: int,
    helpers: Sequence[tuple[Callable[[T], defer.Deferred[Any]], defer.Deferred[Any]]] = (),
    on_exhausted: Callable[[], object] | None = None,
) -> defer.Deferred[None]:
    """Call ``work(item)`` for every item, at most *concurrency* at a time.

    Items are pulled lazily from one shared iterator by *concurrency* workers, so only the
    items in flight are in memory. ``work`` should handle its own failures; one that escapes
    stops that worker and fails the result once the others are done. Cancelling the result
    cancels the work in flight.

    *helpers*: further workers, each a ``(work, ready)`` pair: it calls its own ``work`` and
    starts pulling items once *ready* fires (never, if *ready* fails or the items run out
    first). A sync's helper processes join this way as soon as they have started.
    *on_exhausted* is called once, when the last item has been taken.
    """
    shared = _Shared(iter(items), on_exhausted)
    workers = [_Worker(shared, work) for _ in range(max(1, concurrency))]
    for helper_work, ready in helpers:
        helper = _Worker(shared, helper_work)
        workers.append(helper)
        shared.waiting.append(helper)
        ready.addCallbacks(lambda _, h=helper: shared.begin(h), lambda _, h=helper: shared.drop(h))
    for worker in workers[: max(1, concurrency)]:
        worker.start()
    done = defer.gatherResults([worker.done for worker in workers], consumeErrors=True)
    return done.addCallbacks(lambda _: None, _first_error)


class _Shared:
    """The iterator `run_bounded`'s workers share, and the helpers not started yet."""

    def __init__(
        self, iterator: Iterator[Any], on_exhausted: Callable[[], object] | None = None
    ) -> None:
        self.iterator = iterator
        self.on_exhausted = on_exhausted
        self.exhausted = False
        self.waiting: list[_Worker] = []

    def next(self) -> Any:
        item = next(self.iterator, _END)
        if item is _END and not self.exhausted:
            self.exhausted = True
            for helper in list(self.waiting):  # nothing left for them
                self.drop(helper)
            if self.on_exhausted is not None:
                self.on_exhausted()
        return item

    def begin(self, helper: _Worker) -> None:
        if helper in self.waiting:
            self.waiting.remove(helper)
            helper.start()

    def drop(self, helper: _Worker) -> None:
        if helper in self.waiting:
            self.waiting.remove(helper)
            if not helper.done.called:
                helper.done.callback(None)


class _Worker:
    """One of `run_bounded`'s workers: takes the next item when its last one is done.

    Plain callbacks rather than a coroutine (this runs once per file). Work that finishes at
    once (a file already stored) loops instead of recursing, so the stack stays flat.
    """

    def __init__(self, shared: _Shared, work: Callable[[T], defer.Deferred[Any]]) -> None:
        self.shared = shared
        self.work = work
        self.current: defer.Deferred[Any] | None = None
        self.done: defer.Deferred[None] = defer.Deferred(self._cancel)
        self._looping = False
        self._fired = False

    def start(self) -> None:
        self._loop()

    def _loop(self) -> None:
        self._looping = True
        try:
            while not self.done.called:
                try:
                    item = self.shared.next()
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
    if isinstance(failure.value, defer.FirstError):
        return failure.value.subFailure
    return failure


def group_sources(entries: Iterable[CatalogEntry]) -> Iterator[list[CatalogEntry]]:
    """Group consecutive entries of one served path: the sources of one file, in order."""
    for _path, sources in groupby(entries, key=attrgetter("path")):
        yield sorted(sources, key=attrgetter("position"))


class _Sync:
    """The state of one remote's sync (see the module docstring)."""

    def __init__(
        self,
        remote: Any,
        catalog: Any,
        storage: Any,
        progress: Any,
        helpers: Any = None,
        catalog_ready: defer.Deferred[Any] | None = None,
    ) -> None:
        self.remote = remote
        self.catalog = catalog
        self._catalog_opening = catalog_ready
        self.storage = storage
        self.progress = progress
        self.helpers = helpers
        self.importer = remote.get_importer()
        self.report = SyncReport(remote=remote.name, policy=remote.policy)
        self._in_flight: dict[str, list[defer.Deferred[None]]] = {}
        #: Catalog updates and re-runs of a lost helper's files under way.
        self._pending: set[defer.Deferred[Any]] = set()
        self._fetcher = FileFetcher(remote, storage, self._stored, self._failed)
        #: Stored files whose catalog entries are marked at the end of this reactor turn.
        self._to_mark: list[tuple[str, str]] = []
        #: Whether the catalog holds the listing (stored files can be marked).
        self._catalog_ready = False
        self._waiting_mark: defer.Deferred[None] | None = None
        self._mark_call: Any = None
        self._mark_delay = MARK_DELAY
        #: This sync's helpers, configured as it began (None: not yet).
        self._helper_links: list[Any] | None = None
        #: Files fetched here for a helper (given back, or left by a dead one), waiting for
        #: room within download_concurrency; how many of them, and of this process's own
        #: files, are downloading; whether every file has been handed out.
        self._for_helpers: collections.deque[tuple[list[CatalogEntry], defer.Deferred[None]]]
        self._for_helpers = collections.deque()
        self._for_helpers_running = 0
        self._own_running = 0
        self._own_share = remote.download_concurrency
        self._handed_out = False
        self._links_in_use: list[Any] = []
        from twisted.internet import reactor

        self._clock = reactor

    @defer.inlineCallbacks
    def run(self) -> Any:
        started = time.monotonic()
        if self.helpers is not None and self.remote.policy == "immediate":
            # Helpers started beforehand set themselves up for this remote (its client, the
            # storage) while the listing is fetched and checked, not after.
            self._helper_links = self._links()
        try:
            listing = yield self._fetch_listing()
        except BaseException:
            yield self._catalog_opened()  # a catalog that cannot open is the error to report
            raise
        own_helpers = None
        try:
            try:
                total = yield threads.deferToThread(self.importer.validate_listing, listing)
            except ValueError as error:
                raise SyncError(self.remote.name, f"bad listing, catalog unchanged: {error}")
            finally:
                yield self._catalog_opened()
            self.report.total = total
            if self.helpers is None and self.remote.policy == "immediate":
                # Started now, they get ready while the catalog is being updated.
                self.helpers = own_helpers = helpers_for(self.remote, total)
            entries = self.importer.catalog_entries(listing, self._stored_check())
            recording = self.catalog.replace_remote(self.remote.name, entries)
            if self.remote.policy == "immediate":
                yield self._record_and_download(recording, listing, total)
            else:
                self.report.removed = (yield recording).removed
                self.report.recorded_lazily = total
        finally:
            remove_quietly(listing)
            if own_helpers is not None:
                yield own_helpers.close()
            self.report.duration = time.monotonic() - started
        return self.report

    def _catalog_opened(self) -> defer.Deferred[Any]:
        """Fires once the catalog the caller is still opening is open (at once if it was
        open already); fails as the opening failed."""
        ready, self._catalog_opening = self._catalog_opening, None
        return ready if ready is not None else defer.succeed(None)

    @defer.inlineCallbacks
    def _record_and_download(self, recording: defer.Deferred[Any], listing: str, total: int) -> Any:
        """Download while the catalog records the listing (the helper processes, and any
        core the catalog's thread leaves, have work meanwhile); files stored before it is
        done are marked once it is. If recording fails, the downloads are stopped."""
        downloading = self._download_all(listing, total)
        try:
            replaced = yield recording
        except BaseException:
            downloading.cancel()
            yield downloading.addErrback(lambda failure: failure.trap(defer.CancelledError))
            raise
        self.report.removed = replaced.removed
        self._catalog_ready = True
        if self._to_mark and self._waiting_mark is not None:  # marks that waited for the catalog
            self._mark_stored(self._waiting_mark)
        yield downloading

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
        fetcher = self._fetcher
        fetcher.start()
        links = self._helper_links if self._helper_links is not None else self._links()
        local = self.remote.download_concurrency - sum(link.slots for link in links)
        self._own_share, self._links_in_use = local, links
        helpers = [
            (functools.partial(self._one_file, fetch=link.fetch), link.ready)
            for link in links
            for _slot in range(link.window)
        ]
        try:
            # Once every file is handed out, the helpers give back what has not started
            # (it would wait behind their downloads while this process's slots idle).
            yield run_bounded(files, self._one_file, local, helpers, self._all_handed_out)
            finishing = [fetcher.finish()] + [link.finish() for link in links]
            yield defer.gatherResults(finishing, consumeErrors=True)
            self._mark_now()
            while self._pending:  # catalog updates still under way
                yield defer.gatherResults(list(self._pending), consumeErrors=True)
        except BaseException:
            for link in links:  # its files waiting for a batch are dropped, never stored
                link.abort()
            if self._mark_call is not None and self._mark_call.active():
                self._mark_call.cancel()
            for pending in list(self._pending):
                pending.cancel()
            raise
        finally:
            yield fetcher.stop()
            clean_stale = getattr(self.storage, "clean_stale_temp", None)
            if clean_stale is not None and any(not link.alive for link in links):
                # A helper killed mid-sync left its temp folder (its partial downloads):
                # nobody else would remove it before the next sync or service start.
                clean_stale()
            self.progress.finish()

    def _links(self) -> list[Any]:
        """This sync's share of the helper processes (none without helpers)."""
        if self.helpers is None:
            return []
        return self.helpers.serve(
            self.remote,
            self.storage,
            on_stored=self._stored,
            on_failed=self._failed,
            fallback=self._fetch_here,
        )

    def _all_handed_out(self) -> None:
        self._handed_out = True
        for link in self._links_in_use:
            link.reclaim()

    def _fetch_here(self, sources: list[CatalogEntry]) -> defer.Deferred[None]:
        """A file a helper gave back or left behind (it died), fetched by this process
        instead as soon as there is room (tracked until its slot is free: the sync does not
        end before it)."""
        waiting: defer.Deferred[None] = defer.Deferred()
        self._track(waiting)
        self._for_helpers.append((sources, waiting))
        self._start_for_helpers()
        return waiting

    def _room(self) -> int:
        """Downloads this process may start for helpers now: download_concurrency, less the
        helpers' downloads, those already started for them, and this process's own share
        (its own downloads in flight, once every file is handed out)."""
        helpers = sum(min(link.in_flight, link.slots) for link in self._links_in_use if link.alive)
        own = self._own_running if self._handed_out else self._own_share
        return self.remote.download_concurrency - helpers - own - self._for_helpers_running

    def _start_for_helpers(self, result: Any = None) -> Any:
        """Start waiting files while there is room; passes *result* through (a callback of
        every download slot that frees up)."""
        while self._for_helpers and self._room() > 0:
            sources, waiting = self._for_helpers.popleft()
            if waiting.called:  # cancelled: the sync is being stopped
                continue
            self._for_helpers_running += 1
            fetching = self._fetcher.fetch(sources)
            self._track(fetching)
            fetching.addBoth(self._fetched_for_helper)
            fetching.chainDeferred(waiting)
        return result

    def _fetched_for_helper(self, result: Any) -> Any:
        self._for_helpers_running -= 1
        return self._start_for_helpers(result)

    def _own_done(self, result: Any) -> Any:
        self._own_running -= 1
        return self._start_for_helpers(result)

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

    def _one_file(
        self, sources: list[CatalogEntry], fetch: Callable[..., defer.Deferred[None]] | None = None
    ) -> defer.Deferred[None]:
        """Fires when the download slot is free again (the commit may still be under way)."""
        first = sources[0]
        sha256 = first.sha256
        # Checked in storage as the listing was read, a moment ago, by sha256 alone: a file
        # of another size than this entry's (a listing giving one sha256 two sizes) is not
        # this file, as the streamer treats it, so it is downloaded (and fails validation).
        if first.stored and self.storage.has(sha256, first.size):
            self._count(ALREADY_PRESENT)
            return defer.succeed(None)
        waiters = self._in_flight.get(sha256)
        if waiters is not None:  # the same content under another path is on its way in
            waiter: defer.Deferred[None] = defer.Deferred()
            waiters.append(waiter)
            return waiter.addCallback(lambda _: self._after_twin(sources, fetch))
        self._in_flight[sha256] = []
        if fetch is None:  # this process's own
            self._own_running += 1
            fetching = self._fetcher.fetch(sources).addBoth(self._own_done)
        else:  # a helper's: its slot frees up
            fetching = fetch(sources).addBoth(self._start_for_helpers)
        return fetching.addErrback(self._release, sha256)

    def _after_twin(
        self, sources: list[CatalogEntry], fetch: Callable[..., defer.Deferred[None]] | None
    ) -> defer.Deferred[None]:
        if self.storage.has(sources[0].sha256, sources[0].size):
            self._count(ALREADY_PRESENT)
            return defer.succeed(None)
        # The twin failed (or stored another size: see `_one_file`): this path's own sources.
        return self._one_file(sources, fetch)

    def _release(self, result: Any, sha256: str) -> Any:
        """The content *sha256* is in storage, or failed: let its twins go on."""
        for waiter in self._in_flight.pop(sha256, []):
            if not waiter.called:  # a cancelled sync has cancelled it already
                waiter.callback(None)
        return result

    def _track(self, d: defer.Deferred[Any]) -> None:
        self._pending.add(d)
        d.addBoth(lambda _: self._pending.discard(d))

    def _stored(self, sha256: str, url: str) -> None:
        self._count(DOWNLOADED)
        self._release(None, sha256)
        # Stored files are marked in the catalog together, in one transaction, at most every
        # MARK_DELAY seconds (the batches of every process, and one hand-over to the
        # catalog's thread instead of one per batch), and at once when the downloads end.
        if not self._to_mark:
            marking: defer.Deferred[None] = defer.Deferred()
            self._track(marking)
            if self._catalog_ready:
                self._mark_call = self._clock.callLater(
                    self._mark_delay, self._mark_stored, marking
                )
            else:  # the listing is still being recorded: see `_record_and_download`
                self._waiting_mark = marking
        self._to_mark.append((sha256, url))

    def _mark_now(self) -> None:
        """The downloads have ended: mark what waits for `MARK_DELAY` now, and any file
        stored from now on (a lost helper's, fetched here) at once."""
        self._mark_delay = 0.0
        call, self._mark_call = self._mark_call, None
        if call is not None and call.active():
            call.reset(0)

    def _mark_stored(self, done: defer.Deferred[None]) -> None:
        self._mark_call = None
        stored, self._to_mark = self._to_mark, []
        if done.called:  # cancelled: the sync is being stopped
            return
        marking = mark_all_stored(self.catalog, [sha256 for sha256, _url in stored])

        def failed(failure: Failure) -> None:
            reason = _first_error(failure).getErrorMessage()
            for _sha256, url in stored:
                self.report.failed.append(
                    (url, f"stored, but the catalog was not updated: {reason}")
                )

        marking.addCallbacks(lambda _: None, failed).chainDeferred(done)

    def _failed(self, sha256: str, url: str, reason: str) -> None:
        self._release(None, sha256)
        self._fail(url, reason)

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
    remote: Any,
    catalog: Any,
    storage: Any,
    progress: Any = None,
    helpers: Any = None,
    catalog_ready: defer.Deferred[Any] | None = None,
) -> defer.Deferred[SyncReport]:
    """Sync *remote* into *catalog* (an open ICatalog) and *storage* (IArtifactStorage).

    Fires with a `SyncReport` (per-file failures are in it), or fails with `SyncError` when
    the listing cannot be fetched or is malformed. Cancelling stops the sync: downloads in
    flight are aborted and their temporary files removed.

    *helpers*: `SyncHelpers` to share the downloads with (started early by the caller, so
    their start-up overlaps other work; the caller closes them). By default an ``immediate``
    sync starts its own when the remote's ``sync_processes`` asks for them (see
    `helpers_for`) and closes them at the end.

    *catalog_ready*: a Deferred that fires once *catalog* is open, when the caller is still
    opening it: the listing is fetched and checked meanwhile, and the sync waits for it
    before its first use of the catalog (its failure is the sync's, even after the listing
    failed). It is consumed: pass it to one sync only.
    """
    sync = _Sync(remote, catalog, storage, progress or NoProgress(), helpers, catalog_ready)
    return sync.run()


#: ``reported(remote, outcome)``: one remote's sync ended, with its report or its SyncError.
Reported = Callable[[Any, "SyncReport | SyncError"], None]


@defer.inlineCallbacks
def sync_remotes(
    remotes: Sequence[Any],
    catalog: Any,
    storage: Any,
    progress: Any = None,
    helpers: Any = None,
    reported: Reported | None = None,
    catalog_ready: defer.Deferred[Any] | None = None,
    *,
    close_helpers: bool = True,
) -> Any:
    """Sync *remotes* one after the other (`sync_remote`), closing each remote's connections
    when its sync ended and *helpers* (`SyncHelpers`, optional) at the end (unless
    *close_helpers* is false: the caller closes them, say while it closes its catalog).

    A remote whose listing fails (`SyncError`) does not stop the others. *reported* hears of
    each remote as it ends; fires with the outcomes in order (a `SyncReport` or a
    `SyncError` each). Cancelling stops the sync under way and ends the rest unsynced.
    *catalog_ready*: see `sync_remote` (the first remote's sync waits for it).
    """
    outcomes: list[SyncReport | SyncError] = []
    try:
        for remote in remotes:
            outcome: SyncReport | SyncError
            ready, catalog_ready = catalog_ready, None
            try:
                outcome = yield sync_remote(remote, catalog, storage, progress, helpers, ready)
            except SyncError as error:
                outcome = error
            finally:
                yield remote.close()
            outcomes.append(outcome)
            if reported is not None:
                reported(remote, outcome)
    finally:
        if helpers is not None and close_helpers:
            yield helpers.close()
    return outcomes
