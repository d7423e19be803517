"""Self-test of the fault-injecting upstream: each behaviour does on the wire what it says,
observed with curl and a raw TCP client."""

from __future__ import annotations

import hashlib

import pytest_twisted

from tests.support import faults
from tests.support.clients import raw_http, run_curl


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: upstream\r\nConnection: close\r\n\r\n".encode()


@pytest_twisted.ensureDeferred
async def test_serve_body_and_request_log(upstream):
    body = b"hello upstream\n" * 100
    url = upstream.register("/a.bin", faults.Serve(body))
    code, out, err = await run_curl("-H", "Authorization: Basic Zm9vOmJhcg==", url)
    assert (code, out) == (0, body), err
    [(method, headers)] = upstream.requests("/a.bin")
    assert method == "GET"
    assert headers["authorization"] == "Basic Zm9vOmJhcg=="
    assert upstream.total_connections == 1
