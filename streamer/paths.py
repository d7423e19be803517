"""Turn a raw request target into a catalog path, or refuse it.

The catalog is the streamer's whole namespace: a served path is only ever a key looked up
there, never joined to a filesystem path or an upstream URL. The target is normalised once,
before anything else sees it (the reserved paths, the signed-URL check, the catalog), the way
RFC 3986 §5.2.4 removes dot segments: ``.`` segments are dropped, ``..`` removes the segment
before it, and empty segments are merged (``/base/./x``, ``/base//x`` and ``/base/y/../x`` are
all ``base/x``; apt's flat repositories ask for ``/base/./Packages``). A ``..`` above the root is
refused, as is anything that could mean something else to a fronting server, a log reader or a
later change: NUL and control characters, backslashes, ``#``, authority-form, asterisk-form and
other non-path targets, overlong targets, bytes that are not UTF-8. An ``http`` or ``https``
absolute-form target (``GET http://mirror.example/base/x``), which RFC 9112 §3.2.2 asks every
server to accept, is turned into its origin form first (`origin_form`): the service is not a
proxy, so the authority only replaces the Host header and is never connected to.

Percent-escapes are decoded exactly once, after the dot segments are removed. A segment that
only becomes ``.`` or ``..`` by decoding (``%2e``, ``.%2e``, ``%2e%2e``), or that holds an
encoded slash (``%2f``: ``..%2f``, ``a%2fb``), is refused (400), never resolved or split: no
client sends one (RFC 3986 §6.2.2.2: URIs are produced with unreserved characters unencoded,
and a catalog name never holds a slash), they are what traversal probes look like, and
resolving them would let a request that a fronting server or filter sees under one prefix
land under another (Apache refuses encoded slashes by default too). ``%252e%252e`` is the
literal name ``%2e%2e`` (looked up as such).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import attrs

__all__ = [
    "MAX_TARGET_LENGTH",
    "RefusedPath",
    "RequestPath",
    "is_host",
    "origin_form",
    "parse_path_text",
    "parse_request_target",
    "request_path",
]

#: Longest request target (path and query, as received) we accept.
MAX_TARGET_LENGTH = 4096

_FORBIDDEN_RAW = b"\\#" + bytes(range(0x00, 0x21)) + b"\x7f"
#: Literal segments that RFC 3986 §5.2.4 (and our merging of empty segments) removes.
_DOT_OR_EMPTY = (b"", b".", b"..")
#: What `parse_path_text` leaves unencoded: the characters a request target carries as they
#: are (RFC 3986 pchar and "/"), and "%" so that escapes already there are kept.
_PATH_TEXT_SAFE = "/%!$&'()*+,;=:@~"
#: The attribute `request_path` keeps its answer in, so a request is parsed once.
_PARSED = "_streamer_request_path"


class RefusedPath(Exception):
    """The request target is not a path we serve; answer *status* with the short *reason*."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@attrs.frozen
class RequestPath:
    """A normalised request path.

    *path* is the catalog key (``base/dir/file``, no leading or trailing slash; ``""`` for the
    top); *folder* is True when the request named a folder (trailing slash, a final ``.`` or
    ``..`` segment, or the top).
    """

    path: str
    folder: bool
    #: The target ended with a ``.`` or ``..`` segment (``/base/dir/..``): a page served there
    #: would have its relative links resolved against another folder, so it is redirected to
    #: `url_path`. Not part of equality.
    dot_ended: bool = attrs.field(default=False, eq=False)

    @property
    def segments(self) -> list[str]:
        """The decoded path segments (empty for the top)."""
        return self.path.split("/") if self.path else []

    @property
    def url_path(self) -> str:
        """The path as the client should request it: ``/`` + path (+ ``/`` for a folder)."""
        if not self.path:
            return "/"
        return "/" + self.path + ("/" if self.folder else "")


#: An ``http(s)`` authority without userinfo (RFC 3986 §3.2): a host (an IP literal in
#: brackets or a registered name, never empty) and an optional port.
_AUTHORITY = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]+)(:[0-9]*)?")


def is_host(value: bytes) -> bool:
    """Whether *value* is a host and optional port as a Host header or an ``http(s)``
    authority carries them (no userinfo, no path, no space)."""
    return _AUTHORITY.fullmatch(value) is not None


def origin_form(target: bytes) -> tuple[bytes, bytes] | None:
    """The origin form (path and query) and the authority of an ``http``/``https``
    absolute-form *target*, or None when it is not one (left for `parse_request_target`).

    ``http://h/a?q`` is ``(b"/a?q", b"h")`` and ``http://h?q`` is ``(b"/?q", b"h")``. A target
    with userinfo (``http://user@h/``: RFC 9110 §4.2.4 says to treat it as an error), without
    a host, or whose authority is not one (``http://h#/a``, whose path is a fragment's;
    ``http://[::1/a``) is not converted, so it is refused like any other non-path target.
    """
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return None
    end = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if not is_host(authority):
        return None
    return (tail if tail.startswith(b"/") else b"/" + tail), authority


def parse_request_target(target: bytes) -> RequestPath:
    """Parse the raw request target (``request.uri``) into a normalised `RequestPath`.

    The query string is dropped (it carries signatures and the like, never part of the key).
    Raises `RefusedPath` (400, 404 or 414) for anything that is not a plain origin-form path.
    """
    if len(target) > MAX_TARGET_LENGTH:
        raise RefusedPath(414, "request target too long")
    raw_path = target.split(b"?", 1)[0]
    if not raw_path.startswith(b"/"):
        # authority-form (CONNECT's), asterisk-form (OPTIONS *) or an absolute-form target
        # that `origin_form` did not convert: we are not a proxy
        raise RefusedPath(400, "request target must be a path starting with /")
    if len(raw_path.translate(None, _FORBIDDEN_RAW)) != len(raw_path):
        raise RefusedPath(400, "request path contains forbidden characters")
    raw_segments = raw_path[1:].split(b"/")
    # Decode (and check) every segment first, so that a segment removed by a later ``..`` was
    # still refused if it was an encoded dot segment: each target has one meaning or none.
    decoded = [None if raw in _DOT_OR_EMPTY else _decode_segment(raw) for raw in raw_segments]
    segments: list[str] = []
    for raw, text in zip(raw_segments, decoded, strict=True):
        if text is not None:
            segments.append(text)
        elif raw == b"..":
            if not segments:
                raise RefusedPath(400, "request path goes above the root")
            segments.pop()
    folder = raw_segments[-1] in _DOT_OR_EMPTY or not segments
    dot_ended = raw_segments[-1] in (b".", b"..")
    return RequestPath(path="/".join(segments), folder=folder, dot_ended=dot_ended)


def _decode_segment(raw: bytes) -> str:
    """One raw segment, percent-decoded once and checked."""
    if b"%" not in raw and raw.isascii():
        # Nothing to decode, and the raw checks already refused every character that the
        # checks below would (controls, DEL, backslash): the usual segment, at C speed.
        return raw.decode("ascii")
    try:
        text = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise RefusedPath(404, "not found") from None
    if any(_is_forbidden_char(ch) for ch in text):
        raise RefusedPath(400, "request path contains forbidden characters")
    if "/" in text:
        raise RefusedPath(400, "request path has a percent-encoded '/'")
    if text in (".", ".."):
        raise RefusedPath(400, "request path has a percent-encoded '.' or '..' segment")
    return text


def _is_forbidden_char(ch: str) -> bool:
    code = ord(ch)
    return code < 0x20 or 0x7F <= code <= 0x9F or ch == "\\"


def parse_path_text(text: str) -> RequestPath:
    """Parse a path as a person writes it (``fixtures/a b.rpm`` or ``/fixtures/a%20b.rpm``),
    the way the server parses the request target a client would send for it.

    Characters a request target cannot carry as they are (spaces, non-ASCII, ``?``, ``#``) are
    percent-encoded first; escapes already there are decoded once, as the server does.
    """
    if not text.startswith("/"):
        text = "/" + text
    return parse_request_target(quote(text, safe=_PATH_TEXT_SAFE).encode("ascii"))


def request_path(request: Any) -> RequestPath:
    """``parse_request_target(request.uri)``, parsed once per request and remembered on it, so
    the root, the signed-URL check and the content resource all see one normalised path."""
    parsed = getattr(request, _PARSED, None)
    if parsed is None:
        try:
            parsed = parse_request_target(request.uri)
        except RefusedPath as refused:
            parsed = refused
        setattr(request, _PARSED, parsed)
    if isinstance(parsed, RefusedPath):
        raise RefusedPath(parsed.status, parsed.reason)
    return parsed
