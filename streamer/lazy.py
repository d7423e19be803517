"""Serve lazy content: stream it from upstream to the client while teeing it to storage.

`LazyStreamer.serve(request, entries, path)` answers a GET or HEAD for a path the catalog
knows but storage does not hold:

* ``HEAD`` is answered from the catalog (size, type by extension, the sha256 as ETag),
  without contacting the upstream.
* ``GET`` joins the download of that artifact already in flight (keyed by sha256, so many
  clients cause one upstream request) or starts one through the entry's remote (the
  black-box ``remote.get_downloader``). The client follows the download from the temp file
  at its own pace (`streamer.follower.Follower`); the bytes of a ``Range`` answer are sent
  as soon as they arrived, but the whole artifact is downloaded (from byte 0) and the
  answer completes only once it was validated.
* Entries are tried in catalog order while nothing was sent to the client, skipping entries
  that failed recently (``cooldown``) and origins that asked for time (``Retry-After`` on a
  429 or 5xx: never asked again before it, `streamer.busy`). When no entry is left but a busy
  origin will be free within its remote's ``sock_read_timeout`` (in all, per request), the
  request waits for it and tries again. Otherwise the answer is a short plain text: ``404``
  when every upstream said 404 (the catalog is stale), ``503`` with a ``Retry-After`` of ours
  when a source is busy, ``504`` when every failure was a timeout, otherwise ``502``.
* Once bytes were sent a failure aborts the connection, so the client cannot mistake a
  truncated or wrong body for a complete one; the last byte of every answer (whole body,
  range or multipart) is only sent after the downloader validated size and digests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.http import datetimeToString
from twisted.web.server import NOT_DONE_YET

from downloaders.errors import (
    DownloadError,
    DownloadTimeout,
    NotFound,
    NotModified,
    describe_error,
)
from downloaders.result import parse_last_modified
from downloaders.via import via_entry, via_names
from store.batches import BatchCommitter
from store.errors import local_fault
from streamer.busy import BusyOrigins, busy_seconds
from streamer.claims import NO_CLAIM, Claims, OwnerGone, PeerDownload
from streamer.follower import Follower, Segment
from streamer.forwarding import forwarded_headers
from streamer.inflight import MEMORY_BODY, InFlight
from streamer.logs import RequestLog
from streamer.metrics import reason_label
from streamer.ranges import (
    MultipartByteranges,
    UnsatisfiableRange,
    content_range,
    parse_range,
    unsatisfiable_content_range,
)
from streamer.static import (
    _header_date,
    client_gone,
    content_type_for,
    etag_for,
    evaluate_conditions,
    if_range_allows,
    respond_text,
)

__all__ = ["LazyOptions", "LazyStreamer"]

_log = Logger()


@attrs.frozen
class LazyOptions:
    """Tuning of lazy serving.

    :param no_progress_timeout: seconds a client may refuse bytes before its connection is
        aborted (0: never).
    :param cooldown: seconds an entry whose download failed is skipped by later requests.
    :param read_size: bytes a lagging client reads from the temp file at a time.
    :param memory_body: bodies to be stored of up to this many bytes are held in memory until
        validated, then sent whole and written to storage by the committing thread (0: every
        body streams to its clients as it arrives; see `streamer.inflight.MEMORY_BODY`).
    :param memory_budget: the bytes of such bodies a process holds at once (downloading, or
        validated and waiting for their commit: a slow disk makes them wait); past it, new
        downloads go through temp files, as larger ones do.
    :param retry_delay_cap: the longest wait, in seconds, between two attempts of a download
        a client is waiting for. The remote's ``max_retries`` still applies to failures
        without a ``Retry-After`` (a flaky upstream gets its retries; with the defaults three
        retries cost at most 1.5 s). A ``Retry-After`` is never cut short: that download
        ends at once, and the request fails over to the next entry, or waits for the origin
        within the remote's ``sock_read_timeout``, or answers 503 with a ``Retry-After``.
    """

    no_progress_timeout: float = 60.0
    cooldown: float = 30.0
    read_size: int = 1024 * 1024
    retry_delay_cap: float = 0.5
    #: Seconds finished downloads gather before their batch is flushed and committed; while
    #: they come in numbers, ``commit_busy_delay`` (fewer, larger batches: `BatchCommitter`).
    commit_delay: float = 0.01
    commit_busy_delay: float = 0.05
    memory_body: int = MEMORY_BODY
    memory_budget: int = 64 * 1024 * 1024


#: How often one request starts a download again whose owner (another process) stopped.
_OWNER_RESTARTS = 3
#: Expired cooldowns are dropped when this many are remembered.
_PRUNE_COOLING_AT = 1000


@attrs.frozen
class _Cooling:
    until: float
    error: BaseException


class LazyStreamer:
    """Streams lazy content; one instance per service, holding the downloads in flight.

    :param catalog: an `store.ICatalog` (``mark_stored`` is called after a commit).
    :param storage: an `store.IArtifactStorage` (temp files and commits).
    :param remotes: remote name -> remote (anything with ``policy`` and ``get_downloader``).
    :param metrics: a `streamer.metrics.Metrics`, or None.
    :param reactor: for timers (a ``Clock`` in tests); the global reactor by default.
    """

    def __init__(
        self,
        catalog: Any,
        storage: Any,
        remotes: Mapping[str, Any],
        metrics: Any = None,
        reactor: Any = None,
        options: LazyOptions | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.catalog = catalog
        self.storage = storage
        self.remotes = remotes
        self.metrics = metrics
        self.reactor = reactor
        self.options = options or LazyOptions()
        #: Where upstream failures are logged (the service may replace it).
        self.log = RequestLog()
        #: Downloads taking followers now, by artifact sha256.
        self.in_flight: dict[str, InFlight] = {}
        #: Cooldowns by `_cooling_key`: a source *for one artifact*.
        self._cooling: dict[tuple[str, str, str], _Cooling] = {}
        #: Origins that asked for time (Retry-After), shared by all requests.
        self.busy = BusyOrigins()
        #: Conditional downloads of one client each, not (yet) shared.
        self._own: set[InFlight] = set()
        #: Requests waiting for a busy origin (answered at `stop`).
        self.waiting: set[_LazyRequest] = set()
        self._committer: BatchCommitter | None = None
        #: Set when other processes share the storage folder: one download per artifact
        #: between them (`streamer.claims`).
        self.claims: Claims | None = None
        #: Bytes of the bodies held in memory by downloads not done yet (`memory_budget`).
        self._held = 0
        self.stopped = False

    def serve(self, request: Any, entries: Sequence[Any], path: str) -> object:
        """Answer *request* for *path* from its catalog *entries* (in the order to try)."""
        if not entries:
            respond_text(request, 404, f"{path}: not in the catalog")
        elif request.method == b"HEAD":
            self._head(request, entries, path)
        else:
            via = request.requestHeaders.getRawHeaders(b"via")
            if via is None or not self._loops_back(request, via, path):
                _LazyRequest(self, request, list(entries), path, via).next()
        return NOT_DONE_YET

    def _loops_back(self, request: Any, via: list[bytes], path: str) -> bool:
        """Answer 508 to a request whose ``Via`` names us: it came back through a remote, a
        mirror or a redirect pointing at this streamer, and would wait for its own download.

        508 (Loop Detected, RFC 5842) says what happened, and no client or downloader of
        ours retries it (they retry 502, 503 and 504); nothing is asked upstream."""
        ours = {getattr(remote, "via", "") for remote in self.remotes.values()}
        looped = via_names(via) & ours - {""}
        if not looped:
            return False
        name = min(looped)
        _log.warn(
            "loop detected: a request for {path} came back to {name} (Via: {via}); answered "
            "508 without asking upstream: a remote's url or mirror, or a redirect, points here",
            path=path,
            name=name,
            via=b", ".join(via).decode("latin-1"),
        )
        respond_text(
            request,
            508,
            f"{path}: loop detected: this request already went through {name} (its Via); "
            "a remote's url or mirror, or a redirect, points back at this streamer",
            reason=b"Loop Detected",
        )
        return True

    def stop(self) -> defer.Deferred[None]:
        """Cancel every unfinished download and start no new one (at shutdown).

        The Deferred fires once every download in flight is over, including the commit of
        one that finished just before: its temp file must not be cleaned up under it.
        """
        self.stopped = True
        for waiting in list(self.waiting):
            waiting.wake()  # answers "shutting down"
        settling = []
        for inflight in [*self.in_flight.values(), *self._own]:
            inflight.cancel()
            settling.append(inflight.settled())
        return defer.gatherResults(settling).addCallback(lambda _: None)

    # -- used by _LazyRequest ------------------------------------------------------------------

    def cooling_error(self, entry: Any) -> BaseException | None:
        """The error that put *entry* on a cooldown, or its origin on hold (Retry-After),
        while that lasts."""
        key = _cooling_key(entry)
        cooling = self._cooling.get(key)
        now = self.reactor.seconds()
        if cooling is not None:
            if now < cooling.until:
                return cooling.error
            del self._cooling[key]
        return self.busy.error(entry.url, now)

    def cooldown_left(self, entries: Sequence[Any]) -> float:
        """Seconds until the first of *entries* may be tried again (0 if one may now)."""
        now = self.reactor.seconds()
        left = []
        for entry in entries:
            cooling = self._cooling.get(_cooling_key(entry))
            cool = cooling.until - now if cooling is not None else 0.0
            wait = max(cool, self.busy.left(entry.url, now) or 0.0)
            if wait <= 0:
                return 0.0
            left.append(wait)
        return min(left, default=0.0)

    def busy_left(self, entry: Any) -> float | None:
        """Seconds until *entry*'s origin may be asked again after its Retry-After, when that
        is all that keeps *entry* from being tried (no cooldown of its own); else None."""
        cooling = self._cooling.get(_cooling_key(entry))
        now = self.reactor.seconds()
        if cooling is not None and now < cooling.until:
            return None
        return self.busy.left(entry.url, now)

    def join(
        self,
        entry: Any,
        remote: Any,
        follower_for: Any,
        condition: Mapping[str, str] | None = None,
        via: str = "",
    ) -> None:
        """Attach a follower (made by *follower_for(source)*) to the download of *entry*'s
        artifact, starting that download unless one is in flight.

        With a *condition* (a client's ``If-Modified-Since``) a new download is the client's
        own: nobody joins it (nobody else may get the 304 it can end with) until the upstream
        answered with the body, when it becomes the shared one (unless one is in flight).
        A download that fails at once reports to its followers before this returns.
        A new download forwards *via* (the client request's ``Via``) with our entry appended.
        """
        inflight = self.in_flight.get(entry.sha256)
        if inflight is not None:
            follower_for(inflight).attach()
            return
        claim: Any = NO_CLAIM
        if self.claims is not None and not condition:  # a client's own download is its own
            found = self.claims.claim_or_follow(entry, self._done)
            if isinstance(found, PeerDownload):
                found.stall_limit = getattr(remote, "sock_read_timeout", 0) or 0
                self._follow_peer(found, follower_for)
                return
            claim = found
        memory_body = self.options.memory_body
        if self._held + entry.size > self.options.memory_budget:
            memory_body = 0  # (held bodies wait for a slow disk: stream this one to a file)
        inflight = InFlight(
            entry,
            remote,
            self.storage,
            self.catalog,
            store=getattr(remote, "policy", "on_demand") != "streamed",
            on_failure=self._failed,
            on_done=self._done,
            retry_delay_cap=self.options.retry_delay_cap,
            commit=self._commit,
            condition=condition,
            on_response=self._share if condition else None,
            claim=claim,
            memory_body=memory_body,
            forward=_forwarded_via(via, getattr(remote, "via", "")),
        )
        if inflight.in_memory:
            self._held += inflight.size
        if condition:
            self._own.add(inflight)
        else:
            self.in_flight[entry.sha256] = inflight
        if self.metrics is not None:
            self.metrics.download_started()
        follower_for(inflight).attach()
        inflight.start(forwarded_headers)
        if condition and not inflight.conditional and not inflight.finished:
            self._share(inflight)  # the downloader took no condition: a plain download

    def _share(self, inflight: InFlight) -> None:
        """Let other clients join a client's own download (unless one is in flight)."""
        if self.in_flight.setdefault(inflight.sha256, inflight) is inflight:
            self._own.discard(inflight)

    def _follow_peer(self, peer: PeerDownload, follower_for: Any) -> None:
        """Follow the download another process owns (`streamer.claims`)."""
        if not peer.finished:
            self.in_flight[peer.sha256] = peer  # type: ignore[assignment]
        follower = follower_for(peer)
        if peer.error is not None:
            follower.failed(peer.error)
        else:
            follower.attach()

    def _commit(
        self,
        temp_path: str | None,
        sha256: str,
        size: int,
        then: Callable[[], object],
        write: Callable[[], str] | None,
        settle: Callable[[Any], object],
    ) -> None:
        """Commit a validated temp file (or a body held in memory, which *write* puts in
        one) and mark it stored, then *settle*; files finishing together share one flush,
        one catalog call and one reactor call."""
        if self._committer is None:
            self._committer = BatchCommitter(
                self.storage,
                delay=self.options.commit_delay,
                clock=self.reactor,
                busy_delay=max(self.options.commit_busy_delay, self.options.commit_delay),
                catalog=self.catalog,
            )
        self._committer.add(temp_path, sha256, size, settle, then, write)

    def _failed(self, entry: Any, error: BaseException) -> None:
        fault = local_fault(error)
        if fault is not None:  # this host's fault, not the source's: no cooldown
            _log.error(
                "cannot download {sha256} ({remote}): {fault}; answered 503",
                sha256=entry.sha256,
                remote=entry.remote,
                fault=fault.detail,
            )
            return
        self._cool(entry, error)
        self.log.upstream_failure(
            entry.url, reason_label(error), describe_error(error), metrics=self.metrics
        )

    def _cool(self, entry: Any, error: BaseException) -> None:
        """Put *entry*'s source on a cooldown (or, for a Retry-After, its origin on hold)."""
        now = self.reactor.seconds()
        # A Retry-After holds the whole origin for the time it named, instead of a cooldown.
        if not self.busy.record(entry.url, error, now):
            if len(self._cooling) >= _PRUNE_COOLING_AT:
                self._cooling = {k: c for k, c in self._cooling.items() if c.until > now}
            self._cooling[_cooling_key(entry)] = _Cooling(now + self.options.cooldown, error)

    def _done(self, inflight: InFlight | PeerDownload) -> None:
        if isinstance(inflight, PeerDownload) and inflight.error is not None:
            # Another process's download failed: its source cools down here too (the owner
            # logged the failure), so this process answers the next requests as the owner's
            # does instead of asking the upstream again.
            error = inflight.error
            if not isinstance(error, OwnerGone | NotModified) and local_fault(error) is None:
                self._cool(inflight.entry, error)
        if isinstance(inflight, InFlight) and inflight.in_memory:
            self._held -= inflight.size
        if self.in_flight.get(inflight.sha256) is inflight:
            del self.in_flight[inflight.sha256]
        self._own.discard(inflight)
        if self.metrics is not None and isinstance(inflight, InFlight):  # not another's
            self.metrics.download_finished()

    # -- HEAD ------------------------------------------------------------------------------------

    def _head(self, request: Any, entries: Sequence[Any], path: str) -> None:
        entry = next((e for e in entries if self.cooling_error(e) is None), entries[0])
        if answer_conditions(request, entry):
            return
        request.setResponseCode(200)
        request.setHeader(b"content-type", content_type_for(path))
        request.setHeader(b"content-length", b"%d" % entry.size)
        request.setHeader(b"accept-ranges", b"bytes")
        request.write(b"")
        request.finish()


#: Request headers (as Twisted's ``Headers`` name them) that make a GET conditional or partial.
_CONDITIONS = frozenset(
    {
        b"If-Match",
        b"If-None-Match",
        b"If-Modified-Since",
        b"If-Unmodified-Since",
        b"If-Range",
        b"Range",
    }
)

#: Headers of a 200 that a 304 repeats (RFC 9110 section 15.4.5), of those we forward.
_NOT_MODIFIED_HEADERS = (b"last-modified", b"cache-control", b"expires")


def upstream_condition(request: Any) -> dict[str, str] | None:
    """The condition a GET for content not stored yet passes upstream: its
    ``If-Modified-Since`` (a valid date, normalised), unless ``If-None-Match`` is present
    (it takes precedence, and is answered from the catalog's sha256 ETag)."""
    if request.method != b"GET" or request.getHeader(b"if-none-match") is not None:
        return None
    since = _header_date(request, b"if-modified-since")
    if since is None or since > time.time():  # a date in the future is no valid condition
        return None
    return {"If-Modified-Since": datetimeToString(since).decode("ascii")}


def _current_by_date(request: Any, inflight: InFlight) -> bool:
    """Whether a download in flight already told us (its Last-Modified) that the client's
    ``If-Modified-Since`` copy is current."""
    values = dict(inflight.headers or []).get(b"last-modified")
    since = _header_date(request, b"if-modified-since")
    if not values or since is None:
        return False
    modified = parse_last_modified(values[0])
    return modified is not None and modified <= since


def _forwarded_via(via: str, ours: str) -> dict[str, str] | None:
    """The ``Via`` a download started for a request that had *via* sends: *via*, then our
    entry (None without either: the remote's own headers carry ours alone)."""
    return {"Via": f"{via}, {via_entry(ours)}"} if via and ours else None


def _cooling_key(entry: Any) -> tuple[str, str, str]:
    """What a cooldown is for: one source (remote and url) of one artifact (its sha256).

    A failure says nothing about other content at the same url: after a publish and a sync
    the catalog entry of ``repodata/repomd.xml`` names new bytes, and the old entry's size or
    digest mismatch must not keep answering 502 for the new one."""
    return (entry.remote, entry.url, entry.sha256)


def answer_conditions(request: Any, entry: Any) -> bool:
    """Answer 304 or 412 when *request*'s preconditions say so; True if answered.

    Lazy content has no local modification time, so only the entity-tag conditions apply;
    the tag is the artifact's sha256, the same as once it is stored. Sets the ``ETag``.
    """
    etag = etag_for(entry.sha256)
    request.setHeader(b"etag", etag)
    status = evaluate_conditions(request, etag, None)
    if status == 412:
        respond_text(request, 412, "precondition failed")
    elif status == 304:
        request.setResponseCode(304)
        request.finish()
    return status is not None


class _LazyRequest:
    """One GET: tries the entries in order until one delivers its first byte."""

    def __init__(
        self,
        streamer: LazyStreamer,
        request: Any,
        entries: list[Any],
        path: str,
        via: list[bytes] | None = None,
    ):
        self.streamer = streamer
        #: The request's ``Via``, forwarded by the download it starts.
        self.via = b", ".join(via).decode("latin-1") if via else ""
        self.request = request
        self.entries = entries
        self.path = path
        #: The last error of each source tried, by (remote, url).
        self.errors: dict[tuple[str, str], BaseException] = {}
        self.follower: Follower | None = None
        self.gone = False
        self._tried: set[tuple[str, str]] = set()
        self._trying: tuple[str, str] | None = None
        #: Seconds this request waited for busy origins so far, and the timer of a wait.
        self._waited = 0.0
        self._wait: Any = None
        #: Times the download was started again after its owner (another process) stopped.
        self._restarts = 0
        #: Whether the request is a plain GET: no precondition, no range (most are), so
        #: neither needs working out for each entry tried.
        self.plain = not any(
            name in _CONDITIONS for name, _ in request.requestHeaders.getAllRawHeaders()
        )
        request.notifyFinish().addErrback(self._client_gone)

    def next(self) -> None:
        """Follow the download of the next usable entry, or answer with the errors."""
        self.follower = None
        if self.gone:
            return
        streamer = self.streamer
        if streamer.stopped:
            respond_text(self.request, 503, "the service is shutting down")
            return
        for entry in self.entries:
            key = (entry.remote, entry.url)
            if key in self._tried:
                continue
            self._tried.add(key)
            cooling = streamer.cooling_error(entry)
            if cooling is not None:
                self.errors[key] = cooling
                continue
            remote = streamer.remotes.get(entry.remote)
            if remote is None:
                self.errors[key] = DownloadError(
                    entry.url, f"unknown remote {entry.remote!r}", "unknown remote"
                )
                continue
            if self.plain:
                self.request.setHeader(b"etag", etag_for(entry.sha256))
                plan = _Plan.whole(entry, self.path)
                condition = None
            else:
                if answer_conditions(self.request, entry):
                    return
                try:
                    plan = _Plan.make(self.request, entry, self.path)
                except UnsatisfiableRange:
                    respond_text(
                        self.request,
                        416,
                        "requested range not satisfiable",
                        {b"content-range": unsatisfiable_content_range(entry.size)},
                    )
                    return
                condition = upstream_condition(self.request)
            joined = streamer.in_flight.get(entry.sha256)
            if condition and joined is not None and _current_by_date(self.request, joined):
                self._not_modified(joined.headers)
                return
            if joined is None:
                self.request.cache_status = "miss"
            elif joined.succeeded:
                self.request.cache_status = "hit"  # validated, only its commit is pending
            else:
                self.request.cache_status = "coalesced"
            self._trying = key
            streamer.join(
                entry,
                remote,
                lambda source, plan=plan: self._follower(source, plan),
                condition,
                self.via,
            )
            return
        if not self._wait_for_busy_origin():
            self._give_up()

    def _wait_for_busy_origin(self) -> bool:
        """Every entry was tried. If one is held only by its origin's Retry-After and that
        ends within its remote's ``sock_read_timeout`` (counting what this request waited
        already), wait for it, then try the entries free by then; True if waiting."""
        streamer = self.streamer
        soonest: float | None = None
        for entry in self.entries:
            left = streamer.busy_left(entry)
            if left is None:
                continue
            # 0: the remote sets no read timeout, so no limit (Retry-After is capped at
            # MAX_BUSY); a remote without the setting (a plugin's): no waiting.
            limit = getattr(streamer.remotes.get(entry.remote), "sock_read_timeout", None)
            if limit is None or (limit and self._waited + left > limit):
                continue
            if soonest is None or left < soonest:
                soonest = left
        if soonest is None:
            return False
        self._waited += soonest
        self._wait = streamer.reactor.callLater(soonest, self.wake)
        streamer.waiting.add(self)
        return True

    def wake(self) -> None:
        """End a wait for a busy origin: try again every entry that is free now."""
        if self._wait is not None and self._wait.active():
            self._wait.cancel()
        self._wait = None
        self.streamer.waiting.discard(self)
        for entry in self.entries:
            key = (entry.remote, entry.url)
            if key in self.errors and self.streamer.cooling_error(entry) is None:
                self._tried.discard(key)
        self.next()

    def _follower(self, source: InFlight | PeerDownload, plan: _Plan) -> Follower:
        options = self.streamer.options
        if isinstance(source, PeerDownload):  # another process or node downloads it, or
            # validated it already (only its commit may be pending): a hit, as in one process
            self.request.cache_status = "hit" if source.validated else "coalesced"
        self.follower = Follower(
            self.request,
            source,
            plan.segments,
            on_start=lambda: self._start(plan, source),
            on_failed=self._source_failed,
            reactor=self.streamer.reactor,
            no_progress_timeout=options.no_progress_timeout,
            read_size=options.read_size,
        )
        return self.follower

    def _source_failed(self, error: BaseException) -> None:
        if isinstance(error, NotModified):  # the upstream's answer to the client's condition
            self._not_modified(forwarded_headers(error.headers))
            return
        fault = local_fault(error)
        if fault is not None:  # another source would fail the same way here
            respond_text(self.request, 503, fault.reason)
            return
        if self._trying is not None:
            if isinstance(error, OwnerGone) and self._restarts < _OWNER_RESTARTS:
                # Another process owned the download and stopped: take it over.
                self._restarts += 1
                self._tried.discard(self._trying)
            else:
                self.errors[self._trying] = error
        self.next()

    def _not_modified(self, forwarded: list[tuple[bytes, list[bytes]]] | None) -> None:
        """Answer 304 (the ETag is set already) with the upstream's validators and freshness
        headers; no body was downloaded, nothing is stored, nothing cools down."""
        if client_gone(self.request):
            return
        self.request.setResponseCode(304)
        for name, values in forwarded or []:
            if name in _NOT_MODIFIED_HEADERS:
                self.request.responseHeaders.setRawHeaders(name, values)
        self.request.finish()

    def _client_gone(self, _reason: Any) -> None:
        self.gone = True
        if self._wait is not None:
            self._wait.cancel()
            self._wait = None
            self.streamer.waiting.discard(self)
        if self.follower is not None:
            self.follower.stop()

    def _start(self, plan: _Plan, source: InFlight | PeerDownload) -> None:
        self.request.upstream_status = source.upstream_status
        plan.start(self.request, source.headers)

    def _give_up(self) -> None:
        errors = list(self.errors.values())
        headers: dict[bytes, bytes] = {}
        if errors and all(isinstance(e, NotFound) for e in errors):
            status, what = 404, "not found upstream"
        elif any(busy_seconds(e) is not None for e in errors):
            # A source asked for time: say when to come back (ceil: never before it).
            status, what = 503, "upstream busy"
            left = self.streamer.cooldown_left(self.entries)
            headers[b"retry-after"] = b"%d" % max(1, math.ceil(left))
        elif errors and all(isinstance(e, DownloadTimeout) for e in errors):
            status, what = 504, "upstream timed out"
        else:
            status, what = 502, "upstream failed"
        left = self.streamer.cooldown_left(self.entries)
        if status not in (404, 503) and left > 0:
            headers[b"retry-after"] = b"%d" % max(1, round(left))
        reasons = "; ".join(dict.fromkeys(_summary(e) for e in errors))[:400] or "no usable source"
        statuses = [s for e in errors if isinstance(s := getattr(e, "status", None), int)]
        self.request.upstream_status = statuses[-1] if statuses else None
        respond_text(self.request, status, f"{self.path}: {what}: {reasons}", headers)


@attrs.frozen
class _Plan:
    """What one response sends: status, framing headers and the segments of the body."""

    entry: Any
    path: str
    status: int
    segments: list[Segment]
    length: int
    content_type: bytes
    content_range: bytes | None = None
    multipart: MultipartByteranges | None = None

    @classmethod
    def whole(cls, entry: Any, path: str, content_type: bytes | None = None) -> _Plan:
        """The plan for the whole artifact (a 200)."""
        size = entry.size
        kind = content_type_for(path) if content_type is None else content_type
        return cls(entry, path, 200, [(0, size)], size, kind)

    @classmethod
    def make(cls, request: Any, entry: Any, path: str) -> _Plan:
        """The plan for *request*'s ``Range`` (ignored with an ``If-Range`` naming another
        version); may raise `UnsatisfiableRange`."""
        size = entry.size
        header = request.getHeader(b"range")
        if not if_range_allows(request, etag_for(entry.sha256), None):
            header = None
        content_type = content_type_for(path)
        ranges = parse_range(header, size, content_type)
        if not ranges:
            return cls.whole(entry, path, content_type)
        if len(ranges) == 1:
            first, last = ranges[0]
            return cls(
                entry,
                path,
                206,
                [(first, last + 1)],
                last - first + 1,
                content_type,
                content_range=content_range(first, last, size),
            )
        multipart = MultipartByteranges(ranges, size, content_type)
        segments: list[Segment] = []
        for prefix, first, last in multipart.parts():
            segments += [prefix, (first, last + 1)]
        segments.append(multipart.trailer)
        return cls(
            entry,
            path,
            206,
            segments,
            multipart.content_length,
            content_type,
            multipart=multipart,
        )

    def start(self, request: Any, forwarded: list[tuple[bytes, list[bytes]]] | None) -> None:
        """Set the status and headers, right before the first byte is written."""
        request.setResponseCode(self.status)
        headers = dict(forwarded or [])
        headers.setdefault(b"content-type", [self.content_type])
        headers[b"etag"] = [etag_for(self.entry.sha256)]
        if self.multipart is not None:
            headers[b"content-type"] = [self.multipart.header_value]
        for name, values in headers.items():
            request.responseHeaders.setRawHeaders(name, values)
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"content-length", b"%d" % self.length)
        if self.content_range is not None:
            request.setHeader(b"content-range", self.content_range)


def _summary(error: BaseException) -> str:
    """What failed, for the client: never a url, host or address (`DownloadError.summary`)."""
    if isinstance(error, DownloadError):
        return error.summary
    return type(error).__name__
