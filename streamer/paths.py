"""Turn a raw request target into a catalog path, or refuse it.

The catalog is the streamer's whole namespace: a served path is only ever a key looked up
there, never joined to a filesystem path or an upstream URL. Still, a path that could mean
something else to a fronting server, a log reader or a later change (``..``, ``.``, NUL and
control characters, backslashes, empty segments, absolute URLs, overlong targets) is refused
here, before anything else sees it.

Percent-escapes are decoded exactly once: ``%2e%2e`` is ``..`` and refused, while
``%252e%252e`` is the literal name ``%2e%2e`` (looked up as such, and not found).
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

import attrs

__all__ = ["MAX_TARGET_LENGTH", "RefusedPath", "RequestPath", "parse_request_target"]

#: Longest request target (path and query, as received) we accept.
MAX_TARGET_LENGTH = 4096

_FORBIDDEN_RAW = frozenset(b"\\#") | frozenset(range(0x00, 0x21)) | {0x7F}


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
    top); *folder* is True when the request named a folder (trailing slash, or the top).
    """

    path: str
    folder: bool

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


def parse_request_target(target: bytes) -> RequestPath:
    """Parse the raw request target (``request.uri``) into a `RequestPath`.

    The query string is dropped (it carries signatures and the like, never part of the key).
    Raises `RefusedPath` (400, 404 or 414) for anything that is not a plain origin-form path.
    """
    if len(target) > MAX_TARGET_LENGTH:
        raise RefusedPath(414, "request target too long")
    raw_path = target.split(b"?", 1)[0]
    if not raw_path.startswith(b"/"):
        # absolute-form (http://host/x), authority-form or asterisk-form: we are not a proxy
        raise RefusedPath(400, "request target must be a path starting with /")
    if any(byte in _FORBIDDEN_RAW for byte in raw_path):
        raise RefusedPath(400, "request path contains forbidden characters")
    decoded = unquote_to_bytes(raw_path)
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise RefusedPath(404, "not found") from None
    if any(_is_forbidden_char(ch) for ch in text):
        raise RefusedPath(400, "request path contains forbidden characters")
    if text == "/":
        return RequestPath(path="", folder=True)
    folder = text.endswith("/")
    segments = text[1 : -1 if folder else None].split("/")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise RefusedPath(400, "request path has empty, '.' or '..' segments")
    return RequestPath(path="/".join(segments), folder=folder)


def _is_forbidden_char(ch: str) -> bool:
    code = ord(ch)
    return code < 0x20 or 0x7F <= code <= 0x9F or ch == "\\"
