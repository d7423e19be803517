"""Paths, signatures and reserved paths against the whole service (in-process
`StreamerService`, raw sockets and curl from outside).

The request path is normalised once, as RFC 3986 §5.2.4 removes dot segments (and with empty
segments merged), before the reserved paths, the signed-URL check and the catalog see it; the
signature covers the normalised path. Odd signature parameters and paths below the reserved
names get a clear 4xx, never a 500.
"""

from __future__ import annotations

import sqlite3
import sys
import time
from urllib.parse import quote

import pytest
import pytest_twisted

from streamer.signing import sign_path
from tests.faults.test_hostile_clients import assert_serving, request, status_of
from tests.support import faults
from tests.support.clients import raw_http, run_curl, run_process
from tests.support.polling import holds_within
from tests.support.service import ServiceEnv

BODY = b"normalised body\n" * 1000


def body_of(data: bytes) -> bytes:
    return data.partition(b"\r\n\r\n")[2]


async def get(env: ServiceEnv, target: str, *headers: str) -> tuple[int, bytes, bytes]:
    """Status, head and body of a raw GET of *target* (sent exactly as given)."""
    result = await raw_http("127.0.0.1", env.port, request(target, *headers), timeout=5)
    head, _, body = result.data.partition(b"\r\n\r\n")
    return status_of(result.data), head, body


def header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


EQUIVALENT = [
    "/fixtures/./a.bin",
    "/fixtures//a.bin",
    "//fixtures/a.bin",
    "/fixtures/sub/../a.bin",
    "/./fixtures/sub/./.././/a.bin",
    # absolute-form (RFC 9112 §3.2.2: a server must accept it; the host is never connected to)
    "http://mirror.example/fixtures/a.bin",
    "HTTPS://mirror.example:8443/fixtures/./a.bin",
    "/fixtures/a.bin?x=1",
]


@pytest.mark.parametrize("stored", [True, False], ids=["stored", "lazy"])
@pytest_twisted.ensureDeferred
async def test_dot_and_empty_segments_serve_the_normalised_path(make_service, upstream, stored):
    env = await make_service()
    url = upstream.register("/a.bin", faults.Serve(BODY))
    await env.add("a.bin", BODY, stored=stored, url=url)
    for target in EQUIVALENT:
        status, _, body = await get(env, target)
        assert (status, body) == (200, BODY), target
    # Lazy: one upstream download for every form (the same catalog key, the same artifact).
    assert len(upstream.requests("/a.bin")) == (0 if stored else 1)
    await assert_serving(env)


@pytest.mark.parametrize(
    "target, status",
    [
        ("/fixtures/../../a.bin", 400),  # above the root
        ("/../fixtures/a.bin", 400),
        ("/fixtures/%2e/a.bin", 400),  # encoded dot segments are refused, not resolved
        ("/fixtures/x/%2e%2e/a.bin", 400),
        ("/fixtures/%2e%2e/../a.bin", 400),  # even when a later '..' would remove them
        ("/fixtures/x/..%2fa.bin", 400),
        ("/fixtures%2Fa.bin", 400),  # encoded slashes are refused, not split
        ("/fixtures/sub%2f..%2fa.bin", 400),
        ("/fixtures/../other/a.bin", 404),  # inside the root: another (unknown) path
        ("http://mirror.example/../fixtures/a.bin", 400),  # absolute-form: the same rules
        ("http://user@mirror.example/fixtures/a.bin", 400),  # userinfo (RFC 9110 §4.2.4)
        ("http:///fixtures/a.bin", 400),  # no host
        ("http://mirror.example#/fixtures/a.bin", 400),  # the path is a fragment's
        ("http://[::1/fixtures/a.bin", 400),  # not an authority
        ("http://:80/fixtures/a.bin", 400),  # a port without a host
        ("ftp://mirror.example/fixtures/a.bin", 400),  # not http(s)
        ("mirror.example:80", 400),  # authority-form (CONNECT's)
    ],
)
@pytest_twisted.ensureDeferred
async def test_above_the_root_and_encoded_dot_segments(make_service, upstream, target, status):
    env = await make_service()
    await env.add("a.bin", BODY, stored=True)
    got, _, body = await get(env, target)
    assert got == status, (target, body)
    assert BODY[:64] not in body
    assert upstream.all_requests() == []


@pytest_twisted.ensureDeferred
async def test_signatures_cover_the_normalised_path(make_service, tmp_path):
    env = await make_service(signed=True)
    await env.add("a.bin", BODY, stored=True)
    expires = int(time.time()) + 60
    signed = sign_path(env.key, "/fixtures/a.bin", expires)
    query = signed.partition("?")[2]
    for target in EQUIVALENT[:-1]:
        status, _, body = await get(env, f"{target}?{query}")
        assert (status, body) == (200, BODY), target
    status, _, body = await get(env, f"/fixtures/other.bin?{query}")
    assert (status, body) == (403, b"forbidden: invalid signature\n")
    # Refused paths are refused before the signature is looked at (400, not 403).
    status, _, _ = await get(env, f"/fixtures/../../a.bin?{query}")
    assert status == 400

    # `streamer sign` signs the normalised path and prints it.
    config = env.config.source
    result = await run_process(
        sys.executable, "-m", "streamer.cli", "--config", str(config), "sign", "fixtures/./a.bin"
    )
    assert result.exit_code == 0, result.stderr
    printed = result.stdout.decode().strip()
    assert printed.startswith("/fixtures/a.bin?expires="), printed
    status, _, body = await get(env, printed)
    assert (status, body) == (200, BODY)
    status, _, body = await get(env, printed.replace("/fixtures/a.bin", "/fixtures/./a.bin"))
    assert (status, body) == (200, BODY)
    result = await run_process(
        sys.executable, "-m", "streamer.cli", "--config", str(config), "sign", "/x/../../a.bin"
    )
    assert result.exit_code == 2
    assert result.stderr == (
        b"streamer: PATH: the server would refuse '/x/../../a.bin': "
        b"request path goes above the root\n"
    )


@pytest.mark.parametrize(
    "expires",
    ["%C2%B2", "%D9%A1%D9%A2%D9%A3", "%EF%BC%91", "1e9", "-1", "+99999999999", "0x10", "%00"],
    ids=[
        "superscript-two",
        "arabic-indic",
        "fullwidth-one",
        "exponent",
        "negative",
        "plus",
        "hex",
        "nul",
    ],
)
@pytest_twisted.ensureDeferred
async def test_expiry_must_be_ascii_digits(make_service, expires):
    env = await make_service(signed=True)
    await env.add("a.bin", BODY, stored=True)
    good = sign_path(env.key, "/fixtures/a.bin", int(time.time()) + 60)
    signature = good.rpartition("signature=")[2]
    status, head, body = await get(env, f"/fixtures/a.bin?expires={expires}&signature={signature}")
    assert (status, body) == (
        403,
        b"forbidden: invalid expiry (expected unix seconds in ASCII digits)\n",
    ), head
    await assert_serving_signed(env)


async def assert_serving_signed(env: ServiceEnv) -> None:
    signed = sign_path(env.key, "/fixtures/a.bin", int(time.time()) + 60)
    status, _, body = await get(env, signed)
    assert (status, body) == (200, BODY)


@pytest_twisted.ensureDeferred
async def test_signed_folder_redirect_keeps_the_signature(make_service):
    env = await make_service(signed=True)
    await env.add("dir/a.bin", BODY, stored=True)
    signed = sign_path(env.key, "/fixtures/dir", int(time.time()) + 60)
    query = signed.partition("?")[2]
    status, head, _ = await get(env, f"/fixtures/dir?{query}&keep=1")
    assert status == 301
    assert header(head, b"location") == f"/fixtures/dir/?keep=1&{query}".encode()
    # Followed by a real client: the listing, with the signature still good.
    result = await run_curl("-L", "-w", "\n%{http_code} %{num_redirects}", env.url(signed))
    page, _, outcome = result.stdout.rpartition(b"\n")
    assert outcome == b"200 1", result.stdout
    assert b'href="a.bin"' in page
    # The same signature on the slash form (where the redirect leads) and on what the folder
    # holds: only the folder itself.
    status, _, _ = await get(env, f"/fixtures/dir/?{query}")
    assert status == 200
    status, _, _ = await get(env, f"/fixtures/dir/a.bin?{query}")
    assert status == 403
    # A final '..' redirects to the folder, keeping the signature.
    status, head, _ = await get(env, f"/fixtures/dir/a.bin/..?{query}")
    assert (status, header(head, b"location")) == (301, f"/fixtures/dir/?{query}".encode())
    # A folder signed with its slash is still good (signatures made before this rule).
    slashed = sign_path(env.key, "/fixtures/dir/", int(time.time()) + 60)
    status, _, _ = await get(env, slashed)
    assert status == 200


@pytest.mark.parametrize(
    "target, location",
    [
        ("/fixtures/dir/..", b"/fixtures/"),
        ("/fixtures/dir/.", b"/fixtures/dir/"),
        ("/fixtures/dir/a.bin/..?x=1", b"/fixtures/dir/?x=1"),
        ("/fixtures/..", b"/"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_final_dot_segment_redirects_to_the_folder(make_service, target, location):
    """A listing's links are relative: served at /fixtures/dir/.. they would resolve under
    /fixtures/dir/, so a target ending in '.' or '..' is redirected to the folder itself."""
    env = await make_service()
    await env.add("dir/a.bin", BODY, stored=True)
    status, head, _ = await get(env, target)
    assert (status, header(head, b"location")) == (301, location)
    result = await run_curl("-L", "--path-as-is", "-w", "\n%{http_code}", env.url(target))
    page, _, code = result.stdout.rpartition(b"\n")
    assert code == b"200" and b"<html" in page, result.stdout


@pytest.mark.parametrize(
    "target, status",
    [
        ("/metrics/x", 404),
        ("/healthz/x", 404),
        ("/metrics/", 404),
        ("/healthz/", 404),
        ("/healthz/..", 301),  # the top, redirected to "/"
        ("/metrics/../healthz", 200),
        ("/./healthz", 200),
        ("/metrics?x=1", 200),
        ("/healthz/%2e%2e/x", 400),
    ],
)
@pytest_twisted.ensureDeferred
async def test_reserved_paths_are_exact(make_service, target, status):
    env = await make_service()
    got, head, body = await get(env, target)
    assert got == status, (target, head, body)
    if status == 404:
        assert body == b"not found\n"


@pytest_twisted.ensureDeferred
async def test_healthz_says_starting_until_the_service_is_ready(tmp_path, upstream):
    """A catalog that another process holds locked (a sync writing it) keeps the service from
    being ready: /healthz says "starting" then, and "ok" once the catalog opened."""
    env = ServiceEnv(tmp_path, upstream)
    catalog_file = env.config.catalog_location()
    (tmp_path / "var").mkdir(exist_ok=True)
    holder = sqlite3.connect(catalog_file, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        env.service.startService()
        for _ in range(3):
            status, _, body = await get(env, "/healthz")
            assert (status, body) == (503, b"starting\n")
        status, _, body = await get(env, "/fixtures/a.bin")
        assert (status, body) == (503, b"service not ready\n")
        assert not env.service.ready
    finally:
        holder.execute("COMMIT")
        holder.close()
    try:
        assert await holds_within(lambda: env.service.ready, 10.0)
        status, _, body = await get(env, "/healthz")
        assert (status, body) == (200, b"ok\n")
    finally:
        await env.stop()
    assert env.service.stopping


def test_quoted_target_forms_are_one_key():
    """Quoting a name (as apt does for '+' and '~') does not change what is signed."""
    key = b"k" * 32
    assert sign_path(key, "/fixtures/pool/a+b~1.deb", 1) == sign_path(
        key, "/fixtures/pool/" + quote("a+b~1.deb", safe=""), 1
    )
