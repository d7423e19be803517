"""The value a successful download fires with."""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import attrs
from twisted.web.http import stringToDatetime

from downloaders.headers import ResponseHeaders, as_response_headers, header_value


@attrs.frozen
class DownloadResult:
    """What was downloaded: the url, ``size`` + digests, where the bytes are, response headers.

    ``path`` is None when the bytes went to a caller-supplied writer instead of a file.
    ``headers`` are the final response's headers, a dict of ``name -> value`` looked up
    case-insensitively (`downloaders.headers.ResponseHeaders`; None for file://).
    """

    url: str
    artifact_attributes: dict[str, Any]
    path: str | None
    #: As given (Twisted ``Headers`` from the built-in downloaders): turned into
    #: `ResponseHeaders` on first use of ``headers``, which most downloads never make.
    _headers: Any = attrs.field(default=None, alias="headers")

    @property
    def headers(self) -> Any:
        """The response headers as a case-insensitive dict of str (None for file://)."""
        headers = self._headers
        if headers is None or isinstance(headers, ResponseHeaders):
            return headers
        converted = as_response_headers(headers)
        object.__setattr__(self, "_headers", converted)
        return converted

    @property
    def last_modified(self) -> float | None:
        """The response's ``Last-Modified`` as a POSIX time, never later than now (a date in
        the future is taken as now, RFC 9110 section 8.8.2.1); None when absent or invalid."""
        value = header_value(self._headers, "last-modified")
        if not value:
            return None
        return parse_last_modified(value.encode("latin-1"))


def parse_last_modified(value: bytes, now: float | None = None) -> float | None:
    """A ``Last-Modified`` value as a POSIX time, clamped to *now* (default: the current time)
    because an origin's date in the future is its clock's error, not a fact (RFC 9110 section
    8.8.2.1); None when it is not a valid HTTP-date."""
    when = _http_date(value.strip())
    if when is None:
        return None
    return min(when, time.time() if now is None else now)


@functools.lru_cache(maxsize=64)
def _http_date(value: bytes) -> float | None:
    """An HTTP-date as a POSIX time, None if invalid; remembered, since the files of one
    upstream often share a few dates (a sync parses one per file)."""
    try:
        return float(stringToDatetime(value))
    except (ValueError, IndexError, TypeError, OverflowError):
        return None


def keep_upstream_date(path: str, result: Any) -> None:
    """Give the file at *path* the upstream's ``Last-Modified`` as its modification time, so
    a stored copy answers with the date the upstream published (mirrors comparing dates then
    fetch nothing twice). Without a usable date the file keeps its own."""
    keep_date(path, getattr(result, "last_modified", None))


def keep_date(path: str, when: float | None) -> None:
    """Set the modification time of the file at *path* to *when* (None: leave it)."""
    if when is not None:
        try:
            os.utime(path, (when, when))
        except OSError:
            pass  # the date is a courtesy; the bytes are what matter
