"""What the downloads of one remote share through its DownloadContext, against real loopback
servers: a mirror list fetched once and tried in order after a failure, and bearer tokens
(one token request per scope for the whole remote, an expired token refreshed once)."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.web.server import Request

from downloaders import DownloadError, NotAuthorized, NotFound
from downloaders.bearer import parse_challenge
from downloaders.mirrors import parse_mirror_list
from downloaders.settings import SettingsError
from downloaders.via import via_names
from importer import Remote
from tests.support.faults import Behaviour, Serve, Status
from tests.support.polling import until

FILES = {f"pool/f{n:03d}.bin": (b"file %d\n" % n) * (n + 1) for n in range(100)}


def digests(body: bytes) -> dict[str, str]:
    return {"sha256": hashlib.sha256(body).hexdigest()}


async def download_all(remote: Remote, base: str, tmp_path: Any) -> list[Any]:
    runs = [
        remote.get_downloader(
            url=base + name,
            expected_digests=digests(body),
            expected_size=len(body),
            temp_dir=str(tmp_path),
        ).run()
        for name, body in FILES.items()
    ]
    return await defer.gatherResults(runs, consumeErrors=True)


def test_mirror_list_and_challenge_parsing():
    text = "# mirrors\n\nhttp://a.example/pub\nftp://no.example/\nhttps://b.example/x/\n"
    assert parse_mirror_list(text) == ["http://a.example/pub/", "https://b.example/x/"]
    challenge = parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push"'
    )
    assert challenge == {
        "realm": "https://auth.example/token",
        "service": "reg",
        "scope": "repository:a/b:pull,push",
    }
    assert parse_challenge('Basic realm="x"') is None
    assert parse_challenge('Bearer realm="file:///etc/passwd"') is None


@pytest_twisted.ensureDeferred
async def test_100_downloads_fetch_the_mirror_list_once(upstream, tmp_path):
    for name, body in FILES.items():
        upstream.register(f"/good/{name}", Serve(body))
    listing = "# first a mirror that lost its files, then a good one\n{}\n{}\n".format(
        upstream.url("/stale/"), upstream.url("/good")
    )
    upstream.register("/mirrors.txt", Serve(listing.encode(), content_type="text/plain"))
    remote = Remote(
        name="m",
        url=upstream.url("/repo/PULP_MANIFEST"),
        mirror_list=upstream.url("/mirrors.txt"),
        max_retries=0,
        download_concurrency=10,
    )
    results = await download_all(remote, upstream.url("/repo/"), tmp_path)

    assert len(results) == 100
    assert len(upstream.requests("/mirrors.txt")) == 1, "one mirror-list request per remote"
    assert all(
        r.artifact_attributes["sha256"] == digests(FILES[n])["sha256"]
        for r, n in zip(results, FILES, strict=True)
    )
    assert len(upstream.requests("/good/pool/f000.bin")) == 1
    assert len(upstream.requests("/stale/pool/f000.bin")) == 1, "mirrors are tried in order"
    await remote.close()


@pytest_twisted.ensureDeferred
async def test_a_mirror_list_that_cannot_be_fetched_is_not_kept(upstream, tmp_path):
    remote = Remote(
        name="m",
        url=upstream.url("/repo/PULP_MANIFEST"),
        mirror_list=upstream.url("/mirrors.txt"),
        max_retries=0,
    )
    url = upstream.url("/repo/a.bin")
    with pytest.raises(Exception, match="404"):
        await remote.get_downloader(url, temp_dir=str(tmp_path)).run()  # its own 404
    upstream.register("/mirrors.txt", Serve(upstream.url("/good/").encode()))
    upstream.register("/good/a.bin", Serve(b"found"))
    result = await remote.get_downloader(url, temp_dir=str(tmp_path)).run()
    assert result.artifact_attributes["size"] == 5
    assert len(upstream.requests("/mirrors.txt")) == 2
    await remote.close()


class TokenService(Behaviour):
    """The realm: answers ``{"token": state.issue}`` and records each request."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def render(self, request: Request) -> bytes:
        self.state["token_requests"].append(
            (request.args, (request.getHeader(b"authorization") or b"").decode())
        )
        return Serve(json.dumps({"token": self.state["issue"]}).encode()).render(request)


class Registry(Behaviour):
    """Serves *body* to ``Authorization: Bearer <state.valid>``; a Bearer challenge otherwise."""

    def __init__(self, body: bytes, state: dict[str, Any], realm: str) -> None:
        self.body = body
        self.state = state
        self.realm = realm

    def render(self, request: Request) -> Any:
        if request.getHeader(b"authorization") == f"Bearer {self.state['valid']}".encode():
            return Serve(self.body).render(request)
        challenge = f'Bearer realm="{self.realm}",service="reg",scope="repository:r:pull"'
        return Status(401, {"WWW-Authenticate": challenge}).render(request)


@pytest_twisted.ensureDeferred
async def test_bearer_tokens_one_request_per_scope_and_one_refresh(upstream, tmp_path):
    state: dict[str, Any] = {"valid": "t1", "issue": "t1", "token_requests": []}
    realm = upstream.register("/token", TokenService(state))
    for name, body in FILES.items():
        upstream.register(f"/v2/{name}", Registry(body, state, realm))
    remote = Remote(
        name="reg",
        url=upstream.url("/v2/PULP_MANIFEST"),
        username="alice",
        password="s3cret",
        max_retries=0,
        download_concurrency=10,
    )
    results = await download_all(remote, upstream.url("/v2/"), tmp_path)
    assert len(results) == 100
    [(args, authorization)] = state["token_requests"]
    assert len(state["token_requests"]) == 1, "one token request for 100 downloads"
    assert args == {b"service": [b"reg"], b"scope": [b"repository:r:pull"]}
    assert authorization.startswith("Basic "), "the remote's credentials go to its own realm"

    # The token expires: the next downloads refresh it once, together.
    state["valid"] = state["issue"] = "t2"
    results = await download_all(remote, upstream.url("/v2/"), tmp_path)
    assert len(results) == 100 and len(state["token_requests"]) == 2

    # A token the registry refuses at once: one refresh, then the 401 is the answer.
    state["valid"], state["issue"] = "t3", "never-valid"
    name, body = next(iter(FILES.items()))
    with pytest.raises(NotAuthorized):
        await remote.get_downloader(
            upstream.url(f"/v2/{name}"), expected_digests=digests(body), temp_dir=str(tmp_path)
        ).run()
    assert len(state["token_requests"]) == 3
    await remote.close()


@pytest_twisted.ensureDeferred
async def test_a_token_service_that_never_answers_fails_the_download_in_time(upstream, tmp_path):
    from tests.support.faults import Gated

    state: dict[str, Any] = {"valid": "t1", "issue": "t1", "token_requests": []}
    gate = Gated(TokenService(state))
    realm = upstream.register("/token", gate)
    url = upstream.register("/v2/a.bin", Registry(b"blob", state, realm))
    remote = Remote(name="reg", url=url, max_retries=0, sock_read_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(DownloadError):  # its read timeout, or the token request's
        await remote.get_downloader(url, temp_dir=str(tmp_path)).run()
    assert time.monotonic() - started < 2.0
    await until(lambda: gate.waiting == 0)  # the token request's connection was dropped
    assert remote.downloader_factory().context.values == {}
    gate.release()
    result = await remote.get_downloader(url, temp_dir=str(tmp_path)).run()  # asked again
    assert result.artifact_attributes["size"] == 4
    await remote.close()


@pytest_twisted.ensureDeferred
async def test_a_mirror_list_too_big_is_refused(upstream, tmp_path):
    line = upstream.url("/m/").encode() + b"\n"
    upstream.register("/mirrors.txt", Serve(line * (1024 * 1024 // len(line) + 1)))
    remote = Remote(
        name="m",
        url=upstream.url("/repo/x"),
        mirror_list=upstream.url("/mirrors.txt"),
        max_retries=0,
    )
    with pytest.raises(NotFound):  # the download's own error: the list brought nothing
        await remote.get_downloader(upstream.url("/repo/a"), temp_dir=str(tmp_path)).run()
    with pytest.raises(DownloadError, match="mirror list failed: bigger than"):
        await remote.downloader_factory().mirror_list.bases()
    await remote.close()


@pytest_twisted.ensureDeferred
async def test_mirrors_from_a_list_on_another_origin_get_no_secrets(upstream, tmp_path):
    """The mirror list is the upstream's word: its mirrors on another origin (here localhost
    against 127.0.0.1) get neither the remote's credentials nor its secret headers."""
    upstream.register("/elsewhere/a.bin", Serve(b"mirrored"))
    upstream.register("/mirrors.txt", Serve(upstream.url("/elsewhere/", host="localhost").encode()))
    remote = Remote(
        name="m",
        url=upstream.url("/repo/PULP_MANIFEST"),
        mirror_list=upstream.url("/mirrors.txt"),
        username="alice",
        password="s3cret",
        headers={"X-Api-Key": "k3y", "X-Plain": "fine"},
        max_retries=0,
    )
    result = await remote.get_downloader(upstream.url("/repo/a.bin"), temp_dir=str(tmp_path)).run()
    assert result.artifact_attributes["size"] == 8
    [own] = upstream.requests("/repo/a.bin")
    assert own.headers["x-api-key"] == "k3y" and own.headers["authorization"].startswith("Basic")
    [mirrored] = upstream.requests("/elsewhere/a.bin")
    assert "authorization" not in mirrored.headers and "x-api-key" not in mirrored.headers
    assert mirrored.headers["x-plain"] == "fine"
    await remote.close()


@pytest_twisted.ensureDeferred
async def test_every_request_of_a_remote_carries_its_via_entry(upstream, tmp_path):
    """Files, the mirror list and bearer token requests: ``Via: 1.1 <via>`` and the
    User-Agent (a loop back to the streamer is then refused: `downloaders.via`)."""
    state: dict[str, Any] = {"valid": "t1", "issue": "t1", "token_requests": []}
    realm = upstream.register("/token", TokenService(state))
    upstream.register("/good/a.bin", Registry(b"found", state, realm))
    upstream.register("/mirrors.txt", Serve(upstream.url("/good/").encode()))
    remote = Remote(
        name="m",
        url=upstream.url("/repo/PULP_MANIFEST"),
        mirror_list=upstream.url("/mirrors.txt"),
        max_retries=0,
        via="streamer-a1",
    )
    result = await remote.get_downloader(upstream.url("/repo/a.bin"), temp_dir=str(tmp_path)).run()
    assert result.artifact_attributes["size"] == 5
    user_agent = remote.downloader_factory().user_agent()
    seen = [(path, r.headers) for path, r in upstream.all_requests()]
    assert {path for path, _ in seen} == {"/repo/a.bin", "/mirrors.txt", "/token", "/good/a.bin"}
    for path, headers in seen:
        assert headers.get("via") == "1.1 streamer-a1", path
        assert headers.get("user-agent") == user_agent, path
    await remote.close()


@pytest_twisted.ensureDeferred
async def test_our_via_entry_follows_one_the_remote_s_headers_set(upstream, tmp_path):
    url = upstream.register("/f", Serve(b"body"))
    remote = Remote(
        name="m", url=url, max_retries=0, via="streamer-a1", headers={"via": "1.0 gateway"}
    )
    await remote.get_downloader(url, temp_dir=str(tmp_path)).run()
    [request] = upstream.requests("/f")
    assert request.headers["via"] == "1.0 gateway, 1.1 streamer-a1"
    await remote.close()


def test_a_via_pseudonym_must_be_a_token():
    with pytest.raises(SettingsError, match="via: 'a b' is not an HTTP token"):
        Remote(name="m", url="https://example.org/PULP_MANIFEST", via="a b")
    assert via_names([b"1.1 a (x, y), HTTP/1.0 b", "1.1 c:8080", "junk"]) == {"a", "b", "c:8080"}
