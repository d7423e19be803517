"""The value a successful download fires with."""

from __future__ import annotations

import os
from typing import Any

import attrs
from twisted.web.http import stringToDatetime


@attrs.frozen
class DownloadResult:
    """What was downloaded: the url, ``size`` + digests, where the bytes are, response headers.

    ``path`` is None when the bytes went to a caller-supplied writer instead of a file.
    ``headers`` are the final response's ``twisted.web.http_headers.Headers`` (None for file://).
    """

    url: str
    artifact_attributes: dict[str, Any]
    path: str | None
    headers: Any = None

    @property
    def last_modified(self) -> float | None:
        """The response's ``Last-Modified`` as a POSIX time; None when absent or invalid."""
        values = self.headers.getRawHeaders(b"last-modified") if self.headers is not None else None
        if not values:
            return None
        try:
            return float(stringToDatetime(values[0].strip()))
        except (ValueError, IndexError, TypeError, OverflowError):
            return None


def keep_upstream_date(path: str, result: Any) -> None:
    """Give the file at *path* the upstream's ``Last-Modified`` as its modification time, so
    a stored copy answers with the date the upstream published (mirrors comparing dates then
    fetch nothing twice). Without a usable date the file keeps its own."""
    when = getattr(result, "last_modified", None)
    if when is not None:
        try:
            os.utime(path, (when, when))
        except OSError:
            pass  # the date is a courtesy; the bytes are what matter
