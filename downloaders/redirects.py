"""Following redirects, each hop checked: HTTP(S) only, a bounded number, no loops.

The final response is returned, so the downloader sees the final headers and body. Secret
headers (``Authorization``, ``Cookie``, ...) are dropped when a hop leaves the original origin.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urljoin

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from downloaders.auth import origin
from downloaders.errors import DownloadError, TooManyRedirects
from downloaders.settings import SENSITIVE_HEADERS, mask_url

__all__ = ["REDIRECT_CODES", "RedirectingAgent"]

REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})


class _Discard(Protocol):
    """Reads and drops a redirect's (small) body so its connection can go back to the pool."""

    def __init__(self) -> None:
        self.done: defer.Deferred[None] = defer.Deferred()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        self.done.callback(None)


def _discard_body(response: Any) -> defer.Deferred[None]:
    protocol = _Discard()
    response.deliverBody(protocol)
    return protocol.done


def _without_secrets(headers: Headers | None) -> Headers | None:
    if headers is None:
        return None
    kept = Headers()
    for name, values in headers.getAllRawHeaders():
        if name.decode("latin-1").lower() not in SENSITIVE_HEADERS:
            kept.setRawHeaders(name, values)
    return kept


@implementer(IAgent)
class RedirectingAgent:
    """Follows 301/302/303/307/308 up to ``max_redirects`` hops.

    Raises `TooManyRedirects` on a loop or too many hops, and `DownloadError` for a redirect to
    a non-HTTP url (``file://``, ``ftp://``) or one without a Location. A request with a body
    is not followed (the body cannot be replayed): its redirect response is returned as is.
    """

    def __init__(self, agent: IAgent, max_redirects: int = 10) -> None:
        self._agent = agent
        self.max_redirects = max_redirects

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: Any = None,  # noqa: N803
    ) -> defer.Deferred[Any]:
        return defer.ensureDeferred(self._follow(method, uri, headers, bodyProducer))

    async def _follow(self, method: bytes, uri: bytes, headers: Headers | None, body: Any) -> Any:
        original = uri.decode("latin-1")
        start = origin(original)
        current = original
        seen = {current}
        previous = None
        hops = 0
        while True:
            response = await self._agent.request(method, current.encode("latin-1"), headers, body)
            if previous is not None:
                response.setPreviousResponse(previous)
            if response.code not in REDIRECT_CODES or body is not None:
                return response
            locations = response.headers.getRawHeaders(b"location") or []
            await _discard_body(response)
            if not locations:
                raise DownloadError(original, f"HTTP {response.code} redirect without Location")
            target = urljoin(current, locations[0].decode("latin-1").strip())
            if origin(target)[0] not in ("http", "https"):
                raise DownloadError(
                    original, f"redirect to a non-HTTP url refused: {mask_url(target)}"
                )
            if target in seen:
                raise TooManyRedirects(original, f"redirect loop at {mask_url(target)}")
            hops += 1
            if hops > self.max_redirects:
                raise TooManyRedirects(original, f"more than {self.max_redirects} redirects")
            if response.code == 303 and method != b"HEAD":
                method = b"GET"
            if origin(target) != start:
                headers = _without_secrets(headers)
            seen.add(target)
            current = target
            previous = response
