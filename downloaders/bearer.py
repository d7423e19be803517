"""Bearer-token auth (the token flow of container registries), shared by a remote's downloads.

A server answers ``401`` with ``WWW-Authenticate: Bearer realm="https://auth/token",
service="registry",scope="repository:x:pull"``. `BearerTokenAgent` then asks the realm for a
token (``GET realm?service=...&scope=...``, with the remote's Basic credentials when it has
some), and repeats the request with ``Authorization: Bearer <token>``. The token is resolved
through the remote's `DownloadContext`: one token request per scope for the whole remote, however
many downloads were challenged at once. Later requests to the same origin send the latest token
up front. A token the server refuses (expired) is fetched again once; a second refusal is the
server's answer (401).

The token only goes to the origin that asked for it (the agent sits under the redirects, which
drop ``Authorization`` on a hop to another origin). Basic credentials go to the realm only over
https, or when the realm is the remote's own origin.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NoReturn
from urllib.parse import urlencode, urlsplit

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from downloaders.bodies import discard_body
from downloaders.errors import DownloadError
from downloaders.proxy import basic_credentials
from downloaders.session import get_small
from downloaders.urls import origin

__all__ = ["BearerTokenAgent", "parse_challenge"]

#: Token answers bigger than this are refused (a token is a few KiB at most).
TOKEN_BODY_LIMIT = 64 * 1024


def parse_challenge(value: str) -> dict[str, str] | None:
    """The parameters of a ``Bearer`` challenge (``realm``, ``service``, ``scope``, ...), lower-
    case names; None when *value* is not a Bearer challenge with a realm."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " ,":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            break
        name = rest[i:eq].strip().lower()
        i = eq + 1
        if i < n and rest[i] == '"':
            i += 1
            chars = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(rest[i])
                i += 1
            i += 1
            value_ = "".join(chars)
        else:
            end = rest.find(",", i)
            end = n if end < 0 else end
            value_ = rest[i:end].strip()
            i = end
        if name:
            params[name] = value_
    realm = params.get("realm", "")
    if urlsplit(realm).scheme not in ("http", "https"):
        return None
    return params


@implementer(IAgent)
class BearerTokenAgent:
    """Answers Bearer challenges for the requests of *agent* (see the module docstring).

    :param context: the remote's `DownloadContext` (tokens are resolved once per scope there).
    :param remote_url: the remote's url: its origin may receive Basic credentials over http.
    :param credentials: the remote's ``(username, password)`` for the token request, or None.
    :param timeout: seconds a token request may take in all (the remote's read timeout).
    """

    def __init__(
        self,
        agent: IAgent,
        context: Any,
        remote_url: str,
        credentials: tuple[str, str] | None = None,
        timeout: float = 60.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._agent = agent
        #: Sent with every token request (the factory's User-Agent and Via).
        self.headers = dict(headers or {})
        #: Seconds a token request may take in all.
        self.timeout = timeout
        self._context = context
        self._remote_origin = origin(remote_url)
        self._credentials = credentials
        #: The key of the latest token per origin, sent up front to that origin.
        self._latest: dict[tuple[str, str, int | None], tuple[str, ...]] = {}
        #: Token requests made (for checks).
        self.token_requests = 0

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> defer.Deferred[Any]:
        # Until an origin asked for a token, nothing is looked up (a url parse per request).
        where = origin(uri) if self._latest else None
        key = self._latest.get(where) if where is not None else None
        token = self._context.values.get(key) if key is not None else None
        sent = self._send(method, uri, headers, bodyProducer, token)
        if bodyProducer is not None:
            return sent  # a body cannot be sent twice: the 401 is the answer
        return sent.addCallback(self._answered, method, uri, headers, where, token, False)

    def _send(
        self, method: bytes, uri: bytes, headers: Headers | None, body: Any, token: str | None
    ) -> defer.Deferred[Any]:
        if token is not None:  # supersedes Basic credentials for an origin that asked for it
            headers = headers.copy() if headers is not None else Headers()
            headers.setRawHeaders(b"authorization", [f"Bearer {token}".encode("latin-1")])
        return self._agent.request(method, uri, headers, body)

    def _answered(
        self,
        response: Any,
        method: bytes,
        uri: bytes,
        headers: Headers | None,
        where: tuple[str, str, int | None] | None,
        token: str | None,
        retried: bool,
    ) -> Any:
        if response.code != 401 or retried:
            return response
        if where is None:
            where = origin(uri)
        challenge = None
        for value in response.headers.getRawHeaders(b"www-authenticate") or []:
            challenge = parse_challenge(value.decode("latin-1"))
            if challenge is not None:
                break
        if challenge is None:
            return response
        key = (
            "bearer",
            challenge["realm"],
            challenge.get("service", ""),
            challenge.get("scope", ""),
        )
        if token is not None and self._context.values.get(key) == token:
            self._context.forget(key, stale=token)  # refused: expired or revoked
        resolving = self._context.resolve_once(key, self._fetch_token, challenge)
        draining = discard_body(response)

        def retry(results: list[Any]) -> defer.Deferred[Any]:
            new_token = results[0]
            self._latest[where] = key
            again = self._send(method, uri, headers, None, new_token)
            return again.addCallback(self._answered, method, uri, headers, where, new_token, True)

        gathered = defer.gatherResults([resolving, draining], consumeErrors=True)

        def first_error(failure: Failure) -> Failure:
            assert isinstance(failure.value, defer.FirstError)  # how gatherResults fails
            return failure.value.subFailure

        gathered.addErrback(first_error)
        return gathered.addCallback(retry)

    def _fetch_token(self, challenge: dict[str, str]) -> defer.Deferred[str]:
        """One token request to the challenge's realm; fires with the token."""
        self.token_requests += 1
        realm = challenge["realm"]
        query = {name: challenge[name] for name in ("service", "scope") if challenge.get(name)}
        url = realm + (("&" if "?" in realm else "?") + urlencode(query) if query else "")
        headers = dict(self.headers)
        realm_origin = origin(realm)
        if self._credentials is not None and (
            realm_origin[0] == "https" or realm_origin == self._remote_origin
        ):
            headers["Authorization"] = basic_credentials(*self._credentials).decode("latin-1")
        asked = get_small(
            self._agent,
            url,
            limit=TOKEN_BODY_LIMIT,
            timeout=self.timeout,
            headers=headers,
            what="bearer token request",
        )
        return asked.addCallback(_token_from, url)


def _token_from(body: bytes, url: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        _token_error(url, "the answer is not JSON")
    token = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
    if not isinstance(token, str) or not token:
        _token_error(url, "the answer holds no token")
    return token


def _token_error(url: str, message: str) -> NoReturn:
    raise DownloadError(url.split("?", 1)[0], f"bearer token request failed: {message}")
