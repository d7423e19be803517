"""Basic auth for a remote's own origin only.

`BasicAuthAgent` adds ``Authorization`` to requests whose scheme, host and port are the remote's.
Composed *under* the redirect-following agent, it sees every hop, so a redirect to another
host (``127.0.0.1`` to ``localhost`` counts) never carries the remote's credentials.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from downloaders.proxy import basic_credentials
from downloaders.urls import origin

__all__ = ["BasicAuthAgent"]


@implementer(IAgent)
class BasicAuthAgent:
    """Adds Basic credentials to requests for ``origin_url``'s origin; others pass untouched."""

    def __init__(self, agent: IAgent, origin_url: str, username: str, password: str) -> None:
        self._agent = agent
        self._origin = origin(origin_url)
        self._authorization = basic_credentials(username, password)

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> defer.Deferred[Any]:
        if origin(uri) == self._origin:
            headers = headers.copy() if headers is not None else Headers()
            headers.setRawHeaders(b"authorization", [self._authorization])
        return self._agent.request(method, uri, headers, bodyProducer)
