"""BaseDownloader: size, digests, validation, temp files, retries and semaphores for any protocol.

Subclasses implement `_run()` for one attempt, as in Pulp's ``pulpcore.plugin.download``: pass
every body byte to `handle_data()`, then call `finalize()` (if `_run()` does not, `run()` does).
`_run()` may return a Deferred, a coroutine (``async def``) or a plain value; `run()` wraps the
attempts with the semaphore, retries and clean-up, so a new protocol gets all of them for free.
"""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, cast

from twisted.internet import defer, task
from twisted.internet.error import ReactorNotRestartable
from twisted.internet.interfaces import IReactorTime
from twisted.python import threadable
from twisted.python.failure import Failure
from zope.interface import implementer

from downloaders.digests import (
    DEFAULT_ALLOWED_DIGESTS,
    DEFAULT_DIGESTS,
    DigestCalculator,
    check_allowed,
    normalise_digests,
    refusal,
    unsupported_digest,
)
from downloaders.errors import (
    DigestValidationError,
    DownloadError,
    DownloadTimeout,
    SizeValidationError,
    UnsupportedDigestValidationError,
    ValidationError,
)
from downloaders.headers import as_response_headers
from downloaders.interfaces import IDownloader
from downloaders.result import DownloadResult
from downloaders.retry import Backoff, RetryDelays
from downloaders.tempfiles import TempFilePool, create_temp_file
from downloaders.urls import url_credentials, without_userinfo

HeadersCallback = Callable[[Any], None]


def as_deferred(awaitable: Awaitable[Any]) -> defer.Deferred[Any]:
    """Any awaitable as a Deferred: a Deferred itself, a coroutine, `DONE` or a Future-like
    object (``ensureDeferred`` alone refuses what is neither a coroutine nor a Deferred)."""
    if isinstance(awaitable, defer.Deferred):
        return awaitable
    return defer.ensureDeferred(_awaited(awaitable))


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


class _Done:
    """What `BaseDownloader.handle_data` and `finalize` return: work already done, and
    awaitable, so a downloader ported from Pulp can keep ``await self.handle_data(data)`` in an
    ``async def _run`` (or ``yield`` it under ``inlineCallbacks``)."""

    __slots__ = ()

    def __await__(self) -> Iterator[Any]:
        return iter(())

    def __repr__(self) -> str:
        return "<done>"


DONE = _Done()

#: ``validators`` entries: called with the downloader at `finalize`, after size and digests.
Validator = Callable[["BaseDownloader"], Any]
#: ``progress``: called with (bytes so far in this attempt, expected size or None).
Progress = Callable[[int, "int | None"], Any]


@implementer(IDownloader)
class BaseDownloader:
    """Download one url, validating size and digests while the bytes arrive.

    The positional parameters are Pulp's: ``url, expected_digests, expected_size, semaphore,
    custom_file_object``; the rest are keywords.

    :param expected_digests: ``{"sha256": hex, ...}``; every named algorithm is computed and
        checked, and lands in ``artifact_attributes``. An unknown algorithm, or one not in
        ``allowed_digests``, raises `UnsupportedDigestValidationError` here, before any byte is
        fetched; the message names the switch that would allow it.
    :param expected_size: checked at the end, and as soon as more bytes than this arrive.
    :param semaphore: a `DeferredSemaphore` (or anything with ``run(f, *args)``) shared by the
        downloads of one remote.
    :param custom_file_object: a file-like object (``write``; ``flush`` if it has one) taking
        the bytes instead of a temporary file; flushed by `finalize`, never closed, and
        ``result.path`` is its ``name`` when that is a path. No retry once it got a byte.
    :param allowed_digests: the algorithms ``expected_digests`` and ``digest_algorithms`` may
        name (default: sha224, sha256, sha384, sha512; add ``"md5"`` or ``"sha1"`` for a
        repository that publishes nothing better).
    :param digest_algorithms: computed on top of the expected ones (default: sha256 only).
    :param validators: callables run by `finalize` after size and digests, each with the
        downloader (``url``, ``path``, ``artifact_attributes``, ``headers``): raising fails
        the download (anything but a `ValidationError` is wrapped in one), returning False
        fails it too.
    :param progress: called after every chunk with (bytes so far in this attempt, expected size
        or None), for a progress bar; a retry starts again from 0.
    :param temp_dir: where the temporary file goes (default: the current working folder, as
        Pulp's ``handle_data()`` says, so ``result.path`` can be renamed next to it).
    :param temp_files: a `TempFilePool` that hands out ready-made temporary files (the
        factory passes one per ``temp_dir``); None: each attempt creates its own in
        ``temp_dir``.
    :param writer: a caller-supplied `IWriter` (``write(bytes)``) taking the bytes instead of a
        temporary file; then ``result.path`` is None and no retry happens once a byte or the
        headers were handed over (they cannot be taken back). Each chunk is written the moment
        it arrives, on the reactor thread, with no backpressure: ``write`` must not block, and
        a writer that cannot keep up must queue to disk itself. The writer is never closed by
        the downloader. An exception raised by ``write`` aborts the download and reaches the
        caller unchanged (no retry: it is the caller's own failure).
    :param headers_ready_callback: called once with the final response headers (a dict of
        ``name -> value``, case-insensitive: `downloaders.headers.ResponseHeaders`), before
        any body byte is handed to ``handle_data``. If a retry follows (only possible without
        a ``writer``), it is not called again; ``result.headers`` are the last attempt's.
    :param max_retries: further attempts after a retryable failure (0: no retry).
    :param backoff: the delays between attempts (`Backoff`: exponential, jittered, honouring
        ``Retry-After`` up to a cap).
    :param context: the shared state of the downloads of one remote (the factory passes its
        `downloaders.context.DownloadContext`); None: one of the downloader's own.
    :param reactor: the clock for backoff and timeouts (a ``task.Clock`` in tests).
    """

    def __init__(
        self,
        url: str,
        expected_digests: Mapping[str, str] | None = None,
        expected_size: int | None = None,
        semaphore: Any = None,
        custom_file_object: Any = None,
        *,
        allowed_digests: Iterable[str] | None = None,
        digest_algorithms: Iterable[str] = DEFAULT_DIGESTS,
        validators: Iterable[Validator] = (),
        progress: Progress | None = None,
        temp_dir: str | None = None,
        temp_files: TempFilePool | None = None,
        writer: Any = None,
        headers_ready_callback: HeadersCallback | None = None,
        max_retries: int = 3,
        backoff: RetryDelays | None = None,
        context: Any = None,
        reactor: IReactorTime | None = None,
    ) -> None:
        #: The url without its userinfo: what is requested and what results hold (errors and
        #: logs show it through `downloaders.urls.redact_url`).
        self.url = without_userinfo(url) if "@" in url else url
        #: ``(username, password)`` from the url's userinfo, for protocols that can send them.
        self.url_credentials = url_credentials(url) if "@" in url else None
        self.allowed_digests = (
            DEFAULT_ALLOWED_DIGESTS if allowed_digests is None else check_allowed(allowed_digests)
        )
        self.expected_digests = normalise_digests(expected_digests)
        self.expected_size = expected_size
        self.semaphore = semaphore
        if digest_algorithms is not DEFAULT_DIGESTS:
            digest_algorithms = [name.lower() for name in digest_algorithms]
        self.digest_algorithms = tuple(dict.fromkeys([*self.expected_digests, *digest_algorithms]))
        bad = unsupported_digest(self.digest_algorithms, self.allowed_digests)
        if bad is not None:
            raise UnsupportedDigestValidationError(url, bad, refusal(bad, self.allowed_digests))
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.custom_file_object = custom_file_object
        if writer is None and custom_file_object is not None:
            writer = custom_file_object
        self.validators = tuple(validators)
        self.progress = progress
        self.temp_dir = temp_dir
        self.temp_files = temp_files
        self.writer = writer
        self.headers_ready_callback = headers_ready_callback
        self.max_retries = max_retries
        self.backoff: RetryDelays = backoff or DEFAULT_BACKOFF
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self._context = context
        self.headers: Any = None
        self.attempts = 0
        self._calculator = DigestCalculator(self.digest_algorithms)
        #: This attempt's temporary file (unbuffered: every chunk is one ``write``).
        self._fd: int | None = None
        self.path: str | None = None
        self._finalized = False
        self._handed_over = False
        self._headers_reported = False
        #: An `ITap` attached with `add_tap` (the streamer's), or None.
        self._tap: Any = None
        self._tap_got_headers = False

    # The two calls every subclass keeps -------------------------------------------------------

    def handle_data(self, data: bytes) -> _Done:
        """Count, hash and store one chunk; fail at once if it overflows the expected size.

        Repeated calls are equivalent to one call with the concatenated data. The work is done
        when this returns; the value returned may be awaited (``await self.handle_data(d)``).
        """
        calculator = self._calculator
        size = calculator.size + len(data)
        if self.expected_size is not None and size > self.expected_size:
            raise SizeValidationError(size, self.expected_size, url=self.url)
        tap = self._tap
        if tap is not None:
            # The tap first: a client waiting for these bytes (the streamer's) gets them
            # before they are hashed. Nothing is validated before `finalize`, by which time
            # every chunk was hashed.
            self._handed_over = True
            tap.write(data)
        calculator.update(data)
        if self.progress is not None:
            self.progress(calculator.size, self.expected_size)
        if tap is not None and self.writer is None:
            return DONE
        if self.writer is not None:
            self._handed_over = True
            self.writer.write(data)
            return DONE
        fd = self._fd if self._fd is not None else self._open_temp()
        try:
            written = os.write(fd, data)
            if written < len(data):  # a short write (signal, nearly full disk): go on
                view = memoryview(data)
                while written < len(view):
                    written += os.write(fd, view[written:])
        except OSError as exc:
            raise self._temp_file_error(exc) from exc
        return DONE

    def finalize(self) -> _Done | Awaitable[Any]:
        """Flush and close the temporary file (created empty for an empty body), then validate
        size, digests and the ``validators``. Called once per attempt after the last
        `handle_data`; a second call in the same attempt does nothing. Done when it returns;
        the value returned may be awaited."""
        if self._finalized:
            return DONE
        self._finalized = True
        if self.writer is None and self._tap is None:
            fd = self._fd if self._fd is not None else self._open_temp()
            self._fd = None
            try:
                os.close(fd)
            except OSError as exc:
                raise self._temp_file_error(exc) from exc
        elif self.custom_file_object is not None:
            flush = getattr(self.custom_file_object, "flush", None)
            if flush is not None:
                flush()
        self.validate()
        if self.custom_file_object is not None:
            name = getattr(self.custom_file_object, "name", None)
            self.path = name if isinstance(name, str) else None
        if self._tap is not None:
            self._tap.finalized()
        return DONE

    # Hooks for subclasses ----------------------------------------------------------------------

    def _run(self, extra_data: Any = None) -> object:
        """Do one attempt: fetch and pass every byte to `handle_data`. A Deferred that fires
        when complete, a coroutine (``async def _run``) or, for work already done, a value."""
        raise NotImplementedError

    def headers_ready(self, headers: Any) -> None:
        """Record the final response headers (Twisted ``Headers`` or a mapping); tell the tap
        and call the caller's callback (with `ResponseHeaders`) the first time. Protocols with
        headers call this before the first `handle_data`."""
        self.headers = headers
        if self._tap is not None and not self._tap_got_headers:
            self._tap_got_headers = True
            self._handed_over = True
            self._tap.headers_ready(headers)
        if self.headers_ready_callback is not None and not self._headers_reported:
            self._headers_reported = True
            if self.writer is not None:
                self._handed_over = True
            self.headers = headers = as_response_headers(headers)
            self.headers_ready_callback(headers)

    def add_tap(self, tap: Any) -> None:
        """Attach an `ITap`: it takes every chunk `handle_data` gets (instead of the temporary
        file), the headers `headers_ready` gets, and hears when `finalize` validated. Once it
        got anything, no retry follows. See `downloaders.tap.tap` for any downloader."""
        if self._tap is not None and self._tap is not tap:
            raise ValueError("this downloader already has a tap")
        self._tap = tap

    # Public entry points -------------------------------------------------------------------------

    @property
    def artifact_attributes(self) -> dict[str, Any]:
        """``size`` and one key per computed digest, for the bytes received so far."""
        return self._calculator.artifact_attributes()

    @property
    def context(self) -> Any:
        """The state shared by the downloads of one remote (`DownloadContext`: auth tokens,
        mirror lists, anything a plugin wants to resolve once); the factory's, or one of this
        downloader's own."""
        if self._context is None:
            from downloaders.context import DownloadContext

            self._context = DownloadContext()
        return self._context

    @context.setter
    def context(self, value: Any) -> None:
        self._context = value

    def validate_size(self) -> None:
        """Raise `SizeValidationError` if ``expected_size`` is set and not what arrived."""
        size = self._calculator.size
        if self.expected_size is not None and size != self.expected_size:
            raise SizeValidationError(size, self.expected_size, url=self.url)

    def validate_digests(self) -> None:
        """Raise `DigestValidationError` for the first ``expected_digests`` entry that differs
        from the digest of what arrived."""
        if not self.expected_digests:
            return
        actual = self._calculator.hexdigests()
        for algorithm, expected in self.expected_digests.items():
            if actual[algorithm] != expected:
                raise DigestValidationError(
                    actual[algorithm], expected, url=self.url, algorithm=algorithm
                )

    def validate(self) -> None:
        """Size, then digests, then each of the ``validators``; raise the first failure (a
        `ValidationError`)."""
        self.validate_size()
        self.validate_digests()
        for check in self.validators:
            self._run_validator(check)

    def _run_validator(self, check: Validator) -> None:
        name = getattr(check, "__name__", None) or type(check).__name__
        try:
            verdict = check(self)
        except ValidationError:
            raise
        except Exception as exc:
            raise ValidationError(
                url=self.url, message=f"validator {name} failed: {exc}", error_code="custom"
            ) from exc
        if verdict is False:
            raise ValidationError(
                url=self.url, message=f"validator {name} refused the download", error_code="custom"
            )

    def run(self, extra_data: Any = None) -> defer.Deferred[DownloadResult]:
        """Download with retries under the semaphore; fire with a `DownloadResult`.

        Cancelling the returned Deferred aborts the download and removes the temporary file.
        """
        semaphore = self.semaphore
        if semaphore is None:
            return _Attempts(self, extra_data).start()
        if (
            type(semaphore) is defer.DeferredSemaphore
            and semaphore.tokens
            and not semaphore.waiting
        ):
            # A free slot (the common case when the caller bounds concurrency itself): take it
            # now, without the acquire Deferred and maybeDeferred of ``semaphore.run``.
            semaphore.tokens -= 1
            done = _Attempts(self, extra_data).start()
            return done.addBoth(_release, semaphore)
        return semaphore.run(self._run_with_retries, extra_data)

    def fetch(self, extra_data: Any = None, timeout: float | None = None) -> DownloadResult:
        """Run the download from plain (non-reactor) code and wait for its result.

        The reactor is driven in a background thread (started on first use). Calling this
        from the reactor thread would deadlock, so it raises `RuntimeError` there instead.
        """
        return blocking(lambda: self.run(extra_data), timeout, self.url, "fetch()", "run()")

    # Internals ----------------------------------------------------------------------------------

    def _run_with_retries(self, extra_data: Any) -> defer.Deferred[DownloadResult]:
        return _Attempts(self, extra_data).start()

    def _should_retry(self, error: BaseException, attempt: int) -> bool:
        if not isinstance(error, DownloadError) or not error.retryable:
            return False
        if attempt >= self.max_retries:
            return False
        # Bytes or headers already handed to a caller's writer cannot be taken back.
        return self._can_start_over()

    def _can_start_over(self) -> bool:
        """Whether another attempt (or mirror) may follow: nothing was handed over, or only
        to a tap that takes it back (`ITap`'s optional ``restartable``/``restart``)."""
        if not self._handed_over:
            return True
        return self.writer is None and bool(getattr(self._tap, "restartable", False))

    def _start_attempt(self) -> None:
        """Fresh digests and a fresh file for every attempt (and a tap that got something
        takes it back: see `_can_start_over`)."""
        if self._calculator.size or self.attempts:  # the one from __init__ is still fresh
            self._calculator = DigestCalculator(self.digest_algorithms)
        if self._handed_over and self._tap is not None:
            self._tap.restart()
            self._handed_over = self._tap_got_headers = False
        self._fd = None
        self.path = None
        self._finalized = False

    def _open_temp(self) -> int:
        """Create this attempt's temporary file (mode 0600 less the umask), or take one from
        `temp_files`, whose files have that pool's mode (a sync's are readable, as stored)."""
        try:
            if self.temp_files is not None:
                self._fd, self.path = self.temp_files.take()
            else:
                self._fd, self.path = create_temp_file(self.temp_dir or os.getcwd())
        except OSError as exc:
            raise self._temp_file_error(exc) from exc
        return self._fd

    def _temp_file_error(self, exc: OSError) -> DownloadError:
        """A failure of our own temporary file (disk full, no such folder), with the url."""
        where = self.path or self.temp_dir or "the working folder"
        return DownloadError(self.url, f"cannot write the temporary file in {where}: {exc}")

    def _discard(self) -> None:
        """Stop hashing; close and remove this attempt's temporary file."""
        self._calculator.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None


def blocking(
    start: Callable[[], defer.Deferred[Any]],
    timeout: float | None = None,
    url: str = "",
    what: str = "fetch()",
    instead: str = "run()",
) -> Any:
    """Call *start* in the reactor thread (started in the background on first use) and wait
    for its Deferred: plain code's way into the downloads. After *timeout* seconds the work
    is cancelled and `DownloadTimeout` raised. From the reactor thread itself this would
    deadlock: a `RuntimeError` naming *instead* says what to use there."""
    from twisted.internet import reactor as installed
    from twisted.internet.base import ReactorBase
    from twisted.internet.threads import blockingCallFromThread

    reactor = cast(ReactorBase, installed)  # (typed as less than it is)
    if threadable.isInIOThread() and reactor.running:
        raise RuntimeError(
            f"{what} blocks until the downloads end and cannot be called from the reactor "
            f"thread; use {instead}, which returns a Deferred"
        )
    _ensure_reactor_thread(reactor)
    if timeout is None:
        return blockingCallFromThread(reactor, start)

    def timed_out(result: Any, seconds: float) -> None:
        raise DownloadTimeout(url, "fetch", seconds)

    def start_with_timeout() -> defer.Deferred[Any]:
        return start().addTimeout(timeout, reactor, timed_out)

    return blockingCallFromThread(reactor, start_with_timeout)


def fetch_all(
    downloaders: Iterable[Any], timeout: float | None = None, extra_data: Any = None
) -> list[Any]:
    """Run many downloaders at once from plain code (as `BaseDownloader.fetch` runs one) and
    wait for all of them: a list, in their order, of each one's `DownloadResult` or of the
    exception that ended it (one failure does not stop the others). Their semaphore (the
    factory's) bounds how many run at the same time."""
    downloaders = list(downloaders)

    def start() -> defer.Deferred[list[Any]]:
        runs = [defer.maybeDeferred(d.run, extra_data) for d in downloaders]
        gathered = defer.DeferredList(runs, consumeErrors=True)
        return gathered.addCallback(lambda outcomes: [r if ok else r.value for ok, r in outcomes])

    url = getattr(downloaders[0], "url", "") if downloaders else ""
    return blocking(start, timeout, url, "fetch_all()", "defer.DeferredList of run()")


#: The backoff of a downloader given none (frozen: one serves them all).
DEFAULT_BACKOFF = Backoff()


def _release(result: Any, semaphore: defer.DeferredSemaphore) -> Any:
    semaphore.release()
    return result


class _Attempts:
    """The attempts of one `BaseDownloader.run`, on plain callbacks.

    Each attempt gets a fresh file and digests; a retryable failure waits for the backoff and
    tries again. ``done`` fires with the `DownloadResult` or the last failure; cancelling it
    cancels the attempt or the backoff under way (which removes the temporary file).
    """

    def __init__(self, downloader: BaseDownloader, extra_data: Any) -> None:
        self.downloader = downloader
        self.extra_data = extra_data
        self.attempt = 0
        self.cancelled = False
        #: The attempt's Deferred, or the backoff's, while one is under way.
        self.current: defer.Deferred[Any] | None = None
        self.done: defer.Deferred[DownloadResult] = defer.Deferred(self._cancel)

    def start(self) -> defer.Deferred[DownloadResult]:
        self._next()
        return self.done

    def _next(self, _: Any = None) -> None:
        self.current = None
        dl = self.downloader
        dl._start_attempt()
        dl.attempts = self.attempt + 1
        try:
            result = dl._run(self.extra_data)
            # ``async def _run``, or `finalize()`'s DONE (a Deferred is taken as it is)
            if not isinstance(result, defer.Deferred) and inspect.isawaitable(result):
                result = as_deferred(result)
        except BaseException:
            self._failed(Failure())
            return
        if isinstance(result, defer.Deferred):
            self.current = result
            result.addCallbacks(self._ran, self._failed)
        else:
            self._ran(result)

    def _ran(self, result: Any) -> None:
        self.current = None
        dl = self.downloader
        try:
            finishing = dl.finalize()
        except BaseException:
            self._failed(Failure())
            return
        if finishing is not DONE and inspect.isawaitable(finishing):
            # an ``async def finalize`` of a subclass
            self.current = as_deferred(finishing)
            self.current.addCallbacks(lambda _: self._succeed(result), self._failed)
            return
        self._succeed(result)

    def _succeed(self, result: Any) -> None:
        self.current = None
        dl = self.downloader
        if not isinstance(result, DownloadResult):  # a Pulp-style `_run` may build its own
            result = DownloadResult(dl.url, dl.artifact_attributes, dl.path, dl.headers)
        self.done.callback(result)

    def _failed(self, failure: Failure) -> None:
        self.current = None
        dl = self.downloader
        dl._discard()
        if self.done.called:
            return
        error = failure.value
        assert error is not None  # a Failure always holds its exception
        if self.cancelled or not dl._should_retry(error, self.attempt):
            self.done.errback(failure)
            return
        delay = dl.backoff.delay(self.attempt, getattr(error, "retry_after", None))
        if delay is None:  # the backoff says: not this origin, not now
            self.done.errback(failure)
            return
        self.attempt += 1
        self.current = task.deferLater(dl.reactor, delay, lambda: None)
        self.current.addCallbacks(self._next, self._backoff_cancelled)

    def _backoff_cancelled(self, failure: Failure) -> None:
        self.current = None
        if not self.done.called:
            self.done.errback(failure)

    def _cancel(self, _: defer.Deferred[DownloadResult]) -> None:
        """Canceller of ``done``: stop what is under way (``done`` then fails with
        CancelledError, unless that stop fails it first)."""
        self.cancelled = True
        current, self.current = self.current, None
        if current is not None:
            current.cancel()


def credentials(value: Any, name: str = "auth") -> tuple[str, str] | None:
    """``(user, password)`` from a pair, or from an object with ``login`` and ``password`` (as
    ``aiohttp.BasicAuth``); None for None. A TypeError naming *name* otherwise."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return str(value[0]), str(value[1])
    login = getattr(value, "login", None)
    if login is not None:
        return str(login), str(getattr(value, "password", "") or "")
    raise TypeError(f"{name} must be a (user, password) pair, not {type(value).__name__}")


_reactor_thread_lock = threading.Lock()


def _ensure_reactor_thread(reactor: Any) -> None:
    """Start the global reactor in a daemon thread unless it already runs."""
    with _reactor_thread_lock:
        if reactor.running:
            return
        started = threading.Event()
        reactor.callWhenRunning(started.set)

        def run() -> None:
            try:
                reactor.run(installSignalHandlers=False)
            except ReactorNotRestartable:
                pass  # reported by the caller below

        thread = threading.Thread(
            target=run,
            name="downloaders-reactor",
            daemon=True,
        )
        thread.start()
        while not started.wait(0.05):
            if not thread.is_alive():
                raise RuntimeError(
                    "fetch() needs the reactor, but it has already run and stopped (a Twisted "
                    "reactor cannot be restarted); use run() inside the reactor instead"
                )
