"""The one way a url is shown to people (`redact_url`) and compared by where it points (`origin`).

A url may carry secrets in two places: its userinfo (``user:password@``, or a token as the
user) and its query string (``?X-Amz-Signature=...``, ``?token=...``). Every message, log line,
``repr`` and error of this project shows urls through `redact_url`, which keeps where the url
points (scheme, host, port, path) and masks both. The url itself is never changed: a download
still requests its query string.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = ["MASK", "origin", "redact_url", "url_credentials", "without_userinfo"]

MASK = "***"

_DEFAULT_PORTS = {"http": 80, "https": 443}


def redact_url(url: str) -> str:
    """*url* with its userinfo and query masked (``***``) and its fragment dropped.

    ``https://user:pw@host:8443/a?sig=x#f`` -> ``https://***@host:8443/a?***``. A url that
    cannot be parsed is shown as ``<unparsable url>``, never as itself.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparsable url>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if port is not None:
        host += f":{port}"
    if "@" in parts.netloc:
        host = f"{MASK}@{host}"
    query = MASK if parts.query else ""
    return urlunsplit((parts.scheme, host, parts.path, query, ""))


def without_userinfo(url: str) -> str:
    """*url* without its ``user:password@`` (to send it; credentials travel in headers), the
    rest, query included, as it was."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def url_credentials(url: str) -> tuple[str, str] | None:
    """``(username, password)`` from *url*'s userinfo, percent-decoded (``%40`` is ``@``), or
    None when it has none (or cannot be parsed)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.username is None:
        return None
    return unquote(parts.username), unquote(parts.password or "")


def origin(url: str | bytes) -> tuple[str, str, int | None]:
    """``(scheme, host, port)`` of a url, lower-cased, with the scheme's default port filled in
    (``http://Host/`` and ``http://host:80/`` are one origin); an unparsable port is None."""
    if isinstance(url, bytes):
        url = url.decode("latin-1")
    try:
        parts = urlsplit(url)
    except ValueError:  # a broken IPv6 literal: an origin of its own, equal to no other
        return "", url, None
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or _DEFAULT_PORTS.get(scheme)
