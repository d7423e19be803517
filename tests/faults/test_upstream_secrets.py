"""Upstream errors leak no secret and no internal address; redirects stay out of internal
networks (issue: "secrets and internal addresses leak through upstream errors").

Driven with curl against the running service. Every address is loopback: the remote whose
redirects are checked is reached by a name (``repo.test``) that the reactor's resolver maps
to 127.0.0.1 (`tests.support.resolver`), so its url does not name an internal host literally
and the check applies, while every connection still goes to this machine only.
"""

from __future__ import annotations

import pytest
import pytest_twisted

from tests.support import faults
from tests.support.clients import free_port, run_curl
from tests.support.resolver import mapped_names

BODY = b"published bytes\n" * 64
SIGNATURE = "X-Amz-Signature=5ec12e7a9b0c4d2f"
PASSWORD = "Upstream-Pa55word"


@pytest.fixture
def names():
    """``repo.test`` (the remote's own host) and ``cdn.test`` (a redirect target): both are
    127.0.0.1 through the reactor's resolver."""
    with mapped_names({"repo.test": ["127.0.0.1"], "cdn.test": ["127.0.0.1"]}) as resolver:
        yield resolver


def ours(log_events: list[str]) -> list[str]:
    """The service's log events: without the test upstream's access lines (requests the
    service made, identified by its User-Agent), which show what was asked of it."""
    return [e for e in log_events if '"twisted-streamer/' not in e]


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert SIGNATURE not in text and "5ec12e7a9b0c4d2f" not in text
        assert PASSWORD not in text


async def get(env, path: str) -> tuple[int, str]:
    """curl's status code and body for *path* on the service."""
    code, out, err = await run_curl("-o", "-", "-w", "%{http_code}", env.url(path))
    assert code == 0, err
    text = out.decode()
    return int(text[-3:]), text[:-3]


@pytest_twisted.ensureDeferred
async def test_redirect_loop_with_a_signature_and_a_password_is_told_without_them(
    make_service, upstream, log_events
):
    secret = upstream.url(f"/loop?{SIGNATURE}").replace("http://", f"http://bob:{PASSWORD}@")
    url = upstream.register("/a.bin", faults.Redirect(secret))
    upstream.register("/loop", faults.Redirect(secret))
    env = await make_service()
    await env.add("a.bin", BODY, stored=False, url=url)

    status, body = await get(env, "fixtures/a.bin")

    assert (status, body) == (502, "fixtures/a.bin: upstream failed: redirect loop\n")
    failures = [e for e in log_events if e.startswith("upstream failure: ")]
    assert len(failures) == 1
    # The log keeps the redirect target, query masked (its userinfo is never followed).
    assert f"redirect loop at http://127.0.0.1:{upstream.port}/loop?***" in failures[0]
    assert f"http://127.0.0.1:{upstream.port}/a.bin" in failures[0]
    assert_no_secret(body, *ours(log_events))


@pytest_twisted.ensureDeferred
async def test_connection_failures_name_no_host_or_port_to_the_client(
    make_service, upstream, log_events
):
    port = free_port()
    env = await make_service()
    await env.add("a.bin", BODY, stored=False, url=f"http://127.0.0.1:{port}/a.bin?{SIGNATURE}")
    await env.add("b.bin", BODY[::-1], stored=False, url="http://name.invalid/b.bin")

    assert await get(env, "fixtures/a.bin") == (
        502,
        "fixtures/a.bin: upstream failed: connection refused\n",
    )
    status, body = await get(env, "fixtures/b.bin")
    assert (status, body) == (502, "fixtures/b.bin: upstream failed: DNS lookup failed\n")
    assert f"http://127.0.0.1:{port}/a.bin?***" in "\n".join(log_events)
    assert "name.invalid" in "\n".join(log_events)  # the operator's log keeps the host
    assert_no_secret(*ours(log_events))


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{port}/inside.bin",
        "http://localhost:{port}/inside.bin",
        "http://cdn.test:{port}/inside.bin",  # a name resolving to loopback
        "http://[::1]:{port}/inside.bin",
        "http://[::ffff:127.0.0.1]:{port}/inside.bin",  # IPv4-mapped IPv6
        "http://[::ffff:7f00:1]:{port}/inside.bin",
        "http://0.0.0.0:{port}/inside.bin",
        # Not address literals, but names the system resolver turns into 127.0.0.1.
        "http://127.1:{port}/inside.bin",
        "http://2130706433:{port}/inside.bin",
        "http://0x7f000001:{port}/inside.bin",
        "http://localhost.:{port}/inside.bin",
        "//127.0.0.1:{port}/inside.bin",  # scheme-relative
        "HTTP://[::1]:{port}/inside.bin",
        # Private and link-local addresses off this machine (169.254.169.254, 10/8, fd00::/8)
        # are refused by the same check (tests/downloaders/test_addresses.py); they are not
        # tried here, where a regression would send traffic off the machine.
    ],
)
@pytest_twisted.ensureDeferred
async def test_redirects_from_a_public_remote_to_internal_addresses_are_refused(
    make_service, upstream, names, log_events, target
):
    target = target.format(port=upstream.port)
    inside = upstream.register("/inside.bin", faults.Serve(BODY))
    url = upstream.register("/a.bin", faults.Redirect(target)).replace("127.0.0.1", "repo.test")
    env = await make_service(upstream_host="repo.test")
    await env.add("a.bin", BODY, stored=False, url=url)

    status, body = await get(env, "fixtures/a.bin")

    assert status == 502
    assert body == "fixtures/a.bin: upstream failed: redirect to a private address refused\n"
    assert upstream.requests("/a.bin") and not upstream.requests("/inside.bin"), inside
    logged = "\n".join(e for e in log_events if e.startswith("upstream failure: "))
    assert "allow_private_redirects is off" in logged


@pytest_twisted.ensureDeferred
async def test_redirects_of_a_public_remote_to_its_own_host_and_public_addresses_work(
    make_service, upstream, names
):
    upstream.register("/real.bin", faults.Serve(BODY))
    own = upstream.url("/real.bin", host="repo.test")
    url = upstream.register("/a.bin", faults.Redirect(own)).replace("127.0.0.1", "repo.test")
    env = await make_service(upstream_host="repo.test")
    await env.add("a.bin", BODY, stored=False, url=url)

    assert await get(env, "fixtures/a.bin") == (200, BODY.decode())
    assert "repo.test" in names.lookups


@pytest_twisted.ensureDeferred
async def test_allow_private_redirects_follows_them(make_service, upstream, names):
    upstream.register("/inside.bin", faults.Serve(BODY))
    target = upstream.url("/inside.bin", host="cdn.test")
    url = upstream.register("/a.bin", faults.Redirect(target)).replace("127.0.0.1", "repo.test")
    env = await make_service(
        upstream_host="repo.test", remote_extra="allow_private_redirects = true\n"
    )
    await env.add("a.bin", BODY, stored=False, url=url)

    assert await get(env, "fixtures/a.bin") == (200, BODY.decode())
    assert len(upstream.requests("/inside.bin")) == 1


@pytest_twisted.ensureDeferred
async def test_a_remote_on_a_loopback_address_may_redirect_within_loopback(make_service, upstream):
    upstream.register("/inside.bin", faults.Serve(BODY))
    url = upstream.register(
        "/a.bin", faults.Redirect(upstream.url("/inside.bin", host="localhost"))
    )
    env = await make_service()
    await env.add("a.bin", BODY, stored=False, url=url)

    assert await get(env, "fixtures/a.bin") == (200, BODY.decode())
    assert len(upstream.requests("/inside.bin")) == 1
