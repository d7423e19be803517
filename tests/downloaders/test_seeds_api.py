"""Pulp's download API (the seeds), argument by argument, on Twisted types: the constructors'
positional order, auth/proxy/throttler, headers as dicts, the validation methods and errors,
allowed digests, custom file objects, custom validations and progress."""

from __future__ import annotations

import hashlib
import io
import os
import types
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.web.client import Agent, HTTPConnectionPool

from downloaders import (
    BaseDownloader,
    DigestValidationError,
    DownloadError,
    HttpDownloader,
    NotFound,
    SizeValidationError,
    UnsupportedDigestValidationError,
    ValidationError,
)
from downloaders.headers import ResponseHeaders
from tests.support.faults import RequireBasicAuth, Serve, Status

BODY = b"the seeds' own bytes\n" * 100
SHA256 = hashlib.sha256(BODY).hexdigest()
MD5 = hashlib.md5(BODY).hexdigest()  # what an old repository publishes


@pytest.fixture
def agent():
    from twisted.internet import reactor

    pool = HTTPConnectionPool(reactor, persistent=False)
    return Agent(reactor, pool=pool)


class RecordingThrottler:
    """``acquire()`` returning a Deferred and ``release()``, counting both."""

    def __init__(self) -> None:
        self.acquired = 0
        self.released = 0

    def acquire(self) -> defer.Deferred[None]:
        self.acquired += 1
        return defer.succeed(None)

    def release(self) -> None:
        self.released += 1


@pytest_twisted.ensureDeferred
async def test_positional_order_is_the_seeds_and_session_is_an_agent(upstream, agent, tmp_path):
    url = upstream.register("/a", Serve(BODY, headers={"X-Thing": "one"}))
    throttler = RecordingThrottler()
    seen: list[Any] = []
    downloader = HttpDownloader(
        url,
        agent,  # session
        ("user", "secret"),  # auth
        None,  # proxy
        None,  # proxy_auth
        seen.append,  # headers_ready_callback
        {"X-Asked": "yes"},  # headers
        throttler,  # throttler
        0,  # max_retries
        expected_digests={"sha256": SHA256},
        expected_size=len(BODY),
        temp_dir=str(tmp_path),
    )
    assert downloader.session is agent and downloader.agent is agent
    assert downloader.expected_digests == {"sha256": SHA256}
    result = await downloader.run()

    [request] = upstream.requests("/a")
    assert request.headers["x-asked"] == "yes"
    assert request.headers["authorization"] == "Basic dXNlcjpzZWNyZXQ="  # user:secret
    assert (throttler.acquired, throttler.released) == (1, 1)
    [headers] = seen
    assert isinstance(headers, dict), "the callback gets a dict, as the seeds say"
    assert headers["X-Thing"] == "one" and headers["x-thing"] == "one"
    assert result.headers == headers and isinstance(result.headers, ResponseHeaders)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in result.headers.items())
    assert result.headers.get("CONTENT-LENGTH") == str(len(BODY))
    assert result.artifact_attributes == {"size": len(BODY), "sha256": SHA256}


@pytest_twisted.ensureDeferred
async def test_auth_tuple_and_aiohttp_like_object(upstream, agent, tmp_path):
    url = upstream.register("/private", RequireBasicAuth("me", "pw", Serve(BODY)))

    class BasicAuth:  # the shape of aiohttp.BasicAuth
        login = "me"
        password = "pw"

    for auth in (("me", "pw"), BasicAuth()):
        result = await HttpDownloader(url, agent, auth=auth, temp_dir=str(tmp_path)).run()
        assert result.artifact_attributes["sha256"] == SHA256
    with pytest.raises(TypeError, match="auth must be a"):
        HttpDownloader(url, auth="me:pw")


@pytest_twisted.ensureDeferred
async def test_the_old_positional_order_still_works(upstream, agent, tmp_path):
    url = upstream.register("/old", Serve(BODY))
    semaphore = defer.DeferredSemaphore(1)
    downloader = HttpDownloader(
        url, {"sha256": SHA256}, len(BODY), semaphore, agent=agent, temp_dir=str(tmp_path)
    )
    assert (downloader.expected_digests, downloader.expected_size) == (
        {"sha256": SHA256},
        len(BODY),
    )
    assert downloader.semaphore is semaphore and downloader.auth is None
    await downloader.run()
    # The digests alone, in any Mapping, still read as the old order.
    alone = HttpDownloader(url, types.MappingProxyType({"sha256": SHA256}), agent=agent)
    assert (alone.expected_digests, alone.session) == ({"sha256": SHA256}, agent)


@pytest_twisted.ensureDeferred
async def test_proxy_and_proxy_auth(squid, upstream, tmp_path):
    url = upstream.register("/via", Serve(BODY))
    result = await HttpDownloader(url, proxy=squid.open_url, temp_dir=str(tmp_path)).run()
    assert result.artifact_attributes["sha256"] == SHA256
    [request] = upstream.requests("/via")
    assert "squid" in request.headers.get("via", "")
    # squid's credentialed port: the pair from proxy_auth reaches the proxy, never the origin.
    user, password = squid.username, squid.password
    await HttpDownloader(
        url, proxy=squid.auth_url, proxy_auth=(user, password), temp_dir=str(tmp_path)
    ).run()
    assert all("proxy-authorization" not in r.headers for r in upstream.requests("/via"))


@pytest_twisted.ensureDeferred
async def test_raise_for_status_and_silencing_it(upstream, agent, tmp_path):
    url = upstream.register("/gone", Status(404))
    with pytest.raises(NotFound):
        await HttpDownloader(url, agent, temp_dir=str(tmp_path)).run()

    class KeepsErrorPages(HttpDownloader):
        def raise_for_status(self, response: Any) -> None:
            if response.code != 404:
                super().raise_for_status(response)

    result = await KeepsErrorPages(url, agent, temp_dir=str(tmp_path)).run()
    with open(result.path, "rb") as f:
        assert f.read() == b"404 from upstream\n"


def test_validation_errors_have_the_seeds_shapes():
    digest = DigestValidationError("aa", "bb", url="http://h/x")
    assert (digest.actual, digest.expected, digest.url) == ("aa", "bb", "http://h/x")
    size = SizeValidationError(3, 4, url="http://h/x")
    assert (size.actual, size.expected, size.url) == (3, 4, "http://h/x")
    for error in (digest, size):
        assert isinstance(error, ValidationError) and isinstance(error, DownloadError)
    base = ValidationError("my-code")
    assert base.error_code == "my-code" and str(base) == "my-code"
    assert (digest.error_code, size.error_code) == ("digest", "size")
    # The older spellings still build the same errors.
    old = DigestValidationError("http://h/x", "sha256", "bb", "aa")
    assert (old.actual, old.expected, old.algorithm) == ("aa", "bb", "sha256")
    assert SizeValidationError("http://h/x", 4, 3).actual == 3


class Chunks(BaseDownloader):
    """A new protocol the seeds' way: every byte through handle_data, then finalize."""

    def __init__(self, url: str, chunks: list[bytes], *args: Any, **kwargs: Any) -> None:
        super().__init__(url, *args, **kwargs)
        self.chunks = chunks

    async def _run(self, extra_data: Any = None) -> None:
        for chunk in self.chunks:
            await self.handle_data(chunk)  # awaitable, as Pulp's coroutine is
        await self.finalize()


@pytest_twisted.ensureDeferred
async def test_validate_size_and_digests_are_methods(tmp_path):
    downloader = Chunks("x://a", [BODY[:10], BODY[10:]], temp_dir=str(tmp_path))
    downloader.expected_size = len(BODY)
    downloader.expected_digests = {"sha256": SHA256}
    await downloader.run()
    downloader.validate_size()
    downloader.validate_digests()
    downloader.expected_size = 1
    with pytest.raises(SizeValidationError) as caught:
        downloader.validate_size()
    assert (caught.value.actual, caught.value.expected) == (len(BODY), 1)
    downloader.expected_digests = {"sha256": "0" * 64}
    with pytest.raises(DigestValidationError) as digest:
        downloader.validate_digests()
    assert (digest.value.actual, digest.value.expected) == (SHA256, "0" * 64)


@pytest_twisted.ensureDeferred
async def test_md5_is_refused_unless_allowed_and_then_computed(tmp_path):
    with pytest.raises(UnsupportedDigestValidationError, match="allowed_digests") as caught:
        Chunks("x://a", [BODY], {"md5": MD5})
    assert "add it to the remote's allowed_digests" in str(caught.value)

    allowed = ["md5", "sha256"]
    result = await Chunks(
        "x://a", [BODY], {"md5": MD5}, allowed_digests=allowed, temp_dir=str(tmp_path)
    ).run()
    assert result.artifact_attributes == {"size": len(BODY), "md5": MD5, "sha256": SHA256}
    # Asked for without being expected: computed, reported, not checked.
    result = await Chunks(
        "x://a",
        [BODY],
        allowed_digests=["sha1", "sha256", "sha512"],
        digest_algorithms=["sha1", "sha256", "sha512"],
        temp_dir=str(tmp_path),
    ).run()
    assert set(result.artifact_attributes) == {"size", "sha1", "sha256", "sha512"}
    with pytest.raises(ValidationError):
        await Chunks("x://a", [BODY], {"md5": "0" * 32}, allowed_digests=allowed).run()
    with pytest.raises(ValueError, match="unknown algorithm 'crc32'"):
        Chunks("x://a", [BODY], allowed_digests=["crc32"])


@pytest_twisted.ensureDeferred
async def test_custom_file_object_takes_the_bytes(tmp_path):
    target = tmp_path / "out.bin"
    with open(target, "wb") as f:
        result = await Chunks("x://a", [BODY[:5], BODY[5:]], custom_file_object=f).run()
        assert not f.closed
    assert result.path == str(target)
    assert target.read_bytes() == BODY
    memory = io.BytesIO()
    result = await Chunks("x://a", [BODY], None, None, None, memory).run()  # 5th positional
    assert memory.getvalue() == BODY and result.path is None


@pytest_twisted.ensureDeferred
async def test_custom_validations_without_subclassing(tmp_path):
    def is_text(downloader: BaseDownloader) -> None:
        with open(downloader.path, "rb") as f:
            if b"\0" in f.read():
                raise ValueError("binary content")

    result = await Chunks("x://a", [BODY], validators=[is_text], temp_dir=str(tmp_path)).run()
    assert result.artifact_attributes["sha256"] == SHA256

    with pytest.raises(ValidationError, match="validator is_text failed: binary content") as caught:
        await Chunks("x://b", [b"\0\1"], validators=[is_text], temp_dir=str(tmp_path)).run()
    assert caught.value.error_code == "custom"
    with pytest.raises(ValidationError, match="refused"):
        await Chunks("x://c", [BODY], validators=[lambda d: False], temp_dir=str(tmp_path)).run()
    assert list(tmp_path.iterdir()) == [tmp_path / result.path.rsplit("/", 1)[1]]


@pytest_twisted.ensureDeferred
async def test_progress_events(upstream, agent, tmp_path):
    url = upstream.register("/big", Serve(BODY * 100, chunked=True))
    events: list[tuple[int, int | None]] = []
    await HttpDownloader(
        url,
        agent,
        expected_size=len(BODY) * 100,
        progress=lambda *e: events.append(e),
        temp_dir=str(tmp_path),
    ).run()
    assert events[-1] == (len(BODY) * 100, len(BODY) * 100)
    assert [so_far for so_far, _ in events] == sorted({so_far for so_far, _ in events})


@pytest_twisted.ensureDeferred
async def test_file_downloader_takes_the_base_positional_parameters(tmp_path):
    from downloaders import FileDownloader

    source = tmp_path / "in.bin"
    source.write_bytes(BODY)
    out = io.BytesIO()
    downloader = FileDownloader(
        source.as_uri(), {"sha256": SHA256}, len(BODY), None, out, allowed_import_paths=[tmp_path]
    )
    result = await downloader.run()
    assert out.getvalue() == BODY and result.artifact_attributes["sha256"] == SHA256


@pytest_twisted.ensureDeferred
async def test_by_default_the_file_is_written_in_the_current_working_folder(
    upstream, agent, tmp_path, monkeypatch
):
    """Pulp: "The handle_data() method by default writes to a random file in the current
    working directory" (with no temp_dir, and from a factory that has none)."""
    from downloaders import DownloaderFactory
    from importer import Remote

    url = upstream.register("/a", Serve(BODY))
    monkeypatch.chdir(tmp_path)
    plain = await HttpDownloader(url, agent, expected_digests={"sha256": SHA256}).run()
    assert os.path.dirname(plain.path) == str(tmp_path)
    factory = DownloaderFactory(Remote(name="r", url=url))
    try:
        built = await factory.build(url, expected_size=len(BODY)).run()
    finally:
        await factory.close()
    assert os.path.dirname(built.path) == str(tmp_path)
    chunks = Chunks("x://a", [BODY])
    await chunks.run()
    assert os.path.dirname(chunks.path) == str(tmp_path)


@pytest_twisted.ensureDeferred
async def test_result_headers_answer_getall_and_getone_as_pulp_s_multidict(
    upstream, agent, tmp_path
):
    """Pulp's DownloadResult.headers is aiohttp's multidict: ``getall`` gives each field line's
    value (a joined dict value would merge Set-Cookie or Link lines), ``getone`` the first."""
    from twisted.web.http_headers import Headers

    url = upstream.register("/a", Serve(BODY, headers={"X-Thing": "one"}))
    result = await HttpDownloader(url, agent, temp_dir=str(tmp_path)).run()
    assert result.headers.getall("x-thing") == ["one"] and result.headers.getone("X-THING") == "one"
    assert result.headers.getall("x-none", []) == [] and result.headers.getone("x-none", 7) == 7
    for method in (result.headers.getall, result.headers.getone):
        with pytest.raises(KeyError):
            method("x-none")
    raw = Headers({b"Link": [b"<a>; rel=next", b"<b>; rel=prev"]})
    headers = ResponseHeaders.from_twisted(raw)
    assert headers["link"] == "<a>; rel=next, <b>; rel=prev"
    assert headers.getall("link") == ["<a>; rel=next", "<b>; rel=prev"]
    assert headers.getone(b"Link") == "<a>; rel=next"
    plain = ResponseHeaders({"Link": "<c>"})  # from a mapping: one value per name
    assert plain.getall("LINK") == ["<c>"] and plain.getone("link") == "<c>"
