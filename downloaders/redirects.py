"""Following redirects, each hop checked: HTTP(S) only, a bounded number, no loops.

The final response is returned, so the downloader sees the final headers and body. Secret
headers (``Authorization``, ``Cookie``, ...) are dropped when a hop leaves the original origin.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urljoin

from twisted.internet import defer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from downloaders.addresses import AddressGuard
from downloaders.bodies import discard_body
from downloaders.errors import RedirectRefused, TooManyRedirects
from downloaders.settings import SENSITIVE_HEADERS
from downloaders.urls import origin, redact_url, without_userinfo

__all__ = ["REDIRECT_CODES", "RedirectingAgent"]

REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})


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

    Raises `TooManyRedirects` on a loop or too many hops, and `RedirectRefused` for a redirect
    to a non-HTTP url (``file://``, ``ftp://``) or one without a Location. Messages show urls
    through `redact_url` (their query may be a signature); summaries show none. A request with
    a body is not followed (the body cannot be replayed): its redirect response is returned as
    is. With a *guard* (`downloaders.addresses.AddressGuard`), a redirect to an internal
    address literal is refused too.
    """

    def __init__(
        self, agent: IAgent, max_redirects: int = 10, guard: AddressGuard | None = None
    ) -> None:
        self._agent = agent
        self.max_redirects = max_redirects
        self.guard = guard

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> defer.Deferred[Any]:
        sent = self._agent.request(method, uri, headers, bodyProducer)
        if bodyProducer is not None:
            return sent  # the body cannot be replayed: a redirect is the answer
        # One plain callback: a response that is not a redirect (nearly all of them) costs
        # that and nothing more; the chain of hops is made for the first redirect.
        return sent.addCallback(self._answered, method, uri, headers)

    def _answered(self, response: Any, method: bytes, uri: bytes, headers: Headers | None) -> Any:
        if response.code not in REDIRECT_CODES:
            return response
        return _Hops(self, method, uri.decode("latin-1"), headers)._redirected(response)


class _Hops:
    """The redirect chain of one request: each hop is checked, then the next one is made."""

    def __init__(
        self, agent: RedirectingAgent, method: bytes, uri: str, headers: Headers | None
    ) -> None:
        self.agent = agent
        self.method = method
        self.original = self.current = uri
        self.headers = headers
        self.start = origin(uri)
        self.seen = {uri}
        self.previous: Any = None
        self.hops = 0

    def _response(self, response: Any) -> Any:
        response.setPreviousResponse(self.previous)
        if response.code not in REDIRECT_CODES:
            return response
        return self._redirected(response)

    def _redirected(self, response: Any) -> defer.Deferred[Any]:
        locations = response.headers.getRawHeaders(b"location") or []
        return discard_body(response).addCallback(lambda _: self._follow(response, locations))

    def _follow(self, response: Any, locations: list[bytes]) -> defer.Deferred[Any]:
        original = self.original
        if not locations:
            what = "redirect without Location"
            raise RedirectRefused(original, f"HTTP {response.code} {what}", what)
        # Credentials an upstream puts in a Location are never sent (the remote's own go only
        # to its origin, see downloaders.auth).
        target = without_userinfo(urljoin(self.current, locations[0].decode("latin-1").strip()))
        target_origin = origin(target)
        if target_origin[0] not in ("http", "https"):
            what = "redirect to a non-HTTP url refused"
            raise RedirectRefused(original, f"{what}: {redact_url(target)}", what)
        if target in self.seen:
            raise TooManyRedirects(
                original, f"redirect loop at {redact_url(target)}", "redirect loop"
            )
        self.hops += 1
        if self.hops > self.agent.max_redirects:
            raise TooManyRedirects(original, f"more than {self.agent.max_redirects} redirects")
        guard = self.agent.guard
        if guard is not None and guard.refuses(target):
            what = "redirect to a private address refused"
            raise RedirectRefused(
                original, f"{what}: {redact_url(target)} (allow_private_redirects is off)", what
            )
        if response.code == 303 and self.method != b"HEAD":
            self.method = b"GET"
        if target_origin != self.start:
            self.headers = _without_secrets(self.headers)
        self.seen.add(target)
        self.current = target
        self.previous = response
        sent = self.agent._agent.request(self.method, target.encode("latin-1"), self.headers, None)
        return sent.addCallback(self._response)
