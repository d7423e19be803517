"""Signed URLs: the HMAC scheme, and the resource wrapper on a real loopback server."""

from __future__ import annotations

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.web.server import Site

from streamer.signing import SignedResource, sign_path, signature_for, verify
from tests.service.support import EchoContent

KEY = b"k" * 32
NOW = 1_700_000_000
EXPIRY = "invalid expiry (expected unix seconds in ASCII digits)"


def query_of(signed: str) -> str:
    return signed.partition("?")[2]


def test_signed_path_verifies_until_it_expires():
    signed = sign_path(KEY, "/fx/a b.rpm", NOW + 60)
    path, _, query = signed.partition("?")
    assert path == "/fx/a%20b.rpm"
    assert query == f"expires={NOW + 60}&signature={signature_for(KEY, '/fx/a b.rpm', NOW + 60)}"
    assert verify(KEY, path, query, NOW) is None
    assert verify(KEY, "/fx/a b.rpm", query, NOW + 59.9) is None  # decoded path signs alike
    assert verify(KEY, path, query, NOW + 60) == "signature expired"


@pytest.mark.parametrize(
    ("path", "query", "reason"),
    [
        ("/fx/a b.rpm", "", "missing signature"),
        ("/fx/a b.rpm", f"expires={NOW + 60}", "missing signature"),
        ("/fx/other.rpm", None, "invalid signature"),  # signature of another path
        ("/fx/a b.rpm", "expires=soon&signature=00", EXPIRY),
        ("/fx/a b.rpm", "expires=%C2%B2&signature=SIG", EXPIRY),  # "²": a digit, not ASCII
        ("/fx/a b.rpm", "expires=%D9%A1%D9%A2&signature=SIG", EXPIRY),  # Arabic-Indic 12
        ("/fx/a b.rpm", "expires=+12&signature=SIG", EXPIRY),
        ("/fx/a b.rpm", "expires=1_000&signature=SIG", EXPIRY),
        ("/fx/a b.rpm", f"expires={NOW + 61}&signature=SIG", "invalid signature"),
        ("/fx/a b.rpm", "expires=1&expires=2&signature=SIG", "ambiguous signature"),
    ],
)
def test_bad_signatures_are_rejected_with_a_reason(path, query, reason):
    good = query_of(sign_path(KEY, "/fx/a b.rpm", NOW + 60))
    sig = good.rpartition("=")[2]
    query = good if query is None else query.replace("SIG", sig)
    assert verify(KEY, path, query, NOW) == reason


def test_another_key_does_not_verify():
    query = query_of(sign_path(KEY, "/fx/a", NOW + 60))
    assert verify(b"x" * 32, "/fx/a", query, NOW) == "invalid signature"


@pytest_twisted.inlineCallbacks
def test_wrapper_accepts_rejects_and_strips_the_signature():
    clock = Clock()
    clock.advance(NOW)
    content = EchoContent()
    port = reactor.listenTCP(
        0, Site(SignedResource(content, KEY, clock.seconds)), interface="127.0.0.1"
    )
    base = f"http://127.0.0.1:{port.getHost().port}"
    try:
        signed = sign_path(KEY, "/fx/file.txt", NOW + 30)
        response = yield treq.get(base + signed + "&keep=1")
        assert response.code == 200
        assert (yield treq.content(response)) == b"content of /fx/file.txt"
        # The wrapped resource sees neither parameter, in args nor in the uri.
        uri, args = content.seen[-1]
        assert uri == b"/fx/file.txt?keep=1"
        assert args == {b"keep": [b"1"]}

        unsigned = yield treq.get(base + "/fx/file.txt")
        assert unsigned.code == 403
        assert (yield treq.content(unsigned)) == b"forbidden: missing signature\n"

        tampered = yield treq.get(base + signed.replace("file.txt", "other.txt"))
        assert tampered.code == 403
        assert b"invalid signature" in (yield treq.content(tampered))

        clock.advance(31)
        expired = yield treq.get(base + signed)
        assert expired.code == 403
        assert (yield treq.content(expired)) == b"forbidden: signature expired\n"
        assert len(content.seen) == 1
    finally:
        yield port.stopListening()
