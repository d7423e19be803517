"""Signed URLs: HMAC-SHA256 over the path and an expiry time, checked in constant time.

A signed URL is the path plus ``?expires=<unix seconds>&signature=<hex>`` where the signature
is ``HMAC-SHA256(key, "<decoded path>\\n<expires>")`` in lowercase hex. The path is signed
percent-decoded, so ``/a%20b`` and ``/a b`` sign alike. Other query parameters are not
signed (the content resource ignores them). `SignedResource` checks every request, answers
403 with a short reason otherwise, and removes both parameters before the wrapped resource
sees the request, so they never become part of a cache key or a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from urllib.parse import parse_qsl, quote, unquote, urlencode

from twisted.web.resource import IResource, Resource, getChildForRequest
from twisted.web.server import Request

__all__ = ["EXPIRES", "SIGNATURE", "SignedResource", "sign_path", "signature_for", "verify"]

EXPIRES = "expires"
SIGNATURE = "signature"
_SIGNED_PARAMS = (EXPIRES.encode(), SIGNATURE.encode())


def signature_for(key: bytes, path: str, expires_at: int) -> str:
    """The hex HMAC-SHA256 of *path* (percent-decoded) and *expires_at*."""
    message = f"{unquote(path)}\n{int(expires_at)}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign_path(key: bytes, path: str, expires_at: int) -> str:
    """Return *path* (quoted for a URL) with ``?expires=...&signature=...`` appended."""
    if not path.startswith("/"):
        path = "/" + path
    query = urlencode({EXPIRES: int(expires_at), SIGNATURE: signature_for(key, path, expires_at)})
    return f"{quote(unquote(path), safe='/')}?{query}"


def verify(key: bytes, path: str, query: str, now: float) -> str | None:
    """Check the signature in *query* (a raw query string) for *path* at time *now*.

    Returns None when the URL is validly signed and unexpired, else a short reason.
    """
    params: dict[str, list[str]] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        params.setdefault(name, []).append(value)
    expires = params.get(EXPIRES, [])
    signature = params.get(SIGNATURE, [])
    if not expires or not signature:
        return "missing signature"
    if len(expires) > 1 or len(signature) > 1:
        return "ambiguous signature"
    if not expires[0].isdigit() or len(expires[0]) > 12:
        return "invalid expiry"
    expected = signature_for(key, path, int(expires[0]))
    if not hmac.compare_digest(expected.encode(), signature[0].lower().encode("ascii", "replace")):
        return "invalid signature"
    if int(expires[0]) <= now:
        return "signature expired"
    return None


def _strip_signature(request: Request) -> None:
    """Remove the signature parameters from the request's args and uri."""
    for name in _SIGNED_PARAMS:
        request.args.pop(name, None)
    path, _, query = request.uri.partition(b"?")
    kept = [
        part
        for part in query.split(b"&")
        if part and unquote(part.split(b"=", 1)[0].decode("latin-1")).encode() not in _SIGNED_PARAMS
    ]
    request.uri = path + (b"?" + b"&".join(kept) if kept else b"")


class _Forbidden(Resource):
    isLeaf = True

    def __init__(self, reason: str) -> None:
        super().__init__()
        self._reason = reason

    def render(self, request: Request) -> bytes:
        request.setResponseCode(403)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return f"forbidden: {self._reason}\n".encode()


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
        path, _, query = request.uri.partition(b"?")
        reason = verify(
            self._key, path.decode("utf-8", "replace"), query.decode("latin-1"), self._clock()
        )
        if reason is not None:
            return _Forbidden(reason).render(request)
        _strip_signature(request)
        return getChildForRequest(self._wrapped, request).render(request)
