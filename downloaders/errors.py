"""The errors a download can end with: one base class, and the facts a caller acts on."""

from __future__ import annotations

from typing import Any

from downloaders.urls import redact_url


def describe_error(error: BaseException) -> str:
    """One line for a log or a report on why a download failed: a DownloadError's ``message``
    (urls redacted), else the exception's class and text; never a traceback."""
    if isinstance(error, DownloadError):
        return error.message
    return f"{error.__class__.__name__}: {error}" if str(error) else error.__class__.__name__


class DownloadError(Exception):
    """Base of every download failure.

    ``url`` is the url asked for, redacted (`downloaders.urls.redact_url`: no userinfo, no
    query); ``message`` says what happened, for logs (urls in it are redacted too);
    ``summary`` says what failed in a few words that never name a url, host or address, so
    it may be shown to anyone (the streamer's error bodies say only this).
    """

    #: Whether trying the same url again may succeed (connection errors, 429, 5xx, timeouts).
    retryable: bool = False
    #: What failed, for clients: a fixed phrase per kind of failure (see the class docstring).
    summary: str = "download failed"

    def __init__(self, url: str, message: str = "", summary: str | None = None) -> None:
        url = redact_url(url)
        self.url = url
        self.message = message or self.__class__.__name__
        if summary is not None:
            self.summary = summary
        super().__init__(f"{self.message} ({url})" if url else self.message)


class HttpError(DownloadError):
    """The server answered with a status >= 400."""

    def __init__(
        self,
        url: str,
        status: int,
        reason: str = "",
        headers: Any = None,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        #: Seconds the server asked us to wait (Retry-After), if it said so.
        self.retry_after = retry_after
        self.retryable = status == 429 or status in (500, 502, 503, 504)
        text = f"HTTP {status}" + (f" {reason}" if reason else "")
        # The reason phrase is the server's own text: logged, never passed on.
        super().__init__(url, text, f"HTTP {status}")


class NotFound(HttpError):
    """The server answered 404."""


class NotAuthorized(HttpError):
    """The server answered 401 or 403."""


class NotModified(HttpError):
    """The server answered 304 to a conditional request (an ``If-Modified-Since`` or
    ``If-None-Match`` the caller added to the request headers): the caller's copy is current,
    and no body was downloaded. Never retried."""


def http_error(
    url: str,
    status: int,
    reason: str = "",
    headers: Any = None,
    retry_after: float | None = None,
) -> HttpError:
    """Build the most specific `HttpError` for a status."""
    cls: type[HttpError] = HttpError
    if status == 304:
        cls = NotModified
    elif status == 404:
        cls = NotFound
    elif status in (401, 403):
        cls = NotAuthorized
    return cls(url, status, reason, headers, retry_after)


class FileNotFound(NotFound):
    """A file:// url whose file does not exist (a `NotFound`, like an HTTP 404)."""

    def __init__(self, url: str, path: str) -> None:
        self.path = path
        DownloadError.__init__(self, url, f"no such file: {path}", "no such file")
        self.status = 404
        self.reason = "Not Found"
        self.headers = None
        self.retry_after = None
        self.retryable = False


class ConnectionFailed(DownloadError):
    """The connection could not be made, or broke before the body was complete."""

    retryable = True
    summary = "connection failed"


class TruncatedBody(ConnectionFailed):
    """The body ended before its Content-Length, or a chunked body lacked its last chunk."""

    summary = "truncated body"


class DownloadTimeout(DownloadError):
    """No connection, no byte, or no end within the configured time."""

    retryable = True

    def __init__(self, url: str, kind: str, seconds: float) -> None:
        self.kind = kind
        self.seconds = seconds
        text = f"{kind} timeout after {seconds:g}s"
        super().__init__(url, text, text)


class ValidationError(DownloadError):
    """The bytes received are not the bytes expected (or a custom validation refused them).

    Called as in Pulp, ``ValidationError(error_code)``, or as every `DownloadError`,
    ``ValidationError(url, message)``; ``url=``, ``message=`` and ``error_code=`` may be given
    by keyword. ``error_code`` is a short stable name of the failure (``"digest"``,
    ``"size"``, ...), fit for comparisons; the message says what happened in words.
    """

    #: The default code of the class; an instance may carry another.
    error_code: str = "validation"

    def __init__(
        self,
        *args: str,
        url: str | None = None,
        message: str | None = None,
        error_code: str | None = None,
    ) -> None:
        if len(args) >= 2:  # DownloadError's order: (url, message)
            url, message = args[0], args[1]
        elif len(args) == 1:
            if url is None and "://" in args[0]:
                url = args[0]
            elif error_code is None:
                error_code = args[0]
            else:
                message = args[0]
        if error_code is not None:
            self.error_code = error_code
        message = message or self.error_code
        # What was wrong with the bytes (sizes, digests, a validator's verdict) names no url
        # or host: it is the summary too.
        super().__init__(url or "", message, message)


class DigestValidationError(ValidationError):
    """A digest of the received bytes differs from the expected one.

    ``DigestValidationError(actual, expected, url=..., algorithm=...)`` as in Pulp; the older
    ``DigestValidationError(url, algorithm, expected, actual)`` still works.
    """

    error_code = "digest"

    def __init__(self, *args: str, url: str | None = None, algorithm: str = "") -> None:
        if len(args) == 4:
            url, algorithm, expected, actual = args
        elif len(args) == 2:
            actual, expected = args
        else:
            raise TypeError("DigestValidationError(actual, expected, url=..., algorithm=...)")
        self.algorithm = algorithm
        self.expected = expected
        self.actual = actual
        name = f"{algorithm} " if algorithm else "digest "
        super().__init__(url=url, message=f"{name}mismatch: expected {expected}, got {actual}")


class SizeValidationError(ValidationError):
    """The number of bytes received differs from the expected size.

    ``SizeValidationError(actual, expected, url=...)`` as in Pulp; the older
    ``SizeValidationError(url, expected, actual)`` still works.
    """

    error_code = "size"

    def __init__(self, *args: Any, url: str | None = None) -> None:
        if len(args) == 3:
            url, expected, actual = args
        elif len(args) == 2:
            actual, expected = args
        else:
            raise TypeError("SizeValidationError(actual, expected, url=...)")
        self.expected = expected
        self.actual = actual
        super().__init__(url=url, message=f"size mismatch: expected {expected} bytes, got {actual}")


class UnsupportedDigestValidationError(ValidationError):
    """An expected digest names an algorithm we do not compute, or one not allowed (md5 and
    sha1 unless ``allowed_digests`` lists them)."""

    error_code = "unsupported-digest"

    def __init__(self, url: str, algorithm: str, reason: str = "") -> None:
        self.algorithm = algorithm
        message = reason or f"unsupported or untrusted digest algorithm {algorithm!r}"
        super().__init__(url=url, message=message)


class ForbiddenPath(ValidationError):
    """A file:// url outside the allowed import paths: a `ValidationError`, as Pulp's
    FileDownloader documents for a url not under ``ALLOWED_IMPORT_PATHS``."""

    error_code = "forbidden-path"
    summary = "path not allowed"

    def __init__(self, url: str, message: str) -> None:
        # The message names a local path: logged, never shown (the summary is).
        DownloadError.__init__(self, url, message)


class TooManyRedirects(DownloadError):
    """A redirect chain longer than the limit, or a loop."""

    summary = "too many redirects"


class RedirectRefused(DownloadError):
    """A redirect this download may not follow: no Location, not HTTP(S), or (see
    `downloaders.addresses`) to a loopback, link-local or private address."""

    summary = "redirect refused"


class ProxyError(DownloadError):
    """The proxy refused the request (for example 407 Proxy Authentication Required)."""

    summary = "proxy refused the request"
