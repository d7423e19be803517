"""Origins that asked us to come back later (``Retry-After`` on a 429 or 5xx).

A server that answers ``429 Too Many Requests`` or ``503 Service Unavailable`` with a
``Retry-After`` speaks for the whole origin (RFC 9110 section 10.2.3), so no request of ours
goes back to that origin (scheme, host and port) before the time it named: a live request
fails over to the next entry at once, and waits only when no other entry is left (see
`streamer.lazy`). `BusyOrigins` remembers those times.
"""

from __future__ import annotations

import attrs

from downloaders.errors import HttpError
from downloaders.urls import origin

__all__ = ["MAX_BUSY", "BusyOrigins", "busy_seconds", "origin_of"]

#: The longest an origin is left alone for one ``Retry-After`` (seconds): a server asking for
#: a day, by mistake or on one path, must not take every path of it offline that long.
MAX_BUSY = 3600.0

#: Expired entries are dropped when this many origins are remembered.
_PRUNE_AT = 1000

#: A wait that ends this close to the named time has waited long enough (timer rounding).
_SLACK = 1e-3


def busy_seconds(error: BaseException) -> float | None:
    """The ``Retry-After`` seconds of a retryable HTTP error (429, 5xx), else None."""
    if isinstance(error, HttpError) and error.retryable and error.retry_after is not None:
        return min(max(0.0, error.retry_after), MAX_BUSY)
    return None


def origin_of(url: str) -> str:
    """``scheme://host:port`` of *url* (no credentials, no path), lower-case: the key of
    `downloaders.urls.origin` as text."""
    scheme, host, port = origin(url)
    return f"{scheme}://{host}:{port}"


@attrs.frozen
class _Busy:
    until: float
    error: BaseException


@attrs.define
class BusyOrigins:
    """Origin -> until when it is left alone, and the answer that said so."""

    _origins: dict[str, _Busy] = attrs.field(factory=dict)

    def record(self, url: str, error: BaseException, now: float) -> bool:
        """Remember *error*'s ``Retry-After`` for *url*'s origin; False if it has none (or
        one already over: a source still failing after "now" gets the usual cooldown)."""
        seconds = busy_seconds(error)
        if seconds is None or seconds <= _SLACK:
            return False
        if len(self._origins) >= _PRUNE_AT:
            self._origins = {o: b for o, b in self._origins.items() if b.until > now}
        origin = origin_of(url)
        known = self._origins.get(origin)
        if known is None or known.until < now + seconds:
            self._origins[origin] = _Busy(now + seconds, error)
        return True

    def error(self, url: str, now: float) -> BaseException | None:
        """The answer that made *url*'s origin busy, while it is."""
        if not self._origins:  # nearly always: no url to parse
            return None
        busy = self._origins.get(origin_of(url))
        return busy.error if busy is not None and busy.until - now > _SLACK else None

    def left(self, url: str, now: float) -> float | None:
        """Seconds until *url*'s origin may be asked again; None if it is not busy."""
        if not self._origins:
            return None
        busy = self._origins.get(origin_of(url))
        if busy is None or busy.until - now <= _SLACK:
            return None
        return busy.until - now
