"""Which upstream response headers a lazy response forwards to its client.

Only end-to-end *representation* headers are forwarded (`FORWARDED`): the ones that describe
the bytes, so that a cold (streamed) answer and a warm (stored) one look alike. Everything
else is dropped: hop-by-hop headers (RFC 9110 section 7.6.1, plus any name listed in the
upstream's ``Connection`` header), ``Set-Cookie`` (upstream state the client must not keep),
framing we set ourselves (``Content-Length``, ``Accept-Ranges``, ``Content-Range``), the
upstream's ``ETag`` (our validator is the artifact's sha256, the same before and after the
artifact is stored, so a client revalidating a cold answer gets a 304 from the stored copy;
the upstream's tag would mean nothing to us), and headers about the upstream server
(``Server``, ``Date``, ``Alt-Svc``, ...).

``Content-Type`` and ``Content-Encoding`` are not forwarded either: the artifact is the
published bytes (its sha256 is theirs), so a ``.gz`` labelled ``Content-Encoding: gzip`` by a
misconfigured upstream is still the ``.gz`` file, and a client decoding it cold would save
something else than it saves warm. Cold and warm answers both take their type from the path's
extension. ``Last-Modified`` is forwarded and kept as the stored file's modification time, so
the warm answer carries the same date; a date in the future is sent as now (RFC 9110 section
8.8.2.1: a clock error of the origin must not make caches think the copy is newer than it is),
and so is one that is not a date we can keep (invalid, or before 1970).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from twisted.web.http import datetimeToString

from downloaders.headers import as_twisted_headers
from downloaders.result import parse_last_modified

__all__ = ["FORWARDED", "HOP_BY_HOP", "forwarded_headers"]

#: Hop-by-hop headers: they describe one connection and never pass a proxy.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: End-to-end headers describing the representation, forwarded when present and non-empty.
FORWARDED = (
    b"content-language",
    b"content-disposition",
    b"last-modified",
    b"cache-control",
    b"expires",
)


def _connection_tokens(values: Iterable[bytes]) -> set[bytes]:
    tokens = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def forwarded_headers(headers: Any, now: float | None = None) -> list[tuple[bytes, list[bytes]]]:
    """``[(lower-case name, [values])]`` of *headers* (a twisted ``Headers``) to forward.

    Hop-by-hop names (fixed or listed in ``Connection``), names starting with ``proxy-``,
    ``Set-Cookie`` and anything not in `FORWARDED` are dropped; empty values are dropped. A
    ``Last-Modified`` later than *now* (default: the current time) becomes *now*.
    """
    headers = as_twisted_headers(headers)
    if headers is None:
        return []
    # One pass over the fields (a response has a few), not a lookup per forwarded name.
    fields = {name.lower(): values for name, values in headers.getAllRawHeaders()}
    connection = fields.get(b"connection")
    dropped = HOP_BY_HOP | _connection_tokens(connection) if connection else HOP_BY_HOP
    out = []
    for name in FORWARDED:
        values = fields.get(name)
        if not values or name in dropped or name.startswith(b"proxy-"):
            continue
        values = [v.strip() for v in values if v.strip()]
        if values and name == b"last-modified":
            values = [_not_after(values[0], time.time() if now is None else now)]
        if values:
            out.append((name, values))
    return out


def _not_after(value: bytes, now: float) -> bytes:
    """An HTTP-date *value*, or *now* when it is later or no date we can keep (invalid, or
    before 1970): the stored copy is given the date sent here, so the warm answer says the
    same (a date it could not take would leave it the time of the commit)."""
    when = parse_last_modified(value, now=float("inf"))
    if when is not None and when <= now:
        return value
    return datetimeToString(int(now))
