"""Prometheus metrics of one streamer service, in a registry of its own.

Each `Metrics` owns a private ``CollectorRegistry`` (never the process-global one), so tests
and several services in one process never clash. Who calls what:

* the site (`streamer.service`) calls `request_started()` and, once per request,
  `request_done(method, status, nbytes, cache_status, duration)`; the cache status is
  what the content resource (`streamer.content`, for stored files) or the lazy streamer
  (`streamer.lazy`, for the others) put in ``request.cache_status`` (see `streamer.logs`);
* the lazy streamer (`streamer.lazy.LazyStreamer`) counts upstream failures through
  `streamer.logs.RequestLog.upstream_failure` (which calls `upstream_failure(reason)`, then logs),
  and calls `download_started()` / `download_finished()` around each upstream download it
  starts (not per coalesced waiter);
* temp bytes are measured from the temp folder at scrape time (`watch_temp_dir`).

Several server processes (``[server] processes``) share their figures through
prometheus-client's multiprocess mode: the first process sets ``PROMETHEUS_MULTIPROC_DIR``
(`streamer.processes.share_metrics`) before this library is imported, every process writes
its values to files there, and ``/metrics`` in any process renders the totals of all. There
every update is a locked write to a memory-mapped file (a request made seven, a cold one in
two or three reactor turns), so given a reactor the per-request figures are summed in memory
and written `FLUSH_INTERVAL` seconds after the first of them (`flush`; at exit too, after the
drain). Each such process also keeps a marker in the folder (`_Marker`: a memory-mapped
CLOCK_MONOTONIC time, set by the first update of a batch and cleared by its `flush`, so no
system call per request) saying since when its figures wait; ``/metrics`` answers once no
other live process has figures waiting from before the scrape (`Metrics.settled`: at once
when none does, polled every `SCRAPE_POLL` seconds, `SCRAPE_WAIT` at most), so it shows every
request answered before it, however long another process was kept off a core.

In one process the per-request figures are summed in memory too, and written to the metrics
whenever the registry is read (a collector registered first flushes them: ``/metrics``,
`value`, or anything else collecting it sees every request so far) or once
`FLUSH_DURATIONS` request durations wait: a request's seven updates through
prometheus-client (label lookups, locks, a histogram's bucket search) cost as much as the
rest of its bookkeeping, for figures read every few seconds at most.
"""

from __future__ import annotations

import copy
import fcntl
import itertools
import mmap
import os
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from twisted.internet import defer

__all__ = [
    "CACHE_STATUSES",
    "CONTENT_TYPE",
    "FLUSH_INTERVAL",
    "SCRAPE_POLL",
    "SCRAPE_WAIT",
    "UPSTREAM_REASONS",
    "Metrics",
    "reason_label",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Values of ``request.cache_status``: served from storage, started a download, joined one.
CACHE_STATUSES = ("hit", "miss", "coalesced")
#: Where the bytes of a response came from, by cache status.
_SOURCE = {"hit": "store", "miss": "upstream", "coalesced": "upstream"}
#: Label values for upstream failures; anything else is counted as "other".
UPSTREAM_REASONS = (
    "timeout",
    "connection",
    "not_found",
    "http_error",
    "digest_mismatch",
    "size_mismatch",
    "other",
)


#: Request durations kept in memory at most before they are written (one process).
FLUSH_DURATIONS = 1024
#: Seconds the figures of several processes wait in memory at most before they are written
#: to the shared folder (how late a scrape in another process may see them).
FLUSH_INTERVAL = 0.1
#: Seconds between two looks at the other processes' markers while a scrape waits for them.
SCRAPE_POLL = 0.01
#: Seconds a scrape waits at most for another process's figures (one stopped, or whose reactor
#: is stuck): then it answers with what is written.
SCRAPE_WAIT = 2.0
#: The names of the processes' markers in the shared folder: ``pending-PID-N``.
MARKER_PREFIX = "pending-"
_MARKER = struct.Struct("d")
_markers = itertools.count()  # (several Metrics of one process: one marker each)


def reason_label(error: BaseException) -> str:
    """Classify a download error into one of UPSTREAM_REASONS (a low-cardinality label)."""
    import downloaders

    if isinstance(error, downloaders.DownloadTimeout):
        return "timeout"
    if isinstance(error, downloaders.DigestValidationError):
        return "digest_mismatch"
    if isinstance(error, downloaders.SizeValidationError):
        return "size_mismatch"
    if isinstance(error, downloaders.NotFound):
        return "not_found"
    if isinstance(error, downloaders.HttpError):
        return "http_error"
    if isinstance(error, (downloaders.ConnectionFailed, ConnectionError)):
        return "connection"
    return "other"


class _WithoutCreated:
    """A view of a registry without the ``*_created`` samples of counters and histograms.

    prometheus-client can only turn those off process-wide (`disable_created_metrics`);
    filtering at exposition keeps them out of /metrics without changing the global registry
    or other users of the library in this process.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            created = family.name + "_created"
            if any(sample.name == created for sample in family.samples):
                family = copy.copy(family)
                family.samples = [s for s in family.samples if s.name != created]
            yield family


def _dir_bytes(path: str, depth: int = 1) -> float:
    """Bytes of the files in *path* and, *depth* levels down, in its folders (the storage's
    tmp/ holds one folder per process)."""
    total = 0.0
    try:
        with os.scandir(path) as it:
            for entry in it:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                    elif depth > 0 and entry.is_dir(follow_symlinks=False):
                        total += _dir_bytes(entry.path, depth - 1)
                except FileNotFoundError:
                    continue
    except (FileNotFoundError, NotADirectoryError):
        return 0.0
    return float(total)


class Metrics:
    """The service's counters and gauges; all names start with ``streamer_``."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        shared_dir: str | None = None,
        reactor: Any = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        #: The multiprocess folder when several processes serve (see the module docstring).
        self.shared_dir = shared_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        #: Writes the per-request updates every `FLUSH_INTERVAL` (multiprocess mode only).
        self._reactor = reactor if self.shared_dir else None
        #: Whether updates wait in memory (one process: until a read; several: up to
        #: `FLUSH_INTERVAL`), rather than being written at once (several, with no reactor).
        self._batched = not self.shared_dir or self._reactor is not None
        #: (metric, label values) -> the amount to add at the next `flush`.
        self._pending: dict[tuple[Any, tuple[str, ...]], float] = {}
        self._durations: list[float] = []
        #: Guards `_pending` and `_durations` (a registry may be collected in any thread).
        self._lock = threading.Lock()
        self._flush_call: Any = None
        #: Since when this process's figures wait, for the scrapes of the others.
        self._marker = _Marker(self.shared_dir) if self.shared_dir and reactor is not None else None
        self._temp_bytes = _TempBytes()
        r = self.registry
        if not self.shared_dir:  # first, so every collection sees what waits
            r.register(_FlushFirst(self))
        self.requests = Counter(
            "streamer_requests", "HTTP requests answered", ["method", "status"], registry=r
        )
        self.requests_in_flight = Gauge(
            "streamer_requests_in_flight",
            "HTTP requests being answered",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.request_duration = Histogram(
            "streamer_request_duration_seconds", "Time to answer a request", registry=r
        )
        self.bytes_served = Counter(
            "streamer_served_bytes",
            "Response body bytes sent, by where they came from (store, upstream, other)",
            ["source"],
            registry=r,
        )
        self.cache_hits = Counter(
            "streamer_cache_hits", "Content requests served from storage", registry=r
        )
        self.cache_misses = Counter(
            "streamer_cache_misses",
            "Content requests that started an upstream download",
            registry=r,
        )
        self.coalesced_waiters = Counter(
            "streamer_coalesced_waiters",
            "Content requests that joined a download already in flight",
            registry=r,
        )
        self.upstream_failures = Counter(
            "streamer_upstream_failures",
            "Failed upstream downloads, by reason",
            ["reason"],
            registry=r,
        )
        self.downloads_in_flight = Gauge(
            "streamer_downloads_in_flight",
            "Upstream downloads running now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.downloads = Counter("streamer_downloads", "Upstream downloads started", registry=r)
        for status in CACHE_STATUSES:  # export zeros so dashboards see every series
            self.bytes_served.labels(_SOURCE[status])
        self.bytes_served.labels("other")

    # -- called by the site -------------------------------------------------------------

    def request_started(self) -> None:
        self._add(self.requests_in_flight, (), 1)

    def request_done(
        self,
        method: str,
        status: int,
        nbytes: int,
        cache_status: str | None = None,
        duration: float | None = None,
    ) -> None:
        """Count one finished (or aborted) request: status, bytes by source, cache outcome."""
        self._add(self.requests_in_flight, (), -1)
        self._add(self.requests, (method, str(status)), 1)
        self._add(self.bytes_served, (_SOURCE.get(cache_status or "", "other"),), max(nbytes, 0))
        if cache_status == "hit":
            self._add(self.cache_hits, (), 1)
        elif cache_status == "miss":
            self._add(self.cache_misses, (), 1)
        elif cache_status == "coalesced":
            self._add(self.coalesced_waiters, (), 1)
        if duration is not None:
            if not self._batched:
                self.request_duration.observe(max(duration, 0.0))
                return
            with self._lock:
                self._durations.append(max(duration, 0.0))
                waiting = len(self._durations)
            if self._reactor is not None:
                self._schedule()
            elif waiting >= FLUSH_DURATIONS:
                self.flush()

    def _add(self, metric: Any, labels: tuple[str, ...], amount: float) -> None:
        """Add *amount* to a counter or gauge: at the next `flush` (see the module), or now
        with several processes and no reactor."""
        if not self._batched:
            (metric.labels(*labels) if labels else metric).inc(amount)
            return
        key = (metric, labels)
        with self._lock:
            self._pending[key] = self._pending.get(key, 0) + amount
        if self._reactor is not None:
            self._schedule()

    def _schedule(self) -> None:
        if self._flush_call is None and self._reactor is not None:
            self._flush_call = self._reactor.callLater(FLUSH_INTERVAL, self.flush)
            if self._marker is not None:
                self._marker.since(time.monotonic())

    def settled(self, clock: Any) -> defer.Deferred[None]:
        """Fire once no other live process sharing `shared_dir` has figures waiting in memory
        from before this call (looked at every `SCRAPE_POLL` seconds of *clock*), or after
        `SCRAPE_WAIT` seconds whatever waits; at once with one process. Cancelling it stops
        the polling."""
        asked = time.monotonic()
        if not self.shared_dir or not self._others_waiting(asked):
            return defer.succeed(None)
        deadline = clock.seconds() + SCRAPE_WAIT
        done: defer.Deferred[None] = defer.Deferred(lambda _: call[0].cancel())

        def poll() -> None:
            if clock.seconds() >= deadline or not self._others_waiting(asked):
                done.callback(None)
            else:
                call[0] = clock.callLater(SCRAPE_POLL, poll)

        call = [clock.callLater(SCRAPE_POLL, poll)]
        return done

    def _others_waiting(self, asked: float) -> bool:
        """Whether another live process's marker says its figures wait since before *asked*
        (a marker whose ``flock`` is free is a dead process's: never waited for)."""
        own = self._marker.path if self._marker is not None else None
        assert self.shared_dir is not None
        try:
            names = [n for n in os.listdir(self.shared_dir) if n.startswith(MARKER_PREFIX)]
        except OSError:
            return False
        for name in names:
            path = os.path.join(self.shared_dir, name)
            if path == own:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue  # (its process ended meanwhile: `process_ended`)
            try:
                data = os.pread(fd, _MARKER.size, 0)
                if len(data) < _MARKER.size:
                    continue
                (since,) = _MARKER.unpack(data)
                if not 0 < since < asked:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True  # held: its process lives and has not written yet
            finally:
                os.close(fd)
        return False

    def flush(self) -> None:
        """Write the updates waiting in memory (`FLUSH_INTERVAL` after the first, before a
        scrape, at exit)."""
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        with self._lock:
            pending, self._pending = self._pending, {}
            durations, self._durations = self._durations, []
        for (metric, labels), amount in pending.items():
            if amount:  # an in-flight gauge up and down between two flushes writes nothing
                (metric.labels(*labels) if labels else metric).inc(amount)
        for duration in durations:
            self.request_duration.observe(duration)
        if self._marker is not None and self._flush_call is None:
            self._marker.since(0.0)  # after the figures: a scrape waiting for them may go on

    def request_refused(self, method: str, status: int) -> None:
        """Count a request refused at the connection (413, 414, 431, 408, 400)."""
        self._add(self.requests, (method, str(status)), 1)

    # -- called by the content resource -------------------------------------------------

    def upstream_failure(self, reason: str) -> None:
        """Count a failed upstream download; *reason* is one of UPSTREAM_REASONS."""
        self.upstream_failures.labels(reason if reason in UPSTREAM_REASONS else "other").inc()

    def download_started(self) -> None:
        self._add(self.downloads, (), 1)
        self._add(self.downloads_in_flight, (), 1)

    def download_finished(self) -> None:
        self._add(self.downloads_in_flight, (), -1)

    # -- wiring -------------------------------------------------------------------------

    def watch_temp_dir(self, path: str) -> None:
        """Report the size of the files in *path* (and its folders) as ``streamer_temp_bytes``
        at each scrape."""
        if self._temp_bytes.path is None and not self.shared_dir:
            self.registry.register(self._temp_bytes)
        self._temp_bytes.path = path

    def process_ended(self, pid: int) -> None:
        """Drop the live gauges and the marker of a server process that ended (its counters
        still count)."""
        if self.shared_dir:
            mark_process_dead(pid, self.shared_dir)
            prefix = f"{MARKER_PREFIX}{pid}-"
            try:
                names = [n for n in os.listdir(self.shared_dir) if n.startswith(prefix)]
            except OSError:
                return
            for name in names:
                try:
                    os.remove(os.path.join(self.shared_dir, name))
                except FileNotFoundError:
                    pass

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The current value of one sample (e.g. ``streamer_cache_hits_total``), 0 if absent."""
        self.flush()
        found = self.registry.get_sample_value(name, labels or {})
        return 0.0 if found is None else found

    def render(self) -> bytes:
        """The Prometheus text exposition (without ``*_created`` series): this registry, or
        the totals of every process sharing `shared_dir`."""
        self.flush()
        if not self.shared_dir:
            return generate_latest(_WithoutCreated(self.registry))
        totals = CollectorRegistry()
        MultiProcessCollector(totals, path=self.shared_dir)
        if self._temp_bytes.path is not None:
            totals.register(self._temp_bytes)
        return generate_latest(_WithoutCreated(totals))


class _FlushFirst:
    """Registered first in a registry of one process: collecting it writes the figures that
    wait in memory first (and describes no metric of its own)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        self._metrics.flush()
        return iter(())


class _Marker:
    """Since when (CLOCK_MONOTONIC seconds, one clock for every process on Linux) the figures
    of this process wait in memory, 0 when none do: 8 bytes of a file in the shared folder,
    written through a shared memory map (no system call) and read by the scrapes of the
    other processes (`Metrics.settled`). Its process holds an ``flock`` on it while it lives,
    so a process that died with figures waiting (killed) never holds a scrape back."""

    def __init__(self, folder: str) -> None:
        fd, making = tempfile.mkstemp(prefix="." + MARKER_PREFIX, dir=folder)
        try:
            os.ftruncate(fd, _MARKER.size)
            fcntl.flock(fd, fcntl.LOCK_EX)  # (kept while the map keeps its descriptor open)
            self._map = mmap.mmap(fd, _MARKER.size)
        finally:
            os.close(fd)
        #: Visible only once locked and zero: a scrape never takes it for a dead process's.
        self.path = os.path.join(folder, f"{MARKER_PREFIX}{os.getpid()}-{next(_markers)}")
        os.rename(making, self.path)

    def since(self, moment: float) -> None:
        _MARKER.pack_into(self._map, 0, moment)


class _TempBytes:
    """``streamer_temp_bytes``: the temp folder measured at scrape time (one folder, whatever
    the number of processes, so it is never summed over them)."""

    path: str | None = None

    def collect(self) -> Iterator[Metric]:
        value = _dir_bytes(self.path) if self.path else 0.0
        yield GaugeMetricFamily(
            "streamer_temp_bytes", "Bytes in temporary (partial) files", value=value
        )
