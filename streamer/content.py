"""The content resource: ``GET``/``HEAD /<base_path>/<relative_path>``.

Dispatch: refuse bad paths (`streamer.paths`), look the path up in the catalog, then serve
a stored artifact from disk (`streamer.static`), a folder's ``index.html`` or listing
(`streamer.listing`), or hand lazy entries to `streamer.lazy.LazyStreamer`. Any failure is
logged and answered with a short plain-text status, never a traceback.

While the catalog's database cannot be reached (`store.CatalogUnavailable`), a path whose
entries were looked up before (the lookup cache keeps the last answer of up to
`LOOKUP_CACHE_SIZE` paths) is still served if its artifact is on disk; everything else gets
``503`` with ``Retry-After`` until the catalog answers again, without a restart.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from store import ArtifactNotFound, CatalogEntry, CatalogUnavailable, ListingItem
from store.errors import local_fault
from streamer.lazy import LazyOptions, LazyStreamer
from streamer.listing import FolderPage, ListingCache, render_listing, respond_page
from streamer.paths import RefusedPath, RequestPath, request_path
from streamer.signing import client_query
from streamer.static import client_gone, respond_text, serve_file

if TYPE_CHECKING:
    from streamer.service import StreamerRequest

__all__ = ["ALLOWED_METHODS", "ContentResource"]

ALLOWED_METHODS = (b"GET", b"HEAD")
INDEX_FILE = "index.html"
#: With ``[server] x_accel_redirect`` set, a stored file is handed to the front only when the
#: request says it came through a front that acts on ``X-Accel-Redirect``: nginx sets this
#: request header (``proxy_set_header X-Sendfile-Type X-Accel-Redirect;``, the convention of
#: Rack::Sendfile). A client reaching the streamer directly does not, and gets the content.
ACCEL_REQUEST_HEADER = b"x-sendfile-type"
ACCEL_REQUEST_VALUE = b"x-accel-redirect"
#: A path's catalog entries are reused while the catalog's listing version (which every sync
#: that changes an entry bumps, in any process) is the one they were read under; the version
#: is asked again at most every this many seconds, so answers may lag a sync by this long. A
#: lookup is a query (most of the cost of a small stored file); a version read is one, once a
#: second, whatever the traffic. A catalog without a listing version has its answers reused
#: for this long. Whether an artifact is stored is always checked on disk, never cached.
#: Unknown paths are not cached. At most `LOOKUP_CACHE_SIZE` paths are remembered (LRU).
LOOKUP_CACHE_SECONDS = 1.0
LOOKUP_CACHE_SIZE = 10_000
#: Seconds a client is asked to wait (``Retry-After``) while the catalog is unavailable.
CATALOG_RETRY_AFTER = 5

_log = Logger()


class ContentResource(Resource):
    """Serves the catalog's namespace; a leaf, so it sees every path below where it is put.

    The path comes from the raw request target (``request.uri``), not from twisted's
    ``prepath``/``postpath``, so the answer does not depend on where the resource is mounted.
    """

    isLeaf = True

    def __init__(
        self,
        *,
        catalog: Any,
        storage: Any,
        remotes: dict[str, Any] | None = None,
        config: Any = None,
        metrics: Any = None,
        reactor: Any = None,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.catalog = catalog
        self.storage = storage
        self.remotes = dict(remotes or {})
        self.config = config
        self.metrics = metrics
        self.reactor = reactor
        server = getattr(config, "server", None)
        self.x_accel_redirect: str = getattr(server, "x_accel_redirect", "") or ""
        self.stall_timeout: float | None = getattr(server, "stall_timeout", None)
        self.lazy = self._make_lazy(server)
        self.lookup_cache_seconds = LOOKUP_CACHE_SECONDS
        #: path -> (the catalog version it was read under, its entries)
        self._lookups: OrderedDict[str, tuple[object, list[CatalogEntry]]] = OrderedDict()
        #: The catalog's listing version, and until when (reactor time) it is taken as is.
        self._version: object = None
        self._version_until = float("-inf")
        self._listings = ListingCache()
        self._catalog_down = False

    def _make_lazy(self, server: Any) -> LazyStreamer:
        """The lazy streamer sharing our catalog, storage and remotes."""
        options = None
        if server is not None and getattr(server, "stall_timeout", None) is not None:
            options = LazyOptions(no_progress_timeout=server.stall_timeout)
        return LazyStreamer(
            catalog=self.catalog,
            storage=self.storage,
            remotes=self.remotes,
            metrics=self.metrics,
            reactor=self.reactor,
            options=options,
        )

    def close(self) -> defer.Deferred[None]:
        """Stop the lazy downloads in flight (the service calls this at shutdown, and waits)."""
        return self.lazy.stop()

    # -- twisted.web entry point ------------------------------------------------------------

    def render(self, request: StreamerRequest) -> Any:
        try:
            self._render(request)
        except Exception:
            self._failed(Failure(), request)
        return NOT_DONE_YET

    def _render(self, request: StreamerRequest) -> None:
        if request.method not in ALLOWED_METHODS:
            respond_text(
                request, 405, "method not allowed", {b"Allow": b", ".join(ALLOWED_METHODS)}
            )
            return
        try:
            target = request_path(request)
        except RefusedPath as refused:
            respond_text(request, refused.status, refused.reason)
            return
        if not (target.folder or target.dot_ended):
            # A file whose entries need no catalog round trip (cached, or a catalog that
            # answers at once) is served right here: the coroutine and its Deferreds cost a
            # tenth of a warm small request.
            entries = self._fresh_lookup(target.path)
            if entries is None:
                entries = self._lookup_now(target.path)
            if entries == []:  # not in the catalog: `_dispatch` looks for a folder there
                d = defer.ensureDeferred(self._dispatch(request, target, entries))
                d.addErrback(self._failed, request)
                return
            if entries is not None:
                if not self._serve_stored(request, entries, target.path):
                    # Not on disk: the same entries go to the lazy path now (the way through
                    # `_dispatch` would look them up and on disk once more).
                    lazy = defer.maybeDeferred(self.lazy.serve, request, entries, target.path)
                    lazy.addErrback(self._failed, request)
                return
        d = defer.ensureDeferred(self._dispatch(request, target))
        d.addErrback(self._failed, request)

    def _failed(self, failure: Failure, request: StreamerRequest) -> None:
        if isinstance(failure.value, CatalogUnavailable) and not request.startedWriting:
            self._catalog_unavailable(failure.value)
            if not client_gone(request):
                retry = str(CATALOG_RETRY_AFTER).encode("ascii")
                respond_text(request, 503, "catalog unavailable", {b"Retry-After": retry})
            return
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("utf-8", "backslashreplace")
        fault = local_fault(failure.value)
        if fault is not None:  # this host's trouble (no descriptor, disk): one line, a 503
            _log.error(
                "content request {method} {path}: {fault}",
                method=method,
                path=path,
                fault=fault.detail,
            )
        else:
            _log.failure(
                "content request {method} {path} failed", failure, method=method, path=path
            )
        if client_gone(request):
            return
        if request.startedWriting:
            # Headers are out: only cutting the connection tells the client it is incomplete.
            request.channel.transport.abortConnection()
        elif fault is not None:
            respond_text(request, 503, fault.reason)
        else:
            respond_text(request, 500, "internal server error")

    # -- dispatch ---------------------------------------------------------------------------

    async def _dispatch(
        self, request: StreamerRequest, target: RequestPath, known: list[CatalogEntry] | None = None
    ) -> None:
        """Answer *request* for *target* (its entries *known* already, or looked up here)."""
        if target.dot_ended:
            self._redirect(request, target.url_path, client_query(request))
            return
        if target.folder:
            await self._serve_folder(request, target)
            return
        try:
            entries = known if known is not None else await self._lookup(target.path)
        except CatalogUnavailable as down:
            # What the catalog said last still names the artifact: serve it if it is on disk.
            self._catalog_unavailable(down)
            cached = self._lookups.get(target.path)
            if client_gone(request):
                return
            if cached is None or not self._serve_stored(request, cached[1], target.path):
                raise
            return
        if entries:
            await self._serve_entries(request, entries, target.path)
            return
        if await self._folder_page(target.path) is not None:
            location = RequestPath(target.path, folder=True).url_path
            self._redirect(request, location, client_query(request))
            return
        respond_text(request, 404, "not found")

    async def _lookup(self, path: str) -> list[CatalogEntry]:
        """The catalog's entries for *path*, reused while the catalog's version is unchanged
        (LRU; see `LOOKUP_CACHE_SECONDS`). An outdated answer is kept until the catalog gives
        a new one (for outages)."""
        fresh = self._fresh_lookup(path)
        if fresh is not None:
            return fresh
        version = await self._catalog_version()
        cached = self._lookups.get(path)
        if cached is not None and cached[0] == version:
            self._lookups.move_to_end(path)
            return cached[1]
        entries = list(await self.catalog.lookup(path))
        self._catalog_back()
        self._remember(path, version, entries)
        return entries

    def _lookup_now(self, path: str) -> list[CatalogEntry] | None:
        """*path*'s entries from a catalog that answers at once (`SQLiteCatalog.lookup_now`)
        while its version is still taken as is, remembered as `_lookup` would; None when
        they need waiting for (the version must be asked, or the catalog cannot answer now:
        `_lookup` asks then)."""
        lookup_now = getattr(self.catalog, "lookup_now", None)
        if lookup_now is None or self.reactor.seconds() >= self._version_until:
            return None
        entries = lookup_now(path)
        if entries is None:
            return None
        entries = list(entries)
        self._catalog_back()
        self._remember(path, self._version, entries)
        return entries

    def _remember(self, path: str, version: object, entries: list[CatalogEntry]) -> None:
        """Keep *path*'s entries read under *version* (LRU), or forget it when it has none."""
        if entries:
            self._lookups[path] = (version, entries)
            self._lookups.move_to_end(path)
            if len(self._lookups) > LOOKUP_CACHE_SIZE:
                self._lookups.popitem(last=False)
        else:
            self._lookups.pop(path, None)

    def _fresh_lookup(self, path: str) -> list[CatalogEntry] | None:
        """*path*'s cached entries when they need no catalog round trip (read under the
        catalog's version, asked less than `lookup_cache_seconds` ago), else None."""
        if self.reactor.seconds() >= self._version_until:
            return None
        cached = self._lookups.get(path)
        if cached is None or cached[0] != self._version:
            return None
        self._lookups.move_to_end(path)
        return cached[1]

    async def _catalog_version(self) -> object:
        """The catalog's listing version, asked at most every `lookup_cache_seconds` (0: at
        every lookup). A catalog without one gets a new token each time instead, so its
        answers are reused for that long."""
        now = self.reactor.seconds()
        if now < self._version_until:
            return self._version
        version_of = getattr(self.catalog, "listing_version", None)
        version = await version_of() if version_of is not None else object()
        self._catalog_back()
        self._version, self._version_until = version, now + self.lookup_cache_seconds
        return version

    def _catalog_back(self) -> None:
        if self._catalog_down:
            self._catalog_down = False
            _log.info("the catalog answers again")

    def _catalog_unavailable(self, reason: Exception) -> None:
        """Say once per outage that the catalog is unreachable and what that means."""
        if not self._catalog_down:
            self._catalog_down = True
            _log.warn(
                "{reason}: serving stored content of known paths; other requests get 503 "
                "until the catalog answers again",
                reason=reason,
            )

    async def _serve_folder(self, request: StreamerRequest, target: RequestPath) -> None:
        page = await self._folder_page(target.path)
        if page is None:
            respond_text(request, 404, "not found")
            return
        index_path = f"{target.path}/{INDEX_FILE}" if target.path else INDEX_FILE
        if page.has_index:
            index_entries = await self._lookup(index_path)
            if index_entries:
                await self._serve_entries(request, index_entries, index_path)
                return
        respond_page(request, page.body)

    async def _folder_page(self, path: str) -> FolderPage | None:
        """Folder *path* as listed (its page, whether it has an index.html), or None when
        *path* is not a folder; from `ListingCache` while the catalog's listing is unchanged."""
        version_of = getattr(self.catalog, "listing_version", None)
        # Read before the listing: a sync in between leaves a page under an older version.
        version = await version_of() if version_of is not None else None
        if version is not None:
            page = self._listings.get(path, version)
            if page is not None:
                return page
        items = await self._folder_items(path)
        if items is None:
            return None
        page = FolderPage(
            has_index=any(item.name == INDEX_FILE and not item.is_dir for item in items),
            body=render_listing(RequestPath(path, folder=True).url_path, items),
        )
        if version is not None:
            self._listings.put(path, version, page)
        return page

    async def _folder_items(self, path: str) -> list[ListingItem] | None:
        """The children of folder *path*, or None when *path* is not a folder.

        A folder is anything the catalog has entries under, the top, or a remote's base path
        (or a parent of one), so a remote with nothing synced yet still shows an empty page.
        """
        items = list(await self.catalog.list_dir(path))
        names = {item.name for item in items}
        is_base = path == ""
        prefix = path + "/" if path else ""
        for remote in self.remotes.values():
            base_path = getattr(remote, "base_path", None) or getattr(remote, "name", None) or ""
            if base_path == path:
                is_base = True
            elif base_path.startswith(prefix):
                child = base_path[len(prefix) :].split("/", 1)[0]
                if child not in names:
                    names.add(child)
                    items.append(ListingItem(name=child, is_dir=True))
        if not items and not is_base:
            return None
        return items

    def _redirect(self, request: StreamerRequest, location: str, query: bytes) -> None:
        url = quote(location, safe="/").encode("ascii")
        if query and all(0x21 <= byte <= 0x7E for byte in query):  # never echo odd bytes
            url += b"?" + query
        respond_text(request, 301, "moved permanently", {b"Location": url})

    async def _serve_entries(
        self, request: StreamerRequest, entries: list[CatalogEntry], path: str
    ) -> None:
        if client_gone(request):
            return  # the client left while we asked the catalog
        if self._serve_stored(request, entries, path):
            return
        await defer.maybeDeferred(self.lazy.serve, request, entries, path)

    def _serve_stored(
        self, request: StreamerRequest, entries: list[CatalogEntry], path: str
    ) -> bool:
        """Serve the first of *entries* whose artifact is on disk; False when none is."""
        # Stored entries first; the others too, as the artifact may have been stored since
        # (another path, or a download that just finished) before the catalog flag caught up.
        tried: set[str] = set()
        for entry in sorted(entries, key=lambda e: not e.stored):
            if entry.sha256 in tried:
                continue
            tried.add(entry.sha256)
            try:
                fileobj = self.storage.open(entry.sha256, entry.size)
            except ArtifactNotFound:
                continue  # not on disk (even if the catalog says stored): serve it lazily
            request.cache_status = "hit"
            serve_file(
                request,
                fileobj,
                sha256=entry.sha256,
                served_path=path,
                x_accel_redirect=self._accel_value(request, entry.sha256),
                clock=self.reactor,
                stall_timeout=self.stall_timeout,
            )
            return True
        return False

    def _accel_value(self, request: StreamerRequest, sha256: str) -> str | None:
        """The ``X-Accel-Redirect`` value for an artifact, or None when the mode is off or the
        request did not come through a front that acts on it (`ACCEL_REQUEST_HEADER`)."""
        if not self.x_accel_redirect:
            return None
        # The answer depends on that header: a cache between a client and the streamer must
        # not hand the front's empty answer to a client that reached us directly.
        request.responseHeaders.addRawHeader(b"Vary", b"X-Sendfile-Type")
        front = request.getHeader(ACCEL_REQUEST_HEADER) or b""
        if front.strip().lower() != ACCEL_REQUEST_VALUE:
            return None
        relative = os.path.relpath(self.storage.path_for(sha256), self.storage.root)
        return self.x_accel_redirect.rstrip("/") + "/" + relative.replace(os.sep, "/")
