"""Signed URLs: HMAC-SHA256 over the path and an expiry time, checked in constant time.

A signed URL is the path plus ``?expires=<unix seconds>&signature=<hex>`` where the signature
is ``HMAC-SHA256(key, "<path>\\n<expires>")`` in lowercase hex, over the path as
`streamer.paths` normalises it (percent-decoded once, dot segments removed, empty segments
merged), so ``/a%20b``, ``/a b`` and ``/x/../a b`` sign alike. A signature for a folder without
its trailing slash (``/base/dir``) is also good for ``/base/dir/``, where the content resource
redirects it. Other query parameters are not signed (the content resource ignores them).
``expires`` is ASCII digits only. `SignedResource` checks every request, answers 403 with a
short reason otherwise, and removes both parameters before the wrapped resource sees the
request, so they never become part of a cache key or a log line (`client_query` gives them
back, for a redirect).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable
from urllib.parse import parse_qsl, quote, unquote, urlencode

from twisted.web.resource import IResource, Resource, getChildForRequest
from twisted.web.server import Request

from streamer.paths import RefusedPath, RequestPath, parse_path_text, request_path

__all__ = [
    "EXPIRES",
    "SIGNATURE",
    "SignedResource",
    "client_query",
    "sign_path",
    "signature_for",
    "verify",
]

EXPIRES = "expires"
SIGNATURE = "signature"
_SIGNED_PARAMS = (EXPIRES.encode(), SIGNATURE.encode())
#: Unix seconds: ASCII digits only (``str.isdigit`` also takes "²" and other digits).
_EXPIRES = re.compile(r"[0-9]{1,12}")
#: The attribute `SignedResource` keeps the removed signature parameters in.
_STRIPPED = "_streamer_signature_query"


def _signature(key: bytes, url_path: str, expires_at: int) -> str:
    message = f"{url_path}\n{int(expires_at)}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def signature_for(key: bytes, path: str, expires_at: int) -> str:
    """The hex HMAC-SHA256 of *path* (normalised as the server does) and *expires_at*.

    Raises `streamer.paths.RefusedPath` for a path the server would refuse.
    """
    return _signature(key, parse_path_text(path).url_path, expires_at)


def sign_path(key: bytes, path: str, expires_at: int) -> str:
    """Return *path*, normalised and quoted for a URL, with ``?expires=...&signature=...``.

    Raises `streamer.paths.RefusedPath` for a path the server would refuse.
    """
    url_path = parse_path_text(path).url_path
    query = urlencode({EXPIRES: int(expires_at), SIGNATURE: _signature(key, url_path, expires_at)})
    return f"{quote(url_path, safe='/')}?{query}"


def verify(key: bytes, path: str, query: str, now: float) -> str | None:
    """Check the signature in *query* (a raw query string) for *path* at time *now*.

    Returns None when the URL is validly signed and unexpired, else a short reason.
    """
    try:
        target = parse_path_text(path)
    except RefusedPath as refused:
        return refused.reason
    return _verify(key, target, query, now)


def _verify(key: bytes, target: RequestPath, query: str, now: float) -> str | None:
    """`verify` for a path already normalised."""
    params: dict[str, list[str]] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        params.setdefault(name, []).append(value)
    expires = params.get(EXPIRES, [])
    signature = params.get(SIGNATURE, [])
    if not expires or not signature:
        return "missing signature"
    if len(expires) > 1 or len(signature) > 1:
        return "ambiguous signature"
    if not _EXPIRES.fullmatch(expires[0]):
        return "invalid expiry (expected unix seconds in ASCII digits)"
    given = signature[0].lower().encode("ascii", "replace")
    # A folder's signature may be over its path without the trailing slash: the content
    # resource redirects /base/dir?<signature> to /base/dir/?<signature>.
    signed_paths = [target.url_path]
    if target.folder and target.path:
        signed_paths.append("/" + target.path)
    matches = [
        hmac.compare_digest(_signature(key, signed, int(expires[0])).encode(), given)
        for signed in signed_paths
    ]
    if not any(matches):
        return "invalid signature"
    if int(expires[0]) <= now:
        return "signature expired"
    return None


def _strip_signature(request: Request) -> None:
    """Remove the signature parameters from the request's args and uri (kept for
    `client_query`)."""
    for name in _SIGNED_PARAMS:
        request.args.pop(name, None)
    path, _, query = request.uri.partition(b"?")
    kept: list[bytes] = []
    removed: list[bytes] = []
    for part in query.split(b"&"):
        if part:
            name = unquote(part.split(b"=", 1)[0].decode("latin-1")).encode()
            (removed if name in _SIGNED_PARAMS else kept).append(part)
    request.uri = path + (b"?" + b"&".join(kept) if kept else b"")
    setattr(request, _STRIPPED, b"&".join(removed))


def client_query(request: Request) -> bytes:
    """The query string of *request* as its client sent it: what is left in ``request.uri``,
    and the signature parameters `SignedResource` removed (a redirect must keep them)."""
    parts = [request.uri.partition(b"?")[2], getattr(request, _STRIPPED, b"")]
    return b"&".join(part for part in parts if part)


def _refuse(request: Request, status: int, text: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return f"{text}\n".encode()


class SignedResource(Resource):
    """Wraps a resource so that only validly signed, unexpired URLs reach it.

    A leaf: it sees the whole path, checks it, then resolves and renders the wrapped tree.
    """

    isLeaf = True

    def __init__(
        self, wrapped: IResource, key: bytes, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__()
        self._wrapped = wrapped
        self._key = key
        self._clock = clock

    def __repr__(self) -> str:
        return f"<SignedResource wrapping {self._wrapped!r}>"

    def render(self, request: Request) -> bytes | int:
        try:
            target = request_path(request)
        except RefusedPath as refused:
            return _refuse(request, refused.status, refused.reason)
        query = request.uri.partition(b"?")[2].decode("latin-1")
        reason = _verify(self._key, target, query, self._clock())
        if reason is not None:
            return _refuse(request, 403, f"forbidden: {reason}")
        _strip_signature(request)
        return getChildForRequest(self._wrapped, request).render(request)
