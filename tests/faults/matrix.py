"""The fault table shared by the downloader and streamer fault tests (and the issue note).

Each `Fault` names a behaviour of the fault-injecting upstream, the connection settings it is
fetched with (short timeouts, few retries) and two documented outcomes:

* ``sync``: what a downloader does (`Sync`): succeed with ``body`` after ``requests``
  upstream requests, or fail with ``error`` whose text holds ``message``.
* ``lazy``: what a client of the streamer sees (`Lazy`): ``200`` with the whole body
  (``"ok"``), a response cut off after some bytes (``"aborted"``: headers and a strict prefix
  of the body, then a reset, so curl exits non-zero), or a plain ``502``/``504`` before
  the first byte.

The streamer hands its downloads a writer (the client's response), so once the upstream's
headers arrived nothing is retried: a fault there ends that download, while faults before the
headers (statuses, resets, TLS) are retried like in a sync.
"""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import time
from collections.abc import Callable
from typing import Any

import attrs

from downloaders import (
    ConnectionFailed,
    DigestValidationError,
    DownloadError,
    DownloadTimeout,
    HttpError,
    NotFound,
    NotModified,
    SizeValidationError,
    TooManyRedirects,
    TruncatedBody,
)
from tests.support import faults

__all__ = ["BODY", "FAULTS", "Fault", "Lazy", "RecordingBackoff", "Sync", "sha256"]

BODY = bytes(range(256)) * 256  # 64 KiB, every byte value
#: Chunked faults write their whole body at once; above the transport's 64 KiB buffer the
#: fault server's close would wait for a paused producer, so these stay small.
SMALL = BODY[:16384]
PAYLOAD = b"a text file, compressed on the upstream\n" * 500
GZ_BODY = gzip.compress(PAYLOAD, mtime=0)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RecordingBackoff:
    """A backoff recording what the downloader asked for (attempt, Retry-After seconds) and
    answering a tiny delay, so retries are exercised without real waits."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float | None]] = []

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        self.calls.append((attempt, retry_after))
        return 0.01

    @property
    def retry_afters(self) -> list[float | None]:
        return [retry_after for _, retry_after in self.calls]


def in_seconds(seconds: int) -> str:
    """An HTTP-date ``seconds`` from now (for Retry-After)."""
    return email.utils.formatdate(time.time() + seconds, usegmt=True)


RetryAfterCheck = list[float | None] | Callable[[list[float | None]], bool] | None


def about(seconds: float) -> Callable[[list[float | None]], bool]:
    """Retry-After values all within 3 s below ``seconds`` (an HTTP-date, read a bit later)."""

    def check(values: list[float | None]) -> bool:
        return bool(values) and all(v is not None and seconds - 3 <= v <= seconds for v in values)

    return check


@attrs.frozen
class Sync:
    """A downloader's documented outcome: ``error`` None means success."""

    error: type[Exception] | None = None
    message: str = ""
    requests: int = 1

    def describe(self) -> str:
        what = "succeeds" if self.error is None else f"{self.error.__name__}: {self.message}"
        return f"{what} ({self.requests} request{'s' if self.requests != 1 else ''})"


@attrs.frozen
class Lazy:
    """A streamer client's documented outcome: ``"ok"``, ``"aborted"``, or a plain ``404``,
    ``502``, ``503`` or ``504`` before the first byte; ``retry_after`` checks the seconds of
    the ``Retry-After`` a 503 carries."""

    outcome: str | int
    requests: int = 1
    retry_after: Callable[[int], bool] | None = None

    def describe(self) -> str:
        what = {
            "ok": "200, whole body, stored",
            "aborted": "200 then connection aborted before the last byte, nothing stored",
        }.get(self.outcome, f"{self.outcome} before any body byte, nothing stored")
        return f"{what} ({self.requests} request{'s' if self.requests != 1 else ''})"


@attrs.frozen
class Fault:
    id: str
    behaviour: Callable[[], faults.Behaviour]
    sync: Sync
    lazy: Lazy
    #: Connection settings of the remote (and downloader options); max_retries 3 if absent.
    options: dict[str, Any] = attrs.field(factory=dict)
    body: bytes = BODY
    #: Name of a `tests.support.certs.Certs` server identity to serve HTTPS with.
    tls: str | None = None
    retry_after: RetryAfterCheck = None

    @property
    def settings(self) -> dict[str, Any]:
        return {"max_retries": 3, **self.options}


RETRY_ONCE = {"max_retries": 1}
TIMEOUTS = {"max_retries": 1, "sock_read_timeout": 0.2}
TRUNCATED = "body truncated after"

FAULTS = [
    # --- broken bodies: a sync retries; the streamer already sent bytes and aborts ----------
    Fault(
        "reset-after-n-bytes-once",
        lambda: faults.Steps([faults.ResetAfter(4096, BODY), faults.Serve(BODY)]),
        Sync(requests=2),
        Lazy("aborted"),
    ),
    Fault(
        "reset-after-n-bytes-always",
        lambda: faults.ResetAfter(4096, BODY),
        Sync(TruncatedBody, f"{TRUNCATED} 4096 of {len(BODY)} bytes", 2),
        Lazy("aborted"),
        RETRY_ONCE,
    ),
    Fault(
        "reset-before-headers-once",
        lambda: faults.Steps([faults.ResetBeforeHeaders(), faults.Serve(BODY)]),
        Sync(requests=2),
        Lazy("ok", 2),
    ),
    Fault(
        "reset-before-headers-always",
        lambda: faults.ResetBeforeHeaders(),
        Sync(ConnectionFailed, "no complete response", 2),
        Lazy(502, 2),
        RETRY_ONCE,
    ),
    Fault(
        "close-early-under-content-length-once",
        lambda: faults.Steps([faults.CloseEarly(1000, BODY), faults.Serve(BODY)]),
        Sync(requests=2),
        Lazy("aborted"),
    ),
    Fault(
        "close-early-under-content-length-always",
        lambda: faults.CloseEarly(1000, BODY),
        Sync(TruncatedBody, f"{TRUNCATED} 1000 of {len(BODY)} bytes", 2),
        Lazy("aborted"),
        RETRY_ONCE,
    ),
    Fault(
        "chunked-without-last-chunk-once",
        lambda: faults.Steps([faults.ChunkedNoLastChunk(SMALL, 4096), faults.Serve(SMALL)]),
        Sync(requests=2),
        Lazy("aborted"),
        body=SMALL,
    ),
    Fault(
        "chunked-without-last-chunk-always",
        lambda: faults.ChunkedNoLastChunk(SMALL, 4096),
        Sync(TruncatedBody, TRUNCATED, 2),
        Lazy("aborted"),
        RETRY_ONCE,
        body=SMALL,
    ),
    # --- wrong bytes: a validation error, never retried (the same bytes would come back) -----
    Fault(
        "wrong-bytes-too-many",
        lambda: faults.WrongSize(BODY, extra=100),
        Sync(SizeValidationError, f"size mismatch: expected {len(BODY)} bytes, got"),
        # The upstream's Content-Length already differs from the catalog size: refused
        # before any byte, so the request could fail over.
        Lazy(502),
    ),
    Fault(
        "wrong-bytes-too-few",
        lambda: faults.WrongSize(BODY, extra=-100),
        Sync(
            SizeValidationError,
            f"size mismatch: expected {len(BODY)} bytes, got {len(BODY) - 100}",
        ),
        Lazy(502),
    ),
    Fault(
        "right-size-wrong-content",
        lambda: faults.WrongBytes(BODY),
        Sync(
            DigestValidationError,
            f"sha256 mismatch: expected {sha256(BODY)}, "
            f"got {sha256(faults.WrongBytes(BODY).served)}",
        ),
        Lazy("aborted"),
    ),
    # --- slow and stalled: timeouts; 504 when no byte came, else an abort ---------------------
    Fault(
        "stall-after-headers",
        lambda: faults.StallAfterHeaders(BODY),
        Sync(DownloadTimeout, "read timeout after 0.2s", 2),
        Lazy(504),
        TIMEOUTS,
    ),
    Fault(
        "stall-mid-body",
        lambda: faults.StallMidBody(8192, BODY),
        Sync(DownloadTimeout, "read timeout after 0.2s", 2),
        Lazy("aborted"),
        TIMEOUTS,
    ),
    Fault(
        "trickle-1-byte-per-second",
        lambda: faults.Trickle(BODY, 1),
        Sync(DownloadTimeout, "read timeout after 0.2s", 2),
        Lazy(504),
        TIMEOUTS,
    ),
    Fault(
        "trickle-under-total-timeout",
        lambda: faults.Trickle(BODY, 40, interval=0.05),
        Sync(DownloadTimeout, "total timeout after 0.4s", 2),
        Lazy("aborted"),
        {**TIMEOUTS, "total_timeout": 0.4},
    ),
    # --- busy servers: 429/503, with and without Retry-After, then success -------------------
    # A live request never asks an origin again before its Retry-After: beyond the remote's
    # sock_read_timeout (5 s here) the client gets our own 503 and Retry-After at once.
    Fault(
        "429-retry-after-seconds-then-ok",
        lambda: faults.StatusThenServe(429, 2, faults.Serve(BODY), retry_after=7),
        Sync(requests=3),
        Lazy(503, 1, retry_after=lambda seconds: seconds == 7),
        {"sock_read_timeout": 5},
        retry_after=[7.0, 7.0],
    ),
    Fault(
        "429-without-retry-after-then-ok",
        lambda: faults.StatusThenServe(429, 2, faults.Serve(BODY)),
        Sync(requests=3),
        Lazy("ok", 3),
        retry_after=[None, None],
    ),
    Fault(
        "503-retry-after-http-date-then-ok",
        lambda: faults.StatusThenServe(503, 1, faults.Serve(BODY), retry_after=in_seconds(30)),
        Sync(requests=2),
        Lazy(503, 1, retry_after=lambda seconds: 27 <= seconds <= 30),
        {"sock_read_timeout": 5},
        retry_after=about(30),
    ),
    Fault(
        "503-without-retry-after-then-ok",
        lambda: faults.StatusThenServe(503, 2, faults.Serve(BODY)),
        Sync(requests=3),
        Lazy("ok", 3),
        retry_after=[None, None],
    ),
    Fault(
        "500-forever",
        lambda: faults.Status(500),
        Sync(HttpError, "HTTP 500", 3),
        Lazy(502, 3),
        {"max_retries": 2},
    ),
    # --- error statuses whose body is chunked or close-delimited (no Content-Length): the
    # status decides at once; the body is read (up to 64 KiB) and dropped, never a timeout ----
    *(
        Fault(
            f"{code}-{framing}-error-body",
            lambda code=code, framing=framing: faults.Status(code, framing=framing),
            Sync(NotFound, "HTTP 404", 1) if code == 404 else Sync(HttpError, f"HTTP {code}", 2),
            Lazy(404, 1) if code == 404 else Lazy(502, 2),
            RETRY_ONCE,
        )
        for code in (404, 500, 503)
        for framing in ("chunked", "close")
    ),
    # --- 304 to a request that carried no condition: no answer at all ------------------------
    Fault(
        "304-to-an-unconditional-request",
        lambda: faults.Status(304),
        Sync(NotModified, "HTTP 304"),
        Lazy(502),
    ),
    # --- redirects: followed, but loops and non-HTTP targets refused ---------------------------
    Fault(
        "redirect-loop",
        lambda: faults.RedirectLoop(),
        Sync(TooManyRedirects, "more than 10 redirects", 11),
        Lazy(502, 11),
        {"max_retries": 0},
    ),
    Fault(
        "redirect-to-file-url",
        lambda: faults.RedirectTo("file:///etc/passwd"),
        Sync(DownloadError, "redirect to a non-HTTP url refused: file:///etc/passwd"),
        Lazy(502),
    ),
    # --- protocol abuse ----------------------------------------------------------------------
    Fault(
        "huge-headers",
        lambda: faults.HugeHeaders(64 * 1024, BODY),
        Sync(ConnectionFailed, "no complete response", 2),
        Lazy(502, 2),
        RETRY_ONCE,
    ),
    Fault(
        "gzip-content-encoding-on-gz",
        lambda: faults.Gzip(GZ_BODY),
        Sync(),
        Lazy("ok"),
        body=GZ_BODY,
    ),
    # --- TLS: a certificate the client must refuse; never retried -----------------------------
    Fault(
        "tls-untrusted-certificate",
        lambda: faults.Serve(BODY),
        Sync(ConnectionFailed, "TLS handshake failed", 0),
        Lazy(502, 0),
        tls="untrusted",
    ),
    Fault(
        "tls-wrong-host-certificate",
        lambda: faults.Serve(BODY),
        Sync(ConnectionFailed, "TLS handshake failed", 0),
        Lazy(502, 0),
        tls="wrong_host",
    ),
    Fault(
        "tls-expired-certificate",
        lambda: faults.Serve(BODY),
        Sync(ConnectionFailed, "TLS handshake failed", 0),
        Lazy(502, 0),
        tls="expired",
    ),
]


def fault_ids(fault: Fault) -> str:
    return fault.id
